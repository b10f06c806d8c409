// Framework configurations end to end: --from on memory, simulate and plan, --emit on plan, and
// the emitted configuration read back by --from giving the same plan.
#include "common/json_io.hpp"
#include "tests/cli/run_mop.hpp"

#include <doctest/doctest.h>
#include <filesystem>
#include <fstream>

namespace cli_frameworks_test {

using mop::Json;
using mop::test::count_lines;
using mop::test::run_mop;

namespace {
const std::string kLlamaScript =
    std::string(MOP_SOURCE_DIR) + "/configs/frameworks/llama3-8b-megatron.sh";
const std::string kQwenDs =
    std::string(MOP_SOURCE_DIR) + "/configs/frameworks/qwen3-30b-a3b-deepspeed.json";
} // namespace

TEST_CASE("--from megatron: the run's plan, model, sequence, batch and nodes" *
          doctest::test_suite("plumbing")) {
  const auto r = run_mop("simulate --cluster h100 --from megatron:" + kLlamaScript + " --json");
  REQUIRE(r.status == 0);
  const Json j = Json::parse(r.out);
  CHECK(j["plan"]["world"] == 16); // torchrun --nnodes 2 --nproc-per-node 8
  CHECK(j["plan"]["attention"]["tp"] == 2);
  CHECK(j["plan"]["pp"] == 2);
  CHECK(j["plan"]["global_batch"] == 512);
  CHECK(j["plan"]["recompute"]["attention"] == "selective");
  CHECK(j["not_represented"].empty());
  CHECK(r.err.empty());
  // Flags still apply on top of the configuration.
  const auto m =
      run_mop("memory --cluster h100 --from megatron:" + kLlamaScript + " --tp 4 --json");
  REQUIRE(m.status == 0);
  CHECK(Json::parse(m.out)["plan"]["attention"]["tp"] == 4);
}

TEST_CASE("--from deepspeed needs the model and takes EP as a flag" *
          doctest::test_suite("plumbing")) {
  const auto r = run_mop("memory --model qwen3-30b-a3b --cluster h100 --nodes 2 --seq 8K "
                         "--from deepspeed:" +
                         kQwenDs + " --ep 8 --json");
  REQUIRE(r.status == 0);
  const Json p = Json::parse(r.out)["plan"];
  CHECK(p["moe"]["ep"] == 8);
  CHECK(p["attention"]["cp"] == 2);
  CHECK(p["attention"]["cp_kind"] == "ulysses");
  CHECK(p["state"]["moe"]["zero"] == 3);
  CHECK(p["optimizer_on_host"] == true);
  const auto no_model =
      run_mop("memory --cluster h100 --nodes 2 --seq 8K --from deepspeed:" + kQwenDs);
  CHECK(no_model.status == 1);
  CHECK(no_model.err.find("a DeepSpeed config does not describe the model; name it with "
                          "--model.") != std::string::npos);
  CHECK(count_lines(no_model.err) == 1);
}

TEST_CASE("plan --from ranks the configuration beside the best plan, and --emit writes a launch "
          "configuration that --from reads back as that plan" *
          doctest::test_suite("plumbing")) {
  const auto r = run_mop("plan --cluster h100 --from megatron:" + kLlamaScript +
                         " --emit megatron --top 1 --json");
  REQUIRE(r.status == 0);
  const Json j = Json::parse(r.out);
  REQUIRE(j["imported"].is_object());
  CHECK(j["imported"]["tokens_per_s_per_gpu"].get<double>() <=
        j["results"][0]["tokens_per_s_per_gpu"].get<double>());
  REQUIRE(j["emit"]["config"].is_string());
  const auto dir =
      std::filesystem::temp_directory_path() / ("mop-emit-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const auto script = dir / "best.sh";
  std::ofstream(script) << j["emit"]["config"].get<std::string>();
  const auto back = run_mop("memory --cluster h100 --from megatron:" + script.string() + " --json");
  REQUIRE(back.status == 0);
  Json a = j["emit"]["plan"]["plan"], b = Json::parse(back.out)["plan"];
  a.erase("family");
  b.erase("family");
  CHECK(a == b);
  std::filesystem::remove_all(dir);
}

TEST_CASE("--emit for a plan the framework cannot run names the parts and gives the best it can" *
          doctest::test_suite("plumbing")) {
  const auto r = run_mop("plan --model kimi-k2 --cluster h200 --nodes 12 --seq 1M --emit "
                         "megatron --top 1 --json");
  REQUIRE(r.status == 0);
  const Json e = Json::parse(r.out)["emit"];
  CHECK_FALSE(e["best_cannot_express"].empty());
  if (e["config"].is_string())
    CHECK(e["config"].get<std::string>().find("--expert-model-parallel-size") != std::string::npos);
}

TEST_CASE("--from: bad framework, missing file, --plan beside it" *
          doctest::test_suite("plumbing")) {
  const auto fw = run_mop("memory --cluster h100 --from nemo:x.yaml");
  CHECK(fw.status == 1);
  CHECK(fw.err == "mop: the framework must be megatron, torchtitan or deepspeed (got 'nemo').\n");
  const auto shape = run_mop("memory --cluster h100 --from run.sh");
  CHECK(shape.status == 1);
  const auto both = run_mop("memory --cluster h100 --plan mop --from megatron:" + kLlamaScript);
  CHECK(both.status == 2);
  const auto none = run_mop("memory --cluster h100 --nodes 1 --seq 4K");
  CHECK(none.status == 2); // no --model and no --from
}

TEST_CASE("--from torchtitan: the job TOML names a catalog model, and --emit torchtitan reads "
          "back as its plan" *
          doctest::test_suite("plumbing")) {
  const std::string toml =
      std::string(MOP_SOURCE_DIR) + "/configs/frameworks/llama3-8b-torchtitan.toml";
  const auto r = run_mop("plan --cluster h100 --nodes 2 --from torchtitan:" + toml +
                         " --family fsdp2 --emit torchtitan --top 1 --json");
  REQUIRE(r.status == 0);
  const Json j = Json::parse(r.out);
  CHECK(j["imported"]["plan"]["attention"]["tp"] == 2);
  CHECK(j["imported"]["plan"]["state"]["attention"]["zero"] == 3);
  REQUIRE(j["emit"]["config"].is_string());
  const auto dir =
      std::filesystem::temp_directory_path() / ("mop-titan-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const auto script = dir / "best.sh";
  std::ofstream(script) << j["emit"]["config"].get<std::string>();
  const auto back =
      run_mop("memory --cluster h100 --from torchtitan:" + script.string() + " --json");
  REQUIRE(back.status == 0);
  Json a = j["emit"]["plan"]["plan"], b = Json::parse(back.out)["plan"];
  CHECK(a == b);
  std::filesystem::remove_all(dir);
}

} // namespace cli_frameworks_test
