// The plan flags (CLI.md "Common arguments") end to end: they fix parts of the plan on memory
// and simulate, constrain plan, sweep and fit, and bad values keep the exit contract.
#include "common/json_io.hpp"
#include "tests/cli/run_mop.hpp"

#include <doctest/doctest.h>

namespace cli_plan_flags_test {

using mop::Json;
using mop::test::count_lines;
using mop::test::run_mop;

namespace {
const std::string kLlama = "--model llama3-8b --cluster h100 --nodes 2 --seq 8K";
} // namespace

TEST_CASE("simulate and memory take the plan flags and derive the rest" *
          doctest::test_suite("plumbing")) {
  const auto r = run_mop("simulate " + kLlama +
                         " --plan megatron --tp 2 --pp 2 --vp 2 --zero 1 --micro-batch 2 "
                         "--recompute selective --json");
  REQUIRE(r.status == 0);
  const Json plan = Json::parse(r.out)["plan"];
  CHECK(plan["attention"]["tp"] == 2);
  CHECK(plan["dense"]["tp"] == 2);     // Megatron's one TP
  CHECK(plan["attention"]["dp"] == 4); // 16 GPUs / (2 stages x tp 2), derived
  CHECK(plan["pp"] == 2);
  CHECK(plan["vp"] == 2);
  CHECK(plan["schedule"] == "interleaved-1f1b");
  CHECK(plan["micro_batch"] == 2);
  CHECK(plan["state"]["attention"]["zero"] == 1);
  CHECK(plan["recompute"]["attention"] == "selective");
  const auto m = run_mop("memory " + kLlama + " --plan fsdp2 --offload params,grads,opt --json");
  REQUIRE(m.status == 0);
  const Json mp = Json::parse(m.out)["plan"];
  CHECK(mp["params"] == "host");
  CHECK(mp["optimizer_on_host"] == true);
}

TEST_CASE("plan searches only plans with the flags' values" * doctest::test_suite("plumbing")) {
  const auto r = run_mop("plan " + kLlama + " --pp 2 --cp 2 --top 3 --json");
  REQUIRE(r.status == 0);
  const Json j = Json::parse(r.out);
  REQUIRE_FALSE(j["results"].empty());
  for (const Json& res : j["results"]) {
    CHECK(res["plan"]["pp"] == 2);
    CHECK(res["plan"]["attention"]["cp"] == 2);
  }
}

TEST_CASE("global batch in tokens and the GEMM precision" * doctest::test_suite("plumbing")) {
  const auto r = run_mop("memory --model llama3-8b --cluster h100 --nodes 1 --seq 4K "
                         "--global-batch-tokens 1M --json");
  REQUIRE(r.status == 0);
  CHECK(Json::parse(r.out)["plan"]["global_batch"] == 256); // 2^20 / 4096
  // FP8 GEMMs run at twice BF16's peak on H100: the step is shorter.
  auto step = [](const std::string& precision) {
    const auto s = run_mop("simulate --model llama3-8b --cluster h100 --nodes 1 --seq 1K "
                           "--global-batch 16 --plan megatron --tp 1 --pp 1 --precision " +
                           precision + " --json");
    REQUIRE(s.status == 0);
    return Json::parse(s.out)["step_time_s"].get<double>();
  };
  CHECK(step("fp8") < step("bf16"));
}

TEST_CASE("--attention-kernel: the kernel a prediction assumes, printed and priced" *
          doctest::test_suite("plumbing")) {
  // Llama 3 8B at 32K on one H100 node, Megatron's fixed plan: cuDNN by default (Transformer
  // Engine's choice), FlashAttention-2 at about half its speed: a longer step.
  const std::string args = "simulate --model llama3-8b --cluster h100 --nodes 1 --seq 32K "
                           "--global-batch 8 --plan megatron --tp 1 --pp 1 --cp 1";
  const auto text = run_mop(args);
  REQUIRE(text.status == 0);
  CHECK(text.out.find("attention kernel: cudnn") != std::string::npos);
  const auto fa2 = run_mop(args + " --attention-kernel flash2");
  REQUIRE(fa2.status == 0);
  CHECK(fa2.out.find("attention kernel: flash2") != std::string::npos);
  auto step = [&](const std::string& extra) {
    const auto s = run_mop(args + extra + " --json");
    REQUIRE(s.status == 0);
    return Json::parse(s.out)["step_time_s"].get<double>();
  };
  CHECK(step(" --attention-kernel flash2") > step(""));
  CHECK(run_mop(args + " --attention-kernel fa9").status == 2);
}

TEST_CASE("plan flags no plan can take, or that contradict, are one sentence" *
          doctest::test_suite("plumbing")) {
  struct Case {
    std::string args;
    int status;
    std::string sentence;
  };
  const Case cases[] = {
      {"plan --model llama3-8b --cluster h100 --nodes 1 --seq 4K --tp 3", 1,
       "mop: no plan for llama3-8b at 4096 tokens on 8 GPUs has tp 3: plan: attention tp x cp "
       "(3) must divide the 8 ranks of a pipeline stage.\n"},
      {"simulate --model llama3-8b --cluster h100 --nodes 1 --seq 4K --precision mxfp8", 1,
       "mop: --precision mxfp8 needs a Blackwell GPU; h100 is NVIDIA H100 80GB HBM3 (hopper): "
       "use --precision fp8.\n"},
      {"simulate --model llama3-8b --cluster a100 --nodes 1 --seq 4K --precision fp8", 1,
       "mop: --precision fp8 needs FP8 tensor cores (Hopper or Blackwell); a100 is NVIDIA "
       "A100-SXM4-80GB (ampere), which has none: use --precision bf16.\n"},
      {"simulate --model llama3-8b --cluster a100 --nodes 1 --seq 4K --precision mxfp8", 1,
       "mop: --precision mxfp8 needs a Blackwell GPU; a100 is NVIDIA A100-SXM4-80GB (ampere): "
       "use --precision bf16.\n"},
      {"memory --model llama3-8b --cluster h100 --nodes 1 --seq 4K --zero 4", 1,
       "mop: --zero must be a whole number from 0 to 3 (got 4).\n"},
      {"memory --model llama3-8b --cluster h100 --nodes 1 --seq 3000 --global-batch-tokens 1M", 1,
       "mop: --global-batch-tokens 1M (1048576 tokens) must be a whole number of sequences of "
       "3000 tokens, at most 16777216 of them.\n"},
      {"memory --model llama3-8b --cluster h100 --nodes 1 --seq 4K --offload disk", 1,
       "mop: --offload takes 'none' or a comma-separated list of params, grads, opt, act (got "
       "'disk').\n"},
  };
  for (const Case& c : cases) {
    CAPTURE(c.args);
    const auto r = run_mop(c.args);
    CHECK(r.status == c.status);
    CHECK(r.out.empty());
    CHECK(r.err == c.sentence);
  }
  // Usage errors: a value outside a flag's set, two flags that exclude each other.
  for (const char* args :
       {"memory --model llama3-8b --cluster h100 --nodes 1 --seq 4K --cp-kind star",
        "memory --model llama3-8b --cluster h100 --nodes 1 --seq 4K --sp --no-sp",
        "memory --model llama3-8b --cluster h100 --nodes 1 --seq 4K --global-batch 8 "
        "--global-batch-tokens 1M"}) {
    CAPTURE(args);
    const auto r = run_mop(args);
    CHECK(r.status == 2);
    CHECK(count_lines(r.err) == 1);
  }
}

TEST_CASE("sweep and fit treat flags no plan takes at a size as no plan there" *
          doctest::test_suite("plumbing")) {
  // tp 8 x pp 2 needs 16 GPUs: one node has no such plan, two do.
  const auto s = run_mop("sweep --model llama3-8b --cluster h100 --nodes 1 --seq 4K --family "
                         "megatron --tp 8 --pp 2 --json");
  REQUIRE(s.status == 0);
  const Json row = Json::parse(s.out)["rows"][0];
  CHECK(row["fits"] == false);
  CHECK(row["why"].get<std::string>().find("must divide the 4 ranks") != std::string::npos);
  const auto f = run_mop("fit --model llama3-8b --cluster h100 --seq 4K --family megatron --tp 8 "
                         "--pp 2 --json");
  REQUIRE(f.status == 0);
  CHECK(Json::parse(f.out)["nodes"] == 2);
}

} // namespace cli_plan_flags_test
