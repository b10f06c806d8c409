// libmop_cuda.so's table of entry points (real_backend/cuda/api.hpp): each catches what the
// backend throws and returns it as a sentence.
#include "real_backend/cuda/api.hpp"

#include "real_backend/cuda/device_probe.hpp"

#include <exception>

namespace mop::real::cuda {
namespace {

template <class F> std::string guarded(F&& f) {
  try {
    f();
    return "";
  } catch (const std::exception& e) {
    return e.what();
  } catch (...) {
    return "the CUDA backend failed with an unknown exception";
  }
}

std::string probe(int& device_count) {
  device_count = 0;
  std::string reason;
  const std::string err = guarded([&] {
    const DeviceProbe p = probe_devices();
    device_count = p.device_count;
    reason = p.reason;
  });
  return err.empty() ? reason : err;
}

std::string versions(LibraryVersions& out) {
  return guarded([&] { out = library_versions(); });
}

std::string calibrate(const CalibrateOptions& options, DeviceMeasurements& out) {
  return guarded([&] { out = measure_device(options); });
}

} // namespace
} // namespace mop::real::cuda

extern "C" const mop::real::cuda::Api* mop_cuda_api() {
  static const mop::real::cuda::Api api{mop::real::cuda::Api::kVersion, &mop::real::cuda::probe,
                                        &mop::real::cuda::versions, &mop::real::cuda::calibrate};
  return &api;
}
