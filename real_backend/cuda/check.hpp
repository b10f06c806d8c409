#pragma once
// Error checking for CUDA runtime calls, for .cu files only (it includes the CUDA runtime header).
#include <cstdio>
#include <cuda_runtime.h>
#include <stdexcept>
#include <string>

namespace mop::real::cuda {

// printf-style formatting for .cu files: nvcc cannot evaluate fmt's compile-time format checks.
template <class... A> std::string strf(const char* format, A... args) {
  const int n = std::snprintf(nullptr, 0, format, args...);
  std::string out(n > 0 ? static_cast<std::size_t>(n) : 0, '\0');
  if (n > 0)
    std::snprintf(out.data(), out.size() + 1, format, args...);
  return out;
}

// Throws std::runtime_error naming the call, where it was made and what the runtime said.
inline void check_status(cudaError_t status, const char* call, const char* file, int line) {
  if (status == cudaSuccess)
    return;
  throw std::runtime_error(std::string(call) + " failed at " + file + ":" + std::to_string(line) +
                           ": " + cudaGetErrorName(status) + " (" + cudaGetErrorString(status) +
                           ")");
}

} // namespace mop::real::cuda

// MOP_CUDA_CHECK(cudaMalloc(&p, bytes)); after a kernel launch, MOP_CUDA_CHECK(cudaGetLastError())
// reports a bad launch configuration at the launch's own line.
#define MOP_CUDA_CHECK(call) ::mop::real::cuda::check_status((call), #call, __FILE__, __LINE__)
