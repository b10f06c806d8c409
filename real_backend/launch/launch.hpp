#pragma once
// Where a process of a multi-process run stands: its rank, the world's size, its place on its
// node and the address its world meets at, read from the environment that the usual launchers
// already set. mop starts no daemons and keeps no store: rank 0 listens at the meeting point
// (NCCL's bootstrap as NCCL_COMM_ID=host:port; the ranks' TCP world, real_backend/cpu/
// socket_world.hpp, at the same address).
//
//   launcher   rank / size / local rank / local size                      rendezvous host, port
//   torchrun   RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE             MASTER_ADDR, MASTER_PORT
//                                                                          (+1 when the agent's
//                                                                          store holds it)
//   Slurm      SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,                 MASTER_ADDR or the first
//              SLURM_STEP_TASKS_PER_NODE with SLURM_NODEID                 host of the step's node
//                                                                          list; MASTER_PORT or
//                                                                          20000 + job id % 20000
//   Open MPI   OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK, _LOCAL_SIZE       MASTER_ADDR (127.0.0.1
//   MPICH/PMI  PMI_RANK, PMI_SIZE, MPI_LOCALRANKID, MPI_LOCALNRANKS        when one node holds the
//                                                                          world), MASTER_PORT or
//                                                                          29500
// torchrun's variables win over the others (torchrun inside an salloc), MPI's over Slurm's
// (mpirun inside an salloc). A NCCL_COMM_ID already in the environment is kept as the rendezvous.
// docs/EXECUTOR.md shows the launch lines.
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace mop::real {

enum class Launcher { none, mop, torchrun, slurm, mpi };
std::string launcher_name(Launcher l);

struct LaunchEnv {
  Launcher launcher = Launcher::none;
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;       // picks the GPU: device local_rank
  int local_world_size = 1; // processes on this node; 0 when the launcher does not say
  std::string rendezvous;   // host:port for NCCL_COMM_ID; empty for a world of one
  // "rank 3 of 16 (torchrun, local rank 3 of 8, rendezvous node0:29501)"
  std::string describe() const;
};

// Reads a variable; nullopt when it is not set.
using EnvReader = std::function<std::optional<std::string>(const std::string& name)>;

// The launch environment from `env`. Throws InputError with one sentence naming the variable
// when a launcher's variables are partial, not integers, or inconsistent (a rank outside the
// world, a local rank outside its node, a port outside 1..65535).
LaunchEnv launch_env_from(const EnvReader& env);
// The same from this process's environment.
LaunchEnv launch_env();

// The first host name of a Slurm node list ("gpu-[007-010,12],login1" -> "gpu-007"). Throws
// InputError on an unbalanced bracket or an empty list.
std::string first_slurm_host(const std::string& nodelist);

// The torchrun-style variables of local process `local_rank` of `nproc` that
// `mop run --nproc-per-node` starts on this machine, meeting at 127.0.0.1:`port`.
std::vector<std::pair<std::string, std::string>> local_child_environment(int nproc, int local_rank,
                                                                         int port);

// A TCP port on the loopback interface that was free a moment ago (the kernel's choice for a
// socket bound to port 0; torchrun picks its own the same way). Throws std::runtime_error when
// no socket can be bound.
int free_local_port();

// Runs `argv` (argv[0] is the program) as `nproc` processes with local_child_environment added to
// this environment and waits for them. When one exits with a failure or is killed, the others
// are sent SIGTERM (as torchrun does) and the first failure's exit status is returned (128 +
// signal for a signal); 0 when all succeed. Throws std::runtime_error when a process cannot be
// started.
int run_local_processes(const std::vector<std::string>& argv, int nproc);

} // namespace mop::real
