#pragma once
// Exact parameter accounting: every weight, bias and norm scale, by component.
#include "workload/model_spec.hpp"

#include <cstdint>
#include <stdexcept>

namespace mop::workload {

// Every count below is checked arithmetic: a sum or product that would not fit in 64 bits
// throws ParamCountOverflow instead of wrapping. Each dimension's ceiling (common/limits.hpp)
// keeps one product in range, but 2^10 layers of 2^16 experts of 2^20 x 2^22 would not sum in
// range; workload::validate refuses such a model (and any above limits::max_params), so a
// validated ModelSpec never throws here.
struct ParamCountOverflow : std::overflow_error {
  ParamCountOverflow() : std::overflow_error("a parameter count does not fit in 64 bits") {}
};

// Parameter counts of one component split. Integers: these are exact element counts.
struct ParamCounts {
  std::int64_t embedding = 0;      // input token embedding
  std::int64_t attention = 0;      // projections, biases, q/kv LoRA norms, QK-norm, sinks
  std::int64_t dense_mlp = 0;      // dense (non-MoE) MLP layers
  std::int64_t shared_experts = 0; // always-active experts in MoE layers
  std::int64_t routed_experts = 0; // routed experts (all of them, or the active ones)
  std::int64_t router = 0;         // router weights, biases and score corrections
  std::int64_t norms = 0;          // pre-attention, pre-MLP and final norms
  std::int64_t lm_head = 0;        // output projection (0 when tied to the embedding)

  std::int64_t total() const;
  ParamCounts& operator+=(const ParamCounts& o);
};

// One decoder layer's parameters (all routed experts counted).
ParamCounts layer_params(const ModelSpec& m, const LayerSpec& layer);
// One routed expert's parameters (weights and biases).
std::int64_t routed_expert_params(const MoeSpec& moe, std::int64_t hidden);

struct ParamReport {
  ParamCounts total;  // the main model: embeddings, layers, final norm, LM head; MTP excluded
  ParamCounts active; // touched by one token: routed experts counted experts_per_token times
  // Multi-token prediction modules, as trained (embedding and head shared with the main model).
  std::int64_t mtp = 0;
  std::int64_t mtp_active = 0;
  // MTP as stored in a Hugging Face checkpoint, which keeps its own copies of the embedding and
  // the output head (DeepSeek-V3 publishes "14B" for this figure).
  std::int64_t mtp_stored = 0;

  // Active parameters excluding the input embedding table: a lookup does no arithmetic, so this
  // is the N in "6·N FLOPs per token" (and the convention of the gpt-oss model card).
  std::int64_t active_without_embedding() const { return active.total() - active.embedding; }
};

ParamReport count_params(const ModelSpec& m);

} // namespace mop::workload
