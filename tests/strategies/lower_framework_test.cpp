// What the lowering takes from a plan's framework, beyond its parallelism: FP8 quantization
// around the GEMMs (docs/HARDWARE.md "FP8 quantization"), torchtitan's eager elementwise traffic
// ("Eager elementwise ops") and hierarchical EP dispatch ("Hierarchical dispatch"): the bytes
// by hand, where the lowering charges them, and what they cost in the engine.
#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"
#include "hw_models/collective.hpp"
#include "hw_models/compute.hpp"
#include "sim/engine.hpp"
#include "strategies/hardware.hpp"
#include "strategies/lower.hpp"
#include "tests/support/approx.hpp"
#include "workload/catalog.hpp"

#include <doctest/doctest.h>
#include <string>

namespace strategies_lower_framework_test {

using namespace mop;
using namespace mop::strategy;

namespace {

Plan dp8_plan(const std::string& family) {
  Plan p;
  p.family = family;
  p.world = 8;
  p.global_batch = 16;
  complete_plan(p);
  return p;
}

const sim::Op& op_named(const sim::Schedule& s, const std::string& name) {
  for (const sim::Op& op : s.classes.front().ops)
    if (op.name == name)
      return op;
  FAIL("no op named " << name);
  return s.classes.front().ops.front();
}

} // namespace

TEST_CASE("FP8 recipes: bytes per quantized element, by hand" * doctest::test_suite("independent")) {
  // One cast reads BF16 (2 B) and writes FP8 (1 B). Transformer Engine's delayed scaling fuses
  // the amax into a cast-transpose kernel: + 1 B for the transposed copy Hopper's GEMMs need.
  const QuantizeTraffic delayed = quantize_traffic(Fp8Recipe::delayed, true);
  CHECK(delayed.input == 2 + 1 + 1);
  CHECK(delayed.input_after_norm == 1 + 1); // the norm writes FP8; the transpose reads it back
  CHECK(delayed.grad == 4);
  CHECK(delayed.weight == 0); // cached for the step's other micro-batches
  // Current scaling reads the tensor once more for its amax.
  const QuantizeTraffic current = quantize_traffic(Fp8Recipe::current, true);
  CHECK(current.input == delayed.input + 2);
  CHECK(current.grad == delayed.grad + 2);
  // Blackwell reads either orientation: no transposed copy.
  CHECK(quantize_traffic(Fp8Recipe::delayed, false).input == 3);
  CHECK(quantize_traffic(Fp8Recipe::current, false).input == 5);
  // MXFP8: both copies and one E8M0 scale per 32 elements each, from one read.
  CHECK(quantize_traffic(Fp8Recipe::mxfp8, true).input == mop::test::rel(2 + 1 + 1 + 2.0 / 32));
  // torchao casts the weight every micro-batch; row-wise writes a BF16 transpose first.
  CHECK(quantize_traffic(Fp8Recipe::tensorwise, true).weight == 8);
  CHECK(quantize_traffic(Fp8Recipe::rowwise, true).input == 8);
  for (const char* name : {"delayed", "current", "mxfp8", "tensorwise", "rowwise"})
    CHECK(std::string(fp8_recipe_name(*parse_fp8_recipe(name))) == name);
  CHECK_FALSE(parse_fp8_recipe("hybrid"));
}

TEST_CASE("FP8 GEMMs carry their quantize traffic: input and weight forward, the output's "
          "gradient in the input gradient's GEMM" *
          doctest::test_suite("independent")) {
  const workload::ModelSpec m = workload::load_model("llama3-8b");
  const hw::ClusterSpec c = hw::load_cluster("h100");
  LoweringContext ctx{&m, 4096, 8, memory_hardware(c), {}};
  // BF16: no quantize traffic.
  const sim::Schedule bf16 = lower(dp8_plan("megatron"), ctx);
  CHECK(op_named(bf16, "L0.mlp_down.mb0").bytes == 0);
  ctx.gemm_dtype = sim::Dtype::fp8;
  ctx.fp8_recipe = Fp8Recipe::delayed;
  const sim::Schedule s = lower(dp8_plan("megatron"), ctx);
  const double t = 4096, h = 4096, inter = 14336;
  // mlp_down's input (the SwiGLU output, t x inter) has no norm before it: cast-transposed.
  CHECK(op_named(s, "L0.mlp_down.mb0").bytes == mop::test::rel(t * inter * 4));
  // mlp_gate_up's input comes from the norm: only its transpose.
  CHECK(op_named(s, "L0.mlp_gate_up.mb0").bytes == mop::test::rel(t * h * 2));
  // The input gradient's GEMM quantizes the output's gradient (t x h for mlp_down); the weight
  // gradient's GEMM reads the transposes already written.
  CHECK(op_named(s, "L0.mlp_down.mb0.dgrad").bytes == mop::test::rel(t * h * 4));
  CHECK(op_named(s, "L0.mlp_down.mb0.wgrad").bytes == 0);
  // torchao row-wise also casts the weight (h x inter) every micro-batch.
  ctx.fp8_recipe = std::nullopt; // FSDP2's default: row-wise
  const sim::Schedule titan = lower(dp8_plan("fsdp2"), ctx);
  CHECK(op_named(titan, "L0.mlp_down.mb0").bytes == mop::test::rel(t * inter * 8 + h * inter * 10));
  // The engine charges the traffic at the HBM's achievable bandwidth, one more launch.
  const sim::Op& down = op_named(s, "L0.mlp_down.mb0");
  const double gemm = hw::gemm_time_s(c, hw::Calibration{}, t, h, inter, hw::Dtype::fp8);
  CHECK(sim::op_duration_s(down, s, c, hw::Calibration{}) ==
        mop::test::rel(gemm + t * inter * 4 / c.gpu.hbm_bandwidth_achievable +
                       c.gpu.kernel_launch_s));
}

TEST_CASE("Megatron-Core's router stays out of the FP8 recipe" * doctest::test_suite("plumbing")) {
  const workload::ModelSpec m = workload::load_model("tiny-moe");
  const hw::ClusterSpec c = hw::load_cluster("h100");
  LoweringContext ctx{&m, 1024, 8, memory_hardware(c), {}};
  ctx.gemm_dtype = sim::Dtype::fp8;
  Plan p = dp8_plan("megatron");
  p.moe.ep = 4;
  complete_plan(p);
  const sim::Schedule s = lower(p, ctx);
  const sim::Op& router = op_named(s, "L1.router.mb0");
  CHECK(router.dtype == sim::Dtype::bf16);
  CHECK(router.bytes == 0);
  CHECK(op_named(s, "L1.experts_gate_up.mb0").dtype == sim::Dtype::fp8);
  CHECK(op_named(s, "L1.experts_gate_up.mb0").bytes > 0);
}

TEST_CASE("hierarchical EP dispatch: a token crosses once to every other node holding one of its "
          "experts" *
          doctest::test_suite("independent")) {
  // 128 experts on 4 nodes (32 each), top-8: a node holds none of the 8 picks with probability
  // C(96, 8) / C(128, 8); three other nodes.
  double miss = 1;
  for (int i = 0; i < 8; ++i)
    miss *= (96.0 - i) / (128.0 - i);
  CHECK(expected_remote_nodes(128, 8, 4) == mop::test::rel(3 * (1 - miss)));
  CHECK(expected_remote_nodes(128, 8, 1) == 0);
  // One expert per token reaches another node with probability 3/4.
  CHECK(expected_remote_nodes(128, 1, 4) == mop::test::rel(0.75));
  // The engine: the slower of the NIC's share and NVLink's; inside one node, the intranode
  // kernels' rate and no fabric.
  const hw::ClusterSpec c = hw::load_cluster("h100");
  const double t = hw::hierarchical_dispatch_time_s(c, 1e9, 2e9, hw::GroupShape{8, 4});
  CHECK(t == mop::test::rel(std::max(1e9 / c.node.ep_rdma_bandwidth,
                                     2e9 / c.node.ep_nvlink_bandwidth) +
                            c.fabric.latency_s));
  CHECK(hw::hierarchical_dispatch_time_s(c, 0, 2e9, hw::GroupShape{8, 1}) ==
        mop::test::rel(2e9 / c.node.ep_nvlink_intranode_bandwidth));
  // The lowering: a DeepEP plan's dispatch carries the bytes that cross nodes.
  const workload::ModelSpec m = workload::load_model("tiny-moe");
  LoweringContext ctx{&m, 1024, 2, memory_hardware(c), {}};
  Plan p = dp8_plan("megatron");
  p.moe.ep = 8;
  complete_plan(p);
  ctx.ep_dispatcher = EpDispatcher::deepep;
  const sim::Schedule s = lower(p, ctx);
  const sim::Op& d = op_named(s, "L1.ep_dispatch.mb0");
  const double tokens = 1024.0 * p.micro_batch, h = static_cast<double>(m.hidden_size);
  CHECK(d.rdma_bytes == mop::test::rel(2 * tokens * h *
                                        expected_remote_nodes(m.moe.num_routed_experts,
                                                              m.moe.experts_per_token, 4)));
  // ... and, once per destination GPU, the bytes to the other GPUs (expected_remote_nodes over
  // the group's 8 ranks: the same draw, one holder per rank).
  CHECK(d.nvl_bytes == mop::test::rel(2 * tokens * h *
                                       expected_remote_nodes(m.moe.num_routed_experts,
                                                             m.moe.experts_per_token, 8)));
  ctx.ep_dispatcher = std::nullopt; // NCCL's all-to-all of every copy
  const sim::Schedule all_to_all = lower(p, ctx);
  const sim::Op& nccl = op_named(all_to_all, "L1.ep_dispatch.mb0");
  CHECK(nccl.rdma_bytes == 0);
  CHECK(nccl.nvl_bytes == 0);
}

TEST_CASE("gpt-oss's expert biases: Megatron-Core adds them expert by expert in eager PyTorch" *
          doctest::test_suite("independent")) {
  // TEGroupedMLP._apply_bias: per expert `t + b * p` (b * p written, 2 B an element; read with
  // the output, the sum written, 6 B), then torch.cat (4 B); backward, autograd's mul: for each
  // of b and p a product (4 B) and a reduction (2 B). Two kernels per expert and the cat.
  workload::ModelSpec m = workload::load_model("tiny-moe");
  m.moe.expert_bias = true;
  const hw::ClusterSpec c = hw::load_cluster("h100");
  const LoweringContext ctx{&m, 1024, 8, memory_hardware(c), {}};
  Plan p = dp8_plan("megatron");
  p.moe.ep = 8;
  complete_plan(p);
  const sim::Schedule s = lower(p, ctx);
  const sim::Op& bias = op_named(s, "L1.experts_bias.mb0");
  const double rows = 1024.0 * p.micro_batch * static_cast<double>(m.moe.experts_per_token);
  const double h = static_cast<double>(m.hidden_size);
  CHECK(bias.bytes == mop::test::rel((2 + 6 + 4) * rows * h));
  CHECK(op_named(s, "L1.experts_bias.mb0.bwd").bytes == mop::test::rel(2 * (4 + 2) * rows * h));
  const int local = static_cast<int>(m.moe.num_routed_experts) / 8;
  CHECK(bias.kernels == 2 * local + 1);
  // Not without biases, and not in the other frameworks' experts.
  m.moe.expert_bias = false;
  const sim::Schedule unbiased = lower(p, ctx);
  for (const sim::Op& op : unbiased.classes.front().ops)
    CHECK(op.name.find("experts_bias") == std::string::npos);
  m.moe.expert_bias = true;
  Plan fsdp = dp8_plan("fsdp2");
  fsdp.moe.ep = 8;
  complete_plan(fsdp);
  const sim::Schedule f = lower(fsdp, ctx);
  for (const sim::Op& op : f.classes.front().ops)
    CHECK(op.name.find("experts_bias") == std::string::npos);
}

TEST_CASE("eager RMSNorm, RoPE and SwiGLU move what their PyTorch ops move, and "
          "compiled they fuse but RoPE" *
          doctest::test_suite("independent")) {
  const workload::ModelSpec m = workload::load_model("llama3-8b");
  const hw::ClusterSpec c = hw::load_cluster("h100");
  LoweringContext ctx{&m, 4096, 8, memory_hardware(c), {}};
  const double t = 4096, h = 4096, inter = 14336, qk = (32 + 8) * 128;
  // Eager (torchtitan's default): per BF16 element, the norm moves x.float() 2+4, pow 4+4,
  // mean 4, x * rsqrt 4+4, type_as 4+2, * weight 2+2 = 36 B; RoPE float() 2+4, the complex
  // product 4+4, type_as 4+2 = 20 B; SwiGLU silu 2+2 and the product 2+2+2 = 10 B.
  const sim::Schedule eager = lower(dp8_plan("fsdp2"), ctx);
  CHECK(op_named(eager, "L0.attn_norm.mb0").bytes == mop::test::rel(36 * t * h));
  CHECK(op_named(eager, "L0.rope_qk_norm.mb0").bytes == mop::test::rel(20 * t * qk));
  CHECK(op_named(eager, "L0.mlp_act.mb0").bytes == mop::test::rel(10 * t * inter));
  CHECK(op_named(eager, "L0.attn_norm.mb0").kernels == 8);
  // Compiled: read the input, write the output (SwiGLU reads two); RoPE's complex product is
  // not code Inductor generates, so it stays eager.
  ctx.compiled = true;
  const sim::Schedule compiled = lower(dp8_plan("fsdp2"), ctx);
  CHECK(op_named(compiled, "L0.attn_norm.mb0").bytes == mop::test::rel(4 * t * h));
  CHECK(op_named(compiled, "L0.rope_qk_norm.mb0").bytes == mop::test::rel(20 * t * qk));
  CHECK(op_named(compiled, "L0.mlp_act.mb0").bytes == mop::test::rel(6 * t * inter));
  CHECK(op_named(compiled, "L0.attn_norm.mb0").kernels == 1);
  // Transformer Engine's fused kernels whatever the flag says.
  ctx.compiled = false;
  CHECK(op_named(lower(dp8_plan("megatron"), ctx), "L0.attn_norm.mb0").bytes ==
        mop::test::rel(4 * t * h));
}

TEST_CASE("torchtitan's separate projections: each reads the shared input, autograd sums their "
          "input gradients, compiled FP8 casts the input once" *
          doctest::test_suite("independent")) {
  const workload::ModelSpec m = workload::load_model("llama3-8b");
  const hw::ClusterSpec c = hw::load_cluster("h100");
  LoweringContext ctx{&m, 4096, 8, memory_hardware(c), {}};
  const double t = 4096, h = 4096, inter = 14336, d = 128, grad = 2 * t * h;
  // Megatron-Core fuses q, k, v into one GEMM and the gate and up projections into another.
  const sim::Schedule te = lower(dp8_plan("megatron"), ctx);
  CHECK(op_named(te, "L0.qkv_proj.mb0").gemm.n == (32 + 2 * 8) * d);
  CHECK(op_named(te, "L0.mlp_gate_up.mb0").gemm.n == 2 * inter);
  // torchtitan (models/llama/model.py: wq, wk, wv, w1, w3): one GEMM per projection, the same
  // FLOPs; in backward one kernel per pair of input gradients summed in place (eager autograd:
  // two adds for three uses, one for two, each reading two tensors and writing one).
  const sim::Schedule eager = lower(dp8_plan("fsdp2"), ctx);
  CHECK(op_named(eager, "L0.q_proj.mb0").gemm.n == 32 * d);
  CHECK(op_named(eager, "L0.k_proj.mb0").gemm.n == 8 * d);
  CHECK(op_named(eager, "L0.v_proj.mb0").gemm.n == 8 * d);
  CHECK(op_named(eager, "L0.mlp_gate.mb0").gemm.n == inter);
  CHECK(op_named(eager, "L0.mlp_up.mb0").gemm.n == inter);
  CHECK(op_named(eager, "L0.attn_grad_sum.mb0").bytes == mop::test::rel(2 * 3 * grad));
  CHECK(op_named(eager, "L0.mlp_grad_sum.mb0").bytes == mop::test::rel(1 * 3 * grad));
  CHECK(op_named(eager, "L0.attn_grad_sum.mb0").category == sim::Category::backward);
  // Compiled without SP: Inductor reads the other gradients inside the norm's backward.
  ctx.compiled = true;
  const sim::Schedule compiled = lower(dp8_plan("fsdp2"), ctx);
  CHECK(op_named(compiled, "L0.attn_grad_sum.mb0").bytes == mop::test::rel(2 * grad));
  CHECK(op_named(compiled, "L0.mlp_grad_sum.mb0").bytes == mop::test::rel(1 * grad));
  // FP8 (torchao row-wise): eager, every projection casts its input (8 B per element) and its
  // weight (10 B); compiled, graph CSE leaves one cast of the shared input.
  ctx.gemm_dtype = sim::Dtype::fp8;
  ctx.compiled = false;
  const sim::Schedule eager8 = lower(dp8_plan("fsdp2"), ctx);
  CHECK(op_named(eager8, "L0.k_proj.mb0").bytes == mop::test::rel(t * h * 8 + 8 * d * h * 10));
  ctx.compiled = true;
  const sim::Schedule compiled8 = lower(dp8_plan("fsdp2"), ctx);
  CHECK(op_named(compiled8, "L0.q_proj.mb0").bytes == mop::test::rel(t * h * 8 + 32 * d * h * 10));
  CHECK(op_named(compiled8, "L0.k_proj.mb0").bytes == mop::test::rel(8 * d * h * 10));
  CHECK(op_named(compiled8, "L0.mlp_up.mb0").bytes == mop::test::rel(inter * h * 10));
  // Each projection's input gradient still quantizes its own output gradient.
  CHECK(op_named(compiled8, "L0.k_proj.mb0.dgrad").bytes == mop::test::rel(t * 8 * d * 8));
}

TEST_CASE("PyTorch's ring attention: K/V gathered at once, FP32 K/V gradients, eager FP32 "
          "merges, and torchtitan's repeated K/V heads travel whole" *
          doctest::test_suite("independent")) {
  // Llama 3 8B (32 query heads, 8 K/V heads of 128) at 32K over a ring of 4: 8,192 tokens a rank.
  const workload::ModelSpec m = workload::load_model("llama3-8b");
  const hw::ClusterSpec c = hw::load_cluster("h100");
  LoweringContext ctx{&m, 32768, 8, memory_hardware(c), {}};
  auto ring4 = [](const std::string& family) {
    Plan p;
    p.family = family;
    p.world = 8;
    p.attention.cp = 4;
    p.global_batch = 4;
    complete_plan(p);
    return p;
  };
  const double t = 8192, d = 128, kv = 2 * t * 8 * d * 2; // this rank's K and V, BF16
  // Transformer Engine's ring: one block a hop, three hops forward; BF16 gradients back.
  const sim::Schedule te = lower(ring4("megatron"), ctx);
  CHECK(op_named(te, "L0.attn_core.mb0.ring_kv.0").bytes == mop::test::rel(kv));
  CHECK(op_named(te, "L0.attn_core.mb0.ring_dkv.0").bytes == mop::test::rel(kv));
  // PyTorch (torch/distributed/tensor/experimental/_attention.py): its all-to-all rotater passes
  // a block a step, its default all-gather rotater brings all four in one collective; the K/V
  // gradients travel in FP32 either way.
  const sim::Schedule a2a = lower(ring4("fsdp2"), ctx);
  CHECK(op_named(a2a, "L0.attn_core.mb0.ring_kv.0").bytes == mop::test::rel(kv));
  CHECK(op_named(a2a, "L0.attn_core.mb0.ring_dkv.0").bytes == mop::test::rel(2 * kv));
  ctx.cp_gathers_kv = true;
  const sim::Schedule torch = lower(ring4("fsdp2"), ctx);
  const sim::Op& gather = op_named(torch, "L0.attn_core.mb0.ring_kv_gather.0");
  CHECK(gather.kind == sim::OpKind::all_gather);
  CHECK(gather.bytes == mop::test::rel(4 * kv));
  CHECK(op_named(torch, "L0.attn_core.mb0.ring_dkv.0").bytes == mop::test::rel(2 * kv));
  // Merges, by hand: a step after the first casts its output to FP32 and merges it (34 B an
  // element) on all rows or, on half the (rank, step) pairs, on half of them plus a torch.cat
  // rebuild of the whole FP32 output (8 B): 34·3/4 + 8/2 = 29.5 B per output element.
  const double out = t * 32 * d;
  CHECK(op_named(torch, "L0.attn_core.mb0.merge.1").bytes == mop::test::rel(29.5 * out));
  // Backward: Q and K/V gradients added into FP32 accumulators (10 B an element, half the rows
  // with an 8 B rebuild on half the steps: 7.5 + 4) and the K/V gradients packed (8 B).
  const double q = t * 32 * d, kv_elements = 2 * t * 8 * d;
  CHECK(op_named(torch, "L0.attn_core.mb0.merge.bwd.0").bytes ==
        mop::test::rel(11.5 * (q + kv_elements) + 8 * kv_elements));
  // torchtitan repeats K/V to the 32 query heads before SDPA: four times the bytes travel.
  ctx.kv_heads_repeated = true;
  const sim::Schedule titan = lower(ring4("fsdp2"), ctx);
  CHECK(op_named(titan, "L0.attn_core.mb0.ring_kv_gather.0").bytes == mop::test::rel(16 * kv));
}

} // namespace strategies_lower_framework_test
