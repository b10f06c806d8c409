#include "workload/params.hpp"

namespace mop::workload {
namespace {

// Checked int64 arithmetic (ParamCountOverflow in params.hpp says why).
struct Count {
  std::int64_t v;
};
Count operator*(Count a, Count b) {
  Count r;
  if (__builtin_mul_overflow(a.v, b.v, &r.v))
    throw ParamCountOverflow();
  return r;
}
Count operator+(Count a, Count b) {
  Count r;
  if (__builtin_add_overflow(a.v, b.v, &r.v))
    throw ParamCountOverflow();
  return r;
}
Count& operator+=(Count& a, Count b) {
  return a = a + b;
}
void add_to(std::int64_t& sum, std::int64_t x) {
  if (__builtin_add_overflow(sum, x, &sum))
    throw ParamCountOverflow();
}

} // namespace

std::int64_t ParamCounts::total() const {
  std::int64_t sum = 0;
  for (std::int64_t x :
       {embedding, attention, dense_mlp, shared_experts, routed_experts, router, norms, lm_head})
    add_to(sum, x);
  return sum;
}

ParamCounts& ParamCounts::operator+=(const ParamCounts& o) {
  add_to(embedding, o.embedding);
  add_to(attention, o.attention);
  add_to(dense_mlp, o.dense_mlp);
  add_to(shared_experts, o.shared_experts);
  add_to(routed_experts, o.routed_experts);
  add_to(router, o.router);
  add_to(norms, o.norms);
  add_to(lm_head, o.lm_head);
  return *this;
}

namespace {

std::int64_t attention_params(const AttentionSpec& a, std::int64_t hidden) {
  const Count h{hidden}, heads{a.num_heads};
  Count p{0};
  if (a.kind == AttentionKind::gqa) {
    const Count q = heads * Count{a.head_dim};
    const Count kv = Count{a.num_kv_heads} * Count{a.head_dim};
    p += h * q + Count{2} * h * kv + q * h; // q, k, v, o
    if (a.qkv_bias)
      p += q + Count{2} * kv;
    if (a.out_bias)
      p += h;
    if (a.qk_norm)
      p += Count{2} * Count{a.head_dim}; // one RMSNorm scale for q heads, one for k heads
  } else {
    const Count qk = Count{a.qk_nope_head_dim} + Count{a.qk_rope_head_dim};
    const Count q_rank{a.q_lora_rank}, kv_rank{a.kv_lora_rank};
    if (a.q_lora_rank > 0)
      p += h * q_rank + q_rank + q_rank * heads * qk; // q_a, norm, q_b
    else
      p += h * heads * qk;
    p += h * (kv_rank + Count{a.qk_rope_head_dim});                           // kv_a (k_rope)
    p += kv_rank;                                                             // kv_a_layernorm
    p += kv_rank * heads * (Count{a.qk_nope_head_dim} + Count{a.v_head_dim}); // kv_b
    p += heads * Count{a.v_head_dim} * h;                                     // o_proj
    if (a.out_bias)
      p += h;
  }
  if (a.sinks)
    p += heads;
  return p.v;
}

std::int64_t mlp_params(std::int64_t hidden, std::int64_t intermediate, bool gated, bool bias) {
  const Count h{hidden}, inter{intermediate};
  const Count up = Count{gated ? 2 : 1} * inter; // gate and up share the input
  Count p = h * up + inter * h;
  if (bias)
    p += up + h;
  return p.v;
}

} // namespace

std::int64_t routed_expert_params(const MoeSpec& moe, std::int64_t hidden) {
  return mlp_params(hidden, moe.expert_intermediate_size, moe.gated, moe.expert_bias);
}

ParamCounts layer_params(const ModelSpec& m, const LayerSpec& layer) {
  const Count h{m.hidden_size};
  ParamCounts c;
  c.attention = attention_params(m.attention, m.hidden_size);
  c.norms = (Count{m.norm_bias ? 4 : 2} * h).v; // two norms per layer; LayerNorm adds a bias
  if (layer.mlp == MlpKind::dense) {
    c.dense_mlp = mlp_params(m.hidden_size, m.dense_mlp.intermediate_size, m.dense_mlp.gated,
                             m.dense_mlp.bias);
  } else {
    const MoeSpec& e = m.moe;
    const Count experts{e.num_routed_experts};
    c.routed_experts = (experts * Count{routed_expert_params(e, m.hidden_size)}).v;
    c.shared_experts =
        (Count{e.num_shared_experts} *
         Count{mlp_params(m.hidden_size, e.shared_intermediate_size, e.gated, false)})
            .v;
    Count router = h * experts;
    if (e.router_bias)
      router += experts;
    if (e.router_score_correction)
      router += experts;
    c.router = router.v;
  }
  return c;
}

ParamReport count_params(const ModelSpec& m) {
  ParamReport r;
  const Count h{m.hidden_size};
  const Count table = Count{m.vocab_size} * h;
  auto active_of = [&](const LayerSpec& layer) {
    ParamCounts a = layer_params(m, layer);
    if (layer.mlp == MlpKind::moe)
      a.routed_experts =
          (Count{m.moe.experts_per_token} * Count{routed_expert_params(m.moe, m.hidden_size)}).v;
    return a;
  };
  r.total.embedding = (table + Count{m.learned_positions} * h).v;
  r.total.lm_head = m.tied_embeddings ? 0 : table.v;
  r.total.norms = (Count{m.norm_bias ? 2 : 1} * h).v; // final norm
  r.active = r.total;
  for (const LayerSpec& layer : m.layers) {
    r.total += layer_params(m, layer);
    r.active += active_of(layer);
  }
  if (m.num_mtp_modules > 0) {
    // enorm + hnorm + eh_proj (2h -> h) + shared_head.norm around one decoder layer.
    const Count modules{m.num_mtp_modules};
    const Count wrapper = Count{2} * h + Count{2} * h * h + h;
    r.mtp = (modules * (wrapper + Count{layer_params(m, m.mtp_layer).total()})).v;
    r.mtp_active = (modules * (wrapper + Count{active_of(m.mtp_layer).total()})).v;
    // embed_tokens + shared_head.head
    r.mtp_stored = (Count{r.mtp} + modules * Count{2} * table).v;
  }
  return r;
}

} // namespace mop::workload
