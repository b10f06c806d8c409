// How fast the CPU interpreter's GEMM runs on one core: mop::real::gemm<float> on the shapes the
// tiny models' steps are made of (a square projection, a tall grouped-expert block with a short k,
// and the backward's transposed operands). flops = 2·m·n·k per call, shown per second.
#include "real_backend/cpu/kernels.hpp"

#include <benchmark/benchmark.h>

#include <cstddef>
#include <vector>

namespace {

// Operands filled with small values that vary along the rows, so the product is not a constant a
// library could special-case.
std::vector<float> operand(std::size_t n) {
  std::vector<float> v(n);
  for (std::size_t i = 0; i < n; ++i)
    v[i] = static_cast<float>(i % 17) * 0.0625f - 0.5f;
  return v;
}

void BM_Gemm(benchmark::State& state) {
  const int m = static_cast<int>(state.range(0));
  const int n = static_cast<int>(state.range(1));
  const int k = static_cast<int>(state.range(2));
  const bool trans_a = state.range(3) != 0;
  const bool trans_b = state.range(4) != 0;
  const auto a = operand(static_cast<std::size_t>(m) * static_cast<std::size_t>(k));
  const auto b = operand(static_cast<std::size_t>(k) * static_cast<std::size_t>(n));
  std::vector<float> c(static_cast<std::size_t>(m) * static_cast<std::size_t>(n));
  for (auto _ : state) {
    mop::real::gemm<float>(m, n, k, a.data(), trans_a, b.data(), trans_b, c.data(), false);
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
  }
  const double flops = 2.0 * m * n * k;
  state.counters["flops"] =
      benchmark::Counter(flops * static_cast<double>(state.iterations()),
                         benchmark::Counter::kIsRate, benchmark::Counter::kIs1000);
}
BENCHMARK(BM_Gemm)
    ->ArgNames({"m", "n", "k", "ta", "tb"})
    ->Args({512, 512, 512, 0, 0}) // a square projection
    ->Args({4096, 256, 64, 0, 0}) // many rows through a narrow expert, short k
    ->Args({512, 512, 512, 0, 1}) // the input gradient: dy · wᵀ
    ->Args({512, 512, 512, 1, 0}) // the weight gradient: xᵀ · dy
    ->Args({64, 256, 4096, 1, 0}) // a weight gradient summed over many tokens
    ->Unit(benchmark::kMillisecond);

} // namespace
