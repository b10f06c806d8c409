#include "strategies/pipeline.hpp"

#include <algorithm>

namespace mop::strategy {

int chunks_per_stage(const Plan& p) {
  return p.schedule == PipelineSchedule::interleaved_1f1b ? p.vp : 1;
}

std::vector<int> virtual_stage_bounds(const Plan& p, int num_layers) {
  const int vp = chunks_per_stage(p), stages = p.pp * vp;
  std::vector<int> bounds(static_cast<std::size_t>(stages + 1), 0);
  for (int v = 0; v < stages; ++v) {
    const int n = vp == 1 ? p.layers_in_stage(v, num_layers)
                          : num_layers / stages + (v < num_layers % stages ? 1 : 0);
    bounds[static_cast<std::size_t>(v + 1)] = bounds[static_cast<std::size_t>(v)] + n;
  }
  return bounds;
}

VirtualStage virtual_neighbour(const Plan& p, int stage, int chunk, int direction) {
  const int next = stage + direction;
  if (next >= p.pp)
    return {0, chunk + 1};
  if (next < 0)
    return {p.pp - 1, chunk - 1};
  return {next, chunk};
}

bool defers_weight_gradients(const Plan& p) {
  return p.pp > 1 && p.schedule == PipelineSchedule::zero_bubble;
}

std::vector<PipelineStep> pipeline_order(const Plan& p, int stage) {
  const int micro = p.micro_batches();
  std::vector<PipelineStep> order;
  if (p.pp == 1) {
    for (int mb = 0; mb < micro; ++mb) {
      order.push_back({true, mb, 0, false});
      order.push_back({false, mb, 0, false});
    }
    return order;
  }
  const int vp = chunks_per_stage(p), items = micro * vp;
  auto mb_of = [&](int k) { return (k / (p.pp * vp)) * p.pp + k % p.pp; };
  const int warmup = static_cast<int>(warmup_forwards(p, stage));
  int next_f = 0, next_b = 0;
  for (; next_f < warmup; ++next_f)
    order.push_back({true, mb_of(next_f), forward_chunk(p, next_f), false});
  while (next_b < items) {
    if (next_f < items) {
      order.push_back({true, mb_of(next_f), forward_chunk(p, next_f), true});
      ++next_f;
    }
    order.push_back({false, mb_of(next_b), backward_chunk(p, next_b), true});
    ++next_b;
  }
  return order;
}

long warmup_forwards(const Plan& p, int stage) {
  const long vp = chunks_per_stage(p), items = static_cast<long>(p.micro_batches()) * vp;
  if (p.schedule == PipelineSchedule::gpipe)
    return items;
  return vp == 1 ? std::min<long>(p.micro_batches(), p.pp - stage - 1)
                 : std::min(items, 2L * (p.pp - stage - 1) + (vp - 1) * p.pp);
}

int forward_chunk(const Plan& p, long k) {
  return static_cast<int>((k / p.pp) % chunks_per_stage(p));
}

int backward_chunk(const Plan& p, long k) {
  return chunks_per_stage(p) - 1 - forward_chunk(p, k);
}

} // namespace mop::strategy
