// Shared helper of the router tests (test_router.cpp, test_router_scores.cpp).
#pragma once

#include <functional>
#include <string>

#include "kernels/check.h"

namespace mole::router_test {

inline std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "<no error>";
}

}  // namespace mole::router_test
