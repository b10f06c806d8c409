#include "workload/model_spec.hpp"

#include "common/error.hpp"

#include <fmt/format.h>

namespace mop::workload {

std::int64_t AttentionSpec::qk_head_dim() const {
  return kind == AttentionKind::mla ? qk_nope_head_dim + qk_rope_head_dim : head_dim;
}

std::int64_t AttentionSpec::v_dim() const {
  return kind == AttentionKind::mla ? v_head_dim : head_dim;
}

std::int64_t ModelSpec::num_moe_layers() const {
  std::int64_t n = 0;
  for (const LayerSpec& l : layers)
    n += l.mlp == MlpKind::moe ? 1 : 0;
  return n;
}

void validate(const ModelSpec& m, const std::string& origin) {
  auto bad = [&](const std::string& field, const std::string& why) {
    throw InputError(fmt::format("{}: field '{}' {}.", origin, field, why));
  };
  if (m.hidden_size <= 0)
    bad("hidden_size", "must be a positive integer");
  if (m.vocab_size <= 0)
    bad("vocab_size", "must be a positive integer");
  if (m.layers.empty())
    bad("num_hidden_layers", "must be a positive integer");
  const AttentionSpec& a = m.attention;
  if (a.num_heads <= 0)
    bad("num_attention_heads", "must be a positive integer");
  if (a.kind == AttentionKind::gqa) {
    if (a.num_kv_heads <= 0)
      bad("num_key_value_heads", "must be a positive integer");
    if (a.num_heads % a.num_kv_heads != 0)
      bad("num_key_value_heads",
          fmt::format("({}) must divide num_attention_heads ({})", a.num_kv_heads, a.num_heads));
    if (a.head_dim <= 0)
      bad("head_dim", "must be a positive integer");
  } else {
    if (a.kv_lora_rank <= 0)
      bad("kv_lora_rank", "must be a positive integer for MLA attention");
    if (a.qk_nope_head_dim <= 0)
      bad("qk_nope_head_dim", "must be a positive integer for MLA attention");
    if (a.qk_rope_head_dim <= 0)
      bad("qk_rope_head_dim", "must be a positive integer for MLA attention");
    if (a.v_head_dim <= 0)
      bad("v_head_dim", "must be a positive integer for MLA attention");
  }
  bool any_dense = false;
  for (const LayerSpec& l : m.layers) {
    any_dense |= l.mlp == MlpKind::dense;
    if (l.window < 0)
      bad("sliding_window", "must not be negative");
  }
  if (m.num_mtp_modules > 0)
    any_dense |= m.mtp_layer.mlp == MlpKind::dense;
  if (any_dense && m.dense_mlp.intermediate_size <= 0)
    bad("intermediate_size", "must be a positive integer (the model has dense MLP layers)");
  if (m.is_moe() || (m.num_mtp_modules > 0 && m.mtp_layer.mlp == MlpKind::moe)) {
    const MoeSpec& e = m.moe;
    if (e.num_routed_experts <= 0)
      bad("num_experts", "must be a positive integer for a Mixture-of-Experts model");
    if (e.experts_per_token <= 0 || e.experts_per_token > e.num_routed_experts)
      bad("num_experts_per_tok",
          fmt::format("({}) must be between 1 and the number of routed experts ({})",
                      e.experts_per_token, e.num_routed_experts));
    if (e.expert_intermediate_size <= 0)
      bad("moe_intermediate_size", "must be a positive integer");
    if (e.num_shared_experts > 0 && e.shared_intermediate_size <= 0)
      bad("n_shared_experts", "needs a positive shared-expert intermediate size");
  }
}

} // namespace mop::workload
