// Framework configurations in and out: Megatron-LM arguments and DeepSpeed JSON read as plans,
// plans written back, and the round trip export -> import giving the same plan.
#include "common/error.hpp"
#include "strategies/frameworks.hpp"
#include "strategies/presets.hpp"
#include "workload/catalog.hpp"
#include "workload/params.hpp"

#include <doctest/doctest.h>

namespace strategies_frameworks_test {

using namespace mop::strategy;
using namespace mop::workload;

namespace {

const MemoryHardware kH100{.hbm_bytes = 85e9,
                           .host_bytes = 2e12,
                           .gpus_per_node = 8,
                           .cuda_context_bytes = 1e9,
                           .nccl_bytes_per_communicator = 0.4e9,
                           .fragmentation = 0.05,
                           .host_reserved_bytes = 50e9};

PlanContext context(const ModelSpec& m, std::int64_t seq, int nodes) {
  PlanContext c;
  c.model = &m;
  c.seq = seq;
  c.cluster = ClusterShape{8, nodes};
  c.hw = kH100;
  return c;
}

// The plan a configuration read back describes, completed for `world` ranks.
Plan completed(FrameworkRun r, int world) {
  r.plan.world = world;
  complete_plan(r.plan);
  return r.plan;
}

// The same plan for `m`: settings of the expert kind do not exist for a model without experts
// (FSDP2's family gives them an HSDP group; torchtitan has none to write).
bool same_for_model(Plan a, Plan b, const ModelSpec& m) {
  if (!m.is_moe()) {
    const int moe = static_cast<int>(LayerKind::moe);
    a.state[moe] = b.state[moe] = StatePolicy{};
  }
  return same_plan(a, b);
}

// Exports every plan of the family the framework expresses, imports it back and compares;
// returns how many of the family's plans the framework could express.
int round_trip(Framework f, const char* model_id, std::int64_t seq, int nodes,
               const PlanOverrides& python_side = {}) {
  const ModelSpec m = load_model(model_id);
  const PlanContext ctx = context(m, seq, nodes);
  int expressed = 0;
  for (const Plan& p : enumerate_family(family_of(f), ctx)) {
    CAPTURE(summary(p));
    const FrameworkConfig c = write_framework_config(f, p, m, seq, 8, "bf16");
    if (!c.cannot_express.empty()) {
      CHECK(c.text.empty());
      continue;
    }
    ++expressed;
    FrameworkRun back = f == Framework::megatron ? read_megatron_args(c.text, "exported", &m)
                        : f == Framework::torchtitan
                            ? read_torchtitan_config(c.text, "exported", &m)
                            : read_deepspeed_config(c.text, "exported");
    CHECK(back.not_represented.empty());
    PlanOverrides py = python_side;
    py.ep = p.moe.ep; // DeepSpeed's EP is a Python argument, given as --ep
    if (f == Framework::deepspeed)
      apply_overrides(py, back.plan);
    if (f != Framework::deepspeed) {
      CHECK(back.seq == seq);
      CHECK(back.nodes * back.gpus_per_node == p.world);
    }
    CHECK(back.global_batch == p.global_batch);
    const Plan q = completed(back, p.world);
    CHECK(same_for_model(p, q, m));
    if (!same_for_model(p, q, m))
      MESSAGE(std::string(to_json(p).dump() + "\n" + to_json(q).dump()));
  }
  return expressed;
}

} // namespace

TEST_CASE("Megatron-LM arguments from a launch script: every parallel key and the model" *
          doctest::test_suite("independent")) {
  // Llama-3-8B as Megatron-LM's arguments describe it, with a torchrun prefix, a comment and
  // line continuations, and both `--key value` and `--key=value`.
  const std::string script = R"(# Llama-3 8B, 2 nodes
torchrun --nnodes 2 --nproc_per_node 8 pretrain_gpt.py \
  --tensor-model-parallel-size 2 --sequence-parallel \
  --pipeline-model-parallel-size=2 --context-parallel-size 2 --cp-comm-type p2p \
  --use-distributed-optimizer --recompute-granularity selective \
  --micro-batch-size 1 --global-batch-size 128 --seq-length 8192 \
  --num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336 \
  --num-attention-heads 32 --group-query-attention --num-query-groups 8 \
  --vocab-size 128256 --untie-embeddings-and-output-weights \
  --position-embedding-type rope --rotary-base 500000 --normalization RMSNorm \
  --swiglu --disable-bias-linear --bf16 --lr 3e-4 --data-path /data/x \
  --tp-comm-overlap
)";
  const FrameworkRun r = read_megatron_args(script, "llama.sh", nullptr);
  CHECK(r.nodes == 2);
  CHECK(r.gpus_per_node == 8);
  CHECK(r.seq == 8192);
  CHECK(r.global_batch == 128);
  CHECK(r.precision == "bf16");
  const Plan& p = r.plan;
  CHECK(p.attention.tp == 2);
  CHECK(p.dense.tp == 2);
  CHECK(p.attention.sp);
  CHECK(p.attention.cp == 2);
  CHECK(p.attention.cp_kind == CpKind::ring);
  CHECK(p.pp == 2);
  CHECK(p.vp == 1);
  CHECK(p.state[0].zero == 1);
  CHECK(p.recompute[0] == Recompute::selective);
  REQUIRE(r.not_represented.size() == 1);
  CHECK(r.not_represented[0] == "TP communication overlap (--tp-comm-overlap) is not modelled");
  // The second method: the model the arguments describe has the catalog Llama-3-8B's
  // parameters (8.03 B).
  REQUIRE(r.model);
  const ModelSpec catalog = load_model("llama3-8b");
  CHECK(count_params(*r.model).total.total() == count_params(catalog).total.total());
  CHECK(r.model->num_layers() == 32);
  CHECK(r.model->attention.num_kv_heads == 8);
}

TEST_CASE("Megatron-LM's defaults and derived keys: expert TP follows TP, layers per virtual "
          "stage, first and last stage layers, MoE layer pattern" *
          doctest::test_suite("independent")) {
  const ModelSpec m = load_model("qwen3-30b-a3b"); // 48 layers, 128 experts
  const FrameworkRun r = read_megatron_args(
      "--tensor-model-parallel-size 2 --expert-model-parallel-size 8 "
      "--pipeline-model-parallel-size 4 --num-layers-per-virtual-pipeline-stage 6",
      "args", &m);
  CHECK(r.plan.moe.etp == 2); // Megatron-Core: expert TP = TP unless set
  CHECK(r.plan.vp == 2);      // 48 layers / (4 stages x 6 layers)
  CHECK(r.plan.schedule == PipelineSchedule::interleaved_1f1b);
  CHECK_FALSE(r.plan.attention.sp); // Megatron's SP is off unless asked
  CHECK(r.plan.state[0].zero == 0); // no distributed optimizer: replicated
  const FrameworkRun split =
      read_megatron_args("--pipeline-model-parallel-size 4 --decoder-first-pipeline-num-layers 9 "
                         "--decoder-last-pipeline-num-layers 9",
                         "args", &m);
  CHECK(split.plan.stage_layers == std::vector<int>{9, 15, 15, 9});
  CHECK_THROWS_WITH_AS(read_megatron_args("--pipeline-model-parallel-size 4 "
                                          "--decoder-first-pipeline-num-layers 10",
                                          "args", &m),
                       "args: the first and last stage layers leave 38 layers, which do not split "
                       "evenly over the other 3 stages.",
                       mop::InputError);
  // A model from its arguments with a dense first layer, as a list expression.
  const FrameworkRun moe = read_megatron_args(
      "--num-layers 4 --hidden-size 256 --num-attention-heads 4 --vocab-size 1000 --swiglu "
      "--num-experts 8 --moe-router-topk 2 --moe-ffn-hidden-size 128 "
      "--moe-layer-freq '([0]*1+[1]*3)'",
      "moe.args", nullptr);
  REQUIRE(moe.model);
  CHECK(moe.model->num_moe_layers() == 3);
  CHECK(moe.model->layers[0].mlp == MlpKind::dense);
}

TEST_CASE("Megatron-LM's FP8 recipe and DeepEP flags reach the lowering" *
          doctest::test_suite("plumbing")) {
  const ModelSpec m = load_model("tiny-moe");
  const std::string base = "--tensor-model-parallel-size 1 --expert-model-parallel-size 2 ";
  CHECK(read_megatron_args(base + "--fp8-format hybrid", "a.sh", &m).fp8_recipe ==
        Fp8Recipe::delayed); // Megatron-LM's default
  CHECK(read_megatron_args(base + "--fp8-format e4m3 --fp8-recipe tensorwise", "a.sh", &m)
            .fp8_recipe == Fp8Recipe::current);
  CHECK_FALSE(read_megatron_args(base, "a.sh", &m).fp8_recipe);
  const FrameworkRun deepep = read_megatron_args(base + "--moe-enable-deepep", "a.sh", &m);
  CHECK(deepep.ep_dispatcher == EpDispatcher::deepep);
  CHECK(deepep.not_represented.empty());
  CHECK(read_megatron_args(base + "--moe-token-dispatcher-type flex", "a.sh", &m).ep_dispatcher ==
        EpDispatcher::deepep);
  CHECK(read_megatron_args(base + "--moe-token-dispatcher-type flex "
                                  "--moe-flex-dispatcher-backend hybridep",
                           "a.sh", &m)
            .ep_dispatcher == EpDispatcher::hybridep);
  CHECK_FALSE(read_megatron_args(base, "a.sh", &m).ep_dispatcher);
}

TEST_CASE("Megatron-LM arguments mop cannot read are one sentence" *
          doctest::test_suite("plumbing")) {
  const ModelSpec m = load_model("llama3-8b");
  CHECK_THROWS_WITH_AS(read_megatron_args("--tensor-model-parallel-size $TP", "run.sh", &m),
                       "run.sh: uses a shell variable; give the arguments with their values.",
                       mop::InputError);
  CHECK_THROWS_WITH_AS(read_megatron_args("--tensor-model-parallel-size two", "run.sh", &m),
                       "run.sh: --tensor-model-parallel-size takes a whole number from 1 to "
                       "1048576 (got 'two').",
                       mop::InputError);
  CHECK_THROWS_WITH_AS(read_megatron_args("--num-layers 2 --hidden-size 64", "run.sh", nullptr),
                       "run.sh: --num-attention-heads is not given; name the model with --model "
                       "or give its model arguments.",
                       mop::InputError);
}

TEST_CASE("export then import gives the same plan: every Megatron-family plan Megatron-LM can "
          "run" *
          doctest::test_suite("independent")) {
  CHECK(round_trip(Framework::megatron, "llama3-8b", 8192, 2) > 100);
  CHECK(round_trip(Framework::megatron, "qwen3-30b-a3b", 4096, 2) > 100);
}

TEST_CASE("export then import gives the same plan: every DeepSpeed-family plan DeepSpeed can run" *
          doctest::test_suite("independent")) {
  CHECK(round_trip(Framework::deepspeed, "llama3-8b", 8192, 2) > 10);
  CHECK(round_trip(Framework::deepspeed, "qwen3-30b-a3b", 4096, 2) > 10);
}

TEST_CASE("export then import gives the same plan: every FSDP2-family plan torchtitan can run" *
          doctest::test_suite("independent")) {
  CHECK(round_trip(Framework::torchtitan, "llama3-8b", 8192, 2) > 50);
  CHECK(round_trip(Framework::torchtitan, "qwen3-30b-a3b", 4096, 2) > 50);
}

TEST_CASE("torchtitan's legacy TOML and its current overrides give the same plan" *
          doctest::test_suite("independent")) {
  const std::string toml = R"([model]
name = "llama3"
flavor = "8B"
[training]
local_batch_size = 2
global_batch_size = 256
seq_len = 8192
enable_cpu_offload = true
[parallelism]
data_parallel_replicate_degree = 2
data_parallel_shard_degree = 4
tensor_parallel_degree = 2
pipeline_parallel_degree = 1
[activation_checkpoint]
mode = "full"
)";
  const FrameworkRun a = read_torchtitan_config(toml, "job.toml", nullptr);
  CHECK(a.model_id == "llama3-8b");
  CHECK(a.seq == 8192);
  CHECK(a.global_batch == 256);
  const Plan& p = a.plan;
  CHECK(p.attention.tp == 2);
  CHECK(p.micro_batch == 2);
  CHECK(p.state[0].zero == 3);
  CHECK(p.state[0].shard_group == 4); // HSDP: shard over 4, replicate over 2
  CHECK(p.params == Placement::host);
  CHECK(p.torch_host_optimizer);
  CHECK(p.recompute[0] == Recompute::full);
  CHECK(a.compiled == false); // torchtitan's default: eager
  CHECK(read_torchtitan_config(toml + "[compile]\nenable = true\n", "job.toml", nullptr)
            .compiled == true);
  // The same job as the current form's overrides (tyro's dashes, a torchrun prefix).
  const std::string cli =
      "torchrun --nnodes 2 --nproc-per-node 8 -m torchtitan.train --module llama3 --config "
      "llama3_8b --training.local-batch-size 2 --training.global_batch_size=256 "
      "--training.seq_len 8192 --training.enable_cpu_offload "
      "--parallelism.data_parallel_replicate_degree 2 --parallelism.data_parallel_shard_degree "
      "4 --parallelism.tensor_parallel_degree 2 --activation_checkpoint.mode full";
  const FrameworkRun b = read_torchtitan_config(cli, "run.sh", nullptr);
  CHECK(b.model_id == "llama3-8b");
  CHECK(b.nodes == 2);
  CHECK(b.global_batch == a.global_batch);
  CHECK(same_plan(completed(a, 16), completed(b, 16)));
  // Fewer layers on the first and the last stage: (32 + 2 + 2) / 4 = 9 per stage, the first
  // and the last two fewer.
  const FrameworkRun pp = read_torchtitan_config(
      "--module llama3 --config llama3_8b --parallelism.pipeline_parallel_degree 4 "
      "--parallelism.pipeline_parallel_first_stage_less_layers 2 "
      "--parallelism.pipeline_parallel_last_stage_less_layers 2",
      "pp.sh", nullptr);
  CHECK(pp.plan.stage_layers == std::vector<int>{7, 9, 9, 7});
  // torchtitan's default (one fewer each) on 4 stages: (32 + 2) / 4 is not whole, priced even.
  const FrameworkRun odd = read_torchtitan_config(
      "--module llama3 --config llama3_8b --parallelism.pipeline_parallel_degree 4", "pp.sh",
      nullptr);
  CHECK(odd.plan.stage_layers.empty());
  CHECK(odd.not_represented.size() == 1);
}

TEST_CASE("a plan a framework cannot run says which part" * doctest::test_suite("plumbing")) {
  const ModelSpec m = load_model("kimi-k2");
  PlanContext ctx = context(m, 1 << 20, 12);
  ctx.hw.hbm_bytes = 150e9;
  const Plan p = resolve_plan("mop", ctx).plan; // host AdamW streamed into the forward
  const FrameworkConfig c = write_framework_config(Framework::megatron, p, m, 1 << 20, 8, "bf16");
  CHECK(c.text.empty());
  REQUIRE_FALSE(c.cannot_express.empty());
  const bool streams =
      std::any_of(c.cannot_express.begin(), c.cannot_express.end(), [](const std::string& s) {
        return s.find("streams it into the next forward") != std::string::npos;
      });
  CHECK(streams);
}

} // namespace strategies_frameworks_test
