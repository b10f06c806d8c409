#include "real_backend/cuda/device_probe.hpp"

#include <doctest/doctest.h>

TEST_CASE("a kernel adds one on the GPU, or the probe says why there is no GPU") {
  const mop::real::DeviceProbe p = mop::real::probe_devices();
  if (p.device_count == 0) {
    MESSAGE("skipped: " << p.reason);
    CHECK(!p.reason.empty());
    return;
  }
  CHECK(mop::real::add_one_on_device(41.0f) == 42.0f);
}
