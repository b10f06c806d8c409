// FLOP accounting against a hand-derived formula, the 6·N rule and brute-force pair counts.
#include "tests/support/approx.hpp"
#include "workload/catalog.hpp"
#include "workload/flops.hpp"
#include "workload/params.hpp"

#include <doctest/doctest.h>

namespace workload_flops_test {

using namespace mop::workload;

TEST_CASE("kept (query, key) pairs equal a brute-force count of the mask" *
          doctest::test_suite("independent")) {
  for (std::int64_t seq : {1, 2, 7, 64, 130}) {
    for (std::int64_t window : {0, 1, 3, 64, 128, 500}) {
      double brute = 0;
      for (std::int64_t q = 0; q < seq; ++q)
        for (std::int64_t k = 0; k <= q; ++k)
          brute += (window == 0 || q - k < window) ? 1 : 0;
      CAPTURE(seq);
      CAPTURE(window);
      CHECK(attended_pairs(seq, window) == brute);
    }
  }
}

TEST_CASE("tiny-dense forward FLOPs per token match the formula derived by hand" *
          doctest::test_suite("independent")) {
  // Per layer and token: GEMMs 2*(q 64*64 + k 64*32 + v 64*32 + o 64*64 + MLP 3*64*128)
  // = 2*36864 = 73728. Attention at S = 8: 8*9/2 = 36 kept pairs, 4 heads of 16, Q·Kᵀ and P·V:
  // 2*36*4*16*2 = 9216 per sequence = 1152 per token. LM head 2*64*256 = 32768 per token.
  const FlopReport f = count_flops(load_model("tiny-dense"), 8);
  CHECK(f.model_flops_fwd_per_token == mop::test::rel(2 * (73728 + 1152) + 32768));
  // Training = forward + backward (twice the forward's GEMM FLOPs): 3 × the hand figure above.
  CHECK(f.model_flops_train_per_token == mop::test::rel(3.0 * (2 * (73728 + 1152) + 32768)));
  CHECK(f[Component::attention_core].fwd_flops == mop::test::rel(2 * 9216));
  CHECK(f[Component::attention_core].bwd_flops == mop::test::rel(2 * 2 * 9216));
}

TEST_CASE("at short sequences training FLOPs per token approach 6 x active parameters" *
          doctest::test_suite("independent")) {
  // Kaplan et al. 2020: C = 6·N per token, N the non-embedding parameters a token touches.
  // Attention over 128 tokens and the norms (not matmuls) move it by well under 1 %.
  for (const char* id :
       {"llama3-8b", "mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3", "kimi-k2", "gpt-oss-120b"}) {
    CAPTURE(id);
    const ModelSpec m = load_model(id);
    const double n = static_cast<double>(count_params(m).active_without_embedding());
    CHECK(count_flops(m, 128).model_flops_train_per_token == mop::test::rel(6 * n, 0.01));
  }
}

TEST_CASE("Kimi-K2 forward FLOPs per token as in the worked example (second method)" *
          doctest::test_suite("independent")) {
  // shared/reference/worked-example-kimi-k2.md: attention core per token per layer
  // = heads*(d_qk + d_v)*S (half the keys, 2 FLOP per MAC), linear layers 2*(active - embedding).
  const ModelSpec m = load_model("kimi-k2");
  const double linear = 2.0 * static_cast<double>(count_params(m).active_without_embedding());
  for (std::int64_t seq :
       {std::int64_t{64} << 10, std::int64_t{128} << 10, std::int64_t{1} << 20}) {
    const double attention = 61.0 * 64 * (192 + 128) * static_cast<double>(seq);
    const FlopReport f = count_flops(m, seq);
    CAPTURE(seq);
    CHECK(f.model_flops_fwd_per_token == mop::test::rel(linear + attention, 0.002));
  }
  // The worked example's rounded table: 1.45e11 at 64K, 2.27e11 at 128K, 1.37e12 at 1M.
  CHECK(count_flops(m, 64 << 10).model_flops_fwd_per_token == mop::test::rel(1.45e11, 0.01));
  CHECK(count_flops(m, 1 << 20).model_flops_fwd_per_token == mop::test::rel(1.37e12, 0.01));
}

TEST_CASE("sliding-window layers of gpt-oss cost the window, not the context" *
          doctest::test_suite("independent")) {
  const ModelSpec m = load_model("gpt-oss-120b");
  const std::int64_t seq = 32768;
  const auto ops_of = [&](const LayerSpec& l) {
    for (const ForwardOp& op : layer_forward_ops(m, l, seq))
      if (op.component == Component::attention_core)
        return op.flops;
    return 0.0;
  };
  const LayerSpec sliding = m.layers[0];
  const LayerSpec full = m.layers[1];
  REQUIRE(sliding.window == 128);
  REQUIRE(full.window == 0);
  // 64 heads of 64: 4*64*64 FLOPs per kept pair; sliding keeps 128*129/2 + (S-128)*128 pairs.
  const double sliding_pairs = 128.0 * 129 / 2 + (seq - 128.0) * 128;
  CHECK(ops_of(sliding) == mop::test::rel(4.0 * 64 * 64 * sliding_pairs));
  CHECK(ops_of(full) == mop::test::rel(4.0 * 64 * 64 * seq * (seq + 1.0) / 2));
}

TEST_CASE("MoE expert GEMMs are grouped with tokens*k/E rows per expert" *
          doctest::test_suite("independent")) {
  const ModelSpec m = load_model("kimi-k2");
  const LayerSpec moe_layer = m.layers[5];
  REQUIRE(moe_layer.mlp == MlpKind::moe);
  for (const ForwardOp& op : layer_forward_ops(m, moe_layer, 4096)) {
    if (op.name == "experts_gate_up") {
      CHECK(op.op_class == OpClass::grouped_gemm);
      CHECK(op.instances == 384);
      CHECK(op.m == mop::test::rel(4096.0 * 8 / 384));
      CHECK(op.k == 7168);
      CHECK(op.n == 2 * 2048);
    }
  }
}

} // namespace workload_flops_test
