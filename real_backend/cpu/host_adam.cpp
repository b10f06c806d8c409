#include "real_backend/cpu/host_adam.hpp"

#include "real_backend/cpu/host_adam_loop.hpp"

#include <algorithm>
#include <cstdint>
#include <stdexcept>

namespace mop::real {

std::string host_isa_name(HostIsa isa) {
  switch (isa) {
  case HostIsa::scalar:
    return "x86-64";
  case HostIsa::avx2:
    return "AVX2";
  case HostIsa::avx512:
    return "AVX-512";
  }
  return "?";
}

bool host_runs(HostIsa isa) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  switch (isa) {
  case HostIsa::scalar:
    return true;
  case HostIsa::avx2:
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  case HostIsa::avx512:
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("fma");
  }
  return false;
#else
  return isa == HostIsa::scalar;
#endif
}

HostIsa host_adamw_isa() {
  static const HostIsa chosen = host_runs(HostIsa::avx512) ? HostIsa::avx512
                                : host_runs(HostIsa::avx2) ? HostIsa::avx2
                                                           : HostIsa::scalar;
  return chosen;
}

void host_adamw_with(HostIsa isa, std::size_t n, const AdamWParams& p, std::int64_t step,
                     float* param, const float* grad, float* m, float* v) {
  if (!host_runs(isa))
    throw std::invalid_argument("this processor does not run the " + host_isa_name(isa) +
                                " host AdamW");
  const double bc1 = math::adam_bias_correction(p.beta1, step);
  const double bc2 = math::adam_bias_correction(p.beta2, step);
  // A scalar head up to the next 64-byte boundary of `param`: large blocks from malloc share one
  // offset from it (16 bytes with glibc), so all four arrays are then aligned for the vector loop.
  // Misaligned, AVX-512 streams at 1.2 G params/s on one core here, aligned 1.9 (AVX2 1.6 / 1.9).
  const std::size_t off = reinterpret_cast<std::uintptr_t>(param) % 64;
  const std::size_t head =
      isa == HostIsa::scalar || off % sizeof(float) != 0 ? 0 : std::min(n, (64 - off) % 64 / 4);
  detail::host_adamw_loop(head, p.lr, p.beta1, p.beta2, p.eps, p.weight_decay, bc1, bc2, param,
                          grad, m, v);
  n -= head;
  param += head;
  grad += head;
  m += head;
  v += head;
  switch (isa) {
  case HostIsa::avx512:
    return detail::host_adamw_avx512(n, p.lr, p.beta1, p.beta2, p.eps, p.weight_decay, bc1, bc2,
                                     param, grad, m, v);
  case HostIsa::avx2:
    return detail::host_adamw_avx2(n, p.lr, p.beta1, p.beta2, p.eps, p.weight_decay, bc1, bc2,
                                   param, grad, m, v);
  case HostIsa::scalar:
    break;
  }
  detail::host_adamw_loop(n, p.lr, p.beta1, p.beta2, p.eps, p.weight_decay, bc1, bc2, param, grad,
                          m, v);
}

void host_adamw(std::size_t n, const AdamWParams& p, std::int64_t step, float* param,
                const float* grad, float* m, float* v) {
  host_adamw_with(host_adamw_isa(), n, p, step, param, grad, m, v);
}

} // namespace mop::real
