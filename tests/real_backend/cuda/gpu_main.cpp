// The GPU test program's main. Without a GPU a test that needs one is skipped, not passed: the
// program exits with 77 (ctest's SKIP_RETURN_CODE for these tests, tests/CMakeLists.txt) when it
// skipped a test and nothing failed. Tests that need no GPU (argument checks) still run.
#define DOCTEST_CONFIG_IMPLEMENT
#include "tests/real_backend/cuda/gpu.hpp"

#include "real_backend/cuda/device_probe.hpp"

#include <cstdio>
#include <doctest/doctest.h>

namespace mop::test {
namespace {

bool skipped = false;

const real::DeviceProbe& probe() {
  static const real::DeviceProbe p = real::probe_devices();
  return p;
}

} // namespace

bool gpu_or_skip() {
  if (probe().device_count > 0)
    return true;
  skipped = true;
  return false;
}

const std::string& no_gpu_reason() {
  return probe().reason;
}

} // namespace mop::test

int main(int argc, char** argv) {
  doctest::Context context(argc, argv);
  const int rc = context.run();
  if (context.shouldExit() || rc != 0 || !mop::test::skipped)
    return rc; // a listing or help query, a failure, or every test ran
  std::fprintf(stderr, "skipped: no GPU: %s\n", mop::test::no_gpu_reason().c_str());
  return 77;
}
