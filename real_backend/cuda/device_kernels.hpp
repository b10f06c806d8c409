#pragma once
// The CUDA kernels on device-accessible pointers (device or managed memory), float only, with the
// semantics of their CPU twins of the same names (real_backend/cpu/kernels.hpp), on the shared
// per-element math of real_backend/kernels/math.hpp. Each launches on the default stream and
// returns without waiting (a later sync() or copy waits); a launch error throws
// std::runtime_error. Reductions run in the CPU twin's order where it fixes one (the attention
// backward's key and query sums, scatter-add, the router's sums), so the two sides differ only by
// fused multiply-adds and the device's exp/log (tests/real_backend/cuda). Plain C++ header.
#include "real_backend/cpu/kernels.hpp" // AttentionParams, AdamWParams

#include <cstddef>
#include <cstdint>

namespace mop::real::cuda::dev {

void swiglu_fwd(std::size_t n, const float* gate, const float* up, float* out);
void swiglu_bwd(std::size_t n, const float* gate, const float* up, const float* dout, float* dgate,
                float* dup);
void rmsnorm_fwd(int rows, int dim, const float* x, const float* w, double eps, float* y,
                 float* rstd);
void rmsnorm_bwd(int rows, int dim, const float* x, const float* w, const float* rstd,
                 const float* dy, float* dx, float* dw);
void rope(int tokens, int heads, int head_dim, const std::int64_t* positions, double theta,
          float* x, bool inverse);
void adamw(std::size_t n, const AdamWParams& p, std::int64_t step, float* param, const float* grad,
           float* m, float* v);

// cuBLASLt FP32 (no TF32), one runner per host thread on the default stream.
void gemm(int m, int n, int k, const float* a, bool trans_a, const float* b, bool trans_b, float* c,
          bool accumulate);
void attention_fwd(const AttentionParams& p, int tq, int tk, const float* q, const float* k,
                   const float* v, const std::int64_t* q_pos, const std::int64_t* k_pos, float* out,
                   float* lse);
void attention_merge(int tq, int heads, int v_dim, float* out_a, float* lse_a, const float* out_b,
                     const float* lse_b);
void attention_bwd(const AttentionParams& p, int tq, int tk, const float* q, const float* k,
                   const float* v, const std::int64_t* q_pos, const std::int64_t* k_pos,
                   const float* out, const float* lse, const float* dout, float* dq, float* dk,
                   float* dv);
// Waits for the kernel (it returns the summed loss to the host).
double cross_entropy(int rows, int vocab, const float* logits, const std::int32_t* labels,
                     double scale, float* dlogits);
void router_topk_fwd(int rows, int experts, int k, bool normalize, const float* logits,
                     float* probs, std::int32_t* idx, float* weights);
void router_topk_bwd(int rows, int experts, int k, bool normalize, const float* probs,
                     const std::int32_t* idx, const float* dweights, float* dlogits);
void gather_rows(int n, int dim, const float* src, const std::int32_t* index, float* dst);
void scatter_add_rows(int n, int dim, const float* src, const std::int32_t* index, float* dst);

// Memory both the host and the device reach (cudaMallocManaged), and its release; and a wait for
// everything issued so far, which reports a failed kernel.
void* managed_alloc(std::size_t bytes);
void managed_free(void* p) noexcept;
void sync();

} // namespace mop::real::cuda::dev
