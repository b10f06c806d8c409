#include "validation/compare.hpp"

#include "hw_models/cluster.hpp"
#include "planner/evaluate.hpp"
#include "strategies/hardware.hpp"
#include "workload/flops.hpp"

#include <algorithm>
#include <cmath>
#include <fmt/format.h>
#include <limits>
#include <map>

namespace mop::validation {

namespace {

bool time_like(const std::string& metric) {
  return metric != "peak_mem_gib";
}

std::string context_band(std::int64_t seq) {
  if (seq <= 8192)
    return "<=8K";
  if (seq <= 32768)
    return "16-32K";
  if (seq <= 131072)
    return "64-128K";
  return ">128K";
}

} // namespace

std::vector<std::string> group_keys(const std::string& kind, const RowFacts& row) {
  return {kind,
          kind + (row.moe ? "/moe" : "/dense"),
          kind + "/framework/" + row.framework,
          kind + "/gpu/" + row.gpu,
          kind + "/context/" + context_band(row.seq)};
}

double source_flops_per_token(const workload::ModelSpec& m, std::int64_t seq,
                              double mop_flops_per_token, const std::string& convention) {
  if (convention != "full")
    return mop_flops_per_token;
  // The pairs a mask drops, per layer: a full count takes all seq keys for every query.
  double dropped_fwd = 0;
  for (const workload::LayerSpec& layer : m.layers)
    for (const workload::ForwardOp& op : workload::layer_forward_ops(m, layer, seq))
      if (op.component == workload::Component::attention_core && op.n > 0)
        dropped_fwd += op.flops * (static_cast<double>(seq) / op.n - 1.0);
  // Forward and backward (twice the forward), per token.
  return mop_flops_per_token + 3.0 * dropped_fwd / static_cast<double>(seq);
}

planner::StepEvaluation evaluate_row(const Row& row, const Translation& t,
                                     planner::Lowering lowering,
                                     const hw::Calibration& calibration) {
  const hw::ClusterSpec cluster = hw::load_cluster(t.cluster_id);
  const strategy::MemoryHardware mh = strategy::memory_hardware(cluster);
  strategy::LoweringContext lc{&*t.model, row.seq_len, cluster.node.gpus_per_node, mh, {}};
  lc.gemm_dtype = row.precision == "fp8" ? sim::Dtype::fp8 : sim::Dtype::bf16;
  lc.attention_kernel = row.attention_kernel;
  lc.fp8_recipe = row.fp8_recipe;
  lc.compiled = row.compiled;
  lc.compiled_loss = row.compiled_loss;
  lc.ep_dispatcher = row.ep_dispatcher;
  lc.transformer_engine = row.transformer_engine;
  // torchtitan's Llama repeats K/V heads before SDPA (models/llama/model.py, repeat_kv); the
  // PyTorch family's published runs keep context parallelism's default all-gather rotater
  // (torchtitan's context_parallel_rotate_method, Accelerate's cp_comm_strategy).
  lc.kv_heads_repeated = row.framework == "torchtitan";
  lc.cp_gathers_kv = t.plan->family == "fsdp2";
  return planner::evaluate_step(*t.plan, lc, cluster, calibration, 16, lowering);
}

namespace {

// What mop predicts for one row.
struct Prediction {
  double tokens_per_s_per_gpu = 0;
  double step_time_s = 0;
  double tflops_per_gpu = 0; // mop's causal convention
  double mfu = 0;
  double peak_mem_gib = 0;
  double flops_per_token = 0; // mop's model FLOPs per token, training
  double peak_bf16 = 0;       // the GPU's dense BF16 peak
};

Prediction predict(const Row& row, const Translation& t, planner::Lowering lowering,
                   const hw::Calibration& calibration, bool& program) {
  const hw::ClusterSpec cluster = hw::load_cluster(t.cluster_id);
  const strategy::MemoryHardware mh = strategy::memory_hardware(cluster);
  const planner::StepEvaluation e = evaluate_row(row, t, lowering, calibration);
  program = e.program;
  const double gpus = row.num_gpus;
  Prediction p;
  p.step_time_s = e.step_time_s;
  p.tokens_per_s_per_gpu = e.tokens_per_step / e.step_time_s / gpus;
  p.tflops_per_gpu = e.model_flops_per_step / e.step_time_s / gpus / 1e12;
  p.peak_bf16 = cluster.gpu.peak_flops_bf16;
  // MFU against the dense BF16 peak, as most sources compute it.
  p.mfu = p.tflops_per_gpu * 1e12 / p.peak_bf16;
  p.flops_per_token = e.model_flops_per_step / e.tokens_per_step;
  double peak = 0;
  for (const sim::ClassResult& c : e.result.classes) {
    const double dynamic = c.memory.at_peak[static_cast<int>(sim::MemoryKind::activations)] +
                           c.memory.at_peak[static_cast<int>(sim::MemoryKind::comm_buffers)];
    peak = std::max(peak, c.memory.peak_hbm_bytes + mh.fragmentation * dynamic);
  }
  p.peak_mem_gib = peak / (1024.0 * 1024.0 * 1024.0);
  return p;
}

double number(const Json& v) {
  return v.is_number() ? v.get<double>() : 0;
}

// The row's measured tokens/s per GPU, from the first metric that converts; `derived_from`
// names it, `reason` says why none does.
std::optional<double> measured_tokens_per_s(const Row& row, const Translation& t,
                                            const Prediction& p, std::string& derived_from,
                                            std::string& reason) {
  const Json& m = row.measured;
  const double gpus = row.num_gpus;
  if (m.contains("tokens_per_sec_per_gpu")) {
    derived_from = "tokens_per_sec_per_gpu";
    return number(m["tokens_per_sec_per_gpu"]);
  }
  if (m.contains("step_time_s")) {
    derived_from = "step_time_s";
    if (!row.global_batch_size) {
      reason = "its step time cannot be read as tokens/s without a global batch size.";
      return std::nullopt;
    }
    const double step = number(m["step_time_s"]);
    if (step <= 0) {
      reason = "its step time is not positive.";
      return std::nullopt;
    }
    return static_cast<double>(*row.global_batch_size) * static_cast<double>(row.seq_len) /
           step / gpus;
  }
  for (const char* metric : {"tflops_per_gpu", "mfu"}) {
    if (!m.contains(metric))
      continue;
    derived_from = metric;
    if (row.flop_convention.empty()) {
      reason = fmt::format("its {} cannot be read as tokens/s without the source's "
                           "flop_convention.",
                           metric);
      return std::nullopt;
    }
    const double flops_per_s = std::string(metric) == "mfu" ? number(m[metric]) * p.peak_bf16
                                                            : number(m[metric]) * 1e12;
    return flops_per_s /
           source_flops_per_token(*t.model, row.seq_len, p.flops_per_token, row.flop_convention);
  }
  return std::nullopt; // memory only
}

double mape_of(const std::vector<double>& errors) {
  if (errors.empty())
    return std::numeric_limits<double>::quiet_NaN();
  double sum = 0;
  for (double e : errors)
    sum += std::fabs(e);
  return sum / static_cast<double>(errors.size());
}

} // namespace

Report validate(const std::vector<Row>& rows, planner::Lowering lowering,
                const hw::Calibration& calibration) {
  Report rep;
  rep.rows = static_cast<int>(rows.size());
  std::map<std::string, std::vector<double>> errors; // by group key
  for (const Row& row : rows) {
    const Translation t = translate(row);
    std::string reason = t.reason;
    RowFacts facts{t.model && t.model->is_moe(), row.framework, row.gpu, row.seq_len};
    std::optional<Prediction> pred;
    if (t.plan) {
      try {
        bool program = false;
        pred = predict(row, t, lowering, calibration, program);
        ++rep.rows_predicted;
        if (program)
          ++rep.rows_predicted_by_program;
      } catch (const std::exception& ex) {
        reason = std::string("the simulation failed: ") + ex.what();
      }
    }
    for (const auto& [metric, value] : row.measured.items()) {
      Point p;
      p.id = row.id;
      p.metric = metric;
      p.measured = number(value);
      p.moe = facts.moe;
      p.time_like = time_like(metric);
      p.row = facts;
      if (pred) {
        const std::pair<const char*, double> predicted[] = {
            {"tokens_per_sec_per_gpu", pred->tokens_per_s_per_gpu},
            {"step_time_s", pred->step_time_s},
            {"tflops_per_gpu", pred->tflops_per_gpu},
            {"mfu", pred->mfu},
            {"peak_mem_gib", pred->peak_mem_gib}};
        for (const auto& [name, v] : predicted)
          if (metric == name)
            p.predicted = v;
      }
      if (p.predicted && p.measured != 0)
        p.rel_error = (*p.predicted - p.measured) / p.measured;
      else if (!p.predicted)
        p.reason = reason.empty() ? "mop does not predict this metric yet." : reason;
      if (p.predicted && !p.time_like)
        for (const std::string& g : group_keys("memory", facts))
          errors[g].push_back(p.rel_error);
      rep.points.push_back(std::move(p));
    }
    // The time score.
    bool any_time = false;
    for (const auto& item : row.measured.items())
      any_time = any_time || time_like(item.key());
    if (!any_time)
      continue;
    Score s;
    s.id = row.id;
    s.row = facts;
    if (pred) {
      s.measured = measured_tokens_per_s(row, t, *pred, s.derived_from, s.reason);
      if (s.measured && *s.measured > 0) {
        s.predicted = pred->tokens_per_s_per_gpu;
        s.rel_error = (*s.predicted - *s.measured) / *s.measured;
        for (const std::string& g : group_keys("time", facts))
          errors[g].push_back(s.rel_error);
      } else if (s.reason.empty()) {
        s.reason = "its measured value is not positive.";
      }
    } else {
      s.reason = reason;
    }
    rep.scores.push_back(std::move(s));
  }
  for (const auto& [key, list] : errors)
    rep.groups.push_back(Group{key, static_cast<int>(list.size()), mape_of(list)});
  auto mape = [&](const std::string& key) {
    for (const Group& g : rep.groups)
      if (g.key == key)
        return g.mape;
    return std::numeric_limits<double>::quiet_NaN();
  };
  rep.mape_time = mape("time");
  rep.mape_time_dense = mape("time/dense");
  rep.mape_time_moe = mape("time/moe");
  rep.mape_memory = mape("memory");
  rep.mape_memory_dense = mape("memory/dense");
  rep.mape_memory_moe = mape("memory/moe");
  return rep;
}

} // namespace mop::validation
