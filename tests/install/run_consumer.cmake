# Driven by tests/install/CMakeLists.txt (cmake -P). Builds and runs
# examples/consumer against hattn, either installed (MODE=install) or built
# from source with add_subdirectory (MODE=subdirectory).
#
# Inputs: MODE, WORK_DIR, HATTN_BINARY_DIR, CONSUMER_SOURCE_DIR, CONFIG,
# GENERATOR, CXX_COMPILER, CUDA_COMPILER, HATTN_ENABLE_CUDA, HATTN_SOURCE_DIR.
cmake_minimum_required(VERSION 3.25)

foreach(var MODE WORK_DIR HATTN_BINARY_DIR CONSUMER_SOURCE_DIR GENERATOR CXX_COMPILER)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "run_consumer.cmake: ${var} is not set")
  endif()
endforeach()
if(NOT CONFIG)
  set(CONFIG Release)
endif()

# Runs a command, echoing it; stops the test with its output when it fails.
function(run_step what)
  string(REPLACE ";" " " shown "${ARGN}")
  message(STATUS "[${what}] ${shown}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    message("${out}")
    message(FATAL_ERROR "[${what}] failed (${rc})")
  endif()
  set(step_output "${out}" PARENT_SCOPE)
endfunction()

set(consumer_args
  -G "${GENERATOR}"
  -DCMAKE_BUILD_TYPE=${CONFIG}
  -DCMAKE_CXX_COMPILER=${CXX_COMPILER}
  # Find hattn only where this test put it, never in a user's package registry.
  -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF
  -DCMAKE_FIND_USE_SYSTEM_PACKAGE_REGISTRY=OFF)
if(CUDA_COMPILER)
  list(APPEND consumer_args -DCMAKE_CUDA_COMPILER=${CUDA_COMPILER})
endif()

set(build_dir ${WORK_DIR}/build)
if(MODE STREQUAL "install")
  # A fresh prefix and consumer build every time: a stale file must not make
  # the test pass.
  set(prefix ${WORK_DIR}/prefix)
  file(REMOVE_RECURSE ${WORK_DIR})
  run_step(install ${CMAKE_COMMAND} --install ${HATTN_BINARY_DIR} --prefix ${prefix}
           --config ${CONFIG})
  foreach(f include/hattn/cpu/dense_decode.hpp)
    if(NOT EXISTS ${prefix}/${f})
      message(FATAL_ERROR "install: ${prefix}/${f} is missing")
    endif()
  endforeach()
  file(GLOB_RECURSE configs ${prefix}/*/hattnConfig.cmake)
  file(GLOB_RECURSE libs ${prefix}/*/libhattn.a ${prefix}/*/libhattn.so ${prefix}/*/hattn.lib)
  if(NOT configs OR NOT libs)
    message(FATAL_ERROR "install: hattnConfig.cmake or the library is missing under ${prefix}")
  endif()
  list(APPEND consumer_args -DCMAKE_PREFIX_PATH=${prefix})
elseif(MODE STREQUAL "subdirectory")
  if(NOT HATTN_SOURCE_DIR)
    message(FATAL_ERROR "run_consumer.cmake: HATTN_SOURCE_DIR is not set")
  endif()
  # Kept between runs: rebuilding libhattn from scratch every time is slow.
  list(APPEND consumer_args -DHATTN_SOURCE_DIR=${HATTN_SOURCE_DIR}
       -DHATTN_ENABLE_CUDA=${HATTN_ENABLE_CUDA})
else()
  message(FATAL_ERROR "run_consumer.cmake: unknown MODE '${MODE}'")
endif()

run_step(configure ${CMAKE_COMMAND} -S ${CONSUMER_SOURCE_DIR} -B ${build_dir} ${consumer_args})

if(MODE STREQUAL "install")
  # The consumer must have used the installed package, not the build tree.
  file(STRINGS ${build_dir}/CMakeCache.txt hattn_dir_line REGEX "^hattn_DIR:")
  string(REGEX REPLACE "^hattn_DIR:[A-Z]*=" "" hattn_dir "${hattn_dir_line}")
  file(REAL_PATH "${hattn_dir}" hattn_dir)
  file(REAL_PATH "${prefix}" real_prefix)
  string(FIND "${hattn_dir}" "${real_prefix}/" at)
  if(NOT at EQUAL 0)
    message(FATAL_ERROR "consumer found hattn at '${hattn_dir}', not under ${real_prefix}")
  endif()
  message(STATUS "consumer uses ${hattn_dir}")
endif()

cmake_host_system_information(RESULT jobs QUERY NUMBER_OF_LOGICAL_CORES)
run_step(build ${CMAKE_COMMAND} --build ${build_dir} --config ${CONFIG} --parallel ${jobs})

find_program(consumer hattn_consumer PATHS ${build_dir} ${build_dir}/${CONFIG} NO_DEFAULT_PATH
             NO_CACHE)
if(NOT consumer)
  message(FATAL_ERROR "hattn_consumer was not built under ${build_dir}")
endif()
run_step(run ${consumer})
message(STATUS "${step_output}")
