#pragma once
// The analytic memory model: bytes per rank class (pipeline stage), by state, in HBM and host.
#include "strategies/plan.hpp"
#include "workload/model_spec.hpp"

#include <string>
#include <vector>

namespace mop::strategy {

// The hardware figures the memory model needs (from hw::ClusterSpec).
struct MemoryHardware {
  double hbm_bytes = 0;  // per GPU, as CUDA reports it
  double host_bytes = 0; // per node
  int gpus_per_node = 8;
  double cuda_context_bytes = 0; // CUDA context, cuBLAS workspaces, kernels
  double nccl_bytes_per_communicator = 0;
  double alltoall_buffer_bytes = 0; // once per process that runs an all-to-all (EP, Ulysses)
  double fragmentation = 0;         // allocator overhead as a fraction of activations and buffers
  // Hopper's FP8 tensor cores read K-major operands only: an FP8 tensor used by two GEMMs in
  // different orientations is written twice, once transposed (Blackwell reads either).
  bool fp8_transposes = true;
  double host_reserved_bytes = 0; // per node: OS, framework, page cache the job cannot use
  // HBM a plan must leave free to count as fitting (`--hbm-headroom`): allocator spikes and
  // what no model counts, so that the best plan does not sit at 0.1 GiB from the limit.
  double hbm_headroom_bytes = 0;
  bool fits_hbm(double peak_hbm_bytes) const {
    return peak_hbm_bytes + hbm_headroom_bytes <= hbm_bytes;
  }
};

struct MemoryBreakdown {
  double weights = 0;
  double grads = 0;
  double optimizer = 0;
  double activations = 0;
  double comm_buffers = 0;
  double other = 0;
  double total() const { return weights + grads + optimizer + activations + comm_buffers + other; }
};

// Options that describe the training code rather than the plan.
struct ActivationOptions {
  bool flash_attention = true; // no S x S scores saved
  bool dropout = false;        // dropout masks saved (GPT-3-era models)
  // torch.compile over the PyTorch family's loss (LoweringContext::compiled_loss): its FP32
  // upcast fused into its kernels (logits_bytes).
  bool compiled_loss = false;
};

// Whether the plan's "selective" recompute is torchtitan's op-level selective checkpointing (the
// fsdp2 family, docs/PLANS.md): what the layer saves here and what the lowering re-runs.
bool torch_op_sac(const Plan& p);

// Whether the plan's ring context parallelism is PyTorch's (the fsdp2 family: torch's
// context_parallel, docs/HARDWARE.md "PyTorch's ring"), and the FP32 gradient accumulators its
// backward holds: the queries' (`query_elements`) and the K/V's, this rank's block and the one
// that arrived (`kv_elements` each).
bool torch_ring_cp(const Plan& p);
double torch_ring_accumulator_bytes(double query_elements, double kv_elements);

// Bytes of activations one decoder layer saves for its backward, per rank, for one micro-batch
// (plan.micro_batch sequences of `seq` tokens), under the plan's mapping and recompute policy.
double layer_activation_bytes(const workload::ModelSpec& m, const workload::LayerSpec& layer,
                              const Plan& plan, std::int64_t seq, Recompute recompute,
                              const ActivationOptions& options = {});

// Parameters of one decoder layer held by a rank after tensor and expert splitting, by the
// kind whose state policy governs them: attention (projections and their norm), moe (routed
// experts), dense (dense MLP, shared experts, router, MLP norm). Index with LayerKind.
struct KindParams {
  double by_kind[kNumLayerKinds] = {0, 0, 0, 0};
  double operator[](LayerKind k) const { return by_kind[static_cast<int>(k)]; }
};
KindParams layer_local_params(const workload::ModelSpec& m, const workload::LayerSpec& layer,
                              const Plan& plan);
// Bytes of one routed expert's weights as an expert-parallel rank holds them (its ETP share,
// BF16): what least-loaded rebalancing copies to a helper rank.
double expert_copy_bytes(const workload::ModelSpec& m, const Plan& plan);
// Embedding table or LM head rows held by a rank (vocab-parallel split).
double embedding_local_params(const workload::ModelSpec& m, const Plan& plan);
// Whether states under ZeRO stage `zero` stay unsharded for the whole step: FSDP2 under
// torch.distributed.pipelining (torchtitan, NeMo AutoModel) keeps a pipeline stage's layers
// gathered from the first forward to the last backward (reshard_after_forward off under PP,
// "to avoid per-microbatch all-gathers") and reduces their gradients once, at the last backward
// (pipelining's backward_maybe_with_nosync). With gradients on the host each micro-batch's are
// reduced and downloaded instead. The memory model and the cost-only lowering both ask this.
bool unsharded_for_step(const Plan& plan, int zero);
// How many data-parallel ranks share (shard) one copy of a kind's states under ZeRO: dp·cp for
// attention (CP ranks hold the same weights), edp for experts, the rest for dense and embedding;
// capped by the kind's HSDP shard_group.
double shard_degree(const Plan& plan, LayerKind kind);

// Bytes one decoder layer saves per rank for one micro-batch under the plan's recompute policy
// of each of its kinds (attention, and dense or MoE for its MLP): what stays alive from its
// forward to its backward.
double saved_activation_bytes(const workload::ModelSpec& m, const workload::LayerSpec& layer,
                              const Plan& plan, std::int64_t seq,
                              const ActivationOptions& options = {});

// Bytes per logit at the peak of the loss's forward or backward, by framework (memory.cpp).
double loss_bytes_per_logit(const Plan& plan, const ActivationOptions& options = {});
// Bytes of logits (BF16) and their FP32 softmax/gradient held for the loss on the last stage.
double logits_bytes(const workload::ModelSpec& m, const Plan& plan, std::int64_t seq,
                    const ActivationOptions& options = {});

// Communication buffers that live for the whole step: NCCL's per communicator and the
// all-to-all buffers (not the transient gather/scatter buffers).
double resident_comm_bytes(const Plan& plan, const MemoryHardware& hw);

struct RankClassMemory {
  std::string name; // "stage 0 of 4 (first)"
  int stage = 0;
  int ranks = 0; // how many ranks behave like this one
  int layers = 0;
  double micro_batches_in_flight = 0;
  MemoryBreakdown hbm;  // per rank
  MemoryBreakdown host; // per rank's share of its node's host memory
  double peak_hbm_bytes = 0;
  double host_bytes_per_node = 0; // the node's host memory use if all its ranks were this class
  std::string dominant;           // the largest HBM component, in words
};

struct MemoryReport {
  std::vector<RankClassMemory> classes;
  int worst = 0; // index of the class with the highest HBM use relative to capacity
  double peak_hbm_bytes = 0;
  double peak_host_bytes = 0; // per node
  double hbm_capacity_bytes = 0;
  double host_capacity_bytes = 0;
  bool fits_hbm = false;
  bool fits_host = false;
  bool fits() const { return fits_hbm && fits_host; }
  std::string first_to_run_out; // one sentence when it does not fit
};

MemoryReport analyze_memory(const workload::ModelSpec& m, const Plan& plan, std::int64_t seq,
                            const MemoryHardware& hw, const ActivationOptions& options = {});

} // namespace mop::strategy
