#pragma once
// The host AdamW of the executors (CPU optimizer steps, and the float instance of real::adamw):
// the loop of real::adamw on real_backend/kernels/math.hpp's adamw_update, compiled three times
// (AVX-512, AVX2 with FMA, and plain x86-64) and chosen once per process from what the processor
// supports. The translation units are built with -ffp-contract=off (GCC would otherwise fuse
// multiply-adds where FMA is available), and sqrt and division are correctly rounded in every
// instruction set: each variant gives the scalar loop's bits exactly (tested).
#include "real_backend/cpu/kernels.hpp"

#include <cstddef>
#include <cstdint>
#include <string>

namespace mop::real {

enum class HostIsa { scalar, avx2, avx512 };
std::string host_isa_name(HostIsa isa);

// The widest variant this processor runs.
HostIsa host_adamw_isa();
// Whether this processor runs `isa`.
bool host_runs(HostIsa isa);

// One AdamW step over n floats with the chosen variant.
void host_adamw(std::size_t n, const AdamWParams& p, std::int64_t step, float* param,
                const float* grad, float* m, float* v);
// The same with a given variant (it must be one host_runs accepts).
void host_adamw_with(HostIsa isa, std::size_t n, const AdamWParams& p, std::int64_t step,
                     float* param, const float* grad, float* m, float* v);

} // namespace mop::real
