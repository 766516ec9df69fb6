include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

install(TARGETS hattn hattn_headers EXPORT hattnTargets
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
  INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/hattn DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(EXPORT hattnTargets NAMESPACE hattn:: DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/hattn)

configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/hattnConfig.cmake.in
  ${PROJECT_BINARY_DIR}/hattnConfig.cmake
  INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/hattn)
write_basic_package_version_file(${PROJECT_BINARY_DIR}/hattnConfigVersion.cmake
  COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/hattnConfig.cmake ${PROJECT_BINARY_DIR}/hattnConfigVersion.cmake
  DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/hattn)
