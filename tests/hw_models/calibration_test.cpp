// The calibration overlay with the hand-made example file configs/calibration/example-h200.json:
// a measured shape returns the measured time, a shape between two measured points interpolates,
// anything else falls back to the model.
#include "common/error.hpp"
#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"
#include "hw_models/collective.hpp"
#include "hw_models/compute.hpp"
#include "hw_models/copy.hpp"
#include "hw_models/host_optimizer.hpp"
#include "hw_models/memory_overheads.hpp"
#include "tests/support/approx.hpp"

#include <doctest/doctest.h>
#include <filesystem>
#include <fstream>
#include <vector>

namespace hw_models_calibration_test {

using namespace mop::hw;
using mop::Json;

namespace {

const std::string kExample = MOP_SOURCE_DIR "/configs/calibration/example-h200.json";
constexpr double MiB = 1024.0 * 1024.0, GiB = 1024.0 * MiB;

AttentionShape causal_self_attention(double seq) {
  AttentionShape s;
  s.batch = 1;
  s.heads = 32;
  s.kv_heads = 8;
  s.q_len = s.kv_len = seq;
  s.causal = true;
  return s;
}

// Forward FLOPs of causal_self_attention(seq), by hand: 2 · S(S+1)/2 · 32 heads · (128 + 128).
double causal_flops(double seq) {
  return 2 * seq * (seq + 1) / 2 * 32 * 256;
}

std::string calibration_error(const Json& j) {
  try {
    calibration_from_json(j, "cal.json");
  } catch (const mop::InputError& e) {
    return e.what();
  }
  return "accepted";
}

} // namespace

TEST_CASE("the example calibration loads and an empty one changes nothing" *
          doctest::test_suite("plumbing")) {
  const Calibration cal = load_calibration(kExample);
  CHECK(cal.gemm.size() == 3);
  CHECK(cal.attention.size() == 3);
  CHECK(cal.collectives.size() == 4);
  CHECK(cal.host_adam.size() == 3);
  CHECK(!cal.empty());
  CHECK(Calibration{}.empty());
}

TEST_CASE("GEMM overlay: measured m exact, between measured m interpolated, elsewhere the model" *
          doctest::test_suite("independent")) {
  const ClusterSpec h200 = load_cluster("h200");
  const Calibration cal = load_calibration(kExample);
  // The file: bf16 n = k = 4096, m = 1024 in 60 µs and m = 4096 in 180 µs.
  CHECK(gemm_time_s(h200, cal, 1024, 4096, 4096, Dtype::bf16) == 6.0e-5);
  CHECK(gemm_time_s(h200, cal, 4096, 4096, 4096, Dtype::bf16) == 1.8e-4);
  // m = 2048: the achieved FLOP/s interpolated a third of the way from m = 1024 to 4096.
  const double r1 = 2.0 * 1024 * 4096 * 4096 / 6.0e-5, r2 = 2.0 * 4096 * 4096 * 4096 / 1.8e-4;
  const double r = r1 + (r2 - r1) * (2048.0 - 1024) / (4096 - 1024);
  CHECK(gemm_time_s(h200, cal, 2048, 4096, 4096, Dtype::bf16) ==
        mop::test::rel(2.0 * 2048 * 4096 * 4096 / r));
  // Outside the measured m, another n, or another dtype: the model.
  const Calibration none{};
  CHECK(gemm_time_s(h200, cal, 8192, 4096, 4096, Dtype::bf16) ==
        gemm_time_s(h200, none, 8192, 4096, 4096, Dtype::bf16));
  CHECK(gemm_time_s(h200, cal, 2048, 4096, 8192, Dtype::bf16) ==
        gemm_time_s(h200, none, 2048, 4096, 8192, Dtype::bf16));
  CHECK(gemm_time_s(h200, cal, 2048, 4096, 4096, Dtype::fp8) ==
        gemm_time_s(h200, none, 2048, 4096, 4096, Dtype::fp8));
}

TEST_CASE(
    "grouped GEMM overlay: a measured balanced routing exact, a skewed one scaled by the model" *
    doctest::test_suite("independent")) {
  const ClusterSpec h200 = load_cluster("h200");
  const Calibration cal = load_calibration(kExample);
  // The file: 8 experts × 4096 rows, n = 768, k = 2048 in 165 µs.
  const std::vector<double> balanced(8, 4096);
  CHECK(grouped_gemm_time_s(h200, cal, balanced, 768, 2048, Dtype::bf16) == 1.65e-4);
  std::vector<double> skewed = {8192, 8192, 2048, 2048, 2048, 2048, 4096, 4096}; // same 32,768
  const Calibration none{};
  const double model_ratio = grouped_gemm_time_s(h200, none, skewed, 768, 2048, Dtype::bf16) /
                             grouped_gemm_time_s(h200, none, balanced, 768, 2048, Dtype::bf16);
  // The model's ratio includes one launch on each side; the overlay's excludes it: within 2 %.
  CHECK(grouped_gemm_time_s(h200, cal, skewed, 768, 2048, Dtype::bf16) ==
        mop::test::rel(1.65e-4 * model_ratio, 0.02));
}

TEST_CASE("attention overlay: measured shape exact, between interpolated, elsewhere the model" *
          doctest::test_suite("independent")) {
  const ClusterSpec h200 = load_cluster("h200");
  const Calibration cal = load_calibration(kExample);
  // The file: causal fwd, 1 × 32 heads, d 128: 4096 in 240 µs, 8192 in 920 µs; bwd 8192 in 2.7 ms.
  CHECK(attention_fwd_time_s(h200, cal, causal_self_attention(4096)) == 2.4e-4);
  CHECK(attention_fwd_time_s(h200, cal, causal_self_attention(8192)) == 9.2e-4);
  CHECK(attention_bwd_time_s(h200, cal, causal_self_attention(8192)) == 2.7e-3);
  // 6144: the achieved FLOP/s halfway between the two measured lengths.
  const double r1 = causal_flops(4096) / 2.4e-4, r2 = causal_flops(8192) / 9.2e-4;
  CHECK(attention_fwd_time_s(h200, cal, causal_self_attention(6144)) ==
        mop::test::rel(causal_flops(6144) / ((r1 + r2) / 2)));
  // Same kv length, twice the batch: the measured rate, twice the FLOPs.
  AttentionShape two = causal_self_attention(8192);
  two.batch = 2;
  CHECK(attention_fwd_time_s(h200, cal, two) == mop::test::rel(2 * 9.2e-4));
  // Outside the measured range, or not measured at all (non-causal): the model.
  const Calibration none{};
  for (AttentionShape s : {causal_self_attention(16384), causal_self_attention(2048)})
    CHECK(attention_fwd_time_s(h200, cal, s) == attention_fwd_time_s(h200, none, s));
  AttentionShape full = causal_self_attention(6144);
  full.causal = false;
  CHECK(attention_fwd_time_s(h200, cal, full) == attention_fwd_time_s(h200, none, full));
  CHECK(attention_bwd_time_s(h200, cal, causal_self_attention(4096)) ==
        attention_bwd_time_s(h200, none, causal_self_attention(4096)));
}

TEST_CASE("collective overlay: measured size exact, between interpolated, elsewhere the model" *
          doctest::test_suite("independent")) {
  const ClusterSpec h200 = load_cluster("h200");
  const Calibration cal = load_calibration(kExample);
  const GroupShape node{8, 1};
  // The file: all_reduce on 8 × 1 at 1 MiB in 36 µs, 64 MiB in 330 µs, 1 GiB in 4.1 ms.
  const CollectiveCost at64 = collective_cost(h200, cal, CollectiveOp::all_reduce, 64 * MiB, node);
  CHECK(at64.time_s == 3.3e-4);
  CHECK(at64.algorithm == "calibrated");
  CHECK(at64.busbw == mop::test::rel(64 * MiB / 3.3e-4 * 2 * 7 / 8));
  // Halfway in bytes between 1 MiB and 64 MiB: halfway in time.
  CHECK(collective_cost(h200, cal, CollectiveOp::all_reduce, 32.5 * MiB, node).time_s ==
        mop::test::rel((3.6e-5 + 3.3e-4) / 2));
  // Beyond 1 GiB, another group shape, another op: the model.
  const Calibration none{};
  for (auto [op, bytes, g] : {std::tuple{CollectiveOp::all_reduce, 4 * GiB, node},
                              std::tuple{CollectiveOp::all_reduce, 64 * MiB, GroupShape{4, 1}},
                              std::tuple{CollectiveOp::reduce_scatter, 64 * MiB, node}}) {
    const CollectiveCost with = collective_cost(h200, cal, op, bytes, g);
    CHECK(with.algorithm != "calibrated");
    CHECK(with.time_s == collective_cost(h200, none, op, bytes, g).time_s);
  }
  // A single measured point answers its own size only.
  CHECK(collective_cost(h200, cal, CollectiveOp::all_gather, GiB, {8, 2}).time_s == 3.0e-3);
  CHECK(collective_cost(h200, cal, CollectiveOp::all_gather, 0.5 * GiB, {8, 2}).algorithm !=
        "calibrated");
}

TEST_CASE("host AdamW overlay interpolates measured rates by core count" *
          doctest::test_suite("independent")) {
  const ClusterSpec h200 = load_cluster("h200");
  const Calibration cal = load_calibration(kExample);
  // The file: 16 cores 2.0e8, 56 cores 6.5e8, 112 cores 1.2e9 params/s.
  CHECK(host_adam_params_per_s(h200, cal, 56) == 6.5e8);
  CHECK(host_adam_params_per_s(h200, cal, 36) == mop::test::rel(2.0e8 + (6.5e8 - 2.0e8) / 2));
  // 8 cores is below the measured range: the nearest measurement's rate per core (16 cores,
  // 2.0e8/16) times 8, under the host memory's ceiling.
  CHECK(host_adam_params_per_s(h200, cal, 8) == mop::test::rel(2.0e8 / 16 * 8));
}

TEST_CASE("host AdamW beyond the measured cores: the measured rate per core, capped by the host's "
          "memory" *
          doctest::test_suite("independent")) {
  ClusterSpec c = load_cluster("h200");
  Calibration cal;
  cal.host_adam.push_back({16, 3.2e8}); // 2e7 params/s per core
  // 20 cores: 4e8, below the ceiling of the cluster's host memory.
  const double ceiling =
      c.node.host_memory_bandwidth_achievable / c.host_optimizer.adam_bytes_per_param;
  REQUIRE(4e8 < ceiling);
  CHECK(host_adam_params_per_s(c, cal, 20) == mop::test::rel(4e8));
  // A measured host memory bandwidth of 28e8 bytes/s caps it at 28e8 / bytes per param.
  cal.host_memory_bytes_per_s = 28e8;
  CHECK(host_adam_params_per_s(c, cal, 20) ==
        mop::test::rel(std::min(4e8, 28e8 / c.host_optimizer.adam_bytes_per_param)));
}

TEST_CASE("a weight-gradient GEMM is looked up along k, a calibration file round-trips, and the "
          "measured launch cost replaces the cluster's" *
          doctest::test_suite("plumbing")) {
  Calibration cal;
  // Weight gradients: m = 4096, n = 14336 fixed, k (tokens) 4096 and 16384 measured.
  cal.gemm.push_back({Dtype::bf16, 1, 4096, 14336, 4096, 1.0e-3});
  cal.gemm.push_back({Dtype::bf16, 1, 4096, 14336, 16384, 3.0e-3});
  CHECK(*calibrated_gemm_time_s(cal, Dtype::bf16, 1, 4096, 14336, 4096) == 1.0e-3);
  // k = 8192, a third of the way: the rate interpolated (FLOPs / time at each end).
  const double f = 2.0 * 4096 * 14336;
  const double r1 = f * 4096 / 1.0e-3, r2 = f * 16384 / 3.0e-3;
  const double rate = r1 + (r2 - r1) * (8192.0 - 4096) / (16384 - 4096);
  CHECK(*calibrated_gemm_time_s(cal, Dtype::bf16, 1, 4096, 14336, 8192) ==
        mop::test::rel(f * 8192 / rate));
  CHECK(!calibrated_gemm_time_s(cal, Dtype::bf16, 1, 4096, 14336, 32768));
  cal.kernel_launch_s = 3.5e-6;
  cal.host_launch_s = 2.0e-6;
  cal.host_memory_bytes_per_s = 1.5e11;
  cal.hbm_bytes_per_s = 4.0e12;
  cal.host_adam.push_back({1, 5e7});
  cal.device = {{"name", "NVIDIA H200"}, {"sms", 132}};
  const Json j = calibration_to_json(cal, "test", "h200");
  const Calibration back = calibration_from_json(j, "round trip");
  CHECK(calibration_to_json(back, "test", "h200") == j);
  CHECK(*back.kernel_launch_s == 3.5e-6);
  CHECK(back.device["name"] == "NVIDIA H200");
  const ClusterSpec c = calibrated_cluster(load_cluster("h200"), back);
  CHECK(c.gpu.kernel_launch_s == 3.5e-6);
  CHECK(calibration_error({{"launch", {{"kernel_s", -1}}}}).find("kernel_s") != std::string::npos);
  CHECK(calibration_error({{"device", 3}}).find("device") != std::string::npos);
}

TEST_CASE("measured bandwidths and overheads replace the cluster's" *
          doctest::test_suite("independent")) {
  const ClusterSpec h200 = load_cluster("h200");
  const Calibration cal = load_calibration(kExample);
  // The file: H2D 54.0, D2H 53.5 GB/s, duplex 1.5, HBM 3.95 TB/s, NVLink copy 390 GB/s.
  CHECK(host_device_copy_time_s(h200, cal, GiB) == mop::test::rel(GiB / 54.0e9 + 2e-6));
  HostCopy up, down;
  up.both_directions = down.both_directions = true;
  down.direction = CopyDirection::device_to_host;
  CHECK(host_device_bandwidth(h200, cal, up) + host_device_bandwidth(h200, cal, down) ==
        mop::test::rel(1.5 * (54.0e9 + 53.5e9) / 2));
  CHECK(memory_bound_time_s(h200, cal, GiB) == mop::test::rel(GiB / 3.95e12 + 2e-6));
  CHECK(nvlink_copy_time_s(h200, cal, GiB) == mop::test::rel(GiB / 390e9 + 2e-6));
  const MemoryOverheads o = memory_overheads(h200, cal);
  CHECK(o.cuda_context_bytes == 456130560);
  CHECK(o.allocator_fragmentation == 0.12);
  CHECK(o.nccl_buffer_bytes_per_communicator == 0.75 * GiB); // not in the file: the cluster's
}

TEST_CASE("bad calibration files: one sentence naming the file and the field" *
          doctest::test_suite("plumbing")) {
  CHECK(calibration_error(Json{{"collectives", Json::array({Json{{"op", "gossip"},
                                                                 {"ranks_per_node", 8},
                                                                 {"nodes", 1},
                                                                 {"bytes", 1024},
                                                                 {"time_s", 1e-5}}})}}) ==
        "cal.json, collectives[0]: field 'op' must be one of \"all_gather\", \"reduce_scatter\", "
        "\"all_reduce\", \"all_to_all\", \"send_recv\" (got \"gossip\").");
  CHECK(calibration_error(Json{
            {"gemm", Json::array({Json{
                         {"dtype", "fp16"}, {"m", 1}, {"n", 1}, {"k", 1}, {"time_s", 1e-6}}})}}) ==
        "cal.json, gemm[0]: field 'dtype' must be one of \"bf16\", \"fp8\", \"fp32\" (got "
        "\"fp16\").");
  const Json point{{"dtype", "bf16"}, {"m", 1}, {"n", 1}, {"k", 1}, {"time_s", 1e-6}};
  CHECK(calibration_error(Json{{"gemm", Json::array({point, point})}}) ==
        "cal.json: two 'gemm' entries measure the same shape; keep one.");
  CHECK(
      calibration_error(Json{
          {"gemm",
           Json::array({Json{{"dtype", "bf16"}, {"m", 1}, {"n", 1}, {"k", 1}, {"time_s", 0}}})}}) ==
      "cal.json, gemm[0]: field 'time_s' must be a positive number (got 0).");
  CHECK(calibration_error(Json{{"bandwidths", Json{{"h2d_bytes_per_s", -1}}}}) ==
        "cal.json, section 'bandwidths': field 'h2d_bytes_per_s' must be a positive number (got "
        "-1).");
  CHECK(calibration_error(Json{{"gemms", Json::array()}})
            .starts_with("cal.json: field 'gemms' is not known; allowed: schema,"));
  CHECK_THROWS_AS(load_calibration("/nonexistent/cal.json"), mop::InputError);
}

TEST_CASE("a measured collective's group is bounded so that its rank count fits an int" *
          doctest::test_suite("plumbing")) {
  // 10^6 ranks per node on 10^6 nodes were each below the old bound; their product 10^12
  // overflowed GroupShape::ranks().
  const Json point{{"op", "all_reduce"},
                   {"ranks_per_node", 1'000'000},
                   {"nodes", 1'000'000},
                   {"bytes", 1024},
                   {"time_s", 1e-5}};
  CHECK(calibration_error(Json{{"collectives", Json::array({point})}}) ==
        "cal.json, collectives[0]: field 'nodes' must be at most 1 with 1000000 ranks per node "
        "(mop's ceiling is 1048576 GPUs) (got 1000000).");
  // A megabyte key is quoted cut to 120 characters.
  const std::string msg = calibration_error(Json{{std::string(1'000'000, 'k'), 1}});
  CHECK(msg.size() < 400);
  CHECK(msg.starts_with("cal.json: field 'kkk"));
}

} // namespace hw_models_calibration_test
