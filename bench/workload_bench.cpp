// How fast the workload model answers: parameter and FLOP accounting per model.
#include "workload/catalog.hpp"
#include "workload/flops.hpp"
#include "workload/params.hpp"

#include <benchmark/benchmark.h>

namespace {

void BM_CountParams(benchmark::State& state) {
  const auto m = mop::workload::load_model("kimi-k2");
  for (auto _ : state)
    benchmark::DoNotOptimize(mop::workload::count_params(m).total.total());
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_CountParams);

void BM_CountFlops(benchmark::State& state) {
  const auto m = mop::workload::load_model("kimi-k2");
  for (auto _ : state)
    benchmark::DoNotOptimize(mop::workload::count_flops(m, 1 << 20).model_flops_fwd);
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_CountFlops);

void BM_LoadCatalogModel(benchmark::State& state) {
  for (auto _ : state)
    benchmark::DoNotOptimize(mop::workload::load_model("deepseek-v3").hidden_size);
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_LoadCatalogModel);

} // namespace
