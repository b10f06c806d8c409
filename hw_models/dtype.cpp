#include "hw_models/dtype.hpp"

#include "common/error.hpp"

#include <fmt/format.h>

namespace mop::hw {

Dtype parse_dtype(std::string_view text) {
  if (text == "bf16")
    return Dtype::bf16;
  if (text == "fp8")
    return Dtype::fp8;
  if (text == "fp32")
    return Dtype::fp32;
  throw InputError(fmt::format("unknown dtype '{}'; allowed: bf16, fp8, fp32.", text));
}

std::string_view dtype_name(Dtype dtype) {
  switch (dtype) {
  case Dtype::bf16:
    return "bf16";
  case Dtype::fp8:
    return "fp8";
  case Dtype::fp32:
    return "fp32";
  }
  return "bf16";
}

double dtype_bytes(Dtype dtype) {
  switch (dtype) {
  case Dtype::bf16:
    return 2;
  case Dtype::fp8:
    return 1;
  case Dtype::fp32:
    return 4;
  }
  return 2;
}

} // namespace mop::hw
