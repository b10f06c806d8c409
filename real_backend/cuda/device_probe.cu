#include "real_backend/cuda/device_probe.hpp"

#include <cuda_runtime.h>
#include <stdexcept>
#include <string>

namespace mop::real {
namespace {

__global__ void add_one(float* x) {
  x[0] += 1.0f;
}

void check(cudaError_t status, const char* call) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string(call) + ": " + cudaGetErrorString(status));
}

} // namespace

DeviceProbe probe_devices() {
  DeviceProbe p;
  const cudaError_t status = cudaGetDeviceCount(&p.device_count);
  // toolchain.md: no driver -> cudaErrorInsufficientDriver (35), driver but no GPU -> 100.
  if (status != cudaSuccess) {
    p.device_count = 0;
    p.reason = std::string("no usable GPU: ") + cudaGetErrorString(status);
    cudaGetLastError(); // clear the sticky error
  } else if (p.device_count == 0) {
    p.reason = "no usable GPU: the CUDA runtime reports zero devices";
  }
  return p;
}

float add_one_on_device(float x) {
  float* d = nullptr;
  check(cudaMalloc(&d, sizeof(float)), "cudaMalloc");
  check(cudaMemcpy(d, &x, sizeof(float), cudaMemcpyHostToDevice), "cudaMemcpy");
  add_one<<<1, 1>>>(d);
  check(cudaGetLastError(), "add_one launch");
  check(cudaMemcpy(&x, d, sizeof(float), cudaMemcpyDeviceToHost), "cudaMemcpy");
  check(cudaFree(d), "cudaFree");
  return x;
}

} // namespace mop::real
