#include "planner/fold.hpp"

#include "sim/engine.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <map>
#include <utility>
#include <vector>

namespace mop::planner {

namespace {

constexpr int kMinRun = 12;
constexpr std::array<int, 3> kShort = {2, 3, 4}; // the run's length in the three short models
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

// Whether the run's layers repeat alike in the short model `e` (its run of k layers from
// run.begin): on every stream of every class, each pass of a layer in the run's middle (its
// forward, its backward) ends the same time after the same pass of the layer before it, the same
// time on every stream. A stream that drifts against the others (offload copies falling behind
// the compute they follow) builds a queue that grows with depth. The run's first and last
// layers border other pieces (the last one's forward runs on into its backward) and are left
// out. Nor may the host fall behind: where issuing a pass's kernels takes it longer than the
// period, the lead it gained elsewhere (over the embedding, the loss) runs out a few layers on,
// and from then on each layer waits for it.
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
    for (std::size_t i = 0; i < rc.ops.size(); ++i) {
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
      std::optional<double> period;
      for (std::size_t st = 0; st < rc.streams.size(); ++st) {
        const double* end = &ends[st * n_pieces];
        auto at = [&](int j) { return end[piece[static_cast<std::size_t>(pass * middle + j)]]; };
        int used = 0;
        for (int j = 0; j < middle; ++j)
          used += at(j) >= 0;
        if (used == 0)
          continue;
        if (used != middle)
          return Unfolded::drifts; // some layers use this stream in this pass, others not
        for (int j = 0; j + 1 < middle; ++j) {
          const double d = at(j + 1) - at(j);
          if (!period)
            period = d;
          else if (std::fabs(d - *period) > tolerance)
            return Unfolded::drifts;
        }
      }
      for (int j = 0; period && j < middle; ++j)
        if (issue[static_cast<std::size_t>(piece[static_cast<std::size_t>(pass * middle + j)])] >
            std::fabs(*period) + tolerance)
          return Unfolded::host_behind;
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
  std::array<StepEvaluation, kShort.size()> e;
  workload::ModelSpec cut = *ctx.model;
  strategy::LoweringContext lc = ctx;
  lc.model = &cut;
  for (std::size_t r = 0; r < kShort.size(); ++r) {
    cut.layers = ctx.model->layers;
    cut.layers.erase(cut.layers.begin() + run->begin + kShort[r],
                     cut.layers.begin() + run->begin + run->length);
    e[r] = evaluate_step(plan, lc, cluster, calibration, max_simulated, Lowering::cost_only,
                         Check::skip, true);
  }
  StepEvaluation& last = e.back();
  const std::size_t n_classes = last.result.classes.size();
  for (const StepEvaluation& x : e)
    if (x.result.classes.size() != n_classes)
      return refuse(Unfolded::not_linear);
  if (!settled(e[0].step_time_s, e[1].step_time_s, last.step_time_s, last.step_time_s))
    return refuse(Unfolded::not_linear);
  if (const std::optional<Unfolded> reason = unsettled(last, *run, kShort.back()))
    return refuse(*reason);
  // Each further layer of the run adds what the fourth added to the third.
  const double more = run->length - kShort.back();
  auto extend = [more](double& at_last, double at_before) {
    at_last += more * (at_last - at_before);
  };
  for (std::size_t c = 0; c < n_classes; ++c) {
    std::array<Pieces, kShort.size()> pieces;
    for (std::size_t r = 0; r < kShort.size(); ++r)
      pieces[r] = in_full_model(e[r].result.classes[c].memory.by_layer, *run, kShort[r]);
    sim::ClassMemory& m = last.result.classes[c].memory;
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
        return refuse(Unfolded::not_linear);
      extend(p.hbm_bytes, before->second.hbm_bytes);
      extend(p.host_bytes, before->second.host_bytes);
      for (int k = 0; k < 6; ++k)
        extend(p.at_peak[k], before->second.at_peak[k]);
      if (p.hbm_bytes > top.hbm_bytes)
        top = p;
      host = std::max(host, p.host_bytes);
    }
    m.peak_hbm_bytes = top.hbm_bytes;
    std::copy(std::begin(top.at_peak), std::end(top.at_peak), std::begin(m.at_peak));
    m.peak_host_bytes = host;
    m.peak_time_s = 0; // not known for the full model
    m.largest_at_peak.clear();
    m.timeline.clear();
    m.by_layer.clear();
  }
  extend(last.step_time_s, e[1].step_time_s);
  last.result.step_time_s = last.step_time_s;
  sim::each_part(last.result.breakdown, e[1].result.breakdown, extend);
  extend(last.model_flops_per_step, e[1].model_flops_per_step);
  last.result.events += e[0].result.events + e[1].result.events;
  last.folded_layers = static_cast<int>(more);
  return std::move(last);
}

} // namespace mop::planner
