#pragma once
// Element types of the tensors a cost function is asked about.
#include <string_view>

namespace mop::hw {

enum class Dtype { bf16, fp8, fp32 };

// "bf16", "fp8" or "fp32"; anything else is an InputError that lists the allowed names.
Dtype parse_dtype(std::string_view text);
std::string_view dtype_name(Dtype dtype);
// Bytes per element as stored in HBM (fp8: e4m3/e5m2, one byte).
double dtype_bytes(Dtype dtype);

} // namespace mop::hw
