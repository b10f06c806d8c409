// The CPU kernels against hand calculations, central finite differences of a scalar loss, and
// second methods (merging partial attention results, summing blockwise backward passes).
//
// Finite differences: every gradient check takes L = sum(out * w) for fixed random weights w,
// so dL/dout = w is the backward's input, and compares the kernel's gradient g with
// fd_i = (L(x + h e_i) - L(x - h e_i)) / 2h at h = 1e-5 in double. The truncation error is
// h^2 |L'''| / 6 ~ 2e-11 for these O(1) inputs and the rounding error about
// 1e-16 |L| / h ~ 1e-10 for |L| ~ 10, both far below the tolerance: the largest difference
// must be under 1e-6 times the largest gradient component (a norm-wise relative error, which
// does not blow up on components that happen to be near zero).
#include "real_backend/cpu/kernels.hpp"
#include "real_backend/cpu/tiny_model.hpp"
#include "tests/support/approx.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <doctest/doctest.h>
#include <functional>
#include <limits>
#include <thread>
#include <vector>

namespace real_backend_cpu_kernels_test {

using namespace mop::real;

namespace {

using Vec = std::vector<double>;
constexpr double kStep = 1e-5;
constexpr double kGradTol = 1e-6;
const double kNegInf = -std::numeric_limits<double>::infinity();

Vec randn(std::size_t n, std::uint64_t seed, double scale = 1.0) {
  Vec v(n);
  for (std::size_t i = 0; i < n; ++i)
    v[i] = scale * standard_normal(mix64(seed) + i);
  return v;
}

double weighted_sum(const Vec& out, const Vec& w) {
  double s = 0;
  for (std::size_t i = 0; i < out.size(); ++i)
    s += out[i] * w[i];
  return s;
}

// Central differences of loss() with respect to every element of x (restored afterwards).
Vec fd_grad(const std::function<double()>& loss, Vec& x) {
  Vec g(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double x0 = x[i];
    x[i] = x0 + kStep;
    const double up = loss();
    x[i] = x0 - kStep;
    const double down = loss();
    x[i] = x0;
    g[i] = (up - down) / (2 * kStep);
  }
  return g;
}

double max_abs(const Vec& v) {
  double m = 0;
  for (double x : v)
    m = std::max(m, std::fabs(x));
  return m;
}

// max |a - b| / max |b|: the norm-wise relative error of a against the reference b.
double rel_err(const Vec& a, const Vec& b) {
  REQUIRE(a.size() == b.size());
  double d = 0;
  for (std::size_t i = 0; i < a.size(); ++i)
    d = std::max(d, std::fabs(a[i] - b[i]));
  const double scale = max_abs(b);
  return scale > 0 ? d / scale : d;
}

void check_grad(const Vec& analytic, const std::function<double()>& loss, Vec& x) {
  const Vec fd = fd_grad(loss, x);
  CHECK(max_abs(fd) > 1e-3); // the check is not vacuous
  CHECK(rel_err(analytic, fd) < kGradTol);
}

std::vector<float> to_float(const Vec& v) {
  return std::vector<float>(v.begin(), v.end());
}

// Norm-wise relative error of a float result against the double one.
double float_err(const std::vector<float>& f, const Vec& d) {
  return rel_err(Vec(f.begin(), f.end()), d);
}

std::vector<std::int64_t> iota_pos(int n, std::int64_t first) {
  std::vector<std::int64_t> p(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i)
    p[static_cast<std::size_t>(i)] = first + i;
  return p;
}

} // namespace

TEST_CASE("kernels: gemm 2x3 by 3x2 by hand in all four transpose layouts" *
          doctest::test_suite("independent")) {
  // A = [[1,2,3],[4,5,6]], B = [[7,8],[9,10],[11,12]]:
  // C = [[1*7+2*9+3*11, 1*8+2*10+3*12], [4*7+5*9+6*11, 4*8+5*10+6*12]] = [[58,64],[139,154]].
  const Vec a = {1, 2, 3, 4, 5, 6}, at = {1, 4, 2, 5, 3, 6};
  const Vec b = {7, 8, 9, 10, 11, 12}, bt = {7, 9, 11, 8, 10, 12};
  const Vec expect = {58, 64, 139, 154};
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb) {
      CAPTURE(ta);
      CAPTURE(tb);
      Vec c(4, -1.0);
      gemm(2, 2, 3, (ta ? at : a).data(), ta == 1, (tb ? bt : b).data(), tb == 1, c.data(), false);
      CHECK(c == expect);
      Vec acc = {1, 2, 3, 4};
      gemm(2, 2, 3, (ta ? at : a).data(), ta == 1, (tb ? bt : b).data(), tb == 1, acc.data(), true);
      CHECK(acc == Vec{59, 66, 142, 158});
    }
}

TEST_CASE("kernels: gemm gradients dA = dC B^T and dB = A^T dC match finite differences" *
          doctest::test_suite("independent")) {
  const int m = 3, n = 4, k = 5;
  Vec a = randn(m * k, 1), b = randn(k * n, 2);
  const Vec w = randn(m * n, 3);
  const auto loss = [&] {
    Vec c(m * n);
    gemm(m, n, k, a.data(), false, b.data(), false, c.data(), false);
    return weighted_sum(c, w);
  };
  Vec da(m * k), db(k * n);
  gemm(m, k, n, w.data(), false, b.data(), true, da.data(), false);
  gemm(k, n, m, a.data(), true, w.data(), false, db.data(), false);
  check_grad(da, loss, a);
  check_grad(db, loss, b);
}

// Integer-valued operands in [-lo, hi]: every product and partial sum of the GEMMs below is an
// integer far under 2^24, so float and double hold it exactly and the result does not depend on
// the order in which the library sums over k; the expected product comes from exact integer loops.
template <class T> std::vector<T> small_ints(std::size_t n, std::uint64_t seed, int lo, int hi) {
  std::vector<T> v(n);
  for (std::size_t i = 0; i < n; ++i)
    v[i] = static_cast<T>(
        static_cast<int>(mix64(seed + i) % static_cast<std::uint64_t>(lo + hi + 1)) - lo);
  return v;
}

// c = c0 + op(a)·op(b) in 64-bit integers, a and b stored as gemm takes them.
template <class T>
std::vector<T> exact_gemm(int m, int n, int k, const std::vector<T>& a, bool ta,
                          const std::vector<T>& b, bool tb, const std::vector<T>& c0) {
  const auto at = [&](int i, int l) {
    return static_cast<std::int64_t>(ta ? a[static_cast<std::size_t>(l * m + i)]
                                        : a[static_cast<std::size_t>(i * k + l)]);
  };
  const auto bt = [&](int l, int j) {
    return static_cast<std::int64_t>(tb ? b[static_cast<std::size_t>(j * k + l)]
                                        : b[static_cast<std::size_t>(l * n + j)]);
  };
  std::vector<T> c(c0);
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      std::int64_t s = 0;
      for (int l = 0; l < k; ++l)
        s += at(i, l) * bt(l, j);
      auto& out = c[static_cast<std::size_t>(i * n + j)];
      out = static_cast<T>(static_cast<std::int64_t>(out) + s);
    }
  return c;
}

template <class T> void check_gemm_exact(int m, int n, int k) {
  const auto a = small_ints<T>(static_cast<std::size_t>(m * k), 300, 6, 6);
  const auto b = small_ints<T>(static_cast<std::size_t>(k * n), 301, 5, 5);
  const auto c0 = small_ints<T>(static_cast<std::size_t>(m * n), 302, 100, 100);
  const std::vector<T> zero(c0.size(), T(0));
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb) {
      CAPTURE(ta);
      CAPTURE(tb);
      // Overwrite: c starts as garbage that must not leak into the result.
      std::vector<T> c(c0.size(), T(-12345));
      gemm(m, n, k, a.data(), ta == 1, b.data(), tb == 1, c.data(), false);
      CHECK(c == exact_gemm(m, n, k, a, ta == 1, b, tb == 1, zero));
      std::vector<T> acc = c0;
      gemm(m, n, k, a.data(), ta == 1, b.data(), tb == 1, acc.data(), true);
      CHECK(acc == exact_gemm(m, n, k, a, ta == 1, b, tb == 1, c0));
    }
}

TEST_CASE("kernels: gemm past the library's blocking equals exact integer products" *
          doctest::test_suite("independent")) {
  // |a| <= 6, |b| <= 5, k = 700: a sum's magnitude is at most 700 * 30 = 21,000 (plus 100 from
  // c), exact in float (2^24 ~ 1.7e7). k = 700 runs past OpenBLAS's block of k (a few hundred),
  // so accumulate also covers the partial sums added into c block by block; m = 131 and n = 67
  // leave edges that the full-width micro-kernels do not cover.
  check_gemm_exact<float>(131, 67, 700);
  check_gemm_exact<double>(131, 67, 700);
  // A single row and a single column: BLAS may route these through its matrix-vector code.
  check_gemm_exact<float>(1, 37, 50);
  check_gemm_exact<double>(29, 1, 50);
}

TEST_CASE("kernels: gemm with nothing to sum over or nothing to write" *
          doctest::test_suite("independent")) {
  // k = 0: op(a)·op(b) is the zero matrix, so c becomes 0, or keeps its values under accumulate.
  Vec c = {1, 2, 3, 4, 5, 6};
  const Vec none;
  gemm(2, 3, 0, none.data(), false, none.data(), false, c.data(), true);
  CHECK(c == Vec{1, 2, 3, 4, 5, 6});
  gemm(2, 3, 0, none.data(), true, none.data(), true, c.data(), false);
  CHECK(c == Vec{0, 0, 0, 0, 0, 0});
  // m = 0 or n = 0 (an expert the routing left without rows): c is untouched.
  Vec d = {7};
  const Vec a = {1, 2}, b = {3, 4};
  gemm(0, 1, 2, a.data(), false, b.data(), false, d.data(), false);
  gemm(1, 0, 2, a.data(), false, b.data(), false, d.data(), false);
  CHECK(d == Vec{7});
}

TEST_CASE("kernels: gemm called by several threads at once gives every thread its exact product" *
          doctest::test_suite("independent")) {
  // The ranks of the CPU executor are threads that multiply at the same time. A BLAS build
  // without locking around its scratch buffers can give two calls that start at the same moment
  // the same buffer, and both products come out wrong. The threads meet before each call at a
  // barrier that releases them together (a spin: a futex wake-up would stagger them by
  // microseconds); each has its own operands, and every product must equal its exact integer
  // value (bounds as in the test above: 64 * 30 = 1,920). A race shows only when two threads run
  // at once, so a pass is evidence, not proof: with its flavour check taken out, Debian's serial
  // OpenBLAS (which has this fault) failed this test in 2 of 8 runs on a shared two-core machine,
  // and a stand-alone program doing the same in about half its runs (up to 100 wrong products in
  // 10,000 calls). gemm now refuses that flavour before its first product, which fails this test
  // at the call made alone below.
  constexpr int rounds = 5000, m = 48, n = 40, k = 64;
  const int threads = std::clamp(static_cast<int>(std::thread::hardware_concurrency()), 2, 4);
  std::vector<std::vector<double>> as, bs, expect;
  for (int t = 0; t < threads; ++t) {
    const auto ut = static_cast<std::uint64_t>(t);
    as.push_back(small_ints<double>(m * k, 400 + 2 * ut, 6, 6));
    bs.push_back(small_ints<double>(k * n, 401 + 2 * ut, 5, 5));
    expect.push_back(exact_gemm(m, n, k, as.back(), false, bs.back(), false, Vec(m * n, 0.0)));
  }
  // One call alone first, on this thread.
  Vec alone(m * n);
  gemm(m, n, k, as[0].data(), false, bs[0].data(), false, alone.data(), false);
  REQUIRE(alone == expect[0]);
  std::vector<int> wrong(static_cast<std::size_t>(threads), 0);
  std::atomic<int> arrived{0}, generation{0};
  const auto together = [&] {
    const int g = generation.load();
    if (arrived.fetch_add(1) + 1 == threads) {
      arrived.store(0);
      generation.store(g + 1);
    } else {
      while (generation.load() == g)
        std::this_thread::yield();
    }
  };
  {
    std::vector<std::jthread> pool;
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        const auto ut = static_cast<std::size_t>(t);
        Vec c(m * n);
        for (int r = 0; r < rounds; ++r) {
          together();
          gemm(m, n, k, as[ut].data(), false, bs[ut].data(), false, c.data(), false);
          wrong[ut] += c == expect[ut] ? 0 : 1;
        }
      });
  }
  for (int t = 0; t < threads; ++t) {
    CAPTURE(t);
    CHECK(wrong[static_cast<std::size_t>(t)] == 0);
  }
}

TEST_CASE("kernels: rmsnorm of one row by hand" * doctest::test_suite("independent")) {
  // x = [1,2,3,4], eps = 0.5: mean(x^2) + eps = 30/4 + 0.5 = 8, rstd = 1/sqrt(8);
  // w = [1,1,2,0.5] -> y = [1, 2, 6, 2] / sqrt(8).
  const Vec x = {1, 2, 3, 4}, w = {1, 1, 2, 0.5};
  Vec y(4), rstd(1);
  rmsnorm_fwd(1, 4, x.data(), w.data(), 0.5, y.data(), rstd.data());
  const double r = 1 / std::sqrt(8.0);
  CHECK(rstd[0] == mop::test::rel(r, 1e-15));
  const Vec expect = {r, 2 * r, 6 * r, 2 * r};
  for (int j = 0; j < 4; ++j)
    CHECK(y[j] == mop::test::rel(expect[j], 1e-15));
}

TEST_CASE("kernels: rmsnorm backward matches finite differences and accumulates dw" *
          doctest::test_suite("independent")) {
  const int rows = 3, dim = 6;
  const double eps = 1e-3;
  Vec x = randn(rows * dim, 10), w = randn(dim, 11);
  const Vec dy = randn(rows * dim, 12);
  const auto loss = [&] {
    Vec y(rows * dim), rs(rows);
    rmsnorm_fwd(rows, dim, x.data(), w.data(), eps, y.data(), rs.data());
    return weighted_sum(y, dy);
  };
  Vec y(rows * dim), rs(rows), dx(rows * dim, 99.0), dw(dim, 0.0);
  rmsnorm_fwd(rows, dim, x.data(), w.data(), eps, y.data(), rs.data());
  rmsnorm_bwd(rows, dim, x.data(), w.data(), rs.data(), dy.data(), dx.data(), dw.data());
  check_grad(dx, loss, x);
  check_grad(dw, loss, w);
  // dw is accumulated: a second call adds the same amount again.
  Vec dw2 = dw;
  rmsnorm_bwd(rows, dim, x.data(), w.data(), rs.data(), dy.data(), dx.data(), dw2.data());
  for (int j = 0; j < dim; ++j)
    CHECK(dw2[j] == mop::test::rel(2 * dw[j], 1e-14));
}

TEST_CASE("kernels: rope rotates one pair by a hand-computed angle and inverse undoes it" *
          doctest::test_suite("independent")) {
  // head_dim 4, theta 10000: pair i rotates by position * 10000^(-2i/4); pair 1 at position 3
  // turns by 3 * 10000^(-1/2) = 0.03 rad, pair 0 by 3 rad. Pairs are (x0, x2) and (x1, x3).
  Vec x = {0.5, 1.0, -0.25, 2.0};
  const std::int64_t pos = 3;
  rope(1, 1, 4, &pos, 10000.0, x.data(), false);
  CHECK(x[1] == mop::test::rel(1.0 * std::cos(0.03) - 2.0 * std::sin(0.03), 1e-14));
  CHECK(x[3] == mop::test::rel(2.0 * std::cos(0.03) + 1.0 * std::sin(0.03), 1e-14));
  CHECK(x[0] == mop::test::rel(0.5 * std::cos(3.0) + 0.25 * std::sin(3.0), 1e-14));
  CHECK(x[2] == mop::test::rel(-0.25 * std::cos(3.0) + 0.5 * std::sin(3.0), 1e-14));

  const int tokens = 5, heads = 3, hd = 8;
  const Vec orig = randn(tokens * heads * hd, 20);
  Vec y = orig;
  const std::vector<std::int64_t> positions = {0, 7, 100, 4095, 3};
  rope(tokens, heads, hd, positions.data(), 500000.0, y.data(), false);
  CHECK(rel_err(y, orig) > 0.1); // it did rotate
  rope(tokens, heads, hd, positions.data(), 500000.0, y.data(), true);
  CHECK(rel_err(y, orig) < 1e-14);
}

TEST_CASE("kernels: rope backward (the inverse rotation) matches finite differences" *
          doctest::test_suite("independent")) {
  const int tokens = 4, heads = 2, hd = 6;
  const std::vector<std::int64_t> positions = {0, 1, 9, 30};
  Vec x = randn(tokens * heads * hd, 30);
  const Vec w = randn(x.size(), 31);
  const auto loss = [&] {
    Vec y = x;
    rope(tokens, heads, hd, positions.data(), 10000.0, y.data(), false);
    return weighted_sum(y, w);
  };
  Vec g = w;
  rope(tokens, heads, hd, positions.data(), 10000.0, g.data(), true);
  check_grad(g, loss, x);
}

TEST_CASE("kernels: swiglu value by hand and backward against finite differences" *
          doctest::test_suite("independent")) {
  // silu(1) * 2 = 2 / (1 + e^-1); silu(-2) * 0.5 = -1 / (1 + e^2).
  const Vec g1 = {1.0, -2.0}, u1 = {2.0, 0.5};
  Vec o1(2);
  swiglu_fwd(2, g1.data(), u1.data(), o1.data());
  CHECK(o1[0] == mop::test::rel(2 / (1 + std::exp(-1.0)), 1e-15));
  CHECK(o1[1] == mop::test::rel(-1 / (1 + std::exp(2.0)), 1e-15));

  const std::size_t n = 12;
  Vec gate = randn(n, 40, 2.0), up = randn(n, 41);
  const Vec w = randn(n, 42);
  const auto loss = [&] {
    Vec out(n);
    swiglu_fwd(n, gate.data(), up.data(), out.data());
    return weighted_sum(out, w);
  };
  Vec dg(n), du(n);
  swiglu_bwd(n, gate.data(), up.data(), w.data(), dg.data(), du.data());
  check_grad(dg, loss, gate);
  check_grad(du, loss, up);
}

namespace {

struct AttnCase {
  AttentionParams p;
  int tq = 0, tk = 0;
  std::vector<std::int64_t> q_pos, k_pos;
};

struct AttnData {
  Vec q, k, v;
};

AttnData attn_inputs(const AttnCase& c, std::uint64_t seed) {
  const auto nq = static_cast<std::size_t>(c.tq * c.p.heads);
  const auto nk = static_cast<std::size_t>(c.tk * c.p.kv_heads);
  return {randn(nq * c.p.qk_dim, seed), randn(nk * c.p.qk_dim, seed + 1),
          randn(nk * c.p.v_dim, seed + 2)};
}

void attn_fwd(const AttnCase& c, const AttnData& d, Vec& out, Vec& lse) {
  out.assign(static_cast<std::size_t>(c.tq * c.p.heads * c.p.v_dim), 0.0);
  lse.assign(static_cast<std::size_t>(c.tq * c.p.heads), 0.0);
  attention_fwd(c.p, c.tq, c.tk, d.q.data(), d.k.data(), d.v.data(), c.q_pos.data(), c.k_pos.data(),
                out.data(), lse.data());
}

void check_attention_grads(const AttnCase& c) {
  AttnData d = attn_inputs(c, 50);
  const Vec w = randn(static_cast<std::size_t>(c.tq * c.p.heads * c.p.v_dim), 53);
  const auto loss = [&] {
    Vec out, lse;
    attn_fwd(c, d, out, lse);
    return weighted_sum(out, w);
  };
  Vec out, lse;
  attn_fwd(c, d, out, lse);
  Vec dq(d.q.size(), 0.0), dk(d.k.size(), 0.0), dv(d.v.size(), 0.0);
  attention_bwd(c.p, c.tq, c.tk, d.q.data(), d.k.data(), d.v.data(), c.q_pos.data(), c.k_pos.data(),
                out.data(), lse.data(), w.data(), dq.data(), dk.data(), dv.data());
  check_grad(dq, loss, d.q);
  check_grad(dk, loss, d.k);
  check_grad(dv, loss, d.v);
}

AttnCase make_case(int heads, int kv_heads, bool causal, std::int64_t window, int tq, int tk,
                   std::int64_t q_first, std::int64_t k_first) {
  AttnCase c;
  c.p.heads = heads;
  c.p.kv_heads = kv_heads;
  c.p.qk_dim = 4;
  c.p.v_dim = 3; // unequal to qk_dim so a mixed-up stride shows
  c.p.causal = causal;
  c.p.window = window;
  c.p.scale = 0.5;
  c.tq = tq;
  c.tk = tk;
  c.q_pos = iota_pos(tq, q_first);
  c.k_pos = iota_pos(tk, k_first);
  return c;
}

} // namespace

TEST_CASE("kernels: attention with equal scores averages the visible values by hand" *
          doctest::test_suite("independent")) {
  // q = 0 makes every score 0: out is the mean of the visible values and lse = ln(count).
  // Causal, window 2: query at position 2 sees keys 1 and 2; query at 0 sees key 0 only.
  AttnCase c = make_case(1, 1, true, 2, 2, 3, 0, 0);
  c.q_pos = {2, 0};
  AttnData d;
  d.q.assign(8, 0.0);
  d.k = randn(12, 60);
  d.v = {1, 2, 3, 10, 20, 30, 100, 200, 300};
  Vec out, lse;
  attn_fwd(c, d, out, lse);
  const Vec expect = {55, 110, 165, 1, 2, 3};
  for (int i = 0; i < 6; ++i)
    CHECK(out[i] == mop::test::rel(expect[i], 1e-14));
  CHECK(lse[0] == mop::test::rel(std::log(2.0), 1e-14));
  CHECK(lse[1] == 0.0);
}

TEST_CASE("kernels: query head h reads KV head h / (heads / kv_heads)" *
          doctest::test_suite("independent")) {
  // 4 query heads over 2 KV heads, one key: every query's softmax is 1 on that key, so query
  // heads 0 and 1 return the value of KV head 0 and heads 2 and 3 that of KV head 1.
  const AttnCase c = make_case(4, 2, true, 0, 1, 1, 0, 0);
  AttnData d = attn_inputs(c, 65);
  d.v = {1, 2, 3, 4, 5, 6};
  Vec out, lse;
  attn_fwd(c, d, out, lse);
  CHECK(out == Vec{1, 2, 3, 1, 2, 3, 4, 5, 6, 4, 5, 6});
}

TEST_CASE("kernels: attention backward matches finite differences with causal masking" *
          doctest::test_suite("independent")) {
  check_attention_grads(make_case(2, 2, true, 0, 5, 5, 0, 0));
}

TEST_CASE("kernels: attention backward matches finite differences with a sliding window" *
          doctest::test_suite("independent")) {
  check_attention_grads(make_case(2, 2, true, 3, 6, 6, 0, 0));
}

TEST_CASE("kernels: attention backward matches finite differences with grouped KV heads" *
          doctest::test_suite("independent")) {
  check_attention_grads(make_case(4, 2, true, 0, 4, 4, 0, 0));
  check_attention_grads(make_case(3, 1, false, 0, 3, 5, 0, 0));
}

TEST_CASE("kernels: a query that sees no key gives out 0 lse -inf and no gradient" *
          doctest::test_suite("independent")) {
  // Queries at positions 0..3, keys at 2..5 (a later block of a ring): queries 0 and 1 see none.
  const AttnCase c = make_case(2, 1, true, 0, 4, 4, 0, 2);
  const AttnData d = attn_inputs(c, 70);
  Vec out, lse;
  attn_fwd(c, d, out, lse);
  for (int r = 0; r < 2 * c.p.heads; ++r) {
    CHECK(lse[r] == kNegInf);
    for (int j = 0; j < c.p.v_dim; ++j)
      CHECK(out[r * c.p.v_dim + j] == 0.0);
  }
  for (int r = 2 * c.p.heads; r < 4 * c.p.heads; ++r)
    CHECK(std::isfinite(lse[r]));
  Vec dq(d.q.size(), 0.0), dk(d.k.size(), 0.0), dv(d.v.size(), 0.0);
  const Vec dout = randn(out.size(), 71);
  attention_bwd(c.p, c.tq, c.tk, d.q.data(), d.k.data(), d.v.data(), c.q_pos.data(), c.k_pos.data(),
                out.data(), lse.data(), dout.data(), dq.data(), dk.data(), dv.data());
  for (int j = 0; j < 2 * c.p.heads * c.p.qk_dim; ++j)
    CHECK(dq[j] == 0.0);
  check_attention_grads(c);
}

TEST_CASE("kernels: attention_merge of two key halves equals attention over all keys" *
          doctest::test_suite("independent")) {
  // Queries at 0..7, keys at 2..9 split into 2..5 and 6..9, causal with window 3: queries 0 and
  // 1 see no key in either half, queries 2..5 none in the second half, and query 7 only key 5
  // of the first half.
  const AttnCase all = make_case(4, 2, true, 3, 8, 8, 0, 2);
  const AttnData d = attn_inputs(all, 80);
  Vec out, lse;
  attn_fwd(all, d, out, lse);

  AttnCase half = all;
  half.tk = 4;
  const auto kq = static_cast<std::size_t>(4 * all.p.kv_heads * all.p.qk_dim);
  const auto kv = static_cast<std::size_t>(4 * all.p.kv_heads * all.p.v_dim);
  Vec out_a, lse_a, out_b, lse_b;
  AttnData da{d.q, Vec(d.k.begin(), d.k.begin() + kq), Vec(d.v.begin(), d.v.begin() + kv)};
  half.k_pos = {2, 3, 4, 5};
  attn_fwd(half, da, out_a, lse_a);
  AttnData db{d.q, Vec(d.k.begin() + kq, d.k.end()), Vec(d.v.begin() + kv, d.v.end())};
  half.k_pos = {6, 7, 8, 9};
  attn_fwd(half, db, out_b, lse_b);
  attention_merge(all.tq, all.p.heads, all.p.v_dim, out_a.data(), lse_a.data(), out_b.data(),
                  lse_b.data());
  CHECK(rel_err(out_a, out) < 1e-14);
  for (std::size_t r = 0; r < lse.size(); ++r) {
    if (lse[r] == kNegInf)
      CHECK(lse_a[r] == kNegInf);
    else
      CHECK(lse_a[r] == mop::test::rel(lse[r], 1e-14));
  }
  CHECK(lse[0] == kNegInf); // the both-empty case is exercised
}

TEST_CASE("kernels: ring-style attention backward over two key blocks sums to one block" *
          doctest::test_suite("independent")) {
  const AttnCase all = make_case(4, 2, true, 0, 6, 6, 0, 0);
  const AttnData d = attn_inputs(all, 90);
  Vec out, lse;
  attn_fwd(all, d, out, lse);
  const Vec dout = randn(out.size(), 91);
  Vec dq(d.q.size(), 0.0), dk(d.k.size(), 0.0), dv(d.v.size(), 0.0);
  attention_bwd(all.p, all.tq, all.tk, d.q.data(), d.k.data(), d.v.data(), all.q_pos.data(),
                all.k_pos.data(), out.data(), lse.data(), dout.data(), dq.data(), dk.data(),
                dv.data());

  // Blocks of keys 0..2 and 3..5, each given the final out and lse over all keys; dq sums
  // over the blocks (accumulated), dk and dv are per block.
  const auto kq = static_cast<std::size_t>(3 * all.p.kv_heads * all.p.qk_dim);
  const auto kv = static_cast<std::size_t>(3 * all.p.kv_heads * all.p.v_dim);
  Vec rq(d.q.size(), 0.0), rk(d.k.size(), 0.0), rv(d.v.size(), 0.0);
  for (int blk = 0; blk < 2; ++blk) {
    const auto pos = iota_pos(3, 3 * blk);
    attention_bwd(all.p, all.tq, 3, d.q.data(), d.k.data() + blk * kq, d.v.data() + blk * kv,
                  all.q_pos.data(), pos.data(), out.data(), lse.data(), dout.data(), rq.data(),
                  rk.data() + blk * kq, rv.data() + blk * kv);
  }
  CHECK(rel_err(rq, dq) < 1e-14);
  CHECK(rel_err(rk, dk) < 1e-14);
  CHECK(rel_err(rv, dv) < 1e-14);
}

TEST_CASE("kernels: cross_entropy over a 3-token vocabulary by hand with an ignored label" *
          doctest::test_suite("independent")) {
  // Row 0: logits [0, ln 2, ln 3] -> softmax [1/6, 2/6, 3/6], label 2: loss ln 2.
  // Row 1: label -1: no loss, zero gradient. Row 2: [1, 1, 1], label 0: loss ln 3.
  const double l2 = std::log(2.0), l3 = std::log(3.0);
  const Vec logits = {0, l2, l3, 5, -5, 0, 1, 1, 1};
  const std::vector<std::int32_t> labels = {2, -1, 0};
  Vec dl(9, 7.0);
  const double loss = cross_entropy(3, 3, logits.data(), labels.data(), 0.5, dl.data());
  CHECK(loss == mop::test::rel(l2 + l3, 1e-15));
  const Vec expect = {0.5 / 6, 0.5 * 2 / 6, 0.5 * (3.0 / 6 - 1), 0, 0, 0, 0.5 * (1.0 / 3 - 1),
                      0.5 / 3, 0.5 / 3};
  for (int i = 0; i < 9; ++i) {
    CAPTURE(i);
    if (expect[i] == 0)
      CHECK(dl[i] == 0); // the ignored row
    else
      CHECK(dl[i] == mop::test::rel(expect[i], 1e-15));
  }
  CHECK(cross_entropy(3, 3, logits.data(), labels.data(), 1.0, static_cast<double*>(nullptr)) ==
        mop::test::rel(l2 + l3, 1e-15));
}

TEST_CASE("kernels: cross_entropy gradient matches finite differences" *
          doctest::test_suite("independent")) {
  const int rows = 4, vocab = 7;
  Vec logits = randn(rows * vocab, 100, 3.0);
  const std::vector<std::int32_t> labels = {3, -1, 0, 6};
  const double scale = 0.25;
  const auto loss = [&] {
    return scale * cross_entropy(rows, vocab, logits.data(), labels.data(), 1.0,
                                 static_cast<double*>(nullptr));
  };
  Vec dl(logits.size());
  cross_entropy(rows, vocab, logits.data(), labels.data(), scale, dl.data());
  check_grad(dl, loss, logits);
}

TEST_CASE("kernels: router_topk picks the largest probabilities with ties to the lower index" *
          doctest::test_suite("independent")) {
  // logits [0, ln 3, ln 3, ln 2] -> probs [1, 3, 3, 2] / 9; top-2 = experts 1 then 2 (tie).
  const Vec logits = {0, std::log(3.0), std::log(3.0), std::log(2.0)};
  Vec probs(4), w(2);
  std::vector<std::int32_t> idx(2);
  router_topk_fwd(1, 4, 2, false, logits.data(), probs.data(), idx.data(), w.data());
  CHECK(idx == std::vector<std::int32_t>{1, 2});
  CHECK(probs[0] == mop::test::rel(1.0 / 9, 1e-15));
  CHECK(probs[3] == mop::test::rel(2.0 / 9, 1e-15));
  CHECK(w[0] == mop::test::rel(3.0 / 9, 1e-15));
  CHECK(w[1] == mop::test::rel(3.0 / 9, 1e-15));
  // Normalised: both weights become (3/9) / (6/9) = 1/2.
  router_topk_fwd(1, 4, 2, true, logits.data(), probs.data(), idx.data(), w.data());
  CHECK(idx == std::vector<std::int32_t>{1, 2});
  CHECK(w[0] == mop::test::rel(0.5, 1e-15));
  CHECK(w[1] == mop::test::rel(0.5, 1e-15));
  // k = 3 takes expert 3 (probability 2/9) third; normalised weights 3/8, 3/8, 2/8.
  Vec w3(3);
  std::vector<std::int32_t> idx3(3);
  router_topk_fwd(1, 4, 3, true, logits.data(), probs.data(), idx3.data(), w3.data());
  CHECK(idx3 == std::vector<std::int32_t>{1, 2, 3});
  CHECK(w3[2] == mop::test::rel(0.25, 1e-15));
}

TEST_CASE("kernels: router_topk backward matches finite differences with and without "
          "normalisation" *
          doctest::test_suite("independent")) {
  // Logits spaced 0.7 apart (then shuffled per row) with noise of 0.01: the top-k choice changes
  // only if a logit moves by about 0.68, far beyond the step 1e-5.
  const int rows = 3, experts = 6, k = 2;
  Vec logits(rows * experts);
  const Vec noise = randn(logits.size(), 110, 0.01);
  const int perm[3][6] = {{2, 5, 0, 3, 1, 4}, {5, 4, 3, 2, 1, 0}, {0, 3, 5, 1, 4, 2}};
  for (int r = 0; r < rows; ++r)
    for (int e = 0; e < experts; ++e)
      logits[r * experts + e] = 0.7 * perm[r][e] + noise[r * experts + e];
  const Vec w = randn(rows * k, 111);
  for (bool normalize : {false, true}) {
    CAPTURE(normalize);
    const auto run = [&](Vec& probs, std::vector<std::int32_t>& idx, Vec& weights) {
      probs.assign(logits.size(), 0.0);
      idx.assign(rows * k, 0);
      weights.assign(rows * k, 0.0);
      router_topk_fwd(rows, experts, k, normalize, logits.data(), probs.data(), idx.data(),
                      weights.data());
    };
    const auto loss = [&] {
      Vec probs, weights;
      std::vector<std::int32_t> idx;
      run(probs, idx, weights);
      return weighted_sum(weights, w);
    };
    Vec probs, weights, dl(logits.size());
    std::vector<std::int32_t> idx;
    run(probs, idx, weights);
    CHECK(idx == std::vector<std::int32_t>{1, 5, 0, 1, 2, 4});
    router_topk_bwd(rows, experts, k, normalize, probs.data(), idx.data(), w.data(), dl.data());
    check_grad(dl, loss, logits);
  }
}

TEST_CASE("kernels: gather_rows then scatter_add_rows is the adjoint pair" *
          doctest::test_suite("independent")) {
  // Gather rows [2, 0, 2] of a 3x2 source; the gradient of sum(gathered * w) wrt the source is
  // the scatter-add of w, which adds both copies of row 2.
  Vec src = {1, 2, 3, 4, 5, 6};
  const std::vector<std::int32_t> index = {2, 0, 2};
  Vec dst(6);
  gather_rows(3, 2, src.data(), index.data(), dst.data());
  CHECK(dst == Vec{5, 6, 1, 2, 5, 6});
  const Vec w = {0.5, -1, 2, 3, 0.25, 4};
  Vec g(6, 0.0);
  scatter_add_rows(3, 2, w.data(), index.data(), g.data());
  CHECK(g == Vec{2, 3, 0, 0, 0.75, 3});
  const auto loss = [&] {
    Vec out(6);
    gather_rows(3, 2, src.data(), index.data(), out.data());
    return weighted_sum(out, w);
  };
  check_grad(g, loss, src);
}

TEST_CASE("kernels: adamw two steps by hand" * doctest::test_suite("independent")) {
  // lr 0.1, betas (0.9, 0.95), eps 1e-8, weight decay 0.1; p = 1, gradients 0.5 then -0.25.
  AdamWParams hp;
  hp.lr = 0.1;
  hp.beta1 = 0.9;
  hp.beta2 = 0.95;
  hp.eps = 1e-8;
  hp.weight_decay = 0.1;
  double p = 1, m = 0, v = 0;
  double g = 0.5;
  adamw(1, hp, 1, &p, &g, &m, &v);
  // Step 1: p = 1 - 0.1*0.1*1 = 0.99; m = 0.1*0.5 = 0.05; v = 0.05*0.25 = 0.0125;
  // mhat = 0.05/(1-0.9) = 0.5; vhat = 0.0125/(1-0.95) = 0.25; p = 0.99 - 0.1*0.5/(0.5+1e-8).
  const double p1 = 0.99 - 0.1 * 0.5 / (0.5 + 1e-8);
  CHECK(m == mop::test::rel(0.05, 1e-14));
  CHECK(v == mop::test::rel(0.0125, 1e-14));
  CHECK(p == mop::test::rel(p1, 1e-14));
  g = -0.25;
  adamw(1, hp, 2, &p, &g, &m, &v);
  // Step 2: p = p1 * (1 - 0.01); m = 0.9*0.05 - 0.1*0.25 = 0.02;
  // v = 0.95*0.0125 + 0.05*0.0625 = 0.015; mhat = 0.02/(1-0.81) = 0.02/0.19;
  // vhat = 0.015/(1-0.9025) = 0.015/0.0975.
  const double p2 = p1 * 0.99 - 0.1 * (0.02 / 0.19) / (std::sqrt(0.015 / 0.0975) + 1e-8);
  CHECK(m == mop::test::rel(0.02, 1e-14));
  CHECK(v == mop::test::rel(0.015, 1e-14));
  CHECK(p == mop::test::rel(p2, 1e-14));
}

TEST_CASE("kernels: float results agree with double within 1e-5" *
          doctest::test_suite("independent")) {
  // The float kernels round each operation to 2^-24 ~ 6e-8 relative; the longest sums here run
  // over at most 8 terms of magnitude comparable to the result's largest component, so the
  // norm-wise error stays within a few times 8 * 6e-8 ~ 5e-7: 1e-5 leaves a factor 20.
  const int m = 5, n = 6, k = 8;
  const Vec a = randn(m * k, 200), b = randn(k * n, 201);
  Vec c(m * n);
  std::vector<float> cf(m * n);
  gemm(m, n, k, a.data(), false, b.data(), true, c.data(), false);
  gemm(m, n, k, to_float(a).data(), false, to_float(b).data(), true, cf.data(), false);
  CHECK(float_err(cf, c) < 1e-5);

  const Vec w = randn(k, 202), dy = randn(m * k, 203);
  Vec y(m * k), rs(m), dx(m * k), dw(k, 0.0);
  std::vector<float> yf(m * k), rsf(m), dxf(m * k), dwf(k, 0.0f);
  rmsnorm_fwd(m, k, a.data(), w.data(), 1e-6, y.data(), rs.data());
  rmsnorm_bwd(m, k, a.data(), w.data(), rs.data(), dy.data(), dx.data(), dw.data());
  rmsnorm_fwd(m, k, to_float(a).data(), to_float(w).data(), 1e-6, yf.data(), rsf.data());
  rmsnorm_bwd(m, k, to_float(a).data(), to_float(w).data(), rsf.data(), to_float(dy).data(),
              dxf.data(), dwf.data());
  CHECK(float_err(yf, y) < 1e-5);
  CHECK(float_err(dxf, dx) < 1e-5);
  CHECK(float_err(dwf, dw) < 1e-5);

  const std::vector<std::int64_t> positions = {0, 3, 17, 100, 511};
  Vec r = a;
  std::vector<float> rf = to_float(a);
  rope(5, 1, 8, positions.data(), 10000.0, r.data(), false);
  rope(5, 1, 8, positions.data(), 10000.0, rf.data(), false);
  CHECK(float_err(rf, r) < 1e-5);

  Vec sw(a.size()), dg(a.size()), du(a.size());
  std::vector<float> swf(a.size()), dgf(a.size()), duf(a.size());
  swiglu_fwd(a.size(), a.data(), dy.data(), sw.data());
  swiglu_bwd(a.size(), a.data(), dy.data(), dx.data(), dg.data(), du.data());
  swiglu_fwd(a.size(), to_float(a).data(), to_float(dy).data(), swf.data());
  swiglu_bwd(a.size(), to_float(a).data(), to_float(dy).data(), to_float(dx).data(), dgf.data(),
             duf.data());
  CHECK(float_err(swf, sw) < 1e-5);
  CHECK(float_err(dgf, dg) < 1e-5);
  CHECK(float_err(duf, du) < 1e-5);

  const AttnCase ac = make_case(4, 2, true, 3, 6, 6, 0, 0);
  const AttnData d = attn_inputs(ac, 210);
  Vec out, lse;
  attn_fwd(ac, d, out, lse);
  const Vec dout = randn(out.size(), 211);
  Vec dq(d.q.size(), 0.0), dk(d.k.size(), 0.0), dv(d.v.size(), 0.0);
  attention_bwd(ac.p, ac.tq, ac.tk, d.q.data(), d.k.data(), d.v.data(), ac.q_pos.data(),
                ac.k_pos.data(), out.data(), lse.data(), dout.data(), dq.data(), dk.data(),
                dv.data());
  const auto qf = to_float(d.q), kf = to_float(d.k), vf = to_float(d.v), doutf = to_float(dout);
  std::vector<float> outf(out.size()), lsef(lse.size()), dqf(dq.size(), 0.0f), dkf(dk.size(), 0.0f),
      dvf(dv.size(), 0.0f);
  attention_fwd(ac.p, ac.tq, ac.tk, qf.data(), kf.data(), vf.data(), ac.q_pos.data(),
                ac.k_pos.data(), outf.data(), lsef.data());
  attention_bwd(ac.p, ac.tq, ac.tk, qf.data(), kf.data(), vf.data(), ac.q_pos.data(),
                ac.k_pos.data(), outf.data(), lsef.data(), doutf.data(), dqf.data(), dkf.data(),
                dvf.data());
  CHECK(float_err(outf, out) < 1e-5);
  CHECK(float_err(lsef, lse) < 1e-5);
  CHECK(float_err(dqf, dq) < 1e-5);
  CHECK(float_err(dkf, dk) < 1e-5);
  CHECK(float_err(dvf, dv) < 1e-5);

  const std::vector<std::int32_t> labels = {1, -1, 7, 0, 3};
  Vec dl(a.size());
  std::vector<float> dlf(a.size());
  const double ce = cross_entropy(m, k, a.data(), labels.data(), 0.2, dl.data());
  const double cef = cross_entropy(m, k, to_float(a).data(), labels.data(), 0.2, dlf.data());
  CHECK(cef == mop::test::rel(ce, 1e-5));
  CHECK(float_err(dlf, dl) < 1e-5);

  Vec probs(a.size()), rw(m * 2), dlog(a.size());
  std::vector<float> probsf(a.size()), rwf(m * 2), dlogf(a.size());
  std::vector<std::int32_t> idx(m * 2), idxf(m * 2);
  const Vec drw = randn(m * 2, 212);
  router_topk_fwd(m, k, 2, true, a.data(), probs.data(), idx.data(), rw.data());
  router_topk_bwd(m, k, 2, true, probs.data(), idx.data(), drw.data(), dlog.data());
  router_topk_fwd(m, k, 2, true, to_float(a).data(), probsf.data(), idxf.data(), rwf.data());
  router_topk_bwd(m, k, 2, true, probsf.data(), idxf.data(), to_float(drw).data(), dlogf.data());
  CHECK(idxf == idx);
  CHECK(float_err(probsf, probs) < 1e-5);
  CHECK(float_err(rwf, rw) < 1e-5);
  CHECK(float_err(dlogf, dlog) < 1e-5);

  Vec p = a, mo(a.size(), 0.0), ve(a.size(), 0.0);
  std::vector<float> pf = to_float(a), mof(a.size(), 0.0f), vef(a.size(), 0.0f);
  const AdamWParams hp;
  for (std::int64_t step = 1; step <= 3; ++step) {
    adamw(a.size(), hp, step, p.data(), dy.data(), mo.data(), ve.data());
    adamw(a.size(), hp, step, pf.data(), to_float(dy).data(), mof.data(), vef.data());
  }
  CHECK(float_err(pf, p) < 1e-5);
}

} // namespace real_backend_cpu_kernels_test
