// The host AdamW (real_backend/cpu/host_adam.hpp) per instruction set, one thread: parameters
// updated per second on arrays in L2 (64K parameters, compute-bound) and far beyond the caches
// (16M parameters, memory-bound: 28 bytes of traffic per parameter).
//   build/default/bench/mop_bench_host_adam
#include "real_backend/cpu/host_adam.hpp"

#include <benchmark/benchmark.h>

#include <vector>

namespace {

void bm_host_adamw(benchmark::State& state) {
  const auto isa = static_cast<mop::real::HostIsa>(state.range(0));
  const auto n = static_cast<std::size_t>(state.range(1));
  if (!mop::real::host_runs(isa)) {
    state.SkipWithError("this processor does not run it");
    return;
  }
  std::vector<float> p(n, 0.5f), g(n, 1e-3f), m(n, 0.0f), v(n, 0.0f);
  mop::real::AdamWParams a;
  std::int64_t step = 1;
  for (auto _ : state) {
    mop::real::host_adamw_with(isa, n, a, step++, p.data(), g.data(), m.data(), v.data());
    benchmark::DoNotOptimize(p.data());
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()) *
                          static_cast<std::int64_t>(n));
  state.SetLabel(mop::real::host_isa_name(isa));
}

} // namespace

BENCHMARK(bm_host_adamw)
    ->ArgsProduct({{static_cast<long>(mop::real::HostIsa::scalar),
                    static_cast<long>(mop::real::HostIsa::avx2),
                    static_cast<long>(mop::real::HostIsa::avx512)},
                   {1 << 16, 1 << 24}});
