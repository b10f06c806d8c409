// The CUDA elementwise and row kernels against their CPU twins (real_backend/cpu/kernels.hpp) on
// the same random float inputs. Without a GPU each test that needs one is skipped (the program
// exits with 77; ctest shows "Skipped").
//
// Tolerance. The two sides run the same formulas (real_backend/kernels/math.hpp) in float but
// are not bit-identical: nvcc contracts a * b + c into one fused multiply-add (one rounding
// instead of two), and the device's expf is accurate to 2 ulp where glibc's is under 1 ulp
// (CUDA C++ Programming Guide, "Mathematical Functions": single-precision expf 2 ulp; sqrtf and
// division are correctly rounded without --use_fast_math, which the build does not use). Each
// output is a few such operations on O(1) values, so the two sides differ by a few units of
// roundoff u = 2^-24 ~ 6e-8 of the largest intermediate, which for these inputs is of the order
// of the largest output. The check is norm-wise, max|gpu - cpu| <= kTol * max|cpu|, so that an
// output near zero by cancellation (swiglu's dgate where 1 + x (1 - s) ~ 0, a rotated pair) is
// held to the array's scale, not its own; kTol = 1e-5 is about 170 u, a wide margin over those
// few ulps, and far below what a wrong index or a missing term causes (1e-2 and up).
// The one reordered reduction, the row sum of rmsnorm_bwd (sequential on the CPU, a tree on the
// device), gets the worst-case bound of summation instead (see rmsnorm_bwd_sum_tolerance).
#include "real_backend/cuda/elementwise.hpp"

#include "real_backend/cpu/kernels.hpp"
#include "real_backend/cpu/tiny_model.hpp"
#include "real_backend/cuda/device_probe.hpp"
#include "tests/real_backend/cuda/gpu.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <doctest/doctest.h>
#include <stdexcept>
#include <vector>

using namespace mop::real;

namespace {

using Vec = std::vector<float>;
constexpr double kTol = 1e-5;
constexpr double kRoundoff = 0x1.0p-24; // u of float

bool gpu_present() {
  if (mop::test::gpu_or_skip())
    return true;
  CHECK(!mop::test::no_gpu_reason().empty());
  return false;
}

Vec randn(std::size_t n, std::uint64_t seed, double scale = 1.0) {
  Vec v(n);
  for (std::size_t i = 0; i < n; ++i)
    v[i] = static_cast<float>(scale * standard_normal(mix64(seed) + i));
  return v;
}

double max_abs(const Vec& v) {
  double m = 0;
  for (const float x : v)
    m = std::max(m, std::fabs(static_cast<double>(x)));
  return m;
}

double max_diff(const Vec& a, const Vec& b) {
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i)
    m = std::max(m, std::fabs(static_cast<double>(a[i]) - static_cast<double>(b[i])));
  return m;
}

// max|gpu - cpu| <= kTol * max|cpu| + extra (an absolute allowance for reordered sums).
void check_close(const Vec& gpu, const Vec& cpu, const char* what, double extra = 0) {
  REQUIRE(gpu.size() == cpu.size());
  const double diff = max_diff(gpu, cpu), scale = max_abs(cpu);
  INFO(what << ": max |gpu - cpu| = " << diff << ", max |cpu| = " << scale);
  CHECK(diff <= kTol * scale + extra);
}

} // namespace

TEST_CASE("CUDA swiglu_fwd and swiglu_bwd match their CPU twins" *
          doctest::test_suite("independent")) {
  if (!gpu_present())
    return;
  // Not a multiple of the block size, and spread (gate ~ 3 N(0,1)) over the saturated regions
  // of the sigmoid.
  const std::size_t n = 70001;
  const Vec gate = randn(n, 1, 3.0), up = randn(n, 2), dout = randn(n, 3);
  Vec out(n), dgate(n), dup(n);
  swiglu_fwd(n, gate.data(), up.data(), out.data());
  swiglu_bwd(n, gate.data(), up.data(), dout.data(), dgate.data(), dup.data());
  check_close(cuda::swiglu_fwd(gate, up), out, "out");
  Vec g_dgate, g_dup;
  cuda::swiglu_bwd(gate, up, dout, g_dgate, g_dup);
  check_close(g_dgate, dgate, "dgate");
  check_close(g_dup, dup, "dup");

  // Gates where exp(-x) overflows or underflows: silu is -0 or x, never NaN, on both sides.
  const Vec big_gate = {-100.0f, -30.0f, -10.0f, 10.0f, 30.0f, 100.0f};
  const Vec ones(big_gate.size(), 1.0f);
  Vec big_out(big_gate.size());
  swiglu_fwd(big_gate.size(), big_gate.data(), ones.data(), big_out.data());
  const Vec g_big_out = cuda::swiglu_fwd(big_gate, ones);
  for (const float y : g_big_out)
    CHECK(std::isfinite(y));
  check_close(g_big_out, big_out, "out at saturated gates");
}

TEST_CASE("CUDA rmsnorm_fwd and rmsnorm_bwd match their CPU twins" *
          doctest::test_suite("independent")) {
  if (!gpu_present())
    return;
  // dim 96 fits in one pass of a block; dim 1000 is neither a multiple of nor smaller than the
  // block of 256 threads, so each thread sums several strided elements.
  for (const int dim : {96, 1000}) {
    CAPTURE(dim);
    const int rows = 7;
    const std::size_t n = static_cast<std::size_t>(rows) * dim;
    const double eps = 1e-6;
    const Vec x = randn(n, 10), dy = randn(n, 11), dw0 = randn(static_cast<std::size_t>(dim), 12);
    Vec w = randn(static_cast<std::size_t>(dim), 13, 0.1);
    for (float& wi : w)
      wi += 1.0f;

    Vec y(n), rstd(static_cast<std::size_t>(rows));
    rmsnorm_fwd(rows, dim, x.data(), w.data(), eps, y.data(), rstd.data());
    Vec g_y, g_rstd;
    cuda::rmsnorm_fwd(rows, dim, x, w, eps, g_y, g_rstd);
    check_close(g_y, y, "y");
    check_close(g_rstd, rstd, "rstd");

    // Both backwards from the CPU's rstd, so they differ only by their own arithmetic.
    Vec dx(n), dw = dw0;
    rmsnorm_bwd(rows, dim, x.data(), w.data(), rstd.data(), dy.data(), dx.data(), dw.data());
    Vec g_dx, g_dw = dw0;
    cuda::rmsnorm_bwd(rows, dim, x, w, rstd, dy, g_dx, g_dw);

    // dx_j = r (dy_j w_j - x_j c) with c = r^2 s / dim and s = sum_i dy_i w_i x_i, summed in
    // float in a different order on each side. A float sum of n terms in any order is within
    // (n - 1) u sum|terms| of the exact sum (Higham, "Accuracy and Stability of Numerical
    // Algorithms", 2nd ed., 2002, eq. 4.4), so the two values of s are at most twice that
    // apart, and dx_j moves by r^3 |x_j| / dim times as much.
    double allowance = 0;
    for (int r = 0; r < rows; ++r) {
      double sum_abs = 0, max_x = 0;
      for (int j = 0; j < dim; ++j) {
        const std::size_t e = static_cast<std::size_t>(r) * dim + j;
        sum_abs += std::fabs(static_cast<double>(dy[e]) * w[static_cast<std::size_t>(j)] * x[e]);
        max_x = std::max(max_x, std::fabs(static_cast<double>(x[e])));
      }
      const double rs = rstd[static_cast<std::size_t>(r)];
      const double ds = 2.0 * (dim - 1) * kRoundoff * sum_abs;
      allowance = std::max(allowance, rs * rs * rs * max_x * ds / dim);
    }
    check_close(g_dx, dx, "dx", allowance);
    // dw: the same rows in the same order on both sides; dw0 != 0 checks that it accumulates.
    check_close(g_dw, dw, "dw");
  }
}

TEST_CASE("CUDA rope and its inverse match their CPU twins" * doctest::test_suite("independent")) {
  if (!gpu_present())
    return;
  const int tokens = 13, heads = 3, head_dim = 64;
  std::vector<std::int64_t> positions(static_cast<std::size_t>(tokens));
  // Position 0 (the identity), then large positions whose angles reach thousands of radians.
  for (std::size_t t = 0; t < positions.size(); ++t)
    positions[t] = t == 0 ? 0 : static_cast<std::int64_t>(mix64(t + 20) % 32768);
  const Vec x0 = randn(static_cast<std::size_t>(tokens) * heads * head_dim, 21);
  for (const double theta : {10000.0, 1000000.0})
    for (const bool inverse : {false, true}) {
      CAPTURE(theta);
      CAPTURE(inverse);
      Vec x = x0, g_x = x0;
      rope(tokens, heads, head_dim, positions.data(), theta, x.data(), inverse);
      cuda::rope(tokens, heads, head_dim, positions, theta, g_x, inverse);
      check_close(g_x, x, "x");
    }
}

TEST_CASE("CUDA adamw matches its CPU twin over several steps" *
          doctest::test_suite("independent")) {
  if (!gpu_present())
    return;
  const std::size_t n = 70001;
  AdamWParams p;
  p.lr = 1e-2; // large enough that the update shows at the tolerance of the parameters
  Vec param = randn(n, 30), m = randn(n, 31, 0.1), v = randn(n, 32, 0.1);
  for (float& vi : v)
    vi = vi * vi; // a second moment is not negative
  Vec g_param = param, g_m = m, g_v = v;
  for (std::int64_t step = 1; step <= 3; ++step) {
    CAPTURE(step);
    const Vec grad = randn(n, 40 + static_cast<std::uint64_t>(step));
    adamw(n, p, step, param.data(), grad.data(), m.data(), v.data());
    cuda::adamw(p, step, g_param, grad, g_m, g_v);
    check_close(g_param, param, "param");
    check_close(g_m, m, "m");
    check_close(g_v, v, "v");
  }
}

TEST_CASE("CUDA kernels reject inputs of inconsistent sizes" * doctest::test_suite("plumbing")) {
  // The checks run before any CUDA call, so this needs no GPU.
  const Vec a(4), b(5);
  CHECK_THROWS_AS(cuda::swiglu_fwd(a, b), std::invalid_argument);
  Vec y, rstd;
  CHECK_THROWS_AS(cuda::rmsnorm_fwd(2, 3, a, Vec(3), 1e-6, y, rstd), std::invalid_argument);
  Vec x(4);
  CHECK_THROWS_AS(cuda::rope(1, 1, 3, {0}, 1e4, x, false), std::invalid_argument);
}
