# Under scikit-build-core (pip), build pyqsim's native code in an inner CMake build that later pip runs reuse.
#
# scikit-build-core deletes CMakeCache.txt and CMakeFiles/ of its build directory whenever pip runs it from a
# new isolated build environment, i.e. on every plain `pip install`: all object files live in CMakeFiles/, so
# every install would recompile everything. Here the outer project (this file) only
#   1. copies the pybind11 package of the build environment to <build>/pybind11, rewriting only files whose
#      content changed, so that the headers keep their path and timestamps from one run to the next;
#   2. configures the inner build <build>/native (this same CMakeLists.txt with PYQSIM_INNER_BUILD=ON) with the
#      outer's settings, at configure time, so its settings block and errors show up there;
#   3. builds it (incrementally: a no-op when nothing changed) and installs its modules into the wheel.
# The inner build directory is outside CMakeFiles/, so it survives the deletion.

set(_inner "${CMAKE_BINARY_DIR}/native")

# 1. A stable copy of pybind11 (its CMake config locates the headers relative to itself).
find_file(_pyqsim_pybind11_config pybind11Config.cmake
          PATHS ${CMAKE_PREFIX_PATH} PATH_SUFFIXES pybind11/share/cmake/pybind11 share/cmake/pybind11
          NO_CACHE NO_DEFAULT_PATH)
if(NOT _pyqsim_pybind11_config)
  find_package(pybind11 CONFIG REQUIRED)  # anywhere else CMake looks; fails with CMake's own message
  set(_pyqsim_pybind11_config "${pybind11_DIR}/pybind11Config.cmake")
endif()
get_filename_component(_pb11_root "${_pyqsim_pybind11_config}/../../../.." ABSOLUTE)
set(_pb11_copy "${CMAKE_BINARY_DIR}/pybind11")
file(GLOB_RECURSE _pb11_files RELATIVE "${_pb11_root}" "${_pb11_root}/include/*" "${_pb11_root}/share/cmake/*")
foreach(_f IN LISTS _pb11_files)
  configure_file("${_pb11_root}/${_f}" "${_pb11_copy}/${_f}" COPYONLY)  # rewrites only a changed file
endforeach()

# 2. Configure the inner build with the outer's settings: scikit-build-core's initial cache (Python), the
#    pyqsim options, the build type, compilers and flags. Flags are always passed (empty when unset) so that a
#    setting dropped since the last run is dropped there too.
set(_args -S "${CMAKE_SOURCE_DIR}" -B "${_inner}" -G "${CMAKE_GENERATOR}" -DPYQSIM_INNER_BUILD=ON
          "-Dpybind11_DIR=${_pb11_copy}/share/cmake/pybind11")
if(CMAKE_GENERATOR_PLATFORM)
  list(APPEND _args -A "${CMAKE_GENERATOR_PLATFORM}")
endif()
if(CMAKE_GENERATOR_TOOLSET)
  list(APPEND _args -T "${CMAKE_GENERATOR_TOOLSET}")
endif()
if(EXISTS "${CMAKE_BINARY_DIR}/CMakeInit.txt")
  list(APPEND _args -C "${CMAKE_BINARY_DIR}/CMakeInit.txt")
endif()
# A value that is a CMake list ("80-real;90") must stay one argument: its ";" are escaped.
macro(_pyqsim_forward _v)
  string(REPLACE ";" "\\;" _val "${${_v}}")
  list(APPEND _args "-D${_v}=${_val}")
endmacro()
get_cmake_property(_cache_vars CACHE_VARIABLES)
foreach(_v IN LISTS _cache_vars)
  if(_v MATCHES "^PYQSIM_[A-Z0-9_]+$" AND NOT _v STREQUAL "PYQSIM_INNER_BUILD")
    _pyqsim_forward(${_v})
  endif()
endforeach()
foreach(_v CMAKE_BUILD_TYPE CMAKE_MAKE_PROGRAM CMAKE_CXX_COMPILER CMAKE_CUDA_COMPILER CMAKE_CUDA_ARCHITECTURES
           CMAKE_CUDA_HOST_COMPILER Python_EXECUTABLE)
  if(DEFINED ${_v} AND NOT "${${_v}}" STREQUAL "")
    _pyqsim_forward(${_v})
  endif()
endforeach()
foreach(_v CMAKE_CXX_FLAGS CMAKE_CUDA_FLAGS CMAKE_SHARED_LINKER_FLAGS CMAKE_MODULE_LINKER_FLAGS
           CMAKE_EXE_LINKER_FLAGS)
  _pyqsim_forward(${_v})
endforeach()
# Per-configuration flags (e.g. the sanitizer step's -g1) when the outer project has them: CMake's defaults there.
foreach(_v CMAKE_CXX_FLAGS_DEBUG CMAKE_CXX_FLAGS_RELEASE CMAKE_CXX_FLAGS_RELWITHDEBINFO CMAKE_CXX_FLAGS_MINSIZEREL)
  if(DEFINED ${_v} AND NOT "${${_v}}" STREQUAL "")
    _pyqsim_forward(${_v})
  endif()
endforeach()
message(STATUS "pyqsim: native code is built in ${_inner} (reused by later pip runs)")
execute_process(COMMAND "${CMAKE_COMMAND}" ${_args} RESULT_VARIABLE _rc)
if(NOT _rc EQUAL 0)
  message(FATAL_ERROR "pyqsim: configuring the native build in ${_inner} failed (see above)")
endif()

# 3. Build (every time; the inner build system decides what is out of date) and install into the wheel.
add_custom_target(pyqsim_native ALL COMMAND "${CMAKE_COMMAND}" --build "${_inner}" --config $<CONFIG> USES_TERMINAL)
install(CODE "
  set(_cfg)
  if(CMAKE_INSTALL_CONFIG_NAME)
    set(_cfg --config \"\${CMAKE_INSTALL_CONFIG_NAME}\")
  endif()
  execute_process(COMMAND \"${CMAKE_COMMAND}\" --install \"${_inner}\" --prefix \"\${CMAKE_INSTALL_PREFIX}\" \${_cfg}
                  RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR \"pyqsim: installing the native build from ${_inner} failed\")
  endif()")
