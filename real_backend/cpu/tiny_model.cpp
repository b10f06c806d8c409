#include "real_backend/cpu/tiny_model.hpp"

#include "common/error.hpp"
#include "common/file_io.hpp"
#include "common/limits.hpp"
#include "real_backend/cpu/hash.hpp"
#include "workload/params.hpp"

#include <cmath>
#include <fmt/format.h>
#include <iterator>
#include <numbers>

namespace mop::real {

namespace {

int to_int(std::int64_t v) {
  return static_cast<int>(v);
}

void refuse(const workload::ModelSpec& s, const std::string& feature) {
  throw InputError(fmt::format("model '{}' uses {}, which the CPU executor does not implement "
                               "(it runs GQA attention with RoPE, RMSNorm, SwiGLU dense and "
                               "routed-expert MLPs)",
                               s.name, feature));
}

} // namespace

TinyConfig tiny_config(const workload::ModelSpec& s) {
  const auto& a = s.attention;
  if (a.kind != workload::AttentionKind::gqa)
    refuse(s, "multi-head latent attention");
  if (a.qkv_bias || a.out_bias)
    refuse(s, "attention biases");
  if (a.sinks)
    refuse(s, "attention sinks");
  if (s.learned_positions > 0)
    refuse(s, "learned position embeddings");
  if (s.norm_bias)
    refuse(s, "LayerNorm with a bias");
  if (s.num_mtp_modules > 0)
    refuse(s, "multi-token prediction");
  if (!s.dense_mlp.gated || s.dense_mlp.bias)
    refuse(s, "a non-gated or biased dense MLP");
  if (s.is_moe()) {
    if (s.moe.num_shared_experts > 0)
      refuse(s, "shared experts");
    if (s.moe.expert_bias || s.moe.router_bias || s.moe.router_score_correction)
      refuse(s, "router or expert biases");
    if (!s.moe.gated)
      refuse(s, "non-gated experts");
  }
  TinyConfig c;
  c.name = s.name;
  c.hidden = to_int(s.hidden_size);
  c.vocab = to_int(s.vocab_size);
  c.heads = to_int(a.num_heads);
  c.kv_heads = to_int(a.num_kv_heads);
  c.head_dim = to_int(a.head_dim);
  c.qk_norm = a.qk_norm;
  c.norm_eps = s.norm_eps;
  c.rope_theta = s.rope_theta;
  c.tied_embeddings = s.tied_embeddings;
  c.dense_ffn = to_int(s.dense_mlp.intermediate_size);
  if (s.is_moe()) {
    c.experts = to_int(s.moe.num_routed_experts);
    c.top_k = to_int(s.moe.experts_per_token);
    c.expert_ffn = to_int(s.moe.expert_intermediate_size);
  }
  for (const auto& l : s.layers)
    c.layers.push_back({l.mlp == workload::MlpKind::moe, l.window});
  // Guard against running a production model on a CPU by mistake.
  const double params = static_cast<double>(workload::count_params(s).total.total());
  if (params > 5e8)
    throw InputError(fmt::format("model '{}' has {:.3g} parameters; the CPU executor is for "
                                 "small models (at most 5e8)",
                                 s.name, params));
  return c;
}

const char* role_name(ParamRole r) {
  switch (r) {
  case ParamRole::embedding:
    return "embedding";
  case ParamRole::attn_norm:
    return "attn.norm";
  case ParamRole::wq:
    return "attn.wq";
  case ParamRole::wk:
    return "attn.wk";
  case ParamRole::wv:
    return "attn.wv";
  case ParamRole::wo:
    return "attn.wo";
  case ParamRole::q_norm:
    return "attn.q_norm";
  case ParamRole::k_norm:
    return "attn.k_norm";
  case ParamRole::mlp_norm:
    return "mlp.norm";
  case ParamRole::dense_gate:
    return "mlp.gate";
  case ParamRole::dense_up:
    return "mlp.up";
  case ParamRole::dense_down:
    return "mlp.down";
  case ParamRole::router:
    return "moe.router";
  case ParamRole::expert_gate:
    return "moe.experts.gate";
  case ParamRole::expert_up:
    return "moe.experts.up";
  case ParamRole::expert_down:
    return "moe.experts.down";
  case ParamRole::final_norm:
    return "final_norm";
  case ParamRole::lm_head:
    return "lm_head";
  }
  return "?";
}

std::int64_t ParamInfo::numel() const {
  std::int64_t n = 1;
  for (auto d : shape)
    n *= d;
  return n;
}

std::vector<ParamInfo> param_layout(const TinyConfig& c) {
  std::vector<ParamInfo> out;
  auto add = [&](ParamRole role, int layer, std::vector<std::int64_t> shape) {
    std::string name = layer >= 0 ? fmt::format("L{}.{}", layer, role_name(role)) : role_name(role);
    out.push_back({name, role, layer, std::move(shape)});
  };
  const std::int64_t h = c.hidden, q = c.heads * c.head_dim, kv = c.kv_heads * c.head_dim;
  add(ParamRole::embedding, -1, {c.vocab, h});
  for (int l = 0; l < c.num_layers(); ++l) {
    add(ParamRole::attn_norm, l, {h});
    add(ParamRole::wq, l, {h, q});
    add(ParamRole::wk, l, {h, kv});
    add(ParamRole::wv, l, {h, kv});
    add(ParamRole::wo, l, {q, h});
    if (c.qk_norm) {
      add(ParamRole::q_norm, l, {c.head_dim});
      add(ParamRole::k_norm, l, {c.head_dim});
    }
    add(ParamRole::mlp_norm, l, {h});
    if (c.layers[l].moe) {
      add(ParamRole::router, l, {h, c.experts});
      add(ParamRole::expert_gate, l, {c.experts, h, c.expert_ffn});
      add(ParamRole::expert_up, l, {c.experts, h, c.expert_ffn});
      add(ParamRole::expert_down, l, {c.experts, c.expert_ffn, h});
    } else {
      add(ParamRole::dense_gate, l, {h, c.dense_ffn});
      add(ParamRole::dense_up, l, {h, c.dense_ffn});
      add(ParamRole::dense_down, l, {c.dense_ffn, h});
    }
  }
  add(ParamRole::final_norm, -1, {h});
  if (!c.tied_embeddings)
    add(ParamRole::lm_head, -1, {h, c.vocab});
  return out;
}

int find_param(const std::vector<ParamInfo>& layout, ParamRole role, int layer) {
  for (std::size_t i = 0; i < layout.size(); ++i)
    if (layout[i].role == role && layout[i].layer == layer)
      return static_cast<int>(i);
  return -1;
}

std::uint64_t mix64(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

double uniform01(std::uint64_t key) {
  return (static_cast<double>(mix64(key) >> 11) + 0.5) * 0x1.0p-53;
}

double standard_normal(std::uint64_t key) {
  const double u1 = uniform01(key * 2 + 1), u2 = uniform01(key * 2 + 2);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
}

template <class T>
std::vector<std::vector<T>> init_params(const TinyConfig& c, std::uint64_t seed) {
  const auto layout = param_layout(c);
  std::vector<std::vector<T>> out;
  for (std::size_t p = 0; p < layout.size(); ++p) {
    const auto& info = layout[p];
    std::vector<T> v(static_cast<std::size_t>(info.numel()));
    const bool norm = info.shape.size() == 1;
    const std::uint64_t base = mix64(seed ^ mix64(p + 1));
    for (std::size_t e = 0; e < v.size(); ++e)
      v[e] = norm ? T(1) : static_cast<T>(0.02 * standard_normal(base + e));
    out.push_back(std::move(v));
  }
  return out;
}
template std::vector<std::vector<float>> init_params<float>(const TinyConfig&, std::uint64_t);
template std::vector<std::vector<double>> init_params<double>(const TinyConfig&, std::uint64_t);

DataSource DataSource::synthetic(int vocab, std::uint64_t seed) {
  if (vocab < 2)
    throw InputError("the synthetic data needs a vocabulary of at least 2 tokens");
  DataSource d;
  d.vocab_ = vocab;
  d.seed_ = seed;
  return d;
}

DataSource DataSource::text_file(const std::string& path, int vocab, std::uint64_t seed) {
  if (vocab < 256)
    throw InputError(fmt::format("training on a text file reads bytes and needs a vocabulary of "
                                 "at least 256 tokens; the model has {}",
                                 vocab));
  const std::string bytes = read_input_file(path);
  const std::string name = quote_for_message(path, limits::max_quoted_chars);
  if (bytes.empty())
    throw InputError(fmt::format("the data file '{}' is empty; --data needs a text file", name));
  // Text never holds a NUL byte (the test git and grep use to tell binary files from text).
  if (const std::size_t nul = bytes.find('\0'); nul != std::string::npos)
    throw InputError(fmt::format("the data file '{}' is not text (a NUL byte at offset {}); "
                                 "--data trains on the bytes of a text file",
                                 name, nul));
  DataSource d;
  d.vocab_ = vocab;
  d.seed_ = seed;
  d.path_ = path;
  // Every byte is a token below 256 <= vocab, so no token is outside the vocabulary.
  d.text_.reserve(bytes.size());
  for (char b : bytes)
    d.text_.push_back(static_cast<unsigned char>(b));
  return d;
}

void DataSource::check_sequence_length(int seq_len) const {
  if (text_.empty())
    return;
  // One sequence of seq_len inputs needs seq_len + 1 tokens: the last input's label too.
  const std::size_t needed = static_cast<std::size_t>(seq_len) + 1;
  if (text_.size() < needed)
    throw InputError(fmt::format("the data file '{}' holds {} bytes; a sequence of {} tokens "
                                 "needs at least {}",
                                 quote_for_message(path_, limits::max_quoted_chars), text_.size(),
                                 seq_len, needed));
}

Batch DataSource::batch(std::int64_t step, int sequences, int seq_len) const {
  Batch b;
  b.sequences = sequences;
  b.seq_len = seq_len;
  const std::size_t n = static_cast<std::size_t>(sequences) * seq_len;
  b.tokens.resize(n);
  b.labels.resize(n);
  for (int s = 0; s < sequences; ++s) {
    const std::uint64_t key =
        mix64(seed_ ^ mix64(static_cast<std::uint64_t>(step) * 1000003ULL + s));
    std::vector<std::int32_t> seq(static_cast<std::size_t>(seq_len) + 1);
    if (text_.empty()) {
      // next = (5 * prev + 7) mod vocab, replaced by a uniform token 10% of the time
      seq[0] = static_cast<std::int32_t>(mix64(key) % static_cast<std::uint64_t>(vocab_));
      for (int t = 1; t <= seq_len; ++t) {
        const std::uint64_t r = mix64(key + static_cast<std::uint64_t>(t));
        seq[t] = (r % 10 == 0)
                     ? static_cast<std::int32_t>((r / 10) % static_cast<std::uint64_t>(vocab_))
                     : static_cast<std::int32_t>((5LL * seq[t - 1] + 7) % vocab_);
      }
    } else {
      const std::size_t len = static_cast<std::size_t>(seq_len) + 1;
      const std::size_t span = text_.size() > len ? text_.size() - len + 1 : 1;
      const std::size_t start = mix64(key) % span;
      for (std::size_t t = 0; t < len; ++t)
        seq[t] = text_[(start + t) % text_.size()];
    }
    for (int t = 0; t < seq_len; ++t) {
      b.tokens[static_cast<std::size_t>(s) * seq_len + t] = seq[t];
      b.labels[static_cast<std::size_t>(s) * seq_len + t] = seq[t + 1];
    }
  }
  return b;
}

std::uint64_t DataSource::fingerprint() const {
  Fnv1a64 h;
  const std::uint64_t head[3] = {text_.empty() ? 0ULL : 1ULL, seed_,
                                 static_cast<std::uint64_t>(vocab_)};
  h.add(head, sizeof head);
  h.add(text_.data(), text_.size() * sizeof(text_[0]));
  return h.value();
}

std::string DataSource::description() const {
  if (text_.empty())
    return fmt::format("the synthetic stream with seed {}", seed_);
  return fmt::format("a {}-byte text file with seed {}", text_.size(), seed_);
}

} // namespace mop::real
