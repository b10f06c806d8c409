#pragma once
// Per-element math of the training kernels, shared by the CPU loops (real_backend/cpu/kernels.cpp)
// and the CUDA kernels so both compute the same formulas. Everything here is a small inline
// function of scalars: no allocation, no library calls beyond the <cmath> functions that CUDA
// also provides in device code (sqrt, exp, log, pow).
#if defined(__CUDACC__)
#define MOP_HD __host__ __device__ inline
#define MOP_HD_ALWAYS_INLINE __host__ __device__ __forceinline__
#else
#define MOP_HD inline
// For functions that translation units compiled for other instruction sets use (the host AdamW
// variants, real_backend/cpu/host_adam.hpp): inlined at every call, so no out-of-line copy built
// for AVX-512 exists for the linker to share with code that must run without it.
#define MOP_HD_ALWAYS_INLINE inline __attribute__((always_inline))
#endif

#include <cmath>

namespace mop::real::math {

// -infinity of T without std::numeric_limits (not a device function without
// --expt-relaxed-constexpr). INFINITY is a float constant; converting it keeps the infinity.
template <class T> MOP_HD T neg_inf() {
  return -static_cast<T>(INFINITY);
}

template <class T> MOP_HD T max(T a, T b) {
  return a < b ? b : a;
}

// ---- SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer"): out = silu(gate) * up ----

template <class T> MOP_HD T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// silu(x) = x * sigmoid(x). For x -> -inf, exp(-x) overflows to +inf and sigmoid to 0, so the
// product is -0 rather than NaN.
template <class T> MOP_HD T silu(T x) {
  return x * sigmoid(x);
}

// d silu / dx = s + x s (1 - s) = s (1 + x (1 - s)), s = sigmoid(x).
template <class T> MOP_HD T silu_grad(T x) {
  const T s = sigmoid(x);
  return s * (T(1) + x * (T(1) - s));
}

template <class T> MOP_HD T swiglu(T gate, T up) {
  return silu(gate) * up;
}
// d swiglu / d gate = up * silu'(gate).
template <class T> MOP_HD T swiglu_dgate(T gate, T up) {
  return up * silu_grad(gate);
}
// d swiglu / d up = silu(gate).
template <class T> MOP_HD T swiglu_dup(T gate, T /*up*/) {
  return silu(gate);
}

// ---- Rotary position embedding (Su et al. 2021, RoFormer; Hugging Face rotate-half layout) ----

// Angular frequency of pair i of a head of `head_dim`: theta^(-2i/head_dim), as Hugging Face's
// inv_freq = 1 / theta^(arange(0, head_dim, 2) / head_dim). In double whatever T is: the angle
// position * frequency reaches thousands of radians, where a float angle loses the phase.
MOP_HD double rope_inv_freq(int i, int head_dim, double theta) {
  return 1.0 / std::pow(theta, static_cast<double>(2 * i) / static_cast<double>(head_dim));
}

// Rotates the pair (a, b) = (x_i, x_{i + head_dim/2}) by the angle whose cosine and sine are
// (c, s): HF's q * cos + rotate_half(q) * sin with rotate_half(q) = (-b, a).
template <class T> MOP_HD void rope_rotate(T& a, T& b, T c, T s) {
  const T a0 = a, b0 = b;
  a = a0 * c - b0 * s;
  b = b0 * c + a0 * s;
}
// The inverse rotation (by the negative angle): the transpose of rope_rotate, so it is also the
// backward of the forward rotation.
template <class T> MOP_HD void rope_rotate_inverse(T& a, T& b, T c, T s) {
  const T a0 = a, b0 = b;
  a = a0 * c + b0 * s;
  b = b0 * c - a0 * s;
}

// ---- RMSNorm (Zhang & Sennrich 2019) ----

// 1 / sqrt(mean(x^2) + eps) from the row's sum of squares.
MOP_HD double rmsnorm_rstd(double sum_sq, int dim, double eps) {
  return 1.0 / std::sqrt(sum_sq / static_cast<double>(dim) + eps);
}

// Forward of one element: y_j = x_j r w_j.
template <class T> MOP_HD T rmsnorm_y(T x, T rstd, T w) {
  return x * rstd * w;
}

// Backward. With r = (sum(x^2)/dim + eps)^(-1/2), dr/dx_j = -r^3 x_j / dim, so
// dx_j = r (dy_j w_j - x_j c) where c = r^2 sum_i(dy_i w_i x_i) / dim is one per row,
// and dw_j gains dy_j x_j r from every row.
template <class T> MOP_HD T rmsnorm_dx_coefficient(T rstd, T sum_dy_w_x, int dim) {
  return rstd * rstd * sum_dy_w_x / static_cast<T>(dim);
}
template <class T> MOP_HD T rmsnorm_dx(T x, T dy, T w, T rstd, T coefficient) {
  return rstd * (dy * w - x * coefficient);
}
template <class T> MOP_HD T rmsnorm_dw(T x, T dy, T rstd) {
  return dy * x * rstd;
}

// ---- Attention's masks and dot products ----

// Whether key position kp is visible from query position qp: causal (kp <= qp) when `causal`,
// and within the last `window` positions when window > 0 (real::AttentionParams).
MOP_HD bool key_visible(bool causal, long long window, long long qp, long long kp) {
  return (!causal || kp <= qp) && (window == 0 || qp - kp < window);
}

// a · b over n elements, summed in index order.
template <class T> MOP_HD T dot(int n, const T* a, const T* b) {
  T s = 0;
  for (int i = 0; i < n; ++i)
    s += a[i] * b[i];
  return s;
}

// ---- Softmax pieces (Milakov & Gimelshein 2018, "Online normalizer calculation for softmax";
//      Dao 2023, FlashAttention-2) ----

// One step of the online softmax: a new score joins a running (max, sum of exp(score - max)).
// `rescale` multiplies what was accumulated with the old max (the sum, and in attention the
// weighted value sum); `weight` = exp(score - new max) is the new score's unnormalised weight.
// A -infinity score (a masked key) contributes weight 0 and leaves the state unchanged.
template <class T> struct OnlineSoftmaxStep {
  T rescale;
  T weight;
};
template <class T>
MOP_HD OnlineSoftmaxStep<T> online_softmax_update(T& running_max, T& running_sum, T score) {
  const T new_max = max(running_max, score);
  if (new_max == neg_inf<T>())
    return {T(1), T(0)};                             // nothing seen yet and nothing new
  const T rescale = std::exp(running_max - new_max); // exp(-inf) = 0 for the first score
  const T weight = std::exp(score - new_max);
  running_max = new_max;
  running_sum = running_sum * rescale + weight;
  return {rescale, weight};
}

// Log-sum-exp of the merge of two partial softmaxes over disjoint key sets with log-sum-exps
// lse_a and lse_b: lse = log(exp(lse_a) + exp(lse_b)). The merged output is
// weight_a * out_a + weight_b * out_b with weight_x = exp(lse_x - lse). A side with no visible
// key has lse -infinity and weight 0; when both are empty the result is -infinity with both
// weights 0 (the output stays 0).
template <class T> struct LseMerge {
  T lse;
  T weight_a;
  T weight_b;
};
template <class T> MOP_HD LseMerge<T> lse_merge(T lse_a, T lse_b) {
  const T ninf = neg_inf<T>();
  if (lse_a == ninf && lse_b == ninf)
    return {ninf, T(0), T(0)};
  if (lse_b == ninf)
    return {lse_a, T(1), T(0)};
  if (lse_a == ninf)
    return {lse_b, T(0), T(1)};
  const T m = max(lse_a, lse_b);
  const T lse = m + std::log(std::exp(lse_a - m) + std::exp(lse_b - m));
  return {lse, std::exp(lse_a - lse), std::exp(lse_b - lse)};
}

// ---- AdamW (Loshchilov & Hutter 2019), as torch.optim.AdamW computes it ----

// 1 - beta^step, the bias correction of a moment after `step` updates (step counts from 1).
MOP_HD double adam_bias_correction(double beta, long long step) {
  return 1.0 - std::pow(beta, static_cast<double>(step));
}

// One element: decoupled decay p -= lr * wd * p, then m = b1 m + (1 - b1) g,
// v = b2 v + (1 - b2) g^2, p -= lr * (m / bc1) / (sqrt(v / bc2) + eps), where bc1 and bc2 are
// adam_bias_correction(beta1, step) and adam_bias_correction(beta2, step).
template <class T>
MOP_HD_ALWAYS_INLINE void adamw_update(T& p, T& m, T& v, T g, double lr, double beta1, double beta2,
                                       double eps, double weight_decay, double bc1, double bc2) {
  p -= static_cast<T>(lr * weight_decay) * p;
  m = static_cast<T>(beta1) * m + static_cast<T>(1 - beta1) * g;
  v = static_cast<T>(beta2) * v + static_cast<T>(1 - beta2) * g * g;
  const T mhat = m / static_cast<T>(bc1);
  const T vhat = v / static_cast<T>(bc2);
  p -= static_cast<T>(lr) * mhat / (std::sqrt(vhat) + static_cast<T>(eps));
}

} // namespace mop::real::math
