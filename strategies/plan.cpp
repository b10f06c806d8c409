#include "strategies/plan.hpp"
#include "strategies/mesh.hpp"

#include "common/error.hpp"
#include "common/limits.hpp"

#include <boost/container_hash/hash.hpp>
#include <fmt/format.h>
#include <numeric>
#include <tuple>
#include <type_traits>

namespace mop::strategy {

const char* layer_kind_name(LayerKind k) {
  switch (k) {
  case LayerKind::attention:
    return "attention";
  case LayerKind::moe:
    return "moe";
  case LayerKind::dense:
    return "dense";
  case LayerKind::embedding:
    return "embedding";
  }
  return "?";
}

const char* name(CpKind k) {
  switch (k) {
  case CpKind::ring:
    return "ring";
  case CpKind::ulysses:
    return "ulysses";
  case CpKind::hybrid:
    return "hybrid";
  }
  return "?";
}
const char* name(Rebalance r) {
  switch (r) {
  case Rebalance::none:
    return "none";
  case Rebalance::least_loaded:
    return "least_loaded";
  }
  return "?";
}
const char* name(Recompute r) {
  switch (r) {
  case Recompute::none:
    return "none";
  case Recompute::selective:
    return "selective";
  case Recompute::full:
    return "full";
  }
  return "?";
}
const char* name(PipelineSchedule s) {
  switch (s) {
  case PipelineSchedule::gpipe:
    return "gpipe";
  case PipelineSchedule::one_f_one_b:
    return "1f1b";
  case PipelineSchedule::interleaved_1f1b:
    return "interleaved-1f1b";
  case PipelineSchedule::zero_bubble:
    return "zero-bubble";
  }
  return "?";
}
const char* name(Placement p) {
  return p == Placement::hbm ? "hbm" : "host";
}
const char* name(OptimizerOverlap o) {
  switch (o) {
  case OptimizerOverlap::after_backward:
    return "after-backward";
  case OptimizerOverlap::stream_backward:
    return "stream-bwd";
  case OptimizerOverlap::stream_forward:
    return "stream-fwd";
  }
  return "?";
}

int Plan::data_parallel(LayerKind k) const {
  switch (k) {
  case LayerKind::attention:
    return attention.dp;
  case LayerKind::moe:
    return moe.edp;
  case LayerKind::dense:
    return dense.dp;
  case LayerKind::embedding:
    return embed.dp;
  }
  return 1;
}

int Plan::micro_batches() const {
  // int64: micro_batch and the replicas are each at most an int; complete_plan made both >= 1.
  const std::int64_t per_micro_batch = std::int64_t{micro_batch} * attention.dp;
  return per_micro_batch > 0 ? static_cast<int>(global_batch / per_micro_batch) : 0;
}

int Plan::layers_in_stage(int stage, int num_layers) const {
  if (!stage_layers.empty())
    return stage_layers[static_cast<std::size_t>(stage)];
  // Even split; the first (num_layers % pp) stages take one more.
  return num_layers / pp + (stage < num_layers % pp ? 1 : 0);
}

namespace {
[[noreturn]] void bad(const std::string& sentence) {
  throw InputError(sentence);
}
} // namespace

void complete_plan(Plan& p) {
  if (p.world <= 0)
    bad(fmt::format("plan: world must be a positive number of ranks (got {}).", p.world));
  if (p.pp <= 0 || p.world % p.pp != 0)
    bad(fmt::format("plan: pp ({}) must divide the {} ranks.", p.pp, p.world));
  const int per_stage = p.world / p.pp;
  // Products of two degrees in int64: each degree is an int, so a product cannot wrap.
  auto derive = [&](const char* what, std::int64_t product, int& dp) {
    if (product <= 0 || per_stage % product != 0)
      bad(fmt::format("plan: {} ({}) must divide the {} ranks of a pipeline stage.", what, product,
                      per_stage));
    dp = static_cast<int>(per_stage / product); // a divisor of per_stage: fits an int
  };
  if (p.attention.tp <= 0 || p.attention.cp <= 0)
    bad("plan: attention tp and cp must be positive.");
  // One form for settings without effect, so that equal plans compare equal: sequence
  // parallelism without TP, a CP kind without CP.
  if (p.attention.tp == 1)
    p.attention.sp = true;
  if (p.attention.cp == 1)
    p.attention.cp_kind = CpKind::ring;
  derive("attention tp x cp", std::int64_t{p.attention.tp} * p.attention.cp, p.attention.dp);
  if (p.moe.ep <= 0 || p.moe.etp <= 0)
    bad("plan: moe ep and etp must be positive.");
  derive("moe ep x etp", std::int64_t{p.moe.ep} * p.moe.etp, p.moe.edp);
  // Dense MLPs and embeddings see the tokens of the attention layout (tp x cp x dp): their
  // data-parallel ranks are everything but their own tp.
  derive("dense tp", p.dense.tp, p.dense.dp);
  derive("embedding tp", p.embed.tp, p.embed.dp);
  // A shard group as large as a kind's data-parallel ranks shards over all of them: one form.
  const int kind_ranks[kNumLayerKinds] = {p.attention.cp * p.attention.dp, p.moe.edp, p.dense.dp,
                                          p.embed.dp};
  for (int k = 0; k < kNumLayerKinds; ++k)
    if (p.state[k].shard_group >= kind_ranks[k])
      p.state[k].shard_group = 0;
  if (p.micro_batch <= 0)
    bad(fmt::format("plan: micro_batch must be positive (got {}).", p.micro_batch));
  if (p.global_batch <= 0)
    bad(fmt::format("plan: global_batch must be positive (got {}).", p.global_batch));
  if (p.global_batch % (std::int64_t{p.micro_batch} * p.attention.dp) != 0)
    bad(fmt::format("plan: the global batch ({} sequences) must be a multiple of micro_batch ({}) "
                    "x data-parallel replicas ({}).",
                    p.global_batch, p.micro_batch, p.attention.dp));
  if (p.vp <= 0)
    bad("plan: vp must be positive.");
  if (p.activation_offload < 0 || p.activation_offload > 1)
    bad(fmt::format("plan: activation_offload must be a fraction between 0 and 1 (got {}).",
                    p.activation_offload));
  if (p.moe.capacity_factor < 0 || p.moe.imbalance < 1)
    bad("plan: moe capacity_factor must be >= 0 (0 = dropless) and imbalance >= 1.");
  if (!(p.moe.rebalance_capacity >= 1 && p.moe.rebalance_threshold >= p.moe.rebalance_capacity &&
        p.moe.rebalance_threshold <= 1e6))
    bad(fmt::format("plan: moe rebalance_capacity must be at least 1 and at most "
                    "rebalance_threshold (got capacity {} and threshold {}).",
                    p.moe.rebalance_capacity, p.moe.rebalance_threshold));
  if (!(p.moe.rebalance_min_tokens >= 0 && p.moe.rebalance_min_tokens <= 1e15) ||
      !(p.moe.spill_copies >= 0 && p.moe.spill_copies <= 1e9))
    bad("plan: moe rebalance_min_tokens and spill_copies must be >= 0.");
  if (p.moe.rebalance != Rebalance::none && p.moe.capacity_factor > 0)
    bad("plan: moe rebalance moves tokens instead of dropping them; it needs a dropless plan "
        "(capacity_factor 0).");
  for (const StatePolicy& s : p.state) {
    if (s.zero < 0 || s.zero > 3)
      bad(fmt::format("plan: zero stage must be 0, 1, 2 or 3 (got {}).", s.zero));
    if (s.shard_group < 0)
      bad("plan: shard_group must be >= 0 (0 = shard over all data-parallel ranks).");
  }
  if (p.optimizer_on_host && p.optimizer != Placement::host)
    bad("plan: an optimizer step on the host needs the optimizer state on the host.");
}

void validate_plan(const Plan& p, const ModelShape& m, std::int64_t seq, const ClusterShape& c) {
  const std::int64_t gpus = std::int64_t{c.gpus_per_node} * c.nodes;
  if (p.world != gpus)
    bad(fmt::format("plan: its {} ranks do not match the cluster's {} GPUs ({} nodes x {}).",
                    p.world, gpus, c.nodes, c.gpus_per_node));
  const AttentionMapping& a = p.attention;
  if (m.num_heads % a.tp != 0)
    bad(fmt::format("plan: attention tp ({}) must divide the {} attention heads.", a.tp,
                    m.num_heads));
  // KV heads: TP beyond the KV heads replicates them (Megatron, vLLM); otherwise it must divide.
  if (a.tp <= m.num_kv_heads && m.num_kv_heads % a.tp != 0)
    bad(fmt::format("plan: attention tp ({}) must divide the {} KV heads.", a.tp, m.num_kv_heads));
  if (a.tp > m.num_kv_heads && a.tp % m.num_kv_heads != 0)
    bad(fmt::format("plan: attention tp ({}) must be a multiple of the {} KV heads to replicate "
                    "them.",
                    a.tp, m.num_kv_heads));
  if ((a.tp > 1 || a.cp > 1) && a.tp > c.gpus_per_node)
    bad(fmt::format("plan: attention tp ({}) must stay inside a node of {} GPUs.", a.tp,
                    c.gpus_per_node));
  if (a.cp > 1) {
    // Ring CP splits the sequence into 2·cp chunks (each rank takes one early, one late chunk)
    // to balance causal work; Ulysses splits heads, so cp must divide the heads per TP rank.
    const std::int64_t chunks = a.cp_kind == CpKind::ulysses ? a.cp : 2 * a.cp;
    if (seq % chunks != 0)
      bad(fmt::format("plan: the sequence ({} tokens) must split into {} equal chunks for {} "
                      "context parallelism of degree {}.",
                      seq, chunks, name(a.cp_kind), a.cp));
    const int ulysses = cp_split(p, c.gpus_per_node).ulysses;
    if ((m.num_heads / a.tp) % ulysses != 0)
      bad(fmt::format("plan: Ulysses degree {} must divide the {} heads per tensor-parallel rank.",
                      ulysses, m.num_heads / a.tp));
  }
  // HSDP: shard groups tile a layer kind's data-parallel ranks (torchtitan's dp_shard x
  // dp_replicate); a group at least as large as them shards over all of them.
  for (int k = 0; k < kNumLayerKinds; ++k) {
    const auto kind = static_cast<LayerKind>(k);
    const int g = p.state[k].shard_group;
    const int d = data_parallel_ranks(p, kind);
    if (g > 0 && g < d && d % g != 0)
      bad(fmt::format("plan: the {} shard_group ({}) must divide its {} data-parallel ranks.",
                      layer_kind_name(kind), g, d));
  }
  if (m.num_routed_experts > 0) {
    // Megatron-Core requires sequence parallelism for MoE with TP: otherwise every TP rank would
    // route and compute the same tokens.
    if (a.tp > 1 && !a.sp)
      bad("plan: a Mixture-of-Experts model with attention tp > 1 needs sequence parallelism "
          "(sp).");
    if (m.num_routed_experts % p.moe.ep != 0)
      bad(fmt::format("plan: ep ({}) must divide the {} routed experts.", p.moe.ep,
                      m.num_routed_experts));
  } else if (p.moe.ep > 1) {
    bad("plan: ep > 1 needs a Mixture-of-Experts model.");
  }
  // The vocabulary need not divide by the embedding TP: frameworks pad it (Megatron to a
  // multiple of 128·tp), which the memory model's split absorbs.
  // Megatron lets the embedding and the loss count as a pipeline layer each
  // (account_for_embedding/loss_in_pipeline_split), so a virtual stage may hold only those.
  if (std::int64_t{p.pp} * p.vp > m.num_layers + 2)
    bad(fmt::format("plan: pp x vp ({} x {}) exceeds the {} layers (plus embedding and loss).",
                    p.pp, p.vp, m.num_layers));
  if (p.vp > 1 && p.schedule != PipelineSchedule::interleaved_1f1b)
    bad("plan: virtual stages (vp > 1) need the interleaved-1f1b schedule.");
  if (!p.stage_layers.empty()) {
    if (static_cast<int>(p.stage_layers.size()) != p.pp)
      bad(fmt::format("plan: stage_layers lists {} stages but pp is {}.", p.stage_layers.size(),
                      p.pp));
    std::int64_t sum = 0;
    for (int n : p.stage_layers) {
      if (n <= 0)
        bad("plan: every pipeline stage needs at least one layer.");
      sum += n;
    }
    if (sum != m.num_layers)
      bad(fmt::format("plan: stage_layers add up to {} layers, the model has {}.", sum,
                      m.num_layers));
  }
  if (p.schedule == PipelineSchedule::interleaved_1f1b && p.pp > 1 && p.micro_batches() % p.pp != 0)
    bad(fmt::format("plan: interleaved 1F1B needs the micro-batches per step ({}) to be a "
                    "multiple of pp ({}).",
                    p.micro_batches(), p.pp));
}

namespace {
// Every field of a plan but its family, as one tuple (a copy: stage_layers is short or empty).
auto fields(const Plan& p) {
  const AttentionMapping& a = p.attention;
  const MoeMapping& m = p.moe;
  return std::tuple{p.world,
                    p.pp,
                    p.vp,
                    p.schedule,
                    p.stage_layers,
                    a.tp,
                    a.sp,
                    a.cp,
                    a.cp_kind,
                    a.dp,
                    m.ep,
                    m.etp,
                    m.edp,
                    m.capacity_factor,
                    m.imbalance,
                    m.rebalance,
                    m.rebalance_threshold,
                    m.rebalance_capacity,
                    m.rebalance_min_tokens,
                    m.spill_copies,
                    p.dense.tp,
                    p.dense.dp,
                    p.embed.tp,
                    p.embed.dp,
                    p.state[0].zero,
                    p.state[0].shard_group,
                    p.state[1].zero,
                    p.state[1].shard_group,
                    p.state[2].zero,
                    p.state[2].shard_group,
                    p.state[3].zero,
                    p.state[3].shard_group,
                    p.micro_batch,
                    p.global_batch,
                    p.recompute[0],
                    p.recompute[1],
                    p.recompute[2],
                    p.recompute[3],
                    p.activation_offload,
                    p.chunked_loss,
                    p.params,
                    p.grads,
                    p.optimizer,
                    p.optimizer_on_host,
                    p.torch_host_optimizer,
                    p.overlap};
}
} // namespace

bool same_plan(const Plan& a, const Plan& b) {
  static_assert(kNumLayerKinds == 4);
  return fields(a) == fields(b);
}

std::size_t plan_hash(const Plan& plan) {
  std::size_t seed = 0;
  std::apply(
      [&](const auto&... f) {
        auto add = [&](const auto& v) {
          using T = std::decay_t<decltype(v)>;
          if constexpr (std::is_same_v<T, std::vector<int>>)
            boost::hash_range(seed, v.begin(), v.end());
          else
            boost::hash_combine(seed, v);
        };
        (add(f), ...);
      },
      fields(plan));
  return seed;
}

std::string summary(const Plan& p) {
  std::string s = "attn[";
  std::vector<std::string> parts;
  if (p.attention.tp > 1)
    parts.push_back(fmt::format("tp{}{}", p.attention.tp, p.attention.sp ? "sp" : ""));
  if (p.attention.cp > 1)
    parts.push_back(fmt::format("cp{}{}", p.attention.cp, name(p.attention.cp_kind)[0]));
  parts.push_back(fmt::format("dp{}", p.attention.dp));
  auto join = [](const std::vector<std::string>& v) {
    std::string out;
    for (const auto& x : v)
      out += (out.empty() ? "" : " ") + x;
    return out;
  };
  s += join(parts) + "]";
  if (p.moe.ep > 1 || p.moe.etp > 1) {
    parts.clear();
    parts.push_back(fmt::format("ep{}", p.moe.ep));
    if (p.moe.etp > 1)
      parts.push_back(fmt::format("etp{}", p.moe.etp));
    if (p.moe.edp > 1)
      parts.push_back(fmt::format("edp{}", p.moe.edp));
    if (p.moe.rebalance == Rebalance::least_loaded)
      parts.push_back(fmt::format("llep{:g}", p.moe.rebalance_threshold));
    s += " moe[" + join(parts) + "]";
  }
  if (p.dense.tp > 1)
    s += fmt::format(" dense[tp{}]", p.dense.tp);
  // ZeRO: the attention's stage (and HSDP group), then each kind that differs
  // ("zero3,moe=1": experts at ZeRO-1).
  const StatePolicy& z = p.state[static_cast<int>(LayerKind::attention)];
  auto zero_text = [](const StatePolicy& x) {
    return x.shard_group > 0 ? fmt::format("{}/{}", x.zero, x.shard_group)
                             : fmt::format("{}", x.zero);
  };
  s += " zero" + zero_text(z);
  for (LayerKind k : {LayerKind::moe, LayerKind::dense, LayerKind::embedding}) {
    const StatePolicy& x = p.state[static_cast<int>(k)];
    if (x.zero != z.zero || x.shard_group != z.shard_group)
      s += fmt::format(",{}={}", layer_kind_name(k), zero_text(x));
  }
  s += fmt::format(" pp{}", p.pp);
  if (!p.stage_layers.empty()) {
    // Layers per stage, runs written once with their count: "layers=4x31,2".
    s += " layers=";
    for (std::size_t i = 0; i < p.stage_layers.size();) {
      std::size_t j = i;
      while (j < p.stage_layers.size() && p.stage_layers[j] == p.stage_layers[i])
        ++j;
      s += fmt::format("{}{}{}", i > 0 ? "," : "", p.stage_layers[i],
                       j - i > 1 ? fmt::format("x{}", j - i) : "");
      i = j;
    }
  }
  if (p.pp > 1)
    s += fmt::format(" {}{}", name(p.schedule), p.vp > 1 ? fmt::format(" vp{}", p.vp) : "");
  s += fmt::format(" mb{}", p.micro_batch);
  const Recompute rc = p.recompute[static_cast<int>(LayerKind::attention)];
  const Recompute rc_moe = p.recompute[static_cast<int>(LayerKind::moe)];
  s += fmt::format(" rc={}", name(rc));
  const Recompute rc_dense = p.recompute[static_cast<int>(LayerKind::dense)];
  if (rc_moe != rc)
    s += fmt::format("/moe={}", name(rc_moe));
  if (rc_dense != rc)
    s += fmt::format("/dense={}", name(rc_dense));
  std::vector<std::string> off;
  if (p.activation_offload > 0)
    off.push_back(p.activation_offload < 1 ? fmt::format("act{:.0f}%", 100 * p.activation_offload)
                                           : "act");
  if (p.params == Placement::host)
    off.push_back("param");
  if (p.grads == Placement::host)
    off.push_back("grad");
  if (p.optimizer == Placement::host)
    off.push_back("opt");
  if (!off.empty()) {
    s += " off=";
    for (std::size_t i = 0; i < off.size(); ++i)
      s += (i ? "," : "") + off[i];
  }
  s += fmt::format(" opt={}/{}",
                   p.optimizer_on_host ? (p.torch_host_optimizer ? "host-torch" : "host") : "gpu",
                   name(p.overlap));
  return s;
}

// ---------------------------------------------------------------------------------------------
// JSON

namespace {

template <class E, std::size_t N>
E parse_enum(const JsonFields& f, const std::string& key, const E (&values)[N], E fallback) {
  if (!f.has(key))
    return fallback;
  const std::string text = f.string(key);
  std::string allowed;
  for (E v : values) {
    if (text == name(v))
      return v;
    allowed += (allowed.empty() ? "" : ", ") + std::string(name(v));
  }
  f.fail(key, "one of " + allowed);
}

// A parallel degree, a rank count or a batch: whole, positive, at most `max` (an int).
int int_field(const JsonFields& f, const std::string& key, int fallback,
              std::int64_t max = limits::max_gpus) {
  return static_cast<int>(f.int_in_or(key, 1, max, fallback));
}

} // namespace

Json to_json(const Plan& p) {
  Json states = Json::object();
  Json recompute = Json::object();
  for (int k = 0; k < kNumLayerKinds; ++k) {
    const char* kind = layer_kind_name(static_cast<LayerKind>(k));
    states[kind] = Json{{"zero", p.state[k].zero}, {"shard_group", p.state[k].shard_group}};
    recompute[kind] = name(p.recompute[k]);
  }
  Json j{{"family", p.family},
         {"summary", summary(p)},
         {"world", p.world},
         {"pp", p.pp},
         {"vp", p.vp},
         {"schedule", name(p.schedule)},
         {"stage_layers", p.stage_layers},
         {"attention", Json{{"tp", p.attention.tp},
                            {"sp", p.attention.sp},
                            {"cp", p.attention.cp},
                            {"cp_kind", name(p.attention.cp_kind)},
                            {"dp", p.attention.dp}}},
         {"moe", Json{{"ep", p.moe.ep},
                      {"etp", p.moe.etp},
                      {"edp", p.moe.edp},
                      {"capacity_factor", p.moe.capacity_factor},
                      {"imbalance", p.moe.imbalance},
                      {"rebalance", name(p.moe.rebalance)},
                      {"rebalance_threshold", p.moe.rebalance_threshold},
                      {"rebalance_capacity", p.moe.rebalance_capacity},
                      {"rebalance_min_tokens", p.moe.rebalance_min_tokens},
                      {"spill_copies", p.moe.spill_copies}}},
         {"dense", Json{{"tp", p.dense.tp}, {"dp", p.dense.dp}}},
         {"embedding", Json{{"tp", p.embed.tp}, {"dp", p.embed.dp}}},
         {"state", states},
         {"micro_batch", p.micro_batch},
         {"global_batch", p.global_batch},
         {"recompute", recompute},
         {"activation_offload", p.activation_offload},
         {"chunked_loss", p.chunked_loss},
         {"params", name(p.params)},
         {"grads", name(p.grads)},
         {"optimizer", name(p.optimizer)},
         {"optimizer_on_host", p.optimizer_on_host},
         {"torch_host_optimizer", p.torch_host_optimizer},
         {"overlap", name(p.overlap)}};
  return j;
}

Plan plan_from_json(const Json& j, const std::string& origin) {
  const JsonFields f(j, origin);
  // "summary" and the derived data-parallel degrees ("dp", "edp") are in every plan mop
  // writes; they are read back as what they are, derived, and ignored.
  f.allow_only({"family",
                "summary",
                "world",
                "pp",
                "vp",
                "schedule",
                "stage_layers",
                "attention",
                "moe",
                "dense",
                "embedding",
                "state",
                "micro_batch",
                "global_batch",
                "recompute",
                "activation_offload",
                "chunked_loss",
                "params",
                "grads",
                "optimizer",
                "optimizer_on_host",
                "torch_host_optimizer",
                "overlap"});
  Plan p;
  p.family = f.string_or("family", "custom");
  // 0: the command's world (its nodes x GPUs per node), for a partial plan.
  p.world = f.has("world") ? int_field(f, "world", 0) : 0;
  p.pp = int_field(f, "pp", 1);
  p.vp = int_field(f, "vp", 1, limits::max_layers + 2);
  constexpr PipelineSchedule schedules[] = {PipelineSchedule::gpipe, PipelineSchedule::one_f_one_b,
                                            PipelineSchedule::interleaved_1f1b,
                                            PipelineSchedule::zero_bubble};
  p.schedule = parse_enum(f, "schedule", schedules, PipelineSchedule::one_f_one_b);
  if (f.has("stage_layers")) {
    const Json& v = f.at("stage_layers");
    const std::string requirement = fmt::format(
        "a list of layer counts from 1 to {}, one per pipeline stage", limits::max_layers);
    if (!v.is_array() || static_cast<std::int64_t>(v.size()) > limits::max_gpus)
      f.fail("stage_layers", requirement);
    for (const Json& n : v) {
      // Compared as what the parser stored: a large unsigned must not wrap to a small int.
      const bool in_range =
          n.is_number_unsigned()
              ? n.get<std::uint64_t>() >= 1 &&
                    n.get<std::uint64_t>() <= static_cast<std::uint64_t>(limits::max_layers)
              : n.is_number_integer() && n.get<std::int64_t>() >= 1 &&
                    n.get<std::int64_t>() <= limits::max_layers;
      if (!in_range)
        f.fail("stage_layers", requirement);
      p.stage_layers.push_back(static_cast<int>(n.get<std::int64_t>()));
    }
  }
  auto object = [&](const char* key) -> Json { return f.has(key) ? f.at(key) : Json::object(); };
  {
    const Json o = object("attention");
    const JsonFields a(o, origin + " attention");
    a.allow_only({"tp", "sp", "cp", "cp_kind", "dp"});
    p.attention.tp = int_field(a, "tp", 1);
    p.attention.sp = a.bool_or("sp", true);
    p.attention.cp = int_field(a, "cp", 1);
    constexpr CpKind kinds[] = {CpKind::ring, CpKind::ulysses, CpKind::hybrid};
    p.attention.cp_kind = parse_enum(a, "cp_kind", kinds, CpKind::ring);
  }
  {
    const Json o = object("moe");
    const JsonFields e(o, origin + " moe");
    e.allow_only({"ep", "etp", "edp", "capacity_factor", "imbalance", "rebalance",
                  "rebalance_threshold", "rebalance_capacity", "rebalance_min_tokens",
                  "spill_copies"});
    p.moe.ep = int_field(e, "ep", 1);
    p.moe.etp = int_field(e, "etp", 1);
    p.moe.capacity_factor = e.number_or("capacity_factor", 0);
    p.moe.imbalance = e.number_or("imbalance", 1.0);
    constexpr Rebalance rebalances[] = {Rebalance::none, Rebalance::least_loaded};
    p.moe.rebalance = parse_enum(e, "rebalance", rebalances, Rebalance::none);
    p.moe.rebalance_threshold = e.number_or("rebalance_threshold", 1.3);
    p.moe.rebalance_capacity = e.number_or("rebalance_capacity", 1.1);
    p.moe.rebalance_min_tokens = e.number_or("rebalance_min_tokens", 1024);
    p.moe.spill_copies = e.number_or("spill_copies", 0);
  }
  {
    const Json o = object("dense");
    const JsonFields d(o, origin + " dense");
    d.allow_only({"tp", "dp"});
    p.dense.tp = int_field(d, "tp", 1);
    const Json o2 = object("embedding");
    const JsonFields e(o2, origin + " embedding");
    e.allow_only({"tp", "dp"});
    p.embed.tp = int_field(e, "tp", 1);
  }
  {
    const Json states = object("state");
    const Json rc = object("recompute");
    const JsonFields sf(states, origin + " state");
    const JsonFields rf(rc, origin + " recompute");
    sf.allow_only({"attention", "moe", "dense", "embedding"});
    rf.allow_only({"attention", "moe", "dense", "embedding"});
    constexpr Recompute policies[] = {Recompute::none, Recompute::selective, Recompute::full};
    for (int k = 0; k < kNumLayerKinds; ++k) {
      const std::string kind = layer_kind_name(static_cast<LayerKind>(k));
      if (sf.has(kind)) {
        const JsonFields s(sf.at(kind), origin + " state." + kind);
        s.allow_only({"zero", "shard_group"});
        p.state[k].zero = static_cast<int>(s.int_in_or("zero", 0, 3, 1));
        p.state[k].shard_group =
            static_cast<int>(s.int_in_or("shard_group", 0, limits::max_gpus, 0));
      }
      p.recompute[k] = parse_enum(rf, kind, policies, Recompute::none);
    }
  }
  p.micro_batch = int_field(f, "micro_batch", 1, limits::max_batch_sequences);
  // 0: the command's default batch
  p.global_batch = static_cast<int>(f.int_in_or("global_batch", 0, limits::max_batch_sequences, 0));
  p.activation_offload = f.number_or("activation_offload", 0);
  p.chunked_loss = f.bool_or("chunked_loss", false);
  constexpr Placement places[] = {Placement::hbm, Placement::host};
  p.params = parse_enum(f, "params", places, Placement::hbm);
  p.grads = parse_enum(f, "grads", places, Placement::hbm);
  p.optimizer = parse_enum(f, "optimizer", places, Placement::hbm);
  p.optimizer_on_host = f.bool_or("optimizer_on_host", false);
  p.torch_host_optimizer = f.bool_or("torch_host_optimizer", false);
  constexpr OptimizerOverlap overlaps[] = {OptimizerOverlap::after_backward,
                                           OptimizerOverlap::stream_backward,
                                           OptimizerOverlap::stream_forward};
  p.overlap = parse_enum(f, "overlap", overlaps, OptimizerOverlap::after_backward);
  return p;
}

} // namespace mop::strategy
