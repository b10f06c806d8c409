// Parameter counts against hand calculations and the totals the model authors published.
#include "tests/support/approx.hpp"
#include "workload/catalog.hpp"
#include "workload/params.hpp"

#include <cmath>
#include <doctest/doctest.h>

namespace workload_params_test {

using namespace mop::workload;

namespace {
// True when `value` rounds to `published` at the precision the publisher printed, i.e. lies
// within half a unit of its last digit: published 46.7e9 with unit 0.1e9 -> [46.65e9, 46.75e9].
bool rounds_to(double value, double published, double unit) {
  return std::fabs(value - published) <= unit / 2 + 1e-6 * unit;
}
} // namespace

TEST_CASE("tiny-dense: every weight counted by hand" * doctest::test_suite("independent")) {
  // h=64, I=128, 2 layers, 4 heads of 16, 2 KV heads, vocab 256, tied embeddings.
  // attention: q 64*64 + k 64*32 + v 64*32 + o 64*64 = 12288; MLP 3*64*128 = 24576;
  // norms 2*64 = 128 -> 36992 per layer; embedding 256*64 = 16384; final norm 64; no LM head.
  const ParamReport p = count_params(load_model("tiny-dense"));
  CHECK(p.total.attention == 2 * 12288);
  CHECK(p.total.dense_mlp == 2 * 24576);
  CHECK(p.total.lm_head == 0);
  CHECK(p.total.total() == 2 * 36992 + 16384 + 64);
  CHECK(p.active.total() == p.total.total());
}

TEST_CASE("tiny-moe: dense first layer, 8 experts top-2, QK-norm, untied head, by hand" *
          doctest::test_suite("independent")) {
  // attention 12288 + QK-norm 2*16 = 12320 per layer; layer 0 dense MLP 3*64*128 = 24576;
  // layer 1: 8 experts of 3*64*32 = 6144 each, router 64*8 = 512; norms 128 per layer;
  // embedding and head 256*64 each; final norm 64.
  const ParamReport p = count_params(load_model("tiny-moe"));
  CHECK(p.total.attention == 2 * 12320);
  CHECK(p.total.dense_mlp == 24576);
  CHECK(p.total.routed_experts == 8 * 6144);
  CHECK(p.total.router == 512);
  CHECK(p.total.total() == 2 * 12320 + 24576 + 8 * 6144 + 512 + 2 * 128 + 2 * 16384 + 64);
  CHECK(p.active.routed_experts == 2 * 6144);
  CHECK(p.active.total() == p.total.total() - 6 * 6144);
}

TEST_CASE("DeepSeek-V3 MLA attention per layer, projection by projection" *
          doctest::test_suite("independent")) {
  // q_a 7168*1536, q_a_norm 1536, q_b 1536*128*(128+64), kv_a 7168*(512+64), kv_a_norm 512,
  // kv_b 512*128*(128+128), o 128*128*7168.
  const std::int64_t by_hand = 7168LL * 1536 + 1536 + 1536LL * 128 * 192 + 7168LL * 576 + 512 +
                               512LL * 128 * 256 + 128LL * 128 * 7168;
  const ModelSpec m = load_model("deepseek-v3");
  CHECK(layer_params(m, m.layers[0]).attention == by_hand);
  CHECK(by_hand == 187107328);
}

TEST_CASE("DeepSeek-V3: 671B main model, 14B MTP as stored, 37B activated (DeepSeek-V3 README)" *
          doctest::test_suite("independent")) {
  const ParamReport p = count_params(load_model("deepseek-v3"));
  CHECK(rounds_to(static_cast<double>(p.total.total()), 671e9, 1e9));
  // "685B on Hugging Face = 671B main + 14B MTP". The hub figure also counts the FP8 block
  // scales (one fp32 per 128x128 block, about 0.04B), which are not parameters: the stored MTP
  // module is 13.46B here, so main + MTP lands at 684.49B, within 0.51B of 685B.
  const double stored = static_cast<double>(p.total.total() + p.mtp_stored);
  CHECK(stored == mop::test::rel(685e9, 0.001));
  CHECK(static_cast<double>(p.mtp_stored) == mop::test::rel(14e9, 0.05));
  // DeepSeek counts activated parameters without the input embedding table (a lookup):
  // with it the count is 37.55B, which would round to 38B.
  CHECK(rounds_to(static_cast<double>(p.active_without_embedding()), 37e9, 1e9));
}

TEST_CASE("Kimi-K2: about 1.03T total, 32B activated (Kimi K2 model card and report)" *
          doctest::test_suite("independent")) {
  const ParamReport p = count_params(load_model("kimi-k2"));
  CHECK(rounds_to(static_cast<double>(p.total.total()), 1.03e12, 0.01e12));
  // Same convention as DeepSeek (the architecture Kimi-K2 reuses): embedding table excluded.
  CHECK(rounds_to(static_cast<double>(p.active_without_embedding()), 32e9, 1e9));
  // Worked example (shared/reference): routed experts 1014.7B of the total.
  CHECK(rounds_to(static_cast<double>(p.total.routed_experts), 1014.7e9, 0.1e9));
}

TEST_CASE("Mixtral: 46.7B / 12.9B and 141B / 39B (Mistral AI announcements)" *
          doctest::test_suite("independent")) {
  const ParamReport a = count_params(load_model("mixtral-8x7b"));
  CHECK(rounds_to(static_cast<double>(a.total.total()), 46.7e9, 0.1e9));
  // Mistral counts active parameters with the embedding table (without it: 12.75B).
  CHECK(rounds_to(static_cast<double>(a.active.total()), 12.9e9, 0.1e9));
  const ParamReport b = count_params(load_model("mixtral-8x22b"));
  CHECK(rounds_to(static_cast<double>(b.total.total()), 141e9, 1e9));
  CHECK(rounds_to(static_cast<double>(b.active.total()), 39e9, 1e9));
}

TEST_CASE("Qwen3 MoE: 235B / 22B and 30.5B / 3.3B (Qwen3 model cards)" *
          doctest::test_suite("independent")) {
  // Qwen counts active parameters with the embedding table, and its cards also give the
  // non-embedding totals (embedding and LM head both excluded): 234B and 29.9B.
  const ParamReport a = count_params(load_model("qwen3-235b-a22b"));
  CHECK(rounds_to(static_cast<double>(a.total.total()), 235e9, 1e9));
  CHECK(rounds_to(static_cast<double>(a.active.total()), 22e9, 1e9));
  CHECK(rounds_to(static_cast<double>(a.total.total() - a.total.embedding - a.total.lm_head), 234e9,
                  1e9));
  // The 30B card truncates rather than rounds: 30.53B -> "30.5B", 3.353B -> "3.3B",
  // 29.91B -> "29.9B".
  const ParamReport b = count_params(load_model("qwen3-30b-a3b"));
  const auto truncates_to = [](std::int64_t v, double shown) {
    return static_cast<double>(v) >= shown && static_cast<double>(v) < shown + 0.1e9;
  };
  CHECK(truncates_to(b.total.total(), 30.5e9));
  CHECK(truncates_to(b.active.total(), 3.3e9));
  CHECK(truncates_to(b.total.total() - b.total.embedding - b.total.lm_head, 29.9e9));
}

TEST_CASE("gpt-oss: 116.83B / 5.13B and 20.91B / 3.61B (gpt-oss model card)" *
          doctest::test_suite("independent")) {
  // The model card counts active parameters without the embedding table, with the unembedding.
  const ParamReport a = count_params(load_model("gpt-oss-120b"));
  CHECK(rounds_to(static_cast<double>(a.total.total()), 116.83e9, 0.01e9));
  CHECK(rounds_to(static_cast<double>(a.active_without_embedding()), 5.13e9, 0.01e9));
  const ParamReport b = count_params(load_model("gpt-oss-20b"));
  CHECK(rounds_to(static_cast<double>(b.total.total()), 20.91e9, 0.01e9));
  CHECK(rounds_to(static_cast<double>(b.active_without_embedding()), 3.61e9, 0.01e9));
}

TEST_CASE("Llama 3.1: 8.03B, 70.6B (Hugging Face model pages) and 405B by hand" *
          doctest::test_suite("independent")) {
  CHECK(rounds_to(static_cast<double>(count_params(load_model("llama3-8b")).total.total()), 8.03e9,
                  0.01e9));
  CHECK(rounds_to(static_cast<double>(count_params(load_model("llama3-70b")).total.total()), 70.6e9,
                  0.1e9));
  // 405B: Meta's name truncates. By hand: 126 layers of attention 2*16384^2 + 2*16384*1024,
  // MLP 3*16384*53248, norms 2*16384; embedding and head 128256*16384 each; final norm 16384.
  const std::int64_t layer =
      2LL * 16384 * 16384 + 2LL * 16384 * 1024 + 3LL * 16384 * 53248 + 2 * 16384;
  const std::int64_t by_hand = 126 * layer + 2LL * 128256 * 16384 + 16384;
  const ParamReport p = count_params(load_model("llama3-405b"));
  CHECK(p.total.total() == by_hand);
  CHECK(static_cast<double>(by_hand) == mop::test::rel(405e9, 0.005));
}

TEST_CASE("a count past 64 bits throws instead of wrapping (a spec that skipped validate)" *
          doctest::test_suite("plumbing")) {
  ModelSpec m = load_model("tiny-moe");
  // One expert of hidden 2^20 and FFN 2^40 has 3·2^60 weights; tiny-moe's 8 of them are
  // 3·2^63, past int64 in one product.
  m.hidden_size = std::int64_t{1} << 20;
  m.moe.expert_intermediate_size = std::int64_t{1} << 40;
  CHECK_THROWS_AS(count_params(m), ParamCountOverflow);
  // 3·2^59 per layer is representable; eight such layers (3·2^62) sum past 2^63.
  ModelSpec d = load_model("tiny-dense");
  d.hidden_size = std::int64_t{1} << 20;
  d.dense_mlp.intermediate_size = std::int64_t{1} << 39; // MLP: 3·2^59 per layer, < 2^63
  d.layers.assign(8, LayerSpec{});
  CHECK_NOTHROW(layer_params(d, d.layers[0]));
  CHECK_THROWS_AS(count_params(d), ParamCountOverflow);
}

} // namespace workload_params_test
