#pragma once
// ModelSpec: an exact description of a decoder-only transformer, dense or Mixture-of-Experts.
// Every count that later decides memory or time (parameters, FLOPs, bytes) is derived from it.
#include <cstdint>
#include <string>
#include <vector>

namespace mop::workload {

enum class AttentionKind {
  gqa, // multi-head / grouped-query / multi-query attention (kv_heads divides heads)
  mla, // DeepSeek multi-head latent attention (low-rank q and kv, split rope/nope head dims)
};

struct AttentionSpec {
  AttentionKind kind = AttentionKind::gqa;
  std::int64_t num_heads = 0;
  std::int64_t num_kv_heads = 0; // GQA; MLA keeps one latent per token, heads = num_heads
  std::int64_t head_dim = 0;     // GQA: dim of q, k and v per head
  // MLA (DeepSeek-V2/V3, Kimi-K2): q = W_qb · norm(W_qa · x) when q_lora_rank > 0, else W_q · x;
  // [c_kv, k_rope] = W_kva · x; [k_nope, v] = W_kvb · norm(c_kv).
  std::int64_t q_lora_rank = 0;
  std::int64_t kv_lora_rank = 0;
  std::int64_t qk_nope_head_dim = 0;
  std::int64_t qk_rope_head_dim = 0;
  std::int64_t v_head_dim = 0;
  bool qkv_bias = false; // bias on q, k, v projections (GPT-OSS, Qwen2)
  bool out_bias = false; // bias on the output projection (GPT-OSS)
  bool qk_norm = false;  // RMSNorm over each head's q and k (Qwen3)
  bool sinks = false;    // a learned attention-sink logit per head (GPT-OSS)

  std::int64_t qk_head_dim() const; // per-head dim of q and k
  std::int64_t v_dim() const;       // per-head dim of v
};

struct DenseMlpSpec {
  std::int64_t intermediate_size = 0;
  bool gated = true; // SwiGLU: gate and up projections, then down
  bool bias = false;
};

struct MoeSpec {
  std::int64_t num_routed_experts = 0;
  std::int64_t experts_per_token = 0;
  std::int64_t expert_intermediate_size = 0;
  std::int64_t num_shared_experts = 0;
  std::int64_t shared_intermediate_size = 0; // per shared expert
  bool expert_bias = false;                  // biases inside each expert's projections (GPT-OSS)
  bool router_bias = false;                  // bias on the router logits (GPT-OSS linear router)
  // DeepSeek-V3's aux-loss-free balancing keeps a per-expert score correction (a buffer of
  // num_routed_experts floats, stored in the checkpoint); counted as a parameter as HF does.
  bool router_score_correction = false;
  bool gated = true;
};

enum class MlpKind { dense, moe };

// One decoder layer: its attention variant and its MLP kind. Layers of the same kind get the
// same parallelism later, so the kind is explicit here.
struct LayerSpec {
  MlpKind mlp = MlpKind::dense;
  std::int64_t window = 0; // sliding-window width in tokens; 0 = full (causal) attention
};

struct ModelSpec {
  std::string name;         // catalog id or file name
  std::string display_name; // "Kimi K2"
  std::string model_type;   // the Hugging Face model_type it was read from
  std::int64_t hidden_size = 0;
  std::int64_t vocab_size = 0;
  bool tied_embeddings = false;
  AttentionSpec attention;
  DenseMlpSpec dense_mlp; // used by layers whose mlp is dense
  MoeSpec moe;            // used by layers whose mlp is moe
  std::vector<LayerSpec> layers;
  // DeepSeek-V3 multi-token prediction: each module is enorm + hnorm + eh_proj (2h -> h) + one
  // decoder layer of `mtp_layer` shape + a final norm; embedding and LM head are shared with the
  // main model in training (the HF checkpoint stores copies of them, see mtp_stored_copies).
  std::int64_t num_mtp_modules = 0;
  LayerSpec mtp_layer;
  std::int64_t max_position_embeddings = 0;
  double norm_eps = 1e-6;      // RMSNorm/LayerNorm epsilon (rms_norm_eps)
  double rope_theta = 10000.0; // RoPE base (rope_theta)
  // GPT-2/GPT-3 style: learned absolute position embeddings (this many rows) and LayerNorm with
  // a bias (two vectors per norm instead of RMSNorm's one).
  std::int64_t learned_positions = 0;
  bool norm_bias = false;

  std::int64_t num_layers() const { return static_cast<std::int64_t>(layers.size()); }
  std::int64_t num_moe_layers() const;
  bool is_moe() const { return num_moe_layers() > 0; }
};

// Checks the structural rules a config must satisfy (heads divide, experts_per_token <=
// experts, ...). Throws InputError naming `origin` and the field.
void validate(const ModelSpec& model, const std::string& origin);

} // namespace mop::workload
