// The analytic memory model against Korthikanti et al. 2022 and hand calculations.
#include "strategies/memory.hpp"
#include "tests/support/approx.hpp"
#include "workload/catalog.hpp"
#include "workload/params.hpp"

#include <doctest/doctest.h>

namespace strategies_memory_test {

using namespace mop::strategy;
using namespace mop::workload;

namespace {

// A GPT-3-style layer as Korthikanti et al. describe it: MHA, LayerNorm, 4h GeLU MLP, dropout.
ModelSpec gpt(std::int64_t h, std::int64_t heads, std::int64_t layers) {
  ModelSpec m;
  m.name = "gpt";
  m.hidden_size = h;
  m.vocab_size = 51200;
  m.attention.num_heads = heads;
  m.attention.num_kv_heads = heads;
  m.attention.head_dim = h / heads;
  m.dense_mlp.intermediate_size = 4 * h;
  m.dense_mlp.gated = false;
  m.layers.assign(static_cast<std::size_t>(layers), LayerSpec{});
  return m;
}

Plan tp_plan(int tp, bool sp, int world) {
  Plan p;
  p.world = world;
  p.attention.tp = tp;
  p.attention.sp = sp;
  p.dense.tp = tp;
  p.embed.tp = tp;
  p.global_batch = world / tp;
  complete_plan(p);
  return p;
}

const ActivationOptions kKorthikanti{.flash_attention = false, .dropout = true};

} // namespace

TEST_CASE("activations per layer reproduce Korthikanti et al. 2022, eqs. 1-4, for their models" *
          doctest::test_suite("independent")) {
  // Table 3 of "Reducing Activation Recomputation in Large Transformer Models":
  // GPT 22B (h 6144, a 64), 175B (12288, 96), 530B (20480, 128), 1T (25600, 160); s = 2048, t = 8.
  struct Config {
    std::int64_t h, a;
  };
  for (Config c : {Config{6144, 64}, Config{12288, 96}, Config{20480, 128}, Config{25600, 160}}) {
    const ModelSpec m = gpt(c.h, c.a, 1);
    const double s = 2048, b = 1, h = static_cast<double>(c.h), a = static_cast<double>(c.a);
    const double t = 8;
    CAPTURE(c.h);
    // No parallelism: sbh(34 + 5as/h).
    CHECK(layer_activation_bytes(m, m.layers[0], tp_plan(1, false, 8), 2048, Recompute::none,
                                 kKorthikanti) == mop::test::rel(s * b * h * (34 + 5 * a * s / h)));
    // Tensor parallel, no SP: sbh(10 + 24/t + 5as/(ht)).
    CHECK(layer_activation_bytes(m, m.layers[0], tp_plan(8, false, 8), 2048, Recompute::none,
                                 kKorthikanti) ==
          mop::test::rel(s * b * h * (10 + 24 / t + 5 * a * s / (h * t))));
    // Tensor + sequence parallel: sbh/t (34 + 5as/h).
    CHECK(layer_activation_bytes(m, m.layers[0], tp_plan(8, true, 8), 2048, Recompute::none,
                                 kKorthikanti) ==
          mop::test::rel(s * b * h / t * (34 + 5 * a * s / h)));
    // Full recompute keeps the layer input only: 2sbh, split by SP.
    CHECK(layer_activation_bytes(m, m.layers[0], tp_plan(8, true, 8), 2048, Recompute::full,
                                 kKorthikanti) == mop::test::rel(2 * s * b * h / t));
  }
}

TEST_CASE("flash attention removes the S x S term and keeps a log-sum-exp per head" *
          doctest::test_suite("independent")) {
  const ModelSpec m = gpt(4096, 32, 1);
  const Plan p = tp_plan(1, false, 8);
  const double s = 8192, h = 4096;
  // Without dropout: 34 - 3 dropout-mask bytes = 31 sbh... by tensor: norm inputs 4, QKV input 2,
  // Q K V 6, attention output 2, MLP input 2, fc1 output 8, GeLU output 8 = 32 sbh, plus the
  // FP32 log-sum-exp 4·s·a.
  CHECK(layer_activation_bytes(m, m.layers[0], p, 8192, Recompute::none) ==
        mop::test::rel(32 * s * h + 4 * s * 32));
}

TEST_CASE("ZeRO stages shard weights, gradients and optimizer state as DeepSpeed defines them" *
          doctest::test_suite("independent")) {
  // llama3-8b on one node of 8 GPUs, pure data parallel. Per rank, N = all parameters:
  // ZeRO-0: 2N + 4N + 12N; ZeRO-1: 2N + 4N + 12N/8; ZeRO-2: 2N + 4N/8 + 12N/8;
  // ZeRO-3: (2N + 4N + 12N)/8 (Rajbhandari et al. 2020, with FP32 gradients).
  const ModelSpec m = load_model("llama3-8b");
  const double n = static_cast<double>(count_params(m).total.total());
  MemoryHardware hw{.hbm_bytes = 80e9, .host_bytes = 2e12, .gpus_per_node = 8};
  for (int zero = 0; zero <= 3; ++zero) {
    Plan p;
    p.world = 8;
    p.global_batch = 8;
    for (auto& s : p.state)
      s.zero = zero;
    complete_plan(p);
    const MemoryReport r = analyze_memory(m, p, 4096, hw);
    const MemoryBreakdown& b = r.classes[0].hbm;
    CAPTURE(zero);
    CHECK(b.weights == mop::test::rel(zero >= 3 ? 2 * n / 8 : 2 * n));
    CHECK(b.grads == mop::test::rel(zero >= 2 ? 4 * n / 8 : 4 * n));
    CHECK(b.optimizer == mop::test::rel(zero >= 1 ? 12 * n / 8 : 12 * n));
  }
}

TEST_CASE("host placement moves optimizer state to host memory, counted per node" *
          doctest::test_suite("independent")) {
  const ModelSpec m = load_model("llama3-8b");
  const double n = static_cast<double>(count_params(m).total.total());
  MemoryHardware hw{.hbm_bytes = 80e9, .host_bytes = 2e12, .gpus_per_node = 8};
  Plan p;
  p.world = 8;
  p.global_batch = 8;
  p.optimizer = Placement::host;
  p.optimizer_on_host = true;
  complete_plan(p);
  const MemoryReport r = analyze_memory(m, p, 4096, hw);
  CHECK(r.classes[0].hbm.optimizer == 0);
  CHECK(r.classes[0].host.optimizer == mop::test::rel(12 * n / 8));
  // Eight ranks per node share the host: at least the whole 12N lives on the node.
  CHECK(r.peak_host_bytes >= 12 * n);
}

TEST_CASE("1F1B keeps pp - i micro-batches in flight on stage i, so the first stage is worst" *
          doctest::test_suite("independent")) {
  const ModelSpec m = load_model("llama3-70b");
  MemoryHardware hw{.hbm_bytes = 80e9, .host_bytes = 2e12, .gpus_per_node = 8};
  Plan p;
  p.world = 32;
  p.pp = 4;
  p.attention.tp = 8;
  p.dense.tp = 8;
  p.embed.tp = 8;
  p.global_batch = 64;
  complete_plan(p);
  const MemoryReport r = analyze_memory(m, p, 4096, hw);
  REQUIRE(r.classes.size() == 4);
  CHECK(r.classes[0].micro_batches_in_flight == 4);
  CHECK(r.classes[3].micro_batches_in_flight == 1);
  CHECK(r.worst == 0);
  // 80 layers over 4 stages: 20 each; stage 0's saved activations are 4x stage 3's (same layers).
  CHECK(r.classes[0].layers == 20);
}

TEST_CASE("interleaving holds Megatron-LM's in-flight figure on the first stage and its warm-up "
          "on the last" * doctest::test_suite("independent")) {
  // 80 layers over 4 stages × 2 chunks: 10 a chunk, half a stage's activations each.
  // Megatron-Core's interleaved schedule warms up with 2·(pp - s - 1) + (vp - 1)·pp chunk
  // forwards, then holds one more: by hand, stage 0 runs 2·3 + 4 = 10 and holds 11 chunks = 5.5
  // micro-batches, Megatron-LM's theoretical_memory_usage.py figure pp · (1 + (pp - 1)/(pp · vp))
  // = 4 · 11/8; stage 3 runs 4 and holds 5 chunks = 2.5 (plain 1F1B's count there is 1).
  const ModelSpec m = load_model("llama3-70b");
  MemoryHardware hw{.hbm_bytes = 80e9, .host_bytes = 2e12, .gpus_per_node = 8};
  Plan p;
  p.world = 32;
  p.pp = 4;
  p.vp = 2;
  p.schedule = PipelineSchedule::interleaved_1f1b;
  p.attention.tp = 8;
  p.dense.tp = 8;
  p.embed.tp = 8;
  p.global_batch = 64;
  complete_plan(p);
  const MemoryReport r = analyze_memory(m, p, 4096, hw);
  REQUIRE(r.classes.size() == 4);
  CHECK(r.classes[0].micro_batches_in_flight == mop::test::rel(4 * (1 + 3.0 / 8)));
  CHECK(r.classes[3].micro_batches_in_flight == mop::test::rel(2.5));
}

TEST_CASE("a plan that does not fit names what runs out first" * doctest::test_suite("plumbing")) {
  const ModelSpec m = load_model("llama3-70b");
  MemoryHardware hw{.hbm_bytes = 80e9, .host_bytes = 2e12, .gpus_per_node = 8};
  Plan p;
  p.world = 8;
  p.global_batch = 8;
  complete_plan(p);
  const MemoryReport r = analyze_memory(m, p, 8192, hw);
  CHECK_FALSE(r.fits());
  CHECK(r.first_to_run_out.starts_with("HBM runs out first on every rank"));
}

TEST_CASE("FSDP2 under a pipeline holds the stage's parameters and gradients whole for the step" *
          doctest::test_suite("independent")) {
  // Llama-3-8B on 16 GPUs, PP 2 x DP 8, ZeRO-3 everywhere. torch's pipelining keeps FSDP2's
  // parameters gathered from the first forward to the last backward and accumulates unsharded
  // gradients until the last backward: per stage, the BF16 shard (local / 8) plus the gathered
  // copy (local) of weights, and the whole local FP32 gradients. The same plan without ZeRO
  // (each rank holds local whole) gives `local` to compare with.
  const ModelSpec m = load_model("llama3-8b");
  MemoryHardware hw{.hbm_bytes = 141e9, .host_bytes = 2e12, .gpus_per_node = 8};
  Plan p;
  p.world = 16;
  p.pp = 2;
  p.global_batch = 16;
  for (StatePolicy& st : p.state)
    st.zero = 0;
  complete_plan(p);
  const MemoryReport whole = analyze_memory(m, p, 4096, hw);
  for (StatePolicy& st : p.state)
    st.zero = 3;
  complete_plan(p);
  const MemoryReport fsdp = analyze_memory(m, p, 4096, hw);
  for (std::size_t c = 0; c < 2; ++c) {
    const double w = whole.classes[c].hbm.weights; // 2 bytes x local
    CHECK(fsdp.classes[c].hbm.weights == mop::test::rel(w / 8 + w));
    CHECK(fsdp.classes[c].hbm.grads == mop::test::rel(whole.classes[c].hbm.grads));
    CHECK(fsdp.classes[c].hbm.optimizer == mop::test::rel(whole.classes[c].hbm.optimizer / 8));
  }
}

TEST_CASE("the eager PyTorch loss peaks in its backward: 12 bytes a logit, 16 under "
          "loss_parallel, 6 fused" *
          doctest::test_suite("independent")) {
  // Hand count for Llama-3-8B (vocabulary 128,256), 2 sequences of 8,192 tokens on one rank.
  // torchtitan's loss is cross_entropy(pred.flatten(0, 1).float(), ...). Forward: the BF16
  // logits (2 bytes), their FP32 copy (4) and the FP32 log-softmax (4) = 10. Backward, after
  // train.py's `del pred`: the saved log-softmax (4), nll_loss_backward's zeroed-and-scattered
  // FP32 gradient (4) and _log_softmax_backward_data's output (4) = 12, the larger.
  const ModelSpec m = load_model("llama3-8b");
  Plan p;
  p.world = 8;
  p.global_batch = 16;
  p.micro_batch = 2;
  p.family = "fsdp2";
  complete_plan(p);
  const double logits = 2.0 * 8192 * 128256;
  CHECK(logits_bytes(m, p, 8192) == mop::test::rel(logits * 12));
  // Compiled, or Megatron's fused cross-entropy: the BF16 logits and one FP32 buffer.
  ActivationOptions compiled;
  compiled.compiled_loss = true;
  CHECK(logits_bytes(m, p, 8192, compiled) == mop::test::rel(logits * 6));
  // Vocabulary-parallel: each rank its share. torch's loss_parallel (tensor/parallel/loss.py)
  // decomposes log-softmax: forward the BF16 logits, the FP32 copy, the shifted logits and the
  // exponentials (2 + 4 + 4 + 4 = 14); backward the saved log-softmax, the zeroed gradient,
  // its sum with exp(log-softmax) and that sum times the output gradient (4 + 4 + 4 + 4 = 16).
  p.embed.tp = 8;
  CHECK(logits_bytes(m, p, 8192) == mop::test::rel(logits * 16 / 8));
  // In a pipeline stage the schedule holds the stage's output (the BF16 logits) to its backward.
  p.pp = 2;
  CHECK(loss_bytes_per_logit(p) == 18);
  p.embed.tp = 1;
  CHECK(loss_bytes_per_logit(p) == 14);
  p.family = "megatron";
  CHECK(loss_bytes_per_logit(p) == 6);
  CHECK(loss_bytes_per_logit(p, compiled) == 6);
}

TEST_CASE("PyTorch's ring holds FP32 query and K/V gradient accumulators in backward beside "
          "the K/V blocks in flight" *
          doctest::test_suite("independent")) {
  // Llama 3 8B at 32K over a ring of 4: 8,192 tokens a rank, 8 K/V heads and 32 query heads of
  // 128. The same plan under both families; only the ring's buffers differ.
  const ModelSpec m = load_model("llama3-8b");
  const MemoryHardware hw{.hbm_bytes = 80e9, .host_bytes = 2e12, .gpus_per_node = 8};
  auto comm = [&](const std::string& family) {
    Plan p;
    p.family = family;
    p.world = 8;
    p.attention.cp = 4;
    p.global_batch = 4;
    complete_plan(p);
    return analyze_memory(m, p, 32768, hw).classes[0].hbm.comm_buffers;
  };
  const double t = 8192, kv_width = 8 * 256.0, q_width = 32 * 128.0;
  // By hand: FP32 query gradients, and FP32 K/V gradients, this rank's and the arrived ones.
  CHECK(comm("fsdp2") - comm("megatron") == mop::test::rel(4 * t * q_width + 8 * t * kv_width));
}

} // namespace strategies_memory_test
