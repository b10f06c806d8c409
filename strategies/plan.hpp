#pragma once
// Plan: a "mixture of parallelisms". One world of ranks and one pipeline degree shared by all
// layers; inside a pipeline stage each *kind* of layer maps the remaining ranks its own way
// (Megatron-Core's MoE parallel folding, generalised to every layer kind), and each kind of
// state has its own placement (HBM or host).
#include "common/json_io.hpp"

#include <cstdint>
#include <string>
#include <vector>

namespace mop::strategy {

enum class CpKind { ring, ulysses, hybrid }; // hybrid: Ulysses inside a node, ring across nodes
// Expert-load rebalancing at run time (docs/ROUTING.md): none, or least-loaded (LLEP): a layer
// whose most loaded rank exceeds the threshold spills tokens and expert weights to the least
// loaded ranks (workload/rebalance.hpp).
enum class Rebalance { none, least_loaded };
enum class Recompute { none, selective, full };
enum class PipelineSchedule { gpipe, one_f_one_b, interleaved_1f1b, zero_bubble };
enum class Placement { hbm, host };
enum class OptimizerOverlap {
  after_backward,  // the step runs when backward has finished
  stream_backward, // each layer's step runs as soon as its gradients are reduced
  stream_forward,  // each layer's step runs just before its next forward use (still exact AdamW)
};

// How the ranks of one pipeline stage are arranged for the attention blocks.
// tp * cp * dp = ranks per stage; the data-parallel ranks shard state by `zero` and `shard`.
struct AttentionMapping {
  int tp = 1;     // tensor parallel (with sequence parallelism when sp)
  bool sp = true; // sequence parallelism for norms/dropout regions when tp > 1
  int cp = 1;     // context parallel: the sequence split over cp ranks
  CpKind cp_kind = CpKind::ring;
  int dp = 1; // derived: ranks per stage / (tp * cp)
};

// MoE blocks: etp * ep * edp = ranks per stage (experts fold over the same ranks).
struct MoeMapping {
  int ep = 1;                 // expert parallel: routed experts split over ep ranks
  int etp = 1;                // expert tensor parallel
  int edp = 1;                // derived: expert data parallel
  double capacity_factor = 0; // 0 = dropless (buffers sized by `imbalance`)
  double imbalance = 1.0;     // max/mean routed tokens per expert rank assumed for buffers
  Rebalance rebalance = Rebalance::none;
  double rebalance_threshold = 1.3;   // λ: rebalance a layer when max/mean rank tokens exceed it
  double rebalance_capacity = 1.1;    // α: a rank then takes at most α · mean tokens (1 <= α <= λ)
  double rebalance_min_tokens = 1024; // the smallest share worth a helper's GEMM
  // Expert copies a rank may hold at once under rebalancing (a reserve, like `imbalance`): the
  // weights it receives for one layer's spilled tokens.
  double spill_copies = 0;
};

// Dense MLP blocks and embeddings/LM head: tensor (vocab) parallel or FSDP over the rest.
struct DenseMapping {
  int tp = 1;
  int dp = 1; // derived
};

// Where one layer kind's states live and how its data-parallel ranks shard them.
// ZeRO stage (DeepSpeed): 0 replicate, 1 shard optimizer state, 2 + gradients, 3 + parameters
// (= FSDP). `shard_group`: shard inside groups of this many data-parallel ranks and replicate
// across groups (HSDP); 0 = shard over all of them.
struct StatePolicy {
  int zero = 1;
  int shard_group = 0;
};

enum class LayerKind { attention, moe, dense, embedding };
inline constexpr int kNumLayerKinds = 4;
const char* layer_kind_name(LayerKind k);

struct Plan {
  std::string family = "custom"; // fsdp2, megatron, ulysses-zero3, mop, custom
  int world = 1;                 // ranks (GPUs)
  int pp = 1;                    // pipeline stages
  int vp = 1;                    // virtual stages per rank (interleaved 1F1B)
  PipelineSchedule schedule = PipelineSchedule::one_f_one_b;
  std::vector<int> stage_layers; // decoder layers per pipeline stage (size pp); empty = even

  AttentionMapping attention;
  MoeMapping moe;
  DenseMapping dense; // dense MLP layers
  DenseMapping embed; // embedding and LM head (tp = vocab parallel)
  StatePolicy state[kNumLayerKinds];

  int micro_batch = 1;  // sequences per micro-batch (per data-parallel replica)
  int global_batch = 0; // sequences per optimizer step (0: the command's default)
  Recompute recompute[kNumLayerKinds] = {Recompute::none, Recompute::none, Recompute::none,
                                         Recompute::none};
  double activation_offload = 0; // fraction of checkpointed activations kept on the host
  bool chunked_loss = false;     // logits computed and freed chunk by chunk

  Placement params = Placement::hbm;    // BF16 weights between uses
  Placement grads = Placement::hbm;     // gradients between reduce and step
  Placement optimizer = Placement::hbm; // FP32 master weights and Adam moments
  bool optimizer_on_host = false;       // the AdamW step runs on the host CPU
  bool torch_host_optimizer = false;    // with torch's CPU AdamW (FSDP2, Megatron offload), not
                                        // a vectorised CPU-Adam (DeepSpeed, mop)
  OptimizerOverlap overlap = OptimizerOverlap::after_backward;

  int ranks_per_stage() const { return world / pp; }
  // Data-parallel degree that shards a layer kind's states.
  int data_parallel(LayerKind k) const;
  int sequences_per_step() const { return global_batch; }
  int micro_batches() const; // per data-parallel replica per step
  int layers_in_stage(int stage, int num_layers) const;
};

// Derives the data-parallel degrees from world, pp and the mappings, and checks every rule
// with one sentence each (see validate_plan). Throws InputError.
void complete_plan(Plan& plan);

struct ModelShape { // the model figures the rules need (from workload::ModelSpec)
  std::int64_t num_layers = 0;
  std::int64_t num_heads = 0;
  std::int64_t num_kv_heads = 0;
  std::int64_t num_routed_experts = 0; // 0 for dense models
  std::int64_t vocab_size = 0;
};
struct ClusterShape { // the cluster figures the rules need (from hw::ClusterSpec)
  int gpus_per_node = 8;
  int nodes = 1;
};
// The rules of a valid plan for a model, sequence and cluster: degrees multiply to the world;
// TP divides heads (KV heads replicate when TP exceeds them); EP divides experts; CP divides
// the sequence (2·CP for ring CP's load-balanced chunks); PP and virtual stages fit the layers;
// micro-batches divide the batch; hybrid CP's Ulysses part stays inside a node.
void validate_plan(const Plan& plan, const ModelShape& model, std::int64_t seq,
                   const ClusterShape& cluster);

// One line, e.g. "attn[tp1 cp8u dp12] moe[ep96] dense[dp96] pp1 mb1 rc=full off=act,opt
// opt=host/stream-fwd"
std::string summary(const Plan& plan);

// Equality and a hash over every field but `family` (two families can enumerate the same plan):
// the search deduplicates with them.
bool same_plan(const Plan& a, const Plan& b);
std::size_t plan_hash(const Plan& plan);

Json to_json(const Plan& plan);
// Reads what to_json writes; a key left out takes its default (`world` 0: the command's world).
// An unknown key, or a count past its ceiling (common/limits.hpp:
// degrees and ranks at most limits::max_gpus), is an InputError naming `origin` and the key.
Plan plan_from_json(const Json& j, const std::string& origin);

const char* name(CpKind k);
const char* name(Rebalance r);
const char* name(Recompute r);
const char* name(PipelineSchedule s);
const char* name(Placement p);
const char* name(OptimizerOverlap o);

} // namespace mop::strategy
