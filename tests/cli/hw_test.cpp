// `mop hw` end to end: CLI.md's JSON keys, nccl-tests figures, exit statuses.
#include "common/json_io.hpp"
#include "tests/cli/run_mop.hpp"
#include "tests/support/approx.hpp"

#include <algorithm>
#include <doctest/doctest.h>
#include <filesystem>
#include <fstream>

namespace cli_hw_test {

using mop::Json;
using mop::test::count_lines;
using mop::test::run_mop;

TEST_CASE("mop hw list shows the five node types in a table and as JSON" *
          doctest::test_suite("plumbing")) {
  const auto text = run_mop("hw list");
  REQUIRE(text.status == 0);
  for (const char* id : {"a100", "h100", "h100-96gb-500w", "h200", "b200"})
    CHECK(text.out.find(id) != std::string::npos);
  const auto json = run_mop("hw list --json");
  REQUIRE(json.status == 0);
  CHECK(Json::parse(json.out)["clusters"].size() == 5);
}

TEST_CASE("mop hw show --json prints one object with the contract's keys" *
          doctest::test_suite("plumbing")) {
  const auto r = run_mop("hw show h200 --json");
  REQUIRE(r.status == 0);
  const Json j = Json::parse(r.out);
  // CLI.md: gpu.name, gpu.hbm_bytes, gpu.peak_flops_bf16, gpu.hbm_bandwidth, node.gpus_per_node,
  // node.host_memory_bytes. Values from hardware.md §1.1 and §2.1.
  CHECK(j["gpu"]["name"].is_string());
  CHECK(j["gpu"]["hbm_bytes"] == 143156.0 * 1024 * 1024);
  CHECK(j["gpu"]["peak_flops_bf16"] == 989e12);
  CHECK(j["gpu"]["hbm_bandwidth"] == 4.8e12);
  CHECK(j["node"]["gpus_per_node"] == 8);
  CHECK(j["node"]["host_memory_bytes"] == 2.0 * 1024 * 1024 * 1024 * 1024);
  CHECK(j["sources"]["gpu.hbm_bytes"].get<std::string>().starts_with("MEAS:"));
  const auto text = run_mop("hw show b200");
  CHECK(text.status == 0);
  CHECK(text.out.find("sources:") != std::string::npos);
  // The table keeps to a terminal's width: each attention kernel's curves are rows of their own
  // (a cluster's nested figures used to print as one JSON cell hundreds of characters wide).
  const auto h100 = run_mop("hw show h100");
  REQUIRE(h100.status == 0);
  const std::string table = h100.out.substr(0, h100.out.find("sources:"));
  std::size_t widest = 0, start = 0;
  while (start < table.size()) {
    const std::size_t end = std::min(table.find('\n', start), table.size());
    if (start > 0) // the first line is the node type's description
      widest = std::max(widest, end - start);
    start = end + 1;
  }
  CHECK(widest < 120);
  CHECK(table.find("gpu.attention_kernels.cudnn.attention_fwd (d=128)") != std::string::npos);
}

TEST_CASE("mop hw show accepts a cluster JSON path" * doctest::test_suite("plumbing")) {
  const auto r =
      run_mop(std::string("hw show ") + MOP_SOURCE_DIR + "/configs/clusters/h100.json --json");
  REQUIRE(r.status == 0);
  CHECK(Json::parse(r.out)["name"] == "h100");
}

TEST_CASE("mop hw collective reproduces nccl-tests figures with the contract's keys" *
          doctest::test_suite("independent")) {
  // 8×H200 all-reduce at 8 GiB: NVLS ≈480 GB/s busbw, algbw ≈275 (Azure ND H200 v5; nccl-tests
  // #212). --ranks-per-node defaults to min(ranks, 8).
  const auto r =
      run_mop("hw collective --cluster h200 --op all_reduce --bytes 8G --ranks 8 --json");
  REQUIRE(r.status == 0);
  const Json j = Json::parse(r.out);
  for (const char* key : {"time_s", "algbw", "busbw", "algorithm"})
    CHECK(j.contains(key));
  CHECK(j["busbw"].get<double>() / 1e9 == mop::test::rel(480, 0.10));
  CHECK(j["algbw"].get<double>() / 1e9 == mop::test::rel(275, 0.10));
  CHECK(j["busbw"].get<double>() == mop::test::rel(j["algbw"].get<double>() * 2 * 7 / 8));
  CHECK(j["ranks_per_node"] == 8);
  // 16 nodes × 8 GPUs, all-gather: ≈370 GB/s, 8 × 46–47 GB/s NICs (hardware.md §3.3).
  const auto inter =
      run_mop("hw collective --cluster h100 --op all_gather --bytes 8G --ranks 128 --json");
  REQUIRE(inter.status == 0);
  CHECK(Json::parse(inter.out)["busbw"].get<double>() / 1e9 == mop::test::rel(370, 0.10));
  CHECK(Json::parse(inter.out)["nodes"] == 16);
}

TEST_CASE("mop hw collective prints an nccl-tests-like table, one row per size" *
          doctest::test_suite("plumbing")) {
  const auto r = run_mop("hw collective --cluster h200 --op reduce_scatter --bytes 1M --min-bytes "
                         "1K --ranks 16 --ranks-per-node 8");
  REQUIRE(r.status == 0);
  CHECK(r.out.find("busbw (GB/s)") != std::string::npos);
  CHECK(r.out.find("1048576") != std::string::npos);
  CHECK(r.out.find("    1024") != std::string::npos);
  const auto forced = run_mop("hw collective --cluster h200 --op all_reduce --bytes 1G --ranks 8 "
                              "--algo ring --json");
  REQUIRE(forced.status == 0);
  CHECK(Json::parse(forced.out)["algorithm"] == "Ring");
}

TEST_CASE("mop hw collective uses a calibration file" * doctest::test_suite("plumbing")) {
  const auto r = run_mop(std::string("hw collective --cluster h200 --op all_reduce --bytes 64M "
                                     "--ranks 8 --json --calibration ") +
                         MOP_SOURCE_DIR + "/configs/calibration/example-h200.json");
  REQUIRE(r.status == 0);
  const Json j = Json::parse(r.out);
  CHECK(j["algorithm"] == "calibrated");
  CHECK(j["time_s"] == 3.3e-4); // the example file's measured point
}

TEST_CASE("mop hw bad input: one sentence on stderr, exit 1, nothing on stdout" *
          doctest::test_suite("plumbing")) {
  namespace fs = std::filesystem;
  const fs::path bad = fs::temp_directory_path() / "mop-hw-cli-missing-field.json";
  {
    Json j = Json::parse(run_mop("hw show h200 --json").out);
    j["node"].erase("nic_bandwidth");
    std::ofstream(bad) << j.dump();
  }
  const std::string bad_cluster = "hw show " + bad.string();
  for (const std::string& args :
       {std::string("hw collective --cluster h200 --op gossip --bytes 1024 --ranks 8 --json"),
        std::string("hw collective --cluster h200 --op all_reduce --bytes 1G --ranks 16 "
                    "--ranks-per-node 9"),
        std::string("hw collective --cluster h200 --op all_reduce --bytes 1G --ranks 12 "
                    "--ranks-per-node 8"),
        std::string("hw collective --cluster h200 --op all_reduce --bytes 0 --ranks 8"),
        std::string(
            "hw collective --cluster h200 --op all_to_all --bytes 1G --ranks 8 --algo nvls"),
        std::string("hw collective --cluster v100 --op all_reduce --bytes 1G --ranks 8"),
        std::string("hw show v100"), bad_cluster}) {
    CAPTURE(args);
    const auto r = run_mop(args);
    CHECK(r.status == 1);
    CHECK(count_lines(r.err) == 1);
    CHECK(r.out.empty());
  }
  const auto missing = run_mop(bad_cluster);
  CHECK(missing.err.find("field 'nic_bandwidth' is missing") != std::string::npos);
  fs::remove(bad);
}

TEST_CASE("mop hw usage errors exit 2 and every subcommand's help has an example" *
          doctest::test_suite("plumbing")) {
  CHECK(run_mop("hw").status == 2);
  CHECK(run_mop("hw collective --cluster h200 --op all_reduce --bytes 1G").status == 2);
  for (const char* sub : {"list", "show", "collective"}) {
    CAPTURE(sub);
    const auto help = run_mop(std::string("hw ") + sub + " --help");
    CHECK(help.status == 0);
    CHECK(help.out.find("Example") != std::string::npos);
  }
}

} // namespace cli_hw_test
