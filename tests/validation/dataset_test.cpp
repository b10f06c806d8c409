// The shipped dataset: every row parses, translates to a fixed plan or says why not, and the
// memory model's error on the published peak memories stays within the bound measured when it
// was first run (docs/VALIDATION.md).
#include "common/error.hpp"
#include "hw_models/cluster.hpp"
#include "strategies/hardware.hpp"
#include "strategies/memory.hpp"
#include "validation/dataset.hpp"

#include "tests/support/approx.hpp"
#include "tests/support/errors.hpp"
#include <cmath>

#include <doctest/doctest.h>
#include <filesystem>
#include <fstream>
#include <set>
#include <sys/stat.h>
#include <unistd.h>

namespace validation_dataset_test {

using namespace mop;
using namespace mop::validation;

TEST_CASE("the shipped dataset parses: 86 published rows with unique ids" *
          doctest::test_suite("plumbing")) {
  const std::vector<Row> rows = read_dataset(default_dataset_path());
  CHECK(rows.size() == 86);
  std::set<std::string> ids;
  for (const Row& r : rows)
    ids.insert(r.id);
  CHECK(ids.size() == rows.size());
}

TEST_CASE("every row becomes a fixed plan or states why it cannot yet" *
          doctest::test_suite("plumbing")) {
  int translated = 0;
  for (const Row& r : read_dataset(default_dataset_path())) {
    const Translation t = translate(r);
    CAPTURE(r.id);
    CHECK(t.plan.has_value() == t.reason.empty());
    if (r.gpu == "GB200" || r.gpu == "GB300")
      CHECK(t.reason.find(r.gpu) != std::string::npos);
    if (r.gpu == "A100") // the a100 node type (DGX A100 80GB)
      CHECK(t.plan.has_value());
    translated += t.plan ? 1 : 0;
  }
  CHECK(translated >= 79);
}

TEST_CASE("a malformed line names the file and the line" * doctest::test_suite("plumbing")) {
  const auto path = std::filesystem::temp_directory_path() / "mop-bad.jsonl";
  std::ofstream(path) << "{\"id\": \"a\"}\n{broken\n";
  try {
    read_dataset(path.string());
    FAIL("accepted");
  } catch (const InputError& e) {
    CHECK(std::string(e.what()).starts_with(path.string() + ":1: field 'gpu' is missing"));
  }
  std::filesystem::remove(path);
}

TEST_CASE("peak memory against the published measurements: MAPE within the recorded bound" *
          doctest::test_suite("fitted")) {
  double sum = 0;
  int n = 0;
  for (const Row& r : read_dataset(default_dataset_path())) {
    if (!r.measured.contains("peak_mem_gib"))
      continue;
    const Translation t = translate(r);
    if (!t.plan)
      continue;
    const hw::ClusterSpec c = hw::load_cluster(t.cluster_id);
    const strategy::MemoryReport m =
        strategy::analyze_memory(*t.model, *t.plan, r.seq_len, strategy::memory_hardware(c));
    const double measured = r.measured["peak_mem_gib"].get<double>() * 1024 * 1024 * 1024;
    const double err = std::fabs(m.peak_hbm_bytes - measured) / measured;
    MESSAGE(r.id << ": measured " << measured / 1073741824.0 << " GiB, predicted "
                 << m.peak_hbm_bytes / 1073741824.0 << " GiB (" << 100 * err << " %)");
    sum += err;
    ++n;
  }
  REQUIRE(n >= 10);
  const double mape = sum / n;
  MESSAGE("peak-memory MAPE over " << n << " rows: " << 100 * mape << " %");
  // First honest measurement: 29.2 % over 14 torchtitan rows (docs/VALIDATION.md explains what
  // dominates). The bound only stops it getting worse; tighten it as the model improves.
  CHECK(mape < 0.32);
}

namespace {
// One dataset row of Llama 3 8B on H100 with the given GPUs and parallelism, and extra fields
// (`"key": value, ` each).
Row row_with(const std::string& num_gpus, const std::string& parallelism,
             const std::string& fields = "") {
  const auto path = std::filesystem::temp_directory_path() / "mop-degrees.jsonl";
  std::ofstream(path) << R"({"id": "r", "model_id": "llama3-8b", "gpu": "H100", )" << fields
                      << R"("num_gpus": )" << num_gpus << R"(, "seq_len": 4096, "parallelism": )"
                      << parallelism << R"(, "measured": {"mfu": 0.4}})"
                      << "\n";
  std::vector<Row> rows = read_dataset(path.string());
  std::filesystem::remove(path);
  REQUIRE(rows.size() == 1);
  return rows[0];
}
} // namespace

TEST_CASE("absurd parallel degrees: past the ceiling a sentence naming the row, below it a reason" *
          doctest::test_suite("plumbing")) {
  // tp·cp = 2^16·2^16 wrapped to 0 in int and `mop validate` died of SIGFPE dividing by it.
  const Translation t = translate(row_with("1048576", R"({"tp": 65536, "cp": 65536})"));
  CHECK_FALSE(t.plan);
  CHECK(t.reason == "its published degrees do not form a valid plan: plan: attention tp x cp "
                    "(4294967296) must divide the 1048576 ranks of a pipeline stage.");
  // pp = vp = 2^20 imply 2·pp·vp = 2^41 micro-batches of one sequence by default.
  const Translation b = translate(row_with("1048576", R"({"pp": 1048576, "vp": 1048576})"));
  CHECK(b.reason == "its degrees imply a global batch of 2199023255552 sequences, above mop's "
                    "ceiling of 16777216; give global_batch_size.");
  // Past what any world holds: the row is malformed, as a negative degree is.
  const Row r = row_with("8", R"({"tp": 4294967295})");
  CHECK(
      mop::test::input_error_of([&] { translate(r); })
          .ends_with(
              ":1 parallelism: field 'tp' must be an integer from 1 to 1048576 (got 4294967295)."));
  CHECK(mop::test::input_error_of([&] { row_with("4294967304", "{}"); })
            .ends_with(":1: field 'num_gpus' must be an integer from 1 to 1048576 (got "
                       "4294967304)."));
}

TEST_CASE("a torchtitan pipeline without a stated micro-batch splits each replica's batch "
          "into one micro-batch per stage" *
          doctest::test_suite("plumbing")) {
  // 64 GPUs as dp 4 x tp 2 x pp 8, global batch 128: 32 sequences per replica, torchtitan's
  // default of pp = 8 micro-batches makes them micro-batches of 4 (config_manager.py).
  const std::string par = R"({"dp": 4, "tp": 2, "pp": 8, "pp_schedule": "1f1b"})";
  const Translation t = translate(
      row_with("64", par, R"("framework": "torchtitan", "global_batch_size": 128, )"));
  REQUIRE(t.plan);
  CHECK(t.plan->micro_batch == 4);
  CHECK(t.plan->micro_batches() == 8);
  // Stated, it stands; another framework keeps one sequence per micro-batch (Megatron's default
  // micro_batch_size); a batch the stages do not divide keeps one as well.
  CHECK(translate(row_with("64", par,
                           R"("framework": "torchtitan", "global_batch_size": 128, )"
                           R"("micro_batch_size": 2, )"))
            .plan->micro_batch == 2);
  CHECK(translate(row_with("64", par, R"("framework": "Megatron-LM", "global_batch_size": 128, )"))
            .plan->micro_batch == 1);
  CHECK(translate(row_with("64", par, R"("framework": "torchtitan", "global_batch_size": 36, )"))
            .plan->micro_batch == 1);
}

TEST_CASE("a dataset without rows, a folder and a FIFO are refused with one sentence" *
          doctest::test_suite("plumbing")) {
  namespace fs = std::filesystem;
  std::string pattern = (fs::temp_directory_path() / "mop-dataset-XXXXXX").string();
  REQUIRE(::mkdtemp(pattern.data()) != nullptr);
  const fs::path dir = pattern;
  std::ofstream(dir / "empty.jsonl").close();
  std::ofstream(dir / "blank.jsonl") << "\n  \n\r\n";
  REQUIRE(::mkfifo((dir / "fifo.jsonl").c_str(), 0600) == 0);
  auto message = [](const fs::path& p) -> std::string {
    try {
      read_dataset(p.string());
    } catch (const InputError& e) {
      return e.what();
    }
    return "accepted";
  };
  CHECK(message(dir / "empty.jsonl") ==
        (dir / "empty.jsonl").string() + " holds no rows; a dataset has one JSON object per line.");
  CHECK(message(dir / "blank.jsonl") ==
        (dir / "blank.jsonl").string() + " holds no rows; a dataset has one JSON object per line.");
  CHECK(message(dir).find("is a folder") != std::string::npos);
  CHECK(message(dir / "fifo.jsonl").find("is a FIFO") != std::string::npos);
  fs::remove_all(dir);
}

TEST_CASE("a last line without a newline and CRLF line ends are rows like the others" *
          doctest::test_suite("plumbing")) {
  const auto path = std::filesystem::temp_directory_path() / "mop-crlf.jsonl";
  const std::string row = R"({"id": "r", "gpu": "H100", "num_gpus": 8, "seq_len": 4096, )"
                          R"("measured": {"mfu": 0.4}, "parallelism": {}})";
  std::ofstream(path, std::ios::binary) << row << "\r\n" << row;
  const std::vector<Row> rows = read_dataset(path.string());
  std::filesystem::remove(path);
  REQUIRE(rows.size() == 2);
  CHECK(rows[1].origin == path.string() + ":2");
}

namespace {
// A row of Llama 3 8B on 8 H100s with extra fields.
Row row_with_fields(const std::string& fields) {
  return row_with("8", R"({"dp": 8})", fields);
}
} // namespace

TEST_CASE("a row names the node type of its GPU variant, and an unknown one is a reason" *
          doctest::test_suite("plumbing")) {
  CHECK(translate(row_with_fields("")).cluster_id == "h100");
  const Translation variant = translate(row_with_fields(R"("node_type": "h100-96gb-500w", )"));
  CHECK(variant.reason.empty());
  CHECK(variant.cluster_id == "h100-96gb-500w");
  const Translation unknown = translate(row_with_fields(R"("node_type": "h100-1kw", )"));
  CHECK_FALSE(unknown.plan);
  CHECK(unknown.reason == "its node type 'h100-1kw' is not in the catalog (mop hw list).");
  // Every torchtitan H100 row ran on the 500 W, 96 GB HBM2e variant its benchmarks describe.
  for (const Row& r : read_dataset(default_dataset_path()))
    if (r.framework == "torchtitan" && r.gpu == "H100")
      CHECK(r.node_type == "h100-96gb-500w");
}

TEST_CASE("a row's FP8 recipe is one of the five, else the line is malformed" *
          doctest::test_suite("plumbing")) {
  CHECK(row_with_fields(R"("fp8_recipe": "current", )").fp8_recipe ==
        strategy::Fp8Recipe::current);
  CHECK(row_with_fields(R"("ep_dispatcher": "deepep", )").ep_dispatcher ==
        strategy::EpDispatcher::deepep);
  CHECK(mop::test::input_error_of([] { row_with_fields(R"("ep_dispatcher": "nccl", )"); })
            .ends_with(":1: field 'ep_dispatcher' must be \"alltoall\", \"deepep\" or "
                       "\"hybridep\" (got \"nccl\")."));
  CHECK(row_with_fields(R"("ep_dispatcher": "hybridep", )").ep_dispatcher ==
        strategy::EpDispatcher::hybridep);
  CHECK_FALSE(row_with_fields("").fp8_recipe);
  CHECK(mop::test::input_error_of([] { row_with_fields(R"("fp8_recipe": "hybrid", )"); })
            .ends_with(":1: field 'fp8_recipe' must be \"delayed\", \"current\", \"mxfp8\", "
                       "\"tensorwise\" or \"rowwise\" (got \"hybrid\")."));
}

TEST_CASE("a row's Transformer Engine release is major.minor, else the line is malformed" *
          doctest::test_suite("plumbing")) {
  CHECK(row_with_fields(R"("transformer_engine": "2.9", )").transformer_engine == 209);
  CHECK(row_with_fields(R"("transformer_engine": "2.10.1", )").transformer_engine == 210);
  CHECK_FALSE(row_with_fields("").transformer_engine);
  for (const char* bad : {R"("transformer_engine": "2", )", R"("transformer_engine": "v2.9", )",
                          R"("transformer_engine": "2.x", )", R"("transformer_engine": "2.9rc", )"})
    CHECK(mop::test::input_error_of([&] { row_with_fields(bad); })
              .find("field 'transformer_engine' must be a release such as \"2.9\"") !=
          std::string::npos);
  // Every Megatron-Core row of the 25.11 tables ran Megatron-Bridge v0.2.0's pinned 2.9.
  for (const Row& r : read_dataset(default_dataset_path()))
    if (r.id.starts_with("mb2511-"))
      CHECK(r.transformer_engine == 209);
}

TEST_CASE("the 500 W, 96 GB HBM2e H100: its sourced figures against the standard H100's" *
          doctest::test_suite("independent")) {
  // torchtitan's benchmarks: 96GB HBM2e at 2.4 TB/s, the default 500 W power limit; the tensor
  // peak between H100 NVL (835 TFLOPS, 400 W) and SXM (989, 700 W), linear in the limit.
  const hw::ClusterSpec v = hw::load_cluster("h100-96gb-500w");
  const hw::ClusterSpec h = hw::load_cluster("h100");
  CHECK(v.gpu.hbm_bandwidth == 2.4e12);
  // Filed to three figures (886 TFLOPS, 2.08 TB/s).
  CHECK(v.gpu.peak_flops_bf16 ==
        mop::test::rel(835e12 + (989e12 - 835e12) * (500.0 - 400) / 300, 0.001));
  CHECK(v.gpu.peak_flops_fp8 / v.gpu.peak_flops_bf16 == mop::test::rel(2, 0.001));
  CHECK(v.gpu.hbm_bandwidth_achievable / v.gpu.hbm_bandwidth ==
        mop::test::rel(h.gpu.hbm_bandwidth_achievable / h.gpu.hbm_bandwidth, 0.001));
  CHECK(v.gpu.hbm_bytes > h.gpu.hbm_bytes);
  CHECK(v.node.gpus_per_node == 8);
}

} // namespace validation_dataset_test
