#include "workload/model_spec.hpp"

#include "common/error.hpp"
#include "common/limits.hpp"
#include "workload/params.hpp"

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
  // Ceilings first (common/limits.hpp): every count below is then exact in 64 bits or refused.
  auto at_most = [&](const std::string& field, std::int64_t value, std::int64_t ceiling) {
    if (value > ceiling)
      throw InputError(fmt::format("{}: field '{}' ({}) is above mop's ceiling of {}.", origin,
                                   field, value, ceiling));
  };
  const AttentionSpec& att = m.attention;
  at_most("num_hidden_layers", m.num_layers(), limits::max_layers);
  at_most("hidden_size", m.hidden_size, limits::max_hidden_size);
  at_most("vocab_size", m.vocab_size, limits::max_vocab_size);
  at_most("num_attention_heads", att.num_heads, limits::max_attention_heads);
  at_most("num_key_value_heads", att.num_kv_heads, limits::max_attention_heads);
  at_most("head_dim", att.head_dim, limits::max_head_dim);
  at_most("q_lora_rank", att.q_lora_rank, limits::max_lora_rank);
  at_most("kv_lora_rank", att.kv_lora_rank, limits::max_lora_rank);
  at_most("qk_nope_head_dim", att.qk_nope_head_dim, limits::max_head_dim);
  at_most("qk_rope_head_dim", att.qk_rope_head_dim, limits::max_head_dim);
  at_most("v_head_dim", att.v_head_dim, limits::max_head_dim);
  at_most("intermediate_size", m.dense_mlp.intermediate_size, limits::max_intermediate_size);
  at_most("num_experts", m.moe.num_routed_experts, limits::max_routed_experts);
  at_most("num_experts_per_tok", m.moe.experts_per_token, limits::max_routed_experts);
  at_most("moe_intermediate_size", m.moe.expert_intermediate_size, limits::max_intermediate_size);
  at_most("n_shared_experts", m.moe.num_shared_experts, limits::max_shared_experts);
  at_most("shared_intermediate_size", m.moe.shared_intermediate_size,
          limits::max_intermediate_size);
  at_most("max_position_embeddings", m.max_position_embeddings, limits::max_positions);
  at_most("n_positions", m.learned_positions, limits::max_positions);
  at_most("num_nextn_predict_layers", m.num_mtp_modules, limits::max_mtp_modules);
  if (m.learned_positions < 0 || m.num_mtp_modules < 0 || att.q_lora_rank < 0 ||
      m.moe.num_shared_experts < 0)
    throw InputError(fmt::format("{}: a count of the model is negative.", origin));
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
    at_most("sliding_window", l.window, limits::max_positions);
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
  // Every dimension is now below its ceiling, yet layers x experts x hidden x intermediate may
  // still pass 2^63: the count is checked arithmetic, and bounded so that byte counts of all
  // states stay exact (limits::max_params).
  std::int64_t params = 0;
  try {
    const ParamReport r = count_params(m);
    params = r.total.total();
    if (__builtin_add_overflow(params, r.mtp_stored, &params))
      throw ParamCountOverflow();
  } catch (const ParamCountOverflow&) {
    throw InputError(fmt::format(
        "{}: the model is too large to count its parameters in 64 bits (mop's ceiling is {}).",
        origin, limits::max_params));
  }
  if (params > limits::max_params)
    throw InputError(fmt::format("{}: the model has {} parameters, above mop's ceiling of {}.",
                                 origin, params, limits::max_params));
}

} // namespace mop::workload
