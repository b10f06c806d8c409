#include "planner/replay.hpp"

#include "planner/fold.hpp"

#include "sim/engine.hpp"
#include "strategies/pipeline.hpp"

#include <algorithm>
#include <stdexcept>
#include <vector>

namespace mop::planner {

using strategy::PassModel;
using strategy::PassOps;

namespace {

// One part (the forward or the backward) of a pass, played alone on the engine.
struct Part {
  double gpu_s = 0;         // from its start to the end of its last op on the data path
  double host_s = 0;        // the host's time to issue its kernels
  double link_s[2] = {0, 0}; // collectives' time in it over NVLink, over the NIC (the path's
                             // and those it waits for: ring hops)
  sim::Breakdown breakdown; // what the GPU spent those gpu_s on
};

// Which link a collective crosses: 0 NVLink (its group inside a node), 1 the NIC.
int link_of(const sim::Op& op, const sim::Schedule& groups) {
  return groups.groups[static_cast<std::size_t>(op.group)].inside_node() ? 0 : 1;
}

Part play_part(const PassOps& pass, std::size_t begin, std::size_t end, PassOps::Role role,
               const sim::Schedule& groups, double host_issue_s, const hw::ClusterSpec& cluster,
               const hw::Calibration& calibration) {
  Part part;
  if (begin == end)
    return part;
  sim::Schedule s;
  s.groups = groups.groups;
  s.world = groups.world;
  s.gpus_per_node = groups.gpus_per_node;
  sim::RankClass rc;
  rc.name = "pass";
  rc.ops.reserve(end - begin);
  int streams = 1, previous = -1;
  for (std::size_t i = begin; i < end; ++i) {
    sim::Op op = pass.ops[i];
    // Its cost and its place in the pass only: no tensors, no other class.
    op.allocs.clear();
    op.frees.clear();
    op.inputs.clear();
    op.outputs.clear();
    op.remote_deps.clear();
    // The ops of the data path follow each other (PassOps: the hand-built embedding and head
    // passes list them without dependencies).
    std::vector<int> deps;
    for (const int d : op.deps)
      if (d >= static_cast<int>(begin) && d < static_cast<int>(i))
        deps.push_back(d - static_cast<int>(begin));
    if (pass.roles[i] == role) {
      if (previous >= 0)
        deps.push_back(previous);
      previous = static_cast<int>(i - begin);
    }
    op.deps = std::move(deps);
    streams = std::max(streams, op.stream + 1);
    if (sim::launches_kernels(op))
      part.host_s += host_issue_s * op.kernels;
    rc.ops.push_back(std::move(op));
  }
  rc.streams.assign(static_cast<std::size_t>(streams), "stream");
  s.classes.push_back(std::move(rc));
  sim::EngineOptions quick;
  quick.check_schedule_first = false;
  quick.record_memory_timeline = false;
  const sim::SimResult r = sim::simulate(s, cluster, calibration, quick);
  // The next part waits for this one's path, and its first op (a norm, a GEMM) for whatever
  // ran before it on the compute stream (the residual add, off the path).
  for (std::size_t i = begin; i < end; ++i)
    if (pass.roles[i] == role || pass.ops[i].stream == strategy::kComputeStream)
      part.gpu_s = std::max(part.gpu_s, r.classes[0].ops[i - begin].end_s);
  part.breakdown = sim::breakdown_between(s.classes[0], r.classes[0].ops, 0, part.gpu_s);
  for (std::size_t i = begin; i < end; ++i) {
    const sim::Op& op = pass.ops[i];
    if (sim::is_collective(op.kind) && op.group >= 0)
      part.link_s[link_of(op, groups)] += r.classes[0].ops[i - begin].end_s -
                                          r.classes[0].ops[i - begin].start_s;
  }
  return part;
}

} // namespace

StepEvaluation replay_step(const strategy::Plan& plan, const strategy::LoweringContext& ctx,
                           const hw::ClusterSpec& cluster, const hw::Calibration& calibration) {
  if (!strategy::chunk_replayable(plan, ctx))
    throw std::logic_error("replay_step: the plan is not a pipeline the replay "
                           "plays (strategy::chunk_replayable).");
  const PassModel model = strategy::pass_model(plan, ctx, true);
  const double host_issue = strategy::host_issue_s(plan, ctx);
  auto duration = [&](const sim::Op& op) {
    return sim::op_duration_s(op, model.groups, cluster, calibration);
  };
  const double slowdown = sim::EngineOptions{}.compute_slowdown_with_comm;
  const std::size_t n_passes = model.passes.size();
  std::vector<Part> fwd(n_passes), bwd(n_passes);
  std::vector<double> pass_flops(n_passes, 0.0);
  for (std::size_t p = 0; p < n_passes; ++p) {
    const PassOps& pass = model.passes[p];
    fwd[p] = play_part(pass, 0, pass.forward_end, PassOps::Role::forward, model.groups,
                       host_issue, cluster, calibration);
    bwd[p] = play_part(pass, pass.forward_end, pass.ops.size(), PassOps::Role::backward,
                       model.groups, host_issue, cluster, calibration);
    for (const sim::Op& op : pass.ops)
      pass_flops[p] += op.model_flops;
  }
  // The pipeline's transfer: the send's time, and the host's for a send or a receive.
  const double send_s = duration(model.pp_send);
  const double transfer_host = host_issue * model.pp_send.kernels;

  const int pp = plan.pp, vp = strategy::chunks_per_stage(plan), micro = plan.micro_batches();
  const std::size_t items = static_cast<std::size_t>(vp) * static_cast<std::size_t>(micro);
  struct Chunk {
    double forward = 0, backward = 0, forward_host = 0, backward_host = 0;
    double forward_link[2] = {0, 0}, backward_link[2] = {0, 0};
  };
  struct Stage {
    std::vector<strategy::PipelineStep> order;
    std::vector<Chunk> chunks;
    std::size_t next = 0;
    double path = 0, pp_stream = 0, host = 0;
    // The once-a-step reductions' streams (by stream index) and the times they are busy, and
    // when the last of each chain ends (the optimizer waits for them).
    std::vector<double> stream_free;
    struct Busy {
      double begin, end;
      int link;
    };
    std::vector<Busy> busy;
    std::size_t busy_from = 0; // busy intervals before it end before anything still to run
    double reduced = 0;
    // ZeRO-3 in the stage: each layer's (by its place in the stage, chunk by chunk) latest
    // forward's end, and how many layers' gathers are queued.
    std::vector<double> forward_end;
    std::size_t gathers_queued = 0;
    std::vector<double> gathered; // when each queued layer's gathers end
    sim::Breakdown work; // its chunks' parts, summed
    double end = 0;
    bool done = false;
  };
  std::vector<Stage> stages(static_cast<std::size_t>(pp));
  std::vector<std::vector<double>> send_fwd(static_cast<std::size_t>(pp),
                                            std::vector<double>(items, -1.0));
  std::vector<std::vector<double>> send_bwd = send_fwd;
  for (int s = 0; s < pp; ++s) {
    Stage& st = stages[static_cast<std::size_t>(s)];
    const PassModel::Stage& ms = model.stages[static_cast<std::size_t>(s)];
    st.order = strategy::pipeline_order(plan, s);
    st.chunks.resize(static_cast<std::size_t>(vp));
    for (int c = 0; c < vp; ++c)
      for (const int p : ms.chunks[static_cast<std::size_t>(c)]) {
        Chunk& ch = st.chunks[static_cast<std::size_t>(c)];
        const auto pi = static_cast<std::size_t>(p);
        ch.forward += fwd[pi].gpu_s;
        ch.backward += bwd[pi].gpu_s;
        ch.forward_host += fwd[pi].host_s;
        ch.backward_host += bwd[pi].host_s;
        for (int l = 0; l < 2; ++l) {
          ch.forward_link[l] += fwd[pi].link_s[l];
          ch.backward_link[l] += bwd[pi].link_s[l];
        }
        for (const Part* part : {&fwd[pi], &bwd[pi]})
          sim::each_part(st.work, part->breakdown,
                         [micro](double& sum, double x) { sum += micro * x; });
      }
  }

  // ZeRO-3 stages: each stage's layers in order (their passes), and where each chunk's start.
  bool zero3 = false;
  for (const std::vector<sim::Op>& g : model.step_gathers)
    zero3 = zero3 || !g.empty();
  for (const PassModel::Stage& ms : model.stages)
    zero3 = zero3 || !ms.table_step_gathers.empty() || !ms.head_step_gathers.empty();
  std::vector<std::vector<int>> layer_pass(static_cast<std::size_t>(pp));
  std::vector<std::vector<std::size_t>> layers_before(static_cast<std::size_t>(pp));
  for (int s = 0; s < pp; ++s) {
    const auto si = static_cast<std::size_t>(s);
    for (const std::vector<int>& chunk : model.stages[si].chunks) {
      layers_before[si].push_back(layer_pass[si].size());
      for (const int p : chunk)
        if (p != model.embedding_pass && p != model.head_pass)
          layer_pass[si].push_back(p);
    }
    stages[si].forward_end.assign(layer_pass[si].size(), -1.0);
    stages[si].gathered.assign(layer_pass[si].size(), 0.0);
  }

  // A chain of ops on stage st's streams, the first after `after`; returns when the last ends.
  auto run_chain = [&](Stage& st, const std::vector<sim::Op>& chain, double after) {
    for (const sim::Op& op : chain) {
      const auto k = static_cast<std::size_t>(op.stream);
      if (k >= st.stream_free.size())
        st.stream_free.resize(k + 1, 0.0);
      const double begin = std::max(after, st.stream_free[k]);
      after = begin + duration(op);
      st.stream_free[k] = after;
      st.busy.push_back({begin, after, link_of(op, model.groups)});
    }
    return after;
  };
  // Work over [from, to) on stage st that its reductions overlap runs slower, as the engine
  // shares the GPU: compute by compute_slowdown_with_comm, a collective on the path at half its
  // rate when a reduction crosses its link. `link_s`: of the work, the collectives per link.
  auto lost = [&](Stage& st, double from, double to, const double* link_s) {
    while (st.busy_from < st.busy.size() && st.busy[st.busy_from].end <= from)
      ++st.busy_from;
    const double span = to - from;
    if (span <= 0)
      return 0.0;
    const double compute = std::max(0.0, 1 - (link_s[0] + link_s[1]) / span);
    double lost_s = 0;
    for (std::size_t k = st.busy_from; k < st.busy.size(); ++k) {
      const Stage::Busy& b = st.busy[k];
      const double overlap = std::max(0.0, std::min(to, b.end) - std::max(from, b.begin));
      lost_s += overlap * (slowdown * compute + 0.5 * link_s[b.link] / span);
    }
    return lost_s;
  };

  // The once-a-step tail of a stage after its last chunk: the embedding kind's reductions, the
  // optimizer step once every reduction has ended, then the parameter gathers.
  auto tail = [&](int s) {
    Stage& st = stages[static_cast<std::size_t>(s)];
    const PassModel::Stage& ms = model.stages[static_cast<std::size_t>(s)];
    double ready = std::max(st.path, st.reduced);
    for (const std::vector<sim::Op>& chain : ms.embedding_reductions)
      ready = std::max(ready, run_chain(st, chain, st.path));
    const double step_s = ms.has_gpu_step ? duration(ms.gpu_step) : 0.0;
    auto exposed_dp = [&](double seconds) {
      st.work.exposed_comm += seconds;
      st.work.exposed_comm_by_category[static_cast<int>(sim::Category::dp_comm)] += seconds;
    };
    exposed_dp(ready - st.path); // the step waits for the last reductions
    st.path = ready + step_s;
    st.work.optimizer += step_s;
    for (const std::vector<int>& chunk : ms.chunks)
      for (const int p : chunk)
        run_chain(st, model.param_gathers[static_cast<std::size_t>(p)], st.path);
    run_chain(st, ms.embedding_gathers, st.path);
    st.end = st.path;
    for (const double f : st.stream_free)
      st.end = std::max(st.end, f);
    exposed_dp(st.end - st.path); // and then for the parameter gathers
  };

  int finished = 0;
  while (finished < pp) {
    bool progress = false;
    for (int s = 0; s < pp; ++s) {
      Stage& st = stages[static_cast<std::size_t>(s)];
      if (st.done)
        continue;
      while (st.next < st.order.size()) {
        const strategy::PipelineStep& it = st.order[st.next];
        const bool embeds = s == 0 && it.chunk == 0, heads = s == pp - 1 && it.chunk == vp - 1;
        const std::size_t key = static_cast<std::size_t>(it.chunk) * static_cast<std::size_t>(micro) +
                                static_cast<std::size_t>(it.micro_batch);
        if (it.forward ? !embeds : !heads) {
          // The receive: the previous virtual stage's activations, or the next one's gradient.
          const strategy::VirtualStage from =
              strategy::virtual_neighbour(plan, s, it.chunk, it.forward ? -1 : +1);
          const double sent =
              (it.forward ? send_fwd : send_bwd)[static_cast<std::size_t>(from.stage)]
                                                [static_cast<std::size_t>(from.chunk) *
                                                     static_cast<std::size_t>(micro) +
                                                 static_cast<std::size_t>(it.micro_batch)];
          if (sent < 0)
            break; // not sent yet: another stage first
          st.host += transfer_host;
          // Waiting for its own last send is exposed communication; for the other stage, bubble.
          const double send_wait = std::max(0.0, st.pp_stream - st.path);
          st.work.exposed_comm += send_wait;
          st.work.exposed_comm_by_category[static_cast<int>(sim::Category::pp_comm)] += send_wait;
          st.path = st.pp_stream = std::max({st.path, st.pp_stream, st.host, sent});
        }
        const Chunk& ch = st.chunks[static_cast<std::size_t>(it.chunk)];
        const double start = std::max(st.path, st.host);
        const double gpu = it.forward ? ch.forward : ch.backward;
        // A chunk that receives nothing may start while the stage's last send still runs,
        // slower for that while.
        double t = start + slowdown * std::clamp(st.pp_stream - start, 0.0, gpu);
        const std::vector<int>& chunk_passes =
            model.stages[static_cast<std::size_t>(s)].chunks[static_cast<std::size_t>(it.chunk)];
        if (it.forward && zero3) {
          // The step's first forward of each layer (micro-batch 0) waits for its ZeRO-3
          // gathers, which start once the layer two before it has run its latest forward (one
          // layer of prefetch); the embedding's and the head's buckets just before them.
          const PassModel::Stage& ms = model.stages[static_cast<std::size_t>(s)];
          const std::size_t first_layer = layers_before[static_cast<std::size_t>(s)]
                                                       [static_cast<std::size_t>(it.chunk)];
          std::size_t local = first_layer;
          const std::size_t chunk_end =
              static_cast<std::size_t>(it.chunk) + 1 < layers_before[static_cast<std::size_t>(s)].size()
                  ? layers_before[static_cast<std::size_t>(s)][static_cast<std::size_t>(it.chunk) + 1]
                  : layer_pass[static_cast<std::size_t>(s)].size();
          const bool first_use = it.micro_batch == 0;
          auto queue_layer = [&](std::size_t i) {
            // Layer i's gathers, once the layer two before it has run its latest forward.
            while (first_use && st.gathers_queued <= i &&
                   st.gathers_queued < st.gathered.size()) {
              const std::size_t q = st.gathers_queued;
              if (q >= 2 && st.forward_end[q - 2] < 0)
                break;
              const double gate = q >= 2 ? st.forward_end[q - 2] : 0.0;
              st.gathered[q] = run_chain(st, model.step_gathers[static_cast<std::size_t>(
                                                 layer_pass[static_cast<std::size_t>(s)][q])],
                                         gate);
              ++st.gathers_queued;
            }
          };
          for (const int p : chunk_passes) {
            const auto pi = static_cast<std::size_t>(p);
            if (first_use && p == model.embedding_pass)
              t = std::max(t, run_chain(st, ms.table_step_gathers, t));
            else if (first_use && p == model.head_pass)
              t = std::max(t, run_chain(st, ms.head_step_gathers, t));
            const bool layer = p != model.embedding_pass && p != model.head_pass;
            if (layer && first_use) {
              queue_layer(local);
              t = std::max(t, st.gathered[local]);
              if (local + 1 < chunk_end) // the next layer's prefetch overlaps this one; the
                queue_layer(local + 1);  // next chunk's first layer waits for that chunk
            }
            const double from = t;
            t += fwd[pi].gpu_s;
            t += lost(st, from, t, fwd[pi].link_s);
            if (layer)
              st.forward_end[local++] = t;
          }
        } else if (!it.forward && it.micro_batch == micro - 1) {
          // The step's last backward of each layer, the chunk's last layer first: its
          // gradients' reductions start as it ends.
          const std::vector<int>& passes = chunk_passes;
          for (auto p = passes.rbegin(); p != passes.rend(); ++p) {
            const double from = t;
            t += bwd[static_cast<std::size_t>(*p)].gpu_s;
            t += lost(st, from, t, bwd[static_cast<std::size_t>(*p)].link_s);
            for (const std::vector<sim::Op>& chain : model.reductions[static_cast<std::size_t>(*p)])
              st.reduced = std::max(st.reduced, run_chain(st, chain, t));
          }
        } else {
          t += gpu;
          t += lost(st, t - gpu, t, it.forward ? ch.forward_link : ch.backward_link);
        }
        st.host += it.forward ? ch.forward_host : ch.backward_host;
        st.path = std::max(t, st.host);
        if (it.forward ? !heads : !embeds) {
          st.host += transfer_host;
          st.pp_stream = std::max({st.path, st.pp_stream, st.host}) + send_s;
          (it.forward ? send_fwd : send_bwd)[static_cast<std::size_t>(s)][key] = st.pp_stream;
        }
        ++st.next;
        progress = true;
      }
      if (st.next == st.order.size()) {
        tail(s);
        st.done = true;
        ++finished;
        progress = true;
      }
    }
    if (!progress)
      throw std::logic_error("replay_step: the pipeline order waits on a transfer never sent.");
  }

  StepEvaluation e;
  e.micro_batches = micro;
  e.micro_batches_simulated = 0;
  e.tokens_per_step = static_cast<double>(plan.global_batch) * static_cast<double>(ctx.seq);
  std::size_t critical = 0;
  for (std::size_t s = 0; s < stages.size(); ++s)
    if (stages[s].end > stages[critical].end)
      critical = s;
  e.step_time_s = e.result.step_time_s = stages[critical].end;
  sim::Breakdown& b = e.result.breakdown;
  b = stages[critical].work;
  // What the critical stage's chunks and step do not fill is the pipeline's: its bubble, the
  // transfers it waits for, the tail's exposed gathers.
  b.bubble = std::max(0.0, e.step_time_s - b.compute - b.exposed_comm - b.offload_stall -
                               b.optimizer);
  double flops = 0;
  for (const PassModel::Stage& ms : model.stages)
    for (std::size_t p = 0; p < n_passes; ++p)
      flops += ms.count[p] * pass_flops[p];
  e.model_flops_per_step = flops * micro * plan.ranks_per_stage();
  return e;
}

StepEvaluation evaluate_for_search(const strategy::Plan& plan, const strategy::LoweringContext& ctx,
                                   const hw::ClusterSpec& cluster,
                                   const hw::Calibration& calibration, int max_simulated,
                                   bool* replayed, bool fold) {
  const bool replay = strategy::chunk_replayable(plan, ctx);
  if (replayed != nullptr)
    *replayed = replay;
  if (replay)
    return replay_step(plan, ctx, cluster, calibration);
  if (fold)
    if (std::optional<StepEvaluation> folded =
            fold_layers(plan, ctx, cluster, calibration, max_simulated))
      return std::move(*folded);
  return evaluate_step(plan, ctx, cluster, calibration, max_simulated, Lowering::cost_only,
                       Check::skip);
}

bool approximated_for_search(const strategy::Plan& plan, const strategy::LoweringContext& ctx) {
  return strategy::chunk_replayable(plan, ctx) || foldable_layers(plan, ctx).has_value();
}

} // namespace mop::planner
