// LibraryVersions::describe (real_backend/cuda/runtime.hpp): plain C++, built into the programs
// beside the loader (the backend's headers are shared by both sides of the library boundary).
#include "real_backend/cuda/runtime.hpp"

#include <fmt/format.h>

namespace mop::real::cuda {

namespace {

// 130100 -> 13.1.0 (cuBLASLt, cuDNN), 22809 -> 2.28.9 (NCCL).
std::string dotted(std::size_t v) {
  return fmt::format("{}.{}.{}", v / 10000, (v % 10000) / 100, v % 100);
}

} // namespace

std::string LibraryVersions::describe() const {
  return fmt::format("driver {}.{}, runtime {}.{}, cuBLASLt {}, cuDNN {}, NCCL {}", driver / 1000,
                     (driver % 1000) / 10, runtime / 1000, (runtime % 1000) / 10, dotted(cublaslt),
                     dotted(cudnn), dotted(static_cast<std::size_t>(nccl)));
}

} // namespace mop::real::cuda
