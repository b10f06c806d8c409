#include "workload/routing.hpp"

#include "common/error.hpp"
#include "common/file_io.hpp"
#include "common/json_io.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <numeric>
#include <random>

namespace mop::workload {
namespace {

// Random numbers from std::mt19937_64 alone (its output is fixed by the standard; the standard
// library's distributions are not), so a seed gives the same loads everywhere.
class Random {
public:
  explicit Random(std::uint64_t seed) : engine_(seed) {}
  double uniform() { // [0, 1)
    return static_cast<double>(engine_() >> 11) * 0x1.0p-53;
  }
  double uniform_open() { // (0, 1)
    double u = 0;
    while (u == 0)
      u = uniform();
    return u;
  }
  std::size_t below(std::size_t n) { // uniform in [0, n), without modulo bias
    const std::uint64_t limit = ~std::uint64_t{0} - (~std::uint64_t{0} % n);
    std::uint64_t x = 0;
    do
      x = engine_();
    while (x >= limit);
    return static_cast<std::size_t>(x % n);
  }
  double normal() { // Box-Muller
    const double u = uniform_open(), v = uniform();
    return std::sqrt(-2 * std::log(u)) * std::cos(2 * 3.141592653589793 * v);
  }
  // Gamma(shape, 1): Marsaglia and Tsang (2000); shapes below 1 boosted by U^(1/shape).
  double gamma(double shape) {
    if (shape < 1)
      return gamma(shape + 1) * std::pow(uniform_open(), 1 / shape);
    const double d = shape - 1.0 / 3, c = 1 / std::sqrt(9 * d);
    for (;;) {
      double x = 0, v = 0;
      do {
        x = normal();
        v = 1 + c * x;
      } while (v <= 0);
      v = v * v * v;
      const double u = uniform_open();
      if (std::log(u) < 0.5 * x * x + d - d * v + d * std::log(v))
        return d * v;
    }
  }
  template <class T> void shuffle(std::vector<T>& v) { // Fisher-Yates
    for (std::size_t i = v.size(); i > 1; --i)
      std::swap(v[i - 1], v[below(i)]);
  }

private:
  std::mt19937_64 engine_;
};

[[noreturn]] void bad_option(std::string_view text, const std::string& why) {
  throw InputError(fmt::format("--routing '{}': {}", text.substr(0, 120), why));
}

double parse_number(std::string_view text, std::string_view whole) {
  const std::string s(text);
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  if (s.empty() || end != s.c_str() + s.size() || !std::isfinite(v))
    bad_option(whole, fmt::format("'{}' is not a number.", s.substr(0, 40)));
  return v;
}

// Normalises counts to loads (mean 1). `what` names the row in errors.
std::vector<double> loads_of(const std::vector<double>& counts, const std::string& what) {
  double sum = 0;
  for (double c : counts) {
    if (!(c >= 0) || !std::isfinite(c))
      throw InputError(fmt::format("{}: expert counts must be non-negative numbers.", what));
    sum += c;
  }
  if (!(sum > 0))
    throw InputError(fmt::format("{}: no expert received a token (every count is 0).", what));
  if (!std::isfinite(sum))
    throw InputError(fmt::format("{}: the counts add up past what a number holds.", what));
  std::vector<double> out(counts.size());
  const double mean = sum / static_cast<double>(counts.size());
  for (std::size_t i = 0; i < counts.size(); ++i)
    out[i] = counts[i] / mean;
  return out;
}

std::vector<std::vector<double>> read_histogram(const std::string& path) {
  const std::string text = read_input_file(path);
  std::vector<std::vector<double>> rows;
  const auto first = text.find_first_not_of(" \t\r\n");
  if (first == std::string::npos)
    throw InputError(fmt::format("{}: the routing histogram is empty.", path));
  if (text[first] == '{' || text[first] == '[') {
    const Json j = parse_json(text, path);
    auto row_of = [&](const Json& r, const std::string& where) {
      if (!r.is_array() || r.empty())
        throw InputError(
            fmt::format("{}: {} must be a non-empty list of counts per expert.", path, where));
      std::vector<double> row;
      for (const Json& v : r) {
        if (!v.is_number())
          throw InputError(fmt::format("{}: {} holds a value that is not a number.", path, where));
        row.push_back(v.get<double>());
      }
      return row;
    };
    if (!j.is_object() || (j.contains("layers") == j.contains("experts")))
      throw InputError(fmt::format("{}: a routing histogram is an object with 'layers' (a list "
                                   "per MoE layer) or 'experts' (one list for every layer).",
                                   path));
    if (j.contains("experts")) {
      rows.push_back(row_of(j.at("experts"), "'experts'"));
    } else {
      const Json& layers = j.at("layers");
      if (!layers.is_array() || layers.empty())
        throw InputError(fmt::format("{}: 'layers' must be a non-empty list.", path));
      for (std::size_t i = 0; i < layers.size(); ++i)
        rows.push_back(row_of(layers[i], fmt::format("'layers'[{}]", i)));
    }
    return rows;
  }
  // CSV: one line per MoE layer, counts separated by commas (or spaces); a header is skipped.
  std::size_t pos = 0, line_no = 0;
  while (pos <= text.size()) {
    std::size_t end = text.find('\n', pos);
    if (end == std::string::npos)
      end = text.size();
    std::string line = text.substr(pos, end - pos);
    pos = end + 1;
    ++line_no;
    if (!line.empty() && line.back() == '\r')
      line.pop_back();
    if (line.find_first_not_of(" \t,") == std::string::npos)
      continue;
    std::vector<double> row;
    bool header = false;
    std::size_t i = 0;
    while (i < line.size()) {
      while (i < line.size() && (line[i] == ',' || line[i] == ' ' || line[i] == '\t'))
        ++i;
      if (i >= line.size())
        break;
      std::size_t j = i;
      while (j < line.size() && line[j] != ',' && line[j] != ' ' && line[j] != '\t')
        ++j;
      const std::string cell = line.substr(i, j - i);
      char* stop = nullptr;
      const double v = std::strtod(cell.c_str(), &stop);
      if (stop != cell.c_str() + cell.size() || !std::isfinite(v)) {
        if (rows.empty() && row.empty()) {
          header = true;
          break;
        }
        throw InputError(fmt::format("{}:{}: '{}' is not a count.", path, line_no,
                                     cell.substr(0, 40)));
      }
      row.push_back(v);
      i = j;
    }
    if (header && line_no == 1)
      continue;
    if (header)
      throw InputError(fmt::format("{}:{}: a line of counts was expected.", path, line_no));
    rows.push_back(std::move(row));
    if (rows.size() > 1'000'000)
      throw InputError(fmt::format("{}: more lines than any model has layers.", path));
  }
  if (rows.empty())
    throw InputError(fmt::format("{}: the routing histogram has no line of counts.", path));
  return rows;
}

// Zipf-shaped loads over `n` experts with exponent s, mean 1, hottest first.
std::vector<double> zipf_loads(std::size_t n, double s) {
  std::vector<double> w(n);
  double sum = 0;
  for (std::size_t i = 0; i < n; ++i)
    sum += w[i] = std::pow(static_cast<double>(i + 1), -s);
  for (double& x : w)
    x *= static_cast<double>(n) / sum;
  return w;
}

} // namespace

double zipf_exponent_for(double ratio, std::int64_t experts) {
  const auto n = static_cast<std::size_t>(experts);
  auto ratio_at = [&](double s) { return zipf_loads(n, s).front(); };
  double lo = 0, hi = 1;
  while (ratio_at(hi) < ratio && hi < 1e3)
    hi *= 2;
  for (int i = 0; i < 200 && hi - lo > 1e-12 * hi; ++i) {
    const double mid = 0.5 * (lo + hi);
    (ratio_at(mid) < ratio ? lo : hi) = mid;
  }
  return 0.5 * (lo + hi);
}

RoutingSpec parse_routing(std::string_view text, std::uint64_t seed) {
  RoutingSpec r;
  r.seed = seed;
  r.source = std::string(text.substr(0, 200));
  const auto colon = text.find(':');
  const std::string_view head = text.substr(0, colon);
  const bool model_name =
      head == "balanced" || head == "imbalance" || head == "zipf" || head == "dirichlet";
  if (!model_name) {
    if (text.empty())
      bad_option(text, "give balanced, imbalance:R, zipf:S, dirichlet:A or a histogram file.");
    r.kind = RoutingSpec::Kind::measured;
    r.histogram = read_histogram(std::string(text));
    return r;
  }
  if (head == "balanced") {
    if (colon != std::string_view::npos)
      bad_option(text, "'balanced' takes no parameter.");
    return r;
  }
  if (colon == std::string_view::npos)
    bad_option(text, fmt::format("'{}' needs its parameter, as in {}:{}.", head, head,
                                 head == "imbalance" ? "1.5" : head == "zipf" ? "1.1" : "0.5"));
  const double v = parse_number(text.substr(colon + 1), text);
  r.parameter = v;
  if (head == "imbalance") {
    if (!(v >= 1 && v <= 1e6))
      bad_option(text, "the max/mean expert load must lie between 1 and 1e6.");
    r.kind = v == 1 ? RoutingSpec::Kind::balanced : RoutingSpec::Kind::imbalance;
  } else if (head == "zipf") {
    if (!(v >= 0 && v <= 100))
      bad_option(text, "the Zipf exponent must lie between 0 and 100.");
    r.kind = RoutingSpec::Kind::zipf;
  } else {
    if (!(v > 0 && v <= 1e6))
      bad_option(text, "the Dirichlet concentration must lie in (0, 1e6].");
    r.kind = RoutingSpec::Kind::dirichlet;
  }
  return r;
}

std::vector<std::vector<double>> expert_loads(const RoutingSpec& spec, const ModelSpec& m) {
  const std::size_t layers = m.layers.size();
  std::vector<std::vector<double>> out(layers);
  const auto experts = static_cast<std::size_t>(m.moe.num_routed_experts);
  std::vector<std::size_t> moe_layers;
  for (std::size_t l = 0; l < layers; ++l)
    if (m.layers[l].mlp == MlpKind::moe)
      moe_layers.push_back(l);
  if (moe_layers.empty() || experts == 0)
    return out;
  Random rng(spec.seed);
  std::vector<double> shape;
  switch (spec.kind) {
  case RoutingSpec::Kind::balanced:
    for (std::size_t l : moe_layers)
      out[l].assign(experts, 1.0);
    return out;
  case RoutingSpec::Kind::imbalance:
    if (!(spec.parameter < static_cast<double>(experts)))
      throw InputError(fmt::format("--routing {}: with {} experts the hottest takes at most {} "
                                   "times the mean (all the tokens); give a smaller ratio.",
                                   spec.source, experts, experts));
    shape = zipf_loads(experts, zipf_exponent_for(spec.parameter, m.moe.num_routed_experts));
    break;
  case RoutingSpec::Kind::zipf:
    shape = zipf_loads(experts, spec.parameter);
    break;
  case RoutingSpec::Kind::dirichlet:
    for (std::size_t l : moe_layers) {
      std::vector<double> g(experts);
      for (double& x : g)
        x = rng.gamma(spec.parameter);
      double sum = std::accumulate(g.begin(), g.end(), 0.0);
      if (!(sum > 0)) { // every draw underflowed (tiny concentrations): one expert takes all
        g.assign(experts, 0.0);
        g[rng.below(experts)] = 1;
        sum = 1;
      }
      for (double& x : g)
        x *= static_cast<double>(experts) / sum;
      out[l] = std::move(g);
    }
    return out;
  case RoutingSpec::Kind::measured: {
    const std::size_t rows = spec.histogram.size();
    if (rows != 1 && rows != moe_layers.size())
      throw InputError(fmt::format("{}: the histogram has {} rows; {} has {} MoE layers (give "
                                   "one row per MoE layer, or one for all).",
                                   spec.source, rows, m.name, moe_layers.size()));
    for (std::size_t i = 0; i < moe_layers.size(); ++i) {
      const std::vector<double>& row = spec.histogram[rows == 1 ? 0 : i];
      if (row.size() != experts)
        throw InputError(fmt::format("{}: row {} has {} counts; {} has {} routed experts.",
                                     spec.source, (rows == 1 ? 0 : i) + 1, row.size(), m.name,
                                     experts));
      out[moe_layers[i]] = loads_of(row, fmt::format("{}: row {}", spec.source, i + 1));
    }
    return out;
  }
  }
  // imbalance, zipf: the same shape in every layer, its experts shuffled by the seed.
  std::vector<std::size_t> order(experts);
  std::iota(order.begin(), order.end(), std::size_t{0});
  for (std::size_t l : moe_layers) {
    rng.shuffle(order);
    out[l].assign(experts, 0.0);
    for (std::size_t i = 0; i < experts; ++i)
      out[l][order[i]] = shape[i];
  }
  return out;
}

} // namespace mop::workload
