#pragma once
// Relative comparisons for tests. doctest::Approx defaults to an absolute tolerance of about
// 1.2e-5 for values below 1 (its scale is 1), so a time in seconds or a ratio compared with it
// passes for almost any value: use these instead wherever a time, a rate or a ratio is checked.
#include <doctest/doctest.h>

namespace mop::test {

// `actual == rel(expected, tolerance)` holds when |actual - expected| < tolerance * max(|actual|,
// |expected|). The default is for deterministic results (the engine, closed forms) that must
// agree to rounding; pass a looser tolerance, with its reason, for modelled agreement. Zero is
// never relatively close to anything but itself: check an expected zero with `==`.
inline doctest::Approx rel(double expected, double tolerance = 1e-12) {
  return doctest::Approx(expected).epsilon(tolerance).scale(0.0);
}

} // namespace mop::test
