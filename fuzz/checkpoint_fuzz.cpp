// CPU checkpoint bytes -> TrainState, as `mop run --resume FILE` reads them, for a
// two-layer MoE small enough that a whole checkpoint is a few kilobytes. An InputError is the
// accepted answer to a bad file; anything else is a finding.
//
// The seed corpus holds a checkpoint this model's layout accepts; to write it again (after a
// layout change): MOP_FUZZ_WRITE_SEED=fuzz/corpus/checkpoint/tiny.ckpt
// build/fuzz/fuzz/fuzz_checkpoint
#include "common/error.hpp"
#include "common/json_io.hpp"
#include "fuzz/fuzz_support.hpp"
#include "real_backend/cpu/checkpoint.hpp"
#include "real_backend/cpu/training.hpp"
#include "strategies/plan.hpp"
#include "workload/hf_config.hpp"

#include <cstdlib>

namespace {

// Qwen3-MoE layout: layer 0 dense, layer 1 two experts with one active.
constexpr const char* kModel = R"({
  "model_type": "qwen3_moe", "hidden_size": 4, "head_dim": 2, "num_attention_heads": 2,
  "num_key_value_heads": 1, "intermediate_size": 4, "moe_intermediate_size": 2,
  "num_experts": 2, "num_experts_per_tok": 1, "num_hidden_layers": 2, "mlp_only_layers": [0],
  "vocab_size": 8, "max_position_embeddings": 64, "tie_word_embeddings": true,
  "norm_topk_prob": true, "rms_norm_eps": 1e-6, "rope_theta": 10000.0})";

const mop::real::TinyConfig& model() {
  static const mop::real::TinyConfig c = mop::real::tiny_config(
      mop::workload::from_hf_config(mop::parse_json(kModel, "fuzz model"), "fuzz model", "fuzz"));
  return c;
}

// What a one-rank run on synthetic data would check a resumed file against.
const mop::real::CheckpointIdentity& identity() {
  static const mop::real::CheckpointIdentity id = [] {
    mop::strategy::Plan p;
    p.world = 1;
    p.global_batch = 2;
    mop::strategy::complete_plan(p);
    return mop::real::checkpoint_identity(
        model(),
        mop::real::PlanIdentity{mop::strategy::summary(p), mop::strategy::to_json(p).dump()},
        mop::real::DataSource::synthetic(model().vocab, 1));
  }();
  return id;
}

} // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  if (const char* seed = std::getenv("MOP_FUZZ_WRITE_SEED")) {
    mop::real::TrainState<float> s = mop::real::initial_state<float>(model(), 1);
    s.step = 3;
    mop::real::save_checkpoint(seed, identity(), model(), s);
    std::exit(0);
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace mop;
  static fuzz::ScratchFile file(".ckpt");
  try {
    const real::TrainState<float> s =
        real::load_checkpoint(file.write(data, size), model(), identity()).state;
    const auto layout = real::param_layout(model());
    MOP_FUZZ_CHECK(s.step >= 0);
    MOP_FUZZ_CHECK(s.params.size() == layout.size() && s.adam_m.size() == layout.size() &&
                   s.adam_v.size() == layout.size());
    for (std::size_t i = 0; i < layout.size(); ++i)
      MOP_FUZZ_CHECK(static_cast<std::int64_t>(s.params[i].size()) == layout[i].numel());
  } catch (const InputError&) {
  }
  return 0;
}
