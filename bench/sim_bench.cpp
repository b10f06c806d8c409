// How fast the event engine plays a Schedule: a synthetic MoE pipeline of about 100k ops
// (4 stages × 16 micro-batches × 142 layers, FSDP gathers, EP all-to-alls, activation offload,
// send/recv between stages). items = events (op starts and ends).
#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"
#include "sim/engine.hpp"

#include <benchmark/benchmark.h>

#include <string>

namespace {

using namespace mop;
using namespace mop::sim;

const hw::ClusterSpec& h200() {
  static const hw::ClusterSpec c = hw::load_cluster("h200");
  return c;
}

Schedule synthetic_pipeline(int stages, int micro_batches, int layers) {
  Schedule s;
  s.groups.push_back({"fsdp", 8, 8, {}});
  s.groups.push_back({"ep", 16, 8, {}});
  s.groups.push_back({"pp", 2, 1, {}});
  std::vector<std::vector<int>> send_act(static_cast<std::size_t>(stages)),
      send_grad(static_cast<std::size_t>(stages));
  for (int st = 0; st < stages; ++st) {
    RankClass rc;
    rc.name = "stage " + std::to_string(st);
    rc.stage = st;
    rc.multiplicity = 16;
    rc.streams = {"compute",  "comm.dp", "comm.ep", "copy.d2h",
                  "copy.h2d", "pp.send", "pp.recv", "host"};
    rc.tensors.push_back(cost_tensor("weights", 20e9, Device::hbm, MemoryKind::weights, true));
    s.classes.push_back(rc);
  }
  auto add = [&](int st, Op op) {
    auto& ops = s.classes[static_cast<std::size_t>(st)].ops;
    ops.push_back(std::move(op));
    return static_cast<int>(ops.size()) - 1;
  };
  auto tensor = [&](int st, std::string name, double bytes, Device d) {
    auto& t = s.classes[static_cast<std::size_t>(st)].tensors;
    t.push_back(cost_tensor(std::move(name), bytes, d, MemoryKind::activations, false));
    return static_cast<int>(t.size()) - 1;
  };
  auto make = [](std::string name, OpKind kind, int stream, std::vector<int> deps) {
    Op op;
    op.name = std::move(name);
    op.kind = kind;
    op.stream = stream;
    op.deps = std::move(deps);
    return op;
  };
  // Forward then backward of every micro-batch on every stage (GPipe order keeps the generator
  // short; the engine does the same work per op for any order).
  for (int st = 0; st < stages; ++st) {
    send_act[static_cast<std::size_t>(st)].resize(static_cast<std::size_t>(micro_batches));
    send_grad[static_cast<std::size_t>(st)].resize(static_cast<std::size_t>(micro_batches));
  }
  for (int st = 0; st < stages; ++st) {
    for (int mb = 0; mb < micro_batches; ++mb) {
      int prev = -1;
      if (st > 0) {
        Op recv = make("recv.act", OpKind::recv, 6, {});
        recv.peer_class = st - 1;
        recv.remote_deps.push_back(
            {st - 1, send_act[static_cast<std::size_t>(st - 1)][static_cast<std::size_t>(mb)]});
        prev = add(st, recv);
      }
      for (int l = 0; l < layers; ++l) {
        Op gather = make("ag", OpKind::all_gather, 1, {});
        gather.group = 0;
        gather.bytes = 200e6;
        const int g = add(st, gather);
        Op gemm = make("attn", OpKind::gemm, 0, {g});
        if (prev >= 0)
          gemm.deps.push_back(prev);
        gemm.gemm = {8192, 7168, 7168, 1, {}};
        const int act = tensor(st, "act", 100e6, Device::hbm);
        gemm.allocs = {act};
        const int a = add(st, gemm);
        Op a2a = make("dispatch", OpKind::all_to_all, 2, {a});
        a2a.group = 1;
        a2a.bytes = 100e6;
        const int d = add(st, a2a);
        Op experts = make("experts", OpKind::grouped_gemm, 0, {d});
        experts.gemm.rows_per_expert.assign(8, 1024);
        experts.gemm.n = 2048;
        experts.gemm.k = 7168;
        const int e = add(st, experts);
        Op combine = make("combine", OpKind::all_to_all, 2, {e});
        combine.group = 1;
        combine.bytes = 100e6;
        const int c = add(st, combine);
        Op norm = make("norm", OpKind::elementwise, 0, {c});
        norm.bytes = 300e6;
        prev = add(st, norm);
        Op off = make("offload", OpKind::copy_d2h, 3, {a});
        off.bytes = 100e6;
        const int host = tensor(st, "act.host", 100e6, Device::host);
        off.allocs = {host};
        off.frees = {act};
        add(st, off);
        s.classes[static_cast<std::size_t>(st)].tensors[static_cast<std::size_t>(host)].name =
            "act.host." + std::to_string(l);
      }
      if (st + 1 < stages) {
        Op send = make("send.act", OpKind::send, 5, {prev});
        send.group = 2;
        send.peer_class = st + 1;
        send.bytes = 50e6;
        send_act[static_cast<std::size_t>(st)][static_cast<std::size_t>(mb)] = add(st, send);
      }
    }
  }
  // Backward, last stage first.
  for (int st = stages - 1; st >= 0; --st) {
    auto& rc = s.classes[static_cast<std::size_t>(st)];
    for (int mb = 0; mb < micro_batches; ++mb) {
      int prev = -1;
      if (st + 1 < stages) {
        Op recv = make("recv.grad", OpKind::recv, 6, {});
        recv.peer_class = st + 1;
        recv.remote_deps.push_back(
            {st + 1, send_grad[static_cast<std::size_t>(st + 1)][static_cast<std::size_t>(mb)]});
        prev = add(st, recv);
      }
      for (int l = layers - 1; l >= 0; --l) {
        // The host copy of this layer's activation: tensor index of "act.host.<l>" of this mb.
        Op reload = make("reload", OpKind::copy_h2d, 4, {});
        reload.bytes = 100e6;
        const int act = tensor(st, "act.back", 100e6, Device::hbm);
        reload.allocs = {act};
        const int r = add(st, reload);
        Op gather = make("ag.bwd", OpKind::all_gather, 1, {});
        gather.group = 0;
        gather.bytes = 200e6;
        const int g = add(st, gather);
        Op grad = make("attn.bwd", OpKind::gemm, 0, {g, r});
        if (prev >= 0)
          grad.deps.push_back(prev);
        grad.gemm = {8192, 7168, 7168, 2, {}};
        grad.category = Category::backward;
        grad.frees = {act};
        const int a = add(st, grad);
        Op rs = make("rs", OpKind::reduce_scatter, 1, {a});
        rs.group = 0;
        rs.bytes = 200e6;
        rs.category = Category::dp_comm;
        add(st, rs);
        prev = a;
      }
      if (st > 0) {
        Op send = make("send.grad", OpKind::send, 5, {prev});
        send.group = 2;
        send.peer_class = st - 1;
        send.bytes = 50e6;
        send_grad[static_cast<std::size_t>(st)][static_cast<std::size_t>(mb)] = add(st, send);
      }
    }
    // Every host activation copy is freed by the last backward op of the stage.
    const int last = static_cast<int>(rc.ops.size()) - 1;
    for (int t = 0; t < static_cast<int>(rc.tensors.size()); ++t)
      if (rc.tensors[static_cast<std::size_t>(t)].device == Device::host)
        rc.ops[static_cast<std::size_t>(last)].frees.push_back(t);
    Op adam = make("adam", OpKind::host_adam, 7, {last});
    adam.params = 1e9;
    adam.category = Category::optimizer;
    add(st, adam);
  }
  return s;
}

const Schedule& big() {
  static const Schedule s = synthetic_pipeline(4, 16, 142);
  return s;
}

std::size_t op_count(const Schedule& s) {
  std::size_t n = 0;
  for (const auto& rc : s.classes)
    n += rc.ops.size();
  return n;
}

void BM_Simulate(benchmark::State& state) {
  const hw::Calibration none;
  EngineOptions o;
  o.check_schedule_first = state.range(0) != 0;
  std::int64_t events = 0;
  for (auto _ : state) {
    const SimResult r = simulate(big(), h200(), none, o);
    events += r.events;
    benchmark::DoNotOptimize(r.step_time_s);
  }
  state.SetItemsProcessed(events);
  state.counters["ops"] = static_cast<double>(op_count(big()));
}
BENCHMARK(BM_Simulate)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond);

void BM_CheckSchedule(benchmark::State& state) {
  for (auto _ : state)
    check_schedule(big());
  state.SetItemsProcessed(state.iterations() * static_cast<std::int64_t>(op_count(big())));
}
BENCHMARK(BM_CheckSchedule)->Unit(benchmark::kMillisecond);

} // namespace
