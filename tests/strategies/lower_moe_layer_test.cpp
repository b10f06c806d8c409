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
#include "tests/support/approx.hpp"
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
    // Backward compute is Category::backward; the exchanges keep Category::ep_comm both ways,
    // their backward named ".bwd".
    const bool backward =
        op.category == sim::Category::backward ||
        (op.category == sim::Category::ep_comm && op.name.find(".bwd") != std::string::npos);
    if (!backward && op.category != sim::Category::forward && op.category != sim::Category::ep_comm)
      continue;
    const sim::OpTiming& t = r.classes.front().ops[i];
    double& from = backward ? b0 : f0;
    double& to = backward ? b1 : f1;
    from = std::min(from, t.start_s);
    to = std::max(to, t.end_s);
  }
  REQUIRE(f1 > f0);
  REQUIRE(b1 > b0);
  return Span{f1 - f0, b1 - b0};
}

// A small Mixtral-shaped MoE (32 experts, top-4, hidden 1024, two layers) and a Megatron plan
// of 8 ranks of EP: 4 local experts, one micro-batch of 4,096 tokens a rank.
workload::ModelSpec small_moe() {
  const nlohmann::json config = {
      {"model_type", "mixtral"},  {"hidden_size", 1024},      {"num_hidden_layers", 2},
      {"num_attention_heads", 8}, {"num_key_value_heads", 8}, {"intermediate_size", 2048},
      {"num_local_experts", 32},  {"num_experts_per_tok", 4}, {"vocab_size", 32000}};
  return workload::from_hf_config(config, "small MoE", "small-moe");
}

Plan ep8_plan() {
  Plan p;
  p.family = "megatron";
  p.world = 8;
  p.moe.ep = 8;
  p.micro_batch = 1;
  p.global_batch = 8;
  complete_plan(p);
  return p;
}

} // namespace

TEST_CASE("a Megatron MoE layer on 8 H100s follows Megatron-LM's moe_perf baselines within 25 %: "
          "Mixtral and DeepSeek proxies, all-to-all and DeepEP dispatchers, BF16" *
          doctest::test_suite("independent")) {
  // MIXTRAL_PROXY (test_cases.py): hidden 4096, experts' FFN 14336, 8 experts, top-2.
  const nlohmann::json mixtral = {
      {"model_type", "mixtral"},   {"hidden_size", 4096},      {"num_hidden_layers", 4},
      {"num_attention_heads", 32}, {"num_key_value_heads", 8}, {"intermediate_size", 14336},
      {"num_local_experts", 8},    {"num_experts_per_tok", 2}, {"vocab_size", 32000}};
  // DEEPSEEK_PROXY: hidden 7168, 32 experts of FFN 2048, top-8, one shared expert of 2048 (the
  // attention fields only make the model whole: the benchmark times the MoE layer alone).
  const nlohmann::json deepseek = {{"model_type", "deepseek_v3"},
                                   {"hidden_size", 7168},
                                   {"num_hidden_layers", 4},
                                   {"num_attention_heads", 8},
                                   {"q_lora_rank", 1536},
                                   {"kv_lora_rank", 512},
                                   {"qk_nope_head_dim", 128},
                                   {"qk_rope_head_dim", 64},
                                   {"v_head_dim", 128},
                                   {"intermediate_size", 18432},
                                   {"n_routed_experts", 32},
                                   {"num_experts_per_tok", 8},
                                   {"moe_intermediate_size", 2048},
                                   {"n_shared_experts", 1},
                                   {"first_k_dense_replace", 0},
                                   {"vocab_size", 32000}};
  // baseline.json, forward / backward (ms), and mop's: all-to-all, Mixtral 4.327 / 7.684 (mop
  // 4.50 / 8.42, +4 / +10 %), DeepSeek 7.119 / 10.483 (8.02 / 12.57, +13 / +20 %, of which the
  // token permutations and sorts are 0.8 ms each way): the layer's GEMMs and exchanges are priced
  // right where they dominate. DeepEP sends a token once to each GPU holding one of its experts:
  // DeepSeek's top-8 of 32 experts on 8 GPUs reaches 5.6 other GPUs where the all-to-all sends 7
  // copies, Mixtral's top-2 of 8 the same 1.75 either way; Mixtral 4.636 / 7.854 (4.39 / 8.32,
  // -5 / +6 %), DeepSeek 5.682 / 9.055 (6.61 / 11.17, +16 / +23 %).
  struct Case {
    const char* name;
    const nlohmann::json* config;
    EpDispatcher dispatcher;
    double forward_ms, backward_ms;
  };
  const Case cases[] = {
      {"mixtral_a2a_tp1ep8_bf16", &mixtral, EpDispatcher::alltoall, 4.327, 7.684},
      {"deepseek_a2a_tp1ep8_bf16", &deepseek, EpDispatcher::alltoall, 7.119, 10.483},
      {"mixtral_deepep_tp1ep8_bf16", &mixtral, EpDispatcher::deepep, 4.636, 7.854},
      {"deepseek_deepep_tp1ep8_bf16", &deepseek, EpDispatcher::deepep, 5.682, 9.055}};
  const double tolerance = 0.25;
  Span spans[4];
  for (int i = 0; i < 4; ++i) {
    const Case& c = cases[i];
    CAPTURE(c.name);
    spans[i] = moe_layer_span(*c.config, c.dispatcher);
    CHECK(spans[i].forward_s == mop::test::rel(c.forward_ms * 1e-3, tolerance));
    CHECK(spans[i].backward_s == mop::test::rel(c.backward_ms * 1e-3, tolerance));
  }
  // Megatron measures DeepEP 20 % faster than its all-to-all on DeepSeek's layer and 7 % slower
  // on Mixtral's; mop has DeepEP faster on DeepSeek's and within 5 % on Mixtral's.
  CHECK(spans[3].forward_s < 0.95 * spans[1].forward_s);
  CHECK(spans[2].forward_s == mop::test::rel(spans[0].forward_s, 0.05));
}

TEST_CASE("the token permutations copy every routed row: the all-to-all's permute, sort and "
          "unsort, DeepEP's one expansion, each as many bytes back in backward" *
          doctest::test_suite("independent")) {
  // 32 experts, top-4, hidden 1024, on 8 ranks of EP: 4 local experts, 4,096 tokens a rank.
  const workload::ModelSpec m = small_moe();
  const hw::ClusterSpec c = hw::load_cluster("h100");
  const Plan p = ep8_plan();
  auto bytes_of = [&](EpDispatcher d, const std::string& name) {
    LoweringContext ctx{&m, 4096, 8, memory_hardware(c), {}};
    ctx.ep_dispatcher = d;
    const sim::Schedule s = lower(p, ctx);
    for (const sim::Op& op : s.classes.front().ops)
      if (op.name == name)
        return op.bytes;
    return -1.0;
  };
  // By hand: a row is 1,024 BF16 values (2,048 B); 4,096 tokens make 16,384 routed rows.
  const double row = 2048, t = 4096, routed = 4 * t;
  CHECK(bytes_of(EpDispatcher::alltoall, "L1.ep_permute.mb0") ==
        mop::test::rel(row * (t + routed)));
  CHECK(bytes_of(EpDispatcher::alltoall, "L1.ep_permute.mb0.bwd") ==
        mop::test::rel(row * (t + routed)));
  CHECK(bytes_of(EpDispatcher::alltoall, "L1.ep_sort.mb0") == mop::test::rel(2 * row * routed));
  CHECK(bytes_of(EpDispatcher::alltoall, "L1.ep_unsort.mb0.bwd") ==
        mop::test::rel(2 * row * routed));
  // DeepEP: a token's 4 experts among 8 GPUs of 4 experts each miss a given GPU with
  // probability (28·27·26·25)/(32·31·30·29) = 0.5709, so it reaches 8·(1 − 0.5709) = 3.43 GPUs.
  const double gpus = 8 * (1 - (28.0 * 27 * 26 * 25) / (32.0 * 31 * 30 * 29));
  CHECK(bytes_of(EpDispatcher::deepep, "L1.ep_permute.mb0") ==
        mop::test::rel(row * (t * gpus + routed)));
  CHECK(bytes_of(EpDispatcher::deepep, "L1.ep_sort.mb0") < 0); // no sort: rows come in order
}

TEST_CASE("Transformer Engine's grouped GEMM launches a GEMM per local expert and, except under "
          "delayed scaling, each expert's own casts" *
          doctest::test_suite("plumbing")) {
  // 32 experts on 8 ranks of EP: 4 local experts.
  const workload::ModelSpec m = small_moe();
  const hw::ClusterSpec c = hw::load_cluster("h100");
  const Plan p = ep8_plan();
  auto kernels_of = [&](sim::Dtype dtype, Fp8Recipe recipe) {
    LoweringContext ctx{&m, 4096, 8, memory_hardware(c), {}};
    ctx.gemm_dtype = dtype;
    ctx.fp8_recipe = recipe;
    const sim::Schedule s = lower(p, ctx);
    for (const sim::Op& op : s.classes.front().ops)
      if (op.name == "L1.experts_gate_up.mb0")
        return static_cast<int>(op.kernels);
    return -1;
  };
  // multi_tensor_quantize_impl (TransformerEngine csrc/extensions/cast.cpp at d0067d0): one
  // fused cast-transpose for every expert under delayed scaling, else each expert's quantizer.
  CHECK(kernels_of(sim::Dtype::bf16, Fp8Recipe::delayed) == 4);
  CHECK(kernels_of(sim::Dtype::fp8, Fp8Recipe::delayed) == 4 + 1);
  CHECK(kernels_of(sim::Dtype::fp8, Fp8Recipe::current) == 4 + 4 * 3); // amax, scale, cast
  CHECK(kernels_of(sim::Dtype::fp8, Fp8Recipe::mxfp8) == 4 + 4 * 1);
}

} // namespace strategies_lower_moe_layer_test
