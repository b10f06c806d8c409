# Replaces doctest 2.4.9's doctestAddTests.cmake (same inputs, set by doctest_discover_tests()).
# Why: with ADD_LABELS its script asks the program for each test's suites by passing the test
# name as a --test-case filter, unescaped, so a name with a comma (most of ours) gets no label;
# and it starts the program once per test. Here the program is asked once for its suites, then
# once per suite for that suite's test names: every test gets its suites as ctest LABELS, with
# a handful of runs whatever the number of tests.

set(prefix "${TEST_PREFIX}")
set(suffix "${TEST_SUFFIX}")
set(extra_args ${TEST_EXTRA_ARGS})
set(properties ${TEST_PROPERTIES})
set(add_labels ${TEST_ADD_LABELS})
set(script)

function(add_command NAME)
  set(_args "")
  foreach(_arg ${ARGN})
    if(_arg MATCHES "[^-./:a-zA-Z0-9_]")
      set(_args "${_args} [==[${_arg}]==]")
    else()
      set(_args "${_args} ${_arg}")
    endif()
  endforeach()
  set(script "${script}${NAME}(${_args})\n" PARENT_SCOPE)
endfunction()

# The lines a listing prints, without doctest's banner and summary lines.
function(doctest_list OUT)
  execute_process(
    COMMAND ${TEST_EXECUTOR} "${TEST_EXECUTABLE}" ${ARGN}
    OUTPUT_VARIABLE output
    RESULT_VARIABLE result
    WORKING_DIRECTORY "${TEST_WORKING_DIR}")
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "Error running test executable '${TEST_EXECUTABLE}':\n"
                        "  Result: ${result}\n  Output: ${output}\n")
  endif()
  # One line per name. CMake lists are ';'-separated, so a name with a ';' would become two
  # tests that match nothing and pass: refuse it.
  if(output MATCHES ";")
    string(REGEX MATCH "[^\n]*;[^\n]*" bad "${output}")
    message(FATAL_ERROR "${TEST_EXECUTABLE}: a test name contains ';', which ctest cannot hold: "
                        "\"${bad}\"")
  endif()
  string(REPLACE "\n" ";" output "${output}")
  set(lines)
  foreach(line IN LISTS output)
    if(line STREQUAL "" OR line MATCHES "^===+$" OR line MATCHES [==[^\[doctest\] ]==])
      continue()
    endif()
    list(APPEND lines "${line}")
  endforeach()
  set(${OUT} "${lines}" PARENT_SCOPE)
endfunction()

if(NOT EXISTS "${TEST_EXECUTABLE}")
  message(FATAL_ERROR "Specified test executable '${TEST_EXECUTABLE}' does not exist")
endif()

set(spec)
if("${TEST_SPEC}" MATCHES .)
  set(spec "--test-case=${TEST_SPEC}")
endif()
doctest_list(tests ${spec} --list-test-cases)

# name -> labels, kept in variables named after a hash of the test name.
if(add_labels)
  doctest_list(suites --list-test-suites)
  foreach(suite IN LISTS suites)
    doctest_list(members ${spec} "--test-suite=${suite}" --list-test-cases)
    foreach(member IN LISTS members)
      string(MD5 key "${member}")
      list(APPEND labels_${key} "${suite}")
    endforeach()
  endforeach()
endif()

# LABELS given in PROPERTIES (e.g. "gpu") are merged with the suites, not overwritten by them.
set(other_properties)
set(fixed_labels)
list(LENGTH properties n_properties)
set(i 0)
while(i LESS n_properties)
  list(GET properties ${i} key)
  math(EXPR i "${i} + 1")
  list(GET properties ${i} value)
  math(EXPR i "${i} + 1")
  if(key STREQUAL "LABELS")
    list(APPEND fixed_labels "${value}")
  else()
    list(APPEND other_properties "${key}" "${value}")
  endif()
endwhile()

set(all_tests)
foreach(test IN LISTS tests)
  string(MD5 key "${test}")
  # doctest's --test-case takes a comma-separated list of filters: escape the name's commas.
  string(REPLACE "," "\\," test_filter "${test}")
  add_command(add_test "${prefix}${test}${suffix}" ${TEST_EXECUTOR} "${TEST_EXECUTABLE}"
              "--test-case=${test_filter}" ${extra_args})
  add_command(set_tests_properties "${prefix}${test}${suffix}" PROPERTIES
              WORKING_DIRECTORY "${TEST_WORKING_DIR}" ${other_properties})
  # LABELS takes one list value: written as one bracket argument, its ';' kept.
  set(labels ${fixed_labels} ${labels_${key}})
  if(labels)
    string(APPEND script "set_tests_properties([==[${prefix}${test}${suffix}]==] PROPERTIES "
                         "LABELS [==[${labels}]==])\n")
  endif()
  list(APPEND all_tests "${prefix}${test}${suffix}")
endforeach()

add_command(set ${TEST_LIST} ${all_tests})
file(WRITE "${CTEST_FILE}" "${script}")
