# Use ccache when present. The sloppiness settings let ccache cache translation units
# that use a precompiled header.
find_program(MOLE_CCACHE ccache)
if(MOLE_CCACHE AND NOT CMAKE_CXX_COMPILER_LAUNCHER)
  set(_mole_launcher ${CMAKE_COMMAND} -E env
      "CCACHE_SLOPPINESS=pch_defines,time_macros,include_file_mtime,include_file_ctime"
      ${MOLE_CCACHE})
  set(CMAKE_CXX_COMPILER_LAUNCHER ${_mole_launcher})
  set(CMAKE_CUDA_COMPILER_LAUNCHER ${_mole_launcher})
endif()
