#pragma once
// The microbenchmarks of `mop calibrate` on one GPU (device 0), behind a plain C++ interface. Each
// measurement is the median of several timed repetitions after warm-up runs, timed with CUDA
// events on one stream (host-side costs with the host's steady clock). docs/CALIBRATION.md lists
// what is measured and how it maps onto the calibration file.
#include "real_backend/cuda/runtime.hpp"

#include <functional>
#include <string>
#include <vector>

namespace mop::real::cuda {

struct CalibrateOptions {
  bool quick = false; // fewer shapes and repetitions: about a minute instead of about five
  std::function<void(const std::string&)> progress; // one line per finished group of measurements
};

struct GemmTiming {
  int groups = 1; // > 1: `groups` experts of m rows each (a grouped GEMM)
  int m = 0, n = 0, k = 0;
  double time_s = 0;
};

struct DeviceMeasurements {
  DeviceInfo device;
  LibraryVersions versions;
  double kernel_launch_s = 0; // GPU time per empty kernel, launched back to back
  double host_launch_s = 0;   // CPU time per launch call
  double hbm_bytes_per_s = 0; // read + written by a copy kernel, over buffers far above L2
  double h2d_bytes_per_s = 0; // pinned, one direction at a time
  double d2h_bytes_per_s = 0;
  double pcie_duplex_factor = 0; // both directions at once, total over one direction's
  std::vector<GemmTiming> gemm;  // BF16
  // The grouped-GEMM path the executor takes (one cuBLASLt GEMM per expert over 4 streams).
  std::string grouped_gemm_path;
};

// Runs the suite. Throws std::runtime_error when a CUDA call fails (no GPU included).
DeviceMeasurements measure_device(const CalibrateOptions& options);

} // namespace mop::real::cuda
