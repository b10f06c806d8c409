#include "planner/bound.hpp"

#include "sim/engine.hpp"
#include "strategies/pipeline.hpp"

#include <algorithm>
#include <cstddef>
#include <limits>
#include <vector>

namespace mop::planner {

using strategy::PassModel;
using strategy::PassOps;

double StepBound::seconds() const {
  return std::max({compute, path, host});
}

namespace {

// From the moment a part of a pass (its forward, or its backward) starts on the data path to
// the end of its last path op: the longest chain of its ops, each at its standalone duration
// `d`, along the path (each path op waits for the one before it), their dependencies inside the
// part and their streams' order. A path op cannot start before the part does; an op off the
// path waits only for what it depends on here (without such a dependency it may have run
// earlier, so it delays nothing). Dependencies and contention outside the part only add time.
double longest_chain(const PassOps& pass, const std::vector<double>& d, std::size_t begin,
                     std::size_t end, PassOps::Role path_role) {
  constexpr double kNever = -std::numeric_limits<double>::infinity();
  std::vector<double> finish(end - begin, kNever);
  std::vector<std::ptrdiff_t> last_on_stream;
  std::ptrdiff_t previous = -1;
  double exit = 0;
  for (std::size_t i = begin; i < end; ++i) {
    const sim::Op& op = pass.ops[i];
    const bool path = pass.roles[i] == path_role;
    double start = path ? 0.0 : kNever;
    if (path && previous >= 0)
      start = std::max(start, finish[static_cast<std::size_t>(previous)]);
    for (const int dep : op.deps)
      if (dep >= static_cast<int>(begin) && dep < static_cast<int>(i))
        start = std::max(start, finish[static_cast<std::size_t>(dep) - begin]);
    const auto stream = static_cast<std::size_t>(op.stream);
    if (stream >= last_on_stream.size())
      last_on_stream.resize(stream + 1, -1);
    if (last_on_stream[stream] >= 0)
      start = std::max(start, finish[static_cast<std::size_t>(last_on_stream[stream])]);
    finish[i - begin] = start + d[i];
    last_on_stream[stream] = static_cast<std::ptrdiff_t>(i - begin);
    if (path) {
      previous = static_cast<std::ptrdiff_t>(i - begin);
      exit = finish[i - begin];
    }
  }
  return exit;
}

} // namespace

std::shared_ptr<const std::vector<PassTimesCache::Times>>
PassTimesCache::find(const strategy::Plan& key) const {
  std::lock_guard lock(mutex_);
  const auto it = map_.find(key);
  return it == map_.end() ? nullptr : it->second;
}

void PassTimesCache::store(strategy::Plan key, std::shared_ptr<const std::vector<Times>> times) {
  std::lock_guard lock(mutex_);
  map_.try_emplace(std::move(key), std::move(times));
}

StepBound step_lower_bound(const strategy::Plan& plan, const strategy::LoweringContext& ctx,
                           const hw::ClusterSpec& cluster, const hw::Calibration& calibration,
                           PassTimesCache* cache) {
  using Times = PassTimesCache::Times;
  const strategy::Plan key = cache != nullptr ? strategy::pass_key(plan) : strategy::Plan{};
  std::shared_ptr<const std::vector<Times>> known = cache != nullptr ? cache->find(key) : nullptr;
  const PassModel model = strategy::pass_model(plan, ctx, known == nullptr);
  auto duration = [&](const sim::Op& op) {
    return sim::op_duration_s(op, model.groups, cluster, calibration);
  };
  // Per pass, one micro-batch: its forward and backward path, and its compute-stream time.
  if (known == nullptr) {
    auto measured = std::make_shared<std::vector<Times>>();
    measured->reserve(model.passes.size());
    for (const PassOps& pass : model.passes) {
      Times t;
      std::vector<double> d(pass.ops.size());
      for (std::size_t i = 0; i < pass.ops.size(); ++i) {
        const sim::Op& op = pass.ops[i];
        d[i] = duration(op);
        const PassOps::Role role = pass.roles[i];
        const bool path = role == PassOps::Role::forward || role == PassOps::Role::backward;
        if ((path && !sim::is_collective(op.kind) && op.kind != sim::OpKind::send &&
             op.kind != sim::OpKind::recv) ||
            role == PassOps::Role::off_path_compute)
          t.compute += d[i];
      }
      t.forward = longest_chain(pass, d, 0, pass.forward_end, PassOps::Role::forward);
      t.backward =
          longest_chain(pass, d, pass.forward_end, pass.ops.size(), PassOps::Role::backward);
      measured->push_back(t);
    }
    known = measured;
    if (cache != nullptr)
      cache->store(key, measured);
  }
  const std::vector<Times>& times = *known;
  const double micro = plan.micro_batches();
  // Interleaving aside, a stage waits for the first micro-batch's forward through every stage
  // before it, and the last backward still passes through all of them after it: of each earlier
  // stage, its first chunk at least (the virtual stages before this one's first chunk).
  const bool drains_through = !strategy::defers_weight_gradients(plan);
  StepBound b;
  double fill = 0;
  // Per earlier stage u: its first chunk's backward and its step if on the path; `drains[u]`
  // is the time from the end of the stage after u's last backward to the end of u's step.
  std::vector<double> drains;
  for (std::size_t s = 0; s < model.stages.size(); ++s) {
    const PassModel::Stage& st = model.stages[s];
    double forward = 0, backward = 0, compute = 0, forward0 = 0, backward0 = 0;
    for (std::size_t p = 0; p < times.size(); ++p) {
      const double n = st.count[p], n0 = st.count_chunk0[p];
      forward += n * times[p].forward;
      backward += n * times[p].backward;
      compute += n * times[p].compute;
      forward0 += n0 * times[p].forward;
      backward0 += n0 * times[p].backward;
    }
    const double step = st.has_gpu_step ? duration(st.gpu_step) : 0;
    double host = 0;
    for (const auto& [op, count] : st.host_steps)
      host += count * duration(op);
    const double per_micro = forward + backward;
    b.compute = std::max(b.compute, micro * compute + step);
    // After the stage's last backward: its own step, or the last micro-batch's backward through
    // each earlier stage and that stage's step.
    const double own_step = st.step_on_path ? step + host : 0.0;
    double after = own_step;
    if (drains_through)
      for (const double d : drains)
        after = std::max(after, d);
    b.path = std::max(b.path, fill + micro * per_micro + after);
    double host_bound = host;
    // Streamed into the forward without a pipeline: the last layer's first forward waits for
    // every host step and its upload; the first micro-batch's backward and every later
    // micro-batch follow it on the path.
    if (plan.optimizer_on_host && plan.overlap == strategy::OptimizerOverlap::stream_forward &&
        model.stages.size() == 1 && st.last_layer_pass >= 0 && !st.host_steps.empty())
      host_bound = host + duration(st.upload_last) +
                   times[static_cast<std::size_t>(st.last_layer_pass)].forward + backward +
                   (micro - 1) * per_micro;
    b.host = std::max(b.host, host_bound);
    double dp = 0;
    for (const auto& [op, count] : st.dp_ops)
      dp += count * duration(op);
    b.dp = std::max(b.dp, dp);
    fill += forward0;
    // Through this stage: the earlier stages' drains get longer by this stage's backward.
    for (double& d : drains)
      d += backward0;
    drains.push_back(backward0 + own_step);
  }
  return b;
}

} // namespace mop::planner
