#pragma once
// Pipeline bookkeeping shared by every executor of a Plan: which decoder layers each virtual
// stage holds, and the order in which a stage runs its micro-batches' forward and backward
// passes. The lowering (strategies/lower.cpp) and the CPU executor (real_backend/cpu/) both
// follow these, so the simulated and the executed schedules are the same schedule.
#include "strategies/plan.hpp"

#include <vector>

namespace mop::strategy {

// Model chunks per pipeline rank: vp under interleaved 1F1B, 1 otherwise.
int chunks_per_stage(const Plan& p);

// Virtual stage v = chunk * pp + stage holds layers [bounds[v], bounds[v + 1]); size pp·chunks+1.
// Without interleaving the split follows Plan::layers_in_stage; with it, layers are spread
// evenly over the virtual stages (the first ones take one more).
std::vector<int> virtual_stage_bounds(const Plan& p, int num_layers);

// A virtual stage: chunk `chunk` of pipeline stage `stage` (virtual stage chunk * pp + stage).
struct VirtualStage {
  int stage = 0;
  int chunk = 0;
};
// The virtual stage next to (stage, chunk) towards later ones (direction +1: where its
// activations go, and whence its gradient comes) or earlier ones (-1): the next (previous)
// stage's same chunk, or past the last (first) stage the first (last) stage's next (previous)
// chunk. Its chunk may fall outside [0, chunks): no such neighbour.
VirtualStage virtual_neighbour(const Plan& p, int stage, int chunk, int direction);

// The order's pieces (pipeline_order below builds it from them): how many of the stage's
// forwards run before its first backward (all of them with GPipe); which chunk a stage's k-th
// forward and k-th backward run (interleaved 1F1B goes round its chunks every pp
// micro-batches, forwards first to last and backwards last to first; 0 otherwise).
long warmup_forwards(const Plan& p, int stage);
int forward_chunk(const Plan& p, long k);
int backward_chunk(const Plan& p, long k);

struct PipelineStep {
  bool forward = true;
  int micro_batch = 0;
  int chunk = 0; // the stage's model chunk (virtual stage chunk * pp + stage)
  // Zero-bubble: weight gradients held back by earlier backwards run before this step.
  bool flush_deferred_wgrad = false;
};

// The order of one stage's passes over the step's micro-batches. Without a pipeline each
// micro-batch's backward follows its forward (gradient accumulation); GPipe runs every forward,
// then every backward; 1F1B warms up with pp - stage - 1 forwards, then alternates one forward
// and one backward; zero-bubble (ZB-H1, Qi et al. 2023) is 1F1B with each backward's weight
// gradients held back to the next point where the stage would wait. Interleaved 1F1B (Narayanan
// et al. 2021, as Megatron-LM orders it) walks (micro-batch, chunk) pairs: groups of pp
// micro-batches through chunk 0, then chunk 1, ...; backwards visit the chunks in reverse; the
// warm-up is 2·(pp - stage - 1) + (vp - 1)·pp forwards.
std::vector<PipelineStep> pipeline_order(const Plan& p, int stage);

// Whether backwards hold their weight gradients back (zero-bubble under a pipeline).
bool defers_weight_gradients(const Plan& p);

// Plays one stage's order: flush() runs the held-back weight gradients where the order says,
// and once more at the end; forward(mb, chunk) and backward(mb, chunk) run the passes.
template <class Flush, class Forward, class Backward>
void play_pipeline(const Plan& p, int stage, Flush flush, Forward forward, Backward backward) {
  for (const PipelineStep& st : pipeline_order(p, stage)) {
    if (st.flush_deferred_wgrad)
      flush();
    if (st.forward)
      forward(st.micro_batch, st.chunk);
    else
      backward(st.micro_batch, st.chunk);
  }
  flush();
}

} // namespace mop::strategy
