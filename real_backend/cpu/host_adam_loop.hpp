#pragma once
// The loop every host AdamW variant compiles (real_backend/cpu/host_adam.hpp); included by one
// translation unit per instruction set, each with its own compiler flags.
#include "real_backend/kernels/math.hpp"

#include <cstddef>
#include <cstdint>

namespace mop::real::detail {

// static: each translation unit keeps its own copy, built for its own instruction set.
static inline void host_adamw_loop(std::size_t n, double lr, double beta1, double beta2, double eps,
                                   double weight_decay, double bc1, double bc2,
                                   float* __restrict param, const float* __restrict grad,
                                   float* __restrict m, float* __restrict v) {
  for (std::size_t i = 0; i < n; ++i)
    math::adamw_update(param[i], m[i], v[i], grad[i], lr, beta1, beta2, eps, weight_decay, bc1,
                       bc2);
}

void host_adamw_avx2(std::size_t n, double lr, double beta1, double beta2, double eps,
                     double weight_decay, double bc1, double bc2, float* param, const float* grad,
                     float* m, float* v);
void host_adamw_avx512(std::size_t n, double lr, double beta1, double beta2, double eps,
                       double weight_decay, double bc1, double bc2, float* param, const float* grad,
                       float* m, float* v);

} // namespace mop::real::detail
