#include "planner/fold.hpp"

#include "sim/engine.hpp"
#include "strategies/lower.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <map>
#include <span>
#include <variant>
#include <utility>
#include <vector>

namespace mop::planner {

namespace {

constexpr int kMinRun = 12;
constexpr int kFirst = 2; // the run's length in the shortest model
// How far the three short models may lie from a straight line, relative to the longest one's
// step (or its class's peak): each further layer must add the same time and memory.
constexpr double kSettled = 1e-4;

bool same_layer(const workload::LayerSpec& a, const workload::LayerSpec& b) {
  return a.mlp == b.mlp && a.window == b.window;
}

// Where layer `i` of the model whose run is cut to `k` layers sits in the full model: before
// the run and in its first half counted from the model's start, in its second half and after
// it counted from the end.
int full_position(int i, const LayerRun& run, int k) {
  if (i < run.begin)
    return i;
  if (i >= run.begin + k)
    return i + (run.length - k);
  const int j = i - run.begin;
  return 2 * j < k ? run.begin + j : run.begin + run.length - (k - j);
}

using LayerPeak = sim::ClassMemory::LayerPeak;
using Pieces = std::map<std::pair<int, int>, LayerPeak>; // by (layer in the full model, pass)

// One class's per-piece peaks of a short model, by their place in the full model.
Pieces in_full_model(const std::vector<LayerPeak>& by_layer, const LayerRun& run, int k) {
  Pieces out;
  for (const LayerPeak& p : by_layer)
    out[{p.layer < 0 ? -1 : full_position(p.layer, run, k), p.pass}] = p;
  return out;
}

bool settled(double a, double b, double c, double scale) {
  return std::fabs(c - 2 * b + a) <= kSettled * scale;
}

// Whether the run's layers have settled in the short model `e` (its run of k layers from
// run.begin), judged on the layers in the run's middle (its first and last border other pieces:
// the last one's forward runs on into its backward). No stream may fall behind the compute
// stream: in each pass (a forward, a backward, per micro-batch) a middle layer may add no more
// time on any stream than it adds on the compute stream, the pace. A stream slower than the
// pace (offload copies behind the compute they follow) builds a queue that grows with depth and
// changes the step's slope further on; a faster one (a prefetch still catching up from the
// first, ungated layers) is settling. Nor may the host fall behind: where issuing a layer's
// kernels takes it longer than the pace, the lead it gained elsewhere (over the embedding, the
// loss) runs out a few layers on, and from then on each layer waits for it.
std::optional<Unfolded> unsettled(const StepEvaluation& e, const LayerRun& run, int k) {
  const double tolerance = 1e-6 * e.step_time_s;
  for (std::size_t c = 0; c < e.schedule.classes.size(); ++c) {
    const sim::RankClass& rc = e.schedule.classes[c];
    const std::vector<sim::OpTiming>& times = e.result.classes[c].ops;
    const sim::ProgramPieces pieces = sim::program_pieces(rc);
    const std::size_t n_pieces = pieces.layer.size();
    // When each stream's ops of each piece end (-1: none).
    std::vector<double> ends(rc.streams.size() * n_pieces, -1.0);
    std::vector<double> issue(n_pieces, 0.0); // the host's time to issue each piece's kernels
    std::vector<bool> copies(rc.streams.size(), false); // streams of host-device copies
    for (std::size_t i = 0; i < rc.ops.size(); ++i) {
      if (sim::is_copy(rc.ops[i].kind))
        copies[static_cast<std::size_t>(rc.ops[i].stream)] = true;
      if (sim::launches_kernels(rc.ops[i]))
        issue[static_cast<std::size_t>(pieces.of_op[i])] +=
            e.schedule.host_issue_s * rc.ops[i].kernels;
      double& end = ends[static_cast<std::size_t>(rc.ops[i].stream) * n_pieces +
                         static_cast<std::size_t>(pieces.of_op[i])];
      end = std::max(end, times[i].end_s);
    }
    // The pieces of the middle layers (run.begin + 1 ..), by pass and layer.
    const int first = run.begin + 1, middle = k - 2;
    int passes = 0;
    for (std::size_t p = 0; p < n_pieces; ++p)
      if (pieces.layer[p] == first)
        passes = std::max(passes, pieces.pass[p] + 1);
    std::vector<int> piece(static_cast<std::size_t>(passes * middle), -1);
    for (std::size_t p = 0; p < n_pieces; ++p) {
      const int j = pieces.layer[p] - first;
      if (j >= 0 && j < middle && pieces.pass[p] < passes)
        piece[static_cast<std::size_t>(pieces.pass[p] * middle + j)] = static_cast<int>(p);
    }
    if (std::any_of(piece.begin(), piece.end(), [](int p) { return p < 0; }))
      return Unfolded::drifts; // the middle layers' programs differ
    for (int pass = 0; pass < passes; ++pass) {
      auto end_of = [&](std::size_t stream, int j) {
        return ends[stream * n_pieces +
                    static_cast<std::size_t>(piece[static_cast<std::size_t>(pass * middle + j)])];
      };
      for (std::size_t st = 0; st < rc.streams.size(); ++st) {
        int used = 0;
        for (int j = 0; j < middle; ++j)
          used += end_of(st, j) >= 0;
        if (used != 0 && used != middle)
          return Unfolded::drifts; // some layers use this stream in this pass, others not
      }
      const auto compute = static_cast<std::size_t>(strategy::kComputeStream);
      if (end_of(compute, 0) < 0)
        continue;
      for (int j = 0; j + 1 < middle; ++j) {
        // The pace: what a layer adds on the compute stream (backward passes run the layers
        // down, so the differences are negative there).
        const double pace = std::fabs(end_of(compute, j + 1) - end_of(compute, j));
        for (std::size_t st = 0; st < rc.streams.size(); ++st) {
          if (end_of(st, j) < 0)
            continue;
          const double d = std::fabs(end_of(st, j + 1) - end_of(st, j));
          if (d > pace + tolerance)
            return Unfolded::drifts;
          // Host copies must keep the pace exactly: a copy stream a little slower than the
          // compute on average, its copies started as each layer's compute ends, keeps pace
          // for a layer or two and then slips one copy behind, again and again (the copies
          // awaiting their turn, and the memory they hold, grow in steps the short models
          // do not see).
          if (copies[st] && std::fabs(d - pace) > tolerance)
            return Unfolded::drifts;
        }
        if (issue[static_cast<std::size_t>(piece[static_cast<std::size_t>(pass * middle + j + 1)])] >
            pace + tolerance)
          return Unfolded::host_behind;
      }
    }
  }
  return std::nullopt;
}

} // namespace

std::optional<LayerRun> foldable_layers(const strategy::Plan& plan,
                                        const strategy::LoweringContext& ctx) {
  if (plan.pp != 1 || ctx.model == nullptr || ctx.expert_loads != nullptr)
    return std::nullopt;
  const std::vector<workload::LayerSpec>& layers = ctx.model->layers;
  LayerRun best;
  for (std::size_t i = 0; i < layers.size();) {
    std::size_t j = i + 1;
    while (j < layers.size() && same_layer(layers[j], layers[i]))
      ++j;
    if (static_cast<int>(j - i) > best.length)
      best = {static_cast<int>(i), static_cast<int>(j - i)};
    i = j;
  }
  if (best.length < kMinRun)
    return std::nullopt;
  return best;
}

namespace {

// The step folded from three short models `e` whose runs have k, k + 1 and k + 2 layers
// (see fold_layers), or why not. Moves the longest one's evaluation out when it folds.
std::variant<StepEvaluation, Unfolded> fold_from(std::span<StepEvaluation, 3> e, const LayerRun& run,
                                                 int k) {
  StepEvaluation& last = e[2];
  const std::size_t n_classes = last.result.classes.size();
  for (const StepEvaluation& x : e)
    if (x.result.classes.size() != n_classes)
      return Unfolded::not_linear;
  if (!settled(e[0].step_time_s, e[1].step_time_s, last.step_time_s, last.step_time_s))
    return Unfolded::not_linear;
  if (const std::optional<Unfolded> reason = unsettled(last, run, k + 2))
    return *reason;
  // Each further layer of the run adds what the longest model's last one added.
  const double more = run.length - (k + 2);
  auto extend = [more](double& at_last, double at_before) {
    at_last += more * (at_last - at_before);
  };
  std::vector<sim::ClassMemory> memory(n_classes);
  for (std::size_t c = 0; c < n_classes; ++c) {
    std::array<Pieces, 3> pieces;
    for (int r = 0; r < 3; ++r)
      pieces[static_cast<std::size_t>(r)] =
          in_full_model(e[static_cast<std::size_t>(r)].result.classes[c].memory.by_layer, run, k + r);
    const sim::ClassMemory& m = last.result.classes[c].memory;
    const double scale = std::max(m.peak_hbm_bytes, m.peak_host_bytes);
    LayerPeak top;
    double host = 0;
    for (auto [at, p] : pieces[2]) {
      const auto before = pieces[1].find(at);
      if (before == pieces[1].end())
        continue; // a piece of the run's middle, no higher than those at its ends
      const auto first = pieces[0].find(at);
      if (first != pieces[0].end() &&
          (!settled(first->second.hbm_bytes, before->second.hbm_bytes, p.hbm_bytes, scale) ||
           !settled(first->second.host_bytes, before->second.host_bytes, p.host_bytes, scale)))
        return Unfolded::not_linear;
      extend(p.hbm_bytes, before->second.hbm_bytes);
      extend(p.host_bytes, before->second.host_bytes);
      for (int kind = 0; kind < 6; ++kind)
        extend(p.at_peak[kind], before->second.at_peak[kind]);
      if (p.hbm_bytes > top.hbm_bytes)
        top = p;
      host = std::max(host, p.host_bytes);
    }
    memory[c].peak_hbm_bytes = top.hbm_bytes;
    std::copy(std::begin(top.at_peak), std::end(top.at_peak), std::begin(memory[c].at_peak));
    memory[c].peak_host_bytes = host; // peak_time_s: not known for the full model
  }
  for (std::size_t c = 0; c < n_classes; ++c)
    last.result.classes[c].memory = std::move(memory[c]);
  extend(last.step_time_s, e[1].step_time_s);
  last.result.step_time_s = last.step_time_s;
  sim::each_part(last.result.breakdown, e[1].result.breakdown, extend);
  extend(last.model_flops_per_step, e[1].model_flops_per_step);
  last.result.events += e[0].result.events + e[1].result.events;
  last.folded_layers = static_cast<int>(more);
  return std::move(last);
}

} // namespace

std::optional<StepEvaluation> fold_layers(const strategy::Plan& plan,
                                          const strategy::LoweringContext& ctx,
                                          const hw::ClusterSpec& cluster,
                                          const hw::Calibration& calibration, int max_simulated,
                                          Unfolded* why) {
  auto refuse = [why](Unfolded reason) -> std::optional<StepEvaluation> {
    if (why != nullptr)
      *why = reason;
    return std::nullopt;
  };
  const std::optional<LayerRun> run = foldable_layers(plan, ctx);
  if (!run)
    return refuse(Unfolded::no_run);
  workload::ModelSpec cut = *ctx.model;
  strategy::LoweringContext lc = ctx;
  lc.model = &cut;
  auto play = [&](int k) {
    cut.layers = ctx.model->layers;
    cut.layers.erase(cut.layers.begin() + run->begin + k,
                     cut.layers.begin() + run->begin + run->length);
    return evaluate_step(plan, lc, cluster, calibration, max_simulated, Lowering::cost_only,
                         Check::skip, true);
  };
  // Runs of 2, 3 and 4 layers; where they are not yet on a line (the 2-layer model's
  // micro-batches settle otherwise, or its first layer still fills a prefetch), 3, 4 and 5.
  std::array<StepEvaluation, 4> e{play(kFirst), play(kFirst + 1), play(kFirst + 2), {}};
  std::variant<StepEvaluation, Unfolded> folded =
      fold_from(std::span<StepEvaluation, 3>(e.data(), 3), *run, kFirst);
  if (std::holds_alternative<Unfolded>(folded) &&
      std::get<Unfolded>(folded) == Unfolded::not_linear) {
    e[3] = play(kFirst + 3);
    folded = fold_from(std::span<StepEvaluation, 3>(e.data() + 1, 3), *run, kFirst + 1);
  }
  if (const Unfolded* reason = std::get_if<Unfolded>(&folded))
    return refuse(*reason);
  return std::move(std::get<StepEvaluation>(folded));
}

} // namespace mop::planner
