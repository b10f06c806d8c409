// The host AdamW loop compiled for AVX512 (flags in real_backend/CMakeLists.txt).
#include "real_backend/cpu/host_adam_loop.hpp"

namespace mop::real::detail {

void host_adamw_avx512(std::size_t n, double lr, double beta1, double beta2, double eps,
                       double weight_decay, double bc1, double bc2, float* param, const float* grad,
                       float* m, float* v) {
  host_adamw_loop(n, lr, beta1, beta2, eps, weight_decay, bc1, bc2, param, grad, m, v);
}

} // namespace mop::real::detail
