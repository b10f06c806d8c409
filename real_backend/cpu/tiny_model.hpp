#pragma once
// The model the CPU executors train: a decoder-only transformer read from a ModelSpec (GQA
// attention with RoPE and optional per-head q/k RMSNorm, pre-norm RMSNorm blocks, SwiGLU dense
// MLPs, top-k routed SwiGLU experts, tied or separate LM head), with its parameters laid out
// once by name so every executor and every shard refers to the same tensors.
#include "workload/model_spec.hpp"

#include <cstdint>
#include <string>
#include <vector>

namespace mop::real {

struct TinyConfig {
  std::string name;
  int hidden = 0;
  int vocab = 0;
  int heads = 0;
  int kv_heads = 0;
  int head_dim = 0;
  bool qk_norm = false;
  double rope_theta = 10000.0;
  double norm_eps = 1e-6;
  bool tied_embeddings = false;
  int dense_ffn = 0; // dense SwiGLU intermediate size
  int experts = 0;   // routed experts (MoE layers)
  int top_k = 0;
  int expert_ffn = 0;
  bool normalize_top_k = true;
  struct Layer {
    bool moe = false;
    std::int64_t window = 0; // sliding window, 0 = full causal attention
  };
  std::vector<Layer> layers;
  int num_layers() const { return static_cast<int>(layers.size()); }
};

// Reads the executable subset of a ModelSpec; a feature the executors do not implement (MLA,
// biases, attention sinks, shared experts, learned positions, LayerNorm, MTP, non-gated MLPs)
// is an InputError naming it.
TinyConfig tiny_config(const workload::ModelSpec& spec);

// Every parameter tensor, in a fixed order. Matrices are stored [in, out] (y = x · W); experts
// stack [experts, in, out].
enum class ParamRole {
  embedding,   // [vocab, hidden]
  attn_norm,   // [hidden]
  wq,          // [hidden, heads * head_dim]
  wk,          // [hidden, kv_heads * head_dim]
  wv,          // [hidden, kv_heads * head_dim]
  wo,          // [heads * head_dim, hidden]
  q_norm,      // [head_dim]
  k_norm,      // [head_dim]
  mlp_norm,    // [hidden]
  dense_gate,  // [hidden, dense_ffn]
  dense_up,    // [hidden, dense_ffn]
  dense_down,  // [dense_ffn, hidden]
  router,      // [hidden, experts]
  expert_gate, // [experts, hidden, expert_ffn]
  expert_up,   // [experts, hidden, expert_ffn]
  expert_down, // [experts, expert_ffn, hidden]
  final_norm,  // [hidden]
  lm_head,     // [hidden, vocab]; absent with tied embeddings (logits = x · embedding^T)
};
const char* role_name(ParamRole r);

struct ParamInfo {
  std::string name; // "L1.attn.wq", "embedding", "lm_head"
  ParamRole role = ParamRole::embedding;
  int layer = -1; // decoder layer, -1 for embedding, final norm and LM head
  std::vector<std::int64_t> shape;
  std::int64_t numel() const;
};

std::vector<ParamInfo> param_layout(const TinyConfig& c);
// Index of the parameter of `role` in `layer` in the layout, -1 if absent.
int find_param(const std::vector<ParamInfo>& layout, ParamRole role, int layer);

// Deterministic initial values, independent of any sharding: element e of parameter p is a
// function of (seed, p, e) only. Norm weights start at 1, matrices ~ N(0, 0.02^2).
template <class T> std::vector<std::vector<T>> init_params(const TinyConfig& c, std::uint64_t seed);

// A batch of token sequences: tokens[b * seq_len + t] is the input at position t of sequence b,
// labels[...] the token to predict there (-1: no loss).
struct Batch {
  int sequences = 0;
  int seq_len = 0;
  std::vector<std::int32_t> tokens;
  std::vector<std::int32_t> labels;
};

// Where batches come from: a learnable synthetic stream (each next token is an affine function
// of the previous one, with 10% noise) or the bytes of a text file (vocab must be >= 256).
// Batch `step` is a pure function of (seed, step), so a resumed run sees the same data.
class DataSource {
public:
  static DataSource synthetic(int vocab, std::uint64_t seed);
  // The file is read by read_input_file; an empty file or one with a NUL byte (not text) is an
  // InputError.
  static DataSource text_file(const std::string& path, int vocab, std::uint64_t seed);
  // InputError when a text file is too short for one sequence of `seq_len` tokens and its
  // labels (seq_len + 1 bytes); the synthetic stream has any length.
  void check_sequence_length(int seq_len) const;
  Batch batch(std::int64_t step, int sequences, int seq_len) const;
  // What determines every batch (the kind, the seed, the text's bytes), for checkpoints: equal
  // fingerprints give equal batches. The description names it in a sentence.
  std::uint64_t fingerprint() const;
  std::string description() const;

private:
  int vocab_ = 0;
  std::uint64_t seed_ = 0;
  std::vector<std::int32_t> text_; // empty for synthetic
  std::string path_;               // the text file's path
};

// splitmix64: the project's counter-based random source (same numbers on every platform).
std::uint64_t mix64(std::uint64_t x);
double uniform01(std::uint64_t key);       // in (0, 1)
double standard_normal(std::uint64_t key); // Box-Muller on two derived uniforms

} // namespace mop::real
