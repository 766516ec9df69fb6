# Debian 12's xsimd 8.1 package exports its target with
# INTERFACE_LINK_LIBRARIES "xtl" but its config never looks for xtl (and
# libxtl-dev is not a dependency), so "xtl" degrades to a plain library name:
# whatever links hattn::hattn, which carries $<LINK_ONLY:xsimd>, fails with
# "cannot find -lxtl". xsimd and xtl are header-only and hattn does not use
# xtl, so drop the dangling item. Used by the top-level CMakeLists.txt after
# find_package(xsimd) and by the installed hattnConfig.cmake after
# find_dependency(xsimd).
if(TARGET xsimd AND NOT TARGET xtl)
  get_target_property(_hattn_xsimd_libs xsimd INTERFACE_LINK_LIBRARIES)
  if(_hattn_xsimd_libs AND "xtl" IN_LIST _hattn_xsimd_libs)
    list(REMOVE_ITEM _hattn_xsimd_libs xtl)
    set_property(TARGET xsimd PROPERTY INTERFACE_LINK_LIBRARIES "${_hattn_xsimd_libs}")
  endif()
  unset(_hattn_xsimd_libs)
endif()
