# Injected with -DCMAKE_PROJECT_INCLUDE=<this file> when building against the ROS 2 wheels of
# the Python package index (tools/build_interfaces.sh does; for colcon see docs/ros.md). Not
# needed, and not used, with a ROS distro from apt or source.
#
# The wheels' exported CMake targets <pkg>::<pkg>__rosidl_generator_py name include folders
# of the machine that built the wheels (/opt/python/cp311-cp311/include/python3.11 and its
# numpy folder). CMake refuses to generate a build that links an imported target with an
# include folder that does not exist. At the end of the top-level CMakeLists.txt this drops
# such missing folders from every imported target; the package's own Python extension gets
# the real ones from FindPython3. Needs CMake >= 3.19 (cmake_language(DEFER)).
get_property(_saferl_fixups_done GLOBAL PROPERTY SAFERL_ROS_WHEELS_FIXUPS_DONE)
if(NOT _saferl_fixups_done AND CMAKE_CURRENT_SOURCE_DIR STREQUAL CMAKE_SOURCE_DIR)
  set_property(GLOBAL PROPERTY SAFERL_ROS_WHEELS_FIXUPS_DONE TRUE)

  function(_saferl_drop_missing_include_dirs)
    get_property(_targets DIRECTORY "${CMAKE_SOURCE_DIR}" PROPERTY IMPORTED_TARGETS)
    foreach(_target IN LISTS _targets)
      get_target_property(_dirs ${_target} INTERFACE_INCLUDE_DIRECTORIES)
      if(NOT _dirs)
        continue()
      endif()
      set(_kept "")
      set(_dropped "")
      foreach(_dir IN LISTS _dirs)
        if(NOT _dir MATCHES "^\\$<" AND IS_ABSOLUTE "${_dir}" AND NOT EXISTS "${_dir}")
          list(APPEND _dropped "${_dir}")
        else()
          list(APPEND _kept "${_dir}")
        endif()
      endforeach()
      if(_dropped)
        message(STATUS "ros_wheels_fixups: ${_target}: dropped missing include folders "
                       "${_dropped}")
        set_property(TARGET ${_target} PROPERTY INTERFACE_INCLUDE_DIRECTORIES "${_kept}")
      endif()
    endforeach()
  endfunction()

  cmake_language(DEFER DIRECTORY "${CMAKE_SOURCE_DIR}" CALL _saferl_drop_missing_include_dirs)
endif()
