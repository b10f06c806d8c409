// The CUDA executor's kernels on device pointers (device_kernels.hpp): GEMM through cuBLASLt,
// attention, cross-entropy, the router and the row permutations. Each kernel follows its CPU
// twin's loop body (real_backend/cpu/kernels.cpp) on the shared math of
// real_backend/kernels/math.hpp, one thread per output row or column, so every sum runs in the
// twin's order. They are written to be right first (the attention kernels are not tiled):
// FlashAttention-style tiling and cuDNN's fused attention come after the executor runs.
#include "real_backend/cuda/device_kernels.hpp"

#include "real_backend/cuda/check.hpp"
#include "real_backend/cuda/runtime.hpp"
#include "real_backend/kernels/math.hpp"

#include <cuda_runtime.h>
#include <memory>
#include <stdexcept>
#include <vector>

namespace mop::real::cuda::dev {

namespace {

constexpr int kThreads = 128;

unsigned blocks(std::size_t n) {
  const std::size_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 65535 ? (b == 0 ? 1 : b) : 65535);
}

__device__ std::size_t first() {
  return static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ std::size_t stride() {
  return static_cast<std::size_t>(gridDim.x) * blockDim.x;
}

struct Attn {
  int heads, kv_heads, qk_dim, v_dim;
  bool causal;
  long long window;
  float scale;
};

Attn attn_of(const AttentionParams& p) {
  return {p.heads,
          p.kv_heads,
          p.qk_dim,
          p.v_dim,
          p.causal,
          static_cast<long long>(p.window),
          static_cast<float>(p.scale)};
}

// One thread per (query, head): the online softmax over the visible keys in key order, the
// weighted value sum kept in the output row itself, then normalised (attention_fwd's loop).
__global__ void attention_fwd_kernel(Attn p, int tq, int tk, const float* q, const float* k,
                                     const float* v, const std::int64_t* q_pos,
                                     const std::int64_t* k_pos, float* out, float* lse) {
  const int group = p.heads / p.kv_heads;
  const std::size_t rows = static_cast<std::size_t>(tq) * p.heads;
  for (std::size_t row = first(); row < rows; row += stride()) {
    const int i = static_cast<int>(row / p.heads), h = static_cast<int>(row % p.heads);
    const int kh = h / group;
    const float* qi = q + row * p.qk_dim;
    float* oi = out + row * p.v_dim;
    for (int d = 0; d < p.v_dim; ++d)
      oi[d] = 0;
    float run_max = math::neg_inf<float>(), run_sum = 0;
    for (int j = 0; j < tk; ++j) {
      if (!math::key_visible(p.causal, p.window, q_pos[i], k_pos[j]))
        continue;
      const std::size_t krow = static_cast<std::size_t>(j) * p.kv_heads + kh;
      const float s = p.scale * math::dot(p.qk_dim, qi, k + krow * p.qk_dim);
      const auto st = math::online_softmax_update(run_max, run_sum, s);
      const float* vj = v + krow * p.v_dim;
      for (int d = 0; d < p.v_dim; ++d)
        oi[d] = oi[d] * st.rescale + st.weight * vj[d];
    }
    if (run_sum == 0.0f) {
      for (int d = 0; d < p.v_dim; ++d)
        oi[d] = 0;
      lse[row] = math::neg_inf<float>();
    } else {
      for (int d = 0; d < p.v_dim; ++d)
        oi[d] = oi[d] / run_sum;
      lse[row] = run_max + logf(run_sum);
    }
  }
}

__global__ void attention_merge_kernel(std::size_t rows, int v_dim, float* out_a, float* lse_a,
                                       const float* out_b, const float* lse_b) {
  for (std::size_t r = first(); r < rows; r += stride()) {
    const auto mg = math::lse_merge(lse_a[r], lse_b[r]);
    for (int d = 0; d < v_dim; ++d)
      out_a[r * v_dim + d] =
          mg.weight_a * out_a[r * v_dim + d] + mg.weight_b * out_b[r * v_dim + d];
    lse_a[r] = mg.lse;
  }
}

// The backward's dq: one thread per (query, head), keys in order (FlashAttention-2's dQ).
__global__ void attention_bwd_dq_kernel(Attn p, int tq, int tk, const float* q, const float* k,
                                        const float* v, const std::int64_t* q_pos,
                                        const std::int64_t* k_pos, const float* out,
                                        const float* lse, const float* dout, float* dq) {
  const int group = p.heads / p.kv_heads;
  const std::size_t rows = static_cast<std::size_t>(tq) * p.heads;
  for (std::size_t row = first(); row < rows; row += stride()) {
    const float li = lse[row];
    if (li == math::neg_inf<float>())
      continue;
    const int i = static_cast<int>(row / p.heads), kh = static_cast<int>(row % p.heads) / group;
    const float* qi = q + row * p.qk_dim;
    const float* doi = dout + row * p.v_dim;
    const float di = math::dot(p.v_dim, doi, out + row * p.v_dim);
    float* dqi = dq + row * p.qk_dim;
    for (int j = 0; j < tk; ++j) {
      if (!math::key_visible(p.causal, p.window, q_pos[i], k_pos[j]))
        continue;
      const std::size_t krow = static_cast<std::size_t>(j) * p.kv_heads + kh;
      const float* kj = k + krow * p.qk_dim;
      const float pij = expf(p.scale * math::dot(p.qk_dim, qi, kj) - li);
      const float ds = pij * (math::dot(p.v_dim, doi, v + krow * p.v_dim) - di) * p.scale;
      for (int d = 0; d < p.qk_dim; ++d)
        dqi[d] += ds * kj[d];
    }
  }
}

// The backward's dk and dv: one thread per (key, KV head), queries in order and the query heads
// of the group inside, as the CPU twin adds them.
__global__ void attention_bwd_dkv_kernel(Attn p, int tq, int tk, const float* q, const float* k,
                                         const float* v, const std::int64_t* q_pos,
                                         const std::int64_t* k_pos, const float* out,
                                         const float* lse, const float* dout, float* dk,
                                         float* dv) {
  const int group = p.heads / p.kv_heads;
  const std::size_t krows = static_cast<std::size_t>(tk) * p.kv_heads;
  for (std::size_t krow = first(); krow < krows; krow += stride()) {
    const int j = static_cast<int>(krow / p.kv_heads), kh = static_cast<int>(krow % p.kv_heads);
    const float* kj = k + krow * p.qk_dim;
    const float* vj = v + krow * p.v_dim;
    float* dkj = dk + krow * p.qk_dim;
    float* dvj = dv + krow * p.v_dim;
    for (int i = 0; i < tq; ++i) {
      if (!math::key_visible(p.causal, p.window, q_pos[i], k_pos[j]))
        continue;
      for (int h = kh * group; h < (kh + 1) * group; ++h) {
        const std::size_t row = static_cast<std::size_t>(i) * p.heads + h;
        const float li = lse[row];
        if (li == math::neg_inf<float>())
          continue;
        const float* qi = q + row * p.qk_dim;
        const float* doi = dout + row * p.v_dim;
        const float di = math::dot(p.v_dim, doi, out + row * p.v_dim);
        const float pij = expf(p.scale * math::dot(p.qk_dim, qi, kj) - li);
        for (int d = 0; d < p.v_dim; ++d)
          dvj[d] += pij * doi[d];
        const float ds = pij * (math::dot(p.v_dim, doi, vj) - di) * p.scale;
        for (int d = 0; d < p.qk_dim; ++d)
          dkj[d] += ds * qi[d];
      }
    }
  }
}

// One thread per row: the row's loss (lse - x[label]) and, with dlogits, its gradient.
__global__ void cross_entropy_kernel(int rows, int vocab, const float* logits,
                                     const std::int32_t* labels, float scale, float* dlogits,
                                     double* row_loss) {
  for (std::size_t r = first(); r < static_cast<std::size_t>(rows); r += stride()) {
    const float* x = logits + r * vocab;
    float* dx = dlogits ? dlogits + r * vocab : nullptr;
    const std::int32_t label = labels[r];
    if (label < 0) {
      row_loss[r] = 0;
      if (dx)
        for (int j = 0; j < vocab; ++j)
          dx[j] = 0;
      continue;
    }
    float mx = x[0];
    for (int j = 1; j < vocab; ++j)
      mx = math::max(mx, x[j]);
    float sum = 0;
    for (int j = 0; j < vocab; ++j)
      sum += expf(x[j] - mx);
    const float l = mx + logf(sum);
    row_loss[r] = static_cast<double>(l - x[label]);
    if (dx)
      for (int j = 0; j < vocab; ++j)
        dx[j] = scale * (expf(x[j] - l) - (j == label ? 1.0f : 0.0f));
  }
}

constexpr int kMaxExperts = 1024; // the router kernels' per-thread selection mask

__global__ void router_fwd_kernel(int rows, int experts, int k, bool normalize, const float* logits,
                                  float* probs, std::int32_t* idx, float* weights) {
  for (std::size_t r = first(); r < static_cast<std::size_t>(rows); r += stride()) {
    const float* x = logits + r * experts;
    float* pr = probs + r * experts;
    float mx = x[0];
    for (int e = 1; e < experts; ++e)
      mx = math::max(mx, x[e]);
    float sum = 0;
    for (int e = 0; e < experts; ++e) {
      pr[e] = expf(x[e] - mx);
      sum += pr[e];
    }
    for (int e = 0; e < experts; ++e)
      pr[e] /= sum;
    unsigned taken[kMaxExperts / 32] = {};
    std::int32_t* ir = idx + r * k;
    float* wr = weights + r * k;
    float wsum = 0;
    for (int s = 0; s < k; ++s) {
      int best = -1;
      for (int e = 0; e < experts; ++e)
        if (!(taken[e / 32] >> (e % 32) & 1u) && (best < 0 || pr[e] > pr[best]))
          best = e;
      taken[best / 32] |= 1u << (best % 32);
      ir[s] = best;
      wr[s] = pr[best];
      wsum += pr[best];
    }
    if (normalize)
      for (int s = 0; s < k; ++s)
        wr[s] /= wsum;
  }
}

__global__ void router_bwd_kernel(int rows, int experts, int k, bool normalize, const float* probs,
                                  const std::int32_t* idx, const float* dweights, float* dlogits) {
  for (std::size_t r = first(); r < static_cast<std::size_t>(rows); r += stride()) {
    const float* pr = probs + r * experts;
    const std::int32_t* ir = idx + r * k;
    const float* dwr = dweights + r * k;
    float s = 0, dw_w = 0;
    if (normalize) {
      for (int j = 0; j < k; ++j)
        s += pr[ir[j]];
      for (int j = 0; j < k; ++j)
        dw_w += dwr[j] * (pr[ir[j]] / s);
    }
    // dp_e of expert e (nonzero only where selected), in expert order as the twin sums p·dp.
    auto dp = [&](int e) {
      float v = 0;
      for (int j = 0; j < k; ++j)
        if (ir[j] == e)
          v += normalize ? (dwr[j] - dw_w) / s : dwr[j];
      return v;
    };
    float pdp = 0;
    for (int e = 0; e < experts; ++e)
      pdp += pr[e] * dp(e);
    float* dl = dlogits + r * experts;
    for (int e = 0; e < experts; ++e)
      dl[e] = pr[e] * (dp(e) - pdp);
  }
}

__global__ void gather_rows_kernel(int n, int dim, const float* src, const std::int32_t* index,
                                   float* dst) {
  const std::size_t total = static_cast<std::size_t>(n) * dim;
  for (std::size_t e = first(); e < total; e += stride())
    dst[e] = src[static_cast<std::size_t>(index[e / dim]) * dim + e % dim];
}

// One thread per column, rows in order: dst[index[i]] += src[i] as the twin adds them.
__global__ void scatter_add_rows_kernel(int n, int dim, const float* src, const std::int32_t* index,
                                        float* dst) {
  for (std::size_t c = first(); c < static_cast<std::size_t>(dim); c += stride())
    for (int i = 0; i < n; ++i)
      dst[static_cast<std::size_t>(index[i]) * dim + c] +=
          src[static_cast<std::size_t>(i) * dim + c];
}

void check_launch() {
  MOP_CUDA_CHECK(cudaGetLastError());
}

} // namespace

void gemm(int m, int n, int k, const float* a, bool trans_a, const float* b, bool trans_b, float* c,
          bool accumulate) {
  if (m == 0 || n == 0)
    return;
  if (k == 0) { // no products: C is kept (accumulate) or zeroed, as in the CPU twin
    if (!accumulate)
      MOP_CUDA_CHECK(cudaMemset(c, 0, sizeof(float) * static_cast<std::size_t>(m) * n));
    return;
  }
  thread_local std::unique_ptr<GemmRunner> runner;
  if (!runner)
    runner = std::make_unique<GemmRunner>(nullptr); // the default stream
  runner->run({m, n, k, trans_a, trans_b, GemmType::f32, accumulate}, a, b, c);
}

void attention_fwd(const AttentionParams& p, int tq, int tk, const float* q, const float* k,
                   const float* v, const std::int64_t* q_pos, const std::int64_t* k_pos, float* out,
                   float* lse) {
  const std::size_t rows = static_cast<std::size_t>(tq) * p.heads;
  if (rows == 0)
    return;
  attention_fwd_kernel<<<blocks(rows), kThreads>>>(attn_of(p), tq, tk, q, k, v, q_pos, k_pos, out,
                                                   lse);
  check_launch();
}

void attention_merge(int tq, int heads, int v_dim, float* out_a, float* lse_a, const float* out_b,
                     const float* lse_b) {
  const std::size_t rows = static_cast<std::size_t>(tq) * heads;
  if (rows == 0)
    return;
  attention_merge_kernel<<<blocks(rows), kThreads>>>(rows, v_dim, out_a, lse_a, out_b, lse_b);
  check_launch();
}

void attention_bwd(const AttentionParams& p, int tq, int tk, const float* q, const float* k,
                   const float* v, const std::int64_t* q_pos, const std::int64_t* k_pos,
                   const float* out, const float* lse, const float* dout, float* dq, float* dk,
                   float* dv) {
  const std::size_t rows = static_cast<std::size_t>(tq) * p.heads;
  const std::size_t krows = static_cast<std::size_t>(tk) * p.kv_heads;
  if (rows == 0 || krows == 0)
    return;
  attention_bwd_dq_kernel<<<blocks(rows), kThreads>>>(attn_of(p), tq, tk, q, k, v, q_pos, k_pos,
                                                      out, lse, dout, dq);
  check_launch();
  attention_bwd_dkv_kernel<<<blocks(krows), kThreads>>>(attn_of(p), tq, tk, q, k, v, q_pos, k_pos,
                                                        out, lse, dout, dk, dv);
  check_launch();
}

double cross_entropy(int rows, int vocab, const float* logits, const std::int32_t* labels,
                     double scale, float* dlogits) {
  if (rows <= 0)
    return 0;
  DeviceBuffer loss(sizeof(double) * static_cast<std::size_t>(rows));
  cross_entropy_kernel<<<blocks(static_cast<std::size_t>(rows)), kThreads>>>(
      rows, vocab, logits, labels, static_cast<float>(scale), dlogits,
      static_cast<double*>(loss.data()));
  check_launch();
  std::vector<double> host(static_cast<std::size_t>(rows));
  loss.download(host.data(), loss.bytes());
  double total = 0; // in row order, as the CPU twin sums
  for (double l : host)
    total += l;
  return total;
}

void router_topk_fwd(int rows, int experts, int k, bool normalize, const float* logits,
                     float* probs, std::int32_t* idx, float* weights) {
  if (experts > kMaxExperts)
    throw std::invalid_argument("the CUDA router kernel handles at most 1024 experts");
  if (rows <= 0)
    return;
  router_fwd_kernel<<<blocks(static_cast<std::size_t>(rows)), kThreads>>>(
      rows, experts, k, normalize, logits, probs, idx, weights);
  check_launch();
}

void router_topk_bwd(int rows, int experts, int k, bool normalize, const float* probs,
                     const std::int32_t* idx, const float* dweights, float* dlogits) {
  if (rows <= 0)
    return;
  router_bwd_kernel<<<blocks(static_cast<std::size_t>(rows)), kThreads>>>(
      rows, experts, k, normalize, probs, idx, dweights, dlogits);
  check_launch();
}

void gather_rows(int n, int dim, const float* src, const std::int32_t* index, float* dst) {
  const std::size_t total = static_cast<std::size_t>(n) * dim;
  if (total == 0)
    return;
  gather_rows_kernel<<<blocks(total), kThreads>>>(n, dim, src, index, dst);
  check_launch();
}

void scatter_add_rows(int n, int dim, const float* src, const std::int32_t* index, float* dst) {
  if (n <= 0 || dim <= 0)
    return;
  scatter_add_rows_kernel<<<blocks(static_cast<std::size_t>(dim)), kThreads>>>(n, dim, src, index,
                                                                               dst);
  check_launch();
}

void* managed_alloc(std::size_t bytes) {
  void* p = nullptr;
  MOP_CUDA_CHECK(cudaMallocManaged(&p, bytes == 0 ? 1 : bytes));
  return p;
}

void managed_free(void* p) noexcept {
  if (p)
    cudaFree(p);
}

void sync() {
  MOP_CUDA_CHECK(cudaDeviceSynchronize());
}

} // namespace mop::real::cuda::dev
