#pragma once
// Whether this process has a GPU, asked of the CUDA runtime once per process (gpu_main.cpp).
#include <string>

namespace mop::test {

// True when a GPU is present. Otherwise the calling test is skipped: it should return at once,
// and the program then exits with 77, which ctest reports as "Skipped" (SKIP_RETURN_CODE).
bool gpu_or_skip();

// Why there is no GPU, in one sentence (empty when there is one).
const std::string& no_gpu_reason();

} // namespace mop::test
