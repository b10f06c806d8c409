# Fails when a test case of EXE is in none of the evidence suites (docs/TESTING.md):
#   independent  a published figure, a hand calculation written in the test, or a second method
#   fitted       guards a fitted point (a regression guard; no accuracy claim rests on it)
#   plumbing     wiring, formats, errors, exit codes
# Run by ctest: cmake -DEXE=<test program> -P check_evidence_labels.cmake
execute_process(
  COMMAND "${EXE}" --list-test-cases --test-suite-exclude=independent,fitted,plumbing
  OUTPUT_VARIABLE output
  RESULT_VARIABLE result)
if(NOT result EQUAL 0)
  message(FATAL_ERROR "${EXE} --list-test-cases failed (${result}):\n${output}")
endif()
string(REPLACE "\n" ";" lines "${output}")
set(unlabelled)
foreach(line IN LISTS lines)
  if(line STREQUAL "" OR line MATCHES "^===+$" OR line MATCHES [==[^\[doctest\] ]==])
    continue()
  endif()
  string(APPEND unlabelled "\n  ${line}")
endforeach()
if(unlabelled)
  message(FATAL_ERROR "test cases with no evidence label (add * doctest::test_suite(\"independent\" "
                      "| \"fitted\" | \"plumbing\"), see docs/TESTING.md):${unlabelled}")
endif()
