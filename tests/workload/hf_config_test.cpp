// The Hugging Face importer: layer kinds per architecture, and one sentence for each bad input.
#include "common/error.hpp"
#include "tests/support/approx.hpp"
#include "workload/hf_config.hpp"
#include "workload/params.hpp"

#include <doctest/doctest.h>

namespace workload_hf_config_test {

using namespace mop::workload;
using mop::Json;

namespace {
std::string error_of(const Json& config) {
  try {
    from_hf_config(config, "c.json", "c");
  } catch (const mop::InputError& e) {
    return e.what();
  }
  return "";
}

Json llama() {
  return Json::parse(R"({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "vocab_size": 256})");
}
} // namespace

TEST_CASE("bad configs get one sentence naming the file and the field" *
          doctest::test_suite("plumbing")) {
  Json c = llama();
  c["model_type"] = "bloom";
  CHECK(error_of(c).starts_with("c.json: field 'model_type' is 'bloom'; supported model types"));
  c = llama();
  c.erase("hidden_size");
  CHECK(error_of(c) == "c.json: field 'hidden_size' is missing; it must be a positive integer.");
  c = llama();
  c["num_hidden_layers"] = 0;
  CHECK(error_of(c) == "c.json: field 'num_hidden_layers' must be a positive integer (got 0).");
  c = llama();
  c["num_attention_heads"] = 5; // 64 / 5 is not whole and no head_dim is given
  CHECK(error_of(c) == "c.json: field 'num_attention_heads' (5) must divide hidden_size (64) when "
                       "head_dim is not given.");
  c = llama();
  c["num_key_value_heads"] = 3;
  CHECK(error_of(c) ==
        "c.json: field 'num_key_value_heads' (3) must divide num_attention_heads (4).");
  c = Json::array();
  CHECK(error_of(c) == "c.json: expected a JSON object at the top level.");
  c = llama();
  c.erase("model_type");
  CHECK(error_of(c) == "c.json: field 'model_type' is missing; it must be a string.");
}

TEST_CASE("a MoE config whose top-k exceeds its experts is refused" *
          doctest::test_suite("plumbing")) {
  const Json c = Json::parse(R"({"model_type": "mixtral", "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 256, "num_local_experts": 4,
    "num_experts_per_tok": 8})");
  CHECK(error_of(c) == "c.json: field 'num_experts_per_tok' (8) must be between 1 and the number "
                       "of routed experts (4).");
}

TEST_CASE("DeepSeek layers: the first k are dense, MTP is kept apart" *
          doctest::test_suite("plumbing")) {
  const Json c = Json::parse(R"({"model_type": "deepseek_v3", "hidden_size": 64,
    "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 4,
    "num_attention_heads": 4, "vocab_size": 256, "q_lora_rank": 32, "kv_lora_rank": 16,
    "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 8,
    "n_shared_experts": 1, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
    "moe_layer_freq": 1, "num_nextn_predict_layers": 1, "topk_method": "noaux_tc"})");
  const ModelSpec m = from_hf_config(c, "c.json", "c");
  CHECK(m.layers[0].mlp == MlpKind::dense);
  CHECK(m.layers[1].mlp == MlpKind::moe);
  CHECK(m.num_moe_layers() == 3);
  CHECK(m.attention.kind == AttentionKind::mla);
  CHECK(m.attention.qk_head_dim() == 24);
  CHECK(m.num_mtp_modules == 1);
  // MTP by hand: enorm + hnorm 2*64, eh_proj 2*64*64, head norm 64, one MoE layer:
  // attention q_a 64*32 + 32 + q_b 32*4*24 + kv_a 64*(16+8) + 16 + kv_b 16*4*(16+16) + o 4*16*64
  // = 2048+32+3072+1536+16+2048+4096 = 12848; experts 8*3*64*32 = 49152; shared 3*64*32 = 6144;
  // router 64*8 + 8 score corrections = 520; norms 128.
  const ParamReport p = count_params(m);
  CHECK(p.mtp == 128 + 8192 + 64 + 12848 + 49152 + 6144 + 520 + 128);
  CHECK(p.mtp_stored == p.mtp + 2 * 256 * 64);
}

TEST_CASE("Llama 4 interleaves MoE layers and Maverick is 400B total, 17B active (Meta)" *
          doctest::test_suite("independent")) {
  // Llama-4-Maverick text config (Hugging Face meta-llama/Llama-4-Maverick-17B-128E).
  const Json c = Json::parse(R"({"model_type": "llama4", "text_config": {
    "model_type": "llama4_text", "hidden_size": 5120, "intermediate_size": 8192,
    "intermediate_size_mlp": 16384, "num_hidden_layers": 48, "num_attention_heads": 40,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 202048, "num_local_experts": 128,
    "num_experts_per_tok": 1, "interleave_moe_layer_step": 2, "tie_word_embeddings": false}})");
  const ModelSpec m = from_hf_config(c, "c.json", "c");
  CHECK(m.num_moe_layers() == 24);
  CHECK(m.layers[0].mlp == MlpKind::dense);
  CHECK(m.layers[1].mlp == MlpKind::moe);
  const ParamReport p = count_params(m);
  // Meta publishes 400B total (text and vision; the vision encoder is under 1B) and 17B active.
  CHECK(static_cast<double>(p.total.total()) == mop::test::rel(400e9, 0.01));
  CHECK(static_cast<double>(p.active.total()) == mop::test::rel(17e9, 0.03));
}

TEST_CASE("gpt-oss alternates sliding and full attention from layer_types" *
          doctest::test_suite("plumbing")) {
  const Json c = Json::parse(R"({"model_type": "gpt_oss", "hidden_size": 64,
    "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 256, "num_local_experts": 4,
    "num_experts_per_tok": 2, "sliding_window": 8, "attention_bias": true,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]})");
  const ModelSpec m = from_hf_config(c, "c.json", "c");
  CHECK(m.layers[0].window == 8);
  CHECK(m.layers[1].window == 0);
  CHECK(m.attention.sinks);
  Json bad = c;
  bad["layer_types"] = Json::array({"sliding_attention"});
  CHECK(error_of(bad) == "c.json: field 'layer_types' must be a list of 4 layer types (got "
                         "[\"sliding_attention\"]).");
}

TEST_CASE("GPT-2 small has 124,439,808 parameters (Hugging Face gpt2 checkpoint)" *
          doctest::test_suite("independent")) {
  const Json c = Json::parse(R"({"model_type": "gpt2", "n_embd": 768, "n_layer": 12,
    "n_head": 12, "n_positions": 1024, "vocab_size": 50257})");
  const ModelSpec m = from_hf_config(c, "c.json", "gpt2");
  CHECK(count_params(m).total.total() == 124439808);
  CHECK(m.tied_embeddings);
}

TEST_CASE("Qwen3 dense reads as Llama with QK-norm: Qwen3-8B is 8.2B (Qwen3 model card)" *
          doctest::test_suite("independent")) {
  const Json c = Json::parse(R"({"model_type": "qwen3", "hidden_size": 4096,
    "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "intermediate_size": 12288, "vocab_size": 151936,
    "tie_word_embeddings": false})");
  const ModelSpec m = from_hf_config(c, "c.json", "qwen3-8b");
  CHECK(m.attention.qk_norm);
  CHECK(static_cast<double>(count_params(m).total.total()) == mop::test::rel(8.2e9, 0.007));
}

TEST_CASE("every model dimension has a ceiling, checked before anything is sized by it" *
          doctest::test_suite("plumbing")) {
  Json c = llama();
  c["hidden_size"] = std::int64_t{1} << 40; // overflowed the parameter count before
  CHECK(error_of(c) == "c.json: field 'hidden_size' (1099511627776) is above mop's ceiling of "
                       "1048576.");
  c = llama();
  c["num_hidden_layers"] = 100'000'000; // 10^8 layers: GiB of layer specs before
  CHECK(error_of(c) == "c.json: field 'num_hidden_layers' (100000000) is above mop's ceiling of "
                       "1024.");
  c = llama();
  c["vocab_size"] = std::int64_t{1} << 25;
  CHECK(error_of(c) == "c.json: field 'vocab_size' (33554432) is above mop's ceiling of 16777216.");
  c = Json::parse(R"({"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_local_experts": 2147483648,
    "num_experts_per_tok": 2, "vocab_size": 256})");
  CHECK(error_of(c) == "c.json: field 'num_experts' (2147483648) is above mop's ceiling of 65536.");
  c = Json::parse(R"({"model_type": "gpt2", "n_embd": 4611686018427387904, "n_layer": 2,
    "n_head": 4, "vocab_size": 256})"); // 2^62: its default n_inner = 4h would wrap
  CHECK(error_of(c) == "c.json: field 'n_embd' (4611686018427387904) is above mop's ceiling of "
                       "1048576.");
  c = llama();
  c["model_type"] = "qwen3_moe";
  c["num_experts"] = 4;
  c["moe_intermediate_size"] = 32;
  c["mlp_only_layers"] = Json::array();
  for (int i = 0; i < 1025; ++i)
    c["mlp_only_layers"].push_back(0);
  CHECK(error_of(c) == "c.json: field 'mlp_only_layers' must be a list of at most 1024 layer "
                       "indices (got a list of 1025 values).");
}

TEST_CASE("a model at the ceilings is accepted, their product past 64 bits is refused" *
          doctest::test_suite("independent")) {
  // hidden 2^20 (the ceiling), one layer, 128 heads of 8192: attention is 4·h² = 2^42 weights.
  Json c = llama();
  c["hidden_size"] = std::int64_t{1} << 20;
  c["num_hidden_layers"] = 1;
  c["num_attention_heads"] = 128;
  c["num_key_value_heads"] = 128;
  CHECK(error_of(c).empty());
  // Each dimension below its ceiling, but 2^10 layers x 2^16 experts x 3·2^20·2^22 weights is
  // about 2^69.6: beyond int64 (2^63), so the count itself cannot be formed.
  c = Json::parse(R"({"model_type": "mixtral", "hidden_size": 1048576,
    "intermediate_size": 4194304, "num_hidden_layers": 1024, "num_attention_heads": 128,
    "num_local_experts": 65536, "num_experts_per_tok": 2, "vocab_size": 256})");
  CHECK(error_of(c) == "c.json: the model is too large to count its parameters in 64 bits (mop's "
                       "ceiling is 1125899906842624).");
  // Within int64 but above the 2^50 ceiling: 1024 dense layers of hidden h = 2^20, FFN 2^22,
  // 128 heads of 8192. Per layer: q, k, v, o 4·h² = 2^42, gated MLP 3·h·2^22 = 3·2^42, two
  // norms 2^21; plus embedding and untied head 2·256·h = 2^29 and the final norm 2^20:
  // 1024·(2^42 + 3·2^42 + 2^21) + 2^29 + 2^20 = 18,014,401,194,885,120.
  c = llama();
  c["hidden_size"] = std::int64_t{1} << 20;
  c["intermediate_size"] = std::int64_t{1} << 22;
  c["num_hidden_layers"] = 1024;
  c["num_attention_heads"] = 128;
  c["num_key_value_heads"] = 128;
  CHECK(error_of(c) == "c.json: the model has 18014401194885120 parameters, above mop's ceiling "
                       "of 1125899906842624.");
}

} // namespace workload_hf_config_test
