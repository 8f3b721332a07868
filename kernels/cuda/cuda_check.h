// MOLE_CUDA_CHECK(call, context): turns a CUDA runtime error code into a mole::Error that names the
// caller's context, the call, the CUDA error string and file:line, e.g.
// "all_reduce on communicator 'dp' (rank 0 of 2): cudaEventRecord failed: invalid argument
// (dist/nccl_communicator.cpp:370)". Torch-free: the CUDA runtime C API and kernels/check.h only,
// for the kernels' launch wrappers and for the NCCL backend in dist/.
#pragma once

#include <cuda_runtime_api.h>

#include <string>

#include "kernels/check.h"

namespace mole::detail {

// "/src/dist/x.cpp" -> "dist/x.cpp".
inline std::string short_path(const char* file) {
  std::string path(file);
  const size_t last = path.rfind('/');
  if (last != std::string::npos && last > 0) {
    const size_t parent = path.rfind('/', last - 1);
    if (parent != std::string::npos) path = path.substr(parent + 1);
  }
  return path;
}

// "ncclAllReduce(data, ...)" -> "ncclAllReduce".
inline std::string call_name(const char* call) {
  std::string name(call);
  return name.substr(0, name.find('('));
}

[[noreturn]] inline void throw_cuda_error(const char* call, cudaError_t rc,
                                          const std::string& context, const char* file, int line) {
  MOLE_FAIL(context, ": ", call_name(call), " failed: ", cudaGetErrorString(rc), " (",
            short_path(file), ":", line, ")");
}

}  // namespace mole::detail

// context: a std::string (or C string) naming the operation, "all_reduce on communicator ...";
// evaluated only when the call fails.
#define MOLE_CUDA_CHECK(call, context)                                                       \
  do {                                                                                       \
    const cudaError_t mole_cuda_rc_ = (call);                                                \
    if (mole_cuda_rc_ != cudaSuccess) {                                                      \
      ::mole::detail::throw_cuda_error(#call, mole_cuda_rc_, (context), __FILE__, __LINE__); \
    }                                                                                        \
  } while (0)
