#include "planner/search.hpp"

#include "common/units.hpp"
#include "planner/bound.hpp"
#include "planner/replay.hpp"

#include <algorithm>
#include <fmt/format.h>
#include <mutex>
#include <numeric>
#include <system_error>
#include <thread>
#include <unordered_set>

namespace mop::planner {

using strategy::analyze_memory;
using strategy::enumerate_family;
using strategy::family_names;
using strategy::LoweringContext;
using strategy::MemoryReport;
using strategy::Plan;
using strategy::PlanContext;

namespace {

struct Candidate {
  Plan plan;
  MemoryReport memory;
  double bound = 0;
  std::size_t order = 0;
};

// `fold`: the plan's repeated layers may be folded (planner/fold.hpp).
RankedPlan rank(const Candidate& c, const PlanContext& ctx, const hw::ClusterSpec& cluster,
                const hw::Calibration& cal, int max_micro, bool fold) {
  RankedPlan r;
  r.plan = c.plan;
  r.memory = c.memory;
  r.lower_bound_s = c.bound;
  // Only the plan's numbers are kept: no op names, no structural check (tests hold both).
  LoweringContext lc = strategy::lowering_context(ctx);
  lc.names = false;
  // An interleaved pipeline is played on its chunks (planner/replay.hpp), its memory the
  // analytic model's; every other plan on the event engine (its repeated layers folded,
  // planner/fold.hpp), its memory the engine's.
  bool replayed = false;
  r.eval = evaluate_for_search(c.plan, lc, cluster, cal, max_micro, &replayed, fold);
  const double gpus = static_cast<double>(c.plan.world);
  r.tokens_per_s_per_gpu = r.eval.tokens_per_step / r.eval.step_time_s / gpus;
  r.tflops_per_gpu = r.eval.model_flops_per_step / r.eval.step_time_s / gpus / 1e12;
  r.mfu = r.tflops_per_gpu * 1e12 / cluster.gpu.peak_flops_bf16;
  if (replayed) {
    r.peak_hbm_bytes = c.memory.peak_hbm_bytes;
    r.peak_host_bytes = c.memory.peak_host_bytes;
  } else {
    for (const sim::ClassResult& cr : r.eval.result.classes) {
      const double dynamic = cr.memory.at_peak[static_cast<int>(sim::MemoryKind::activations)] +
                             cr.memory.at_peak[static_cast<int>(sim::MemoryKind::comm_buffers)];
      r.peak_hbm_bytes =
          std::max(r.peak_hbm_bytes, cr.memory.peak_hbm_bytes + ctx.hw.fragmentation * dynamic);
      r.peak_host_bytes = std::max(r.peak_host_bytes, cr.memory.peak_host_bytes);
    }
    r.peak_host_bytes = r.peak_host_bytes * ctx.hw.gpus_per_node + ctx.hw.host_reserved_bytes;
  }
  r.fits = ctx.hw.fits_hbm(r.peak_hbm_bytes) && r.peak_host_bytes <= ctx.hw.host_bytes;
  // A result keeps its numbers, not the Schedule and its timings (hundreds of megabytes for a
  // deep pipeline): `mop simulate` rebuilds them for the plan it is asked about.
  r.eval.schedule = sim::Schedule{};
  r.eval.result.classes = {};
  r.eval.result.critical_path = {};
  return r;
}

bool better(const RankedPlan& a, std::size_t ia, const RankedPlan& b, std::size_t ib) {
  if (a.eval.step_time_s / a.eval.tokens_per_step != b.eval.step_time_s / b.eval.tokens_per_step)
    return a.eval.step_time_s / a.eval.tokens_per_step <
           b.eval.step_time_s / b.eval.tokens_per_step;
  return ia < ib;
}

// Runs f(i) for i in [0, n) on `threads` threads; each writes only its own slot.
template <class F> void parallel_for(std::size_t n, int threads, F f) {
  if (threads <= 1 || n <= 1) {
    for (std::size_t i = 0; i < n; ++i)
      f(i);
    return;
  }
  std::atomic<std::size_t> next{0};
  std::vector<std::thread> pool;
  std::exception_ptr error;
  std::mutex error_mutex;
  auto work = [&] {
    for (std::size_t i = next++; i < n; i = next++) {
      try {
        f(i);
      } catch (...) {
        std::lock_guard lock(error_mutex);
        if (!error)
          error = std::current_exception();
      }
    }
  };
  for (int t = 1; t < threads; ++t) {
    try {
      pool.emplace_back(work);
    } catch (const std::system_error&) {
      break; // the system has no more threads for us: the ones started (or this one) suffice
    }
  }
  work(); // the calling thread works too, so that no thread at all still finishes the loop
  for (std::thread& t : pool)
    t.join();
  if (error)
    std::rethrow_exception(error);
}

} // namespace

RankedPlan rank_plan(const Plan& plan, const PlanContext& ctx, const hw::ClusterSpec& cluster,
                     const hw::Calibration& calibration, int max_simulated_micro_batches) {
  const Candidate c{plan,
                    strategy::analyze_memory(*ctx.model, plan, ctx.seq, ctx.hw,
                                             strategy::activation_options(ctx)),
                    0, 0};
  return rank(c, ctx, cluster, calibration, max_simulated_micro_batches, false);
}

SearchResult search_plans(const PlanContext& ctx, const hw::ClusterSpec& cluster,
                          const hw::Calibration& cal, const SearchOptions& o) {
  SearchResult out;
  const std::vector<std::string>& families = o.families.empty() ? family_names() : o.families;
  std::vector<Plan> plans;
  for (const std::string& f : families) {
    std::string rejection;
    std::vector<Plan> fp = enumerate_family(f, ctx, &rejection);
    if (fp.empty() && out.no_plan_reason.empty())
      out.no_plan_reason = rejection;
    if (o.filter)
      std::erase_if(fp, [&](const Plan& p) { return !o.filter(p); });
    plans.insert(plans.end(), std::make_move_iterator(fp.begin()),
                 std::make_move_iterator(fp.end()));
  }
  // The same plan can come from two families (e.g. pure FSDP): keep its first appearance.
  {
    struct Hash {
      std::size_t operator()(const Plan* p) const { return strategy::plan_hash(*p); }
    };
    struct Same {
      bool operator()(const Plan* a, const Plan* b) const { return strategy::same_plan(*a, *b); }
    };
    std::unordered_set<const Plan*, Hash, Same> seen;
    seen.reserve(plans.size());
    std::vector<bool> keep(plans.size());
    for (std::size_t i = 0; i < plans.size(); ++i)
      keep[i] = seen.insert(&plans[i]).second;
    std::vector<Plan> unique;
    unique.reserve(seen.size());
    for (std::size_t i = 0; i < plans.size(); ++i)
      if (keep[i])
        unique.push_back(std::move(plans[i]));
    plans = std::move(unique);
  }
  out.candidates_evaluated = static_cast<std::int64_t>(plans.size());
  // Memory first: microseconds a plan.
  std::vector<MemoryReport> memory(plans.size());
  parallel_for(plans.size(), o.threads, [&](std::size_t i) {
    memory[i] =
        analyze_memory(*ctx.model, plans[i], ctx.seq, ctx.hw, strategy::activation_options(ctx));
  });
  std::vector<Candidate> fit;
  double closest_ratio = 0;
  for (std::size_t i = 0; i < plans.size(); ++i) {
    if (memory[i].fits()) {
      fit.push_back(Candidate{plans[i], memory[i], 0, i});
    } else {
      const double ratio = std::max(memory[i].peak_hbm_bytes / ctx.hw.hbm_bytes,
                                    memory[i].peak_host_bytes / ctx.hw.host_bytes);
      if (!out.closest || ratio < closest_ratio) {
        closest_ratio = ratio;
        out.closest = plans[i];
        out.closest_memory = memory[i];
      }
    }
  }
  out.fit_memory = static_cast<std::int64_t>(fit.size());
  // The lower bound of each survivor, then best-first by bound.
  LoweringContext lc = strategy::lowering_context(ctx);
  lc.names = false;
  PassTimesCache pass_times;
  parallel_for(fit.size(), o.threads, [&](std::size_t i) {
    // The bound holds for the engine's step; a replayed or folded step may lie below it by the
    // tolerance of either, and the bound with it.
    const double margin = approximated_for_search(fit[i].plan, lc) ? 1 - kReplayTolerance : 1;
    fit[i].bound = margin * step_lower_bound_s(fit[i].plan, lc, cluster, cal, &pass_times) /
                   (static_cast<double>(fit[i].plan.global_batch) * static_cast<double>(ctx.seq));
  });
  std::stable_sort(fit.begin(), fit.end(), [](const Candidate& a, const Candidate& b) {
    return a.bound != b.bound ? a.bound < b.bound : a.order < b.order;
  });
  // Simulate in fixed batches (the same batches whatever the thread count), keep the best
  // `top` that fit, stop when the next bound (seconds per token) exceeds the top-th best.
  constexpr std::size_t kBatch = 8;
  std::vector<std::pair<RankedPlan, std::size_t>> best;
  std::size_t next = 0;
  while (next < fit.size()) {
    if (o.stop && o.stop->load()) {
      out.stopped = true;
      out.exhaustive = false;
      break;
    }
    if (static_cast<int>(best.size()) >= o.top) {
      const RankedPlan& kth = best[static_cast<std::size_t>(o.top) - 1].first;
      if (fit[next].bound >= kth.eval.step_time_s / kth.eval.tokens_per_step)
        break; // every remaining candidate is provably no faster
    }
    if (out.simulated >= o.max_simulations) {
      out.exhaustive = false;
      break;
    }
    const std::size_t n = std::min(kBatch, fit.size() - next);
    std::vector<RankedPlan> batch(n);
    parallel_for(n, o.threads, [&](std::size_t i) {
      batch[i] = rank(fit[next + i], ctx, cluster, cal, o.max_simulated_micro_batches, true);
    });
    for (std::size_t i = 0; i < n; ++i)
      if (batch[i].fits)
        best.emplace_back(std::move(batch[i]), fit[next + i].order);
    std::sort(best.begin(), best.end(), [](const auto& a, const auto& b) {
      return better(a.first, a.second, b.first, b.second);
    });
    if (static_cast<int>(best.size()) > o.top)
      best.resize(static_cast<std::size_t>(o.top));
    out.simulated += static_cast<std::int64_t>(n);
    next += n;
    if (o.progress)
      o.progress(static_cast<std::int64_t>(next), static_cast<std::int64_t>(fit.size()));
  }
  // The plans kept are reported as the engine plays every layer: a folded step lies within
  // 1e-4 of it, a part of its breakdown within 2 % (tests/planner/fold_test.cpp).
  parallel_for(best.size(), o.threads, [&](std::size_t i) {
    RankedPlan& r = best[i].first;
    if (r.eval.folded_layers > 0)
      r = rank(Candidate{r.plan, r.memory, r.lower_bound_s, best[i].second}, ctx, cluster, cal,
               o.max_simulated_micro_batches, false);
  });
  std::sort(best.begin(), best.end(), [](const auto& a, const auto& b) {
    return better(a.first, a.second, b.first, b.second);
  });
  for (auto& [r, order] : best)
    out.results.push_back(std::move(r));
  return out;
}

std::string why_best(const RankedPlan& a, const RankedPlan& b) {
  const sim::Breakdown& x = a.eval.result.breakdown;
  const sim::Breakdown& y = b.eval.result.breakdown;
  // Per token, so plans at slightly different batches compare fairly.
  const double ta = a.eval.tokens_per_step, tb = b.eval.tokens_per_step;
  struct Part {
    const char* what;
    double diff;
  };
  const Part parts[] = {{"compute", y.compute / tb - x.compute / ta},
                        {"exposed communication", y.exposed_comm / tb - x.exposed_comm / ta},
                        {"pipeline bubble", y.bubble / tb - x.bubble / ta},
                        {"offload stalls", y.offload_stall / tb - x.offload_stall / ta},
                        {"optimizer time", y.optimizer / tb - x.optimizer / ta}};
  const Part* top = std::max_element(std::begin(parts), std::end(parts),
                                     [](const Part& p, const Part& q) { return p.diff < q.diff; });
  const double gain = b.eval.step_time_s / tb / (a.eval.step_time_s / ta) - 1;
  return fmt::format("The best plan is {:.1f} % faster per token than the runner-up, mostly by "
                     "spending less on {} ({} less per step).",
                     100 * gain, top->what, format_seconds(top->diff * ta));
}

} // namespace mop::planner
