// The CUDA runtime pieces: library versions (no GPU needed) and cuBLASLt GEMM against its CPU
// twin real::gemm (OpenBLAS) on the same inputs, every transpose combination, FP32 and BF16.
//
// Tolerance. FP32 GEMM: both sides sum k products of O(1) values in float, in different orders
// (and cuBLASLt may use TF32-free FP32 FMA tiles), so each output differs by at most about
// k·u·max|a||b| (u = 2^-24) in the worst case; norm-wise kTolF32 = 1e-4 over k <= 320 is
// ~5x that bound. BF16: inputs are rounded to bfloat16 on the host before both sides see them,
// so the products are exact in FP32 and the only differences are the FP32 accumulation order and
// the final rounding of C to bfloat16 (relative 2^-8 ~ 3.9e-3): kTolBf16 = 8e-3 norm-wise.
#include "real_backend/cuda/runtime.hpp"

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

constexpr double kTolF32 = 1e-4;
constexpr double kTolBf16 = 8e-3;

std::uint16_t to_bf16(float x) { // round to nearest even
  std::uint32_t u = 0;
  std::memcpy(&u, &x, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>(u >> 16);
}
float from_bf16(std::uint16_t h) {
  const std::uint32_t u = std::uint32_t{h} << 16;
  float x = 0;
  std::memcpy(&x, &u, 4);
  return x;
}

std::vector<float> randn(std::size_t n, std::uint64_t seed) {
  std::vector<float> v(n);
  for (std::size_t i = 0; i < n; ++i)
    v[i] = static_cast<float>(standard_normal(mix64(seed) + i));
  return v;
}

double rel_max_diff(const std::vector<float>& got, const std::vector<float>& want) {
  double scale = 0, diff = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    scale = std::max(scale, static_cast<double>(std::abs(want[i])));
    diff = std::max(diff, static_cast<double>(std::abs(got[i] - want[i])));
  }
  return diff / std::max(scale, 1e-30);
}

} // namespace

TEST_CASE("the loaded CUDA libraries report their versions without a GPU" *
          doctest::test_suite("plumbing")) {
  const cuda::LibraryVersions v = cuda::library_versions();
  CHECK(v.runtime >= 12000);
  CHECK(v.cublaslt >= 120000);
  CHECK(v.cudnn >= 90000);
  CHECK(v.nccl >= 21800);
  CHECK(v.describe().find("cuBLASLt ") != std::string::npos);
}

TEST_CASE("cuBLASLt GEMM equals the CPU twin for every transpose, FP32 and BF16, and plans a "
          "shape once" *
          doctest::test_suite("independent")) {
  if (!mop::test::gpu_or_skip())
    return;
  const int m = 96, n = 80, k = 320;
  cuda::Stream stream;
  cuda::GemmRunner runner(stream.handle());
  for (const cuda::GemmType type : {cuda::GemmType::f32, cuda::GemmType::bf16})
    for (const bool ta : {false, true})
      for (const bool tb : {false, true})
        for (const bool acc : {false, true}) {
          CAPTURE(ta);
          CAPTURE(tb);
          CAPTURE(acc);
          const bool bf16 = type == cuda::GemmType::bf16;
          std::vector<float> a = randn(std::size_t(m) * k, 1), b = randn(std::size_t(k) * n, 2),
                             c = randn(std::size_t(m) * n, 3);
          const std::size_t el = bf16 ? 2 : 4;
          std::vector<std::uint16_t> ah(a.size()), bh(b.size()), ch(c.size());
          if (bf16) { // both sides see the same bfloat16 values
            for (std::size_t i = 0; i < a.size(); ++i)
              a[i] = from_bf16(ah[i] = to_bf16(a[i]));
            for (std::size_t i = 0; i < b.size(); ++i)
              b[i] = from_bf16(bh[i] = to_bf16(b[i]));
            for (std::size_t i = 0; i < c.size(); ++i)
              c[i] = from_bf16(ch[i] = to_bf16(c[i]));
          }
          cuda::DeviceBuffer da(a.size() * el), db(b.size() * el), dc(c.size() * el);
          da.upload(bf16 ? static_cast<const void*>(ah.data()) : a.data(), da.bytes());
          db.upload(bf16 ? static_cast<const void*>(bh.data()) : b.data(), db.bytes());
          dc.upload(bf16 ? static_cast<const void*>(ch.data()) : c.data(), dc.bytes());
          runner.run({m, n, k, ta, tb, type, acc}, da.data(), db.data(), dc.data());
          stream.synchronize();
          std::vector<float> got(c.size());
          if (bf16) {
            dc.download(ch.data(), dc.bytes());
            for (std::size_t i = 0; i < c.size(); ++i)
              got[i] = from_bf16(ch[i]);
          } else {
            dc.download(got.data(), dc.bytes());
          }
          // The CPU twin reads a as [k,m] when transposed: the same buffer, read that way.
          mop::real::gemm<float>(m, n, k, a.data(), ta, b.data(), tb, c.data(), acc);
          CHECK(rel_max_diff(got, c) <= (bf16 ? kTolBf16 : kTolF32));
        }
  CHECK(runner.planned_shapes() == 16);
}
