#include "real_backend/cuda/device_probe.hpp"
#include "tests/real_backend/cuda/gpu.hpp"

#include <doctest/doctest.h>

TEST_CASE("a kernel adds one on the GPU, or the probe says why there is no GPU" *
          doctest::test_suite("plumbing")) {
  if (!mop::test::gpu_or_skip()) {
    CHECK(!mop::test::no_gpu_reason().empty());
    return;
  }
  CHECK(mop::real::add_one_on_device(41.0f) == 42.0f);
}
