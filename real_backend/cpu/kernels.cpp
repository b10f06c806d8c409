#include "real_backend/cpu/kernels.hpp"

#include "real_backend/cpu/host_adam.hpp"

#include "real_backend/kernels/math.hpp"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

namespace mop::real {

namespace {

std::size_t sz(std::int64_t v) {
  return static_cast<std::size_t>(v);
}

using math::dot;

// The one GEMM of the library's two precisions: c = op(a)·op(b) + beta·c, row-major. beta = 0
// overwrites c whatever it held (BLAS does not read it then).
void blas_gemm(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int m, int n, int k, const float* a, int lda,
               const float* b, int ldb, float beta, float* c, int ldc) {
  cblas_sgemm(CblasRowMajor, ta, tb, m, n, k, 1.0f, a, lda, b, ldb, beta, c, ldc);
}
void blas_gemm(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int m, int n, int k, const double* a,
               int lda, const double* b, int ldb, double beta, double* c, int ldc) {
  cblas_dgemm(CblasRowMajor, ta, tb, m, n, k, 1.0, a, lda, b, ldb, beta, c, ldc);
}

// Whether key position kp is visible from query position qp (the rule of kernels.hpp).
bool visible(const AttentionParams& p, std::int64_t qp, std::int64_t kp) {
  return math::key_visible(p.causal, p.window, qp, kp);
}

} // namespace

template <class T>
void gemm(int m, int n, int k, const T* a, bool trans_a, const T* b, bool trans_b, T* c,
          bool accumulate) {
  if (m == 0 || n == 0)
    return;
  // Every rank is already a thread: OpenBLAS splitting a call over a pool of its own would
  // oversubscribe the cores, so every call runs on the calling thread (set once per process,
  // before the first call). The pthread flavour that CMake links is safe to call from several
  // threads at once; Debian's serial flavour is not (it returns wrong products now and then), so
  // a build linked against another flavour stops here rather than compute wrong numbers.
  static const bool single_threaded = [] {
    if (openblas_get_parallel() != 1) // 0: serial, 1: pthreads, 2: OpenMP
      throw std::runtime_error("the CPU executor needs OpenBLAS's pthread flavour "
                               "(libopenblas-pthread-dev), and this build links another");
    openblas_set_num_threads(1);
    return true;
  }();
  (void)single_threaded;
  // Row-major operands: a is [m,k] or [k,m], b is [k,n] or [n,k], so a row's length is the
  // leading dimension. BLAS asks for at least 1 even when a dimension is empty (k = 0).
  const int lda = std::max(1, trans_a ? m : k);
  const int ldb = std::max(1, trans_b ? k : n);
  blas_gemm(trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, m, n, k, a,
            lda, b, ldb, accumulate ? T(1) : T(0), c, n);
}

template <class T>
void rmsnorm_fwd(int rows, int dim, const T* x, const T* w, double eps, T* y, T* rstd) {
  for (int r = 0; r < rows; ++r) {
    const T* xr = x + sz(r) * dim;
    double ss = 0;
    for (int j = 0; j < dim; ++j)
      ss += static_cast<double>(xr[j]) * static_cast<double>(xr[j]);
    const T rs = static_cast<T>(math::rmsnorm_rstd(ss, dim, eps));
    rstd[r] = rs;
    T* yr = y + sz(r) * dim;
    for (int j = 0; j < dim; ++j)
      yr[j] = math::rmsnorm_y(xr[j], rs, w[j]);
  }
}

template <class T>
void rmsnorm_bwd(int rows, int dim, const T* x, const T* w, const T* rstd, const T* dy, T* dx,
                 T* dw) {
  for (int r = 0; r < rows; ++r) {
    const T* xr = x + sz(r) * dim;
    const T* dyr = dy + sz(r) * dim;
    const T rs = rstd[r];
    T s = 0;
    for (int j = 0; j < dim; ++j)
      s += dyr[j] * w[j] * xr[j];
    const T c = math::rmsnorm_dx_coefficient(rs, s, dim);
    T* dxr = dx + sz(r) * dim;
    for (int j = 0; j < dim; ++j) {
      dxr[j] = math::rmsnorm_dx(xr[j], dyr[j], w[j], rs, c);
      dw[j] += math::rmsnorm_dw(xr[j], dyr[j], rs);
    }
  }
}

template <class T>
void rope(int tokens, int heads, int head_dim, const std::int64_t* positions, double theta, T* x,
          bool inverse) {
  const int half = head_dim / 2;
  for (int t = 0; t < tokens; ++t)
    for (int i = 0; i < half; ++i) {
      const double angle =
          static_cast<double>(positions[t]) * math::rope_inv_freq(i, head_dim, theta);
      const T c = static_cast<T>(std::cos(angle)), s = static_cast<T>(std::sin(angle));
      for (int h = 0; h < heads; ++h) {
        T* xh = x + (sz(t) * heads + h) * head_dim;
        if (inverse)
          math::rope_rotate_inverse(xh[i], xh[i + half], c, s);
        else
          math::rope_rotate(xh[i], xh[i + half], c, s);
      }
    }
}

template <class T> void swiglu_fwd(std::size_t n, const T* gate, const T* up, T* out) {
  for (std::size_t i = 0; i < n; ++i)
    out[i] = math::swiglu(gate[i], up[i]);
}

template <class T>
void swiglu_bwd(std::size_t n, const T* gate, const T* up, const T* dout, T* dgate, T* dup) {
  for (std::size_t i = 0; i < n; ++i) {
    dgate[i] = dout[i] * math::swiglu_dgate(gate[i], up[i]);
    dup[i] = dout[i] * math::swiglu_dup(gate[i], up[i]);
  }
}

template <class T>
void attention_fwd(const AttentionParams& p, int tq, int tk, const T* q, const T* k, const T* v,
                   const std::int64_t* q_pos, const std::int64_t* k_pos, T* out, T* lse) {
  const int group = p.heads / p.kv_heads;
  const T scale = static_cast<T>(p.scale);
  std::vector<T> acc(sz(p.v_dim));
  for (int i = 0; i < tq; ++i)
    for (int h = 0; h < p.heads; ++h) {
      const int kh = h / group;
      const T* qi = q + (sz(i) * p.heads + h) * p.qk_dim;
      T run_max = math::neg_inf<T>(), run_sum = 0;
      for (auto& a : acc)
        a = 0;
      for (int j = 0; j < tk; ++j) {
        if (!visible(p, q_pos[i], k_pos[j]))
          continue;
        const T* kj = k + (sz(j) * p.kv_heads + kh) * p.qk_dim;
        const T* vj = v + (sz(j) * p.kv_heads + kh) * p.v_dim;
        const T s = scale * dot(p.qk_dim, qi, kj);
        const auto st = math::online_softmax_update(run_max, run_sum, s);
        for (int d = 0; d < p.v_dim; ++d)
          acc[sz(d)] = acc[sz(d)] * st.rescale + st.weight * vj[d];
      }
      T* oi = out + (sz(i) * p.heads + h) * p.v_dim;
      T& li = lse[sz(i) * p.heads + h];
      if (run_sum == T(0)) { // no visible key
        for (int d = 0; d < p.v_dim; ++d)
          oi[d] = 0;
        li = math::neg_inf<T>();
      } else {
        for (int d = 0; d < p.v_dim; ++d)
          oi[d] = acc[sz(d)] / run_sum;
        li = run_max + std::log(run_sum);
      }
    }
}

template <class T>
void attention_merge(int tq, int heads, int v_dim, T* out_a, T* lse_a, const T* out_b,
                     const T* lse_b) {
  for (std::size_t r = 0; r < sz(tq) * heads; ++r) {
    const auto mg = math::lse_merge(lse_a[r], lse_b[r]);
    T* oa = out_a + r * v_dim;
    const T* ob = out_b + r * v_dim;
    for (int d = 0; d < v_dim; ++d)
      oa[d] = mg.weight_a * oa[d] + mg.weight_b * ob[d];
    lse_a[r] = mg.lse;
  }
}

template <class T>
void attention_bwd(const AttentionParams& p, int tq, int tk, const T* q, const T* k, const T* v,
                   const std::int64_t* q_pos, const std::int64_t* k_pos, const T* out, const T* lse,
                   const T* dout, T* dq, T* dk, T* dv) {
  // FlashAttention-2 (Dao 2023), Algorithm 2: P_ij = exp(s_ij - lse_i) with the final lse over
  // all keys, D_i = dout_i · out_i, dS_ij = P_ij (dout_i · v_j - D_i); dv_j += P_ij dout_i,
  // dq_i += scale dS_ij k_j, dk_j += scale dS_ij q_i.
  const int group = p.heads / p.kv_heads;
  const T scale = static_cast<T>(p.scale);
  for (int i = 0; i < tq; ++i)
    for (int h = 0; h < p.heads; ++h) {
      const std::size_t row = sz(i) * p.heads + h;
      const T li = lse[row];
      if (li == math::neg_inf<T>())
        continue; // no visible key anywhere: out is constant 0
      const int kh = h / group;
      const T* qi = q + row * p.qk_dim;
      const T* doi = dout + row * p.v_dim;
      const T di = dot(p.v_dim, doi, out + row * p.v_dim);
      T* dqi = dq + row * p.qk_dim;
      for (int j = 0; j < tk; ++j) {
        if (!visible(p, q_pos[i], k_pos[j]))
          continue;
        const std::size_t krow = sz(j) * p.kv_heads + kh;
        const T* kj = k + krow * p.qk_dim;
        const T* vj = v + krow * p.v_dim;
        const T pij = std::exp(scale * dot(p.qk_dim, qi, kj) - li);
        T* dvj = dv + krow * p.v_dim;
        for (int d = 0; d < p.v_dim; ++d)
          dvj[d] += pij * doi[d];
        const T ds = pij * (dot(p.v_dim, doi, vj) - di) * scale;
        T* dkj = dk + krow * p.qk_dim;
        for (int d = 0; d < p.qk_dim; ++d) {
          dqi[d] += ds * kj[d];
          dkj[d] += ds * qi[d];
        }
      }
    }
}

template <class T>
double cross_entropy(int rows, int vocab, const T* logits, const std::int32_t* labels, double scale,
                     T* dlogits) {
  double total = 0;
  for (int r = 0; r < rows; ++r) {
    const T* x = logits + sz(r) * vocab;
    T* dx = dlogits ? dlogits + sz(r) * vocab : nullptr;
    const std::int32_t label = labels[r];
    if (label < 0) {
      if (dx)
        for (int j = 0; j < vocab; ++j)
          dx[j] = 0;
      continue;
    }
    T mx = x[0];
    for (int j = 1; j < vocab; ++j)
      mx = math::max(mx, x[j]);
    T sum = 0;
    for (int j = 0; j < vocab; ++j)
      sum += std::exp(x[j] - mx);
    const T lse = mx + std::log(sum);
    total += static_cast<double>(lse - x[label]);
    if (dx) {
      const T sc = static_cast<T>(scale);
      for (int j = 0; j < vocab; ++j)
        dx[j] = sc * (std::exp(x[j] - lse) - (j == label ? T(1) : T(0)));
    }
  }
  return total;
}

template <class T>
void router_topk_fwd(int rows, int experts, int k, bool normalize, const T* logits, T* probs,
                     std::int32_t* idx, T* weights) {
  std::vector<char> taken(sz(experts));
  for (int r = 0; r < rows; ++r) {
    const T* x = logits + sz(r) * experts;
    T* pr = probs + sz(r) * experts;
    T mx = x[0];
    for (int e = 1; e < experts; ++e)
      mx = math::max(mx, x[e]);
    T sum = 0;
    for (int e = 0; e < experts; ++e) {
      pr[e] = std::exp(x[e] - mx);
      sum += pr[e];
    }
    for (int e = 0; e < experts; ++e)
      pr[e] /= sum;
    // k passes of an arg-max over the experts not yet taken; the strict > keeps the lower index
    // on ties, and the passes come out in decreasing probability.
    for (auto& t : taken)
      t = 0;
    std::int32_t* ir = idx + sz(r) * k;
    T* wr = weights + sz(r) * k;
    T wsum = 0;
    for (int s = 0; s < k; ++s) {
      int best = -1;
      for (int e = 0; e < experts; ++e)
        if (!taken[sz(e)] && (best < 0 || pr[e] > pr[best]))
          best = e;
      taken[sz(best)] = 1;
      ir[s] = best;
      wr[s] = pr[best];
      wsum += pr[best];
    }
    if (normalize)
      for (int s = 0; s < k; ++s)
        wr[s] /= wsum;
  }
}

template <class T>
void router_topk_bwd(int rows, int experts, int k, bool normalize, const T* probs,
                     const std::int32_t* idx, const T* dweights, T* dlogits) {
  std::vector<T> dp(sz(experts));
  for (int r = 0; r < rows; ++r) {
    const T* pr = probs + sz(r) * experts;
    const std::int32_t* ir = idx + sz(r) * k;
    const T* dwr = dweights + sz(r) * k;
    for (auto& d : dp)
      d = 0;
    if (normalize) {
      // w_i = p_i / S with S the sum of the selected p: dp_i = (dw_i - sum_j dw_j w_j) / S.
      T s = 0;
      for (int j = 0; j < k; ++j)
        s += pr[ir[j]];
      T dw_w = 0;
      for (int j = 0; j < k; ++j)
        dw_w += dwr[j] * (pr[ir[j]] / s);
      for (int j = 0; j < k; ++j)
        dp[sz(ir[j])] += (dwr[j] - dw_w) / s;
    } else {
      for (int j = 0; j < k; ++j)
        dp[sz(ir[j])] += dwr[j];
    }
    // Softmax Jacobian: dlogit_e = p_e (dp_e - sum_f p_f dp_f).
    T pdp = 0;
    for (int e = 0; e < experts; ++e)
      pdp += pr[e] * dp[sz(e)];
    T* dl = dlogits + sz(r) * experts;
    for (int e = 0; e < experts; ++e)
      dl[e] = pr[e] * (dp[sz(e)] - pdp);
  }
}

template <class T>
void gather_rows(int n, int dim, const T* src, const std::int32_t* index, T* dst) {
  for (int i = 0; i < n; ++i) {
    const T* s = src + sz(index[i]) * dim;
    T* d = dst + sz(i) * dim;
    for (int j = 0; j < dim; ++j)
      d[j] = s[j];
  }
}

template <class T>
void scatter_add_rows(int n, int dim, const T* src, const std::int32_t* index, T* dst) {
  for (int i = 0; i < n; ++i) {
    const T* s = src + sz(i) * dim;
    T* d = dst + sz(index[i]) * dim;
    for (int j = 0; j < dim; ++j)
      d[j] += s[j];
  }
}

template <class T>
void adamw(std::size_t n, const AdamWParams& p, std::int64_t step, T* param, const T* grad, T* m,
           T* v) {
  const double bc1 = math::adam_bias_correction(p.beta1, step);
  const double bc2 = math::adam_bias_correction(p.beta2, step);
  for (std::size_t i = 0; i < n; ++i)
    math::adamw_update(param[i], m[i], v[i], grad[i], p.lr, p.beta1, p.beta2, p.eps, p.weight_decay,
                       bc1, bc2);
}

// float: the host AdamW, vectorised for the processor and bit-identical to the loop above.
template <>
void adamw<float>(std::size_t n, const AdamWParams& p, std::int64_t step, float* param,
                  const float* grad, float* m, float* v) {
  host_adamw(n, p, step, param, grad, m, v);
}

#define MOP_INSTANTIATE_KERNELS(T)                                                                 \
  template void gemm<T>(int, int, int, const T*, bool, const T*, bool, T*, bool);                  \
  template void rmsnorm_fwd<T>(int, int, const T*, const T*, double, T*, T*);                      \
  template void rmsnorm_bwd<T>(int, int, const T*, const T*, const T*, const T*, T*, T*);          \
  template void rope<T>(int, int, int, const std::int64_t*, double, T*, bool);                     \
  template void swiglu_fwd<T>(std::size_t, const T*, const T*, T*);                                \
  template void swiglu_bwd<T>(std::size_t, const T*, const T*, const T*, T*, T*);                  \
  template void attention_fwd<T>(const AttentionParams&, int, int, const T*, const T*, const T*,   \
                                 const std::int64_t*, const std::int64_t*, T*, T*);                \
  template void attention_merge<T>(int, int, int, T*, T*, const T*, const T*);                     \
  template void attention_bwd<T>(const AttentionParams&, int, int, const T*, const T*, const T*,   \
                                 const std::int64_t*, const std::int64_t*, const T*, const T*,     \
                                 const T*, T*, T*, T*);                                            \
  template double cross_entropy<T>(int, int, const T*, const std::int32_t*, double, T*);           \
  template void router_topk_fwd<T>(int, int, int, bool, const T*, T*, std::int32_t*, T*);          \
  template void router_topk_bwd<T>(int, int, int, bool, const T*, const std::int32_t*, const T*,   \
                                   T*);                                                            \
  template void gather_rows<T>(int, int, const T*, const std::int32_t*, T*);                       \
  template void scatter_add_rows<T>(int, int, const T*, const std::int32_t*, T*);

MOP_INSTANTIATE_KERNELS(float)
MOP_INSTANTIATE_KERNELS(double)
template void adamw<double>(std::size_t, const AdamWParams&, std::int64_t, double*, const double*,
                            double*, double*);

#undef MOP_INSTANTIATE_KERNELS

} // namespace mop::real
