#pragma once
// Published measurements (validation/data/*.jsonl, schema in validation/data/README.md) and
// their translation into fixed Plans: the published degrees, no auto-tuning.
#include "common/json_io.hpp"
#include "sim/schedule.hpp"
#include "strategies/lower.hpp"
#include "strategies/plan.hpp"
#include "workload/model_spec.hpp"

#include <optional>
#include <string>
#include <vector>

namespace mop::validation {

struct Row {
  std::string id;
  std::string origin; // "file.jsonl:12"
  Json raw;           // the whole object, as published
  std::string model_name;
  std::optional<std::string> model_id; // catalog id
  std::string gpu;                     // H100, H200, B200, A100, GB200, GB300
  // The node type (hw::cluster_ids) of a GPU variant the `gpu` type does not describe (a power
  // limit, another memory); empty: the type's own ("h100" for H100).
  std::string node_type;
  int num_gpus = 0;
  std::int64_t seq_len = 0;
  std::optional<int> global_batch_size;
  std::optional<int> micro_batch_size;
  std::string precision; // bf16, fp8
  std::string framework;
  std::string recompute; // none, selective, full, or "" when not stated
  // How the source counted the FLOPs behind its TFLOPS and MFU: "causal" (attention scores
  // over the pairs a causal mask keeps, about half of S²) or "full" (all S² pairs: NeMo's
  // formulas, Megatron-LM's before its 2025 correction, torchtitan's MFU); "" when the row
  // reports neither.
  std::string flop_convention;
  // The attention kernel the run used when the source's versions fix it ("flash", "flash2",
  // "cudnn"); empty for the framework's default (strategy::attention_kernel).
  std::optional<sim::AttentionKernel> attention_kernel;
  // How the run quantized its FP8 GEMMs' operands when the source says ("delayed", "current",
  // "mxfp8", "tensorwise", "rowwise"); empty for the framework's default (strategy::fp8_recipe).
  std::optional<strategy::Fp8Recipe> fp8_recipe;
  // Whether the run used torch.compile (PyTorch-eager frameworks: torchtitan); unset: not said.
  std::optional<bool> compiled;
  // Whether its loss ran under torch.compile too; unset: as its layers (`compiled`).
  std::optional<bool> compiled_loss;
  // The Transformer Engine release a Megatron-Core run used (major * 100 + minor), or the newest
  // it could have used; unset: a current one (strategy::LoweringContext::transformer_engine).
  std::optional<int> transformer_engine;
  // How MoE tokens reached their experts when the source says ("alltoall", "deepep",
  // "hybridep").
  std::optional<strategy::EpDispatcher> ep_dispatcher;
  Json measured; // metric -> value
};

// Reads a JSON Lines file (common/file_io.hpp: regular files only); a malformed line is an
// InputError naming file and line, and so is a file without any row.
std::vector<Row> read_dataset(const std::string& path);
// The project's own dataset (compiled-in path of validation/data/published.jsonl).
std::string default_dataset_path();

// What a row needs before it can be predicted; an empty `reason` means it can.
struct Translation {
  std::optional<workload::ModelSpec> model;
  std::string cluster_id; // "h100", ...
  int nodes = 0;
  std::optional<strategy::Plan> plan;
  std::string reason; // why the row cannot be predicted yet, one sentence
};

// Builds the fixed plan of a row: the published degrees (dp, zero, tp, sp, cp, pp, vp, ep, etp),
// recompute, batch sizes and offload, with each assumption stated in docs/VALIDATION.md.
Translation translate(const Row& row, int gpus_per_node = 8);

} // namespace mop::validation
