#include "workload/params.hpp"

namespace mop::workload {

std::int64_t ParamCounts::total() const {
  return embedding + attention + dense_mlp + shared_experts + routed_experts + router + norms +
         lm_head;
}

ParamCounts& ParamCounts::operator+=(const ParamCounts& o) {
  embedding += o.embedding;
  attention += o.attention;
  dense_mlp += o.dense_mlp;
  shared_experts += o.shared_experts;
  routed_experts += o.routed_experts;
  router += o.router;
  norms += o.norms;
  lm_head += o.lm_head;
  return *this;
}

namespace {

std::int64_t attention_params(const AttentionSpec& a, std::int64_t h) {
  std::int64_t p = 0;
  if (a.kind == AttentionKind::gqa) {
    const std::int64_t q = a.num_heads * a.head_dim;
    const std::int64_t kv = a.num_kv_heads * a.head_dim;
    p += h * q + 2 * h * kv + q * h; // q, k, v, o
    if (a.qkv_bias)
      p += q + 2 * kv;
    if (a.out_bias)
      p += h;
    if (a.qk_norm)
      p += 2 * a.head_dim; // one RMSNorm scale for q heads, one for k heads
  } else {
    const std::int64_t qk = a.qk_nope_head_dim + a.qk_rope_head_dim;
    if (a.q_lora_rank > 0)
      p += h * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * a.num_heads * qk; // q_a, norm, q_b
    else
      p += h * a.num_heads * qk;
    p += h * (a.kv_lora_rank + a.qk_rope_head_dim);                          // kv_a (with k_rope)
    p += a.kv_lora_rank;                                                     // kv_a_layernorm
    p += a.kv_lora_rank * a.num_heads * (a.qk_nope_head_dim + a.v_head_dim); // kv_b
    p += a.num_heads * a.v_head_dim * h;                                     // o_proj
    if (a.out_bias)
      p += h;
  }
  if (a.sinks)
    p += a.num_heads;
  return p;
}

std::int64_t mlp_params(std::int64_t h, std::int64_t inter, bool gated, bool bias) {
  const std::int64_t up = (gated ? 2 : 1) * inter; // gate and up share the input
  std::int64_t p = h * up + inter * h;
  if (bias)
    p += up + h;
  return p;
}

} // namespace

std::int64_t routed_expert_params(const MoeSpec& moe, std::int64_t hidden) {
  return mlp_params(hidden, moe.expert_intermediate_size, moe.gated, moe.expert_bias);
}

ParamCounts layer_params(const ModelSpec& m, const LayerSpec& layer) {
  const std::int64_t h = m.hidden_size;
  ParamCounts c;
  c.attention = attention_params(m.attention, h);
  c.norms = (m.norm_bias ? 4 : 2) * h; // two norms per layer; LayerNorm adds a bias to each
  if (layer.mlp == MlpKind::dense) {
    c.dense_mlp = mlp_params(h, m.dense_mlp.intermediate_size, m.dense_mlp.gated, m.dense_mlp.bias);
  } else {
    const MoeSpec& e = m.moe;
    c.routed_experts = e.num_routed_experts * routed_expert_params(e, h);
    c.shared_experts =
        e.num_shared_experts * mlp_params(h, e.shared_intermediate_size, e.gated, false);
    c.router = h * e.num_routed_experts;
    if (e.router_bias)
      c.router += e.num_routed_experts;
    if (e.router_score_correction)
      c.router += e.num_routed_experts;
  }
  return c;
}

ParamReport count_params(const ModelSpec& m) {
  ParamReport r;
  const std::int64_t h = m.hidden_size;
  const std::int64_t table = m.vocab_size * h;
  auto active_of = [&](const LayerSpec& layer) {
    ParamCounts a = layer_params(m, layer);
    if (layer.mlp == MlpKind::moe)
      a.routed_experts = m.moe.experts_per_token * routed_expert_params(m.moe, h);
    return a;
  };
  r.total.embedding = table + m.learned_positions * h;
  r.total.lm_head = m.tied_embeddings ? 0 : table;
  r.total.norms = (m.norm_bias ? 2 : 1) * h; // final norm
  r.active = r.total;
  for (const LayerSpec& layer : m.layers) {
    r.total += layer_params(m, layer);
    r.active += active_of(layer);
  }
  if (m.num_mtp_modules > 0) {
    // enorm + hnorm + eh_proj (2h -> h) + shared_head.norm around one decoder layer.
    const std::int64_t wrapper = 2 * h + 2 * h * h + h;
    r.mtp = m.num_mtp_modules * (wrapper + layer_params(m, m.mtp_layer).total());
    r.mtp_active = m.num_mtp_modules * (wrapper + active_of(m.mtp_layer).total());
    r.mtp_stored = r.mtp + m.num_mtp_modules * 2 * table; // embed_tokens + shared_head.head
  }
  return r;
}

} // namespace mop::workload
