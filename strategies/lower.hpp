#pragma once
// Lowering: a Plan for a model and sequence length becomes a Schedule (sim/schedule.hpp), the
// program every executor plays. One rank class per pipeline stage (per stage and expert-parallel
// rank under uneven routing: LoweringContext::expert_loads).
#include "sim/schedule.hpp"
#include "strategies/memory.hpp"
#include "strategies/plan.hpp"
#include "workload/model_spec.hpp"

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

namespace mop::strategy {

// How a framework scales and casts FP8 GEMM operands (docs/HARDWARE.md "FP8 quantization"):
// Transformer Engine's delayed and current per-tensor scaling and MXFP8 blocks, torchao's
// tensor-wise and row-wise dynamic scaling.
enum class Fp8Recipe : std::uint8_t { delayed, current, mxfp8, tensorwise, rowwise };
const char* fp8_recipe_name(Fp8Recipe r); // "delayed", "current", "mxfp8", "tensorwise", "rowwise"
std::optional<Fp8Recipe> parse_fp8_recipe(std::string_view name);

// How a framework moves MoE tokens to their experts' ranks: NCCL's all-to-all of every copy
// (Megatron-Core's alltoall dispatcher, the default) or hierarchical kernels that send each token
// once to every remote node holding one of its experts and forward it over NVLink there
// (DeepEP's normal kernels: Megatron's flex dispatcher, NeMo AutoModel).
// NCCL's all-to-all of every (token, expert) copy, or a dispatcher that sends each token once to
// each node and GPU holding its experts: DeepEP's normal kernels, or Megatron's HybridEP backend
// (--moe-flex-dispatcher-backend hybridep), priced alike (docs/HARDWARE.md "Hierarchical
// dispatch").
enum class EpDispatcher : std::uint8_t { alltoall, deepep, hybridep };
const char* ep_dispatcher_name(EpDispatcher d); // "alltoall", "deepep", "hybridep"
std::optional<EpDispatcher> parse_ep_dispatcher(std::string_view name);

// The expected number of other nodes a token's top-k experts sit on, when `experts` experts are
// spread evenly over `nodes` nodes and a token picks `top_k` distinct ones uniformly:
// (nodes - 1) · (1 - C(E - E/nodes, k) / C(E, k)).
double expected_remote_nodes(double experts, double top_k, int nodes);

// HBM bytes the recipe's quantize kernels move per element of a GEMM operand: its input (plain,
// or after a norm that can write FP8 itself), its output gradient, its weight when cast every
// micro-batch (0: once per step), and the kernels each cast launches. `transposes`: the GPU's FP8
// GEMMs read K-major operands only (Hopper), so a transposed copy is written too.
struct QuantizeTraffic {
  double input = 0, input_after_norm = 0, grad = 0, weight = 0;
  int kernels = 0;
};
QuantizeTraffic quantize_traffic(Fp8Recipe recipe, bool transposes);

struct LoweringContext {
  const workload::ModelSpec* model = nullptr;
  std::int64_t seq = 0;
  int gpus_per_node = 8;
  MemoryHardware hw; // resident memory (context, NCCL buffers) and fragmentation figures
  ActivationOptions activations;
  // Precision of the layers' GEMMs: fp8 recipes (Transformer Engine) run them in FP8 and keep
  // attention, the LM head and everything else in BF16.
  sim::Dtype gemm_dtype = sim::Dtype::bf16;
  // Whether ops and tensors get their names ("L12.attention.mb3", ...): traces, reports and
  // check_schedule's messages read them; a search, which keeps only a plan's numbers, does not.
  bool names = true;
  // Uneven routing (workload/routing.hpp): the expert loads of every layer (mean 1; empty rows
  // for dense layers). When they are not all 1, lower() gives every expert-parallel rank of a
  // stage its own rank class, its expert work and saved activations scaled by its tokens, and
  // the dispatch and combine meeting at a barrier across those classes: the step waits for the
  // slowest rank, and each class's memory is its rank's (DESIGN.md's fidelity level 3).
  // Null or all 1: one class per stage, as balanced routing.
  const std::vector<std::vector<double>>* expert_loads = nullptr;
  // The attention kernel the framework runs; unset: the plan family's (attention_kernel()).
  std::optional<sim::AttentionKernel> attention_kernel = std::nullopt;
  // With FP8 GEMMs, how the framework quantizes their operands; unset: the family's (fp8_recipe()).
  std::optional<Fp8Recipe> fp8_recipe = std::nullopt;
  // Whether the PyTorch-eager family (fsdp2, torchtitan) runs its layers under torch.compile,
  // which fuses each norm, RoPE and activation into one kernel; unset: torchtitan's default,
  // eager (compile.enable = false), where each is a chain of kernels moving FP32 intermediates.
  std::optional<bool> compiled = std::nullopt;
  // Whether the loss is compiled with them (its FP32 upcast fused: logits_bytes); unset: as
  // `compiled` (torchtitan compiles its loss with the model since February 2025).
  std::optional<bool> compiled_loss = std::nullopt;
  // Whether the framework repeats the K/V heads up to the query heads before its attention
  // kernel (torchtitan's Llama: repeat_kv before SDPA), so that ring context parallelism passes
  // the repeated K/V; unset: not repeated.
  std::optional<bool> kv_heads_repeated = std::nullopt;
  // Whether ring context parallelism gathers every rank's K/V block at once instead of passing
  // one a hop a step: PyTorch's default all-gather rotater, which torchtitan and Accelerate
  // keep (docs/HARDWARE.md "PyTorch's ring"); unset: a hop a step (its all-to-all rotater, the
  // one mop's plans and `--emit torchtitan` use).
  std::optional<bool> cp_gathers_kv = std::nullopt;
  // The Transformer Engine release Megatron-Core runs on, major * 100 + minor (2.9: 209); unset:
  // a current one. Its modules' CPU time per kernel fell from 2.10 on (host_issue_s).
  std::optional<int> transformer_engine = std::nullopt;
  // How MoE tokens reach their experts; unset: NCCL all-to-all (EpDispatcher::alltoall).
  std::optional<EpDispatcher> ep_dispatcher = std::nullopt;
};

// Eager PyTorch's elementwise traffic against one fused kernel's, per op (docs/HARDWARE.md
// "Eager elementwise ops"), read in torchtitan's model code: the RMSNorm, RoPE and SwiGLU.
struct EagerTraffic {
  double norm = 1, rope = 1, activation = 1;
};
// torchtitan's eager layer against the fused kernels the other families (and torch.compile) run.
EagerTraffic eager_traffic();

// The attention kernel a plan's attention runs as: the context's when set, else its family's
// framework default (docs/HARDWARE.md "Attention kernels"): Megatron-Core (Transformer Engine
// prefers cuDNN's fused attention on Hopper and Blackwell), FSDP2 (PyTorch SDPA prefers cuDNN on
// sm90/sm100 from torch 2.9) and mop's own executor run cuDNN; DeepSpeed-Ulysses runs the
// flash-attn 2 package; a custom plan the newest FlashAttention.
sim::AttentionKernel attention_kernel(const Plan& plan, const LoweringContext& ctx);

// The FP8 recipe a plan's GEMMs run with: the context's when set, else its family's framework
// default (Megatron-Core: delayed; torchtitan: row-wise).
Fp8Recipe fp8_recipe(const Plan& plan, const LoweringContext& ctx);

// The CPU time the plan's framework takes to issue one kernel (sim::Schedule::host_issue_s,
// docs/ENGINE.md "Host issue"): Transformer Engine's modules for Megatron-Core (by its release,
// LoweringContext::transformer_engine), PyTorch eager for FSDP2 and DeepSpeed, C++ for mop's
// executor; 0 (not modelled) for a custom plan.
double host_issue_s(const Plan& plan, const LoweringContext& ctx);

// Parses a Transformer Engine release ("2.9", "2.10.0") into major * 100 + minor.
std::optional<int> parse_transformer_engine(std::string_view version);

// The Schedule of one optimizer step in steady state: every micro-batch's forward and backward
// under the pipeline schedule, FSDP gathers with one-layer prefetch, TP/SP, CP (ring, Ulysses,
// hybrid), EP dispatch/combine, pipeline send/recv, recompute, activation offload and reload,
// gradient reduction, and the optimizer step where the plan puts it (with host streaming, the
// step of layer l from the previous step's gradients runs just before layer l's forward).
sim::Schedule lower(const Plan& plan, const LoweringContext& ctx);

// The ops of one micro-batch's pass through one part of a stage (a decoder layer of one kind,
// the embedding, or the LM head and loss), exactly as lower() emits them, each with its role in
// bounding the step: a stage's data path is one chain of dependencies through every
// micro-batch, so a pass lasts at least as long as the longest chain of its ops that ends on the
// path (the path ops' standalone times, and what they wait for inside the pass: ring CP's hops),
// whatever overlaps them.
// The stream lower() runs kernels on (RankClass::streams[0], "compute"); the others carry
// collectives, copies and the host's work.
inline constexpr int kComputeStream = 0;

struct PassOps {
  enum class Role : std::uint8_t {
    forward,          // on the data path
    backward,         // on the data path: recompute, input and weight gradients
    off_path_compute, // compute-stream ops off the path (zero-bubble's weight gradients)
    off_path,         // other streams' ops off the path (ring CP's hops)
  };
  // In the order lower() emits them; an op's deps index this list (deps outside it are gone).
  // Ops [0, forward_end) are the forward's; the path ops of each part chain in this order.
  std::vector<sim::Op> ops;
  std::vector<Role> roles;
  std::size_t forward_end = 0;
};

// What the planner's analytic bound reads (planner/bound.hpp): the plan's communicators, its
// distinct passes, and per stage how many of each one micro-batch runs and where the optimizer
// step sits. Built from the same per-layer steps as lower(), without building the Schedule.
struct PassModel {
  sim::Schedule groups;        // the plan's communicators, no ops: prices the collectives
  std::vector<PassOps> passes; // the distinct decoder layers', then the embedding's and the head's
  int embedding_pass = -1, head_pass = -1;
  struct Stage {
    std::vector<int> count;        // per pass, per micro-batch, every chunk of the stage
    std::vector<int> count_chunk0; // the same for the stage's first chunk only
    // The optimizer step: `gpu_step` (compute stream) or the host AdamW ops, each with how many
    // run (streamed into the forward: one per layer, so one entry per kind of layer, counted);
    // `step_on_path` when the step follows the last backward on the data path (GPU AdamW, host
    // AdamW after backward). Streamed into the forward, layer i's host step (and the upload
    // after it) precedes the first forward of the stage's layer i.
    std::vector<std::pair<sim::Op, double>> host_steps;
    sim::Op upload_last; // stream into the forward: the last layer's parameter upload
    sim::Op gpu_step;
    bool has_gpu_step = false;
    bool step_on_path = false;
    int last_layer_pass = -1; // the pass of the stage's last layer
    // The data-parallel stream's collectives of one step (ZeRO-3 gathers and reduce-scatters per
    // micro-batch, the other reductions and ZeRO-1/2 gathers once), each with its count.
    std::vector<std::pair<sim::Op, double>> dp_ops;
    // The chunk replay (planner/replay.hpp): per chunk, its passes in forward order (the
    // embedding's first, the head's last), and the embedding kind's buckets' once-a-step
    // reductions (chains, one per bucket) and updated-parameter gathers.
    std::vector<std::vector<int>> chunks;
    std::vector<std::vector<sim::Op>> embedding_reductions;
    std::vector<sim::Op> embedding_gathers;
    // ZeRO-3 in a pipeline stage (gathered once a step, at the first forward): the embedding
    // table's gathers before the first stage's embedding, the head's before the last's head.
    std::vector<sim::Op> table_step_gathers, head_step_gathers;
  };
  std::vector<Stage> stages;
  // The chunk replay: one micro-batch's activations (or their gradient) sent to the next stage;
  // per pass, the once-a-step reductions of one of its layer's gradients after its last
  // backward (chains, one per bucket: each op waits for the one before it) and its updated
  // parameters' gathers after the step (ZeRO 1 and 2), as lower() emits them.
  sim::Op pp_send;
  std::vector<std::vector<std::vector<sim::Op>>> reductions;
  std::vector<std::vector<sim::Op>> param_gathers;
  // Per pass: ZeRO-3's once-a-step gathers of one of its layers in a pipeline stage, before the
  // layer's first forward; each may start once the stage's layer two before it has run its
  // latest forward (lower()'s one-layer prefetch).
  std::vector<std::vector<sim::Op>> step_gathers;
};

// Whether planner::replay_step can play the plan on chunks: a 1F1B or interleaved 1F1B pipeline
// whose stages' work is their passes, the pipeline's transfers and once-a-step gathers and
// reductions (ZeRO-3 only as FSDP2 in a pipeline stage; no offload, host optimizer, uneven
// routing, host syncs or tied embeddings across stages).
bool chunk_replayable(const Plan& plan, const LoweringContext& ctx);

// `with_passes` false: the stages only, each pass left empty (its times known from another plan
// with the same pass_key).
PassModel pass_model(const Plan& plan, const LoweringContext& ctx, bool with_passes = true);

// The plan with what no pass reads set to defaults: the batch, the stages' layer counts, the
// placements, the optimizer and activation offload (run() emits their ops around the passes,
// pass_model() in its stages); its family replaced by the name of its attention kernel, the
// one thing a pass takes from the family. Two plans with the same key, lowered in the same context,
// have the same passes and the same communicators (tests/planner/bound_test.cpp holds the bound to
// that).
Plan pass_key(Plan plan);

} // namespace mop::strategy
