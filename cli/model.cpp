// mop model list | show: the workload model (parameters and FLOPs of a catalog or HF model).
#include "cli/commands.hpp"
#include "cli/context.hpp"
#include "cli/output.hpp"
#include "common/units.hpp"
#include "workload/catalog.hpp"
#include "workload/flops.hpp"
#include "workload/params.hpp"

#include <fmt/format.h>
#include <iostream>
#include <memory>

namespace mop::cli {
namespace {

using workload::Component;

Json params_json(const workload::ParamCounts& c) {
  return Json{{"embedding", c.embedding},
              {"attention", c.attention},
              {"dense_mlp", c.dense_mlp},
              {"shared_experts", c.shared_experts},
              {"routed_experts", c.routed_experts},
              {"router", c.router},
              {"norms", c.norms},
              {"lm_head", c.lm_head},
              {"total", c.total()}};
}

const char* attention_name(const workload::ModelSpec& m) {
  if (m.attention.kind == workload::AttentionKind::mla)
    return "MLA";
  if (m.attention.num_kv_heads == m.attention.num_heads)
    return "MHA";
  return m.attention.num_kv_heads == 1 ? "MQA" : "GQA";
}

std::string layer_summary(const workload::ModelSpec& m) {
  const std::int64_t moe = m.num_moe_layers();
  std::int64_t windowed = 0;
  for (const auto& l : m.layers)
    windowed += l.window > 0 ? 1 : 0;
  std::string s = fmt::format("{} layers", m.num_layers());
  if (moe > 0)
    s += fmt::format(" ({} MoE, {} dense)", moe, m.num_layers() - moe);
  if (windowed > 0)
    s += fmt::format(", {} with sliding window", windowed);
  return s;
}

void run_model_list(bool json) {
  Json out = Json::array();
  TextTable table{{"id", "name", "type", "layers", "experts", "total", "active"},
                  {},
                  {false, false, false, true, false, true, true}};
  for (const std::string& id : workload::catalog_ids()) {
    const workload::ModelSpec m = workload::load_model(id);
    const workload::ParamReport p = workload::count_params(m);
    const std::string experts =
        m.is_moe() ? fmt::format("{}/{}", m.moe.experts_per_token, m.moe.num_routed_experts) : "-";
    table.rows.push_back({id, m.display_name, m.model_type, std::to_string(m.num_layers()), experts,
                          format_params(static_cast<double>(p.total.total())),
                          format_params(static_cast<double>(p.active.total()))});
    out.push_back(Json{{"id", id},
                       {"name", m.display_name},
                       {"model_type", m.model_type},
                       {"total_params", p.total.total()},
                       {"active_params", p.active.total()}});
  }
  if (json)
    print_json(Json{{"models", out}});
  else
    std::cout << table.render();
}

void run_show(const std::string& id, const std::string& seq_text, bool json) {
  const workload::ModelSpec m = workload::load_model(id);
  const std::int64_t seq = parse_seq(seq_text);
  const workload::ParamReport p = workload::count_params(m);
  const workload::FlopReport f = workload::count_flops(m, seq);
  const auto& a = m.attention;
  const double tokens = static_cast<double>(seq);
  if (json) {
    Json flops_by_component = Json::object();
    for (int c = 0; c < workload::kNumComponents; ++c) {
      const auto& cc = f.by_component[c];
      flops_by_component[workload::component_name(static_cast<Component>(c))] =
          Json{{"fwd_flops_per_token", cc.fwd_flops / tokens},
               {"bwd_flops_per_token", cc.bwd_flops / tokens},
               {"fwd_bytes_per_token", cc.fwd_bytes / tokens},
               {"bwd_bytes_per_token", cc.bwd_bytes / tokens}};
    }
    Json layers = Json::array();
    for (const auto& l : m.layers)
      layers.push_back(
          Json{{"mlp", l.mlp == workload::MlpKind::moe ? "moe" : "dense"}, {"window", l.window}});
    print_json(Json{{"name", m.name},
                    {"display_name", m.display_name},
                    {"model_type", m.model_type},
                    {"total_params", p.total.total()},
                    {"active_params", p.active.total()},
                    {"active_params_without_embedding", p.active_without_embedding()},
                    {"num_layers", m.num_layers()},
                    {"num_moe_layers", m.num_moe_layers()},
                    {"hidden_size", m.hidden_size},
                    {"vocab_size", m.vocab_size},
                    {"tied_embeddings", m.tied_embeddings},
                    {"attention", Json{{"kind", attention_name(m)},
                                       {"num_heads", a.num_heads},
                                       {"num_kv_heads", a.num_kv_heads},
                                       {"qk_head_dim", a.qk_head_dim()},
                                       {"v_head_dim", a.v_dim()},
                                       {"q_lora_rank", a.q_lora_rank},
                                       {"kv_lora_rank", a.kv_lora_rank}}},
                    {"num_routed_experts", m.is_moe() ? m.moe.num_routed_experts : 0},
                    {"experts_per_token", m.is_moe() ? m.moe.experts_per_token : 0},
                    {"num_shared_experts", m.is_moe() ? m.moe.num_shared_experts : 0},
                    {"params_by_component", params_json(p.total)},
                    {"active_params_by_component", params_json(p.active)},
                    {"mtp_params", p.mtp},
                    {"mtp_params_stored", p.mtp_stored},
                    {"seq", seq},
                    {"flops_per_token_fwd", f.model_flops_fwd_per_token},
                    {"flops_per_token_train", f.model_flops_train_per_token},
                    {"elementwise_flops_per_token_fwd", f.elementwise_flops_fwd / tokens},
                    {"bytes_per_token_fwd", f.bytes_fwd / tokens},
                    {"mtp_flops_per_token_fwd", f.mtp_model_flops_fwd_per_token},
                    {"flops_by_component", flops_by_component},
                    {"layers", layers}});
    return;
  }
  std::cout << fmt::format("{} ({}, {})\n", m.display_name, m.name, m.model_type);
  std::cout << fmt::format("  hidden {}, vocab {}, {}{}\n", m.hidden_size, m.vocab_size,
                           layer_summary(m), m.tied_embeddings ? ", tied embeddings" : "");
  if (a.kind == workload::AttentionKind::mla)
    std::cout << fmt::format("  attention: MLA, {} heads, q rank {}, kv rank {}, qk {}+{}, v {}\n",
                             a.num_heads, a.q_lora_rank, a.kv_lora_rank, a.qk_nope_head_dim,
                             a.qk_rope_head_dim, a.v_head_dim);
  else
    std::cout << fmt::format("  attention: {}, {} heads, {} kv heads, head dim {}{}{}\n",
                             attention_name(m), a.num_heads, a.num_kv_heads, a.head_dim,
                             a.qk_norm ? ", QK-norm" : "", a.sinks ? ", sinks" : "");
  if (m.is_moe())
    std::cout << fmt::format("  experts: {} routed (top-{}) of width {}, {} shared\n",
                             m.moe.num_routed_experts, m.moe.experts_per_token,
                             m.moe.expert_intermediate_size, m.moe.num_shared_experts);
  TextTable t{{"parameters", "total", "active"}, {}, {false, true, true}};
  auto row = [&](const char* name, std::int64_t total, std::int64_t active) {
    if (total != 0)
      t.rows.push_back({name, format_params(static_cast<double>(total)),
                        format_params(static_cast<double>(active))});
  };
  row("embedding", p.total.embedding, p.active.embedding);
  row("attention", p.total.attention, p.active.attention);
  row("dense MLP", p.total.dense_mlp, p.active.dense_mlp);
  row("shared experts", p.total.shared_experts, p.active.shared_experts);
  row("routed experts", p.total.routed_experts, p.active.routed_experts);
  row("router", p.total.router, p.active.router);
  row("norms", p.total.norms, p.active.norms);
  row("LM head", p.total.lm_head, p.active.lm_head);
  row("total", p.total.total(), p.active.total());
  row("MTP (separate)", p.mtp, p.mtp_active);
  std::cout << "\n" << t.render();
  TextTable ft{
      {fmt::format("per token at seq {}", seq), "fwd FLOPs", "share"}, {}, {false, true, true}};
  for (int c = 0; c < workload::kNumComponents; ++c) {
    const auto comp = static_cast<Component>(c);
    const double v = f.by_component[c].fwd_flops / tokens;
    if (v > 0 && comp != Component::elementwise)
      ft.rows.push_back({workload::component_name(comp), format_flops(v),
                         fmt::format("{:.1f}%", 100 * v / f.model_flops_fwd_per_token)});
  }
  ft.rows.push_back({"model FLOPs (fwd)", format_flops(f.model_flops_fwd_per_token), ""});
  ft.rows.push_back({"model FLOPs (fwd+bwd)", format_flops(f.model_flops_train_per_token), ""});
  ft.rows.push_back(
      {"elementwise (fwd, not in MFU)", format_flops(f.elementwise_flops_fwd / tokens), ""});
  std::cout << "\n" << ft.render();
}

} // namespace

void add_model_command(CLI::App& app) {
  CLI::App* model = app.add_subcommand("model", "Catalog models: parameters and FLOPs");
  model->require_subcommand(1);

  struct Options {
    std::string model;
    std::string seq = "4096";
    bool json = false;
  };
  auto opt = std::make_shared<Options>();

  CLI::App* list = model->add_subcommand(
      "list", "List catalog models with total and active parameters\n\nExample:\n  mop model list");
  add_output_options(list, opt->json);
  list->callback([opt] { run_model_list(opt->json); });

  CLI::App* show = model->add_subcommand(
      "show", "Parameters by component and FLOPs per token of a model\n\nExample:\n"
              "  mop model show kimi-k2 --seq 128K\n  mop model show path/to/config.json --json");
  show->add_option("model", opt->model,
                   "catalog id (mop model list) or a Hugging Face config.json path")
      ->required();
  show->add_option("--seq", opt->seq, "sequence length in tokens: 4096, 4K, 128K, 1M (K = 1024)")
      ->capture_default_str();
  add_output_options(show, opt->json);
  show->callback([opt] { run_show(opt->model, opt->seq, opt->json); });
}

} // namespace mop::cli
