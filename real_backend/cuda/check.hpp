#pragma once
// Error checking for CUDA runtime calls, for .cu files only (it includes the CUDA runtime header).
#include <cuda_runtime.h>
#include <stdexcept>
#include <string>

namespace mop::real::cuda {

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
