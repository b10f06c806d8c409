// mop simulate end to end: the contract's keys, a trace Perfetto can open, determinism.
#include "common/json_io.hpp"
#include "tests/cli/run_mop.hpp"
#include "tests/support/approx.hpp"

#include <doctest/doctest.h>
#include <filesystem>

namespace cli_simulate_test {

using mop::Json;
using mop::test::count_lines;
using mop::test::run_mop;

TEST_CASE("mop simulate --json has every key of memory plus the step's figures" *
          doctest::test_suite("plumbing")) {
  const auto r = run_mop("simulate --model llama3-8b --cluster h100 --nodes 1 --seq 8K "
                         "--global-batch 16 --plan fsdp2 --json");
  REQUIRE(r.status == 0);
  const Json j = Json::parse(r.out);
  for (const char* key :
       {"fits", "peak_hbm_bytes", "hbm_capacity_bytes", "peak_host_bytes", "host_capacity_bytes",
        "memory_breakdown", "worst_rank", "plan", "step_time_s", "tokens_per_s_per_gpu", "mfu",
        "tflops_per_gpu", "breakdown_s"})
    CHECK(j.contains(key));
  for (const char* key : {"compute", "exposed_comm", "bubble", "offload_stall", "optimizer"})
    CHECK(j["breakdown_s"].contains(key));
  // The parts of the critical path add up to the step.
  const Json& b = j["breakdown_s"];
  const double parts = b["compute"].get<double>() + b["exposed_comm"].get<double>() +
                       b["bubble"].get<double>() + b["offload_stall"].get<double>() +
                       b["optimizer"].get<double>();
  CHECK(parts == mop::test::rel(j["step_time_s"].get<double>(), 1e-9));
  // Throughput follows from the step: 16 sequences of 8192 tokens on 8 GPUs.
  CHECK(j["tokens_per_s_per_gpu"].get<double>() ==
        mop::test::rel(16.0 * 8192 / j["step_time_s"].get<double>() / 8));
  // MFU is TFLOPS over the H100's 989 dense BF16 TFLOPS.
  CHECK(j["mfu"].get<double>() == mop::test::rel(j["tflops_per_gpu"].get<double>() / 989.0));
}

TEST_CASE("mop simulate --trace writes a Chrome trace with ops and memory counters, the same "
          "bytes every time" *
          doctest::test_suite("plumbing")) {
  namespace fs = std::filesystem;
  const fs::path a = fs::temp_directory_path() / "mop-sim-a.json";
  const fs::path b = fs::temp_directory_path() / "mop-sim-b.json";
  const std::string args = "simulate --model tiny-moe --cluster h100 --nodes 1 --seq 4K --plan mop";
  REQUIRE(run_mop(args + " --trace " + a.string()).status == 0);
  REQUIRE(run_mop(args + " --trace " + b.string()).status == 0);
  const std::string text = mop::test::slurp(a);
  CHECK(text == mop::test::slurp(b));
  const Json t = Json::parse(text);
  int complete = 0, counters = 0;
  for (const Json& e : t["traceEvents"]) {
    complete += e["ph"] == "X" ? 1 : 0;
    counters += e["ph"] == "C" ? 1 : 0;
  }
  CHECK(complete > 0);
  CHECK(counters > 0);
  fs::remove(a);
  fs::remove(b);
}

TEST_CASE("mop simulate refuses bad input with one sentence and writes no trace" *
          doctest::test_suite("plumbing")) {
  const auto r = run_mop("simulate --model llama3-8b --cluster h100 --nodes 1 --seq 8K "
                         "--plan fsdp2 --trace /nonexistent/dir/t.json");
  CHECK(r.status == 1);
  CHECK(count_lines(r.err) == 1);
  CHECK(run_mop("simulate --model llama3-8b --cluster h100 --nodes 3 --seq 8K --plan fsdp2 "
                "--global-batch 7")
            .status == 1);
}

TEST_CASE("mop simulate --lowering program plays the executable program, MLA included, and the "
          "default plays the cost-only lowering" *
          doctest::test_suite("plumbing")) {
  const auto dense = run_mop("simulate --model llama3-8b --cluster h100 --nodes 1 --seq 8K "
                             "--global-batch 16 --plan fsdp2 --lowering program --json");
  REQUIRE(dense.status == 0);
  CHECK(Json::parse(dense.out)["lowering"] == "program");
  const auto cost = run_mop("simulate --model llama3-8b --cluster h100 --nodes 1 --seq 8K "
                            "--global-batch 16 --plan fsdp2 --json");
  REQUIRE(cost.status == 0);
  CHECK(Json::parse(cost.out)["lowering"] == "cost");
  // Multi-head latent attention, shared experts and DeepSeek's router: in the program as
  // priced-only ops where no executor runs them.
  const auto mla = run_mop("simulate --model deepseek-v3 --cluster h200 --nodes 12 --seq 4K "
                           "--lowering program --json");
  REQUIRE(mla.status == 0);
  CHECK(Json::parse(mla.out)["lowering"] == "program");
  const auto bad = run_mop("simulate --model llama3-8b --cluster h100 --nodes 1 --seq 8K "
                           "--lowering fast");
  CHECK(bad.status == 2);
}

} // namespace cli_simulate_test
