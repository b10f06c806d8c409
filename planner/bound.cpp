#include "planner/bound.hpp"

#include "common/error.hpp"
#include "sim/engine.hpp"
#include "strategies/pipeline.hpp"

#include <algorithm>
#include <utility>
#include <vector>

namespace mop::planner {

using sim::OpKind;
using strategy::LayerKind;
using strategy::Recompute;

double compute_lower_bound_s(const strategy::Plan& plan, const strategy::LoweringContext& ctx,
                             const hw::ClusterSpec& cluster, const hw::Calibration& calibration) {
  if (ctx.model == nullptr || ctx.seq <= 0)
    throw InputError("lowering needs a model and a positive sequence length.");
  // Every compute op of a stage runs on its one compute stream at a rate of at most 1, so a
  // stage takes at least the sum of its compute ops' standalone times: forward, backward (two
  // GEMMs per GEMM, flash backward) and recompute, per micro-batch.
  const workload::ModelSpec& m = *ctx.model;
  const int L = static_cast<int>(m.num_layers());
  const int micro = plan.micro_batches();
  const Recompute rc_att = plan.recompute[static_cast<int>(LayerKind::attention)];
  const bool any_rc = rc_att != Recompute::none ||
                      plan.recompute[static_cast<int>(LayerKind::moe)] != Recompute::none ||
                      plan.recompute[static_cast<int>(LayerKind::dense)] != Recompute::none;
  // Compute kernels read no communicator: an empty Schedule prices them.
  const sim::Schedule no_groups;
  auto duration = [&](const sim::Op& op) {
    return sim::op_duration_s(op, no_groups, cluster, calibration);
  };
  // Per layer kind (dense / MoE, window), one micro-batch: the compute ops' time.
  auto layer_time = [&](std::vector<strategy::ForwardKernel>& kernels) {
    double t = 0;
    for (strategy::ForwardKernel& k : kernels) {
      sim::Op& op = k.op;
      const double steps = k.ring_steps;
      const sim::GemmShape g = op.gemm;
      double fwd = duration(op) * steps;
      double bwd = 0;
      if (op.kind == OpKind::gemm || op.kind == OpKind::grouped_gemm) {
        // As the lowering's backward: dX = dY·Wᵀ and dW = Xᵀ·dY.
        sim::Op d = op;
        if (op.kind == OpKind::gemm)
          d.gemm = sim::GemmShape{g.m, g.k, g.n, g.instances, {}};
        else {
          d.gemm.n = g.k;
          d.gemm.k = g.n;
        }
        sim::Op w = op;
        if (op.kind == OpKind::gemm)
          w.gemm = sim::GemmShape{g.k, g.n, g.m, g.instances, {}};
        bwd = duration(d) + duration(w);
      } else if (op.kind == OpKind::attention_fwd) {
        op.kind = OpKind::attention_bwd;
        bwd = duration(op) * steps;
      } else {
        op.bytes *= 2;
        bwd = duration(op);
      }
      const bool recomputed = any_rc && (rc_att == Recompute::full || k.selective_recompute);
      t += fwd + bwd + (recomputed ? fwd : 0);
    }
    return t;
  };
  // The layers of one kind lower to the same kernels: one layer of each kind is priced.
  std::vector<workload::LayerSpec> kinds;
  std::vector<std::size_t> kind_of(static_cast<std::size_t>(L));
  for (std::size_t l = 0; l < kind_of.size(); ++l) {
    const workload::LayerSpec& layer = m.layers[l];
    std::size_t k = 0;
    while (k < kinds.size() &&
           std::pair{kinds[k].mlp, kinds[k].window} != std::pair{layer.mlp, layer.window})
      ++k;
    if (k == kinds.size())
      kinds.push_back(layer);
    kind_of[l] = k;
  }
  std::vector<std::vector<strategy::ForwardKernel>> kernels =
      strategy::layer_forward_kernels(plan, ctx, kinds);
  std::vector<double> time_of_kind(kinds.size());
  for (std::size_t k = 0; k < kinds.size(); ++k)
    time_of_kind[k] = layer_time(kernels[k]);
  double worst = 0;
  const int vp = strategy::chunks_per_stage(plan);
  const std::vector<int> bounds = strategy::virtual_stage_bounds(plan, L);
  for (int stage = 0; stage < plan.pp; ++stage) {
    double t = 0;
    for (int chunk = 0; chunk < vp; ++chunk) {
      const int v = chunk * plan.pp + stage;
      for (int l = bounds[static_cast<std::size_t>(v)]; l < bounds[static_cast<std::size_t>(v + 1)];
           ++l)
        t += time_of_kind[kind_of[static_cast<std::size_t>(l)]];
    }
    worst = std::max(worst, t * micro);
  }
  return worst;
}

} // namespace mop::planner
