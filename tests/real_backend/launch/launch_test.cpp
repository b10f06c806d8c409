// Where a process stands, from the variables torchrun, Slurm and MPI set (the values below are
// those the launchers' documentation lists for the described jobs), and the local launcher of
// `mop run --nproc-per-node`.
#include "real_backend/launch/launch.hpp"

#include "common/error.hpp"

#include <doctest/doctest.h>

#include <map>
#include <string>

namespace real_backend_launch_launch_test {

using namespace mop::real;

namespace {

EnvReader reader(const std::map<std::string, std::string>& vars) {
  return [vars](const std::string& name) -> std::optional<std::string> {
    const auto it = vars.find(name);
    if (it == vars.end())
      return std::nullopt;
    return it->second;
  };
}

std::string error_of(const std::map<std::string, std::string>& vars) {
  try {
    launch_env_from(reader(vars));
  } catch (const mop::InputError& e) {
    return e.what();
  }
  return "";
}

} // namespace

TEST_CASE("launch: no launcher variables mean one process with no rendezvous" *
          doctest::test_suite("plumbing")) {
  const LaunchEnv l = launch_env_from(reader({{"PATH", "/usr/bin"}}));
  CHECK(l.launcher == Launcher::none);
  CHECK(l.rank == 0);
  CHECK(l.world_size == 1);
  CHECK(l.local_rank == 0);
  CHECK(l.rendezvous.empty());
  CHECK(l.describe() == "rank 0 of 1 (single process, local rank 0 of 1)");
}

TEST_CASE("launch: torchrun's variables on the second of two 8-GPU nodes" *
          doctest::test_suite("plumbing")) {
  // torchrun --nnodes 2 --nproc-per-node 8 --master-addr node0 --master-port 29500: the agent
  // serves its store on 29500, so NCCL's root listens on 29501.
  const LaunchEnv l = launch_env_from(reader({{"RANK", "11"},
                                              {"WORLD_SIZE", "16"},
                                              {"LOCAL_RANK", "3"},
                                              {"LOCAL_WORLD_SIZE", "8"},
                                              {"MASTER_ADDR", "node0"},
                                              {"MASTER_PORT", "29500"},
                                              {"TORCHELASTIC_USE_AGENT_STORE", "True"},
                                              {"SLURM_PROCID", "1"},
                                              {"SLURM_NTASKS", "2"},
                                              {"SLURM_LOCALID", "0"}}));
  CHECK(l.launcher == Launcher::torchrun);
  CHECK(l.rank == 11);
  CHECK(l.world_size == 16);
  CHECK(l.local_rank == 3);
  CHECK(l.local_world_size == 8);
  CHECK(l.rendezvous == "node0:29501");
  CHECK(l.describe() == "rank 11 of 16 (torchrun, local rank 3 of 8, rendezvous node0:29501)");
  // Without the agent's store the port is ours.
  const LaunchEnv m = launch_env_from(reader({{"RANK", "0"},
                                              {"WORLD_SIZE", "2"},
                                              {"LOCAL_RANK", "0"},
                                              {"MASTER_ADDR", "10.0.0.1"},
                                              {"MASTER_PORT", "6000"}}));
  CHECK(m.rendezvous == "10.0.0.1:6000");
  CHECK(m.local_world_size == 0);
}

TEST_CASE("launch: Slurm's variables for srun -N 2 --ntasks-per-node 8" *
          doctest::test_suite("plumbing")) {
  const LaunchEnv l = launch_env_from(reader({{"SLURM_PROCID", "9"},
                                              {"SLURM_NTASKS", "16"},
                                              {"SLURM_LOCALID", "1"},
                                              {"SLURM_NODEID", "1"},
                                              {"SLURM_STEP_TASKS_PER_NODE", "8(x2)"},
                                              {"SLURM_STEP_NODELIST", "gpu-[007-008]"},
                                              {"SLURM_JOB_ID", "123456"}}));
  CHECK(l.launcher == Launcher::slurm);
  CHECK(l.rank == 9);
  CHECK(l.world_size == 16);
  CHECK(l.local_rank == 1);
  CHECK(l.local_world_size == 8);
  // The first host of the step, a port from the job id: 20000 + 123456 % 20000.
  CHECK(l.rendezvous == "gpu-007:23456");
  // MASTER_ADDR and MASTER_PORT, when set, win.
  const LaunchEnv m = launch_env_from(reader({{"SLURM_PROCID", "0"},
                                              {"SLURM_NTASKS", "2"},
                                              {"SLURM_LOCALID", "0"},
                                              {"SLURM_NODEID", "0"},
                                              {"SLURM_STEP_TASKS_PER_NODE", "1,1"},
                                              {"SLURM_JOB_NODELIST", "a,b"},
                                              {"MASTER_ADDR", "head"},
                                              {"MASTER_PORT", "7000"}}));
  CHECK(m.rendezvous == "head:7000");
  CHECK(m.local_world_size == 1);
}

TEST_CASE("launch: Open MPI's and MPICH's variables, and MASTER_ADDR across nodes" *
          doctest::test_suite("plumbing")) {
  // mpirun -np 4 on one node: the meeting point is this host.
  const LaunchEnv one = launch_env_from(reader({{"OMPI_COMM_WORLD_RANK", "2"},
                                                {"OMPI_COMM_WORLD_SIZE", "4"},
                                                {"OMPI_COMM_WORLD_LOCAL_RANK", "2"},
                                                {"OMPI_COMM_WORLD_LOCAL_SIZE", "4"},
                                                {"SLURM_PROCID", "0"}}));
  CHECK(one.launcher == Launcher::mpi);
  CHECK(one.rank == 2);
  CHECK(one.local_world_size == 4);
  CHECK(one.rendezvous == "127.0.0.1:29500");
  // Across nodes MPI names no host: MASTER_ADDR must.
  const std::map<std::string, std::string> two{{"OMPI_COMM_WORLD_RANK", "5"},
                                               {"OMPI_COMM_WORLD_SIZE", "16"},
                                               {"OMPI_COMM_WORLD_LOCAL_RANK", "5"},
                                               {"OMPI_COMM_WORLD_LOCAL_SIZE", "8"}};
  CHECK(error_of(two).find("set MASTER_ADDR") != std::string::npos);
  auto with_addr = two;
  with_addr["MASTER_ADDR"] = "node0";
  CHECK(launch_env_from(reader(with_addr)).rendezvous == "node0:29500");
  const LaunchEnv pmi = launch_env_from(reader(
      {{"PMI_RANK", "1"}, {"PMI_SIZE", "2"}, {"MPI_LOCALRANKID", "1"}, {"MPI_LOCALNRANKS", "2"}}));
  CHECK(pmi.launcher == Launcher::mpi);
  CHECK(pmi.rank == 1);
  CHECK(pmi.rendezvous == "127.0.0.1:29500");
}

TEST_CASE("launch: NCCL_COMM_ID in the environment is the rendezvous" *
          doctest::test_suite("plumbing")) {
  const LaunchEnv l = launch_env_from(reader({{"RANK", "1"},
                                              {"WORLD_SIZE", "2"},
                                              {"LOCAL_RANK", "1"},
                                              {"NCCL_COMM_ID", "10.1.2.3:4242"}}));
  CHECK(l.rendezvous == "10.1.2.3:4242");
  CHECK(error_of({{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "1"}, {"NCCL_COMM_ID", "x"}})
            .find("NCCL_COMM_ID must be host:port") != std::string::npos);
}

TEST_CASE("launch: partial, malformed and inconsistent variables are refused with one sentence" *
          doctest::test_suite("plumbing")) {
  CHECK(error_of({{"RANK", "0"}}) == "the launcher set no WORLD_SIZE");
  CHECK(error_of({{"RANK", "x"}, {"WORLD_SIZE", "2"}}) == "RANK must be an integer (got 'x')");
  CHECK(error_of({{"RANK", "2"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "0"}}) ==
        "RANK is 2, outside a world of 2 processes");
  CHECK(error_of({{"RANK", "-1"}, {"WORLD_SIZE", "2"}}) ==
        "RANK must be between 0 and 1048576 (got -1)");
  CHECK(error_of({{"RANK", "0"},
                  {"WORLD_SIZE", "8"},
                  {"LOCAL_RANK", "4"},
                  {"LOCAL_WORLD_SIZE", "4"},
                  {"MASTER_ADDR", "a"},
                  {"MASTER_PORT", "1"}}) ==
        "LOCAL_RANK is 4, outside the 4 processes of this node");
  CHECK(error_of({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "0"}, {"MASTER_PORT", "1"}}) ==
        "the launcher set no MASTER_ADDR");
  CHECK(error_of({{"RANK", "0"},
                  {"WORLD_SIZE", "2"},
                  {"LOCAL_RANK", "0"},
                  {"MASTER_ADDR", "a"},
                  {"MASTER_PORT", "70000"}}) ==
        "MASTER_PORT must be between 1 and 65535 (got 70000)");
  CHECK(error_of({{"RANK", "0"},
                  {"WORLD_SIZE", "2"},
                  {"LOCAL_RANK", "0"},
                  {"MASTER_ADDR", "a:1"},
                  {"MASTER_PORT", "5"}})
            .find("without a port") != std::string::npos);
  CHECK(error_of({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "2"}, {"SLURM_LOCALID", "0"}}) ==
        "Slurm set neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST, and MASTER_ADDR is not "
        "set: no host to meet at");
  // A world of one needs no meeting point.
  CHECK(error_of({{"RANK", "0"}, {"WORLD_SIZE", "1"}, {"LOCAL_RANK", "0"}}).empty());
}

TEST_CASE("launch: the first host of a Slurm node list" * doctest::test_suite("independent")) {
  CHECK(first_slurm_host("node7") == "node7");
  CHECK(first_slurm_host("gpu-[007-010,12],login1") == "gpu-007");
  CHECK(first_slurm_host("a[3,5-6]") == "a3");
  CHECK(first_slurm_host("r[12-13]n[1-2]") == "r12n1");
  CHECK(first_slurm_host("x,y") == "x");
  CHECK_THROWS_AS(first_slurm_host(""), mop::InputError);
  CHECK_THROWS_AS(first_slurm_host("a[1-2"), mop::InputError);
}

TEST_CASE("launch: local processes get torchrun's variables and a failure stops the others" *
          doctest::test_suite("plumbing")) {
  const auto vars = local_child_environment(4, 2, 12345);
  std::map<std::string, std::string> m(vars.begin(), vars.end());
  CHECK(m["RANK"] == "2");
  CHECK(m["WORLD_SIZE"] == "4");
  CHECK(m["LOCAL_WORLD_SIZE"] == "4");
  CHECK(m["MASTER_PORT"] == "12345");
  const LaunchEnv l = launch_env_from(reader(m));
  CHECK(l.launcher == Launcher::mop);
  CHECK(l.rendezvous == "127.0.0.1:12345");

  const int port = free_local_port();
  CHECK(port > 0);
  CHECK(port <= 65535);
  // Every child succeeds: 0. One child fails, the one that would sleep is stopped: its status.
  CHECK(run_local_processes({"/bin/sh", "-c", "test \"$WORLD_SIZE\" = 3"}, 3) == 0);
  CHECK(run_local_processes({"/bin/sh", "-c", "if [ $RANK = 1 ]; then exit 5; fi; exec sleep 30"},
                            2) == 5);
  CHECK_THROWS_AS(run_local_processes({"/nonexistent/program"}, 1), std::runtime_error);
}

} // namespace real_backend_launch_launch_test
