// One Megatron-Core MoE layer on a node of 8 H100s (EP 8), as the lowering and the engine play
// it, against Megatron-LM's own measurement of that layer: the forward and backward times of
// tests/functional_tests/test_cases/common/moe_perf/baseline.json (Megatron-LM cf39a4dd,
// 2025-12-17: MoELayer alone, Transformer Engine grouped GEMMs, permute and router fusion,
// force-balanced routing, BF16, 4,096 tokens a rank, CUDA events around the layer's forward and
// its backward). None of mop's constants was set from these numbers.
#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"
#include "sim/engine.hpp"
#include "strategies/hardware.hpp"
#include "strategies/lower.hpp"
#include "workload/hf_config.hpp"

#include <algorithm>
#include <doctest/doctest.h>
#include <nlohmann/json.hpp>
#include <string>

namespace strategies_lower_moe_layer_test {

using namespace mop;
using namespace mop::strategy;

namespace {

struct Span {
  double forward_s = 0, backward_s = 0;
};

bool in_moe_block(const std::string& name) {
  for (const char* part : {".router", ".ep_", ".experts_", ".shared_"})
    if (name.find(part) != std::string::npos)
      return true;
  return false;
}

// From the first to the last op of layer 1's MoE block for micro-batch 0, forward and backward:
// what CUDA events around MoELayer.forward and its backward time.
Span moe_layer_span(const nlohmann::json& config, EpDispatcher dispatcher) {
  const workload::ModelSpec m = workload::from_hf_config(config, "moe_perf proxy", "proxy");
  const hw::ClusterSpec c = hw::load_cluster("h100");
  Plan p;
  p.family = "megatron";
  p.world = 8;
  p.moe.ep = 8;
  p.micro_batch = 1;
  p.global_batch = 16; // two micro-batches: the gradient reductions come after the first's
  complete_plan(p);
  LoweringContext ctx{&m, 4096, 8, memory_hardware(c), {}};
  ctx.ep_dispatcher = dispatcher;
  const sim::Schedule s = lower(p, ctx);
  const sim::SimResult r = sim::simulate(s, c, hw::Calibration{});
  const sim::RankClass& rc = s.classes.front();
  double f0 = 1e30, f1 = 0, b0 = 1e30, b1 = 0;
  for (std::size_t i = 0; i < rc.ops.size(); ++i) {
    const sim::Op& op = rc.ops[i];
    if (op.layer != 1 || op.micro_batch != 0 || !in_moe_block(op.name))
      continue;
    const sim::OpTiming& t = r.classes.front().ops[i];
    if (op.category == sim::Category::backward) {
      b0 = std::min(b0, t.start_s);
      b1 = std::max(b1, t.end_s);
    } else if (op.category == sim::Category::forward || op.category == sim::Category::ep_comm) {
      const bool backward_comm = op.name.find(".bwd") != std::string::npos;
      (backward_comm ? b0 : f0) = std::min(backward_comm ? b0 : f0, t.start_s);
      (backward_comm ? b1 : f1) = std::max(backward_comm ? b1 : f1, t.end_s);
    }
  }
  REQUIRE(f1 > f0);
  REQUIRE(b1 > b0);
  return Span{f1 - f0, b1 - b0};
}

} // namespace

TEST_CASE("a Megatron MoE layer on 8 H100s follows Megatron-LM's moe_perf baselines within 25 %: "
          "Mixtral and DeepSeek proxies, all-to-all and DeepEP dispatchers, BF16" *
          doctest::test_suite("independent")) {
  // MIXTRAL_PROXY (test_cases.py): hidden 4096, experts' FFN 14336, 8 experts, top-2.
  const nlohmann::json mixtral = {
      {"model_type", "mixtral"},       {"hidden_size", 4096},       {"num_hidden_layers", 4},
      {"num_attention_heads", 32},     {"num_key_value_heads", 8},  {"intermediate_size", 14336},
      {"num_local_experts", 8},        {"num_experts_per_tok", 2},  {"vocab_size", 32000}};
  // DEEPSEEK_PROXY: hidden 7168, 32 experts of FFN 2048, top-8, one shared expert of 2048 (the
  // attention fields only make the model whole: the benchmark times the MoE layer alone).
  const nlohmann::json deepseek = {
      {"model_type", "deepseek_v3"}, {"hidden_size", 7168},         {"num_hidden_layers", 4},
      {"num_attention_heads", 8},    {"q_lora_rank", 1536},         {"kv_lora_rank", 512},
      {"qk_nope_head_dim", 128},     {"qk_rope_head_dim", 64},      {"v_head_dim", 128},
      {"intermediate_size", 18432},  {"n_routed_experts", 32},      {"num_experts_per_tok", 8},
      {"moe_intermediate_size", 2048}, {"n_shared_experts", 1},     {"first_k_dense_replace", 0},
      {"vocab_size", 32000}};
  const double tolerance = 0.25;
  // baseline.json, forward / backward: mixtral_a2a_tp1ep8_bf16 4.327 / 7.684 ms,
  // deepseek_a2a_tp1ep8_bf16 7.119 / 10.483 ms. mop: 4.50 / 8.39 and 7.22 / 11.73 ms (+4, +9,
  // +1, +12 %): the layer's GEMMs and exchanges are priced right where they dominate.
  const Span mx = moe_layer_span(mixtral, EpDispatcher::alltoall);
  const Span ds = moe_layer_span(deepseek, EpDispatcher::alltoall);
  CHECK(mx.forward_s == doctest::Approx(4.327e-3).epsilon(tolerance));
  CHECK(mx.backward_s == doctest::Approx(7.684e-3).epsilon(tolerance));
  CHECK(ds.forward_s == doctest::Approx(7.119e-3).epsilon(tolerance));
  CHECK(ds.backward_s == doctest::Approx(10.483e-3).epsilon(tolerance));
  // DeepEP sends a token once to each GPU holding one of its experts: DeepSeek's top-8 of 32
  // experts on 8 GPUs reaches 5.6 other GPUs where the all-to-all sends 7 copies, Mixtral's
  // top-2 of 8 the same 1.75 either way. mixtral_deepep 4.636 / 7.854 ms, deepseek_deepep
  // 5.682 / 9.055 ms; mop 4.39 / 8.28 and 6.38 / 10.89 ms (-5, +5, +12, +20 %).
  const Span mxd = moe_layer_span(mixtral, EpDispatcher::deepep);
  const Span dsd = moe_layer_span(deepseek, EpDispatcher::deepep);
  CHECK(mxd.forward_s == doctest::Approx(4.636e-3).epsilon(tolerance));
  CHECK(mxd.backward_s == doctest::Approx(7.854e-3).epsilon(tolerance));
  CHECK(dsd.forward_s == doctest::Approx(5.682e-3).epsilon(tolerance));
  CHECK(dsd.backward_s == doctest::Approx(9.055e-3).epsilon(tolerance));
  // Megatron measures DeepEP faster than its all-to-all on DeepSeek's layer and no faster on
  // Mixtral's; so does mop.
  CHECK(dsd.forward_s < 0.95 * ds.forward_s);
  CHECK(mxd.forward_s == doctest::Approx(mx.forward_s).epsilon(0.05));
}

} // namespace strategies_lower_moe_layer_test
