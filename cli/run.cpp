// mop run: execute a plan's training steps with real arithmetic. The plan is lowered to its
// executable Schedule (lowering/program.hpp) and the program interpreter runs it with the CPU
// executor's kernels (`--executor cpu`) or the CUDA backend's (`--executor cuda`, the default).
// Its ranks are `--ranks` threads of this process, or one process each: started by torchrun,
// Slurm or MPI (real_backend/launch), or by `--nproc-per-node` on one machine, meeting over TCP
// (real_backend/cpu/socket_world.hpp); rank 0 reports. Each process finds its rank (and its
// GPU) and stops with one sentence where what it needs is missing.
#include "cli/commands.hpp"
#include "cli/output.hpp"
#include "common/error.hpp"
#include "common/file_io.hpp"
#include "common/limits.hpp"
#include "common/units.hpp"
#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"
#include "lowering/program.hpp"
#include "real_backend/cpu/checkpoint.hpp"
#include "real_backend/cpu/interpreter.hpp"
#include "real_backend/cpu/socket_world.hpp"
#include "real_backend/cuda/api.hpp"
#include "real_backend/cuda/backend.hpp"
#include "real_backend/cuda/nccl_world.hpp"
#include "real_backend/launch/launch.hpp"
#include "sim/engine.hpp"
#include "strategies/hardware.hpp"
#include "strategies/presets.hpp"
#include "traces/chrome_trace.hpp"
#include "workload/catalog.hpp"

#include <algorithm>
#include <cmath>
#include <fmt/format.h>
#include <fstream>
#include <iostream>
#include <iterator>
#include <map>
#include <memory>
#include <optional>
#include <unistd.h>

namespace mop::cli {

namespace {

struct RunArgs {
  std::string model, plan = "fsdp2", executor = "cuda", seq = "64", data, resume, save;
  std::string trace, predicted_trace; // measured and predicted Perfetto traces of the last step
  std::string collectives;            // ranks in processes: nccl or tcp (default by executor)
  int ranks = 1, steps = 1, nproc_per_node = 1;
  std::int64_t batch = 0;
  std::uint64_t seed = 1;
  double lr = 1e-3;
  bool check = false, json = false;
  // Whether the option was given at all (an empty path or --batch 0 is refused, not ignored).
  bool batch_given = false, save_given = false, resume_given = false, ranks_given = false;
};

// A preset resolves over its family's plans that the program lowering builds and the CPU
// interpreter runs (no priced-only op); a path is checked as it is.
strategy::Plan choose_plan(const RunArgs& a, const workload::ModelSpec& spec,
                           const real::TinyConfig& c, std::int64_t seq, int batch) {
  strategy::PlanContext ctx;
  ctx.model = &spec;
  ctx.seq = seq;
  ctx.cluster.gpus_per_node = a.ranks;
  ctx.cluster.nodes = 1;
  ctx.hw = strategy::memory_hardware(hw::load_cluster("h200"));
  ctx.global_batch = batch;
  const strategy::Plan p =
      strategy::resolve_plan(a.plan, ctx, [&](const strategy::Plan& q) {
        if (q.world != a.ranks)
          throw InputError(fmt::format("the plan '{}' is for {} ranks, not --ranks {}", a.plan,
                                       q.world, a.ranks));
        const lowering::ProgramContext pc{&spec, seq, a.ranks};
        real::check_interpretable(lowering::lower_program(q, pc), c);
      }).plan;
  return p;
}

// The last step as the executor ran it, in the simulator's result shape so the trace writer
// draws it as it draws a prediction: each rank class's ops as its first rank ran them, that
// rank's live HBM after each op, and the step's end. No critical path: the ops ran one after
// another on each rank.
sim::SimResult measured_result(const sim::Schedule& s, const real::RunResult<float>& r) {
  sim::SimResult m;
  m.classes.resize(s.classes.size());
  std::vector<bool> done(s.classes.size(), false);
  for (int rank = 0; rank < s.world; ++rank) {
    const int stage = s.mesh.view("attention").coord(rank, "pp");
    for (std::size_t k = 0; k < s.classes.size(); ++k) {
      if (s.classes[k].stage != stage || done[k])
        continue;
      done[k] = true;
      sim::ClassResult& c = m.classes[k];
      c.ops = r.timeline[static_cast<std::size_t>(rank)];
      c.memory.timeline = r.memory_timeline[static_cast<std::size_t>(rank)];
      for (const sim::OpTiming& t : c.ops)
        c.end_s = std::max(c.end_s, t.end_s);
      for (const sim::MemorySample& x : c.memory.timeline)
        if (x.bytes > c.memory.peak_hbm_bytes) {
          c.memory.peak_hbm_bytes = x.bytes;
          c.memory.peak_time_s = x.time_s;
        }
      m.step_time_s = std::max(m.step_time_s, c.end_s);
    }
  }
  return m;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

// This program's path and arguments as it was started (/proc/self), to start it again.
std::vector<std::string> own_command_line() {
  std::vector<std::string> args;
  std::ifstream in("/proc/self/cmdline", std::ios::binary);
  const std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::size_t at = 0;
  while (at < all.size()) {
    const std::size_t end = all.find('\0', at);
    args.push_back(all.substr(at, end == std::string::npos ? std::string::npos : end - at));
    if (end == std::string::npos)
      break;
    at = end + 1;
  }
  char exe[4096];
  const ssize_t n = ::readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (args.empty() || n <= 0)
    throw std::runtime_error("cannot read this program's own command line from /proc/self");
  args[0] = std::string(exe, static_cast<std::size_t>(n));
  return args;
}

// Where this process stands: started by torchrun, Slurm or MPI, by `--nproc-per-node` (this
// process then starts the others and returns nullopt once they ran the plan), or alone.
std::optional<real::LaunchEnv> launch(const RunArgs& a) {
  if (a.nproc_per_node < 1 || a.nproc_per_node > limits::max_nproc_per_node)
    throw InputError(fmt::format("--nproc-per-node must be between 1 and {} (got {})",
                                 limits::max_nproc_per_node, a.nproc_per_node));
  const real::LaunchEnv env = real::launch_env();
  if (a.nproc_per_node > 1) {
    if (env.launcher != real::Launcher::none && env.launcher != real::Launcher::mop)
      throw InputError(fmt::format("--nproc-per-node starts the processes itself, but {} started "
                                   "this one ({}); leave --nproc-per-node out",
                                   real::launcher_name(env.launcher), env.describe()));
    if (env.launcher == real::Launcher::none) {
      const int rc = real::run_local_processes(own_command_line(), a.nproc_per_node);
      if (rc != 0)
        std::exit(rc <= 2 ? rc : 3); // a child that crashed is a bug
      return std::nullopt;
    }
  }
  return env;
}

// The CUDA executor's GPU for this process.
void prepare_cuda(const real::LaunchEnv& env) {
  std::string why;
  const real::cuda::Api* api = real::cuda::load_api(why);
  if (api == nullptr)
    throw InputError(fmt::format("{}: {}; run the plan on the CPU reference executor with "
                                 "--executor cpu",
                                 env.describe(), why));
  int gpus = 0;
  const std::string reason = api->probe(gpus);
  if (gpus == 0)
    throw InputError(fmt::format("{}: {}; run the plan on the CPU reference executor with "
                                 "--executor cpu",
                                 env.describe(), reason));
  if (env.local_rank >= gpus)
    throw InputError(fmt::format("{}: this node has {} GPUs, so local rank {} has none",
                                 env.describe(), gpus, env.local_rank));
  real::cuda::select_device(env.local_rank);
}

void run(RunArgs a) {
  if (a.executor != "cpu" && a.executor != "cuda")
    throw InputError(fmt::format("--executor must be cpu or cuda (got '{}')",
                                 quote_for_message(a.executor, 40)));
  const std::string collectives =
      !a.collectives.empty() ? a.collectives : a.executor == "cuda" ? "nccl" : "tcp";
  if (collectives != "nccl" && collectives != "tcp")
    throw InputError(fmt::format("--collectives must be nccl or tcp (got '{}')",
                                 quote_for_message(collectives, 40)));
  if (collectives == "nccl" && a.executor != "cuda")
    throw InputError("--collectives nccl needs the CUDA executor; the CPU executor's ranks meet "
                     "over tcp");
  const std::optional<real::LaunchEnv> env = launch(a);
  if (!env)
    return;
  // A world of processes: one rank each; --ranks, when given, must say the same.
  const bool processes = env->world_size > 1;
  if (processes) {
    if (a.ranks_given && a.ranks != env->world_size)
      throw InputError(fmt::format("{}: the world has {} processes, one per rank, but --ranks is "
                                   "{}; leave --ranks out",
                                   env->describe(), env->world_size, a.ranks));
    a.ranks = env->world_size;
  }
  const bool lead = env->rank == 0; // prints, writes traces and checkpoints
  if (a.executor == "cuda")
    prepare_cuda(*env);
  if (a.ranks < 1 || a.ranks > limits::max_cpu_ranks)
    throw InputError(fmt::format("--ranks must be between 1 and {} threads (got {})",
                                 limits::max_cpu_ranks, a.ranks));
  if (a.steps < 1 || a.steps > limits::max_run_steps)
    throw InputError(
        fmt::format("--steps must be between 1 and {} (got {})", limits::max_run_steps, a.steps));
  if (a.batch_given && (a.batch < 1 || a.batch > limits::max_cpu_tokens_per_step))
    throw InputError(fmt::format("--batch must be between 1 and {} sequences (got {})",
                                 limits::max_cpu_tokens_per_step, a.batch));
  if (!(a.lr > 0) || a.lr > limits::max_learning_rate)
    throw InputError(fmt::format("--lr must be a learning rate above 0 and at most {} (got {})",
                                 limits::max_learning_rate, a.lr));
  // Where the checkpoint goes, before any work: a run must not train for hours and then fail
  // to save.
  if (a.save_given && lead)
    real::check_checkpoint_target(a.save);
  const workload::ModelSpec spec = workload::load_model(a.model);
  const real::TinyConfig c = real::tiny_config(spec);
  const std::int64_t seq = parse_count(a.seq, "--seq");
  if (seq < 2 || seq > limits::max_cpu_seq)
    throw InputError(fmt::format("--seq must be between 2 and {} tokens on the CPU executor "
                                 "(got {})",
                                 limits::max_cpu_seq, seq));
  const int batch = a.batch_given ? static_cast<int>(a.batch) : 4 * a.ranks;
  const strategy::Plan plan = choose_plan(a, spec, c, seq, batch);
  if (plan.global_batch > limits::max_cpu_tokens_per_step / seq)
    throw InputError(fmt::format("a step of {} sequences of {} tokens is more than the CPU "
                                 "executor's {} tokens per step",
                                 plan.global_batch, seq, limits::max_cpu_tokens_per_step));

  const real::DataSource data = a.data.empty()
                                    ? real::DataSource::synthetic(c.vocab, a.seed)
                                    : real::DataSource::text_file(a.data, c.vocab, a.seed);
  const real::CheckpointIdentity identity = real::checkpoint_identity(
      c, real::PlanIdentity{strategy::summary(plan), strategy::to_json(plan).dump()}, data);
  real::TrainState<float> start;
  if (a.resume_given) {
    real::Checkpoint loaded = real::load_checkpoint(a.resume, c, identity);
    if (loaded.state.step + a.steps > limits::max_checkpoint_step)
      throw InputError(fmt::format("the checkpoint holds step {}; {} more steps pass the largest "
                                   "step count a checkpoint holds ({})",
                                   loaded.state.step, a.steps, limits::max_checkpoint_step));
    if (loaded.saved.plan_hash != identity.plan_hash)
      std::cerr << fmt::format("note: the checkpoint was saved under plan {}; it is resharded for "
                               "plan {}\n",
                               quote_for_message(loaded.saved.plan, 100), identity.plan);
    start = std::move(loaded.state);
  } else {
    start = real::initial_state<float>(c, a.seed);
  }
  real::RunOptions o;
  o.seq_len = static_cast<int>(seq);
  o.steps = a.steps;
  o.check = a.check;
  o.adam.lr = a.lr;
  o.timeline = !a.trace.empty();
  if (!a.trace.empty() && lead)
    check_output_path(a.trace);
  if (!a.predicted_trace.empty() && lead)
    check_output_path(a.predicted_trace);
  const char* hosted = processes               ? "ranks, one process each"
                       : a.executor == "cuda" ? "ranks on one GPU"
                                              : "CPU ranks";
  if (!a.json && lead)
    std::cout << fmt::format("{} on {} {}, seq {}, global batch {} sequences, from step {}\n"
                             "plan ({}): {}\n",
                             spec.name, a.ranks, hosted, seq, plan.global_batch, start.step,
                             plan.family, strategy::summary(plan));
  // The plan's executable Schedule, interpreted, and what the simulator predicts for it on the
  // reference cluster (per rank over the run: op time by kind, peak memory of each rank's class).
  const lowering::ProgramContext pc{&spec, seq, a.ranks};
  real::RunResult<float> r;
  std::map<std::string, double> predicted_s;
  std::vector<double> simulated_peak;
  {
    const sim::Schedule schedule = lowering::lower_program(plan, pc);
    sim::check_schedule(schedule);
    // A world of processes meets here (every process has checked its input by now).
    // A failure of the world (a peer that crashed or never came, ranks started with different
    // arguments) is the launch's, not a bug: exit 1 with the sentence.
    try {
      std::unique_ptr<real::World> world;
      if (processes) {
        auto tcp = real::socket_world(env->rendezvous, env->world_size, env->rank);
        world = std::make_unique<real::World>(collectives == "nccl"
                                                  ? real::cuda::nccl_world(std::move(tcp))
                                                  : std::move(tcp));
      }
      r = a.executor == "cuda" ? real::cuda::interpret(schedule, c, data, start, o, world.get())
                               : real::interpret<float>(schedule, c, data, start, o, world.get());
    } catch (const real::CommError& e) {
      if (!processes)
        throw;
      throw InputError(fmt::format("{}: {}", env->describe(), e.what()));
    }
    if (!lead)
      return; // the result is rank 0's to report
    const sim::SimResult sr = sim::simulate(schedule, hw::load_cluster("h200"), hw::Calibration{});
    for (std::size_t k = 0; k < schedule.classes.size(); ++k) {
      const sim::RankClass& rc = schedule.classes[k];
      for (std::size_t i = 0; i < rc.ops.size(); ++i) {
        const sim::OpTiming& t = sr.classes[k].ops[i];
        predicted_s[real::op_count_key(rc.ops[i])] +=
            (t.end_s - t.start_s) * rc.multiplicity * a.steps / schedule.world;
      }
    }
    for (int rank = 0; rank < schedule.world; ++rank) {
      const int stage = schedule.mesh.view("attention").coord(rank, "pp");
      for (std::size_t k = 0; k < schedule.classes.size(); ++k)
        if (schedule.classes[k].stage == stage)
          simulated_peak.push_back(sr.classes[k].memory.peak_hbm_bytes);
    }
    if (!a.predicted_trace.empty())
      trace::write_chrome_trace(a.predicted_trace, schedule, sr,
                                {true, true, "predicted: " + strategy::summary(plan)});
    if (!a.trace.empty())
      trace::write_chrome_trace(
          a.trace, schedule, measured_result(schedule, r),
          {true, false, "measured (" + a.executor + " executor): " + strategy::summary(plan)});
  }
  for (std::size_t k = 0; k < r.losses.size(); ++k)
    if (!std::isfinite(r.losses[k]))
      throw InputError(fmt::format("training diverged: the loss of step {} is {}; try a smaller "
                                   "--lr (got {})",
                                   start.step + static_cast<std::int64_t>(k) + 1, r.losses[k],
                                   a.lr));
  if (a.save_given)
    real::save_checkpoint(a.save, identity, c, r.state);

  if (a.json) {
    Json ops = Json::object();
    for (const auto& [kind, t] : r.ops) {
      const auto sched = r.scheduled.find(kind);
      const auto pred = predicted_s.find(kind);
      ops[kind] = Json{{"count", t.count},
                       {"scheduled", sched == r.scheduled.end() ? Json() : Json(sched->second)},
                       {"measured_s", t.seconds},
                       {"predicted_s", pred == predicted_s.end() ? Json() : Json(pred->second)}};
    }
    Json j{{"model", spec.name},
           {"executor", a.executor},
           {"ranks", a.ranks},
           {"seq", seq},
           {"global_batch", plan.global_batch},
           {"first_step", start.step},
           {"steps", a.steps},
           {"loss", r.losses},
           {"step_time_s", median(r.step_time_s)},
           {"step_times_s", r.step_time_s},
           {"tokens_per_s", static_cast<double>(plan.global_batch) * static_cast<double>(seq) /
                                std::max(median(r.step_time_s), 1e-12)},
           {"ops", ops},
           {"program", true},
           {"plan", strategy::to_json(plan)}};
    j["memory"] = Json{{"peak_bytes", r.peak_bytes}, {"simulated_peak_bytes", simulated_peak}};
    if (a.check)
      j["check"] = Json{{"max_loss_rel_diff", r.max_loss_rel_diff},
                        {"max_grad_rel_diff", r.max_grad_rel_diff},
                        {"max_param_rel_diff", r.max_param_rel_diff},
                        {"reference", "single rank, float64"}};
    if (a.save_given)
      j["checkpoint"] = a.save;
    print_json(j);
    return;
  }
  for (std::size_t k = 0; k < r.losses.size(); ++k)
    std::cout << fmt::format("step {:>4}  loss {:.4f}  {}\n",
                             start.step + static_cast<std::int64_t>(k) + 1, r.losses[k],
                             format_seconds(r.step_time_s[k]));
  TextTable t{{"op", "count", "scheduled", "time per rank"}, {}, {false, true, true, true}};
  for (const auto& [kind, op] : r.ops) {
    const auto sched = r.scheduled.find(kind);
    t.rows.push_back({kind, std::to_string(op.count),
                      sched == r.scheduled.end() ? "-" : std::to_string(sched->second),
                      format_seconds(op.seconds)});
  }
  std::cout << fmt::format("\nthe plan's executable Schedule, run by the {} interpreter\n",
                           a.executor == "cuda" ? "CUDA" : "CPU")
            << t.render();
  if (a.check)
    std::cout << fmt::format("\ncheck against the single-rank float64 reference: loss {:.2e}, "
                             "gradients {:.2e}, parameters {:.2e} (largest relative differences)\n",
                             r.max_loss_rel_diff, r.max_grad_rel_diff, r.max_param_rel_diff);
  if (a.save_given)
    std::cout << fmt::format("checkpoint written to {}\n", a.save);
}

} // namespace

void add_run_command(CLI::App& app) {
  auto a = std::make_shared<RunArgs>();
  CLI::App* cmd = app.add_subcommand(
      "run", "Execute a plan's training steps with real arithmetic and report loss and per-op "
             "times\n\nExample:\n  mop run --executor cpu --model tiny-moe --ranks 4 --plan mop "
             "--steps 50");
  cmd->add_option("--model", a->model, "catalog id or path to a Hugging Face config.json")
      ->required();
  cmd->add_option("--plan", a->plan, "preset (fsdp2, megatron, ulysses-zero3, mop) or plan JSON")
      ->capture_default_str();
  cmd->add_option("--executor", a->executor,
                  "cuda (real kernels on GPUs) or cpu (the float reference)")
      ->capture_default_str();
  CLI::Option* ranks =
      cmd->add_option("--ranks", a->ranks,
                      "ranks as threads of this process (under torchrun, Slurm, MPI or "
                      "--nproc-per-node: one per process)")
          ->capture_default_str();
  cmd->add_option("--nproc-per-node", a->nproc_per_node,
                  "start this many processes on this machine, one rank each (CUDA: one per "
                  "GPU; under torchrun, Slurm or MPI leave it out)")
      ->capture_default_str();
  cmd->add_option("--collectives", a->collectives,
                  "ranks in separate processes: nccl (the CUDA executor's default) or tcp (the "
                  "CPU executor's)");
  cmd->add_option("--steps", a->steps, "optimizer steps")->capture_default_str();
  cmd->add_option("--seq", a->seq, "tokens per sequence (64, 1K, ...)")->capture_default_str();
  CLI::Option* batch =
      cmd->add_option("--batch", a->batch, "sequences per optimizer step (default 4 per rank)");
  cmd->add_option("--seed", a->seed, "seed of the initial weights and the data")
      ->capture_default_str();
  cmd->add_option("--lr", a->lr, "AdamW learning rate")->capture_default_str();
  cmd->add_option("--data", a->data,
                  "train on the bytes of this text file (default: a "
                  "generated, learnable token stream)");
  CLI::Option* save =
      cmd->add_option("--save-checkpoint", a->save, "write the state after the last step here");
  CLI::Option* resume = cmd->add_option("--resume", a->resume, "start from this checkpoint");
  cmd->add_option("--trace", a->trace,
                  "write the last step as the executor ran it (Chrome/Perfetto JSON)");
  cmd->add_option("--predicted-trace", a->predicted_trace,
                  "write the simulator's prediction of the same Schedule (Chrome/Perfetto JSON)");
  cmd->add_flag("--check", a->check,
                std::string("compare every step with a single-rank float64 reference"));
  add_output_options(cmd, a->json);
  cmd->callback([a, batch, save, resume, ranks] {
    a->ranks_given = ranks->count() > 0;
    a->batch_given = batch->count() > 0;
    a->save_given = save->count() > 0;
    a->resume_given = resume->count() > 0;
    run(*a);
  });
}

} // namespace mop::cli
