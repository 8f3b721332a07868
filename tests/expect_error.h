// EXPECT_ERROR_CONTAINS(statement, text): `statement` throws, and the exception's message contains
// `text` (header-only: shared by the test executables and the mpirun-launched distributed ones).
#pragma once

#include <gtest/gtest.h>

#include <exception>
#include <string>

#define EXPECT_ERROR_CONTAINS(statement, text)                                                \
  do {                                                                                        \
    std::string mole_error_ = "<no error>";                                                   \
    try {                                                                                     \
      statement;                                                                              \
      ADD_FAILURE() << "expected an exception";                                               \
    } catch (const std::exception& e) {                                                       \
      mole_error_ = e.what();                                                                 \
    }                                                                                         \
    EXPECT_NE(mole_error_.find(text), std::string::npos)                                      \
        << "error message: '" << mole_error_ << "'\nexpected to contain: '" << (text) << "'"; \
  } while (0)
