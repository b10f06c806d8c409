#include "workload/hf_config.hpp"

#include "common/error.hpp"
#include "common/limits.hpp"

#include <algorithm>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <set>

namespace mop::workload {
namespace {

// A count checked against its ceiling where it is read, before it sizes anything (the layer
// list) or is multiplied; validate() checks the rest with the same sentence.
std::int64_t bounded_positive_int(const JsonFields& f, const std::string& key,
                                  std::int64_t ceiling) {
  const std::int64_t n = f.positive_int(key);
  if (n > ceiling)
    throw InputError(fmt::format("{}: field '{}' ({}) is above mop's ceiling of {}.", f.origin(),
                                 key, n, ceiling));
  return n;
}

// Per-head dimension: `head_dim` when the config gives it, otherwise hidden / heads, which then
// must divide exactly.
std::int64_t head_dim_of(const JsonFields& f, std::int64_t hidden, std::int64_t heads) {
  if (f.has("head_dim"))
    return f.positive_int("head_dim");
  if (hidden % heads != 0)
    throw InputError(fmt::format("{}: field 'num_attention_heads' ({}) must divide hidden_size "
                                 "({}) when head_dim is not given.",
                                 f.origin(), heads, hidden));
  return hidden / heads;
}

void read_common(const JsonFields& f, ModelSpec& m) {
  m.hidden_size = f.positive_int("hidden_size");
  m.vocab_size = f.positive_int("vocab_size");
  m.tied_embeddings = f.bool_or("tie_word_embeddings", false);
  m.max_position_embeddings = f.positive_int_or("max_position_embeddings", 0);
  // Hugging Face defaults (LlamaConfig): rms_norm_eps 1e-6, rope_theta 10000.
  m.norm_eps =
      f.positive_number_or("rms_norm_eps", f.positive_number_or("layer_norm_epsilon", 1e-6));
  m.rope_theta = f.positive_number_or("rope_theta", 10000.0);
  // Bounded before the layers are allocated (validate checks every other ceiling).
  m.layers.assign(
      static_cast<std::size_t>(bounded_positive_int(f, "num_hidden_layers", limits::max_layers)),
      LayerSpec{});
}

void read_gqa(const JsonFields& f, ModelSpec& m) {
  AttentionSpec& a = m.attention;
  a.kind = AttentionKind::gqa;
  a.num_heads = f.positive_int("num_attention_heads");
  a.num_kv_heads = f.positive_int_or("num_key_value_heads", a.num_heads);
  a.head_dim = head_dim_of(f, m.hidden_size, a.num_heads);
  a.qkv_bias = f.bool_or("attention_bias", false);
  a.out_bias = a.qkv_bias;
}

// A window from `sliding_window` when the config enables it (null or absent: full attention).
std::int64_t window_of(const JsonFields& f, bool enabled) {
  if (!enabled || !f.has("sliding_window"))
    return 0;
  return f.positive_int("sliding_window");
}

std::set<std::int64_t> int_set(const JsonFields& f, const std::string& key) {
  std::set<std::int64_t> out;
  if (!f.has(key))
    return out;
  const Json& v = f.at(key);
  if (!v.is_array() || static_cast<std::int64_t>(v.size()) > limits::max_layers)
    f.fail(key, fmt::format("a list of at most {} layer indices", limits::max_layers));
  for (const Json& e : v) {
    if (!e.is_number_integer() || e.get<std::int64_t>() < 0)
      f.fail(key, "a list of non-negative layer indices");
    out.insert(e.get<std::int64_t>());
  }
  return out;
}

void read_llama(const JsonFields& f, ModelSpec& m) {
  read_common(f, m);
  read_gqa(f, m);
  m.dense_mlp.intermediate_size = f.positive_int("intermediate_size");
  m.dense_mlp.bias = f.bool_or("mlp_bias", false);
  const std::int64_t window = window_of(f, true);
  for (LayerSpec& l : m.layers)
    l.window = window;
}

void read_mixtral(const JsonFields& f, ModelSpec& m) {
  read_common(f, m);
  read_gqa(f, m);
  m.moe.num_routed_experts = f.positive_int("num_local_experts");
  m.moe.experts_per_token = f.positive_int("num_experts_per_tok");
  m.moe.expert_intermediate_size = f.positive_int("intermediate_size");
  const std::int64_t window = window_of(f, true);
  for (LayerSpec& l : m.layers)
    l = LayerSpec{MlpKind::moe, window};
}

void read_qwen3_moe(const JsonFields& f, ModelSpec& m) {
  read_common(f, m);
  read_gqa(f, m);
  m.attention.qk_norm = true; // Qwen3 always normalises q and k per head
  m.dense_mlp.intermediate_size = f.positive_int_or("intermediate_size", 0);
  m.moe.num_routed_experts = f.non_negative_int_or("num_experts", 0);
  m.moe.experts_per_token = f.positive_int_or("num_experts_per_tok", 1);
  m.moe.expert_intermediate_size = f.positive_int_or("moe_intermediate_size", 0);
  const std::int64_t step = f.positive_int_or("decoder_sparse_step", 1);
  const std::set<std::int64_t> mlp_only = int_set(f, "mlp_only_layers");
  // HF Qwen3MoeDecoderLayer: sparse iff not in mlp_only_layers, experts > 0 and (i+1) % step == 0.
  // Sliding window applies to layers >= max_window_layers when use_sliding_window is true.
  const bool sliding = f.bool_or("use_sliding_window", false);
  const std::int64_t window = window_of(f, sliding);
  const std::int64_t max_window_layers = f.non_negative_int_or("max_window_layers", 0);
  for (std::int64_t i = 0; i < m.num_layers(); ++i) {
    LayerSpec& l = m.layers[static_cast<std::size_t>(i)];
    const bool sparse =
        !mlp_only.contains(i) && m.moe.num_routed_experts > 0 && (i + 1) % step == 0;
    l.mlp = sparse ? MlpKind::moe : MlpKind::dense;
    l.window = i >= max_window_layers ? window : 0;
  }
}

void read_deepseek(const JsonFields& f, ModelSpec& m) {
  read_common(f, m);
  AttentionSpec& a = m.attention;
  a.kind = AttentionKind::mla;
  a.num_heads = f.positive_int("num_attention_heads");
  a.num_kv_heads = a.num_heads;
  a.q_lora_rank = f.non_negative_int_or("q_lora_rank", 0); // null (DeepSeek-V2-Lite): full-rank q
  a.kv_lora_rank = f.positive_int("kv_lora_rank");
  a.qk_nope_head_dim = f.positive_int("qk_nope_head_dim");
  a.qk_rope_head_dim = f.positive_int("qk_rope_head_dim");
  a.v_head_dim = f.positive_int("v_head_dim");
  a.qkv_bias = f.bool_or("attention_bias", false);
  a.out_bias = a.qkv_bias;
  m.dense_mlp.intermediate_size = f.positive_int("intermediate_size");
  m.moe.num_routed_experts = f.non_negative_int_or("n_routed_experts", 0);
  m.moe.experts_per_token = f.positive_int_or("num_experts_per_tok", 1);
  m.moe.expert_intermediate_size = f.positive_int_or("moe_intermediate_size", 0);
  m.moe.num_shared_experts = f.non_negative_int_or("n_shared_experts", 0);
  m.moe.shared_intermediate_size = m.moe.expert_intermediate_size;
  // noaux_tc (DeepSeek-V3, Kimi-K2) keeps e_score_correction_bias per expert in each MoE layer.
  m.moe.router_score_correction = f.string_or("topk_method", "") == "noaux_tc";
  const std::int64_t first_dense = f.non_negative_int_or("first_k_dense_replace", 0);
  const std::int64_t freq = f.positive_int_or("moe_layer_freq", 1);
  // HF DeepseekV3DecoderLayer: MoE iff n_routed_experts and i >= first_k_dense_replace and
  // i % moe_layer_freq == 0.
  for (std::int64_t i = 0; i < m.num_layers(); ++i) {
    const bool sparse = m.moe.num_routed_experts > 0 && i >= first_dense && i % freq == 0;
    m.layers[static_cast<std::size_t>(i)].mlp = sparse ? MlpKind::moe : MlpKind::dense;
  }
  m.num_mtp_modules = f.non_negative_int_or("num_nextn_predict_layers", 0);
  // The MTP module's decoder layer has index num_hidden_layers, past first_k_dense_replace.
  m.mtp_layer.mlp = m.moe.num_routed_experts > 0 ? MlpKind::moe : MlpKind::dense;
}

void read_gpt_oss(const JsonFields& f, ModelSpec& m) {
  read_common(f, m);
  read_gqa(f, m);
  m.attention.sinks = true;
  m.moe.num_routed_experts = f.positive_int("num_local_experts");
  m.moe.experts_per_token = f.positive_int("num_experts_per_tok");
  m.moe.expert_intermediate_size = f.positive_int("intermediate_size");
  m.moe.expert_bias = true;
  m.moe.router_bias = true;
  const std::int64_t window = f.positive_int("sliding_window");
  // layer_types names each layer; absent, GPT-OSS alternates sliding (even) and full (odd).
  std::vector<std::string> types;
  if (f.has("layer_types")) {
    const Json& v = f.at("layer_types");
    if (!v.is_array() || static_cast<std::int64_t>(v.size()) != m.num_layers())
      f.fail("layer_types", fmt::format("a list of {} layer types", m.num_layers()));
    for (const Json& t : v) {
      if (!t.is_string() || (t != "sliding_attention" && t != "full_attention"))
        f.fail("layer_types", "a list of \"sliding_attention\" or \"full_attention\"");
      types.push_back(t.get<std::string>());
    }
  }
  for (std::int64_t i = 0; i < m.num_layers(); ++i) {
    const bool sliding =
        types.empty() ? i % 2 == 0 : types[static_cast<std::size_t>(i)] == "sliding_attention";
    m.layers[static_cast<std::size_t>(i)] = LayerSpec{MlpKind::moe, sliding ? window : 0};
  }
}

// Llama 4 text model: MoE layers interleaved with dense ones, one shared expert per MoE layer.
// Chunked local attention on RoPE layers is modelled as full attention here (an upper bound on
// the attention FLOPs) until chunked attention is added as its own variant.
void read_llama4(const JsonFields& outer, ModelSpec& m) {
  const Json& text = outer.has("text_config") ? outer.at("text_config") : Json();
  const JsonFields f =
      outer.has("text_config") ? JsonFields(text, outer.origin() + " text_config") : outer;
  read_common(f, m);
  read_gqa(f, m);
  m.moe.num_routed_experts = f.positive_int("num_local_experts");
  m.moe.experts_per_token = f.positive_int("num_experts_per_tok");
  m.moe.expert_intermediate_size = f.positive_int("intermediate_size");
  m.moe.num_shared_experts = 1;
  m.moe.shared_intermediate_size = m.moe.expert_intermediate_size;
  m.dense_mlp.intermediate_size = f.positive_int_or("intermediate_size_mlp", 0);
  std::set<std::int64_t> moe_layers = int_set(f, "moe_layers");
  if (moe_layers.empty()) {
    // HF Llama4TextConfig: moe_layers = range(step - 1, layers, step)
    const std::int64_t step = f.positive_int_or("interleave_moe_layer_step", 1);
    for (std::int64_t i = step - 1; i < m.num_layers(); i += step)
      moe_layers.insert(i);
  }
  for (std::int64_t i = 0; i < m.num_layers(); ++i)
    m.layers[static_cast<std::size_t>(i)].mlp =
        moe_layers.contains(i) ? MlpKind::moe : MlpKind::dense;
}

// GPT-2 / GPT-3 (Megatron's GPT): MHA with biases, LayerNorm with bias, a 4h GeLU MLP with
// biases, learned position embeddings; HF GPT2Config field names.
void read_gpt2(const JsonFields& f, ModelSpec& m) {
  m.hidden_size = bounded_positive_int(f, "n_embd", limits::max_hidden_size); // 4h below
  m.vocab_size = f.positive_int("vocab_size");
  m.tied_embeddings = f.bool_or("tie_word_embeddings", true);
  m.learned_positions = f.positive_int_or("n_positions", 1024);
  m.max_position_embeddings = m.learned_positions;
  m.norm_bias = true;
  m.layers.assign(static_cast<std::size_t>(bounded_positive_int(f, "n_layer", limits::max_layers)),
                  LayerSpec{});
  AttentionSpec& a = m.attention;
  a.num_heads = f.positive_int("n_head");
  a.num_kv_heads = a.num_heads;
  if (m.hidden_size % a.num_heads != 0)
    throw InputError(fmt::format("{}: field 'n_head' ({}) must divide n_embd ({}).", f.origin(),
                                 a.num_heads, m.hidden_size));
  a.head_dim = m.hidden_size / a.num_heads;
  a.qkv_bias = a.out_bias = true;
  m.dense_mlp.intermediate_size = f.positive_int_or("n_inner", 4 * m.hidden_size);
  m.dense_mlp.gated = false;
  m.dense_mlp.bias = true;
}

} // namespace

const std::vector<std::string>& supported_model_types() {
  static const std::vector<std::string> types = {
      "llama",       "mistral",     "qwen3",   "gpt2",    "mixtral", "qwen3_moe",
      "deepseek_v2", "deepseek_v3", "kimi_k2", "gpt_oss", "llama4",  "llama4_text"};
  return types;
}

ModelSpec from_hf_config(const Json& config, const std::string& origin, const std::string& name) {
  const JsonFields f(config, origin);
  const std::string type = f.string("model_type");
  ModelSpec m;
  m.name = name;
  m.model_type = type;
  m.display_name = f.string_or("mop_display_name", name);
  if (type == "llama" || type == "mistral" || type == "qwen3") {
    read_llama(f, m);
    m.attention.qk_norm = type == "qwen3"; // Qwen3 normalises q and k per head
  } else if (type == "gpt2")
    read_gpt2(f, m);
  else if (type == "mixtral")
    read_mixtral(f, m);
  else if (type == "qwen3_moe")
    read_qwen3_moe(f, m);
  else if (type == "deepseek_v2" || type == "deepseek_v3" || type == "kimi_k2")
    read_deepseek(f, m);
  else if (type == "gpt_oss")
    read_gpt_oss(f, m);
  else if (type == "llama4" || type == "llama4_text")
    read_llama4(f, m);
  else
    throw InputError(fmt::format("{}: field 'model_type' is '{}'; supported model types are {}.",
                                 origin, type, fmt::join(supported_model_types(), ", ")));
  validate(m, origin);
  return m;
}

} // namespace mop::workload
