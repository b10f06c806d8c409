#pragma once
// Framework run configurations in and out: Megatron-LM's arguments and DeepSpeed's JSON read
// as a Plan (with the model, sequence, batch and precision where they say), and a Plan written
// as the arguments or JSON that launch it. The key mapping and its sources are in
// docs/FRAMEWORKS.md. What a configuration says that mop cannot represent, or what of a plan a
// framework cannot express, is returned as sentences, never dropped silently.
#include "strategies/lower.hpp"
#include "strategies/plan.hpp"
#include "workload/model_spec.hpp"

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace mop::strategy {

enum class Framework { megatron, torchtitan, deepspeed };
const char* name(Framework f);
// "megatron", "torchtitan" or "deepspeed"; InputError naming the frameworks otherwise.
Framework parse_framework(const std::string& text);
// The mop family whose space the framework expresses (megatron, fsdp2, ulysses-zero3).
const char* family_of(Framework f);

// What one run configuration says, in mop's terms.
struct FrameworkRun {
  Framework framework = Framework::megatron;
  Plan plan;                                // world 0 unless the launcher line says
  std::optional<workload::ModelSpec> model; // where the configuration describes the model
  std::int64_t seq = 0;                     // 0: not stated
  int global_batch = 0;                     // sequences; 0: not stated
  std::string precision = "bf16";           // bf16, fp8, mxfp8
  std::optional<bool> compiled;             // torchtitan's compile.enable; unset: not said
  std::optional<Fp8Recipe> fp8_recipe;      // Megatron-LM's --fp8-recipe; unset: not said
  std::optional<EpDispatcher> ep_dispatcher; // Megatron-LM's DeepEP flags; unset: not said
  int nodes = 0, gpus_per_node = 0;         // the launcher's (torchrun), 0: not stated
  // What the configuration sets that mop does not represent, one sentence each.
  std::vector<std::string> not_represented;
  std::string text; // the configuration as read (for writing the plan back into it)
  std::string model_id; // a catalog model the configuration names (torchtitan), "" otherwise
};

// Megatron-LM's arguments as pretrain_gpt.py takes them: a launch script or an argument list
// (line continuations, comments and a torchrun prefix allowed; `--key value` or `--key=value`).
// `model` is the model when the user names it (--model); otherwise the model arguments
// (--num-layers, --hidden-size, ...) describe it. Layer-dependent keys (virtual stages given as
// layers per stage, first and last stage layers) need one or the other. InputError for a value
// that is not what the key takes, a shell variable, or a model the arguments cannot describe.
FrameworkRun read_megatron_args(const std::string& text, const std::string& origin,
                                const workload::ModelSpec* model);

// A torchtitan job: its legacy TOML ([parallelism], [training], [activation_checkpoint],
// [model] name and flavor) or its current command-line overrides (`--parallelism.
// tensor_parallel_degree 2`, `--module llama3 --config llama3_8b`, after a torchrun prefix).
// Batch in sequences (local_batch_size, global_batch_size, seq_len) or in tokens
// (num_tokens_per_microbatch_per_dp_rank, num_tokens_per_train_step, max_context_length). The
// model is the catalog's where its name and flavor name one (`model_id`), else --model's.
FrameworkRun read_torchtitan_config(const std::string& text, const std::string& origin,
                                    const workload::ModelSpec* model);

// A DeepSpeed config (ds.json). Its Python-side degrees (EP, pipeline stages) are not in the
// JSON: give them as plan flags (--ep, --pp).
FrameworkRun read_deepspeed_config(const std::string& text, const std::string& origin);

// The configuration that launches `plan` for `model` at `seq` tokens (`precision` as above),
// or, in `cannot_express`, why the framework cannot (one sentence per part; the text is then
// empty). Megatron: a torchrun line with the plan's arguments, then, from `base` (the user's
// own Megatron arguments) every argument that is not the plan's, or without it the model's
// arguments and mock data to start from; DeepSpeed: the JSON (`base`'s other keys kept), then
// the Python-side degrees as comment lines after it.
struct FrameworkConfig {
  std::string text;
  std::vector<std::string> cannot_express;
};
FrameworkConfig write_framework_config(Framework f, const Plan& plan,
                                       const workload::ModelSpec& model, std::int64_t seq,
                                       int gpus_per_node, const std::string& precision,
                                       const std::string* base = nullptr);

} // namespace mop::strategy
