#pragma once
// Lowering: a Plan for a model and sequence length becomes a Schedule (sim/schedule.hpp), the
// program every executor plays. One rank class per pipeline stage.
#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"
#include "sim/schedule.hpp"
#include "strategies/memory.hpp"
#include "strategies/plan.hpp"
#include "workload/model_spec.hpp"

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

// A lower bound on the plan's step time: the busiest stage's compute kernels (forward, backward,
// recompute) run back to back at full speed, with no communication, bubble or optimizer. The
// event engine can only add to it, so a candidate whose bound exceeds a simulated step time
// cannot beat that plan (the planner's pruning rule).
double compute_lower_bound_s(const Plan& plan, const LoweringContext& ctx,
                             const hw::ClusterSpec& cluster, const hw::Calibration& calibration);

} // namespace mop::strategy
