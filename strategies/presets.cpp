#include "strategies/presets.hpp"
#include "strategies/mesh.hpp"
#include "strategies/routing.hpp"

#include "common/error.hpp"
#include "common/json_io.hpp"
#include "common/limits.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <filesystem>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <mutex>
#include <numeric>
#include <unordered_map>

namespace mop::strategy {

const std::vector<std::string>& family_names() {
  static const std::vector<std::string> names = {"fsdp2", "megatron", "ulysses-zero3", "mop"};
  return names;
}

int default_global_batch(std::int64_t seq, std::int64_t unit) {
  const std::int64_t target = std::max<std::int64_t>(1, ((std::int64_t{1} << 22) + seq - 1) / seq);
  // target <= 2^22 and unit <= replicas x micro-batch <= 2^44: no int64 overflow.
  const std::int64_t rounded = (target + unit - 1) / unit * unit;
  if (rounded > limits::max_batch_sequences)
    throw InputError(fmt::format("the default global batch, {} sequences (a multiple of "
                                 "data-parallel replicas x micro-batch, {}), is above mop's "
                                 "ceiling of {}.",
                                 rounded, unit, limits::max_batch_sequences));
  return static_cast<int>(rounded);
}

ModelShape model_shape(const workload::ModelSpec& m) {
  return ModelShape{m.num_layers(), m.attention.num_heads,
                    m.attention.kind == workload::AttentionKind::mla ? m.attention.num_heads
                                                                     : m.attention.num_kv_heads,
                    m.is_moe() ? m.moe.num_routed_experts : 0, m.vocab_size};
}

namespace {

// Ascending; up to sqrt(n) steps, so a world of 2^20 ranks costs a thousand.
std::vector<int> divisors(int n) {
  std::vector<int> low, high;
  for (int i = 1; i <= n / i; ++i)
    if (n % i == 0) {
      low.push_back(i);
      if (i != n / i)
        high.push_back(n / i);
    }
  low.insert(low.end(), high.rbegin(), high.rend());
  return low;
}

// 1, 2, 4, ... <= n, for any int n: doubling stops before it could pass INT_MAX.
std::vector<int> powers_of_two_up_to(int n) {
  std::vector<int> v;
  for (int i = 1; i <= n; i *= 2) {
    v.push_back(i);
    if (i > n / 2)
      break;
  }
  return v;
}

// Where a family's generator puts its plans, and the first rule a candidate broke.
struct Sink {
  std::vector<Plan> plans;
  std::string first_rejection;
};

// Applies the context's overrides, completes and validates; keeps the plan when every rule
// holds.
void keep_if_valid(Plan p, const PlanContext& ctx, Sink& out) {
  try {
    apply_overrides(ctx.overrides, p);
    // The batch is the user's, or the default for this plan's replicas.
    // (complete_plan names the rule a plan whose degrees do not divide its ranks breaks.)
    const std::int64_t per_stage = p.pp > 0 && p.world % p.pp == 0 ? p.world / p.pp : 0;
    const std::int64_t tp_cp = std::int64_t{p.attention.tp} * p.attention.cp;
    if (per_stage > 0 && tp_cp > 0 && per_stage % tp_cp == 0)
      p.global_batch =
          ctx.global_batch > 0
              ? ctx.global_batch
              : default_global_batch(ctx.seq, per_stage / tp_cp * std::int64_t{p.micro_batch});
    // No extra micro-batches for pipelines: plans are compared at (nearly) the same batch, and
    // a pipeline with few micro-batches pays its bubble.
    complete_plan(p);
    validate_plan(p, model_shape(*ctx.model), ctx.seq, ctx.cluster);
    reserve_for_routing(p, ctx);
    out.plans.push_back(std::move(p));
  } catch (const InputError& e) {
    if (out.first_rejection.empty())
      out.first_rejection = e.what();
  }
}

void set_recompute(Plan& p, Recompute r) {
  for (Recompute& x : p.recompute)
    x = r;
}

void set_zero(Plan& p, int zero, int shard_group = 0) {
  for (StatePolicy& s : p.state)
    s = StatePolicy{zero, shard_group};
}

std::vector<int> expert_degrees(const PlanContext& ctx, int ranks) {
  if (!ctx.model->is_moe())
    return {1};
  std::vector<int> v;
  for (int ep : divisors(ranks))
    if (ctx.model->moe.num_routed_experts % ep == 0)
      v.push_back(ep);
  return v;
}

// Megatron's expert tensor parallelism: none, or the attention's TP degree. A dense model has
// no experts, so the choice would only repeat the same plan.
std::vector<int> expert_tp_degrees(const PlanContext& ctx, int tp) {
  if (!ctx.model->is_moe() || tp == 1)
    return {1};
  return {1, tp};
}

// ZeRO-3 shard groups: every data-parallel rank (0), or HSDP shards of one or two nodes'
// ranks (torchtitan's dp_shard), replicated across the others, where that is fewer than all.
std::vector<int> hsdp_groups(const PlanContext& ctx) {
  const int world = ctx.cluster.nodes * ctx.cluster.gpus_per_node;
  std::vector<int> v{0};
  for (int nodes : {1, 2})
    if (nodes * ctx.cluster.gpus_per_node < world)
      v.push_back(nodes * ctx.cluster.gpus_per_node);
  return v;
}

// Hybrid CP whose Ulysses part (inside a node) or ring part (across) is a single rank is plain
// ring or Ulysses CP: cp_split() splits it that way.
bool genuine_hybrid(int cp, const PlanContext& ctx) {
  Plan p;
  p.attention.cp = cp;
  p.attention.cp_kind = CpKind::hybrid;
  const CpSplit split = cp_split(p, ctx.cluster.gpus_per_node);
  return split.ulysses > 1 && split.ring > 1;
}

std::vector<int> micro_batches(const PlanContext& ctx) {
  if (ctx.seq >= 32768)
    return {1};
  return {1, 2, 4};
}

constexpr Recompute kRecomputes[] = {Recompute::none, Recompute::selective, Recompute::full};

void fsdp2(const PlanContext& ctx, Sink& out) {
  const int world = ctx.cluster.nodes * ctx.cluster.gpus_per_node;
  for (int tp : powers_of_two_up_to(ctx.cluster.gpus_per_node))
    for (int cp : powers_of_two_up_to(world / tp))
      for (int ep : expert_degrees(ctx, world / tp))
        for (int shard : {0, ctx.cluster.gpus_per_node})
          for (Recompute rc : kRecomputes)
            for (bool offload : {false, true})
              for (int mb : micro_batches(ctx)) {
                Plan p;
                p.family = "fsdp2";
                p.world = world;
                p.attention = AttentionMapping{tp, true, cp, CpKind::ring, 1};
                p.moe.ep = ep;
                p.dense.tp = tp;
                p.embed.tp = tp;
                set_zero(p, 3, shard == world ? 0 : shard);
                set_recompute(p, rc);
                p.micro_batch = mb;
                if (offload) { // FSDP2 CPUOffloadPolicy: params, grads and optimizer on host,
                  // stepped by torch's AdamW on the CPU
                  p.params = p.grads = p.optimizer = Placement::host;
                  p.optimizer_on_host = true;
                  p.torch_host_optimizer = true;
                }
                keep_if_valid(p, ctx, out);
              }
}

// How a pipeline without virtual stages splits the layers: evenly (the first stages take the
// remainder), or with the first, the last or both stages a layer lighter than an even share,
// the rest spread evenly over the others: the stages that also hold the embedding and the LM
// head and loss (Megatron-LM's --decoder-first-pipeline-num-layers and
// --decoder-last-pipeline-num-layers).
std::vector<std::vector<int>> stage_splits(int layers, int pp) {
  std::vector<std::vector<int>> out{{}};
  if (pp < 2)
    return out;
  const int lighter = layers / pp - 1;
  for (const auto& [first, last] : {std::pair{true, false}, {false, true}, {true, true}}) {
    const int cut = (first ? 1 : 0) + (last ? 1 : 0), rest = pp - cut;
    if (lighter < 1 || rest < 1)
      continue;
    const int others = layers - cut * lighter;
    std::vector<int> split;
    for (int s = 0, i = 0; s < pp; ++s) {
      const bool cut_here = (s == 0 && first) || (s == pp - 1 && last);
      split.push_back(cut_here ? lighter : others / rest + (i++ < others % rest ? 1 : 0));
    }
    out.push_back(std::move(split));
  }
  return out;
}

void megatron(const PlanContext& ctx, Sink& out) {
  const int world = ctx.cluster.nodes * ctx.cluster.gpus_per_node;
  const int layers = static_cast<int>(ctx.model->num_layers());
  for (int tp : powers_of_two_up_to(ctx.cluster.gpus_per_node))
    for (int cp : powers_of_two_up_to(world / tp))
      for (int pp : divisors(world / (tp * cp)))
        for (int vp : {1, 2, 4})
          for (const std::vector<int>& split :
               vp == 1 ? stage_splits(layers, pp) : std::vector<std::vector<int>>{{}})
            for (int etp : expert_tp_degrees(ctx, tp))
              for (int ep : expert_degrees(ctx, world / pp / etp))
                for (Recompute rc : kRecomputes)
                  for (bool offload : {false, true})
                    for (int mb : micro_batches(ctx)) {
                      if (vp > 1 && pp == 1)
                        continue;
                      Plan p;
                      p.family = "megatron";
                      p.world = world;
                      p.pp = pp;
                      p.vp = vp;
                      p.stage_layers = split;
                      p.schedule = vp > 1 ? PipelineSchedule::interleaved_1f1b
                                          : PipelineSchedule::one_f_one_b;
                      p.attention = AttentionMapping{tp, true, cp, CpKind::ring, 1};
                      p.moe.ep = ep;
                      p.moe.etp = etp;
                      p.dense.tp = tp;
                      p.embed.tp = tp;
                      set_zero(p, 1); // distributed optimizer
                      set_recompute(p, rc);
                      p.micro_batch = mb;
                      if (offload) { // --optimizer-cpu-offload (HybridDeviceOptimizer: torch
                        // optimizers on the CPU)
                        p.optimizer = Placement::host;
                        p.optimizer_on_host = true;
                        p.torch_host_optimizer = true;
                      }
                      keep_if_valid(p, ctx, out);
                    }
}

void ulysses_zero3(const PlanContext& ctx, Sink& out) {
  const int world = ctx.cluster.nodes * ctx.cluster.gpus_per_node;
  for (int cp : divisors(world))
    for (int ep : expert_degrees(ctx, world))
      for (Recompute rc : kRecomputes)
        for (bool offload : {false, true})
          for (int mb : micro_batches(ctx)) {
            Plan p;
            p.family = "ulysses-zero3";
            p.world = world;
            p.attention = AttentionMapping{1, false, cp, CpKind::ulysses, 1};
            p.moe.ep = ep;
            set_zero(p, 3);
            set_recompute(p, rc);
            p.micro_batch = mb;
            if (offload) { // ZeRO-Offload: optimizer state and step on the host
              p.optimizer = Placement::host;
              p.optimizer_on_host = true;
            }
            keep_if_valid(p, ctx, out);
          }
}

void mop_family(const PlanContext& ctx, Sink& out) {
  const int world = ctx.cluster.nodes * ctx.cluster.gpus_per_node;
  // Recompute per block (attention; the MLP or MoE block), the shard group (all data-parallel
  // ranks, or HSDP over one or two nodes) and the micro-batch are chosen per plan.
  for (int cp : divisors(world))
    for (CpKind kind : {CpKind::ulysses, CpKind::hybrid, CpKind::ring})
      for (int ep : expert_degrees(ctx, world))
        for (Recompute rc_attention : kRecomputes)
          for (Recompute rc_mlp : kRecomputes)
            for (int shard : hsdp_groups(ctx))
              for (int mb : micro_batches(ctx))
                for (double offload : {0.0, 0.5, 1.0})
                  for (bool host_optimizer : {false, true}) {
                    if (cp == 1 && kind != CpKind::ring)
                      continue;
                    if (kind == CpKind::ulysses && cp > ctx.cluster.gpus_per_node)
                      continue; // across nodes mop uses hybrid or ring
                    if (kind == CpKind::hybrid && !genuine_hybrid(cp, ctx))
                      continue; // the same plan as Ulysses or ring CP
                    Plan p;
                    p.family = "mop";
                    p.world = world;
                    p.attention = AttentionMapping{1, false, cp, kind, 1};
                    p.moe.ep = ep;
                    set_zero(p, 3, shard);
                    p.state[static_cast<int>(LayerKind::moe)] = StatePolicy{1, 0}; // experts stay
                    set_recompute(p, rc_mlp);
                    p.recompute[static_cast<int>(LayerKind::attention)] = rc_attention;
                    p.micro_batch = mb;
                    p.activation_offload = offload;
                    p.chunked_loss = true;
                    if (host_optimizer) {
                      // Gradients stream to the host as backward produces them; the host holds
                      // them until each layer's step runs before its next forward use.
                      p.grads = Placement::host;
                      p.optimizer = Placement::host;
                      p.optimizer_on_host = true;
                      p.overlap = OptimizerOverlap::stream_forward;
                    }
                    keep_if_valid(p, ctx, out);
                  }
}

} // namespace

LoweringContext lowering_context(const PlanContext& ctx) {
  LoweringContext lc{ctx.model, ctx.seq, ctx.cluster.gpus_per_node, ctx.hw, {}};
  lc.gemm_dtype = ctx.gemm_dtype;
  lc.attention_kernel = ctx.attention_kernel;
  lc.compiled = ctx.compiled;
  lc.fp8_recipe = ctx.fp8_recipe;
  lc.ep_dispatcher = ctx.ep_dispatcher;
  lc.expert_loads = ctx.expert_loads;
  return lc;
}

std::uint64_t next_routing_id() {
  static std::atomic<std::uint64_t> next{1};
  return next++;
}

void reserve_for_routing(Plan& p, const PlanContext& ctx) {
  if (ctx.expert_loads == nullptr || !ctx.model->is_moe())
    return;
  // The worst load depends on the loads, the EP degree and the capacity factor, and under
  // rebalancing on its settings and the tokens per expert: computed once for each (tens of
  // thousands of plans share a handful).
  const bool rebalancing = p.moe.rebalance == Rebalance::least_loaded && p.moe.ep > 1;
  const RoutingScale scale = rebalancing
                                 ? routing_scale(p, *ctx.model, ctx.seq, ctx.cluster.gpus_per_node)
                                 : RoutingScale{};
  struct Key {
    std::uint64_t loads;
    int ep;
    double capacity;
    bool rebalancing;
    double threshold, alpha, min_tokens, expert_tokens;
    int ep_per_node;
    bool operator==(const Key&) const = default;
  };
  struct Reserve {
    double worst = 0;
    int copies = 0;
  };
  static std::mutex mutex;
  static std::vector<std::pair<Key, Reserve>> cache;
  const Key key{ctx.routing_id,
                p.moe.ep,
                p.moe.capacity_factor,
                rebalancing,
                rebalancing ? p.moe.rebalance_threshold : 0,
                rebalancing ? p.moe.rebalance_capacity : 0,
                rebalancing ? p.moe.rebalance_min_tokens : 0,
                scale.expert_tokens,
                scale.ep_per_node};
  Reserve reserve;
  if (ctx.routing_id != 0) {
    const std::lock_guard<std::mutex> lock(mutex);
    for (const auto& [k, v] : cache)
      if (k == key)
        reserve = v;
  }
  if (reserve.worst == 0) {
    const RankLoads loads = rank_loads(p, *ctx.model, *ctx.expert_loads, scale);
    reserve.worst = worst_rank_load(loads);
    reserve.copies = loads.most_copies_in;
    if (ctx.routing_id != 0) {
      const std::lock_guard<std::mutex> lock(mutex);
      if (cache.size() > 256)
        cache.clear();
      cache.emplace_back(key, reserve);
    }
  }
  p.moe.imbalance = std::max(p.moe.imbalance, reserve.worst);
  if (rebalancing)
    p.moe.spill_copies = std::max(p.moe.spill_copies, static_cast<double>(reserve.copies));
}

std::vector<Plan> enumerate_family(const std::string& family, const PlanContext& ctx,
                                   std::string* rejection) {
  Sink out;
  if (family == "fsdp2")
    fsdp2(ctx, out);
  else if (family == "megatron")
    megatron(ctx, out);
  else if (family == "ulysses-zero3")
    ulysses_zero3(ctx, out);
  else if (family == "mop")
    mop_family(ctx, out);
  else
    throw InputError(fmt::format("unknown plan family '{}'; families are {}.", family,
                                 fmt::join(family_names(), ", ")));
  if (!ctx.overrides.empty()) {
    // Overrides map different candidates onto one plan: keep the first of each.
    std::unordered_multimap<std::size_t, std::size_t> by_hash; // hash -> index in `unique`
    std::vector<Plan> unique;
    for (Plan& p : out.plans) {
      const std::size_t h = plan_hash(p);
      const auto [first, last] = by_hash.equal_range(h);
      if (std::any_of(first, last, [&](const auto& e) { return same_plan(p, unique[e.second]); }))
        continue;
      by_hash.emplace(h, unique.size());
      unique.push_back(std::move(p));
    }
    out.plans = std::move(unique);
  }
  if (out.plans.empty() && rejection != nullptr)
    *rejection = out.first_rejection;
  return std::move(out.plans);
}

double preference_cost(const Plan& p) {
  // Relative overheads, each a rough fraction of step time (docs/PLANS.md gives the reasons):
  auto rc_cost = [](Recompute r) {
    return r == Recompute::full ? 0.33 : r == Recompute::selective ? 0.05 : 0.0;
  };
  double cost = 0;
  for (int k = 0; k < kNumLayerKinds; ++k)
    cost += rc_cost(p.recompute[k]) / kNumLayerKinds;
  const int m = p.micro_batches();
  if (p.pp > 1)
    cost += (p.pp - 1.0) / (p.vp * (m + p.pp - 1.0)); // 1F1B bubble fraction
  cost += 0.03 * std::log2(p.attention.tp) + 0.02 * std::log2(p.attention.cp);
  cost += 0.1 * p.activation_offload;
  if (p.params == Placement::host)
    cost += 0.3;
  if (p.optimizer_on_host)
    cost += p.overlap == OptimizerOverlap::after_backward ? 0.2 : 0.05;
  cost -= 0.01 * std::log2(p.micro_batch);
  return cost;
}

namespace {

// A plan JSON may state the data-parallel degrees mop derives ("dp", "edp"): every plan mop
// writes does. A stated degree that differs from the derived one is a mistake in the plan,
// not something to recompute silently.
void check_stated_degrees(const Json& stated, const Plan& p, const std::string& origin) {
  struct Degree {
    const char* section;
    const char* key;
    int derived;
  };
  const Degree degrees[] = {{"attention", "dp", p.attention.dp},
                            {"moe", "edp", p.moe.edp},
                            {"dense", "dp", p.dense.dp},
                            {"embedding", "dp", p.embed.dp}};
  for (const Degree& d : degrees) {
    if (!stated.contains(d.section) || !stated[d.section].is_object() ||
        !stated[d.section].contains(d.key))
      continue;
    const Json& v = stated[d.section][d.key];
    if (!v.is_number_integer() || v.get<std::int64_t>() != d.derived)
      throw InputError(fmt::format(
          "{}: {}.{} is {}, but the plan's other degrees make it {} (it is derived: ranks per "
          "stage / the other degrees); leave it out or correct it.",
          origin, d.section, d.key, v.dump(), d.derived));
  }
}

} // namespace

ResolvedPlan resolve_given_plan(Plan p, const PlanContext& ctx, const std::string& origin,
                                const Json* stated,
                                const std::function<void(const Plan&)>& admissible) {
  if (p.world == 0) // a partial plan: validate_plan holds a stated world to the cluster's
    p.world = ctx.cluster.nodes * ctx.cluster.gpus_per_node;
  apply_overrides(ctx.overrides, p);
  if (ctx.global_batch > 0)
    p.global_batch = ctx.global_batch;
  if (p.global_batch == 0 && p.pp > 0 && p.world % p.pp == 0 && p.attention.tp > 0 &&
      p.attention.cp > 0 && p.micro_batch > 0) {
    const std::int64_t replicas =
        std::max<std::int64_t>(1, p.world / p.pp / (std::int64_t{p.attention.tp} * p.attention.cp));
    p.global_batch = default_global_batch(ctx.seq, replicas * p.micro_batch);
  }
  complete_plan(p);
  if (stated != nullptr)
    check_stated_degrees(*stated, p, origin);
  validate_plan(p, model_shape(*ctx.model), ctx.seq, ctx.cluster);
  reserve_for_routing(p, ctx);
  if (admissible)
    admissible(p);
  ResolvedPlan best;
  best.plan = p;
  best.memory = analyze_memory(*ctx.model, p, ctx.seq, ctx.hw, activation_options(ctx));
  best.candidates = 1;
  return best;
}

ActivationOptions activation_options(const PlanContext& ctx) {
  ActivationOptions o;
  o.compiled_loss = ctx.compiled.value_or(false);
  return o;
}

ResolvedPlan resolve_plan(const std::string& name_or_path, const PlanContext& ctx,
                          const std::function<void(const Plan&)>& admissible) {
  const auto& families = family_names();
  ResolvedPlan best;
  if (std::find(families.begin(), families.end(), name_or_path) == families.end()) {
    const bool path = name_or_path.find('/') != std::string::npos ||
                      name_or_path.ends_with(".json") || std::filesystem::exists(name_or_path);
    if (!path)
      throw InputError(fmt::format("'{}' is neither a preset ({}) nor a plan JSON path.",
                                   name_or_path, fmt::join(families, ", ")));
    const Json stated = read_json_file(name_or_path);
    return resolve_given_plan(plan_from_json(stated, name_or_path), ctx, name_or_path, &stated,
                              admissible);
  }
  std::string rejection;
  std::vector<Plan> plans = enumerate_family(name_or_path, ctx, &rejection);
  if (plans.empty() && !ctx.overrides.empty())
    throw InputError(fmt::format("no {} plan for {} at {} tokens on {} GPUs has {}: {}",
                                 name_or_path, ctx.model->name, ctx.seq,
                                 ctx.cluster.nodes * ctx.cluster.gpus_per_node,
                                 describe(ctx.overrides), rejection));
  if (plans.empty())
    throw InputError(fmt::format("no valid {} plan exists for {} at {} tokens on {} GPUs.",
                                 name_or_path, ctx.model->name, ctx.seq,
                                 ctx.cluster.nodes * ctx.cluster.gpus_per_node));
  // The plans in the order of choice: those that fit by preference cost, then the others by how
  // far they are over (the first of equals as enumerated). `admissible` (a lowering and a check,
  // far dearer than the memory model) runs down that order and stops at the first it accepts.
  struct Ranked {
    std::size_t index;
    bool fits;
    double key;
  };
  std::vector<Ranked> order;
  std::vector<MemoryReport> memory(plans.size());
  order.reserve(plans.size());
  for (std::size_t i = 0; i < plans.size(); ++i) {
    memory[i] = analyze_memory(*ctx.model, plans[i], ctx.seq, ctx.hw, activation_options(ctx));
    const bool fits = memory[i].fits();
    const double key = fits ? preference_cost(plans[i])
                            : std::max(memory[i].peak_hbm_bytes / ctx.hw.hbm_bytes,
                                       memory[i].peak_host_bytes / ctx.hw.host_bytes);
    order.push_back({i, fits, key});
  }
  std::stable_sort(order.begin(), order.end(), [](const Ranked& a, const Ranked& b) {
    return a.fits != b.fits ? a.fits : a.key < b.key;
  });
  std::string why;
  for (const Ranked& r : order) {
    if (admissible) {
      try {
        admissible(plans[r.index]);
      } catch (const InputError& e) {
        why = e.what();
        continue;
      }
    }
    best.plan = plans[r.index];
    best.memory = std::move(memory[r.index]);
    best.candidates = static_cast<int>(plans.size());
    return best;
  }
  throw InputError(fmt::format("no {} plan for {} on {} ranks can be used: {}", name_or_path,
                               ctx.model->name, ctx.cluster.nodes * ctx.cluster.gpus_per_node,
                               why));
}

} // namespace mop::strategy
