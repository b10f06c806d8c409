// The host measurements of `mop calibrate` on small arrays: positive, finite rates, and the
// refusals of an empty measurement.
#include "real_backend/cpu/host_measure.hpp"

#include <cmath>
#include <doctest/doctest.h>
#include <stdexcept>

namespace real_backend_cpu_host_measure_test {

using namespace mop::real;

TEST_CASE("host measurements return finite positive rates and refuse empty work" *
          doctest::test_suite("plumbing")) {
  const double adam = measure_host_adam_params_per_s(1 << 16, 2, 3);
  CHECK(std::isfinite(adam));
  CHECK(adam > 0);
  const double copy = measure_host_copy_bytes_per_s(1 << 20, 2, 3);
  CHECK(std::isfinite(copy));
  CHECK(copy > 0);
  CHECK_THROWS_AS(measure_host_adam_params_per_s(0, 1, 1), std::invalid_argument);
  CHECK_THROWS_AS(measure_host_copy_bytes_per_s(16, 0, 1), std::invalid_argument);
}

} // namespace real_backend_cpu_host_measure_test
