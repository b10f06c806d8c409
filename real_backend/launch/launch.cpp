#include "real_backend/launch/launch.hpp"

#include "common/error.hpp"

#include <arpa/inet.h>
#include <cerrno>
#include <charconv>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <fmt/format.h>
#include <netinet/in.h>
#include <spawn.h>
#include <stdexcept>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

extern char** environ;

namespace mop::real {

namespace {

constexpr int kMaxWorld = 1 << 20; // a million processes: more than any cluster runs

int parse_int(const EnvReader& env, const std::string& name, int lo, int hi) {
  const std::optional<std::string> v = env(name);
  if (!v)
    throw InputError(fmt::format("the launcher set no {}", name));
  int x = 0;
  const char* b = v->data();
  const char* e = b + v->size();
  const auto [p, ec] = std::from_chars(b, e, x);
  if (ec != std::errc() || p != e || v->empty())
    throw InputError(
        fmt::format("{} must be an integer (got '{}')", name, quote_for_message(*v, 40)));
  if (x < lo || x > hi)
    throw InputError(fmt::format("{} must be between {} and {} (got {})", name, lo, hi, x));
  return x;
}

std::optional<int> parse_opt(const EnvReader& env, const std::string& name, int lo, int hi) {
  if (!env(name))
    return std::nullopt;
  return parse_int(env, name, lo, hi);
}

std::string host_of(const EnvReader& env, const std::string& name) {
  const std::optional<std::string> v = env(name);
  if (!v || v->empty())
    throw InputError(fmt::format("the launcher set no {}", name));
  for (char c : *v)
    if (c == ':' && v->front() != '[') // an IPv6 address must come bracketed
      throw InputError(fmt::format("{} must be a host name or address without a port (got '{}')",
                                   name, quote_for_message(*v, 60)));
  for (unsigned char c : *v)
    if (c <= ' ' || c >= 127)
      throw InputError(fmt::format("{} holds a character that is not part of a host name ('{}')",
                                   name, quote_for_message(*v, 60)));
  return *v;
}

void check_places(const LaunchEnv& l, const std::string& rank_var, const std::string& local_var) {
  if (l.rank >= l.world_size)
    throw InputError(
        fmt::format("{} is {}, outside a world of {} processes", rank_var, l.rank, l.world_size));
  if (l.local_world_size > 0 && l.local_rank >= l.local_world_size)
    throw InputError(fmt::format("{} is {}, outside the {} processes of this node", local_var,
                                 l.local_rank, l.local_world_size));
  if (l.local_world_size > l.world_size)
    throw InputError(fmt::format("the launcher puts {} processes on this node, more than the "
                                 "world's {}",
                                 l.local_world_size, l.world_size));
}

// Slurm's tasks per node: "8(x2),7" lists per node; node `node` gets its entry.
std::optional<int> slurm_tasks_on_node(const std::string& spec, int node) {
  int at = 0;
  std::size_t i = 0;
  while (i < spec.size()) {
    std::size_t j = i;
    while (j < spec.size() && spec[j] >= '0' && spec[j] <= '9')
      ++j;
    if (j == i)
      return std::nullopt;
    const int tasks = std::atoi(spec.substr(i, j - i).c_str());
    int repeat = 1;
    if (j < spec.size() && spec[j] == '(') {
      const std::size_t close = spec.find(')', j);
      if (close == std::string::npos || spec.compare(j, 2, "(x") != 0)
        return std::nullopt;
      repeat = std::atoi(spec.substr(j + 2, close - j - 2).c_str());
      j = close + 1;
    }
    if (node >= at && node < at + repeat)
      return tasks;
    at += repeat;
    if (j < spec.size() && spec[j] != ',')
      return std::nullopt;
    i = j + 1;
  }
  return std::nullopt;
}

std::string with_port(const std::string& host, int port) {
  return fmt::format("{}:{}", host, port);
}

} // namespace

std::string launcher_name(Launcher l) {
  switch (l) {
  case Launcher::none:
    return "single process";
  case Launcher::mop:
    return "mop --nproc-per-node";
  case Launcher::torchrun:
    return "torchrun";
  case Launcher::slurm:
    return "Slurm";
  case Launcher::mpi:
    return "MPI";
  }
  return "?";
}

std::string LaunchEnv::describe() const {
  std::string local = local_world_size > 0
                          ? fmt::format("local rank {} of {}", local_rank, local_world_size)
                          : fmt::format("local rank {}", local_rank);
  if (!rendezvous.empty())
    local += ", rendezvous " + rendezvous;
  return fmt::format("rank {} of {} ({}, {})", rank, world_size, launcher_name(launcher), local);
}

std::string first_slurm_host(const std::string& nodelist) {
  std::string out;
  int depth = 0;
  bool in_first_range = false;
  for (std::size_t i = 0; i < nodelist.size(); ++i) {
    const char c = nodelist[i];
    if (c == '[') {
      if (depth++ != 0)
        break;
      in_first_range = true;
      continue;
    }
    if (c == ']') {
      if (--depth < 0)
        break;
      continue;
    }
    if (depth == 0 && c == ',')
      break;
    if (depth > 0) {
      // Inside brackets: only the first number of the first range or item counts.
      if (c == ',' || c == '-')
        in_first_range = false;
      else if (in_first_range)
        out += c;
      continue;
    }
    out += c;
  }
  if (depth != 0 || out.empty())
    throw InputError(
        fmt::format("the Slurm node list '{}' names no host", quote_for_message(nodelist, 60)));
  return out;
}

LaunchEnv launch_env_from(const EnvReader& env) {
  LaunchEnv l;
  const std::optional<std::string> comm_id = env("NCCL_COMM_ID");
  auto port_or = [&](int fallback) {
    return parse_opt(env, "MASTER_PORT", 1, 65535).value_or(fallback);
  };
  if (env("RANK") || env("WORLD_SIZE")) {
    l.launcher = env("MOP_LOCAL_LAUNCH") ? Launcher::mop : Launcher::torchrun;
    l.world_size = parse_int(env, "WORLD_SIZE", 1, kMaxWorld);
    l.rank = parse_int(env, "RANK", 0, kMaxWorld);
    l.local_rank = parse_int(env, "LOCAL_RANK", 0, kMaxWorld);
    l.local_world_size = parse_opt(env, "LOCAL_WORLD_SIZE", 1, kMaxWorld).value_or(0);
    check_places(l, "RANK", "LOCAL_RANK");
    if (l.world_size > 1 && !comm_id) {
      const std::string host = host_of(env, "MASTER_ADDR");
      int port = parse_int(env, "MASTER_PORT", 1, 65535);
      // torchrun's agent serves its own TCP store on MASTER_PORT and tells the workers so:
      // NCCL's bootstrap root takes the next port.
      const std::optional<std::string> agent = env("TORCHELASTIC_USE_AGENT_STORE");
      if (agent && (*agent == "True" || *agent == "true" || *agent == "1")) {
        if (port == 65535)
          throw InputError("MASTER_PORT is 65535 and torchrun's store holds it: NCCL's "
                           "rendezvous needs the next port");
        port += 1;
      }
      l.rendezvous = with_port(host, port);
    }
  } else if (env("OMPI_COMM_WORLD_RANK") || env("PMI_RANK")) {
    l.launcher = Launcher::mpi;
    const bool ompi = env("OMPI_COMM_WORLD_RANK").has_value();
    const std::string rank_var = ompi ? "OMPI_COMM_WORLD_RANK" : "PMI_RANK";
    const std::string size_var = ompi ? "OMPI_COMM_WORLD_SIZE" : "PMI_SIZE";
    const std::string local_var = ompi ? "OMPI_COMM_WORLD_LOCAL_RANK" : "MPI_LOCALRANKID";
    const std::string local_size_var = ompi ? "OMPI_COMM_WORLD_LOCAL_SIZE" : "MPI_LOCALNRANKS";
    l.world_size = parse_int(env, size_var, 1, kMaxWorld);
    l.rank = parse_int(env, rank_var, 0, kMaxWorld);
    l.local_rank = parse_int(env, local_var, 0, kMaxWorld);
    l.local_world_size = parse_opt(env, local_size_var, 1, kMaxWorld).value_or(0);
    check_places(l, rank_var, local_var);
    if (l.world_size > 1 && !comm_id) {
      std::string host;
      if (env("MASTER_ADDR"))
        host = host_of(env, "MASTER_ADDR");
      else if (l.local_world_size == l.world_size)
        host = "127.0.0.1";
      else
        throw InputError(fmt::format("MPI runs {} processes over several nodes but names no "
                                     "meeting point: set MASTER_ADDR to rank 0's host (mpirun "
                                     "-x MASTER_ADDR=...)",
                                     l.world_size));
      l.rendezvous = with_port(host, port_or(29500));
    }
  } else if (env("SLURM_PROCID")) {
    l.launcher = Launcher::slurm;
    l.world_size = parse_int(env, "SLURM_NTASKS", 1, kMaxWorld);
    l.rank = parse_int(env, "SLURM_PROCID", 0, kMaxWorld);
    l.local_rank = parse_int(env, "SLURM_LOCALID", 0, kMaxWorld);
    l.local_world_size = 0;
    const std::optional<std::string> per_node = env("SLURM_STEP_TASKS_PER_NODE")
                                                    ? env("SLURM_STEP_TASKS_PER_NODE")
                                                    : env("SLURM_TASKS_PER_NODE");
    const std::optional<int> node = parse_opt(env, "SLURM_NODEID", 0, kMaxWorld);
    if (per_node && node)
      l.local_world_size = slurm_tasks_on_node(*per_node, *node).value_or(0);
    check_places(l, "SLURM_PROCID", "SLURM_LOCALID");
    if (l.world_size > 1 && !comm_id) {
      std::string host;
      if (env("MASTER_ADDR")) {
        host = host_of(env, "MASTER_ADDR");
      } else {
        const std::optional<std::string> list =
            env("SLURM_STEP_NODELIST") ? env("SLURM_STEP_NODELIST") : env("SLURM_JOB_NODELIST");
        if (!list)
          throw InputError("Slurm set neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST, and "
                           "MASTER_ADDR is not set: no host to meet at");
        host = first_slurm_host(*list);
      }
      // One port per job, so that two jobs sharing a node do not collide.
      const int job = parse_opt(env, "SLURM_JOB_ID", 0, 2147483647).value_or(0);
      l.rendezvous = with_port(host, port_or(20000 + job % 20000));
    }
  }
  if (comm_id && l.world_size > 1) {
    if (comm_id->empty() || comm_id->find(':') == std::string::npos)
      throw InputError(fmt::format("NCCL_COMM_ID must be host:port (got '{}')",
                                   quote_for_message(*comm_id, 60)));
    l.rendezvous = *comm_id;
  }
  return l;
}

LaunchEnv launch_env() {
  return launch_env_from([](const std::string& name) -> std::optional<std::string> {
    const char* v = std::getenv(name.c_str());
    if (!v)
      return std::nullopt;
    return std::string(v);
  });
}

std::vector<std::pair<std::string, std::string>> local_child_environment(int nproc, int local_rank,
                                                                         int port) {
  return {{"RANK", std::to_string(local_rank)},
          {"WORLD_SIZE", std::to_string(nproc)},
          {"LOCAL_RANK", std::to_string(local_rank)},
          {"LOCAL_WORLD_SIZE", std::to_string(nproc)},
          {"MASTER_ADDR", "127.0.0.1"},
          {"MASTER_PORT", std::to_string(port)},
          {"MOP_LOCAL_LAUNCH", "1"}};
}

int free_local_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0)
    throw std::runtime_error(fmt::format("cannot open a socket: {}", std::strerror(errno)));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    const int err = errno;
    ::close(fd);
    throw std::runtime_error(fmt::format("cannot bind a local port: {}", std::strerror(err)));
  }
  ::close(fd);
  return ntohs(addr.sin_port);
}

int run_local_processes(const std::vector<std::string>& argv, int nproc) {
  if (argv.empty() || nproc < 1)
    throw std::logic_error("run_local_processes needs a program and at least one process");
  const int port = free_local_port();
  std::vector<pid_t> pids;
  auto stop_all = [&] {
    for (pid_t p : pids)
      if (p > 0)
        ::kill(p, SIGTERM);
  };
  for (int r = 0; r < nproc; ++r) {
    // This process's environment with the child's variables replacing any of the same name.
    const auto vars = local_child_environment(nproc, r, port);
    std::vector<std::string> envs;
    for (char** e = environ; *e; ++e) {
      const std::string kv = *e;
      bool replaced = false;
      for (const auto& [k, v] : vars)
        replaced = replaced || kv.rfind(k + "=", 0) == 0;
      if (!replaced)
        envs.push_back(kv);
    }
    for (const auto& [k, v] : vars)
      envs.push_back(k + "=" + v);
    std::vector<char*> cenv, cargv;
    for (auto& s : envs)
      cenv.push_back(s.data());
    cenv.push_back(nullptr);
    std::vector<std::string> args = argv;
    for (auto& s : args)
      cargv.push_back(s.data());
    cargv.push_back(nullptr);
    pid_t pid = 0;
    const int rc = ::posix_spawn(&pid, cargv[0], nullptr, nullptr, cargv.data(), cenv.data());
    if (rc != 0) {
      stop_all();
      for (pid_t p : pids)
        ::waitpid(p, nullptr, 0);
      throw std::runtime_error(
          fmt::format("cannot start '{}': {}", quote_for_message(argv[0], 80), std::strerror(rc)));
    }
    pids.push_back(pid);
  }
  int first_failure = 0;
  for (std::size_t left = pids.size(); left > 0; --left) {
    int status = 0;
    const pid_t done = ::waitpid(-1, &status, 0);
    if (done < 0)
      break;
    for (pid_t& p : pids)
      if (p == done)
        p = 0;
    const int code = WIFEXITED(status) ? WEXITSTATUS(status)
                                       : (WIFSIGNALED(status) ? 128 + WTERMSIG(status) : 1);
    if (code != 0 && first_failure == 0) {
      first_failure = code;
      stop_all();
    }
  }
  return first_failure;
}

} // namespace mop::real
