#include "sim/engine.hpp"

#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"
#include "hw_models/collective.hpp"
#include "hw_models/compute.hpp"
#include "hw_models/copy.hpp"
#include "hw_models/host_optimizer.hpp"
#include "sim/memory_tracker.hpp"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <span>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace mop::sim {
namespace {

hw::Dtype hw_dtype(Dtype d) {
  switch (d) {
  case Dtype::bf16:
    return hw::Dtype::bf16;
  case Dtype::fp8:
    return hw::Dtype::fp8;
  case Dtype::fp32:
    return hw::Dtype::fp32;
  }
  return hw::Dtype::bf16;
}

// One GEMM's time by its shape: a Schedule repeats each layer's GEMMs for every micro-batch and
// every layer of a kind, and pricing one (efficiency curves, wave quantisation) costs more than
// playing it. An Engine prices each distinct shape once.
class GemmTimes {
public:
  GemmTimes(const hw::ClusterSpec& c, const hw::Calibration& cal) : c_(c), cal_(cal) {}
  double time_s(double m, double n, double k, Dtype dtype) {
    const Key key{m, n, k, dtype};
    const auto [it, added] = times_.try_emplace(key, 0.0);
    if (added)
      it->second = hw::gemm_time_s(c_, cal_, m, n, k, hw_dtype(dtype));
    return it->second;
  }

private:
  struct Key {
    double m, n, k;
    Dtype dtype;
    bool operator==(const Key&) const = default;
  };
  struct Hash {
    std::size_t operator()(const Key& x) const {
      std::size_t h = std::hash<int>{}(static_cast<int>(x.dtype));
      for (double v : {x.m, x.n, x.k})
        h = h * 1000003u ^ std::hash<double>{}(v);
      return h;
    }
  };
  const hw::ClusterSpec& c_;
  const hw::Calibration& cal_;
  std::unordered_map<Key, double, Hash> times_;
};

// op_duration_s, with a GEMM's shape priced through `gemms` (once per shape) when given.
double op_time_s(const Op& op, const Schedule& s, const hw::ClusterSpec& c,
                 const hw::Calibration& cal, GemmTimes* gemms);

hw::AttentionShape hw_attention(const AttentionShape& a) {
  hw::AttentionShape h;
  h.batch = a.batch;
  h.heads = a.heads;
  h.kv_heads = a.kv_heads;
  h.q_len = a.q_len;
  h.kv_len = a.kv_len;
  h.qk_head_dim = a.qk_head_dim;
  h.v_head_dim = a.v_head_dim;
  h.causal = a.causal;
  h.window = a.window;
  h.kernel = a.kernel == AttentionKernel::flash2  ? hw::AttentionKernel::flash2
             : a.kernel == AttentionKernel::cudnn ? hw::AttentionKernel::cudnn
                                                  : hw::AttentionKernel::flash;
  return h;
}

hw::CollectiveOp hw_collective(OpKind k) {
  switch (k) {
  case OpKind::all_gather:
    return hw::CollectiveOp::all_gather;
  case OpKind::reduce_scatter:
    return hw::CollectiveOp::reduce_scatter;
  case OpKind::all_reduce:
    return hw::CollectiveOp::all_reduce;
  case OpKind::all_to_all:
    return hw::CollectiveOp::all_to_all;
  default:
    return hw::CollectiveOp::send_recv;
  }
}

const Group& group_of_op(const Op& op, const Schedule& s) {
  if (op.group < 0 || static_cast<std::size_t>(op.group) >= s.groups.size())
    throw std::invalid_argument("Op '" + op.name + "' (" + op_kind_name(op.kind) +
                                ") names group " + std::to_string(op.group) +
                                ", but the schedule has " + std::to_string(s.groups.size()) +
                                " groups.");
  return s.groups[static_cast<std::size_t>(op.group)];
}

// The host's cores are shared by the node's ranks: each rank's optimizer gets its GPU's share.
int host_cores_per_rank(const hw::ClusterSpec& c) {
  return std::max(1, c.node.host_cores / std::max(1, c.node.gpus_per_node));
}

// What an op occupies while it runs; ops on one resource of one class share it.
enum Resource : std::uint8_t { sms, nvlink, nic, pcie_h2d, pcie_d2h, host_cpu, kResources };

Resource resource_of(const Op& op, const Schedule& s) {
  switch (op.kind) {
  case OpKind::gemm:
  case OpKind::grouped_gemm:
  case OpKind::attention_fwd:
  case OpKind::attention_bwd:
  case OpKind::elementwise:
    return sms;
  case OpKind::all_gather:
  case OpKind::reduce_scatter:
  case OpKind::all_reduce:
  case OpKind::all_to_all:
  case OpKind::send_recv:
  case OpKind::send:
  case OpKind::recv: {
    if (op.group < 0) // a recv without a group takes no time and occupies nothing
      return nvlink;
    return s.groups[static_cast<std::size_t>(op.group)].inside_node() ? nvlink : nic;
  }
  case OpKind::copy_h2d:
    return pcie_h2d;
  case OpKind::copy_d2h:
    return pcie_d2h;
  case OpKind::host_adam:
    return host_cpu;
  case OpKind::barrier: // no time, nothing occupied (as a group-less recv)
    return nvlink;
  }
  return sms;
}

// What the time breakdown charges an op's running time to (docs/ENGINE.md).
enum Charge : std::uint8_t { compute_bucket, optimizer_bucket, comm_bucket, copy_bucket };

Charge bucket_of(const Op& op) {
  if (op.kind == OpKind::host_adam || op.category == Category::optimizer)
    return optimizer_bucket;
  if (is_collective(op.kind))
    return comm_bucket;
  if (is_copy(op.kind))
    return copy_bucket;
  return compute_bucket;
}

struct Event {
  double time_s;
  int op; // global index: class offset + op index, so (time, op) orders ties by (class, op)
  std::uint32_t version;
};

// std heap functions keep the largest on top: "larger" here is the later event.
bool later(const Event& a, const Event& b) {
  return a.time_s > b.time_s || (a.time_s == b.time_s && a.op > b.op);
}

enum State : std::uint8_t { waiting, running, done };

// An Event's version for an op's issue by the host (OpRun versions count re-ratings from 0).
constexpr std::uint32_t kIssued = 0xFFFFFFFFu;

struct OpRun {
  double duration_s = 0;
  double remaining_s = 0; // work left, in seconds at rate 1, as of last_s
  double rate = 0;
  double last_s = 0;
  double start_s = 0;
  double end_s = 0;
  int rank_class = 0;
  int running_slot = -1; // position in its class's running list
  std::uint32_t version = 0;
  Resource resource = sms;
  State state = waiting;
};

struct ClassRun {
  std::vector<int> running; // ops with work in flight (zero-duration ops never enter)
  int count[kResources] = {0, 0, 0, 0, 0, 0};
  // Rate of one copy alone in its direction: [direction][other direction busy][NIC busy].
  double copy_rate[2][2][2] = {{{1, 1}, {1, 1}}, {{1, 1}, {1, 1}}};
  double nic_rate_with_copy = 1; // a NIC collective's rate while a copy shares the PCIe switch
  bool touched = false;
};

class Engine {
public:
  Engine(const Schedule& s, const hw::ClusterSpec& c, const hw::Calibration& cal,
         const EngineOptions& o)
      : s_(s), options_(o) {
    if (!(o.compute_slowdown_with_comm >= 0 && o.compute_slowdown_with_comm < 1))
      throw std::invalid_argument("compute_slowdown_with_comm must lie in [0, 1) (got " +
                                  std::to_string(o.compute_slowdown_with_comm) + ").");
    build_graph(c, cal);
    set_sharing(c, cal);
  }

  SimResult run();

private:
  void build_graph(const hw::ClusterSpec& c, const hw::Calibration& cal);
  void set_sharing(const hw::ClusterSpec& c, const hw::Calibration& cal);
  void start(int g);
  void complete(int g);
  // The host side (Schedule::host_issue_s > 0): issue class k's ops in program order from its
  // host clock, up to the next host_sync op. An op whose predecessors have ended is ready at
  // its issue time: at once when that has passed, else by an issue event then (an event only
  // where the host, not the device, holds the op).
  void issue(int k);
  void ready(int g) {
    if (issue_time_.empty()) {
      ready_.push_back(g);
      return;
    }
    const double t = issue_time_[static_cast<std::size_t>(g)];
    if (t <= now_)
      ready_.push_back(g);
    else if (t < kNotIssued)
      push({t, g, kIssued});
    // else: not issued yet; issue() makes it ready
  }
  void rerate(int rank_class);
  double rate_of(const ClassRun& cr, Resource r) const;
  void push(const Event& e) {
    heap_.push_back(e);
    std::push_heap(heap_.begin(), heap_.end(), later);
  }
  const Op& op_at(int g) const {
    const int c = runs_[static_cast<std::size_t>(g)].rank_class;
    return s_.classes[static_cast<std::size_t>(c)]
        .ops[static_cast<std::size_t>(g - offset_[static_cast<std::size_t>(c)])];
  }
  void touch(int rank_class) {
    ClassRun& cr = classes_[static_cast<std::size_t>(rank_class)];
    if (!cr.touched) {
      cr.touched = true;
      touched_.push_back(rank_class);
    }
  }
  std::vector<CriticalStep> critical_path() const;

  const Schedule& s_;
  EngineOptions options_;
  std::vector<int> offset_;          // first global index of each class, then the total
  std::vector<OpRun> runs_;          // by global index
  std::vector<int> stream_previous_; // previous op on the same stream (global), -1 for none
  std::vector<int> pending_;         // predecessors not yet ended
  std::vector<int> successor_offset_, successors_; // CSR: who waits on each op
  // CSR copies of each op's allocs and frees: the event loop never touches the (large) Ops.
  std::vector<int> alloc_offset_, allocs_, free_offset_, frees_;
  std::vector<ClassRun> classes_;
  std::vector<MemoryTracker> memory_;
  std::vector<Event> heap_;
  std::vector<int> ready_, touched_;
  // Host issue (empty when the Schedule does not model it): each op's issue cost, and per class
  // the next op to issue, the host's clock and the host_sync op it waits for (-1: none).
  std::vector<double> issue_cost_, issue_time_, host_clock_;
  static constexpr double kNotIssued = std::numeric_limits<double>::infinity();
  std::vector<int> next_issue_, waiting_sync_;
  double now_ = 0;
  std::int64_t events_ = 0;
};

void Engine::build_graph(const hw::ClusterSpec& c, const hw::Calibration& cal) {
  const std::size_t n_classes = s_.classes.size();
  offset_.assign(n_classes + 1, 0);
  for (std::size_t k = 0; k < n_classes; ++k)
    offset_[k + 1] = offset_[k] + static_cast<int>(s_.classes[k].ops.size());
  const std::size_t n = static_cast<std::size_t>(offset_.back());
  runs_.resize(n);
  pending_.assign(n, 0);
  stream_previous_.assign(n, -1);
  successor_offset_.assign(n + 1, 0);

  // Two passes over the edges (count, then fill) build the successor lists without per-op
  // vectors: predecessor → op for the previous op on the stream, each dep and each remote dep.
  auto for_each_edge = [&](auto&& edge) {
    for (std::size_t k = 0; k < n_classes; ++k) {
      const RankClass& rc = s_.classes[k];
      std::vector<int> last(rc.streams.size(), -1);
      for (std::size_t i = 0; i < rc.ops.size(); ++i) {
        const Op& op = rc.ops[i];
        const int g = offset_[k] + static_cast<int>(i);
        int& previous = last[static_cast<std::size_t>(op.stream)];
        if (previous != -1)
          edge(previous, g, true);
        previous = g;
        for (int d : op.deps)
          edge(offset_[k] + d, g, false);
        for (const RemoteDep& r : op.remote_deps)
          edge(offset_[static_cast<std::size_t>(r.rank_class)] + r.op, g, false);
      }
    }
  };
  for_each_edge([&](int from, int to, bool on_stream) {
    ++successor_offset_[static_cast<std::size_t>(from) + 1];
    ++pending_[static_cast<std::size_t>(to)];
    if (on_stream)
      stream_previous_[static_cast<std::size_t>(to)] = from;
  });
  for (std::size_t g = 0; g < n; ++g)
    successor_offset_[g + 1] += successor_offset_[g];
  successors_.resize(static_cast<std::size_t>(successor_offset_.back()));
  std::vector<int> fill(successor_offset_.begin(), successor_offset_.end() - 1);
  for_each_edge([&](int from, int to, bool) {
    successors_[static_cast<std::size_t>(fill[static_cast<std::size_t>(from)]++)] = to;
  });

  if (s_.host_issue_s > 0) {
    issue_cost_.assign(n, 0.0);
    issue_time_.assign(n, -1.0); // ops the host does not issue: always issued
    host_clock_.assign(n_classes, 0.0);
    waiting_sync_.assign(n_classes, -1);
    next_issue_.assign(offset_.begin(), offset_.end() - 1);
    for (std::size_t k = 0; k < n_classes; ++k) {
      const RankClass& rc = s_.classes[k];
      for (std::size_t i = 0; i < rc.ops.size(); ++i) {
        const Op& op = rc.ops[i];
        const std::size_t g = static_cast<std::size_t>(offset_[k]) + i;
        // A barrier, a group-less recv and the host's own AdamW launch no kernel: the host does
        // not issue them (a lowering may place a barrier after the ops that wait for it).
        if (!launches_kernels(op))
          continue;
        issue_time_[g] = kNotIssued;
        issue_cost_[g] = s_.host_issue_s * op.kernels;
      }
    }
  }

  alloc_offset_.assign(1, 0);
  free_offset_.assign(1, 0);
  alloc_offset_.reserve(n + 1);
  free_offset_.reserve(n + 1);
  GemmTimes gemm_times(c, cal);
  for (std::size_t k = 0; k < n_classes; ++k) {
    const RankClass& rc = s_.classes[k];
    for (std::size_t i = 0; i < rc.ops.size(); ++i) {
      const Op& op = rc.ops[i];
      OpRun& r = runs_[static_cast<std::size_t>(offset_[k]) + i];
      r.rank_class = static_cast<int>(k);
      r.duration_s = op_time_s(op, s_, c, cal, &gemm_times);
      r.resource = resource_of(op, s_);
      allocs_.insert(allocs_.end(), op.allocs.begin(), op.allocs.end());
      frees_.insert(frees_.end(), op.frees.begin(), op.frees.end());
      alloc_offset_.push_back(static_cast<int>(allocs_.size()));
      free_offset_.push_back(static_cast<int>(frees_.size()));
    }
  }
}

void Engine::set_sharing(const hw::ClusterSpec& c, const hw::Calibration& cal) {
  classes_.resize(s_.classes.size());
  memory_.reserve(s_.classes.size());
  using hw::CopyDirection;
  const CopyDirection directions[2] = {CopyDirection::host_to_device,
                                       CopyDirection::device_to_host};
  const double h2d_alone = hw::host_device_bandwidth(c, cal, {CopyDirection::host_to_device});
  const double d2h_alone = hw::host_device_bandwidth(c, cal, {CopyDirection::device_to_host});
  // The GPU's x16 link runs through its NIC's PCIe switch (docs/HARDWARE.md "Copies"): max-min
  // fair sharing gives the NIC min(its bandwidth, half the link) while a copy runs.
  double nic_rate_with_copy = 1;
  if (c.node.nic_shares_pcie_switch && c.node.nics > 0 && c.node.nic_bandwidth > 0) {
    const double nic_per_gpu = c.node.nic_bandwidth * c.node.nics / c.node.gpus_per_node;
    const double link = (h2d_alone + d2h_alone) / 2;
    nic_rate_with_copy = std::min(1.0, link / 2 / nic_per_gpu);
  }
  for (std::size_t k = 0; k < s_.classes.size(); ++k) {
    const RankClass& rc = s_.classes[k];
    memory_.emplace_back(rc, options_.record_memory_timeline, options_.memory_by_layer);
    ClassRun& cr = classes_[k];
    cr.running.reserve(rc.streams.size());
    cr.nic_rate_with_copy = nic_rate_with_copy;
    // A class's ranks run in lockstep, so those that share a node copy at the same moments and
    // share its host DRAM (hw::HostCopy::gpus_copying).
    const int gpus_copying = std::clamp(rc.multiplicity, 1, std::max(1, c.node.gpus_per_node));
    for (int d = 0; d < 2; ++d)
      for (int both = 0; both < 2; ++both)
        for (int nic_busy = 0; nic_busy < 2; ++nic_busy) {
          hw::HostCopy copy;
          copy.direction = directions[d];
          copy.both_directions = both != 0;
          copy.nic_busy = nic_busy != 0;
          copy.gpus_copying = gpus_copying;
          cr.copy_rate[d][both][nic_busy] =
              hw::host_device_bandwidth(c, cal, copy) / (d == 0 ? h2d_alone : d2h_alone);
        }
  }
}

double Engine::rate_of(const ClassRun& cr, Resource r) const {
  const int* n = cr.count;
  switch (r) {
  case sms: {
    const double share = 1.0 / n[sms];
    return n[nvlink] + n[nic] > 0 ? share * (1 - options_.compute_slowdown_with_comm) : share;
  }
  case nvlink:
    return 1.0 / n[nvlink];
  case nic:
    return (n[pcie_h2d] + n[pcie_d2h] > 0 ? cr.nic_rate_with_copy : 1.0) / n[nic];
  case pcie_h2d:
    return cr.copy_rate[0][n[pcie_d2h] > 0][n[nic] > 0] / n[pcie_h2d];
  case pcie_d2h:
    return cr.copy_rate[1][n[pcie_h2d] > 0][n[nic] > 0] / n[pcie_d2h];
  case host_cpu:
  case kResources:
    return 1.0 / n[host_cpu];
  }
  return 1;
}

void Engine::start(int g) {
  OpRun& r = runs_[static_cast<std::size_t>(g)];
  r.state = running;
  r.start_s = now_;
  ++events_;
  const std::size_t gi = static_cast<std::size_t>(g);
  memory_[static_cast<std::size_t>(r.rank_class)].allocate(
      std::span<const int>(allocs_).subspan(
          static_cast<std::size_t>(alloc_offset_[gi]),
          static_cast<std::size_t>(alloc_offset_[gi + 1] - alloc_offset_[gi])),
      now_, g - offset_[static_cast<std::size_t>(r.rank_class)]);
  if (r.duration_s <= 0) {
    // Takes no time and occupies nothing: ends at once, after this batch's starts.
    push({now_, g, r.version});
    return;
  }
  ClassRun& cr = classes_[static_cast<std::size_t>(r.rank_class)];
  r.running_slot = static_cast<int>(cr.running.size());
  cr.running.push_back(g);
  ++cr.count[r.resource];
  r.remaining_s = r.duration_s;
  r.rate = 0; // rerate() gives it its rate and its end event
  r.last_s = now_;
  touch(r.rank_class);
}

void Engine::complete(int g) {
  OpRun& r = runs_[static_cast<std::size_t>(g)];
  r.state = done;
  r.end_s = now_;
  ++events_;
  if (r.running_slot >= 0) {
    ClassRun& cr = classes_[static_cast<std::size_t>(r.rank_class)];
    const int moved = cr.running.back();
    cr.running[static_cast<std::size_t>(r.running_slot)] = moved;
    runs_[static_cast<std::size_t>(moved)].running_slot = r.running_slot;
    cr.running.pop_back();
    r.running_slot = -1;
    --cr.count[r.resource];
    touch(r.rank_class);
  }
  const std::size_t gi = static_cast<std::size_t>(g);
  if (!waiting_sync_.empty() && waiting_sync_[static_cast<std::size_t>(r.rank_class)] == g) {
    // The host read what it waited for: it issues on from now.
    waiting_sync_[static_cast<std::size_t>(r.rank_class)] = -1;
    double& clock = host_clock_[static_cast<std::size_t>(r.rank_class)];
    clock = std::max(clock, now_);
    issue(r.rank_class);
  }
  memory_[static_cast<std::size_t>(r.rank_class)].free(
      std::span<const int>(frees_).subspan(
          static_cast<std::size_t>(free_offset_[gi]),
          static_cast<std::size_t>(free_offset_[gi + 1] - free_offset_[gi])),
      now_);
  for (int k = successor_offset_[gi]; k < successor_offset_[gi + 1]; ++k) {
    const int next = successors_[static_cast<std::size_t>(k)];
    if (--pending_[static_cast<std::size_t>(next)] == 0)
      ready(next);
  }
}

void Engine::issue(int k) {
  const std::size_t kk = static_cast<std::size_t>(k);
  const int end = offset_[kk + 1];
  int& next = next_issue_[kk];
  double& clock = host_clock_[kk];
  while (next < end && waiting_sync_[kk] < 0) {
    const int g = next++;
    if (!launches_kernels(op_at(g)))
      continue;
    clock += issue_cost_[static_cast<std::size_t>(g)];
    issue_time_[static_cast<std::size_t>(g)] = clock;
    const OpRun& r = runs_[static_cast<std::size_t>(g)];
    if (pending_[static_cast<std::size_t>(g)] == 0 && r.state == waiting)
      ready(g); // its predecessors ended before the host reached it
    if (op_at(g).host_sync)
      waiting_sync_[kk] = g;
  }
}

// The fluid step: bring every running op of the class up to now at its old rate, give it its
// new rate and, where that changed, a new end event (the old one goes stale by version).
void Engine::rerate(int rank_class) {
  ClassRun& cr = classes_[static_cast<std::size_t>(rank_class)];
  cr.touched = false;
  for (int g : cr.running) {
    OpRun& r = runs_[static_cast<std::size_t>(g)];
    const double rate = rate_of(cr, r.resource);
    if (rate == r.rate)
      continue;
    r.remaining_s = std::max(0.0, r.remaining_s - r.rate * (now_ - r.last_s));
    r.last_s = now_;
    r.rate = rate;
    ++r.version;
    push({now_ + r.remaining_s / rate, g, r.version});
  }
}

SimResult Engine::run() {
  const int n = offset_.back();
  heap_.reserve(static_cast<std::size_t>(n) + 16);
  ready_.reserve(64);
  if (!issue_cost_.empty())
    for (int k = 0; k < static_cast<int>(s_.classes.size()); ++k)
      issue(k); // makes the ops without predecessors ready as the host reaches them
  for (int g = 0; g < n; ++g)
    if (pending_[static_cast<std::size_t>(g)] == 0 &&
        (issue_time_.empty() || issue_time_[static_cast<std::size_t>(g)] < 0))
      ready_.push_back(g); // no host, or not issued by it (issue() skipped it)
  std::vector<int> starting;
  starting.reserve(64);
  for (;;) {
    // Start what became ready, in (class, op) order, then re-rate the classes that changed.
    starting.swap(ready_);
    ready_.clear();
    std::sort(starting.begin(), starting.end());
    for (int g : starting)
      start(g);
    starting.clear();
    for (int k : touched_)
      rerate(k);
    touched_.clear();
    // Complete every op that ends at the earliest pending time.
    bool any = false;
    while (!heap_.empty()) {
      const Event e = heap_.front();
      if (any && e.time_s != now_)
        break;
      std::pop_heap(heap_.begin(), heap_.end(), later);
      heap_.pop_back();
      if (e.version == kIssued) { // the host issued an op whose predecessors had ended
        now_ = e.time_s;
        any = true;
        ready_.push_back(e.op);
        continue;
      }
      const OpRun& r = runs_[static_cast<std::size_t>(e.op)];
      if (r.state != running || r.version != e.version)
        continue; // superseded by a re-rating
      now_ = e.time_s;
      any = true;
      complete(e.op);
    }
    if (!any) {
      // Nothing left to end while a host waits on a sync that waits, in turn, on an op placed
      // after it in program order: that host issues on rather than deadlock.
      bool resumed = false;
      for (std::size_t k = 0; k < waiting_sync_.size(); ++k)
        if (waiting_sync_[k] >= 0) {
          waiting_sync_[k] = -1;
          host_clock_[k] = std::max(host_clock_[k], now_);
          issue(static_cast<int>(k));
          resumed = true;
        }
      if (resumed && (!ready_.empty() || !heap_.empty()))
        continue;
      break;
    }
  }

  for (int g = 0; g < n; ++g)
    if (runs_[static_cast<std::size_t>(g)].state != done) {
      const int k = runs_[static_cast<std::size_t>(g)].rank_class;
      const RankClass& rc = s_.classes[static_cast<std::size_t>(k)];
      throw std::invalid_argument("Rank class '" + rc.name + "' (" + std::to_string(k) + "), op " +
                                  std::to_string(g - offset_[static_cast<std::size_t>(k)]) + " '" +
                                  op_at(g).name +
                                  "' never started: it waits on a dependency cycle.");
    }

  SimResult result;
  result.events = events_;
  result.classes.resize(s_.classes.size());
  for (std::size_t k = 0; k < s_.classes.size(); ++k) {
    ClassResult& cr = result.classes[k];
    cr.ops.resize(s_.classes[k].ops.size());
    for (std::size_t i = 0; i < cr.ops.size(); ++i) {
      const OpRun& r = runs_[static_cast<std::size_t>(offset_[k]) + i];
      cr.ops[i] = {r.start_s, r.end_s};
      cr.end_s = std::max(cr.end_s, r.end_s);
    }
    cr.memory = memory_[k].finish();
    result.step_time_s = std::max(result.step_time_s, cr.end_s);
  }
  result.critical_path = critical_path();
  if (!result.critical_path.empty()) {
    const std::size_t k = static_cast<std::size_t>(result.critical_path.back().rank_class);
    result.breakdown =
        breakdown_between(s_.classes[k], result.classes[k].ops, 0, result.step_time_s);
  }
  return result;
}

// From the op that ends last (the first in (class, op) order on a tie), walk back through
// whichever predecessor ended last: that is what held the op's start. Ties prefer the previous op
// on the stream, then deps, then remote deps, each in the order the op lists them.
std::vector<CriticalStep> Engine::critical_path() const {
  std::vector<CriticalStep> path;
  int g = -1;
  for (int k = 0; k < offset_.back(); ++k)
    if (g == -1 ||
        runs_[static_cast<std::size_t>(k)].end_s > runs_[static_cast<std::size_t>(g)].end_s)
      g = k;
  while (g != -1) {
    const int k = runs_[static_cast<std::size_t>(g)].rank_class;
    const int base = offset_[static_cast<std::size_t>(k)];
    path.push_back({k, g - base});
    const Op& op = op_at(g);
    int best = stream_previous_[static_cast<std::size_t>(g)];
    auto consider = [&](int p) {
      if (best == -1 ||
          runs_[static_cast<std::size_t>(p)].end_s > runs_[static_cast<std::size_t>(best)].end_s)
        best = p;
    };
    for (int d : op.deps)
      consider(base + d);
    for (const RemoteDep& r : op.remote_deps)
      consider(offset_[static_cast<std::size_t>(r.rank_class)] + r.op);
    g = best;
  }
  std::reverse(path.begin(), path.end());
  return path;
}

} // namespace

// What the class's GPU was doing at each instant of [from, to): compute if a compute kernel
// runs, else the optimizer, else exposed communication, else an offload stall, else it waits
// (bubble). docs/ENGINE.md explains why the step's breakdown is taken over the critical class's
// timeline rather than over the cross-class path.
Breakdown breakdown_between(const RankClass& rc, const std::vector<OpTiming>& times, double from_s,
                            double to_s) {
  struct Edge {
    double time_s;
    int op;
    int delta;
  };
  // Ops of one stream run one after another in program order, so each stream's edges come out
  // sorted by time: lay them out stream by stream, then merge the streams (n log streams, where
  // sorting every edge would cost n log n). Edges at one instant are charged together, so their
  // order among themselves does not matter.
  const std::size_t streams = rc.streams.size();
  std::vector<std::size_t> first(streams + 1, 0);
  for (std::size_t i = 0; i < rc.ops.size(); ++i)
    if (times[i].end_s > times[i].start_s)
      first[static_cast<std::size_t>(rc.ops[i].stream) + 1] += 2;
  for (std::size_t k = 0; k < streams; ++k)
    first[k + 1] += first[k];
  std::vector<Edge> edges(first.back());
  {
    std::vector<std::size_t> fill(first.begin(), first.end() - 1);
    for (std::size_t i = 0; i < rc.ops.size(); ++i) {
      const OpTiming& r = times[i];
      if (r.end_s > r.start_s) {
        std::size_t& at = fill[static_cast<std::size_t>(rc.ops[i].stream)];
        edges[at++] = {r.start_s, static_cast<int>(i), +1};
        edges[at++] = {r.end_s, static_cast<int>(i), -1};
      }
    }
  }
  auto earlier = [](const Edge& a, const Edge& b) { return a.time_s < b.time_s; };
  for (std::size_t width = 1; width < streams; width *= 2)
    for (std::size_t k = 0; k + width < streams; k += 2 * width)
      std::inplace_merge(edges.begin() + static_cast<std::ptrdiff_t>(first[k]),
                         edges.begin() + static_cast<std::ptrdiff_t>(first[k + width]),
                         edges.begin() +
                             static_cast<std::ptrdiff_t>(first[std::min(streams, k + 2 * width)]),
                         earlier);
  Breakdown b;
  int in_bucket[4] = {0, 0, 0, 0};
  int recomputing = 0;
  int comm_by_category[10] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
  auto charge = [&](double a, double z) {
    a = std::max(a, from_s);
    z = std::min(z, to_s);
    const double dt = z - a;
    if (dt <= 0)
      return;
    if (in_bucket[compute_bucket] > 0) {
      b.compute += dt;
      b.recompute += dt * recomputing / in_bucket[compute_bucket];
    } else if (in_bucket[optimizer_bucket] > 0) {
      b.optimizer += dt;
    } else if (in_bucket[comm_bucket] > 0) {
      b.exposed_comm += dt;
      for (int cat = 0; cat < 10; ++cat)
        b.exposed_comm_by_category[cat] += dt * comm_by_category[cat] / in_bucket[comm_bucket];
    } else if (in_bucket[copy_bucket] > 0) {
      b.offload_stall += dt;
    } else {
      b.bubble += dt;
    }
  };
  double t = 0;
  for (std::size_t e = 0; e < edges.size();) {
    charge(t, edges[e].time_s);
    t = edges[e].time_s;
    for (; e < edges.size() && edges[e].time_s == t; ++e) {
      const Op& op = rc.ops[static_cast<std::size_t>(edges[e].op)];
      const Charge bucket = bucket_of(op);
      in_bucket[bucket] += edges[e].delta;
      if (bucket == compute_bucket && op.category == Category::recompute)
        recomputing += edges[e].delta;
      if (bucket == comm_bucket)
        comm_by_category[static_cast<int>(op.category)] += edges[e].delta;
    }
  }
  charge(t, to_s);
  return b;
}

namespace {

// An FP8 GEMM's quantize kernels (Op::bytes), memory-bound, before it on its stream.
double quantize_time_s(const Op& op, const hw::ClusterSpec& c, const hw::Calibration& cal) {
  return op.bytes > 0 ? hw::memory_bound_time_s(c, cal, op.bytes) : 0;
}

// An op's time on its resource, each kernel's fixed cost counted once (op_time_s adds those of
// the kernels beyond the ones priced here).
double op_body_s(const Op& op, const Schedule& s, const hw::ClusterSpec& c,
                 const hw::Calibration& cal, GemmTimes* gemms) {
  switch (op.kind) {
  case OpKind::gemm:
    if (op.gemm.instances == 0)
      return 0;
    return (gemms != nullptr
                ? gemms->time_s(op.gemm.m, op.gemm.n, op.gemm.k, op.dtype)
                : hw::gemm_time_s(c, cal, op.gemm.m, op.gemm.n, op.gemm.k, hw_dtype(op.dtype))) *
               op.gemm.instances +
           quantize_time_s(op, c, cal);
  case OpKind::grouped_gemm:
    return hw::grouped_gemm_time_s(c, cal, op.gemm.rows_per_expert, op.gemm.n, op.gemm.k,
                                   hw_dtype(op.dtype)) +
           quantize_time_s(op, c, cal);
  case OpKind::attention_fwd:
    return hw::attention_fwd_time_s(c, cal, hw_attention(op.attention));
  case OpKind::attention_bwd:
    return hw::attention_bwd_time_s(c, cal, hw_attention(op.attention));
  case OpKind::elementwise:
    return hw::memory_bound_time_s(c, cal, op.bytes);
  case OpKind::all_gather:
  case OpKind::reduce_scatter:
  case OpKind::all_reduce:
  case OpKind::all_to_all:
  case OpKind::send_recv:
  case OpKind::send: {
    const Group& g = group_of_op(op, s);
    if (op.kind == OpKind::all_to_all && (op.rdma_bytes > 0 || op.nvl_bytes > 0))
      return hw::hierarchical_dispatch_time_s(
          c, op.rdma_bytes, op.nvl_bytes,
          hw::GroupShape{g.ranks_per_node, g.ranks / g.ranks_per_node});
    return hw::collective_cost(c, cal, hw_collective(op.kind), op.bytes,
                               hw::GroupShape{g.ranks_per_node, g.ranks / g.ranks_per_node})
        .time_s;
  }
  case OpKind::recv:
  case OpKind::barrier:
    return 0;
  case OpKind::copy_h2d:
    return hw::host_device_copy_time_s(c, cal, op.bytes, {hw::CopyDirection::host_to_device});
  case OpKind::copy_d2h:
    return hw::host_device_copy_time_s(c, cal, op.bytes, {hw::CopyDirection::device_to_host});
  case OpKind::host_adam:
    return hw::host_adam_time_s(c, cal, op.params, host_cores_per_rank(c)) *
           (op.torch_kernel ? c.host_optimizer.torch_adam_slowdown : 1.0);
  }
  return 0;
}

// An op of several kernels (Op::kernels: an eager chain, a grouped GEMM's per-expert GEMMs and
// casts) pays the GPU's per-kernel fixed cost for each kernel beyond those its price holds: one
// for a memory-bound op or attention, the GEMM and its quantize pass for a GEMM (docs/ENGINE.md
// "Host issue"). A collective's kernels are the host's count; its time is the collective's.
double op_time_s(const Op& op, const Schedule& s, const hw::ClusterSpec& c,
                 const hw::Calibration& cal, GemmTimes* gemms) {
  const double body = op_body_s(op, s, c, cal, gemms);
  int priced = 0;
  switch (op.kind) {
  case OpKind::gemm:
  case OpKind::grouped_gemm:
    priced = op.bytes > 0 ? 2 : 1;
    break;
  case OpKind::elementwise:
  case OpKind::attention_fwd:
  case OpKind::attention_bwd:
    priced = 1;
    break;
  default:
    return body;
  }
  if (body <= 0)
    return body;
  return body + std::max(0, static_cast<int>(op.kernels) - priced) * c.gpu.kernel_launch_s;
}

} // namespace

bool launches_kernels(const Op& op) {
  return op.kind != OpKind::barrier && op.kind != OpKind::host_adam &&
         !(op.kind == OpKind::recv && op.group < 0);
}

double op_duration_s(const Op& op, const Schedule& s, const hw::ClusterSpec& c,
                     const hw::Calibration& cal) {
  return op_time_s(op, s, c, cal, nullptr);
}

SimResult simulate(const Schedule& s, const hw::ClusterSpec& c, const hw::Calibration& cal,
                   const EngineOptions& o) {
  if (o.check_schedule_first)
    check_schedule(s);
  Engine engine(s, c, cal, o);
  return engine.run();
}

} // namespace mop::sim
