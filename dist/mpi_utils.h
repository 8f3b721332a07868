// MOLE_MPI_CHECK: turns an MPI return code into mole::Error with the call name, MPI's error string
// and file:line. Include only from MPI backend sources: it includes <mpi.h>.
#pragma once

#include <mpi.h>

#include <string>

#include "kernels/check.h"

namespace mole::dist::detail {

inline std::string mpi_error_string(int code) {
  char text[MPI_MAX_ERROR_STRING] = {};
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) {
    return "unknown MPI error code " + std::to_string(code);
  }
  return std::string(text, static_cast<size_t>(length));
}

// "MPI_Iallreduce(buf, ...)" -> "MPI_Iallreduce"; "/src/dist/x.cpp" -> "dist/x.cpp".
[[noreturn]] inline void throw_mpi_error(const char* call, int code, const char* file, int line) {
  std::string name(call);
  name = name.substr(0, name.find('('));
  std::string where(file);
  const size_t last = where.rfind('/');
  if (last != std::string::npos && last > 0) {
    const size_t parent = where.rfind('/', last - 1);
    if (parent != std::string::npos) where = where.substr(parent + 1);
  }
  MOLE_FAIL(name, " failed: ", mpi_error_string(code), " (", where, ":", line, ")");
}

}  // namespace mole::dist::detail

#define MOLE_MPI_CHECK(call)                                                          \
  do {                                                                                \
    const int mole_mpi_rc_ = (call);                                                  \
    if (mole_mpi_rc_ != MPI_SUCCESS) {                                                \
      ::mole::dist::detail::throw_mpi_error(#call, mole_mpi_rc_, __FILE__, __LINE__); \
    }                                                                                 \
  } while (0)
