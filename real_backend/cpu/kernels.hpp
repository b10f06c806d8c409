#pragma once
// The CPU twins of the CUDA kernels: plain loops over the per-element math of
// real_backend/kernels/math.hpp (shared, __host__ __device__), except GEMM, which OpenBLAS runs.
// They are the specification of the kernels' semantics; the CPU reference executor runs on them.
// Every function is instantiated for float (the executor) and double (the references in tests).
// Row-major throughout.
#include <cstddef>
#include <cstdint>
#include <memory>

namespace mop::real {

// c[m,n] = (accumulate ? c : 0) + op(a)·op(b). a is [m,k] ([k,m] when trans_a), b is [k,n]
// ([n,k] when trans_b). cblas_sgemm / cblas_dgemm on the calling thread: the order in which a sum
// runs over k is the library's (blocked, fused multiply-adds, and with accumulate the partial sums
// of long k may be added into c block by block), the same on every call with the same shapes on
// the same processor.
template <class T>
void gemm(int m, int n, int k, const T* a, bool trans_a, const T* b, bool trans_b, T* c,
          bool accumulate);

// RMSNorm over rows of `dim`: y = x * rstd * w, rstd = 1/sqrt(mean(x^2) + eps), rstd saved per
// row. Backward: dx overwritten, dw accumulated (+=).
template <class T>
void rmsnorm_fwd(int rows, int dim, const T* x, const T* w, double eps, T* y, T* rstd);
template <class T>
void rmsnorm_bwd(int rows, int dim, const T* x, const T* w, const T* rstd, const T* dy, T* dx,
                 T* dw);

// Rotary position embedding, Hugging Face's rotate-half convention, in place on x[tokens,
// heads, head_dim]: for i < head_dim/2 the pair (x_i, x_{i+head_dim/2}) of token t rotates by
// positions[t] * theta^(-2i/head_dim). inverse = true rotates by the negative angle (the
// backward of the forward rotation).
template <class T>
void rope(int tokens, int heads, int head_dim, const std::int64_t* positions, double theta, T* x,
          bool inverse);

// SwiGLU: out = silu(gate) * up. Backward overwrites dgate and dup.
template <class T> void swiglu_fwd(std::size_t n, const T* gate, const T* up, T* out);
template <class T>
void swiglu_bwd(std::size_t n, const T* gate, const T* up, const T* dout, T* dgate, T* dup);

// Attention of one sequence or chunk. q[tq, heads, qk_dim], k[tk, kv_heads, qk_dim],
// v[tk, kv_heads, v_dim]; query head h reads KV head h / (heads / kv_heads) (GQA). q_pos and
// k_pos are global token positions: key j is visible from query i when
// (!causal || k_pos[j] <= q_pos[i]) && (window == 0 || q_pos[i] - k_pos[j] < window).
struct AttentionParams {
  int heads = 0;
  int kv_heads = 0;
  int qk_dim = 0;
  int v_dim = 0;
  bool causal = true;
  std::int64_t window = 0;
  double scale = 0; // softmax scale, usually 1/sqrt(qk_dim)
};
// out[tq, heads, v_dim] and lse[tq, heads] (natural log of the softmax denominator including
// the max; -infinity where no key is visible, and out 0 there). Both overwritten.
template <class T>
void attention_fwd(const AttentionParams& p, int tq, int tk, const T* q, const T* k, const T* v,
                   const std::int64_t* q_pos, const std::int64_t* k_pos, T* out, T* lse);
// Merges a partial result over other keys (out_b, lse_b) into (out_a, lse_a), in place: the
// combination step of ring attention. Exact: the result equals attention over both key sets.
template <class T>
void attention_merge(int tq, int heads, int v_dim, T* out_a, T* lse_a, const T* out_b,
                     const T* lse_b);
// Backward over one block of keys, given the final out and lse over all keys (FlashAttention-2):
// dq, dk and dv are accumulated (+=), so a ring sums the blocks' contributions.
template <class T>
void attention_bwd(const AttentionParams& p, int tq, int tk, const T* q, const T* k, const T* v,
                   const std::int64_t* q_pos, const std::int64_t* k_pos, const T* out, const T* lse,
                   const T* dout, T* dq, T* dk, T* dv);

// Softmax cross-entropy of full-vocabulary rows. Returns the sum of the rows' losses; dlogits
// (overwritten, may be null) = scale * (softmax - onehot(label)). Rows with label < 0 have no
// loss and a zero gradient.
template <class T>
double cross_entropy(int rows, int vocab, const T* logits, const std::int32_t* labels, double scale,
                     T* dlogits);

// Router: probs = softmax(logits) over experts (saved); the k largest are selected (ties go to
// the lower index), idx[rows, k] in decreasing order of probability; weights[rows, k] are their
// probabilities, divided by their sum when normalize (Qwen3/DeepSeek norm_topk_prob).
template <class T>
void router_topk_fwd(int rows, int experts, int k, bool normalize, const T* logits, T* probs,
                     std::int32_t* idx, T* weights);
// Gradient of the logits (overwritten) from the gradient of the weights, through the
// normalisation and the softmax (the selection itself is piecewise constant).
template <class T>
void router_topk_bwd(int rows, int experts, int k, bool normalize, const T* probs,
                     const std::int32_t* idx, const T* dweights, T* dlogits);

// Permutation of token rows (MoE dispatch): dst[i] = src[index[i]] for i < n (gather), and its
// adjoint dst[index[i]] += src[i] (scatter-add).
template <class T>
void gather_rows(int n, int dim, const T* src, const std::int32_t* index, T* dst);
template <class T>
void scatter_add_rows(int n, int dim, const T* src, const std::int32_t* index, T* dst);

// AdamW (PyTorch's torch.optim.AdamW): decoupled weight decay, bias-corrected moments.
// step counts from 1.
struct AdamWParams {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
};
template <class T>
void adamw(std::size_t n, const AdamWParams& p, std::int64_t step, T* param, const T* grad, T* m,
           T* v);
// float runs the host AdamW (real_backend/cpu/host_adam.hpp): the same loop, vectorised.
template <>
void adamw<float>(std::size_t n, const AdamWParams& p, std::int64_t step, float* param,
                  const float* grad, float* m, float* v);

// The CPU backend's policy for the program interpreter (interpreter_impl.hpp): tensors in
// ordinary memory, the kernels above, nothing to wait for.
template <class T> struct CpuKernels {
  template <class X> using Alloc = std::allocator<X>;
  static void sync() {}
  static void gemm(int m, int n, int k, const T* a, bool trans_a, const T* b, bool trans_b, T* c,
                   bool accumulate) {
    real::gemm<T>(m, n, k, a, trans_a, b, trans_b, c, accumulate);
  }
  static void rmsnorm_fwd(int rows, int dim, const T* x, const T* w, double eps, T* y, T* rstd) {
    real::rmsnorm_fwd<T>(rows, dim, x, w, eps, y, rstd);
  }
  static void rmsnorm_bwd(int rows, int dim, const T* x, const T* w, const T* rstd, const T* dy,
                          T* dx, T* dw) {
    real::rmsnorm_bwd<T>(rows, dim, x, w, rstd, dy, dx, dw);
  }
  static void rope(int tokens, int heads, int head_dim, const std::int64_t* positions, double theta,
                   T* x, bool inverse) {
    real::rope<T>(tokens, heads, head_dim, positions, theta, x, inverse);
  }
  static void swiglu_fwd(std::size_t n, const T* gate, const T* up, T* out) {
    real::swiglu_fwd<T>(n, gate, up, out);
  }
  static void swiglu_bwd(std::size_t n, const T* gate, const T* up, const T* dout, T* dgate,
                         T* dup) {
    real::swiglu_bwd<T>(n, gate, up, dout, dgate, dup);
  }
  static void attention_fwd(const AttentionParams& p, int tq, int tk, const T* q, const T* k,
                            const T* v, const std::int64_t* q_pos, const std::int64_t* k_pos,
                            T* out, T* lse) {
    real::attention_fwd<T>(p, tq, tk, q, k, v, q_pos, k_pos, out, lse);
  }
  static void attention_merge(int tq, int heads, int v_dim, T* out_a, T* lse_a, const T* out_b,
                              const T* lse_b) {
    real::attention_merge<T>(tq, heads, v_dim, out_a, lse_a, out_b, lse_b);
  }
  static void attention_bwd(const AttentionParams& p, int tq, int tk, const T* q, const T* k,
                            const T* v, const std::int64_t* q_pos, const std::int64_t* k_pos,
                            const T* out, const T* lse, const T* dout, T* dq, T* dk, T* dv) {
    real::attention_bwd<T>(p, tq, tk, q, k, v, q_pos, k_pos, out, lse, dout, dq, dk, dv);
  }
  static double cross_entropy(int rows, int vocab, const T* logits, const std::int32_t* labels,
                              double scale, T* dlogits) {
    return real::cross_entropy<T>(rows, vocab, logits, labels, scale, dlogits);
  }
  static void router_topk_fwd(int rows, int experts, int k, bool normalize, const T* logits,
                              T* probs, std::int32_t* idx, T* weights) {
    real::router_topk_fwd<T>(rows, experts, k, normalize, logits, probs, idx, weights);
  }
  static void router_topk_bwd(int rows, int experts, int k, bool normalize, const T* probs,
                              const std::int32_t* idx, const T* dweights, T* dlogits) {
    real::router_topk_bwd<T>(rows, experts, k, normalize, probs, idx, dweights, dlogits);
  }
  static void gather_rows(int n, int dim, const T* src, const std::int32_t* index, T* dst) {
    real::gather_rows<T>(n, dim, src, index, dst);
  }
  static void scatter_add_rows(int n, int dim, const T* src, const std::int32_t* index, T* dst) {
    real::scatter_add_rows<T>(n, dim, src, index, dst);
  }
  static void adamw(std::size_t n, const AdamWParams& p, std::int64_t step, T* param, const T* grad,
                    T* m, T* v) {
    real::adamw<T>(n, p, step, param, grad, m, v);
  }
};

} // namespace mop::real
