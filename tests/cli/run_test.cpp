// mop run end to end: CLI.md keys, the check against the reference, checkpoint and resume,
// bad input.
#include "common/json_io.hpp"
#include "tests/cli/run_mop.hpp"

#include <cmath>
#include <doctest/doctest.h>
#include <filesystem>
#include <fstream>

using mop::Json;
using mop::test::count_lines;
using mop::test::run_mop;

TEST_CASE("mop run --executor cpu --check --json has the contract's keys" *
          doctest::test_suite("plumbing")) {
  const auto r = run_mop("run --executor cpu --model tiny-moe --ranks 2 --plan fsdp2 --steps 2 "
                         "--check --json");
  REQUIRE(r.status == 0);
  const Json j = Json::parse(r.out);
  CHECK(j["loss"].size() == 2);
  CHECK(j["step_time_s"].get<double>() > 0);
  CHECK(j["ops"].contains("gemm"));
  CHECK(j["ops"]["gemm"].contains("measured_s"));
  CHECK(j["ops"]["gemm"].contains("predicted_s"));
  // float32 ranks against the float64 reference: rounding only.
  CHECK(j["check"]["max_loss_rel_diff"].get<double>() < 1e-5);
  CHECK(j["check"]["max_grad_rel_diff"].get<double>() < 1e-3);
  // The first loss of an untrained model is about ln(vocab) = ln 256.
  CHECK(std::abs(j["loss"][0].get<double>() - std::log(256.0)) < 0.05);
}

TEST_CASE("mop run resumes from a checkpoint exactly" * doctest::test_suite("plumbing")) {
  namespace fs = std::filesystem;
  const fs::path ckpt = fs::temp_directory_path() / "mop-run-test.ckpt";
  const std::string common =
      "run --executor cpu --model tiny-dense --ranks 2 --plan fsdp2 --seq 32 --json";
  const auto whole = run_mop(common + " --steps 3");
  const auto first = run_mop(common + " --steps 2 --save-checkpoint " + ckpt.string());
  const auto rest = run_mop(common + " --steps 1 --resume " + ckpt.string());
  fs::remove(ckpt);
  REQUIRE(whole.status == 0);
  REQUIRE(first.status == 0);
  REQUIRE(rest.status == 0);
  const Json w = Json::parse(whole.out), b = Json::parse(rest.out);
  CHECK(b["first_step"] == 2);
  CHECK(b["loss"][0].get<double>() == w["loss"][2].get<double>());
}

TEST_CASE("mop run refuses bad input with one sentence" * doctest::test_suite("plumbing")) {
  for (const char* args :
       {"run --model tiny-moe --ranks 2 --steps 1",                           // no CUDA executor
        "run --executor cpu --model tiny-moe --ranks 0",                      // no ranks
        "run --executor cpu --model tiny-moe --steps 0",                      // no steps
        "run --executor cpu --model kimi-k2 --ranks 2",                       // MLA attention
        "run --executor cpu --model llama3-8b --ranks 2",                     // too large for a CPU
        "run --executor cpu --model tiny-moe --resume /no/such.ckpt",         // missing file
        "run --executor cpu --model tiny-moe --data /no/such.txt",            // missing file
        "run --executor cpu --model tiny-moe --ranks 3 --plan /no/plan.json", // missing plan
        "run --executor gpu --model tiny-moe"}) {
    CAPTURE(args);
    const auto r = run_mop(args);
    CHECK(r.status == 1);
    CHECK(count_lines(r.err) == 1);
  }
  CHECK(run_mop("run --executor cpu").status == 2); // --model is required
}
