// mop run end to end: CLI.md keys, the check against the reference, checkpoint and resume,
// bad input.
#include "common/json_io.hpp"
#include "tests/cli/run_mop.hpp"
#include "tests/support/approx.hpp"

#include <cmath>
#include <doctest/doctest.h>
#include <filesystem>
#include <fstream>
#include <map>

namespace cli_run_test {

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
  CHECK(j["program"].get<bool>()); // tiny-moe under FSDP2: the lowered program, interpreted
  CHECK(j["ops"].contains("matmul"));
  CHECK(j["ops"].contains("grouped_matmul"));
  for (const char* key : {"count", "scheduled", "measured_s", "predicted_s"})
    CHECK(j["ops"]["matmul"].contains(key));
  // float32 ranks against the float64 reference: rounding only.
  CHECK(j["check"]["max_loss_rel_diff"].get<double>() < 1e-5);
  CHECK(j["check"]["max_grad_rel_diff"].get<double>() < 1e-3);
  // The first loss of an untrained model is about ln(vocab) = ln 256.
  CHECK(std::abs(j["loss"][0].get<double>() - std::log(256.0)) < 0.05);
}

TEST_CASE("mop run interprets the plan's Schedule: every scheduled op ran, memory beside the "
          "simulator's" *
          doctest::test_suite("plumbing")) {
  const auto r = run_mop("run --executor cpu --model tiny-dense --ranks 4 --plan fsdp2 --steps 2 "
                         "--seq 32 --check --json");
  REQUIRE(r.status == 0);
  const Json j = Json::parse(r.out);
  CHECK(j["program"].get<bool>());
  CHECK(j["ops"].contains("matmul"));
  for (const auto& item : j["ops"].items()) {
    const std::string& kind = item.key();
    const Json& op = item.value();
    CAPTURE(kind);
    CHECK(op["count"].get<std::int64_t>() == op["scheduled"].get<std::int64_t>());
    CHECK(op["predicted_s"].get<double>() >= 0);
  }
  REQUIRE(j["memory"]["peak_bytes"].size() == 4);
  REQUIRE(j["memory"]["simulated_peak_bytes"].size() == 4);
  // The interpreter runs each rank's ops in program order (its peak equals the memory tracker's
  // in that order: tests/real_backend/cpu/interpreter_test.cpp); the simulated GPU overlaps
  // streams (a ZeRO-3 gather prefetched during the previous layer), which moves the peak a
  // little.
  for (int rank = 0; rank < 4; ++rank) {
    const double sim = j["memory"]["simulated_peak_bytes"][rank].get<double>();
    const double ran = j["memory"]["peak_bytes"][rank].get<double>();
    CHECK(sim > 0.9 * ran);
    CHECK(sim < 1.1 * ran);
  }
  CHECK(j["check"]["max_loss_rel_diff"].get<double>() < 1e-5);
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
       {"run --model tiny-moe --ranks 2 --steps 1",                           // no GPU here
        "run --executor cpu --model tiny-moe --ranks 0",                      // no ranks
        "run --executor cpu --model tiny-moe --steps 0",                      // no steps
        "run --executor cpu --model kimi-k2 --ranks 2",                       // MLA attention
        "run --executor cpu --model llama3-8b --ranks 2",                     // too large for a CPU
        "run --executor cpu --model tiny-moe --resume /no/such.ckpt",         // missing file
        "run --executor cpu --model tiny-moe --data /no/such.txt",            // missing file
        "run --executor cpu --model tiny-moe --ranks 3 --plan /no/plan.json", // missing plan
        "run --executor gpu --model tiny-moe",
        // Flag values past the limits in common/limits.hpp.
        "run --executor cpu --model tiny-moe --ranks 100000",
        "run --executor cpu --model tiny-moe --ranks -1",
        "run --executor cpu --model tiny-moe --steps 1000000000",
        "run --executor cpu --model tiny-moe --steps -5",
        "run --executor cpu --model tiny-moe --batch 0",
        "run --executor cpu --model tiny-moe --batch -3",
        "run --executor cpu --model tiny-moe --batch 100000000",
        "run --executor cpu --model tiny-moe --seq 64K --batch 64", // 4M tokens in a step
        "run --executor cpu --model tiny-moe --seq 1M",
        "run --executor cpu --model tiny-moe --lr 0",
        "run --executor cpu --model tiny-moe --lr 1e9",
        "run --executor cpu --model tiny-moe --lr inf",
        "run --executor cpu --model tiny-moe --lr nan",
        "run --executor cpu --model tiny-moe --save-checkpoint ''",
        "run --executor cpu --model tiny-moe --resume ''",
        "run --executor cpu --model tiny-moe --resume /dev/null"}) {
    CAPTURE(args);
    const auto r = run_mop(args);
    CHECK(r.status == 1);
    CHECK(count_lines(r.err) == 1);
  }
  CHECK(run_mop("run --executor cpu").status == 2); // --model is required
  // Not an int at all: a usage error.
  CHECK(run_mop("run --executor cpu --model tiny-moe --steps 99999999999").status == 2);
}

TEST_CASE("mop run --executor cuda finds its rank from torchrun, Slurm and MPI and stops at the "
          "GPU with one sentence" *
          doctest::test_suite("plumbing")) {
  // Without a GPU (or without the CUDA backend) each process says where it stands and why it
  // stops; the sentence names the rank the launcher gave it.
  const std::string args = "run --executor cuda --model tiny-moe --steps 1";
  const auto torchrun = run_mop(args, "RANK=3 WORLD_SIZE=4 LOCAL_RANK=3 LOCAL_WORLD_SIZE=4 "
                                      "MASTER_ADDR=node0 MASTER_PORT=29500 ");
  CHECK(torchrun.status == 1);
  CHECK(count_lines(torchrun.err) == 1);
  CHECK(torchrun.err.find("rank 3 of 4 (torchrun, local rank 3 of 4, rendezvous node0:29500)") !=
        std::string::npos);
  const auto slurm = run_mop(args, "SLURM_PROCID=5 SLURM_NTASKS=16 SLURM_LOCALID=1 SLURM_NODEID=2 "
                                   "SLURM_STEP_TASKS_PER_NODE='4(x4)' "
                                   "SLURM_STEP_NODELIST='gpu[10-13]' SLURM_JOB_ID=7 ");
  CHECK(slurm.status == 1);
  CHECK(slurm.err.find("rank 5 of 16 (Slurm, local rank 1 of 4, rendezvous gpu10:20007)") !=
        std::string::npos);
  const auto mpi = run_mop(args, "OMPI_COMM_WORLD_RANK=1 OMPI_COMM_WORLD_SIZE=2 "
                                 "OMPI_COMM_WORLD_LOCAL_RANK=1 OMPI_COMM_WORLD_LOCAL_SIZE=2 ");
  CHECK(mpi.status == 1);
  CHECK(mpi.err.find("rank 1 of 2 (MPI, local rank 1 of 2, rendezvous 127.0.0.1:29500)") !=
        std::string::npos);
  // A launcher's malformed variable is bad input too.
  const auto bad = run_mop(args, "RANK=9 WORLD_SIZE=4 LOCAL_RANK=0 ");
  CHECK(bad.status == 1);
  CHECK(bad.err.find("RANK is 9, outside a world of 4 processes") != std::string::npos);
  // --nproc-per-node starts the processes itself; the first to fail reports (the others are
  // stopped, as torchrun stops them) and the run fails with its status.
  const auto local = run_mop(args + " --nproc-per-node 2");
  CHECK(local.status == 1);
  CHECK(local.err.find(" of 2 (mop --nproc-per-node, local rank ") != std::string::npos);
  // Under a launcher it must be left out.
  const auto both = run_mop(args + " --nproc-per-node 2", "RANK=0 WORLD_SIZE=2 LOCAL_RANK=0 "
                                                          "MASTER_ADDR=a MASTER_PORT=1 ");
  CHECK(both.status == 1);
  CHECK(both.err.find("leave --nproc-per-node out") != std::string::npos);
  CHECK(run_mop(args + " --nproc-per-node 0").status == 1);
  CHECK(run_mop(args + " --nproc-per-node 1000").status == 1);
}

TEST_CASE("mop run --trace writes the last step as it ran, beside the prediction of the same "
          "Schedule" *
          doctest::test_suite("plumbing")) {
  const auto dir = std::filesystem::temp_directory_path();
  const std::string m = (dir / ("mop-measured-" + std::to_string(::getpid()) + ".json")).string();
  const std::string p = (dir / ("mop-predicted-" + std::to_string(::getpid()) + ".json")).string();
  const auto r = run_mop("run --executor cpu --model tiny-moe --ranks 4 --plan mop --steps 2 "
                         "--json --trace " +
                         m + " --predicted-trace " + p);
  REQUIRE(r.status == 0);
  const Json measured = Json::parse(mop::test::slurp(m)),
             predicted = Json::parse(mop::test::slurp(p));
  std::filesystem::remove(m);
  std::filesystem::remove(p);
  CHECK(measured["otherData"]["title"].get<std::string>().rfind("measured (cpu executor)", 0) == 0);
  CHECK(predicted["otherData"]["title"].get<std::string>().rfind("predicted", 0) == 0);
  // Every op slice of the prediction (not its critical-path copies) has its measured twin on the
  // same rank class: the two traces draw the same Schedule.
  auto slices = [](const Json& t) {
    std::map<std::pair<int, std::string>, int> out;
    std::map<std::pair<std::int64_t, std::int64_t>, std::string> thread;
    for (const Json& e : t["traceEvents"])
      if (e.value("ph", "") == "M" && e.value("name", "") == "thread_name")
        thread[{e["pid"].get<std::int64_t>(), e["tid"].get<std::int64_t>()}] =
            e["args"]["name"].get<std::string>();
    for (const Json& e : t["traceEvents"])
      if (e.value("ph", "") == "X" &&
          thread[{e["pid"].get<std::int64_t>(), e["tid"].get<std::int64_t>()}] != "critical path")
        out[{e["pid"].get<int>(), e["name"].get<std::string>()}] += 1;
    return out;
  };
  const auto ms = slices(measured), ps = slices(predicted);
  REQUIRE(!ps.empty());
  for (const auto& entry : ps) { // no structured binding: clang cannot capture one (CAPTURE)
    const std::string& name = entry.first.second;
    CAPTURE(name);
    CHECK(ms.count(entry.first) == 1);
    CHECK(ms.at(entry.first) >= entry.second);
  }
  // A trace that cannot be written is refused before the run.
  const auto bad = run_mop("run --executor cpu --model tiny-moe --steps 1 --trace /no/such/t.json");
  CHECK(bad.status == 1);
  CHECK(count_lines(bad.err) == 1);
}

TEST_CASE("mop calibrate without a GPU refuses with one sentence and writes nothing" *
          doctest::test_suite("plumbing")) {
  const std::string out =
      (std::filesystem::temp_directory_path() / ("mop-cal-" + std::to_string(::getpid()) + ".json"))
          .string();
  const auto r = run_mop("calibrate --quick --out " + out);
  CHECK(r.status == 1);
  CHECK(count_lines(r.err) == 1);
  CHECK(r.err.find("mop calibrate") != std::string::npos);
  CHECK(!std::filesystem::exists(out));
}

namespace {

struct TempDir {
  std::filesystem::path dir;
  explicit TempDir(const std::string& name) {
    dir = std::filesystem::temp_directory_path() / (name + "-" + std::to_string(::getpid()));
    std::filesystem::remove_all(dir);
    std::filesystem::create_directories(dir);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }
  std::string path(const std::string& name) const { return (dir / name).string(); }
};

} // namespace

TEST_CASE("mop run refuses a checkpoint target before it trains" *
          doctest::test_suite("plumbing")) {
  const TempDir t("mop-run-target");
  // Without --json the plan line is printed just before training starts: an empty stdout shows
  // the refusal came first.
  const std::string run = "run --executor cpu --model tiny-dense --ranks 2 --steps 2 ";
  for (const std::string& target :
       {t.path("missing/x.ckpt"), t.dir.string(), std::string("/dev/null")}) {
    CAPTURE(target);
    const auto r = run_mop(run + "--save-checkpoint " + target);
    CHECK(r.status == 1);
    CHECK(count_lines(r.err) == 1);
    CHECK(r.err.find("cannot save the checkpoint to") != std::string::npos);
    CHECK(r.out.empty());
  }
}

TEST_CASE("mop run refuses a damaged or foreign checkpoint before it trains" *
          doctest::test_suite("plumbing")) {
  const TempDir t("mop-run-resume");
  const std::string ckpt = t.path("a.ckpt");
  const std::string run = "run --executor cpu --model tiny-dense --ranks 2 --seq 32 --steps 1";
  REQUIRE(run_mop(run + " --save-checkpoint " + ckpt).status == 0);
  const auto refused = [&](const std::string& args, const std::string& part) {
    CAPTURE(args);
    const auto r = run_mop(args);
    CHECK(r.status == 1);
    CHECK(count_lines(r.err) == 1);
    CHECK(r.err.find(part) != std::string::npos);
    CHECK(r.out.empty());
  };
  // Another model, another data seed.
  refused("run --executor cpu --model tiny-moe --ranks 2 --seq 32 --resume " + ckpt,
          "was saved for model 'tiny-dense', not 'tiny-moe'");
  refused(run + " --seed 2 --resume " + ckpt, "seed 1, not on the synthetic stream with seed 2");
  // One bit flipped in the middle of the parameters.
  std::string bytes = mop::test::slurp(ckpt);
  bytes[bytes.size() / 3] = static_cast<char>(bytes[bytes.size() / 3] ^ 0x10);
  std::ofstream(ckpt, std::ios::binary | std::ios::trunc) << bytes;
  refused(run + " --resume " + ckpt, "its checksum does not match its contents");
}

TEST_CASE("mop run resumes under another plan of the same model" *
          doctest::test_suite("plumbing")) {
  const TempDir t("mop-run-reshard");
  const std::string ckpt = t.path("a.ckpt");
  const std::string common = "run --executor cpu --model tiny-dense --seq 32 --batch 4 --json";
  const auto whole = run_mop(common + " --ranks 2 --plan fsdp2 --steps 3");
  const auto first =
      run_mop(common + " --ranks 2 --plan fsdp2 --steps 2 --save-checkpoint " + ckpt);
  const auto rest = run_mop(common + " --ranks 1 --steps 1 --resume " + ckpt);
  REQUIRE(whole.status == 0);
  REQUIRE(first.status == 0);
  REQUIRE(rest.status == 0);
  CHECK(rest.err.find("it is resharded for plan") != std::string::npos);
  const Json w = Json::parse(whole.out), b = Json::parse(rest.out);
  CHECK(b["first_step"] == 2);
  // float32 on 2 ranks against float32 on 1: the same training up to the order of sums, the
  // bound of the --check test above.
  CHECK(b["loss"][0].get<double>() == mop::test::rel(w["loss"][2].get<double>(), 1e-5));
}

TEST_CASE("mop run refuses a plan whose program has priced-only ops, naming the op" *
          doctest::test_suite("plumbing")) {
  // Token dropping (a capacity factor) is priced as dropless routing; the permutation has no
  // kernel in the executable layer, so the CPU interpreter refuses the program by that op.
  TempDir t("mop-run-priced-only");
  const std::string plan = t.path("dropping.json");
  std::ofstream(plan) << R"({"world": 1, "global_batch": 2, "micro_batch": 1,
                             "moe": {"capacity_factor": 1.25}})";
  const auto r = run_mop("run --executor cpu --model tiny-moe --ranks 1 --seq 32 --plan " + plan);
  CHECK(r.status == 1);
  CHECK(count_lines(r.err) == 1);
  CHECK(r.err.find("cannot run op 'L1.permute.mb0'") != std::string::npos);
  // The same model's presets resolve to plans it runs.
  CHECK(run_mop("run --executor cpu --model tiny-moe --ranks 2 --seq 32 --plan megatron").status ==
        0);
}

} // namespace cli_run_test
