// The `mop` program end to end: CLI.md's names, JSON keys and exit statuses.
#include "common/json_io.hpp"
#include "tests/cli/run_mop.hpp"

#include <doctest/doctest.h>

namespace cli_cli_test {

using mop::Json;
using mop::test::count_lines;
using mop::test::run_mop;

TEST_CASE("mop model show --json prints one object with the contract's keys" *
          doctest::test_suite("plumbing")) {
  const auto r = run_mop("model show kimi-k2 --seq 4K --json");
  REQUIRE(r.status == 0);
  const Json j = Json::parse(r.out);
  for (const char* key : {"name", "total_params", "active_params", "num_layers", "hidden_size",
                          "num_routed_experts", "experts_per_token", "flops_per_token_fwd"})
    CHECK(j.contains(key));
  CHECK(j["num_layers"] == 61);
  CHECK(j["num_routed_experts"] == 384);
  CHECK(j["experts_per_token"] == 8);
  CHECK(j["seq"] == 4096);
}

TEST_CASE("mop model show accepts a config.json path" * doctest::test_suite("plumbing")) {
  const auto r = run_mop(std::string("model show ") + MOP_SOURCE_DIR +
                         "/configs/models/mixtral-8x7b.json --json");
  REQUIRE(r.status == 0);
  CHECK(Json::parse(r.out)["num_routed_experts"] == 8);
}

TEST_CASE("mop model list shows every catalog model in a table and as JSON" *
          doctest::test_suite("plumbing")) {
  const auto text = run_mop("model list");
  CHECK(text.status == 0);
  CHECK(text.out.find("kimi-k2") != std::string::npos);
  CHECK(text.out.find("tiny-moe") != std::string::npos);
  const auto json = run_mop("model list --json");
  REQUIRE(json.status == 0);
  CHECK(Json::parse(json.out)["models"].size() == 13);
}

TEST_CASE("bad input: one sentence on stderr, exit 1, nothing on stdout" *
          doctest::test_suite("plumbing")) {
  for (const char* args :
       {"model show no-such-model", "model show kimi-k2 --seq 0", "model show kimi-k2 --seq 12Q",
        "model show /nonexistent/config.json", "model show " MOP_SOURCE_DIR "/CMakeLists.txt"}) {
    CAPTURE(args);
    const auto r = run_mop(args);
    CHECK(r.status == 1);
    CHECK(count_lines(r.err) == 1);
    CHECK(r.out.empty());
  }
}

TEST_CASE("usage errors exit 2 and --help exits 0 with an example" *
          doctest::test_suite("plumbing")) {
  CHECK(run_mop("model show").status == 2);
  CHECK(run_mop("model show kimi-k2 --no-such-flag").status == 2);
  CHECK(run_mop("").status == 2);
  const auto help = run_mop("model show --help");
  CHECK(help.status == 0);
  CHECK(help.out.find("Example") != std::string::npos);
}

TEST_CASE("an unknown command is a usage error even with --help" *
          doctest::test_suite("plumbing")) {
  const auto r = run_mop("no-such-command --help");
  CHECK(r.status == 2);
  CHECK(count_lines(r.err) == 1);
}

TEST_CASE("validate --row: that row only, its plan and where its step goes, and an unknown id is "
          "refused" *
          doctest::test_suite("plumbing")) {
  const mop::test::MopResult r = mop::test::run_mop("validate --row nemo2407-h100-llama2-7b-8g");
  REQUIRE(r.status == 0);
  CHECK(r.out.find("nemo2407-h100-llama2-7b-8g: Llama 2 7B") != std::string::npos);
  CHECK(r.out.find("plan attn[dp8]") != std::string::npos);
  CHECK(r.out.find("mlp_gate_up") != std::string::npos);
  CHECK(r.out.find("1 rows, 1 predicted") != std::string::npos);
  CHECK(r.out.find("titan-h100-t1-1") == std::string::npos);
  const mop::test::MopResult bad = mop::test::run_mop("validate --row no-such-row");
  CHECK(bad.status == 1);
  CHECK(bad.err.find("no row of the dataset has the id 'no-such-row'.") != std::string::npos);
}

} // namespace cli_cli_test
