#pragma once
// Every ceiling mop puts on its inputs, in one place. Each is far above what any real model,
// cluster or run reaches, and low enough that the arithmetic on it cannot overflow 64 bits and
// the work it implies finishes in seconds. A value past a ceiling is an InputError that names it.
#include <cstddef>
#include <cstdint>

namespace mop::limits {

// Input files: a Hugging Face config or a cluster JSON is kilobytes; the largest dataset
// shipped is under a megabyte. Bigger inputs are refused before they are read.
inline constexpr std::int64_t max_input_file_bytes = std::int64_t{64} << 20;
// JSON nesting: real inputs nest 4-5 levels; the parser recurses once per level.
inline constexpr int max_json_depth = 100;
// Real numbers in inputs (seconds, bytes, FLOP/s, bandwidths, ratios): a kernel takes
// microseconds, a GPU does 1e15 FLOP/s, a node holds 1e12 bytes. Within these magnitudes the
// cost model's products and quotients stay finite and non-zero in double precision.
inline constexpr double min_figure = 1e-15;
inline constexpr double max_figure = 1e20;
// Error sentences quote at most this many characters of an offending value.
inline constexpr std::size_t max_quoted_chars = 120;

// Model dimensions (workload::validate, so every path: catalog, config.json, dataset rows).
// Real models stay far below: at most 126 layers, hidden 16384, 128 heads of at most 256, FFN
// 53248, vocabulary 256K, 384 routed experts (8 per token), LoRA ranks 1536, 10M positions.
// Layers: 1024, past the deepest trained (DeepNet's 1000; 126 in production models). The plan
// search simulates every layer, so its time grows with this one.
inline constexpr std::int64_t max_layers = 1024;
inline constexpr std::int64_t max_hidden_size = std::int64_t{1} << 20;
inline constexpr std::int64_t max_attention_heads = std::int64_t{1} << 14;
inline constexpr std::int64_t max_head_dim = std::int64_t{1} << 14;
inline constexpr std::int64_t max_intermediate_size = std::int64_t{1} << 22;
inline constexpr std::int64_t max_vocab_size = std::int64_t{1} << 24;
inline constexpr std::int64_t max_routed_experts = std::int64_t{1} << 16;
inline constexpr std::int64_t max_shared_experts = std::int64_t{1} << 10;
inline constexpr std::int64_t max_lora_rank = std::int64_t{1} << 20;
inline constexpr std::int64_t max_positions = std::int64_t{1} << 30;
inline constexpr std::int64_t max_mtp_modules = 64;
// Parameters of a whole model: 1.1e15, a thousand times the largest trained. With it, a byte
// count of every state of every parameter (at most 32 bytes each) stays below 2^55.
inline constexpr std::int64_t max_params = std::int64_t{1} << 50;

// A run: the largest clusters have about 2^17 GPUs; every parallel degree is at most the
// world, so each fits an int and a product of two of them fits an int64.
inline constexpr std::int64_t max_gpus = std::int64_t{1} << 20;
// Sequence length: 64M tokens, six times the longest context trained (10M).
inline constexpr std::int64_t max_seq_tokens = std::int64_t{1} << 26;
// Sequences per optimizer step (and per micro-batch): 16M, with the longest sequence 2^50
// tokens a step, exact in a double.
inline constexpr std::int64_t max_batch_sequences = std::int64_t{1} << 24;
// Search threads: more than any host has cores; each thread is a few MiB of stack.
inline constexpr int max_threads = 256;
// ---- mop run (the CPU reference executor) and its checkpoints ----
// Ranks are threads sharing the machine's cores: beyond 64 the rendezvous, not the arithmetic,
// is the run.
inline constexpr int max_cpu_ranks = 64;
// Processes `mop run --executor cuda --nproc-per-node` starts on one machine (one per GPU).
inline constexpr int max_nproc_per_node = 64;
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
