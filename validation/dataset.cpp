#include "validation/dataset.hpp"

#include "common/error.hpp"
#include "common/file_io.hpp"
#include "common/limits.hpp"
#include "hw_models/cluster.hpp"
#include "strategies/presets.hpp"
#include "workload/catalog.hpp"
#include "workload/hf_config.hpp"

#include <algorithm>
#include <fmt/format.h>
#include <fmt/ranges.h>

namespace mop::validation {

std::string default_dataset_path() {
  return fmt::format("{}/validation/data/published.jsonl", MOP_SOURCE_DIR);
}

std::vector<Row> read_dataset(const std::string& path) {
  const std::string text = read_input_file(path);
  std::vector<Row> rows;
  int number = 0;
  for (std::size_t at = 0; at < text.size();) {
    const std::size_t end = std::min(text.find('\n', at), text.size());
    const std::string line = text.substr(at, end - at);
    at = end + 1;
    ++number;
    if (line.find_first_not_of(" \t\r") == std::string::npos)
      continue;
    const std::string origin = fmt::format("{}:{}", path, number);
    const Json j = parse_json(line, origin);
    const JsonFields f(j, origin);
    Row r;
    r.origin = origin;
    r.raw = j;
    r.id = f.string("id");
    r.model_name = f.string_or("model", r.id);
    if (f.has("model_id"))
      r.model_id = f.string("model_id");
    r.gpu = f.string("gpu");
    r.node_type = f.string_or("node_type", "");
    // Ceilings of common/limits.hpp: a count past one is a malformed row, like a negative one.
    r.num_gpus = static_cast<int>(f.int_in("num_gpus", 1, limits::max_gpus));
    r.seq_len = f.int_in("seq_len", 1, limits::max_seq_tokens);
    if (f.has("global_batch_size"))
      r.global_batch_size =
          static_cast<int>(f.int_in("global_batch_size", 1, limits::max_batch_sequences));
    if (f.has("micro_batch_size"))
      r.micro_batch_size =
          static_cast<int>(f.int_in("micro_batch_size", 1, limits::max_batch_sequences));
    r.precision = f.string_or("precision", "bf16");
    r.framework = f.string_or("framework", "");
    r.recompute = f.string_or("recompute", "");
    r.flop_convention = f.string_or("flop_convention", "");
    if (!r.flop_convention.empty() && r.flop_convention != "causal" && r.flop_convention != "full")
      f.fail("flop_convention", "\"causal\" or \"full\"");
    if (f.has("attention_kernel")) {
      r.attention_kernel = sim::parse_attention_kernel(f.string("attention_kernel"));
      if (!r.attention_kernel)
        f.fail("attention_kernel", "\"flash\", \"flash2\" or \"cudnn\"");
    }
    if (f.has("fp8_recipe")) {
      r.fp8_recipe = strategy::parse_fp8_recipe(f.string("fp8_recipe"));
      if (!r.fp8_recipe)
        f.fail("fp8_recipe", "\"delayed\", \"current\", \"mxfp8\", \"tensorwise\" or \"rowwise\"");
    }
    if (f.has("ep_dispatcher")) {
      r.ep_dispatcher = strategy::parse_ep_dispatcher(f.string("ep_dispatcher"));
      if (!r.ep_dispatcher)
        f.fail("ep_dispatcher", "\"alltoall\", \"deepep\" or \"hybridep\"");
    }
    if (f.has("compile"))
      r.compiled = f.required_bool("compile");
    if (f.has("compile_loss"))
      r.compiled_loss = f.required_bool("compile_loss");
    if (f.has("transformer_engine")) {
      r.transformer_engine = strategy::parse_transformer_engine(f.string("transformer_engine"));
      if (!r.transformer_engine)
        f.fail("transformer_engine", "a release such as \"2.9\"");
    }
    r.measured = f.at("measured");
    if (!r.measured.is_object() || r.measured.empty())
      f.fail("measured", "an object of metric names to numbers");
    (void)f.at("parallelism");
    rows.push_back(std::move(r));
  }
  if (rows.empty())
    throw InputError(fmt::format("{} holds no rows; a dataset has one JSON object per line.",
                                 quote_for_message(path, limits::max_quoted_chars)));
  return rows;
}

namespace {

std::string lower(std::string s) {
  for (char& c : s)
    c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

} // namespace

Translation translate(const Row& row, int gpus_per_node) {
  Translation t;
  // A row's GPU names the catalog's node type of that GPU (a100, h100, h200, b200), unless the
  // row names another (node_type).
  const std::string gpu = lower(row.gpu);
  const std::vector<std::string> ids = hw::cluster_ids();
  if (std::find(ids.begin(), ids.end(), gpu) == ids.end()) {
    t.reason = fmt::format("no node type for {} GPUs yet (catalog: {}).", row.gpu,
                           fmt::join(ids, ", "));
    return t;
  }
  t.cluster_id = gpu;
  if (!row.node_type.empty()) {
    if (std::find(ids.begin(), ids.end(), row.node_type) == ids.end()) {
      t.reason = fmt::format("its node type '{}' is not in the catalog (mop hw list).",
                             quote_for_message(row.node_type, limits::max_quoted_chars));
      return t;
    }
    t.cluster_id = row.node_type;
  }
  if (row.num_gpus % gpus_per_node != 0 && row.num_gpus > gpus_per_node) {
    t.reason = fmt::format("{} GPUs do not fill whole nodes of {}.", row.num_gpus, gpus_per_node);
    return t;
  }
  t.nodes = std::max(1, row.num_gpus / gpus_per_node);
  // A run on part of one node: a cluster of one node with that many GPUs.
  const int per_node = std::min(gpus_per_node, row.num_gpus);
  try {
    if (row.model_id)
      t.model = workload::load_model(*row.model_id);
    else if (row.raw.contains("model_config") && row.raw["model_config"].is_object())
      t.model = workload::from_hf_config(row.raw["model_config"], row.origin + " model_config",
                                         row.model_name);
    else {
      t.reason = "the row names no catalog model and gives no model_config.";
      return t;
    }
  } catch (const InputError& e) {
    t.reason = e.what();
    return t;
  }
  const JsonFields par(row.raw.at("parallelism"), row.origin + " parallelism");
  strategy::Plan p;
  p.family = row.framework == "torchtitan" || row.framework.find("FSDP2") != std::string::npos
                 ? "fsdp2"
                 : "megatron";
  p.world = row.num_gpus;
  // A parallel degree is at most the world; past limits::max_gpus the row is malformed (an
  // InputError naming it), below it a degree that does not fit is a reason (validate_plan).
  auto degree = [&](const char* key) {
    return static_cast<int>(par.int_in_or(key, 1, limits::max_gpus, 1));
  };
  const int tp = degree("tp");
  p.attention.tp = tp;
  p.attention.sp = par.bool_or("sp", tp > 1);
  p.attention.cp = degree("cp");
  const std::string cp_comm = par.string_or("cp_comm_type", "p2p");
  p.attention.cp_kind = cp_comm == "a2a"       ? strategy::CpKind::ulysses
                        : cp_comm == "a2a+p2p" ? strategy::CpKind::hybrid
                                               : strategy::CpKind::ring;
  p.pp = degree("pp");
  p.vp = degree("vp");
  p.schedule = p.vp > 1 ? strategy::PipelineSchedule::interleaved_1f1b
                        : strategy::PipelineSchedule::one_f_one_b;
  if (par.string_or("pp_schedule", "") == "gpipe")
    p.schedule = strategy::PipelineSchedule::gpipe;
  p.moe.ep = degree("ep");
  // Not stated: 1, as the Megatron-Bridge MoE recipes set expert_tensor_parallel_size (with
  // Megatron-Core's own default, etp = tp, several published rows would not fit their ranks).
  p.moe.etp = degree("etp");
  if (!t.model->is_moe()) {
    p.moe.ep = 1;
    p.moe.etp = 1;
  }
  p.dense.tp = tp;
  p.embed.tp = tp;
  const int zero = static_cast<int>(par.int_in_or("zero", 0, 3, 1));
  for (auto& s : p.state)
    s.zero = zero;
  const std::string rc = row.recompute;
  const strategy::Recompute r = rc.starts_with("full")        ? strategy::Recompute::full
                                : rc.starts_with("selective") ? strategy::Recompute::selective
                                                              : strategy::Recompute::none;
  for (auto& x : p.recompute)
    x = r;
  const std::string offload =
      row.raw.value("offload", Json()).is_string() ? row.raw["offload"].get<std::string>() : "";
  if (offload.find("activation") != std::string::npos)
    p.activation_offload = 1;
  // A chunked cross-entropy (Liger, TRL's chunked_nll) is stated in the row's notes.
  const std::string notes =
      row.raw.value("notes", Json()).is_string() ? row.raw["notes"].get<std::string>() : "";
  p.chunked_loss = notes.find("chunked") != std::string::npos;
  p.micro_batch = row.micro_batch_size.value_or(1);
  // Each factor is an int, their product need not fit even an int64: the default batch is
  // formed in double and checked against the ceiling before it becomes an int. replicas is 0
  // when the degrees do not divide the GPUs, which complete_plan then names.
  const std::int64_t replicas = p.world / p.pp / (std::int64_t{tp} * p.attention.cp);
  // torchtitan splits a data-parallel rank's batch into as many micro-batches as there are
  // pipeline stages unless told otherwise (config_manager.py, --experimental.
  // pipeline_parallel_microbatches: "The default value will be the number of pipeline stages";
  // pipeline_llama.py, commit f6a9daa).
  if (!row.micro_batch_size && row.framework == "torchtitan" && p.pp > 1 && replicas > 0 &&
      row.global_batch_size && *row.global_batch_size % (replicas * p.pp) == 0)
    p.micro_batch = static_cast<int>(*row.global_batch_size / (replicas * p.pp));
  const double default_batch =
      static_cast<double>(replicas) * p.micro_batch * (p.pp > 1 ? 2.0 * p.pp * p.vp : 1.0);
  if (!row.global_batch_size && default_batch > static_cast<double>(limits::max_batch_sequences)) {
    t.reason = fmt::format("its degrees imply a global batch of {:.0f} sequences, above mop's "
                           "ceiling of {}; give global_batch_size.",
                           default_batch, limits::max_batch_sequences);
    return t;
  }
  p.global_batch = row.global_batch_size.value_or(static_cast<int>(default_batch));
  try {
    strategy::complete_plan(p);
    strategy::validate_plan(p, strategy::model_shape(*t.model), row.seq_len,
                            strategy::ClusterShape{per_node, t.nodes});
  } catch (const InputError& e) {
    t.reason = fmt::format("its published degrees do not form a valid plan: {}", e.what());
    return t;
  }
  t.plan = p;
  return t;
}

} // namespace mop::validation
