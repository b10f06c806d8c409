#pragma once
// How a Mixture-of-Experts router spreads tokens over its experts: the expert loads of every MoE
// layer, which the lowering turns into each expert-parallel rank's tokens (strategies/lower.hpp)
// and the memory model into the worst rank's buffers. A property of the model and its data, not
// of the plan: the same loads meet every plan, and the plan decides how they land on ranks.
//
// A load is the share of a layer's routed (token, slot) pairs an expert receives, relative to
// the mean: balanced routing gives every expert 1, and the loads of a layer always average 1.
#include "workload/model_spec.hpp"

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace mop::workload {

struct RoutingSpec {
  enum class Kind {
    balanced,  // every expert the mean (Megatron-LM's forced-balance benchmarks)
    imbalance, // max/mean = `parameter` in every layer: Zipf-shaped loads whose exponent gives
               // that ratio, the hot experts placed at random (by the seed) in each layer
    zipf,      // load of the i-th hottest expert ∝ 1 / i^parameter, placed at random per layer
    dirichlet, // expert shares drawn from a symmetric Dirichlet(parameter) per layer
    measured,  // an expert-load histogram per MoE layer (or one for all), read from a file
  };
  Kind kind = Kind::balanced;
  double parameter = 0;
  std::uint64_t seed = 0;
  // measured: tokens (or any counts) per expert, one row per MoE layer or a single row.
  std::vector<std::vector<double>> histogram;
  std::string source; // what it was read from: "imbalance:1.5", a file path

  bool is_balanced() const { return kind == Kind::balanced; }
};

// "balanced", "imbalance:R" (R >= 1), "zipf:S" (S >= 0), "dirichlet:A" (A > 0), or the path of a
// measured histogram: JSON {"layers": [[counts per expert], ...]} (or {"experts": [...]} for
// every layer alike), or CSV with one line of counts per MoE layer (a first line that is not
// numbers is a header). Anything else is an InputError naming the option.
RoutingSpec parse_routing(std::string_view text, std::uint64_t seed = 0);

// The loads of every layer of `m` (one row per decoder layer, empty for dense layers), for the
// seed in `spec`. A measured histogram must have one row per MoE layer of the model (or one
// row), each with one count per routed expert; an InputError says what does not match.
// Deterministic: the same spec and seed give the same loads on every machine.
std::vector<std::vector<double>> expert_loads(const RoutingSpec& spec, const ModelSpec& m);

// The Zipf exponent whose loads over `experts` experts have max/mean `ratio` (1 <= ratio <
// experts): max/mean = experts / sum_i i^-s, which grows with s from 1.
double zipf_exponent_for(double ratio, std::int64_t experts);

} // namespace mop::workload
