# Install rules and the package config that lets another project do
#   find_package(hattn REQUIRED)
#   target_link_libraries(app PRIVATE hattn::hattn)
#
# The installed config must find every package the exported targets name,
# including PRIVATE dependencies of the static library: they reach the export
# as $<LINK_ONLY:...> (xsimd today, CUDA::cudart once the CUDA backend links
# it). Rather than keep a second list by hand, the dependencies are read off
# the targets' link libraries here, so the config follows src/CMakeLists.txt.

include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(HATTN_INSTALL_CMAKEDIR ${CMAKE_INSTALL_LIBDIR}/cmake/hattn CACHE STRING
    "Where to install hattnConfig.cmake (relative to the prefix)")
mark_as_advanced(HATTN_INSTALL_CMAKEDIR)

set(hattn_export_targets hattn hattn_headers)
if(TARGET hattn::model)
  get_target_property(hattn_model_target hattn::model ALIASED_TARGET)
  list(APPEND hattn_export_targets ${hattn_model_target})
endif()

# package name -> pattern of the imported targets it provides
set(hattn_known_packages TBB xsimd Eigen3 nlohmann_json CUDAToolkit)
set(hattn_pkg_pattern_TBB "TBB::")
set(hattn_pkg_pattern_xsimd "(^|[^A-Za-z0-9_])xsimd($|[^A-Za-z0-9_])")
set(hattn_pkg_pattern_Eigen3 "Eigen3::")
set(hattn_pkg_pattern_nlohmann_json "nlohmann_json::")
set(hattn_pkg_pattern_CUDAToolkit "CUDA::")

set(hattn_link_items)
foreach(target IN LISTS hattn_export_targets)
  foreach(prop LINK_LIBRARIES INTERFACE_LINK_LIBRARIES)
    get_target_property(items ${target} ${prop})
    if(items)
      list(APPEND hattn_link_items ${items})
    endif()
  endforeach()
endforeach()

set(HATTN_CONFIG_DEPENDENCIES "")
foreach(pkg IN LISTS hattn_known_packages)
  set(found FALSE)
  foreach(item IN LISTS hattn_link_items)
    if(item MATCHES "${hattn_pkg_pattern_${pkg}}")
      set(found TRUE)
    endif()
  endforeach()
  if(found)
    string(APPEND HATTN_CONFIG_DEPENDENCIES "find_dependency(${pkg})\n")
  endif()
endforeach()

install(TARGETS ${hattn_export_targets} EXPORT hattnTargets
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
  RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR}
  INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/hattn DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(EXPORT hattnTargets NAMESPACE hattn:: DESTINATION ${HATTN_INSTALL_CMAKEDIR})
# The same targets from the build tree, for find_package(hattn) with
# hattn_DIR pointing at a build directory.
export(EXPORT hattnTargets NAMESPACE hattn:: FILE ${PROJECT_BINARY_DIR}/hattnTargets.cmake)

# A copy next to the build-tree config, which includes it too.
configure_file(${PROJECT_SOURCE_DIR}/cmake/HattnXsimdXtl.cmake
  ${PROJECT_BINARY_DIR}/HattnXsimdXtl.cmake COPYONLY)
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/hattnConfig.cmake.in
  ${PROJECT_BINARY_DIR}/hattnConfig.cmake
  INSTALL_DESTINATION ${HATTN_INSTALL_CMAKEDIR})
write_basic_package_version_file(${PROJECT_BINARY_DIR}/hattnConfigVersion.cmake
  COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/hattnConfig.cmake ${PROJECT_BINARY_DIR}/hattnConfigVersion.cmake
  ${PROJECT_SOURCE_DIR}/cmake/HattnXsimdXtl.cmake
  DESTINATION ${HATTN_INSTALL_CMAKEDIR})
