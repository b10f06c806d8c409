// The CUDA executor's kernels (real_backend/cuda/device_kernels.hpp) against their CPU twins
// (real_backend/cpu/kernels.hpp) on the same random inputs in managed memory. Without a GPU each
// test is skipped.
//
// Tolerance. Each kernel runs its twin's loop in the twin's order; the two sides differ by
// nvcc's fused multiply-adds (one rounding instead of two) and the device's expf/logf (2 and 1
// ulp against glibc's < 1). Attention outputs are a few hundred such operations on O(1) values
// (dot products of 16, online softmax over 24 keys), so norm-wise max|gpu - cpu| <= kTol *
// max|cpu| with kTol = 1e-5 (~170 u) holds with a wide margin; a wrong index or mask gives
// 1e-2 and more. Gathers and scatter-adds copy and add in the same order without products:
// exact.
#include "real_backend/cuda/device_kernels.hpp"

#include "real_backend/cpu/kernels.hpp"
#include "real_backend/cpu/tiny_model.hpp"
#include "tests/real_backend/cuda/gpu.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <doctest/doctest.h>
#include <vector>

using namespace mop::real;

namespace {

constexpr double kTol = 1e-5;

// n elements of T in managed memory, filled from and read back as host vectors.
template <class T> class Managed {
public:
  explicit Managed(const std::vector<T>& host) : n_(host.size()) {
    p_ = static_cast<T*>(cuda::dev::managed_alloc(n_ * sizeof(T)));
    std::copy(host.begin(), host.end(), p_);
  }
  ~Managed() { cuda::dev::managed_free(p_); }
  Managed(const Managed&) = delete;
  Managed& operator=(const Managed&) = delete;
  T* get() { return p_; }
  std::vector<T> host() {
    cuda::dev::sync();
    return std::vector<T>(p_, p_ + n_);
  }

private:
  std::size_t n_;
  T* p_ = nullptr;
};

std::vector<float> randn(std::size_t n, std::uint64_t seed, double scale = 1.0) {
  std::vector<float> v(n);
  for (std::size_t i = 0; i < n; ++i)
    v[i] = static_cast<float>(scale * standard_normal(mix64(seed) + i));
  return v;
}

double rel(const std::vector<float>& got, const std::vector<float>& want) {
  double scale = 0, diff = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    if (std::isinf(want[i]) || std::isinf(got[i])) {
      diff = std::max(diff, want[i] == got[i] ? 0.0 : 1e30);
      continue;
    }
    scale = std::max(scale, static_cast<double>(std::abs(want[i])));
    diff = std::max(diff, static_cast<double>(std::abs(got[i] - want[i])));
  }
  return diff / std::max(scale, 1e-30);
}

} // namespace

TEST_CASE("CUDA attention forward, merge and backward equal the CPU twins, GQA, causal, windows "
          "and a shifted key block" *
          doctest::test_suite("independent")) {
  if (!mop::test::gpu_or_skip())
    return;
  AttentionParams p;
  p.heads = 4;
  p.kv_heads = 2;
  p.qk_dim = 16;
  p.v_dim = 8;
  p.scale = 0.25;
  const int tq = 24, tk = 24;
  for (const std::int64_t window : {std::int64_t{0}, std::int64_t{5}})
    for (const std::int64_t shift : {std::int64_t{0}, std::int64_t{-24}}) {
      CAPTURE(window);
      CAPTURE(shift);
      p.window = window;
      std::vector<std::int64_t> qpos(tq), kpos(tk);
      for (int i = 0; i < tq; ++i)
        qpos[static_cast<std::size_t>(i)] = 24 + i;
      for (int j = 0; j < tk; ++j)
        kpos[static_cast<std::size_t>(j)] = 24 + shift + j;
      const auto q = randn(tq * 64, 1), k = randn(tk * 32, 2), v = randn(tk * 16, 3),
                 dout = randn(tq * 32, 4);
      std::vector<float> out(tq * 32), lse(tq * 4);
      attention_fwd<float>(p, tq, tk, q.data(), k.data(), v.data(), qpos.data(), kpos.data(),
                           out.data(), lse.data());
      Managed<float> dq_(q), dk_(k), dv_(v), dout_(dout), dout_o(std::vector<float>(tq * 32)),
          dlse(std::vector<float>(tq * 4));
      Managed<std::int64_t> dqp(qpos), dkp(kpos);
      cuda::dev::attention_fwd(p, tq, tk, dq_.get(), dk_.get(), dv_.get(), dqp.get(), dkp.get(),
                               dout_o.get(), dlse.get());
      CHECK(rel(dout_o.host(), out) <= kTol);
      CHECK(rel(dlse.host(), lse) <= kTol);
      // Merge with a second block of the same keys: out and lse as attention over both.
      std::vector<float> out2 = out, lse2 = lse;
      attention_merge<float>(tq, 4, 8, out2.data(), lse2.data(), out.data(), lse.data());
      Managed<float> mo(out), ml(lse), mo_b(out), ml_b(lse);
      cuda::dev::attention_merge(tq, 4, 8, mo.get(), ml.get(), mo_b.get(), ml_b.get());
      CHECK(rel(mo.host(), out2) <= kTol);
      CHECK(rel(ml.host(), lse2) <= kTol);
      // Backward, accumulating into nonzero gradients.
      std::vector<float> gq = randn(tq * 64, 5, 0.1), gk = randn(tk * 32, 6, 0.1),
                         gv = randn(tk * 16, 7, 0.1);
      Managed<float> mgq(gq), mgk(gk), mgv(gv), mo2(out), ml2(lse);
      attention_bwd<float>(p, tq, tk, q.data(), k.data(), v.data(), qpos.data(), kpos.data(),
                           out.data(), lse.data(), dout.data(), gq.data(), gk.data(), gv.data());
      cuda::dev::attention_bwd(p, tq, tk, dq_.get(), dk_.get(), dv_.get(), dqp.get(), dkp.get(),
                               mo2.get(), ml2.get(), dout_.get(), mgq.get(), mgk.get(), mgv.get());
      CHECK(rel(mgq.host(), gq) <= kTol);
      CHECK(rel(mgk.host(), gk) <= kTol);
      CHECK(rel(mgv.host(), gv) <= kTol);
    }
}

TEST_CASE("CUDA cross-entropy, router and row permutations equal the CPU twins" *
          doctest::test_suite("independent")) {
  if (!mop::test::gpu_or_skip())
    return;
  const int rows = 10, vocab = 37;
  const auto logits = randn(rows * vocab, 8, 3.0);
  std::vector<std::int32_t> labels(rows);
  for (int r = 0; r < rows; ++r)
    labels[static_cast<std::size_t>(r)] = r == 3 ? -1 : (r * 7) % vocab;
  std::vector<float> dl(rows * vocab);
  const double loss =
      cross_entropy<float>(rows, vocab, logits.data(), labels.data(), 0.1, dl.data());
  Managed<float> ml(logits), mdl(std::vector<float>(rows * vocab));
  Managed<std::int32_t> mlab(labels);
  const double got = cuda::dev::cross_entropy(rows, vocab, ml.get(), mlab.get(), 0.1, mdl.get());
  CHECK(std::abs(got - loss) <= kTol * std::abs(loss));
  CHECK(rel(mdl.host(), dl) <= kTol);

  for (const bool normalize : {false, true}) {
    CAPTURE(normalize);
    const int n = 16, experts = 8, k = 2;
    const auto x = randn(n * experts, 9);
    std::vector<float> probs(n * experts), w(n * k);
    std::vector<std::int32_t> idx(n * k);
    router_topk_fwd<float>(n, experts, k, normalize, x.data(), probs.data(), idx.data(), w.data());
    Managed<float> mx(x), mp(std::vector<float>(n * experts)), mw(std::vector<float>(n * k));
    Managed<std::int32_t> mi(std::vector<std::int32_t>(n * k));
    cuda::dev::router_topk_fwd(n, experts, k, normalize, mx.get(), mp.get(), mi.get(), mw.get());
    CHECK(mi.host() == idx);
    CHECK(rel(mp.host(), probs) <= kTol);
    CHECK(rel(mw.host(), w) <= kTol);
    const auto dw = randn(n * k, 10);
    std::vector<float> dlog(n * experts);
    router_topk_bwd<float>(n, experts, k, normalize, probs.data(), idx.data(), dw.data(),
                           dlog.data());
    Managed<float> mdw(dw), mdlog(std::vector<float>(n * experts)), mp2(probs);
    Managed<std::int32_t> mi2(idx);
    cuda::dev::router_topk_bwd(n, experts, k, normalize, mp2.get(), mi2.get(), mdw.get(),
                               mdlog.get());
    CHECK(rel(mdlog.host(), dlog) <= kTol);
  }

  const int n = 12, dim = 5;
  const auto src = randn(n * dim, 11);
  std::vector<std::int32_t> index{3, 0, 3, 7, 1, 1, 9, 2, 0, 5, 4, 3};
  const auto base = randn(10 * dim, 12);
  std::vector<float> gathered(n * dim), scattered = base;
  gather_rows<float>(n, dim, base.data(), index.data(), gathered.data());
  scatter_add_rows<float>(n, dim, src.data(), index.data(), scattered.data());
  Managed<float> msrc(src), mbase(base), mg(std::vector<float>(n * dim)), ms(base);
  Managed<std::int32_t> mix(index);
  cuda::dev::gather_rows(n, dim, mbase.get(), mix.get(), mg.get());
  cuda::dev::scatter_add_rows(n, dim, msrc.get(), mix.get(), ms.get());
  CHECK(mg.host() == gathered);
  CHECK(ms.host() == scattered);
}
