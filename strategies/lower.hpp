#pragma once
// Lowering: a Plan for a model and sequence length becomes a Schedule (sim/schedule.hpp), the
// program every executor plays. One rank class per pipeline stage.
#include "sim/schedule.hpp"
#include "strategies/memory.hpp"
#include "strategies/plan.hpp"
#include "workload/model_spec.hpp"

#include <span>
#include <vector>

namespace mop::strategy {

struct LoweringContext {
  const workload::ModelSpec* model = nullptr;
  std::int64_t seq = 0;
  int gpus_per_node = 8;
  MemoryHardware hw; // resident memory (context, NCCL buffers) and fragmentation figures
  ActivationOptions activations;
  // Precision of the layers' GEMMs: fp8 recipes (Transformer Engine) run them in FP8 and keep
  // attention, the LM head and everything else in BF16.
  sim::Dtype gemm_dtype = sim::Dtype::bf16;
};

// The Schedule of one optimizer step in steady state: every micro-batch's forward and backward
// under the pipeline schedule, FSDP gathers with one-layer prefetch, TP/SP, CP (ring, Ulysses,
// hybrid), EP dispatch/combine, pipeline send/recv, recompute, activation offload and reload,
// gradient reduction, and the optimizer step where the plan puts it (with host streaming, the
// step of layer l from the previous step's gradients runs just before layer l's forward).
sim::Schedule lower(const Plan& plan, const LoweringContext& ctx);

// One compute kernel of a layer's forward pass, for one micro-batch on one rank, as lower() emits
// it; the planner's compute lower bound prices a layer from these.
struct ForwardKernel {
  sim::Op op;                       // the forward op (ring attention: one step's)
  int ring_steps = 1;               // ring attention runs `op` once per ring step
  bool selective_recompute = false; // recomputed under selective recompute
};

// The compute kernels of one forward pass of each of `layers` under the plan (one list per
// layer, each in order); collectives left out. Their cost needs no communicator:
// sim::op_duration_s prices them with any Schedule.
std::vector<std::vector<ForwardKernel>>
layer_forward_kernels(const Plan& plan, const LoweringContext& ctx,
                      std::span<const workload::LayerSpec> layers);

} // namespace mop::strategy
