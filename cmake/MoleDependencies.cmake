# Required and optional dependencies. Optional parts record their state in MOLE_HAVE_*
# for the summary printed at the end of configuration.

find_package(Torch REQUIRED)
find_package(Threads REQUIRED)
find_package(nlohmann_json 3 REQUIRED)
find_package(spdlog REQUIRED)
find_package(CLI11 REQUIRED)
find_package(ZLIB REQUIRED)
find_package(yaml-cpp REQUIRED)

# LibTorch's CXX flags carry the C++ ABI define; the whole project must agree with it.
string(APPEND CMAKE_CXX_FLAGS " ${TORCH_CXX_FLAGS}")

# A CUDA-enabled LibTorch (PyTorch's own) exposes the torch_cuda library.
set(MOLE_TORCH_CUDA OFF)
if(TARGET torch_cuda OR TORCH_CUDA_LIBRARIES)
  set(MOLE_TORCH_CUDA ON)
endif()

find_package(MPI REQUIRED COMPONENTS CXX)
set(MOLE_HAVE_MPI ${MPI_CXX_FOUND})

set(MOLE_HAVE_GLOO OFF)
if(NOT MOLE_GLOO STREQUAL "OFF")
  find_package(Gloo QUIET)
  if(Gloo_FOUND)
    set(MOLE_HAVE_GLOO ON)
  elseif(MOLE_GLOO STREQUAL "ON")
    message(FATAL_ERROR "MOLE_GLOO=ON but Gloo was not found (Debian: apt-get install libgloo-dev)")
  endif()
endif()

# CUDA kernels compile with nvcc whether or not LibTorch itself has CUDA.
set(MOLE_HAVE_CUDA_KERNELS OFF)
if(NOT MOLE_CUDA_KERNELS STREQUAL "OFF")
  include(CheckLanguage)
  if(NOT CMAKE_CUDA_COMPILER AND EXISTS /usr/local/cuda/bin/nvcc)
    set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc)
  endif()
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
      set(CMAKE_CUDA_ARCHITECTURES 90)
    endif()
    set(CMAKE_CUDA_STANDARD 17)
    set(CMAKE_CUDA_STANDARD_REQUIRED ON)
    enable_language(CUDA)
    find_package(CUDAToolkit)
    set(MOLE_HAVE_CUDA_KERNELS ON)
  elseif(MOLE_CUDA_KERNELS STREQUAL "ON")
    message(FATAL_ERROR "MOLE_CUDA_KERNELS=ON but no CUDA compiler was found")
  endif()
endif()

set(MOLE_HAVE_NCCL OFF)
if(NOT MOLE_NCCL STREQUAL "OFF")
  find_path(MOLE_NCCL_INCLUDE_DIR nccl.h HINTS /usr/local/cuda/include ENV NCCL_HOME PATH_SUFFIXES include)
  find_library(MOLE_NCCL_LIBRARY nccl HINTS /usr/local/cuda/lib64 ENV NCCL_HOME PATH_SUFFIXES lib lib64)
  if(MOLE_NCCL_INCLUDE_DIR AND MOLE_NCCL_LIBRARY)
    set(MOLE_HAVE_NCCL ON)
  elseif(MOLE_NCCL STREQUAL "ON")
    message(FATAL_ERROR "MOLE_NCCL=ON but nccl.h / libnccl were not found")
  endif()
endif()

# mole_pch(target): precompile the LibTorch headers for a target. The heavy ATen headers
# dominate every translation unit on a small machine.
function(mole_pch target)
  target_precompile_headers(${target} PRIVATE <ATen/ATen.h> <string> <vector> <memory>)
endfunction()

# mole_warnings(target): the project's warning level.
function(mole_warnings target)
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wno-unused-parameter>)
endfunction()
