// Error handling for the whole project: mole::Error and the MOLE_CHECK macro.
//
// MOLE_CHECK(cond, parts...) throws mole::Error with the parts streamed together. Use it for
// user and input errors: say what was expected, what was found, and which file/key/rank.
// Messages carry no stack trace, so they read well on a terminal.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace mole {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {
template <typename... Parts>
std::string cat(Parts&&... parts) {
  std::ostringstream out;
  (out << ... << std::forward<Parts>(parts));
  return out.str();
}
}  // namespace detail

}  // namespace mole

#define MOLE_CHECK(cond, ...)                                    \
  do {                                                           \
    if (!(cond)) throw ::mole::Error(::mole::detail::cat(__VA_ARGS__)); \
  } while (0)

#define MOLE_FAIL(...) throw ::mole::Error(::mole::detail::cat(__VA_ARGS__))
