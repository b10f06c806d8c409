# Fails when a folder's sources include, directly or through other project headers, a header of a
# layer above them (docs/ARCHITECTURE.md, "Folders"). One rule a line: "folder|forbidden", where
# forbidden is a header or a folder (ending in /) as the #include line spells it.
# Run by ctest: cmake -DROOT=<source tree> -P check_layering.cmake
cmake_minimum_required(VERSION 3.25) # IN_LIST

set(MOP_LAYERING_RULES
    # The plans and their lowering know the Schedule IR, not the engine that plays it.
    "strategies|sim/engine.hpp"
    "strategies|sim/result.hpp"
    "strategies|planner/"
    "lowering|sim/engine.hpp"
    "lowering|sim/result.hpp"
    "lowering|planner/"
    # The executors run a program; pricing and searching plans is not theirs, nor is making
    # the program, nor reading the Plan it was made from.
    "real_backend|sim/engine.hpp"
    "real_backend|planner/"
    "real_backend|lowering/"
    "real_backend|strategies/"
    # The IR stands alone.
    "sim|strategies/"
    "sim|lowering/")

if(NOT DEFINED ROOT OR NOT IS_DIRECTORY "${ROOT}")
  message(FATAL_ERROR "check_layering.cmake needs -DROOT=<source tree>")
endif()

# The project-relative paths a file includes with #include "..." or <...>.
function(mop_includes_of file out)
  file(STRINGS "${ROOT}/${file}" lines REGEX "^[ \t]*#[ \t]*include[ \t]*[<\"]")
  set(paths)
  foreach(line IN LISTS lines)
    if(line MATCHES "^[ \t]*#[ \t]*include[ \t]*[<\"]([^>\"]+)[>\"]")
      list(APPEND paths "${CMAKE_MATCH_1}")
    endif()
  endforeach()
  set(${out} "${paths}" PARENT_SCOPE)
endfunction()

# True when `path` is the forbidden header or lies in the forbidden folder.
function(mop_is_forbidden path forbidden out)
  string(LENGTH "${forbidden}" n)
  string(SUBSTRING "${path}" 0 ${n} head)
  if(forbidden MATCHES "/$")
    if(head STREQUAL forbidden)
      set(${out} TRUE PARENT_SCOPE)
      return()
    endif()
  elseif(path STREQUAL forbidden)
    set(${out} TRUE PARENT_SCOPE)
    return()
  endif()
  set(${out} FALSE PARENT_SCOPE)
endfunction()

# The folders that have rules, each searched once.
set(folders)
foreach(rule IN LISTS MOP_LAYERING_RULES)
  string(REPLACE "|" ";" parts "${rule}")
  list(GET parts 0 folder)
  list(APPEND folders "${folder}")
  list(GET parts 1 forbidden)
  list(APPEND forbidden_in_${folder} "${forbidden}")
endforeach()
list(REMOVE_DUPLICATES folders)

set(violations)
set(reported)
foreach(folder IN LISTS folders)
  file(GLOB_RECURSE sources RELATIVE "${ROOT}" "${ROOT}/${folder}/*.cpp" "${ROOT}/${folder}/*.hpp"
       "${ROOT}/${folder}/*.h" "${ROOT}/${folder}/*.cu" "${ROOT}/${folder}/*.cuh")
  list(SORT sources)
  foreach(source IN LISTS sources)
    # Breadth-first over the project headers the source reaches; `via_<path>` holds the headers
    # between the source and <path>, so that a violation names the whole chain.
    set(queue "${source}")
    set(seen "${source}")
    set(via_${source})
    while(queue)
      list(POP_FRONT queue file)
      mop_includes_of("${file}" included)
      foreach(path IN LISTS included)
        set(allowed TRUE)
        foreach(forbidden IN LISTS forbidden_in_${folder})
          mop_is_forbidden("${path}" "${forbidden}" bad)
          # Each offending #include line once, with the first chain that reaches it.
          if(bad AND NOT "${file}|${path}" IN_LIST reported)
            list(APPEND reported "${file}|${path}")
            set(chain "${source}")
            foreach(hop IN LISTS via_${file})
              string(APPEND chain " -> ${hop}")
            endforeach()
            if(NOT file STREQUAL source)
              string(APPEND chain " -> ${file}")
            endif()
            string(APPEND violations "\n  ${chain} includes ${path} (rule: ${folder}/ never "
                                     "includes ${forbidden})")
          endif()
          if(bad)
            set(allowed FALSE)
          endif()
        endforeach()
        if(allowed AND EXISTS "${ROOT}/${path}" AND NOT path IN_LIST seen)
          list(APPEND seen "${path}")
          list(APPEND queue "${path}")
          set(via_${path} ${via_${file}})
          if(NOT file STREQUAL source)
            list(APPEND via_${path} "${file}")
          endif()
        endif()
      endforeach()
    endwhile()
  endforeach()
endforeach()

if(violations)
  message(FATAL_ERROR "includes that break the layering (docs/ARCHITECTURE.md):${violations}")
endif()
