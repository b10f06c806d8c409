#include "workload/flops.hpp"

#include <algorithm>

namespace mop::workload {

const char* component_name(Component c) {
  switch (c) {
  case Component::attention_proj:
    return "attention_proj";
  case Component::attention_core:
    return "attention_core";
  case Component::dense_mlp:
    return "dense_mlp";
  case Component::shared_experts:
    return "shared_experts";
  case Component::routed_experts:
    return "routed_experts";
  case Component::router:
    return "router";
  case Component::lm_head:
    return "lm_head";
  case Component::elementwise:
    return "elementwise";
  }
  return "?";
}

double attended_pairs(std::int64_t seq, std::int64_t window) {
  const double s = static_cast<double>(seq);
  if (window <= 0 || window >= seq)
    return s * (s + 1) / 2;
  const double w = static_cast<double>(window);
  return w * (w + 1) / 2 + (s - w) * w;
}

bool is_model_flop(const ForwardOp& op) {
  return op.op_class != OpClass::elementwise;
}

namespace {

// Per-element FLOP constants of elementwise ops (forward), counted as a straightforward kernel
// computes them:
constexpr double kRmsNormFlops = 4;  // square, accumulate, multiply by rsqrt, multiply by scale
constexpr double kSwigluFlops = 5;   // silu(x) = x / (1 + exp(-x)): 3, times the up value: 1, +1
constexpr double kRopeFlops = 3;     // two multiplies and one add per rotated element
constexpr double kSoftmaxFlops = 5;  // max, subtract, exp, sum, scale per kept score
constexpr double kResidualFlops = 1; // one add
constexpr double kCrossEntropyFlops = 5; // max, subtract, exp, sum per logit; log at the end
constexpr double kRouterFlops = 5;       // softmax or sigmoid per expert score, then top-k

struct OpList {
  std::vector<ForwardOp> ops;
  double tokens;

  void gemm(std::string name, Component c, double k, double n, double instances = 1,
            double m_per_instance = -1) {
    const double m = m_per_instance < 0 ? tokens : m_per_instance;
    ForwardOp op{std::move(name),
                 c,
                 instances > 1 ? OpClass::grouped_gemm : OpClass::gemm,
                 m,
                 n,
                 k,
                 instances,
                 0,
                 0};
    op.flops = 2 * m * n * k * instances;
    op.bytes = (m * k + k * n + m * n) * kActivationBytes * instances;
    ops.push_back(std::move(op));
  }
  // `elements` processed, `flops_per_element`, bytes read+written per element.
  void elementwise(std::string name, double elements, double flops_per_element,
                   double bytes_per_element) {
    ops.push_back(ForwardOp{std::move(name), Component::elementwise, OpClass::elementwise, elements,
                            0, 0, 1, elements * flops_per_element,
                            elements * bytes_per_element * kActivationBytes});
  }
};

} // namespace

std::vector<ForwardOp> layer_forward_ops(const ModelSpec& m, const LayerSpec& layer,
                                         std::int64_t seq, std::int64_t batch) {
  const double b = static_cast<double>(batch);
  const double s = static_cast<double>(seq);
  const double t = b * s; // tokens in the micro-batch
  const double h = static_cast<double>(m.hidden_size);
  const AttentionSpec& a = m.attention;
  const double heads = static_cast<double>(a.num_heads);
  const double dqk = static_cast<double>(a.qk_head_dim());
  const double dv = static_cast<double>(a.v_dim());
  OpList l{{}, t};

  l.elementwise("rmsnorm_attn", t * h, kRmsNormFlops, 2);
  // Projections.
  double kv_heads = heads; // heads whose K and V the attention kernel reads
  if (a.kind == AttentionKind::gqa) {
    kv_heads = static_cast<double>(a.num_kv_heads);
    l.gemm("q_proj", Component::attention_proj, h, heads * dqk);
    l.gemm("k_proj", Component::attention_proj, h, kv_heads * dqk);
    l.gemm("v_proj", Component::attention_proj, h, kv_heads * dv);
    if (a.qk_norm)
      l.elementwise("qk_norm", t * (heads + kv_heads) * dqk, kRmsNormFlops, 2);
    l.elementwise("rope", t * (heads + kv_heads) * dqk, kRopeFlops, 2);
  } else {
    // MLA in its training (non-absorbed) form: K and V are expanded per head from the latent.
    const double qr = static_cast<double>(a.q_lora_rank);
    const double kvr = static_cast<double>(a.kv_lora_rank);
    const double rope = static_cast<double>(a.qk_rope_head_dim);
    const double nope = static_cast<double>(a.qk_nope_head_dim);
    if (a.q_lora_rank > 0) {
      l.gemm("q_a_proj", Component::attention_proj, h, qr);
      l.elementwise("q_a_norm", t * qr, kRmsNormFlops, 2);
      l.gemm("q_b_proj", Component::attention_proj, qr, heads * dqk);
    } else {
      l.gemm("q_proj", Component::attention_proj, h, heads * dqk);
    }
    l.gemm("kv_a_proj", Component::attention_proj, h, kvr + rope);
    l.elementwise("kv_a_norm", t * kvr, kRmsNormFlops, 2);
    l.gemm("kv_b_proj", Component::attention_proj, kvr, heads * (nope + dv));
    l.elementwise("rope", t * (heads + 1) * rope, kRopeFlops, 2);
  }
  // Attention core: Q·Kᵀ over the kept pairs, then P·V; flash-style (scores never in HBM).
  {
    const double pairs = b * attended_pairs(seq, layer.window);
    ForwardOp core{"attn_core",
                   Component::attention_core,
                   OpClass::attention,
                   s,
                   pairs / (b * s),
                   dqk,
                   b * heads,
                   0,
                   0};
    core.flops = 2 * pairs * heads * dqk + 2 * pairs * heads * dv;
    core.bytes = t * (heads * dqk + kv_heads * (dqk + dv) + heads * dv) * kActivationBytes;
    l.ops.push_back(core);
    l.elementwise("attn_softmax", pairs * heads, kSoftmaxFlops, 0); // in registers, no HBM
  }
  l.gemm("o_proj", Component::attention_proj, heads * dv, h);
  l.elementwise("residual_attn", t * h, kResidualFlops, 3);
  l.elementwise("rmsnorm_mlp", t * h, kRmsNormFlops, 2);
  if (layer.mlp == MlpKind::dense) {
    const double inter = static_cast<double>(m.dense_mlp.intermediate_size);
    const double up = (m.dense_mlp.gated ? 2 : 1) * inter;
    l.gemm("mlp_gate_up", Component::dense_mlp, h, up);
    l.elementwise("mlp_act", t * inter, kSwigluFlops, 3);
    l.gemm("mlp_down", Component::dense_mlp, inter, h);
  } else {
    const MoeSpec& e = m.moe;
    const double experts = static_cast<double>(e.num_routed_experts);
    const double topk = static_cast<double>(e.experts_per_token);
    const double inter = static_cast<double>(e.expert_intermediate_size);
    l.gemm("router", Component::router, h, experts);
    l.elementwise("router_topk", t * experts, kRouterFlops, 1);
    // Balanced routing: each expert receives tokens·k/E rows (uneven routing is a later model).
    const double rows = t * topk / experts;
    l.gemm("experts_gate_up", Component::routed_experts, h, (e.gated ? 2 : 1) * inter, experts,
           rows);
    l.elementwise("experts_act", t * topk * inter, kSwigluFlops, 3);
    l.gemm("experts_down", Component::routed_experts, inter, h, experts, rows);
    l.elementwise("experts_combine", t * topk * h, 2, 1); // weight and sum k expert outputs
    if (e.num_shared_experts > 0) {
      // The one integer product here: at most 2^10 shared experts x 2^22 (limits.hpp).
      const double shared = static_cast<double>(e.num_shared_experts * e.shared_intermediate_size);
      l.gemm("shared_gate_up", Component::shared_experts, h, (e.gated ? 2 : 1) * shared);
      l.elementwise("shared_act", t * shared, kSwigluFlops, 3);
      l.gemm("shared_down", Component::shared_experts, shared, h);
    }
  }
  l.elementwise("residual_mlp", t * h, kResidualFlops, 3);
  return std::move(l.ops);
}

std::vector<ForwardOp> head_forward_ops(const ModelSpec& m, std::int64_t seq, std::int64_t batch) {
  const double t = static_cast<double>(batch) * static_cast<double>(seq);
  const double h = static_cast<double>(m.hidden_size);
  const double v = static_cast<double>(m.vocab_size);
  OpList l{{}, t};
  l.elementwise("embedding", t * h, 0, 2); // gather rows: read and write, no arithmetic
  l.elementwise("final_norm", t * h, kRmsNormFlops, 2);
  l.gemm("lm_head", Component::lm_head, h, v);
  l.elementwise("cross_entropy", t * v, kCrossEntropyFlops, 1);
  return std::move(l.ops);
}

FlopReport count_flops(const ModelSpec& m, std::int64_t seq) {
  FlopReport r;
  r.seq = seq;
  auto add = [&](const std::vector<ForwardOp>& ops, double times) {
    for (const ForwardOp& op : ops) {
      ComponentCost& c = r.by_component[static_cast<int>(op.component)];
      c.fwd_flops += times * op.flops;
      c.fwd_bytes += times * op.bytes;
      // Backward: each GEMM becomes two (input gradient, weight gradient) of the same size, so
      // 2× FLOPs (the model-FLOPs convention; flash attention's recompute inside its backward
      // is hardware work, charged by the cost model, not here). Bytes: both GEMMs read their
      // operands and write one result, elementwise backward reads saved inputs and gradients.
      c.bwd_flops += times * 2 * op.flops;
      c.bwd_bytes += times * 2 * op.bytes;
      if (is_model_flop(op))
        r.model_flops_fwd += times * op.flops;
      else
        r.elementwise_flops_fwd += times * op.flops;
      r.bytes_fwd += times * op.bytes;
    }
  };
  for (const LayerSpec& layer : m.layers)
    add(layer_forward_ops(m, layer, seq), 1);
  add(head_forward_ops(m, seq), 1);
  const double tokens = static_cast<double>(seq);
  r.model_flops_fwd_per_token = r.model_flops_fwd / tokens;
  r.model_flops_train_per_token = 3 * r.model_flops_fwd_per_token;
  if (m.num_mtp_modules > 0) {
    double mtp = 0;
    for (const ForwardOp& op : layer_forward_ops(m, m.mtp_layer, seq))
      mtp += is_model_flop(op) ? op.flops : 0;
    const double h = static_cast<double>(m.hidden_size);
    mtp += 2 * tokens * (2 * h) * h;                           // eh_proj
    mtp += 2 * tokens * h * static_cast<double>(m.vocab_size); // its own LM head pass
    r.mtp_model_flops_fwd_per_token = static_cast<double>(m.num_mtp_modules) * mtp / tokens;
  }
  return r;
}

} // namespace mop::workload
