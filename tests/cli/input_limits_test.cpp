// Inputs at and past mop's ceilings (common/limits.hpp), end to end: each is exit 1 and one
// sentence on stderr, never a crash, a hang, exit 3 or a wrong number.
#include "common/json_io.hpp"
#include "tests/cli/run_mop.hpp"

#include <doctest/doctest.h>
#include <filesystem>
#include <fstream>

namespace cli_input_limits_test {

using mop::Json;
using mop::test::count_lines;
using mop::test::MopResult;
using mop::test::run_mop;

namespace {

// A file under the temporary folder holding `text`; removed when the test ends.
struct TempFile {
  std::string path;
  TempFile(const std::string& name, const std::string& text)
      : path((std::filesystem::temp_directory_path() / ("mop-limits-" + name)).string()) {
    std::ofstream(path) << text;
  }
  ~TempFile() { std::filesystem::remove(path); }
};

// Exit 1 and exactly one line on stderr, "mop: " + `sentence`.
void check_refused(const MopResult& r, const std::string& sentence) {
  CHECK(r.status == 1);
  CHECK(count_lines(r.err) == 1);
  CHECK(r.err == "mop: " + sentence + "\n");
}

const std::string kLlama = R"({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256)";

} // namespace

TEST_CASE("JSON nested 100,000 deep is refused, not a stack overflow" *
          doctest::test_suite("plumbing")) {
  // Quoting the value in "field 'hidden_size' must be a positive integer (got [[[...)" recursed
  // once per level: SIGSEGV.
  const TempFile f("deep.json", R"({"model_type": "llama", "hidden_size": )" +
                                    std::string(100000, '[') + std::string(100000, ']') + "}");
  check_refused(run_mop("model show " + f.path), f.path + " nests JSON deeper than 100 levels "
                                                          "(line 1).");
  check_refused(run_mop("hw show " + f.path), f.path + " nests JSON deeper than 100 levels "
                                                       "(line 1).");
}

TEST_CASE("a number beyond a double is exit 1 naming the file, not an internal error" *
          doctest::test_suite("plumbing")) {
  const TempFile f("1e309.json", kLlama + ",\n\"rope_theta\": 1e309}");
  check_refused(run_mop("model show " + f.path),
                f.path + ": the number 1e309 (line 3) is out of the range of a double.");
}

TEST_CASE("a model dimension past its ceiling is refused before any count is formed" *
          doctest::test_suite("plumbing")) {
  // hidden_size 2^40 printed a negative parameter count with exit 0.
  const TempFile f("hidden.json", R"({"model_type": "llama", "hidden_size": 1099511627776,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "vocab_size": 256})");
  check_refused(run_mop("model show " + f.path),
                f.path + ": field 'hidden_size' (1099511627776) is above mop's ceiling of "
                         "1048576.");
  // 2^31 routed experts ended in std::bad_alloc.
  const TempFile e("experts.json", R"({"model_type": "qwen3_moe", "hidden_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 256,
    "num_experts": 2147483648, "num_experts_per_tok": 2, "moe_intermediate_size": 32})");
  check_refused(run_mop("model show " + e.path),
                e.path + ": field 'num_experts' (2147483648) is above mop's ceiling of 65536.");
}

TEST_CASE("plan JSON: a world past an int is refused, not run as 8 ranks, unknown keys named" *
          doctest::test_suite("plumbing")) {
  const TempFile f("world.json", R"({"world": 4294967304})");
  check_refused(
      run_mop("memory --model tiny-moe --cluster h200 --nodes 1 --seq 4K --plan " + f.path),
      f.path + ": field 'world' must be an integer from 1 to 1048576 (got "
               "4294967304).");
  const TempFile k("typo.json", R"({"world": 8, "micro_bacth": 2})");
  const auto r =
      run_mop("memory --model tiny-moe --cluster h200 --nodes 1 --seq 4K --plan " + k.path);
  CHECK(r.status == 1);
  CHECK(count_lines(r.err) == 1);
  CHECK(r.err.starts_with("mop: " + k.path + ": field 'micro_bacth' is not known; allowed: "));
}

TEST_CASE("--nodes, --seq and --global-batch past their ceilings are one sentence each" *
          doctest::test_suite("plumbing")) {
  // 10^9 nodes printed "-589934592 GPUs".
  check_refused(run_mop("memory --model tiny-moe --cluster h200 --nodes 1000000000 --seq 4K"),
                "--nodes must be a number of nodes from 1 to 1048576 (got 1000000000).");
  check_refused(run_mop("memory --model tiny-moe --cluster h200 --nodes 200000 --seq 4K"),
                "200000 nodes of 8 GPUs (h200) are 1600000 GPUs, above mop's ceiling of 1048576.");
  check_refused(run_mop("memory --model tiny-moe --cluster h200 --nodes 1 --seq 1T"),
                "--seq 1T is 1099511627776 tokens, above mop's ceiling of 67108864 (64M).");
  check_refused(run_mop("model show tiny-moe --seq 128M"),
                "--seq 128M is 134217728 tokens, above mop's ceiling of 67108864 (64M).");
  check_refused(
      run_mop("memory --model tiny-moe --cluster h200 --nodes 1 --seq 4K --global-batch 20000000"),
      "--global-batch must be a number of sequences from 1 to 16777216 (got 20000000).");
}

TEST_CASE("--threads past the ceiling is a sentence, not an abort" *
          doctest::test_suite("plumbing")) {
  for (const char* command : {"plan --nodes 1", "sweep --nodes 1", "fit"})
    check_refused(
        run_mop(std::string(command) + " --model tiny-moe --cluster h200 --seq 4K --threads 5000"),
        "--threads must be between 1 and 256 (got 5000).");
  check_refused(run_mop("plan --model tiny-moe --cluster h200 --nodes 1 --seq 4K --threads 0"),
                "--threads must be between 1 and 256 (got 0).");
}

TEST_CASE("mop validate: absurd degrees are a null prediction with a reason, or a sentence" *
          doctest::test_suite("plumbing")) {
  const std::string row = R"({"id": "r", "model_id": "llama3-8b", "gpu": "H100", )"
                          R"("num_gpus": 1048576, "seq_len": 4096, "measured": {"mfu": 0.4}, )";
  // tp·cp wrapped to 0 in int and the division by it killed mop with SIGFPE.
  const TempFile f("wrap.jsonl", row + R"("parallelism": {"tp": 65536, "cp": 65536}})" + "\n");
  const auto r = run_mop("validate --dataset " + f.path + " --json");
  REQUIRE(r.status == 0);
  const Json j = Json::parse(r.out);
  REQUIRE(j["points"].size() == 1);
  CHECK(j["points"][0]["predicted"].is_null());
  CHECK(j["points"][0]["reason"] ==
        "its published degrees do not form a valid plan: plan: attention tp x cp (4294967296) "
        "must divide the 1048576 ranks of a pipeline stage.");
  const TempFile g("past.jsonl", row + R"("parallelism": {"tp": 4294967295}})" + "\n");
  check_refused(run_mop("validate --dataset " + g.path),
                g.path + ":1 parallelism: field 'tp' must be an integer from 1 to 1048576 (got "
                         "4294967295).");
}

// AddressSanitizer's macro: GCC's, or clang's feature test.
#if defined(__SANITIZE_ADDRESS__)
#define MOP_TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MOP_TEST_ASAN 1
#endif
#endif

TEST_CASE("threads the system cannot create: the search runs on those it has, same answer" *
          doctest::test_suite("plumbing")) {
#if defined(MOP_TEST_ASAN)
  // AddressSanitizer reserves terabytes of address space: it cannot run under `ulimit -v`.
  return;
#else
  namespace fs = std::filesystem;
  const fs::path out = fs::temp_directory_path() / "mop-limits-threads.json";
  const std::string args = " plan --model tiny-moe --cluster h200 --nodes 1 --seq 4K --json";
  // 1 GB of address space holds about a hundred 8 MiB thread stacks, not 256: creating the rest
  // threw std::system_error, and the pool's destructor aborted the program.
  const std::string limited = "ulimit -v 1000000 && " + std::string(MOP_BINARY) + args +
                              " --threads 256 >" + out.string() + " 2>/dev/null";
  const int raw = std::system(("bash -c '" + limited + "'").c_str());
  REQUIRE(WIFEXITED(raw));
  CHECK(WEXITSTATUS(raw) == 0);
  const auto serial = run_mop(args.substr(1) + " --threads 1");
  REQUIRE(serial.status == 0);
  CHECK(Json::parse(mop::test::slurp(out)) == Json::parse(serial.out));
  fs::remove(out);
#endif
}

} // namespace cli_input_limits_test
