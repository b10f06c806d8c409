// mop run with one process per rank: the processes that torchrun, Slurm, MPI or
// `--nproc-per-node` start meet over TCP and train as the same ranks as threads do, bit for bit;
// rank 0 alone reports; a world that cannot run ends every process with one sentence.
#include "common/json_io.hpp"
#include "tests/cli/run_mop.hpp"

#include <doctest/doctest.h>
#include <filesystem>
#include <string>
#include <vector>

namespace cli_run_world_test {

using mop::Json;
using mop::test::count_lines;
using mop::test::run_mop;
using mop::test::slurp;

namespace {

// Runs one `mop <args>` per entry of `envs` (shell variable assignments), all at once, and waits
// for them all.
std::vector<mop::test::MopResult> run_world(const std::vector<std::string>& args,
                                            const std::vector<std::string>& envs) {
  namespace fs = std::filesystem;
  const fs::path dir =
      fs::temp_directory_path() / ("mop-cli-world-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  std::string cmd;
  for (std::size_t r = 0; r < envs.size(); ++r) {
    const std::string base = (dir / std::to_string(r)).string();
    cmd += "( env " + envs[r] + " " + std::string(MOP_BINARY) + " " + args[r] + " >" + base +
           ".out 2>" + base + ".err; echo $? >" + base + ".rc ) & ";
  }
  cmd += "wait";
  (void)std::system(cmd.c_str());
  std::vector<mop::test::MopResult> out(envs.size());
  for (std::size_t r = 0; r < envs.size(); ++r) {
    const std::string base = (dir / std::to_string(r)).string();
    out[r].out = slurp(base + ".out");
    out[r].err = slurp(base + ".err");
    const std::string rc = slurp(base + ".rc");
    out[r].status = rc.empty() ? -1 : std::stoi(rc);
  }
  fs::remove_all(dir);
  return out;
}

std::vector<mop::test::MopResult> run_world(const std::string& args,
                                            const std::vector<std::string>& envs) {
  return run_world(std::vector<std::string>(envs.size(), args), envs);
}

// A meeting port for this test process (tests run in parallel in separate processes).
int port(int k) {
  return 20000 + static_cast<int>(::getpid() % 9000) * 4 + k;
}

} // namespace

TEST_CASE("mop run --executor cpu in one process per rank, started by torchrun, Slurm, MPI or "
          "--nproc-per-node, trains as its ranks as threads do" *
          doctest::test_suite("plumbing")) {
  const std::string args = "run --executor cpu --model tiny-moe --plan mop --steps 2 --json";
  const auto threads = run_mop(args + " --ranks 2");
  REQUIRE(threads.status == 0);
  const Json want = Json::parse(threads.out)["loss"];
  REQUIRE(want.size() == 2);

  const auto local = run_mop(args + " --nproc-per-node 2");
  REQUIRE(local.status == 0);
  CHECK(local.err.empty());
  CHECK(Json::parse(local.out)["loss"] == want);
  CHECK(Json::parse(local.out)["ranks"] == 2);

  const std::string p0 = std::to_string(port(0)), p1 = std::to_string(port(1)),
                    p2 = std::to_string(port(2));
  const std::vector<std::vector<std::string>> launchers = {
      {"RANK=0 WORLD_SIZE=2 LOCAL_RANK=0 LOCAL_WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=" +
           p0,
       "RANK=1 WORLD_SIZE=2 LOCAL_RANK=1 LOCAL_WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=" +
           p0},
      // Slurm: the meeting host is the first of the step's nodes.
      {"SLURM_PROCID=0 SLURM_NTASKS=2 SLURM_LOCALID=0 SLURM_NODEID=0 SLURM_STEP_TASKS_PER_NODE=2 "
       "SLURM_STEP_NODELIST=localhost SLURM_JOB_ID=7 MASTER_PORT=" +
           p1,
       "SLURM_PROCID=1 SLURM_NTASKS=2 SLURM_LOCALID=1 SLURM_NODEID=0 SLURM_STEP_TASKS_PER_NODE=2 "
       "SLURM_STEP_NODELIST=localhost SLURM_JOB_ID=7 MASTER_PORT=" +
           p1},
      {"OMPI_COMM_WORLD_RANK=0 OMPI_COMM_WORLD_SIZE=2 OMPI_COMM_WORLD_LOCAL_RANK=0 "
       "OMPI_COMM_WORLD_LOCAL_SIZE=2 MASTER_PORT=" +
           p2,
       "OMPI_COMM_WORLD_RANK=1 OMPI_COMM_WORLD_SIZE=2 OMPI_COMM_WORLD_LOCAL_RANK=1 "
       "OMPI_COMM_WORLD_LOCAL_SIZE=2 MASTER_PORT=" +
           p2}};
  for (const auto& envs : launchers) {
    CAPTURE(envs[0]);
    const auto ranks = run_world(args, envs);
    REQUIRE(ranks[0].status == 0);
    REQUIRE(ranks[1].status == 0);
    CHECK(ranks[0].err.empty());
    CHECK(ranks[1].err.empty());
    CHECK(Json::parse(ranks[0].out)["loss"] == want);
    CHECK(ranks[1].out.empty()); // rank 0 reports
  }
}

TEST_CASE("mop run in one process per rank: a world that cannot run ends each process with one "
          "sentence" *
          doctest::test_suite("plumbing")) {
  const std::string p = std::to_string(port(3));
  const std::string env = "WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=" + p + " ";
  // --ranks, when given, must be the world's size (refused before the processes meet).
  const auto ranks =
      run_mop("run --executor cpu --model tiny-dense --ranks 3", "RANK=0 LOCAL_RANK=0 " + env);
  CHECK(ranks.status == 1);
  CHECK(count_lines(ranks.err) == 1);
  CHECK(ranks.err.find("the world has 2 processes, one per rank, but --ranks is 3") !=
        std::string::npos);
  // --collectives: nccl or tcp, and nccl only for the CUDA executor; refused before any process
  // starts.
  for (const char* bad : {"--collectives x", "--collectives nccl --nproc-per-node 2"}) {
    CAPTURE(bad);
    const auto r = run_mop(std::string("run --executor cpu --model tiny-dense ") + bad);
    CHECK(r.status == 1);
    CHECK(count_lines(r.err) == 1);
  }
  // Ranks started with different arguments: neither hangs, neither reports a bug.
  const std::vector<std::string> args = {"run --executor cpu --model tiny-dense --steps 3",
                                         "run --executor cpu --model tiny-dense --steps 1"};
  const auto differ =
      run_world(args, std::vector<std::string>{"RANK=0 LOCAL_RANK=0 " + env,
                                               "RANK=1 LOCAL_RANK=1 " + env});
  for (const auto& r : differ) {
    CHECK(r.status == 1);
    CHECK(count_lines(r.err) == 1);
  }
  CHECK(differ[0].err.find("rank 0 of 2 (torchrun") != std::string::npos);
}

} // namespace cli_run_world_test
