// How fast the hardware cost functions answer: one call of each, items = calls.
#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"
#include "hw_models/collective.hpp"
#include "hw_models/compute.hpp"
#include "hw_models/copy.hpp"

#include <benchmark/benchmark.h>

namespace {

using namespace mop::hw;

const ClusterSpec& h200() {
  static const ClusterSpec c = load_cluster("h200");
  return c;
}

void BM_GemmTime(benchmark::State& state) {
  const Calibration none;
  double m = 4096;
  for (auto _ : state) {
    benchmark::DoNotOptimize(gemm_time_s(h200(), none, m, 7168, 2048, Dtype::bf16));
    m = m == 4096 ? 4097 : 4096; // defeat caching of a constant expression
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_GemmTime);

void BM_AttentionFwdTime(benchmark::State& state) {
  const Calibration none;
  AttentionShape s;
  s.batch = 1;
  s.heads = 64;
  s.kv_heads = 8;
  s.q_len = s.kv_len = 131072;
  s.qk_head_dim = 192;
  s.v_head_dim = 128;
  for (auto _ : state) {
    benchmark::DoNotOptimize(attention_fwd_time_s(h200(), none, s));
    s.q_len = s.kv_len = s.kv_len == 131072 ? 131073 : 131072;
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_AttentionFwdTime);

void BM_CollectiveCost(benchmark::State& state) {
  const Calibration none;
  double bytes = 256.0 * 1024 * 1024;
  for (auto _ : state) {
    benchmark::DoNotOptimize(
        collective_cost(h200(), none, CollectiveOp::all_reduce, bytes, GroupShape{8, 16}).time_s);
    bytes = bytes == 268435456.0 ? 268435457.0 : 268435456.0;
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_CollectiveCost);

void BM_HostDeviceCopyTime(benchmark::State& state) {
  const Calibration none;
  HostCopy copy;
  copy.both_directions = true;
  copy.nic_busy = true;
  double bytes = 1 << 30;
  for (auto _ : state) {
    benchmark::DoNotOptimize(host_device_copy_time_s(h200(), none, bytes, copy));
    bytes = bytes == 1073741824.0 ? 1073741825.0 : 1073741824.0;
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_HostDeviceCopyTime);

// With a calibration table of 64 GEMM points: the overlay's scan on the hot path.
void BM_GemmTimeCalibrated(benchmark::State& state) {
  Calibration cal;
  for (int i = 0; i < 64; ++i)
    cal.gemm.push_back({Dtype::bf16, 1, 256.0 * (i + 1), 4096, 4096, 1e-5 * (i + 1)});
  double m = 2048;
  for (auto _ : state) {
    benchmark::DoNotOptimize(gemm_time_s(h200(), cal, m, 4096, 4096, Dtype::bf16));
    m = m == 2048 ? 2049 : 2048;
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_GemmTimeCalibrated);

} // namespace
