#pragma once
// The program lowering: a Plan for a model and sequence length becomes an executable Schedule
// (sim/schedule.hpp with its executable layer): every op a rank runs in one optimizer step,
// with its kernel, its operand tensors (integer local shapes, roles, the parameters they hold),
// the communicator it talks over (a spec of the plan's mesh) and what the simulator prices.
// Executors interpret it rank by rank (real_backend/cpu/interpreter.hpp); the event engine plays
// it like any Schedule.
//
// It is built in passes (lowering/passes.hpp): the per-block emission, which shards every
// block by the plan's mesh (TP/SP, vocabulary parallelism, ring/Ulysses/hybrid context
// parallelism, EP/ETP experts) and writes its backward by a rule per kernel, one rank class per
// pipeline stage in the schedule's order (send/recv between stages, zero-bubble's held-back
// weight gradients, tied embeddings' copies); recompute, activation offload; ZeRO (parameter
// gathers, gradient reduction, the sharded optimizer step on the GPU or the host); then
// dependencies from the operands and allocations from the tensors' liveness.
//
// The features it covers grow toward the whole Plan; check_programmable names the first one a
// plan uses that it does not build yet.
#include "sim/schedule.hpp"
#include "strategies/memory.hpp"
#include "strategies/plan.hpp"
#include "workload/model_spec.hpp"

#include <cstdint>

namespace mop::lowering {

struct ProgramContext {
  const workload::ModelSpec* model = nullptr;
  std::int64_t seq = 0;
  int gpus_per_node = 8;
  // Precision of the layers' GEMMs (FP8 recipes run them in FP8 and keep attention, the LM head
  // and everything else in BF16): what the simulator charges them as.
  sim::Dtype gemm_dtype = sim::Dtype::bf16;
  // The memory the frameworks hold besides the program's tensors, as the memory model counts it
  // (strategies/memory.hpp): the CUDA context and NCCL's per-communicator and all-to-all buffers.
  // Each rank class gets them as resident cost tensors (sim::cost_tensor); zeros add none.
  strategy::MemoryHardware hw{};
  // Chunked loss (Plan::chunked_loss): tokens per sequence of the micro-batch in each of the
  // head's chunks (the memory model's 4096, Liger's and torchtitan's chunk size).
  std::int64_t loss_chunk_tokens = 4096;
  // The attention kernel the simulator prices attention as (strategy::attention_kernel).
  sim::AttentionKernel attention_kernel = sim::AttentionKernel::flash;
};

// Throws InputError with one sentence naming the first feature of `plan` the program lowering
// does not build yet (the plan must be complete: strategy::complete_plan).
void check_programmable(const strategy::Plan& plan, const ProgramContext& ctx);

sim::Schedule lower_program(const strategy::Plan& plan, const ProgramContext& ctx);

} // namespace mop::lowering
