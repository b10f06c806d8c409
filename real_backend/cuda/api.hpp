#pragma once
// The CUDA backend as the `mop` program sees it: a table of entry points in libmop_cuda.so, a
// library built beside the program and loaded on first use. `mop plan` and every command that
// needs no GPU never load cuBLASLt, cuDNN or NCCL (together over 700 MB of mappings), and a
// program built with the backend still runs on a machine without those libraries. No exception
// crosses the library's boundary: each entry point returns the empty string on success and the
// one-sentence reason otherwise. Plain C++: no CUDA header.
#include "real_backend/cuda/calibrate.hpp"
#include "real_backend/cuda/runtime.hpp"

#include <string>

namespace mop::real::cuda {

struct Api {
  static constexpr int kVersion = 1; // the table's layout; the loader refuses another
  int version = kVersion;
  // GPUs this process can use (0 with the reason when none).
  std::string (*probe)(int& device_count) = nullptr;
  std::string (*versions)(LibraryVersions& out) = nullptr;
  std::string (*calibrate)(const CalibrateOptions& options, DeviceMeasurements& out) = nullptr;
};

// The backend's table, loaded once from libmop_cuda.so in the program's own folder; nullptr
// with `why` set (one sentence) when this build has no CUDA backend or the library (or one it
// needs: cuBLASLt, cuDNN, NCCL) cannot be loaded.
const Api* load_api(std::string& why);

} // namespace mop::real::cuda

// The symbol libmop_cuda.so exports: its table.
extern "C" const mop::real::cuda::Api* mop_cuda_api();
