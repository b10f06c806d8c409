#include "strategies/frameworks.hpp"

#include "common/error.hpp"
#include "common/json_io.hpp"
#include "common/limits.hpp"
#include "strategies/mesh.hpp"
#include "workload/catalog.hpp"

#include <algorithm>
#include <filesystem>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <map>
#include <regex>
#include <set>
#include <toml++/toml.h>

namespace mop::strategy {

const char* name(Framework f) {
  switch (f) {
  case Framework::megatron:
    return "megatron";
  case Framework::torchtitan:
    return "torchtitan";
  case Framework::deepspeed:
    return "deepspeed";
  }
  return "?";
}

Framework parse_framework(const std::string& text) {
  for (Framework f : {Framework::megatron, Framework::torchtitan, Framework::deepspeed})
    if (text == name(f))
      return f;
  throw InputError(fmt::format("the framework must be megatron, torchtitan or deepspeed (got "
                               "'{}').",
                               text));
}

const char* family_of(Framework f) {
  switch (f) {
  case Framework::megatron:
    return "megatron";
  case Framework::torchtitan:
    return "fsdp2";
  case Framework::deepspeed:
    return "ulysses-zero3";
  }
  return "?";
}

namespace {

// ---- Reading arguments ----------------------------------------------------------------------

// The words of a launch script or argument list as a POSIX shell splits them: backslash-newline
// joins lines, '#' starts a comment at the start of a word, quotes group. A `$` outside single
// quotes is a shell variable mop cannot expand.
std::vector<std::string> shell_words(const std::string& text, const std::string& origin) {
  std::vector<std::string> words;
  std::string word;
  bool in_word = false;
  char quote = 0;
  for (std::size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (quote != 0) {
      if (c == quote)
        quote = 0;
      else {
        if (c == '$' && quote == '"')
          throw InputError(fmt::format("{}: uses a shell variable; give the arguments with their "
                                       "values.",
                                       origin));
        word += c;
      }
      continue;
    }
    if (c == '\\' && i + 1 < text.size() && text[i + 1] == '\n') {
      ++i;
      continue;
    }
    if (c == '#' && !in_word) {
      while (i < text.size() && text[i] != '\n')
        ++i;
      continue;
    }
    if (c == ' ' || c == '\t' || c == '\n' || c == '\r') {
      if (in_word)
        words.push_back(std::move(word));
      word.clear();
      in_word = false;
      continue;
    }
    if (c == '$')
      throw InputError(
          fmt::format("{}: uses a shell variable; give the arguments with their values.", origin));
    if (c == '\'' || c == '"')
      quote = c;
    else
      word += c;
    in_word = true;
  }
  if (quote != 0)
    throw InputError(fmt::format("{}: a quote is not closed.", origin));
  if (in_word)
    words.push_back(std::move(word));
  return words;
}

// `--key value...` pairs (the last occurrence wins, as argparse does); keys without their dashes,
// '_' read as '-'. Words before the first key and between keys that take no value (the launcher,
// the script) are not arguments.
class Args {
public:
  Args(const std::vector<std::string>& words, std::string origin) : origin_(std::move(origin)) {
    std::string key;
    for (const std::string& w : words) {
      if (w.starts_with("--") && w.size() > 2) {
        std::string k = w.substr(2);
        std::optional<std::string> inline_value;
        if (const auto eq = k.find('='); eq != std::string::npos) {
          inline_value = k.substr(eq + 1);
          k = k.substr(0, eq);
        }
        std::replace(k.begin(), k.end(), '_', '-');
        values_[k].clear();
        if (inline_value)
          values_[k].push_back(*inline_value);
        key = inline_value ? std::string() : k;
      } else if (w.ends_with(".py")) {
        key.clear(); // the training script: the launcher's arguments end here
      } else if (!key.empty()) {
        values_[key].push_back(w);
      }
    }
  }
  bool has(const std::string& k) const { return values_.contains(k); }
  const std::vector<std::string>& values(const std::string& k) const { return values_.at(k); }
  std::string word(const std::string& k) const {
    const auto& v = values_.at(k);
    if (v.size() != 1)
      throw InputError(fmt::format("{}: --{} takes one value (got {}).", origin_, k, v.size()));
    return v[0];
  }
  std::int64_t integer(const std::string& k, std::int64_t low, std::int64_t high) const {
    const std::string w = word(k);
    std::size_t used = 0;
    std::int64_t n = 0;
    try {
      n = std::stoll(w, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != w.size() || w.empty() || n < low || n > high)
      throw InputError(fmt::format("{}: --{} takes a whole number from {} to {} (got '{}').",
                                   origin_, k, low, high, w));
    return n;
  }
  int degree(const std::string& k) const {
    return static_cast<int>(integer(k, 1, limits::max_gpus));
  }
  double number(const std::string& k, double low, double high) const {
    const std::string w = word(k);
    std::size_t used = 0;
    double x = 0;
    try {
      x = std::stod(w, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != w.size() || w.empty() || !(x >= low && x <= high))
      throw InputError(fmt::format("{}: --{} takes a number from {} to {} (got '{}').", origin_, k,
                                   low, high, w));
    return x;
  }
  const std::string& origin() const { return origin_; }

private:
  std::map<std::string, std::vector<std::string>> values_;
  std::string origin_;
};

// Megatron's --moe-layer-freq: N (every N-th layer, from layer 0) or a list expression of
// `[x]*n` terms joined by '+' ("([0]*3+[1]*58)"), as its argument parser evaluates it.
std::vector<bool> moe_layers(const Args& a, std::int64_t layers) {
  std::vector<bool> moe(static_cast<std::size_t>(layers), true);
  if (!a.has("moe-layer-freq"))
    return moe;
  const std::string text = a.word("moe-layer-freq");
  if (std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; })) {
    const std::int64_t every = a.integer("moe-layer-freq", 1, limits::max_layers);
    for (std::int64_t i = 0; i < layers; ++i)
      moe[static_cast<std::size_t>(i)] = i % every == 0;
    return moe;
  }
  std::string body = text;
  std::erase_if(body, [](char c) { return c == ' ' || c == '(' || c == ')'; });
  static const std::regex term(R"(\[([01])\]\*(\d{1,4}))");
  std::vector<bool> out;
  std::size_t at = 0;
  while (at < body.size()) {
    std::smatch m;
    const std::string rest = body.substr(at);
    if (!std::regex_search(rest, m, term, std::regex_constants::match_continuous))
      throw InputError(fmt::format("{}: --moe-layer-freq '{}' is neither a number nor a list "
                                   "like ([0]*3+[1]*58).",
                                   a.origin(), text));
    out.insert(out.end(), static_cast<std::size_t>(std::stoi(m[2].str())), m[1].str() == "1");
    at += static_cast<std::size_t>(m.length(0));
    if (at < body.size() && body[at] == '+')
      ++at;
  }
  if (static_cast<std::int64_t>(out.size()) != layers)
    throw InputError(fmt::format("{}: --moe-layer-freq '{}' lists {} layers, the model has {}.",
                                 a.origin(), text, out.size(), layers));
  return out;
}

// The model Megatron's model arguments describe (GPT with SwiGLU: Llama, Mistral, Qwen, Mixtral
// and Qwen-MoE shapes). Megatron's own defaults where a key is absent: LayerNorm, learned
// absolute positions, biased linear layers, tied embeddings, top-2 routing.
workload::ModelSpec megatron_model(const Args& a) {
  const std::string& o = a.origin();
  for (const char* k : {"num-layers", "hidden-size", "num-attention-heads"})
    if (!a.has(k))
      throw InputError(fmt::format("{}: --{} is not given; name the model with --model or give "
                                   "its model arguments.",
                                   o, k));
  if (!a.has("vocab-size"))
    throw InputError(fmt::format("{}: --vocab-size is not given (Megatron-LM takes the "
                                 "vocabulary from the tokenizer); add it or name the model with "
                                 "--model.",
                                 o));
  if (a.has("multi-latent-attention"))
    throw InputError(fmt::format("{}: multi-latent attention from its arguments is not read yet; "
                                 "name the model with --model.",
                                 o));
  if (!a.has("swiglu"))
    throw InputError(fmt::format("{}: mop reads SwiGLU models from Megatron-LM's arguments "
                                 "(--swiglu); name the model with --model.",
                                 o));
  workload::ModelSpec m;
  m.name = std::filesystem::path(o).stem().string();
  if (m.name.empty())
    m.name = "megatron-args";
  m.display_name = "the model of " + o;
  m.model_type = "megatron";
  m.hidden_size = a.integer("hidden-size", 1, std::int64_t{1} << 20);
  m.vocab_size = a.integer("vocab-size", 1, std::int64_t{1} << 24);
  m.tied_embeddings = !a.has("untie-embeddings-and-output-weights");
  const std::int64_t layers = a.integer("num-layers", 1, limits::max_layers);
  workload::AttentionSpec& at = m.attention;
  at.num_heads = a.integer("num-attention-heads", 1, 1 << 16);
  at.num_kv_heads = a.has("group-query-attention") && a.has("num-query-groups")
                        ? a.integer("num-query-groups", 1, at.num_heads)
                        : at.num_heads;
  at.head_dim =
      a.has("kv-channels") ? a.integer("kv-channels", 1, 1 << 16) : m.hidden_size / at.num_heads;
  const bool bias = !a.has("disable-bias-linear");
  at.qkv_bias = a.has("add-qkv-bias") || bias;
  at.out_bias = bias;
  at.qk_norm = a.has("qk-layernorm");
  // Megatron's default FFN size with SwiGLU: 4h · 2/3, rounded down to a multiple of 64.
  const std::int64_t ffn = a.has("ffn-hidden-size")
                               ? a.integer("ffn-hidden-size", 1, std::int64_t{1} << 24)
                               : m.hidden_size * 8 / 3 / 64 * 64;
  m.dense_mlp.intermediate_size = ffn;
  m.dense_mlp.bias = bias;
  m.max_position_embeddings = a.has("max-position-embeddings")
                                  ? a.integer("max-position-embeddings", 1, limits::max_seq_tokens)
                                  : 0;
  const std::string positions =
      a.has("position-embedding-type") ? a.word("position-embedding-type") : "learned_absolute";
  if (positions == "learned_absolute")
    m.learned_positions = m.max_position_embeddings;
  m.norm_bias = !a.has("normalization") || a.word("normalization") != "RMSNorm";
  if (a.has("norm-epsilon"))
    m.norm_eps = a.number("norm-epsilon", 1e-12, 1);
  if (a.has("rotary-base"))
    m.rope_theta = a.number("rotary-base", 1, 1e12);
  m.layers.assign(static_cast<std::size_t>(layers), workload::LayerSpec{});
  if (a.has("num-experts")) {
    m.moe.num_routed_experts = a.integer("num-experts", 1, 1 << 16);
    m.moe.experts_per_token =
        a.has("moe-router-topk") ? a.integer("moe-router-topk", 1, m.moe.num_routed_experts) : 2;
    m.moe.expert_intermediate_size =
        a.has("moe-ffn-hidden-size") ? a.integer("moe-ffn-hidden-size", 1, std::int64_t{1} << 24)
                                     : ffn;
    if (a.has("moe-shared-expert-intermediate-size")) {
      m.moe.num_shared_experts = 1;
      m.moe.shared_intermediate_size =
          a.integer("moe-shared-expert-intermediate-size", 1, std::int64_t{1} << 24);
    }
    const std::vector<bool> moe = moe_layers(a, layers);
    for (std::int64_t i = 0; i < layers; ++i)
      m.layers[static_cast<std::size_t>(i)].mlp =
          moe[static_cast<std::size_t>(i)] ? workload::MlpKind::moe : workload::MlpKind::dense;
  }
  workload::validate(m, o);
  return m;
}

// Keys that change what a run does but that mop does not model yet: named, not dropped.
const std::map<std::string, std::string>& megatron_not_represented() {
  static const std::map<std::string, std::string> keys = {
      {"tp-comm-overlap", "TP communication overlap (--tp-comm-overlap) is not modelled"},
      {"overlap-moe-expert-parallel-comm",
       "EP all-to-all overlap (--overlap-moe-expert-parallel-comm) is not modelled"},
      {"delay-wgrad-compute", "delayed weight gradients (--delay-wgrad-compute) are not modelled"},
      {"fp8-param-gather", "FP8 parameter gathers (--fp8-param-gather) are priced in BF16"},
      {"num-distributed-optimizer-instances",
       "several distributed-optimizer instances (--num-distributed-optimizer-instances) are "
       "priced as one"},
      {"pipeline-model-parallel-layout",
       "a custom pipeline layout (--pipeline-model-parallel-layout) is priced as an even split"},
      {"recompute-num-layers",
       "partial recompute (--recompute-num-layers, --recompute-method) is priced as "
       "recomputing every layer"},
      {"cpu-offloading-num-layers",
       "layer-wise offloading (--cpu-offloading-num-layers) is priced as offloading every "
       "checkpointed activation"},
      {"fp16", "FP16 training (--fp16) is priced as BF16"},
  };
  return keys;
}

// The stage split a plan states: empty when it is mop's even split (the first stages take the
// remainder), so that a split read back equals the plan it came from.
std::vector<int> normal_split(std::vector<int> split, int pp, int layers) {
  Plan even;
  even.pp = pp;
  for (int s = 0; s < pp; ++s)
    if (split[static_cast<std::size_t>(s)] != even.layers_in_stage(s, layers))
      return split;
  return {};
}

} // namespace

FrameworkRun read_megatron_args(const std::string& text, const std::string& origin,
                                const workload::ModelSpec* model) {
  const Args a(shell_words(text, origin), origin);
  FrameworkRun r;
  r.framework = Framework::megatron;
  r.text = text;
  if (model == nullptr)
    r.model = megatron_model(a);
  const workload::ModelSpec& m = model != nullptr ? *model : *r.model;
  const int layers = static_cast<int>(m.num_layers());
  Plan& p = r.plan;
  p.family = "megatron";
  p.world = 0;
  if (a.has("nnodes") && a.has("nproc-per-node")) {
    r.nodes = static_cast<int>(a.integer("nnodes", 1, limits::max_gpus));
    r.gpus_per_node = static_cast<int>(a.integer("nproc-per-node", 1, 64));
  }
  const int tp = a.has("tensor-model-parallel-size") ? a.degree("tensor-model-parallel-size") : 1;
  p.attention.tp = p.dense.tp = p.embed.tp = tp;
  p.attention.sp = a.has("sequence-parallel");
  p.attention.cp = a.has("context-parallel-size") ? a.degree("context-parallel-size") : 1;
  if (a.has("cp-comm-type")) {
    const std::string kind = a.values("cp-comm-type").empty() ? "" : a.values("cp-comm-type")[0];
    if (kind == "a2a")
      p.attention.cp_kind = CpKind::ulysses;
    else if (kind == "a2a+p2p")
      p.attention.cp_kind = CpKind::hybrid;
    else if (kind == "p2p" || kind == "allgather") {
      p.attention.cp_kind = CpKind::ring;
      if (kind == "allgather")
        r.not_represented.emplace_back(
            "all-gather context parallelism (--cp-comm-type allgather) is priced as a ring");
    } else
      throw InputError(fmt::format("{}: --cp-comm-type takes p2p, a2a, allgather or a2a+p2p "
                                   "(got '{}').",
                                   origin, kind));
  }
  p.pp = a.has("pipeline-model-parallel-size") ? a.degree("pipeline-model-parallel-size") : 1;
  if (a.has("num-virtual-stages-per-pipeline-rank"))
    p.vp = static_cast<int>(a.integer("num-virtual-stages-per-pipeline-rank", 1, layers));
  else if (a.has("num-layers-per-virtual-pipeline-stage")) {
    const auto per = a.integer("num-layers-per-virtual-pipeline-stage", 1, layers);
    if (layers % (per * p.pp) != 0)
      throw InputError(fmt::format("{}: --num-layers-per-virtual-pipeline-stage {} does not "
                                   "split {} layers over {} stages.",
                                   origin, per, layers, p.pp));
    p.vp = static_cast<int>(layers / (per * p.pp));
  }
  p.schedule = p.vp > 1 ? PipelineSchedule::interleaved_1f1b : PipelineSchedule::one_f_one_b;
  if (a.has("decoder-first-pipeline-num-layers") || a.has("decoder-last-pipeline-num-layers")) {
    const int first =
        a.has("decoder-first-pipeline-num-layers")
            ? static_cast<int>(a.integer("decoder-first-pipeline-num-layers", 1, layers))
            : -1;
    const int last =
        a.has("decoder-last-pipeline-num-layers")
            ? static_cast<int>(a.integer("decoder-last-pipeline-num-layers", 1, layers))
            : -1;
    const int cut = (first > 0 ? 1 : 0) + (last > 0 ? 1 : 0);
    const int rest_stages = p.pp - cut;
    const int rest = layers - std::max(first, 0) - std::max(last, 0);
    if (p.pp < 2 || rest_stages < 0 || rest < 0 ||
        (rest_stages > 0 ? rest % rest_stages != 0 : rest != 0))
      throw InputError(fmt::format("{}: the first and last stage layers leave {} layers, which "
                                   "do not split evenly over the other {} stages.",
                                   origin, rest, std::max(rest_stages, 0)));
    std::vector<int> split;
    for (int s = 0; s < p.pp; ++s)
      split.push_back(s == 0 && first > 0         ? first
                      : s == p.pp - 1 && last > 0 ? last
                                                  : rest / rest_stages);
    p.stage_layers = normal_split(split, p.pp, layers);
  }
  p.moe.ep = a.has("expert-model-parallel-size") ? a.degree("expert-model-parallel-size") : 1;
  // Megatron-Core: the expert TP is the TP unless set.
  p.moe.etp = a.has("expert-tensor-parallel-size") ? a.degree("expert-tensor-parallel-size") : tp;
  if (!m.is_moe())
    p.moe.ep = p.moe.etp = 1;
  if (a.has("moe-expert-capacity-factor"))
    p.moe.capacity_factor = a.number("moe-expert-capacity-factor", 0, 1e6);
  int zero = a.has("use-distributed-optimizer") ? 1 : 0;
  if (a.has("use-torch-fsdp2"))
    zero = 3;
  if (a.has("use-megatron-fsdp")) {
    const std::string s = a.has("data-parallel-sharding-strategy")
                              ? a.word("data-parallel-sharding-strategy")
                              : "optim_grads_params";
    zero = s == "optim" ? 1 : s == "optim_grads" ? 2 : s == "no_shard" ? 0 : 3;
  }
  for (StatePolicy& s : p.state)
    s.zero = zero;
  if (a.has("micro-batch-size"))
    p.micro_batch = static_cast<int>(a.integer("micro-batch-size", 1, limits::max_batch_sequences));
  if (a.has("global-batch-size"))
    r.global_batch =
        static_cast<int>(a.integer("global-batch-size", 1, limits::max_batch_sequences));
  p.global_batch = r.global_batch;
  if (a.has("seq-length"))
    r.seq = a.integer("seq-length", 1, limits::max_seq_tokens);
  Recompute rc = Recompute::none;
  if (a.has("recompute-activations"))
    rc = Recompute::selective;
  if (a.has("recompute-granularity")) {
    const std::string g = a.word("recompute-granularity");
    if (g != "full" && g != "selective")
      throw InputError(fmt::format("{}: --recompute-granularity takes full or selective (got "
                                   "'{}').",
                                   origin, g));
    rc = g == "full" ? Recompute::full : Recompute::selective;
  }
  for (Recompute& x : p.recompute)
    x = rc;
  if (a.has("cpu-offloading"))
    p.activation_offload = 1;
  if (a.has("optimizer-cpu-offload")) {
    p.optimizer = Placement::host;
    p.optimizer_on_host = true;
    p.torch_host_optimizer = true;
    if (a.has("optimizer-offload-fraction") && a.number("optimizer-offload-fraction", 0, 1) < 1)
      r.not_represented.emplace_back(
          "a partial optimizer offload (--optimizer-offload-fraction below 1) is priced as "
          "offloading all of it");
  }
  if (a.has("fp8-format")) {
    r.precision = "fp8";
    // Megatron-LM's --fp8-recipe (default delayed): tensorwise is Transformer Engine's current
    // scaling; blockwise (1x128 / 128x128 scales, also computed per call) is priced as it.
    const std::string recipe = a.has("fp8-recipe") ? a.word("fp8-recipe") : "delayed";
    r.fp8_recipe = recipe == "mxfp8"     ? Fp8Recipe::mxfp8
                   : recipe == "delayed" ? Fp8Recipe::delayed
                                         : Fp8Recipe::current;
    if (recipe == "mxfp8")
      r.precision = "mxfp8";
  }
  if (a.has("moe-enable-deepep") ||
      (a.has("moe-token-dispatcher-type") && a.word("moe-token-dispatcher-type") == "flex"))
    r.ep_dispatcher =
        a.has("moe-flex-dispatcher-backend") && a.word("moe-flex-dispatcher-backend") == "hybridep"
            ? EpDispatcher::hybridep
            : EpDispatcher::deepep;
  for (const auto& [key, why] : megatron_not_represented())
    if (a.has(key))
      r.not_represented.push_back(why);
  return r;
}

// ---- torchtitan -----------------------------------------------------------------------------

namespace {

// A torchtitan job's settings as "section.key" -> text, from its TOML or its overrides.
class TitanKeys {
public:
  TitanKeys(const std::string& text, const std::string& origin) : origin_(origin) {
    if (text.find("--") == std::string::npos) {
      try {
        flatten(toml::parse(text, origin), "");
      } catch (const toml::parse_error& e) {
        throw InputError(fmt::format("{}: not valid TOML (line {}: {}).", origin,
                                     e.source().begin.line, e.description()));
      }
      return;
    }
    std::string key;
    for (const std::string& w : shell_words(text, origin)) {
      if (w.starts_with("--") && w.size() > 2) {
        std::string k = w.substr(2);
        std::optional<std::string> inline_value;
        if (const auto eq = k.find('='); eq != std::string::npos) {
          inline_value = k.substr(eq + 1);
          k = k.substr(0, eq);
        }
        std::replace(k.begin(), k.end(), '-', '_');
        // tyro's negated booleans: --training.no_enable_cpu_offload
        const auto dot = k.rfind('.');
        const std::size_t leaf = dot == std::string::npos ? 0 : dot + 1;
        if (!inline_value && k.compare(leaf, 3, "no_") == 0) {
          values_[k.substr(0, leaf) + k.substr(leaf + 3)] = "false";
          key.clear();
          continue;
        }
        values_[k] = inline_value.value_or("true");
        key = inline_value ? std::string() : k;
      } else if (w.ends_with(".py")) {
        key.clear();
      } else if (!key.empty()) {
        values_[key] = w;
        key.clear();
      }
    }
  }
  bool has(const std::string& k) const { return values_.contains(k); }
  std::string text(const std::string& k, const std::string& fallback) const {
    const auto it = values_.find(k);
    return it == values_.end() ? fallback : it->second;
  }
  std::int64_t integer(const std::string& k, std::int64_t low, std::int64_t high,
                       std::int64_t fallback) const {
    if (!has(k))
      return fallback;
    const std::string w = values_.at(k);
    std::size_t used = 0;
    std::int64_t n = 0;
    try {
      n = std::stoll(w, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != w.size() || w.empty() || n < low || n > high)
      throw InputError(fmt::format("{}: {} takes a whole number from {} to {} (got '{}').", origin_,
                                   k, low, high, w));
    return n;
  }
  bool flag(const std::string& k, bool fallback) const {
    if (!has(k))
      return fallback;
    const std::string w = values_.at(k);
    if (w == "true" || w == "True" || w == "1")
      return true;
    if (w == "false" || w == "False" || w == "0")
      return false;
    throw InputError(fmt::format("{}: {} takes true or false (got '{}').", origin_, k, w));
  }
  bool any_under(const std::string& prefix) const {
    const auto it = values_.lower_bound(prefix);
    return it != values_.end() && it->first.starts_with(prefix);
  }

private:
  void flatten(const toml::table& t, const std::string& prefix) {
    for (const auto& [k, v] : t) {
      const std::string key = prefix + std::string(k.str());
      if (const toml::table* sub = v.as_table()) {
        values_[key] = "table";
        flatten(*sub, key + ".");
      } else if (const auto* str = v.as_string())
        values_[key] = str->get();
      else if (const auto* i = v.as_integer())
        values_[key] = std::to_string(i->get());
      else if (const auto* b = v.as_boolean())
        values_[key] = b->get() ? "true" : "false";
      else if (const auto* d = v.as_floating_point())
        values_[key] = fmt::format("{}", d->get());
      else if (const toml::array* a = v.as_array()) {
        std::string joined;
        for (const auto& e : *a)
          if (const auto* es = e.as_string())
            joined += (joined.empty() ? "" : ",") + es->get();
        values_[key] = joined;
      }
    }
  }
  std::map<std::string, std::string> values_;
  std::string origin_;
};

// The catalog model a torchtitan model name and flavor (legacy) or config function (current)
// names, "" when none: "llama3" + "8B" and "llama3_8b" are llama3-8b.
std::string titan_model_id(const TitanKeys& k) {
  std::string id;
  if (k.has("model.name"))
    id = k.text("model.name", "") + (k.has("model.flavor") ? "-" + k.text("model.flavor", "") : "");
  else if (k.has("config"))
    id = k.text("config", "");
  std::transform(id.begin(), id.end(), id.begin(), [](char c) {
    return c == '_' ? '-' : static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  });
  if (id == "deepseek-v3-671b")
    id = "deepseek-v3";
  const std::vector<std::string> ids = workload::catalog_ids();
  return std::find(ids.begin(), ids.end(), id) != ids.end() ? id : "";
}

} // namespace

FrameworkRun read_torchtitan_config(const std::string& text, const std::string& origin,
                                    const workload::ModelSpec* model) {
  const TitanKeys k(text, origin);
  FrameworkRun r;
  r.framework = Framework::torchtitan;
  r.text = text;
  r.model_id = titan_model_id(k);
  if (model == nullptr) {
    if (r.model_id.empty())
      throw InputError(fmt::format("{}: the model it names is not in mop's catalog; name it "
                                   "with --model.",
                                   origin));
    r.model = workload::load_model(r.model_id);
  }
  const workload::ModelSpec& m = model != nullptr ? *model : *r.model;
  const int layers = static_cast<int>(m.num_layers());
  if (k.has("nnodes") && k.has("nproc_per_node")) {
    r.nodes = static_cast<int>(k.integer("nnodes", 1, limits::max_gpus, 1));
    r.gpus_per_node = static_cast<int>(k.integer("nproc_per_node", 1, 64, 8));
  }
  const int world = r.nodes * r.gpus_per_node;
  Plan& p = r.plan;
  p.family = "fsdp2";
  p.world = 0;
  const std::string par = "parallelism.";
  auto degree = [&](const std::string& key, int fallback) {
    return static_cast<int>(k.integer(par + key, 1, limits::max_gpus, fallback));
  };
  const int tp = degree("tensor_parallel_degree", 1);
  p.attention.tp = p.dense.tp = p.embed.tp = tp;
  p.attention.sp = k.flag(par + "enable_sequence_parallel", true);
  p.attention.cp = degree("context_parallel_degree", 1);
  p.attention.cp_kind = CpKind::ring;
  // mop's plans pass K/V a hop a step (PyTorch's all-to-all rotater, docs/HARDWARE.md
  // "PyTorch's ring").
  if (p.attention.cp > 1 &&
      k.text(par + "context_parallel_rotate_method", "allgather") == "allgather")
    r.not_represented.emplace_back("the all-gather exchange of keys and values "
                                   "(context_parallel_rotate_method allgather) is priced as the "
                                   "all-to-all rotation, a block a step");
  p.pp = degree("pipeline_parallel_degree", 1);
  const std::string schedule = k.text(par + "pipeline_parallel_schedule", "1F1B");
  if (p.pp > 1) {
    if (schedule == "1F1B")
      p.schedule = PipelineSchedule::one_f_one_b;
    else if (schedule == "GPipe")
      p.schedule = PipelineSchedule::gpipe;
    else if (schedule == "Interleaved1F1B")
      p.schedule = PipelineSchedule::interleaved_1f1b;
    else if (schedule == "ZBVZeroBubble" || schedule == "InterleavedZeroBubble" ||
             schedule == "DualPipeV") {
      p.schedule = PipelineSchedule::zero_bubble;
      r.not_represented.push_back(fmt::format(
          "the {} schedule is priced as zero-bubble 1F1B (ZB-H1) on one stage per rank", schedule));
    } else
      throw InputError(fmt::format("{}: pipeline_parallel_schedule {} is not one mop reads "
                                   "(1F1B, GPipe, Interleaved1F1B, ZBVZeroBubble, "
                                   "InterleavedZeroBubble, DualPipeV).",
                                   origin, quote_for_message(schedule)));
    if (p.schedule == PipelineSchedule::interleaved_1f1b) {
      const auto per = k.integer(par + "pipeline_parallel_layers_per_stage", 1, layers, 0);
      if (per > 0 && layers % (per * p.pp) != 0)
        throw InputError(fmt::format("{}: pipeline_parallel_layers_per_stage {} does not split "
                                     "{} layers over {} ranks.",
                                     origin, per, layers, p.pp));
      p.vp = per > 0 ? static_cast<int>(layers / (per * p.pp)) : 2;
    }
    // torchtitan takes a layer off the first and the last stage by default (they hold the
    // embedding and the head).
    const int first_less = static_cast<int>(
        k.integer(par + "pipeline_parallel_first_stage_less_layers", 0, layers, 1));
    const int last_less =
        static_cast<int>(k.integer(par + "pipeline_parallel_last_stage_less_layers", 0, layers, 1));
    const int stages = p.pp * p.vp;
    const int effective = layers + first_less + last_less;
    if (p.vp == 1 && effective % stages == 0 &&
        effective / stages > std::max(first_less, last_less)) {
      std::vector<int> split(static_cast<std::size_t>(p.pp), effective / stages);
      split.front() -= first_less;
      split.back() -= last_less;
      p.stage_layers = normal_split(split, p.pp, layers);
    } else if (first_less + last_less > 0)
      r.not_represented.emplace_back(
          "the first and last stages' fewer layers are priced as an even split");
  }
  p.moe.ep = degree("expert_parallel_degree", 1);
  p.moe.etp = degree("expert_tensor_parallel_degree", 1);
  if (!m.is_moe())
    p.moe.ep = p.moe.etp = 1;
  // Data parallelism: FSDP over the shard dimension (with CP's ranks), replicated over the
  // replicate dimension (HSDP, or DDP with no shard dimension).
  const int replicate = degree("data_parallel_replicate_degree", 1);
  int shard =
      static_cast<int>(k.integer(par + "data_parallel_shard_degree", -1, limits::max_gpus, -1));
  if (shard == 0)
    throw InputError(
        fmt::format("{}: data_parallel_shard_degree is -1 (the rest) or positive.", origin));
  int zero = 3;
  if (k.text(par + "fsdp_reshard_after_forward", "default") == "never")
    zero = 2;
  if (replicate > 1) {
    if (shard == -1) {
      if (world == 0)
        throw InputError(fmt::format("{}: with data_parallel_replicate_degree, give "
                                     "data_parallel_shard_degree or the torchrun line.",
                                     origin));
      shard = world / (replicate * p.attention.cp * tp * p.pp);
    }
    if (shard * p.attention.cp == 1)
      zero = 0; // DDP (with CP, FSDP shards over the CP ranks even at a shard degree of 1)
    else
      for (int kind = 0; kind < kNumLayerKinds; ++kind)
        p.state[kind].shard_group = kind == static_cast<int>(LayerKind::moe)
                                        ? shard * p.attention.cp * tp / p.moe.ep
                                        : shard * p.attention.cp;
  }
  for (StatePolicy& st : p.state)
    st.zero = zero;
  if (k.flag("training.enable_cpu_offload", false)) {
    p.params = p.grads = p.optimizer = Placement::host;
    p.optimizer_on_host = true;
    p.torch_host_optimizer = true;
  }
  const std::string ac = k.text("activation_checkpoint.mode", "selective");
  const Recompute rc = ac == "full"   ? Recompute::full
                       : ac == "none" ? Recompute::none
                                      : Recompute::selective;
  if (ac == "memory_budget")
    r.not_represented.emplace_back("the memory-budget activation checkpointing is priced as "
                                   "selective recompute");
  for (Recompute& x : p.recompute)
    x = rc;
  // The batch: in sequences (local_batch_size per rank, pipeline micro-batches) or in tokens.
  r.seq = k.integer("training.seq_len", 1, limits::max_seq_tokens,
                    k.integer("training.max_context_length", 1, limits::max_seq_tokens, 0));
  const std::int64_t local =
      k.integer("training.local_batch_size", 1, limits::max_batch_sequences, 0);
  p.micro_batch = static_cast<int>(p.pp > 1 ? k.integer(par + "pipeline_parallel_microbatch_size",
                                                        1, limits::max_batch_sequences, 1)
                                            : std::max<std::int64_t>(local, 1));
  const std::int64_t global =
      k.integer("training.global_batch_size", -1, limits::max_batch_sequences, -1);
  if (global > 0)
    r.global_batch = static_cast<int>(global);
  if (r.seq > 0) {
    const std::int64_t micro_tokens =
        k.integer("training.num_tokens_per_microbatch_per_dp_rank", 1, limits::max_seq_tokens, 0);
    if (micro_tokens > 0)
      p.micro_batch = static_cast<int>(std::max<std::int64_t>(1, micro_tokens / r.seq));
    const std::int64_t step_tokens =
        k.integer("training.num_tokens_per_train_step", 1, std::int64_t{1} << 50, 0);
    if (step_tokens > 0)
      r.global_batch = static_cast<int>(
          std::min<std::int64_t>(step_tokens / r.seq, limits::max_batch_sequences));
  }
  p.global_batch = r.global_batch;
  const std::string converters = k.text("model.converters", "");
  if (k.any_under("quantize.linear.float8") || converters.find("float8") != std::string::npos)
    r.precision = "fp8";
  if (k.any_under("quantize.linear.mx") || converters.find("mx") != std::string::npos)
    r.precision = "mxfp8";
  r.compiled = k.flag("compile.enable", false);
  return r;
}

// ---- DeepSpeed ------------------------------------------------------------------------------

namespace {

// Lines starting with '#' are comments (mop writes the Python-side degrees so).
std::string strip_comment_lines(const std::string& text) {
  std::string json;
  std::size_t at = 0;
  while (at < text.size()) {
    const std::size_t end = std::min(text.find('\n', at), text.size());
    const std::string line = text.substr(at, end - at);
    const std::size_t first = line.find_first_not_of(" \t");
    if (first == std::string::npos || line[first] != '#')
      json += line + "\n";
    at = end + 1;
  }
  return json;
}

} // namespace

FrameworkRun read_deepspeed_config(const std::string& text, const std::string& origin) {
  const std::string json = strip_comment_lines(text);
  Json j;
  try {
    j = Json::parse(json);
  } catch (const Json::parse_error&) {
    throw InputError(fmt::format("{}: not valid JSON.", origin));
  }
  if (!j.is_object())
    throw InputError(fmt::format("{}: a DeepSpeed config is a JSON object.", origin));
  const JsonFields f(j, origin);
  FrameworkRun r;
  r.framework = Framework::deepspeed;
  r.text = text;
  Plan& p = r.plan;
  p.family = "ulysses-zero3";
  p.world = 0;
  p.micro_batch = static_cast<int>(
      f.int_in_or("train_micro_batch_size_per_gpu", 1, limits::max_batch_sequences, 1));
  r.global_batch =
      static_cast<int>(f.int_in_or("train_batch_size", 1, limits::max_batch_sequences, 0));
  p.global_batch = r.global_batch;
  int zero = 0;
  if (f.has("zero_optimization")) {
    const JsonFields z(f.at("zero_optimization"), origin + " zero_optimization");
    zero = static_cast<int>(z.int_in_or("stage", 0, 3, 0));
    auto on_cpu = [&](const char* key) {
      if (!z.has(key))
        return false;
      const JsonFields o(z.at(key), origin + " zero_optimization." + key);
      const std::string device = o.string_or("device", "none");
      if (device == "nvme")
        r.not_represented.push_back(fmt::format("NVMe offload ({}) is priced as host memory", key));
      return device == "cpu" || device == "nvme";
    };
    if (on_cpu("offload_optimizer")) {
      p.optimizer = Placement::host;
      p.optimizer_on_host = true;
      p.torch_host_optimizer = false; // DeepSpeedCPUAdam
    }
    if (on_cpu("offload_param"))
      p.params = Placement::host;
    if (z.has("zero_hpz_partition_size") || z.has("mics_shard_size"))
      r.not_represented.emplace_back("ZeRO++ hpZ and MiCS groups are priced as one ZeRO group");
  }
  for (StatePolicy& s : p.state)
    s.zero = zero;
  if (f.has("sequence_parallel_size")) {
    p.attention.cp =
        static_cast<int>(f.int_in_or("sequence_parallel_size", 1, limits::max_gpus, 1));
    p.attention.cp_kind = CpKind::ulysses;
  }
  if (f.has("tensor_parallel")) {
    const JsonFields t(f.at("tensor_parallel"), origin + " tensor_parallel");
    p.attention.tp = p.dense.tp = p.embed.tp =
        static_cast<int>(t.int_in_or("autotp_size", 1, limits::max_gpus, 1));
    p.attention.sp = false; // AutoTP has no sequence parallelism
  }
  if (f.has("activation_checkpointing")) {
    const JsonFields ac(f.at("activation_checkpointing"), origin + " activation_checkpointing");
    for (Recompute& x : p.recompute)
      x = Recompute::full;
    if (ac.bool_or("cpu_checkpointing", false))
      p.activation_offload = 1;
  }
  if (f.has("fp16") && f.at("fp16").is_object() && f.at("fp16").value("enabled", false))
    r.not_represented.emplace_back("FP16 training is priced as BF16");
  return r;
}

// ---- Writing --------------------------------------------------------------------------------

namespace {

bool same_for_all_kinds(const Plan& p) {
  for (int k = 1; k < kNumLayerKinds; ++k)
    if (p.state[k].zero != p.state[0].zero || p.state[k].shard_group != p.state[0].shard_group ||
        p.recompute[k] != p.recompute[0])
      return false;
  return true;
}

// Reasons a plan is not one the framework runs, for the parts both frameworks share.
void common_limits(const Plan& p, const char* fw, std::vector<std::string>& why) {
  if (!same_for_all_kinds(p))
    why.push_back(fmt::format("{} takes one ZeRO stage and one recompute policy for every layer "
                              "kind; the plan sets them per kind",
                              fw));
  if (p.state[0].shard_group != 0)
    why.push_back(fmt::format("HSDP groups (ZeRO inside groups of {} ranks) are not expressed "
                              "for {}",
                              p.state[0].shard_group, fw));
  if (p.chunked_loss)
    why.push_back(fmt::format("{} has no chunked loss", fw));
  if (p.optimizer_on_host && p.overlap != OptimizerOverlap::after_backward)
    why.push_back(fmt::format(
        "{} steps a host optimizer after the backward; the plan streams "
        "it into the {}",
        fw, p.overlap == OptimizerOverlap::stream_forward ? "next forward" : "backward"));
  if (p.optimizer != (p.optimizer_on_host ? Placement::host : Placement::hbm))
    why.push_back(fmt::format("{} steps the optimizer where its state lives", fw));
  if (p.grads == Placement::host)
    why.push_back(fmt::format("{} keeps gradients on the GPU", fw));
  // moe.imbalance is the buffer reserve mop assumes for uneven routing (docs/ROUTING.md), not a
  // setting: the frameworks size their dropless buffers from the routing at run time.
  if (p.moe.rebalance == Rebalance::least_loaded)
    why.push_back(fmt::format("{} has no least-loaded expert rebalancing (LLEP)", fw));
}

std::string model_arguments(const workload::ModelSpec& m, std::vector<std::string>& notes) {
  if (m.attention.kind != workload::AttentionKind::gqa) {
    notes.emplace_back("# model arguments: multi-latent attention (--multi-latent-attention and "
                       "its ranks) as in your model's recipe");
    return "";
  }
  std::string s;
  auto arg = [&](const std::string& text) { s += "  " + text + " \\\n"; };
  arg(fmt::format("--num-layers {} --hidden-size {} --ffn-hidden-size {}", m.num_layers(),
                  m.hidden_size, m.dense_mlp.intermediate_size));
  arg(fmt::format("--num-attention-heads {} --group-query-attention --num-query-groups {} "
                  "--kv-channels {}",
                  m.attention.num_heads, m.attention.num_kv_heads, m.attention.head_dim));
  arg(fmt::format("--vocab-size {}{}", m.vocab_size,
                  m.tied_embeddings ? "" : " --untie-embeddings-and-output-weights"));
  if (m.max_position_embeddings > 0)
    arg(fmt::format("--max-position-embeddings {}", m.max_position_embeddings));
  arg(fmt::format("--position-embedding-type {}",
                  m.learned_positions > 0 ? "learned_absolute" : "rope"));
  arg(fmt::format("--rotary-base {:g} --normalization {} --norm-epsilon {:g}", m.rope_theta,
                  m.norm_bias ? "LayerNorm" : "RMSNorm", m.norm_eps));
  arg(fmt::format("--swiglu{}{}", m.attention.out_bias ? "" : " --disable-bias-linear",
                  m.attention.qk_norm ? " --qk-layernorm" : ""));
  if (!m.dense_mlp.gated)
    notes.emplace_back("# model: its MLPs are not gated; Megatron-LM's --swiglu above is not "
                       "that model");
  if (m.is_moe()) {
    std::string freq;
    int run = 0;
    bool value = m.layers[0].mlp == workload::MlpKind::moe;
    auto flush = [&] {
      freq += fmt::format("{}[{}]*{}", freq.empty() ? "" : "+", value ? 1 : 0, run);
    };
    for (const workload::LayerSpec& l : m.layers) {
      const bool moe = l.mlp == workload::MlpKind::moe;
      if (moe != value) {
        flush();
        value = moe;
        run = 0;
      }
      ++run;
    }
    flush();
    arg(fmt::format("--num-experts {} --moe-router-topk {} --moe-ffn-hidden-size {}",
                    m.moe.num_routed_experts, m.moe.experts_per_token,
                    m.moe.expert_intermediate_size));
    arg(fmt::format("--moe-layer-freq '({})'", freq));
    if (m.moe.num_shared_experts > 0)
      arg(fmt::format("--moe-shared-expert-intermediate-size {}",
                      m.moe.num_shared_experts * m.moe.shared_intermediate_size));
  }
  return s;
}

// The arguments the plan sets (written from the plan, dropped from a user's base arguments).
bool megatron_plan_key(const std::string& k) {
  static const std::set<std::string> keys = {"tensor-model-parallel-size",
                                             "sequence-parallel",
                                             "context-parallel-size",
                                             "cp-comm-type",
                                             "hierarchical-context-parallel-sizes",
                                             "pipeline-model-parallel-size",
                                             "num-virtual-stages-per-pipeline-rank",
                                             "num-layers-per-virtual-pipeline-stage",
                                             "decoder-first-pipeline-num-layers",
                                             "decoder-last-pipeline-num-layers",
                                             "expert-model-parallel-size",
                                             "expert-tensor-parallel-size",
                                             "moe-expert-capacity-factor",
                                             "use-distributed-optimizer",
                                             "use-megatron-fsdp",
                                             "data-parallel-sharding-strategy",
                                             "use-torch-fsdp2",
                                             "micro-batch-size",
                                             "global-batch-size",
                                             "seq-length",
                                             "recompute-granularity",
                                             "recompute-activations",
                                             "recompute-method",
                                             "recompute-num-layers",
                                             "optimizer-cpu-offload",
                                             "optimizer-offload-fraction",
                                             "cpu-offloading",
                                             "cpu-offloading-num-layers",
                                             "bf16",
                                             "fp16",
                                             "fp8-format",
                                             "fp8-recipe",
                                             "nnodes",
                                             "nproc-per-node"};
  return keys.contains(k);
}

// A user's Megatron arguments but the plan's, in their order, as `--key value...` lines.
std::string other_megatron_args(const std::string& base) {
  std::string out, key_line;
  bool keep = false;
  for (const std::string& w : shell_words(base, "base")) {
    if (w.starts_with("--") && w.size() > 2) {
      if (keep)
        out += "  " + key_line + " \\\n";
      std::string k =
          w.substr(2, w.find('=') == std::string::npos ? std::string::npos : w.find('=') - 2);
      std::replace(k.begin(), k.end(), '_', '-');
      keep = !megatron_plan_key(k);
      key_line = w;
    } else if (w.ends_with(".py")) {
      if (keep)
        out += "  " + key_line + " \\\n";
      keep = false;
    } else if (keep) {
      const bool plain = !w.empty() && w.find_first_of(" '\"()[]*;&|<>") == std::string::npos;
      key_line += " " + (plain ? w : "'" + w + "'");
    }
  }
  if (keep)
    out += "  " + key_line + " \\\n";
  return out;
}

FrameworkConfig write_megatron(const Plan& p, const workload::ModelSpec& m, std::int64_t seq,
                               int gpus_per_node, const std::string& precision,
                               const std::string* base) {
  FrameworkConfig c;
  std::vector<std::string>& why = c.cannot_express;
  common_limits(p, "Megatron-LM", why);
  const int layers = static_cast<int>(m.num_layers());
  if (p.dense.tp != p.attention.tp || p.embed.tp != p.attention.tp)
    why.emplace_back("Megatron-LM takes one TP for attention, dense MLPs and the vocabulary");
  if (p.params == Placement::host)
    why.emplace_back("Megatron-LM keeps parameters on the GPU");
  if (p.optimizer_on_host && !p.torch_host_optimizer)
    why.emplace_back("Megatron-LM's optimizer offload steps with torch's AdamW on the CPU, not a "
                     "vectorised CPU-Adam");
  if (p.activation_offload > 0)
    why.emplace_back("activation offload is not expressed for Megatron-LM (its layer-wise "
                     "--cpu-offloading is another scheme)");
  if (p.schedule == PipelineSchedule::gpipe || p.schedule == PipelineSchedule::zero_bubble)
    why.push_back(
        fmt::format("Megatron-LM runs 1F1B or interleaved 1F1B, not {}", name(p.schedule)));
  if (p.state[0].zero >= 2 && (p.pp > 1 || p.moe.ep > 1))
    why.emplace_back("Megatron-LM's FSDP (ZeRO-2/3) is not combined with pipeline or expert "
                     "parallelism here");
  // The stage split: Megatron takes the first and the last stage's layers and splits the rest
  // evenly, or an even split.
  std::string split_args;
  if (p.pp > 1 && p.vp == 1) {
    std::vector<int> v;
    for (int s = 0; s < p.pp; ++s)
      v.push_back(p.layers_in_stage(s, layers));
    const bool inner_even =
        p.pp < 3 || std::all_of(v.begin() + 1, v.end() - 1, [&](int n) { return n == v[1]; });
    const int inner = p.pp >= 3 ? v[1] : -1;
    if (!inner_even)
      why.push_back(fmt::format("Megatron-LM splits the layers after the first and the last "
                                "stage evenly; the plan's split is {}",
                                fmt::join(v, ",")));
    else if (p.pp == 2 ? v[0] != v[1] : v.front() != inner || v.back() != inner) {
      if (p.pp == 2 || v.front() != inner)
        split_args += fmt::format(" --decoder-first-pipeline-num-layers {}", v.front());
      if (p.pp >= 3 && v.back() != inner)
        split_args += fmt::format(" --decoder-last-pipeline-num-layers {}", v.back());
    }
  } else if (p.vp > 1 && layers % (p.pp * p.vp) != 0)
    why.push_back(fmt::format("Megatron-LM's virtual stages need the {} layers in {} equal "
                              "chunks",
                              layers, p.pp * p.vp));
  if (!why.empty())
    return c;
  std::vector<std::string> notes;
  const std::string model_args =
      base != nullptr ? other_megatron_args(*base) : model_arguments(m, notes);
  std::string s;
  s += fmt::format("# mop plan: {}\n", summary(p));
  if (base == nullptr)
    s += "# mock data and a short schedule to start from: put your data, tokenizer and "
         "optimizer arguments in their place\n";
  for (const std::string& n : notes)
    s += n + "\n";
  const int nodes = std::max(1, p.world / gpus_per_node);
  s += fmt::format("torchrun --nnodes {} --nproc-per-node {} pretrain_gpt.py \\\n", nodes,
                   std::min(p.world, gpus_per_node));
  auto arg = [&](const std::string& text) { s += "  " + text + " \\\n"; };
  arg(fmt::format("--tensor-model-parallel-size {}{}", p.attention.tp,
                  p.attention.tp > 1 && p.attention.sp ? " --sequence-parallel" : ""));
  if (p.attention.cp > 1) {
    const char* kind = p.attention.cp_kind == CpKind::ring      ? "p2p"
                       : p.attention.cp_kind == CpKind::ulysses ? "a2a"
                                                                : "a2a+p2p";
    std::string cp =
        fmt::format("--context-parallel-size {} --cp-comm-type {}", p.attention.cp, kind);
    if (p.attention.cp_kind == CpKind::hybrid) {
      const CpSplit split = cp_split(p, gpus_per_node);
      cp += fmt::format(" --hierarchical-context-parallel-sizes {} {}", split.ulysses, split.ring);
    }
    arg(cp);
  }
  if (p.pp > 1)
    arg(fmt::format("--pipeline-model-parallel-size {}{}{}", p.pp,
                    p.vp > 1 ? fmt::format(" --num-virtual-stages-per-pipeline-rank {}", p.vp) : "",
                    split_args));
  if (m.is_moe()) {
    std::string moe = fmt::format(
        "--expert-model-parallel-size {} --expert-tensor-parallel-size {}", p.moe.ep, p.moe.etp);
    if (p.moe.capacity_factor > 0)
      moe += fmt::format(" --moe-expert-capacity-factor {:g}", p.moe.capacity_factor);
    arg(moe);
  }
  const int zero = p.state[0].zero;
  if (zero == 1)
    arg("--use-distributed-optimizer");
  else if (zero >= 2)
    arg(fmt::format("--use-megatron-fsdp --data-parallel-sharding-strategy {}",
                    zero == 2 ? "optim_grads" : "optim_grads_params"));
  arg(fmt::format("--micro-batch-size {} --global-batch-size {} --seq-length {}", p.micro_batch,
                  p.global_batch, seq));
  if (p.recompute[0] != Recompute::none)
    arg(fmt::format("--recompute-granularity {}", name(p.recompute[0])));
  if (p.optimizer_on_host)
    arg("--optimizer-cpu-offload --optimizer-offload-fraction 1.0");
  if (precision == "fp8")
    arg("--bf16 --fp8-format hybrid --fp8-recipe tensorwise");
  else if (precision == "mxfp8")
    arg("--bf16 --fp8-format e4m3 --fp8-recipe mxfp8");
  else
    arg("--bf16");
  s += model_args;
  if (base == nullptr) {
    s += "  --mock-data --tokenizer-type NullTokenizer \\\n";
    s += "  --lr 1e-4 --train-iters 100 \\\n";
  }
  // The last line ends the command: drop its continuation.
  if (s.ends_with(" \\\n"))
    s.replace(s.size() - 3, 3, "\n");
  c.text = std::move(s);
  return c;
}

FrameworkConfig write_torchtitan(const Plan& p, const workload::ModelSpec& m, std::int64_t seq,
                                 int gpus_per_node, const std::string& precision) {
  FrameworkConfig c;
  std::vector<std::string>& why = c.cannot_express;
  if (p.chunked_loss)
    why.emplace_back("a chunked loss is set in torchtitan's model registry, not its job config");
  for (int k = 1; k < kNumLayerKinds; ++k)
    if (p.state[k].zero != p.state[0].zero || p.recompute[k] != p.recompute[0]) {
      why.emplace_back("torchtitan takes one FSDP setting and one activation checkpointing mode "
                       "for every layer kind; the plan sets them per kind");
      break;
    }
  if (p.state[0].zero == 1)
    why.emplace_back("torchtitan has no ZeRO-1 (FSDP2 shards parameters: ZeRO-3, or ZeRO-2 with "
                     "reshard_after_forward never)");
  if (p.dense.tp != p.attention.tp || p.embed.tp != p.attention.tp)
    why.emplace_back("torchtitan takes one TP for every layer");
  if (p.attention.cp > 1 && p.attention.cp_kind != CpKind::ring)
    why.emplace_back("torchtitan's context parallelism is ring attention, not Ulysses");
  if (p.moe.etp > 1)
    why.emplace_back("expert tensor parallelism is not expressed for torchtitan");
  if (p.activation_offload > 0)
    why.emplace_back("torchtitan does not offload activations");
  const bool all_host = p.params == Placement::host && p.grads == Placement::host &&
                        p.optimizer == Placement::host && p.optimizer_on_host &&
                        p.torch_host_optimizer && p.overlap == OptimizerOverlap::after_backward;
  const bool none_host = p.params == Placement::hbm && p.grads == Placement::hbm &&
                         p.optimizer == Placement::hbm && !p.optimizer_on_host;
  if (!all_host && !none_host)
    why.emplace_back("torchtitan's CPU offload moves parameters, gradients and optimizer state "
                     "together, stepped by torch's AdamW after the backward");
  if (p.schedule == PipelineSchedule::zero_bubble && p.pp > 1)
    why.emplace_back("zero-bubble on one stage per rank is not a torchtitan schedule");
  const int layers = static_cast<int>(m.num_layers());
  if (p.pp > 1 && (!p.stage_layers.empty() || layers % (p.pp * p.vp) != 0))
    why.emplace_back("torchtitan's stage split is expressed here only when it is even");
  // HSDP: the shard dimension takes the attention's shard group with CP's ranks inside it;
  // the experts then shard over shard x cp x tp / ep ranks (torchtitan's efsdp).
  const int att_ranks = p.attention.cp * p.attention.dp;
  int replicate = 1, shard = -1;
  if (p.state[0].shard_group > 0) {
    const int g = p.state[0].shard_group;
    if (g % p.attention.cp != 0 || att_ranks % g != 0)
      why.push_back(fmt::format("an HSDP group of {} ranks does not hold whole CP groups", g));
    else {
      shard = g / p.attention.cp;
      replicate = att_ranks / g;
    }
  } else if (p.state[0].zero == 0) {
    if (p.attention.cp > 1)
      why.emplace_back("torchtitan shards over the CP ranks: no replicated (ZeRO-0) plan with CP");
    replicate = att_ranks;
    shard = 1;
  }
  if (m.is_moe() && p.state[0].zero != 0) {
    const int shard_ranks = (shard > 0 ? shard : att_ranks / (replicate * p.attention.cp)) *
                            p.attention.cp * p.attention.tp;
    const int efsdp = shard_ranks / p.moe.ep;
    const int moe = static_cast<int>(LayerKind::moe);
    const int expected = efsdp >= p.moe.edp ? 0 : efsdp;
    if (p.state[moe].shard_group != expected)
      why.push_back(
          fmt::format("torchtitan shards the experts over {} ranks, the plan over {}",
                      expected == 0 ? p.moe.edp : expected,
                      p.state[moe].shard_group == 0 ? p.moe.edp : p.state[moe].shard_group));
  }
  if (!why.empty())
    return c;
  std::string module = m.name.substr(0, m.name.find('-'));
  std::string config = m.name;
  std::replace(config.begin(), config.end(), '-', '_');
  std::string s;
  s += fmt::format("# mop plan: {}\n", summary(p));
  s += "# the module and config function of your model: torchtitan's own where the names match\n";
  s += fmt::format("torchrun --nnodes {} --nproc-per-node {} -m torchtitan.train \\\n",
                   std::max(1, p.world / gpus_per_node), std::min(p.world, gpus_per_node));
  auto arg = [&](const std::string& text) { s += "  " + text + " \\\n"; };
  arg(fmt::format("--module {} --config {}", module, config));
  arg(fmt::format("--parallelism.data_parallel_replicate_degree {} "
                  "--parallelism.data_parallel_shard_degree {}",
                  replicate, shard));
  if (p.state[0].zero == 2)
    arg("--parallelism.fsdp_reshard_after_forward never");
  arg(fmt::format("--parallelism.tensor_parallel_degree {}{}", p.attention.tp,
                  p.attention.tp > 1 && !p.attention.sp
                      ? " --parallelism.enable_sequence_parallel false"
                      : ""));
  if (p.attention.cp > 1)
    arg(fmt::format("--parallelism.context_parallel_degree {} "
                    "--parallelism.context_parallel_rotate_method alltoall",
                    p.attention.cp));
  if (p.pp > 1) {
    const char* sched = p.schedule == PipelineSchedule::gpipe              ? "GPipe"
                        : p.schedule == PipelineSchedule::interleaved_1f1b ? "Interleaved1F1B"
                                                                           : "1F1B";
    arg(fmt::format("--parallelism.pipeline_parallel_degree {} "
                    "--parallelism.pipeline_parallel_schedule {}",
                    p.pp, sched));
    arg(fmt::format("--parallelism.pipeline_parallel_layers_per_stage {} "
                    "--parallelism.pipeline_parallel_first_stage_less_layers 0 "
                    "--parallelism.pipeline_parallel_last_stage_less_layers 0 "
                    "--parallelism.pipeline_parallel_microbatch_size {}",
                    layers / (p.pp * p.vp), p.micro_batch));
  }
  if (m.is_moe())
    arg(fmt::format("--parallelism.expert_parallel_degree {}", p.moe.ep));
  const std::int64_t local =
      p.pp > 1 ? std::int64_t{p.global_batch} / p.attention.dp : std::int64_t{p.micro_batch};
  arg(fmt::format("--training.local_batch_size {} --training.global_batch_size {} "
                  "--training.seq_len {}",
                  local, p.global_batch, seq));
  arg(fmt::format("--activation_checkpoint.mode {}", name(p.recompute[0])));
  if (all_host)
    arg("--training.enable_cpu_offload");
  if (precision == "fp8")
    arg("--model.converters float8");
  else if (precision == "mxfp8")
    arg("--model.converters mx");
  if (s.ends_with(" \\\n"))
    s.replace(s.size() - 3, 3, "\n");
  c.text = std::move(s);
  return c;
}

FrameworkConfig write_deepspeed(const Plan& p, const workload::ModelSpec& m, int gpus_per_node,
                                const std::string& precision, const std::string* base) {
  FrameworkConfig c;
  std::vector<std::string>& why = c.cannot_express;
  common_limits(p, "DeepSpeed", why);
  if (p.pp > 1)
    why.emplace_back("pipeline parallelism with ZeRO-2/3 or Ulysses is not expressed for "
                     "DeepSpeed");
  if (p.attention.cp > 1 && p.attention.cp_kind != CpKind::ulysses)
    why.emplace_back("DeepSpeed's sequence parallelism is Ulysses, not ring attention");
  if (p.attention.tp > 1 && p.attention.sp)
    why.emplace_back("DeepSpeed's AutoTP has no sequence parallelism");
  if (p.dense.tp != p.attention.tp || p.embed.tp != p.attention.tp)
    why.emplace_back("DeepSpeed's AutoTP takes one TP for every layer");
  if (p.optimizer_on_host && p.torch_host_optimizer)
    why.emplace_back("DeepSpeed steps an offloaded optimizer with DeepSpeedCPUAdam, not torch's");
  if (p.recompute[0] == Recompute::selective)
    why.emplace_back("DeepSpeed checkpoints whole layers (full recompute), not selectively");
  if (p.activation_offload > 0 && p.activation_offload < 1)
    why.emplace_back("DeepSpeed offloads every checkpoint or none");
  if (p.activation_offload > 0 && p.recompute[0] == Recompute::none)
    why.emplace_back("DeepSpeed offloads checkpoints, which need recompute");
  if (p.params == Placement::host && p.state[0].zero != 3)
    why.emplace_back("DeepSpeed offloads parameters under ZeRO-3 only");
  if (p.moe.etp > 1)
    why.emplace_back("DeepSpeed's MoE has no expert tensor parallelism");
  if (!why.empty())
    return c;
  // The user's other keys stay (optimizer, scheduler, gradient clipping, ...).
  Json j = Json::object();
  if (base != nullptr) {
    try {
      Json user = Json::parse(strip_comment_lines(*base));
      if (user.is_object())
        j = std::move(user);
    } catch (const Json::parse_error&) {
    }
  }
  for (const char* k :
       {"sequence_parallel_size", "tensor_parallel", "activation_checkpointing", "fp16"})
    j.erase(k);
  j["train_batch_size"] = p.global_batch;
  j["train_micro_batch_size_per_gpu"] = p.micro_batch;
  j["gradient_accumulation_steps"] = p.micro_batches();
  j["bf16"] = Json{{"enabled", true}};
  Json zero = j.contains("zero_optimization") && j["zero_optimization"].is_object()
                  ? j["zero_optimization"]
                  : Json::object();
  for (const char* k :
       {"offload_optimizer", "offload_param", "zero_hpz_partition_size", "mics_shard_size"})
    zero.erase(k);
  zero["stage"] = p.state[0].zero;
  if (p.optimizer_on_host)
    zero["offload_optimizer"] = Json{{"device", "cpu"}, {"pin_memory", true}};
  if (p.params == Placement::host)
    zero["offload_param"] = Json{{"device", "cpu"}, {"pin_memory", true}};
  j["zero_optimization"] = zero;
  if (p.attention.cp > 1)
    j["sequence_parallel_size"] = p.attention.cp;
  if (p.attention.tp > 1)
    j["tensor_parallel"] = Json{{"autotp_size", p.attention.tp}};
  if (p.recompute[0] == Recompute::full)
    j["activation_checkpointing"] =
        Json{{"partition_activations", false}, {"cpu_checkpointing", p.activation_offload > 0}};
  std::string s = j.dump(2) + "\n";
  s += fmt::format("# mop plan: {}\n", summary(p));
  s += fmt::format("# world: {} ranks (deepspeed --num_nodes {} --num_gpus {})\n", p.world,
                   std::max(1, p.world / gpus_per_node), std::min(p.world, gpus_per_node));
  if (m.is_moe())
    s += fmt::format("# Python side: deepspeed.moe.layer.MoE(..., ep_size={}) in the model; mop "
                     "--from deepspeed:FILE --ep {}\n",
                     p.moe.ep, p.moe.ep);
  if (p.recompute[0] == Recompute::full)
    s += "# Python side: deepspeed.checkpointing.checkpoint around each decoder layer\n";
  if (precision != "bf16")
    s += fmt::format("# precision: {} GEMMs through Transformer Engine's layers in the model\n",
                     precision);
  c.text = std::move(s);
  return c;
}

} // namespace

FrameworkConfig write_framework_config(Framework f, const Plan& plan,
                                       const workload::ModelSpec& model, std::int64_t seq,
                                       int gpus_per_node, const std::string& precision,
                                       const std::string* base) {
  switch (f) {
  case Framework::megatron:
    return write_megatron(plan, model, seq, gpus_per_node, precision, base);
  case Framework::torchtitan:
    return write_torchtitan(plan, model, seq, gpus_per_node, precision);
  case Framework::deepspeed:
    break;
  }
  return write_deepspeed(plan, model, gpus_per_node, precision, base);
}

} // namespace mop::strategy
