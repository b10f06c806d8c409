#include "common/embedded.hpp"
#include "common/error.hpp"
#include "hw_models/cluster.hpp"
#include "tests/support/approx.hpp"

#include <doctest/doctest.h>
#include <filesystem>
#include <fstream>
#include <string>

namespace hw_models_cluster_test {

using namespace mop::hw;
using mop::Json;

namespace {

constexpr double MiB = 1024.0 * 1024.0;

// A user's cluster file: the built-in h200 with one change, written to a temporary path.
std::string write_variant(const std::string& name, void (*edit)(Json&)) {
  Json j = mop::parse_json(*mop::embedded_text("clusters", "h200"), "h200");
  edit(j);
  const auto path = std::filesystem::temp_directory_path() / ("mop-cluster-test-" + name + ".json");
  std::ofstream(path) << j.dump(2);
  return path.string();
}

std::string load_error(const std::string& path) {
  try {
    load_cluster(path);
  } catch (const mop::InputError& e) {
    return e.what();
  }
  return "accepted";
}

} // namespace

TEST_CASE("the built-in node types are a100, b200, h100, h100-96gb-500w and h200" *
          doctest::test_suite("plumbing")) {
  CHECK(cluster_ids() ==
        std::vector<std::string>{"a100", "b200", "h100", "h100-96gb-500w", "h200"});
}

TEST_CASE("h200 loads and each figure matches hardware.md" * doctest::test_suite("plumbing")) {
  const ClusterSpec c = load_cluster("h200");
  CHECK(c.name == "h200");
  // §1.1: CUDA totalGlobalMem 143,156 MiB (cuda-samples #311); 4.8 TB/s; 989 / 1,979 TFLOPS; 132
  // SMs.
  CHECK(c.gpu.hbm_bytes == 143156 * MiB);
  CHECK(c.gpu.hbm_bandwidth == 4.8e12);
  CHECK(c.gpu.hbm_bandwidth_achievable == 4.01e12); // Azure ND H200 v5 STREAM copy
  CHECK(c.gpu.peak_flops_bf16 == 989e12);
  CHECK(c.gpu.peak_flops_fp8 == 1979e12);
  CHECK(c.gpu.sm_count == 132);
  CHECK(c.gpu.gemm_efficiency_fp8 == mop::test::rel(1453.4 / 1979, 0.001)); // MAMF
  // §2: 8 GPUs, NVLink 4 450 GB/s per direction, NCCL's 18 × 20.6 GB/s, copy engine 396.4 GB/s.
  CHECK(c.node.gpus_per_node == 8);
  CHECK(c.node.nvlink_bandwidth == 450e9);
  CHECK(c.node.nvlink_nccl_bandwidth == mop::test::rel(18 * 20.6e9));
  CHECK(c.node.nvlink_copy_bandwidth == 396.4e9);
  CHECK(c.node.nvls);
  CHECK(c.node.nvls_efficiency == 0.85);
  // §2.3: Gen5 x16 63 GB/s spec, 55.43 / 55.06 GB/s pinned (nvbandwidth on 8×H200).
  CHECK(c.node.pcie_bandwidth == 63e9);
  CHECK(c.node.pcie_h2d_bandwidth == 55.43e9);
  CHECK(c.node.pcie_d2h_bandwidth == 55.06e9);
  CHECK(c.node.nic_shares_pcie_switch);
  // §2.1: 2 × 56-core 8480C, 2 TB of 64 GB DIMMs, 8 channels × 4800 MT/s × 8 B × 2 sockets.
  CHECK(c.node.host_cores == 112);
  CHECK(c.node.host_memory_bytes == 32 * 64 * 1024 * MiB);
  CHECK(c.node.host_memory_bandwidth == mop::test::rel(2 * 8 * 4800e6 * 8));
  // §2.4: 8 × 400 Gb/s NDR, NCCL reaches 46–48 GB/s per NIC.
  CHECK(c.node.nics == 8);
  CHECK(c.node.nic_line_rate == 400e9 / 8);
  CHECK(c.node.nic_bandwidth >= 46e9);
  CHECK(c.node.nic_bandwidth <= 48e9);
  CHECK(c.fabric.topology == "rail-optimized");
  // §4: 1.5e9 params/s per node, 30 B per parameter.
  CHECK(c.host_optimizer.adam_params_per_s == 1.5e9);
  CHECK(c.host_optimizer.adam_bytes_per_param == 30);
}

TEST_CASE("h100 loads and differs from h200 where hardware.md §6.2 says" *
          doctest::test_suite("plumbing")) {
  const ClusterSpec c = load_cluster("h100");
  CHECK(c.gpu.hbm_bytes == 81089 * MiB);            // modal-client PR #2797: 81,089 MiB
  CHECK(c.gpu.hbm_bandwidth == 3.35e12);            // §1.1
  CHECK(c.gpu.hbm_bandwidth_achievable == 2.90e12); // Azure ND H100 v5 STREAM copy
  CHECK(c.gpu.peak_flops_bf16 == 989e12);
  CHECK(c.gpu.gemm_efficiency_bf16 == mop::test::rel(794.5 / 989, 0.001)); // MAMF
  CHECK(c.gpu.gemm_efficiency_fp8 == mop::test::rel(1402.6 / 1979, 0.001));
  CHECK(c.node.gpus_per_node == 8);
  CHECK(c.node.nvlink_bandwidth == 450e9);
  CHECK(c.node.host_cores == 112);
}

TEST_CASE("b200 loads with its own figures from hardware.md §1.1 and §6.3" *
          doctest::test_suite("plumbing")) {
  const ClusterSpec c = load_cluster("b200");
  CHECK(c.gpu.arch == GpuArch::blackwell);
  CHECK(c.gpu.hbm_bytes == 182631 * MiB); // pytorch/ao PR #4002: 178.35 GiB
  // pytorch/ao PR #4002: a 7,680-bit bus at 3,996 MHz, double data rate.
  CHECK(c.gpu.hbm_bandwidth == mop::test::rel(7680.0 / 8 * 3996e6 * 2, 0.001));
  CHECK(c.gpu.peak_flops_bf16 == 2250e12);
  CHECK(c.gpu.peak_flops_fp8 == 4500e12);
  CHECK(c.gpu.sm_count == 148);
  CHECK(c.gpu.gemm_efficiency_bf16 == mop::test::rel(1745.0 / 2250, 0.001));
  CHECK(c.node.nvlink_bandwidth == 900e9);
  CHECK(c.node.nvlink_nccl_bandwidth == mop::test::rel(18 * 40.1e9)); // topo.h SM100
  CHECK(c.node.nvls_efficiency == 0.74);                              // tuning.cc Blackwell
  CHECK(c.node.host_cores == 112);
  CHECK(c.node.nics == 8);
}

TEST_CASE("every figure of a built-in node type carries a source with its tag" *
          doctest::test_suite("plumbing")) {
  for (const std::string& id : cluster_ids()) {
    const ClusterSpec c = load_cluster(id);
    const Json j = cluster_to_json(c);
    for (const char* section : {"gpu", "node", "fabric", "host_optimizer", "overheads"})
      for (const auto& [key, value] : j[section].items()) {
        if (value.is_string() && key != "arch" && key != "cpu_vendor")
          continue; // names, not figures
        const std::string field = std::string(section) + "." + key;
        CAPTURE(id);
        CAPTURE(field);
        const std::string source = source_of(c, field);
        const std::string tag = source.substr(0, source.find(':'));
        CHECK(
            (tag == "DS" || tag == "MEAS" || tag == "MAINT" || tag == "CODE" || tag == "DERIVED"));
        CHECK(source.size() > tag.size() + 10);
      }
  }
}

TEST_CASE("a user's cluster JSON loads by path and is named after its name field" *
          doctest::test_suite("plumbing")) {
  const std::string path = write_variant("user", [](Json& j) {
    j["name"] = "my-h200";
    j["node"]["nics"] = 4; // 2 GPUs per NIC
    j.erase("sources");
  });
  const ClusterSpec c = load_cluster(path);
  CHECK(c.name == "my-h200");
  CHECK(c.node.nics == 4);
  CHECK(c.sources.empty());
  std::filesystem::remove(path);
}

TEST_CASE("bad cluster files: one sentence naming the file, the field and what is allowed" *
          doctest::test_suite("plumbing")) {
  struct Case {
    const char* name;
    void (*edit)(Json&);
    const char* expected; // after "<path>, section ..."
  };
  const Case cases[] = {
      {"missing", [](Json& j) { j["gpu"].erase("hbm_bandwidth"); },
       ", section 'gpu': field 'hbm_bandwidth' is missing; it must be a positive number."},
      {"zero", [](Json& j) { j["node"]["nvlink_bandwidth"] = 0; },
       ", section 'node': field 'nvlink_bandwidth' must be a positive number (got 0)."},
      {"negative", [](Json& j) { j["node"]["nic_bandwidth"] = -47e9; },
       ", section 'node': field 'nic_bandwidth' must be a positive number (got -47000000000.0)."},
      {"arch", [](Json& j) { j["gpu"]["arch"] = "volta"; },
       ", section 'gpu': field 'arch' must be \"ampere\", \"hopper\" or \"blackwell\" (got "
       "\"volta\")."},
      {"fp8-efficiency-without-fp8",
       [](Json& j) {
         j["gpu"]["peak_flops_fp8"] = 0;
         j["gpu"]["gemm_efficiency_fp8"] = 0.7;
       },
       ", section 'gpu': field 'gemm_efficiency_fp8' must be 0 when peak_flops_fp8 is 0 (no FP8 "
       "tensor cores) (got 0.7)."},
      {"nvls-without-efficiency", [](Json& j) { j["node"]["nvls_efficiency"] = 0; },
       ", section 'node': field 'nvls_efficiency' must be a positive number (got 0)."},
      {"above-line-rate", [](Json& j) { j["node"]["nic_bandwidth"] = 60e9; },
       ", section 'node': field 'nic_bandwidth' must be at most nic_line_rate (got "
       "60000000000.0)."},
      {"points-order",
       [](Json& j) {
         j["gpu"]["attention_kernels"]["cudnn"]["attention_fwd"][0]["points"][1]["seq_len"] = 8192;
       },
       "points[1]: field 'seq_len' must be longer than the point before it (got 8192)."},
      {"points-mixed",
       [](Json& j) {
         j["gpu"]["attention_kernels"]["cudnn"]["attention_bwd"][0]["points"][1]["causal"] = true;
       },
       "points[1]: field 'causal' must be the same for every point of a curve (got true)."},
      {"typo", [](Json& j) { j["gpu"]["hbm_bandwith"] = 1; },
       ", section 'gpu': field 'hbm_bandwith' is not known; allowed: name, arch, hbm_bytes,"},
      {"untagged", [](Json& j) { j["sources"]["gpu.hbm_bytes"] = "nvidia-smi"; },
       ": source of 'gpu.hbm_bytes' must start with a tag, one of DS, MEAS, MAINT, CODE, DERIVED, "
       "and a colon (got \"nvidia-smi\")."},
  };
  for (const Case& c : cases) {
    CAPTURE(c.name);
    const std::string path = write_variant(c.name, c.edit);
    const std::string msg = load_error(path);
    CHECK(msg.starts_with(path));
    CHECK(msg.find(c.expected) != std::string::npos);
    CHECK(msg.find('\n') == std::string::npos);
    std::filesystem::remove(path);
  }
}

TEST_CASE("an unknown node type lists the built-in ones" * doctest::test_suite("plumbing")) {
  CHECK_THROWS_WITH_AS(load_cluster("v100"),
                       "'v100' is neither a built-in node type nor a cluster JSON path; built-in: "
                       "a100, b200, h100, h100-96gb-500w, h200.",
                       mop::InputError);
  CHECK_THROWS_AS(load_cluster("/nonexistent/cluster.json"), mop::InputError);
}

} // namespace hw_models_cluster_test
