// A tiny assertion helper for the host unit tests (plain C++17, no test framework).
//
// CHECK(cond, what...) and CHECK_CLOSE(actual, expected, tolerance, what...) record a failure with
// its file, line and a message built from `what...` (streamed, only when the check fails), and go
// on; CHECK returns whether it held. CHECK_THROWS(expr, Exception, what...) checks that `expr`
// throws `Exception`. A test's main returns check::finish("name"), which prints a summary and
// exits non-zero when any check failed. Pass at least one `what` argument (C++17 needs one).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <iostream>
#include <limits>
#include <sstream>
#include <string>

namespace check {

struct Counts {
  int64_t passed = 0;
  int64_t failed = 0;
};

inline Counts& counts() {
  static Counts c;
  return c;
}

inline void stream_all(std::ostringstream&) {}
template <typename First, typename... Rest>
void stream_all(std::ostringstream& out, const First& first, const Rest&... rest) {
  out << first;
  stream_all(out, rest...);
}

template <typename... What>
std::string message(const What&... what) {
  std::ostringstream out;
  out.precision(std::numeric_limits<double>::max_digits10);
  stream_all(out, what...);
  return out.str();
}

// `describe` (a callable returning the message) runs only on failure: passing checks cost nothing.
template <typename Describe>
bool record(bool ok, const char* file, int line, const char* expression, const Describe& describe) {
  if (ok) {
    ++counts().passed;
    return true;
  }
  ++counts().failed;
  // Print every failure, but stop flooding the log after many.
  if (counts().failed <= 50) {
    const std::string what = describe();
    std::cerr << file << ":" << line << ": FAILED: " << expression << (what.empty() ? "" : " -- ") << what << "\n";
  }
  return false;
}

// |actual - expected| <= tolerance, with nan == nan and equal infinities accepted.
inline bool close(double actual, double expected, double tolerance) {
  if (std::isnan(expected)) return std::isnan(actual);
  if (std::isinf(expected)) return actual == expected;
  return std::fabs(actual - expected) <= tolerance;
}

inline int finish(const char* name) {
  const Counts& c = counts();
  std::cout << name << ": " << c.passed << " checks passed, " << c.failed << " failed\n";
  return c.failed == 0 ? 0 : 1;
}

}  // namespace check

#define CHECK(cond, ...)                                             \
  ::check::record(static_cast<bool>(cond), __FILE__, __LINE__, #cond, \
                  [&]() { return ::check::message(__VA_ARGS__); })

#define CHECK_CLOSE(actual, expected, tolerance, ...)                                                          \
  do {                                                                                                          \
    const double check_actual_ = static_cast<double>(actual);                                                   \
    const double check_expected_ = static_cast<double>(expected);                                               \
    const double check_tolerance_ = static_cast<double>(tolerance);                                             \
    ::check::record(::check::close(check_actual_, check_expected_, check_tolerance_), __FILE__, __LINE__,       \
                    #actual " ~= " #expected, [&]() {                                                           \
                      return ::check::message("actual ", check_actual_, ", expected ", check_expected_,       \
                                              ", tolerance ", check_tolerance_, "; ", __VA_ARGS__);           \
                    });                                                                                         \
  } while (0)

#define CHECK_THROWS(expr, Exception, ...)                                                                    \
  do {                                                                                                        \
    bool check_threw_ = false;                                                                                \
    try {                                                                                                     \
      (void)(expr);                                                                                           \
    } catch (const Exception&) {                                                                              \
      check_threw_ = true;                                                                                    \
    } catch (...) {                                                                                           \
    }                                                                                                         \
    ::check::record(check_threw_, __FILE__, __LINE__, #expr " throws " #Exception,                          \
                    [&]() { return ::check::message(__VA_ARGS__); });                                       \
  } while (0)
