#pragma once
// Every ceiling mop puts on its inputs, in one place. Each is far above what any real model,
// cluster or run reaches, and low enough that the arithmetic on it cannot overflow 64 bits and
// the work it implies finishes in seconds. A value past a ceiling is an InputError that names it.
#include <cstdint>

namespace mop::limits {

// Input files: a Hugging Face config or a cluster JSON is kilobytes; the largest dataset
// shipped is under a megabyte. Bigger inputs are refused before they are read.
inline constexpr std::int64_t max_input_file_bytes = std::int64_t{64} << 20;
// JSON nesting: real inputs nest 4-5 levels; the parser recurses once per level.
inline constexpr int max_json_depth = 100;
// Error sentences quote at most this many characters of an offending value.
inline constexpr std::size_t max_quoted_chars = 120;

// ---- mop run (the CPU reference executor) and its checkpoints ----
// Ranks are threads sharing the machine's cores: beyond 64 the rendezvous, not the arithmetic,
// is the run.
inline constexpr int max_cpu_ranks = 64;
// Optimizer steps in one run: a CPU step takes milliseconds to seconds, so a million is days.
inline constexpr std::int64_t max_run_steps = 1'000'000;
// Tokens per sequence on the CPU executor: attention costs seq^2 per head.
inline constexpr std::int64_t max_cpu_seq = 65536;
// Tokens per optimizer step (sequences x seq) on the CPU executor: each rank holds its tokens'
// activations for every layer in float32, and 2^20 tokens already need gigabytes.
inline constexpr std::int64_t max_cpu_tokens_per_step = std::int64_t{1} << 20;
// AdamW's learning rate: each step moves a weight by up to about lr, and weights start near
// 0.02, so a rate above 1 destroys the model in one step.
inline constexpr double max_learning_rate = 1.0;
// The step counter a checkpoint may hold: a million runs of the longest allowed, and far from
// where the step arithmetic (data keys, AdamW bias correction) loses precision.
inline constexpr std::int64_t max_checkpoint_step = std::int64_t{1} << 40;
// A checkpoint's identity header (JSON) is a few kilobytes even for a model of 1,000 layers.
inline constexpr std::int64_t max_checkpoint_header_bytes = std::int64_t{1} << 20;

} // namespace mop::limits
