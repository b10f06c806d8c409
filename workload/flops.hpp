#pragma once
// FLOPs and HBM bytes of one training step's forward and backward, per layer and per component.
//
// Conventions (docs/FLOPS.md):
// - A GEMM C[m,n] = A[m,k]·B[k,n] is 2·m·n·k FLOPs.
// - Attention scores and values count exactly the (query, key) pairs the mask keeps: causal
//   attention over S tokens keeps S(S+1)/2 pairs, a sliding window W keeps at most W per query.
// - "Model FLOPs" (for MFU, as Megatron-LM and PaLM define it) are the matmul FLOPs: GEMMs, the
//   router, attention products and the LM head; backward = 2 × forward; recompute not counted.
// - Elementwise work (norms, activations, softmax, RoPE, residuals, loss) is counted separately
//   with per-element constants written next to each op; it is memory-bound and priced by bytes.
// - Bytes assume BF16 (2 bytes) activations and weights, each operand read once and each result
//   written once, as a fused kernel would (flash attention never writes the S×S scores).
#include "workload/model_spec.hpp"

#include <cstdint>
#include <string>
#include <vector>

namespace mop::workload {

enum class Component {
  attention_proj, // q/k/v/o projections (and MLA's low-rank ones)
  attention_core, // scores and values: Q·Kᵀ and P·V
  dense_mlp,
  shared_experts,
  routed_experts,
  router,
  lm_head,
  elementwise, // norms, activations, softmax, RoPE, residuals, loss
};
const char* component_name(Component c);
constexpr int kNumComponents = 8;

enum class OpClass { gemm, grouped_gemm, attention, elementwise };

// One forward operation over a micro-batch of `batch` sequences of `seq` tokens.
struct ForwardOp {
  std::string name; // "q_proj", "experts_gate_up", "attn_core", "rmsnorm_attn"
  Component component;
  OpClass op_class;
  // GEMM shapes for one instance: C[m,n] = A[m,k]·B[k,n]; grouped GEMMs have `instances`
  // experts, each with m = the average tokens per expert. Attention: m = queries, n = keys
  // kept per query on average, k = head dim of q·k. Elementwise: m = elements.
  double m = 0, n = 0, k = 0;
  double instances = 1;
  double flops = 0; // forward FLOPs
  double bytes = 0; // forward HBM bytes
};

// Bytes per element of activations and weights (BF16).
inline constexpr double kActivationBytes = 2.0;

// Exact count of (query, key) pairs kept by a causal mask over `seq` tokens with an optional
// sliding window (0 = none): sum over queries i = 1..seq of min(i, window).
double attended_pairs(std::int64_t seq, std::int64_t window);

// The forward ops of one decoder layer.
std::vector<ForwardOp> layer_forward_ops(const ModelSpec& m, const LayerSpec& layer,
                                         std::int64_t seq, std::int64_t batch = 1);
// The forward ops outside the decoder layers: embedding lookup, final norm, LM head, loss.
std::vector<ForwardOp> head_forward_ops(const ModelSpec& m, std::int64_t seq,
                                        std::int64_t batch = 1);

struct ComponentCost {
  double fwd_flops = 0;
  double bwd_flops = 0;
  double fwd_bytes = 0;
  double bwd_bytes = 0;
};

// Totals for one sequence of `seq` tokens through the main model (MTP separately).
struct FlopReport {
  std::int64_t seq = 0;
  ComponentCost by_component[kNumComponents];
  double model_flops_fwd = 0; // matmul FLOPs of the forward pass, whole sequence
  double model_flops_fwd_per_token = 0;
  double model_flops_train_per_token = 0; // forward + backward = 3 × forward
  double elementwise_flops_fwd = 0;
  double bytes_fwd = 0;
  double mtp_model_flops_fwd_per_token = 0; // MTP modules (not in the figures above)

  const ComponentCost& operator[](Component c) const { return by_component[static_cast<int>(c)]; }
};

FlopReport count_flops(const ModelSpec& m, std::int64_t seq);

// Whether an op's FLOPs count as model FLOPs (everything but elementwise).
bool is_model_flop(const ForwardOp& op);

} // namespace mop::workload
