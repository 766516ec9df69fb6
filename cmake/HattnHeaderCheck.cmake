# Header self-containment check: every public header under include/hattn must
# compile on its own (DESIGN.md section 7). For each header we generate a .cpp
# that includes only that header and compile them all in one OBJECT library
# that is part of the default build, so a header that forgets an #include
# breaks the build (and scripts/test.sh) instead of a user's.
#
# Headers that need an optional dependency are checked only when it is there:
# cuda/, runtime/cuda_* and model/cuda_* when HATTN_ENABLE_CUDA is ON, model/
# when the hattn::model target exists.

function(hattn_add_header_check)
  set(include_root ${PROJECT_SOURCE_DIR}/include)
  file(GLOB_RECURSE headers CONFIGURE_DEPENDS RELATIVE ${include_root}
       ${include_root}/hattn/*.hpp ${include_root}/hattn/*.h)
  list(SORT headers)

  set(out_dir ${PROJECT_BINARY_DIR}/header_check)
  set(sources)
  set(skipped)
  foreach(header IN LISTS headers)
    if(header MATCHES "^hattn/(cuda/|runtime/cuda_|model/cuda_)" AND NOT HATTN_ENABLE_CUDA)
      list(APPEND skipped ${header})
      continue()
    endif()
    if(header MATCHES "^hattn/model/" AND NOT TARGET hattn::model)
      list(APPEND skipped ${header})
      continue()
    endif()
    string(REGEX REPLACE "[^A-Za-z0-9_]" "_" stem "${header}")
    set(source ${out_dir}/${stem}.cpp)
    # file(CONFIGURE) rewrites the file only when its content changes, so a
    # re-configure does not rebuild every check.
    file(CONFIGURE OUTPUT ${source} CONTENT "#include \"${header}\"  // and nothing else\n" @ONLY)
    list(APPEND sources ${source})
  endforeach()

  # Drop checks of headers that were removed or renamed.
  file(GLOB stale ${out_dir}/*.cpp)
  if(sources)
    list(REMOVE_ITEM stale ${sources})
  endif()
  if(stale)
    file(REMOVE ${stale})
  endif()

  if(skipped)
    list(LENGTH skipped n)
    message(STATUS "hattn header check: ${n} header(s) skipped (optional dependency off)")
  endif()
  if(NOT sources)
    return()
  endif()

  add_library(hattn_header_check OBJECT ${sources})
  target_link_libraries(hattn_header_check PRIVATE hattn::hattn)
  if(TARGET hattn::model)
    target_link_libraries(hattn_header_check PRIVATE hattn::model)
  endif()
  if(HATTN_ENABLE_CUDA)
    # Public cuda/ headers include only <cuda_runtime_api.h>: a plain C++
    # compiler plus the toolkit's include directory must be enough.
    target_link_libraries(hattn_header_check PRIVATE CUDA::cudart)
  endif()
  hattn_set_warnings(hattn_header_check)
endfunction()

hattn_add_header_check()
