#include "traces/chrome_trace.hpp"

#include "common/file_io.hpp"
#include "common/json_io.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <fmt/format.h>
#include <stdexcept>
#include <vector>

namespace mop::trace {
namespace {

using sim::OpKind;

constexpr double kBytesPerGiB = 1024.0 * 1024.0 * 1024.0;

// Perfetto reads "ts" and "dur" as microseconds and keeps integer nanoseconds. Times are rounded
// to the nanosecond once, so an event's ts + dur is exactly its rounded end and the printed
// numbers are short (at most three decimals).
std::int64_t to_ns(double time_s) {
  return std::llround(time_s * 1e9);
}
double ns_to_us(std::int64_t ns) {
  return static_cast<double>(ns) / 1000.0;
}

// Counter values: GiB rounded to 1e-6 GiB (about 1 KiB), far below anything a reader compares.
double to_gib(double bytes) {
  return std::round(bytes / kBytesPerGiB * 1e6) / 1e6;
}

// Integral values (shapes, byte counts, FLOPs) print as integers, not as "4096.0".
Json number(double v) {
  constexpr double kLargestExactInteger = 9007199254740992.0; // 2^53
  if (std::isfinite(v) && v == std::trunc(v) && std::fabs(v) < kLargestExactInteger)
    return static_cast<std::int64_t>(v);
  return v;
}

std::string dump(const Json& j) {
  // `replace`: a name that is not valid UTF-8 still gives a trace (with U+FFFD) instead of a throw.
  return j.dump(-1, ' ', false, Json::error_handler_t::replace);
}

const char* dtype_name(sim::Dtype d) {
  switch (d) {
  case sim::Dtype::bf16:
    return "bf16";
  case sim::Dtype::fp8:
    return "fp8";
  case sim::Dtype::fp32:
    return "fp32";
  }
  return "?";
}

// pid and tid of every track. Perfetto's JSON importer names threads by tid alone
// (thread_name metadata carries no pid there), so tids are unique across the whole trace:
// class c is pid c+1, and its threads are (c+1)·stride + local, local 0 the critical path and
// local s+1 stream s. The stride is a power of ten (at least 100) so a tid reads as
// "class, stream".
struct Tracks {
  std::int64_t stride = 100;

  explicit Tracks(const sim::Schedule& s) {
    std::size_t widest = 0;
    for (const auto& rc : s.classes)
      widest = std::max(widest, rc.streams.size());
    while (static_cast<std::size_t>(stride) <= widest)
      stride *= 10;
  }
  static std::int64_t pid(std::size_t rank_class) {
    return static_cast<std::int64_t>(rank_class) + 1;
  }
  std::int64_t critical_tid(std::size_t rank_class) const { return pid(rank_class) * stride; }
  std::int64_t stream_tid(std::size_t rank_class, int stream) const {
    return pid(rank_class) * stride + stream + 1;
  }
};

[[noreturn]] void misfit(const std::string& sentence) {
  throw std::invalid_argument("trace: " + sentence);
}

bool in_range(int index, std::size_t size) {
  return index >= 0 && static_cast<std::size_t>(index) < size;
}

// The result must describe this schedule; anything else is a bug in the executor that made it.
void check_fit(const sim::Schedule& s, const sim::SimResult& r) {
  if (r.classes.size() != s.classes.size())
    misfit(fmt::format("the result has {} rank classes but the schedule has {}.", r.classes.size(),
                       s.classes.size()));
  for (std::size_t c = 0; c < s.classes.size(); ++c) {
    const sim::RankClass& rc = s.classes[c];
    const sim::ClassResult& cr = r.classes[c];
    if (cr.ops.size() != rc.ops.size())
      misfit(fmt::format("class '{}' has {} ops but the result times {}.", rc.name, rc.ops.size(),
                         cr.ops.size()));
    for (std::size_t i = 0; i < rc.ops.size(); ++i) {
      const sim::Op& op = rc.ops[i];
      const sim::OpTiming& t = cr.ops[i];
      if (!in_range(op.stream, rc.streams.size()))
        misfit(fmt::format("class '{}' op {} '{}' is on stream {}, but the class has {} streams.",
                           rc.name, i, op.name, op.stream, rc.streams.size()));
      if (!std::isfinite(t.start_s) || !std::isfinite(t.end_s) || t.end_s < t.start_s)
        misfit(fmt::format("class '{}' op {} '{}' runs from {} s to {} s.", rc.name, i, op.name,
                           t.start_s, t.end_s));
      for (const sim::RemoteDep& d : op.remote_deps) {
        if (!in_range(d.rank_class, s.classes.size()) ||
            !in_range(d.op, s.classes[static_cast<std::size_t>(d.rank_class)].ops.size()))
          misfit(fmt::format("class '{}' op {} '{}' depends on op {} of class {}, which does not "
                             "exist.",
                             rc.name, i, op.name, d.op, d.rank_class));
      }
    }
    for (const sim::MemorySample& m : cr.memory.timeline) {
      if (!std::isfinite(m.time_s) || !std::isfinite(m.bytes))
        misfit(fmt::format("class '{}' has a memory sample of {} bytes at {} s.", rc.name, m.bytes,
                           m.time_s));
    }
  }
  for (const sim::CriticalStep& step : r.critical_path) {
    if (!in_range(step.rank_class, s.classes.size()) ||
        !in_range(step.op, s.classes[static_cast<std::size_t>(step.rank_class)].ops.size()))
      misfit(fmt::format("the critical path names op {} of class {}, which does not exist.",
                         step.op, step.rank_class));
  }
}

// What a reader needs to judge an op's time: its kind, where it belongs, and the numbers the
// cost model priced (shape, bytes or parameters).
Json op_args(const sim::Schedule& s, const sim::Op& op, std::size_t index, bool critical) {
  Json a = Json::object();
  a["op"] = index;
  a["kind"] = sim::op_kind_name(op.kind);
  a["layer"] = op.layer;
  a["micro_batch"] = op.micro_batch;
  switch (op.kind) {
  case OpKind::gemm:
    a["dtype"] = dtype_name(op.dtype);
    a["m"] = number(op.gemm.m);
    a["n"] = number(op.gemm.n);
    a["k"] = number(op.gemm.k);
    a["instances"] = number(op.gemm.instances);
    break;
  case OpKind::grouped_gemm: {
    a["dtype"] = dtype_name(op.dtype);
    a["experts"] = op.gemm.rows_per_expert.size();
    Json rows = Json::array();
    for (double r : op.gemm.rows_per_expert)
      rows.push_back(number(r));
    a["rows_per_expert"] = std::move(rows);
    a["n"] = number(op.gemm.n);
    a["k"] = number(op.gemm.k);
    break;
  }
  case OpKind::attention_fwd:
  case OpKind::attention_bwd:
    a["dtype"] = dtype_name(op.dtype);
    a["batch"] = number(op.attention.batch);
    a["heads"] = number(op.attention.heads);
    a["kv_heads"] = number(op.attention.kv_heads);
    a["q_len"] = number(op.attention.q_len);
    a["kv_len"] = number(op.attention.kv_len);
    a["qk_head_dim"] = number(op.attention.qk_head_dim);
    a["v_head_dim"] = number(op.attention.v_head_dim);
    a["causal"] = op.attention.causal;
    a["window"] = number(op.attention.window);
    break;
  case OpKind::elementwise:
  case OpKind::copy_h2d:
  case OpKind::copy_d2h:
    a["bytes"] = number(op.bytes);
    break;
  case OpKind::all_gather:
  case OpKind::reduce_scatter:
  case OpKind::all_reduce:
  case OpKind::all_to_all:
  case OpKind::send_recv:
  case OpKind::send:
  case OpKind::recv:
    a["bytes"] = number(op.bytes);
    if (in_range(op.group, s.groups.size())) {
      const sim::Group& g = s.groups[static_cast<std::size_t>(op.group)];
      a["group"] = g.name;
      a["group_ranks"] = g.ranks;
    }
    if (in_range(op.peer_class, s.classes.size()))
      a["peer"] = s.classes[static_cast<std::size_t>(op.peer_class)].name;
    break;
  case OpKind::host_adam:
    a["params"] = number(op.params);
    break;
  case OpKind::barrier:
    break;
  }
  a["model_flops"] = number(op.model_flops);
  if (critical)
    a["critical"] = true;
  return a;
}

// One event per line: the file diffs and greps well, and nothing holds the whole DOM.
class EventList {
public:
  void add(const Json& event) {
    if (!text_.empty())
      text_ += ",\n";
    text_ += dump(event);
  }
  const std::string& text() const { return text_; }

private:
  std::string text_;
};

Json metadata(const char* name, std::int64_t pid, const Json* tid, Json args) {
  Json e = Json::object();
  e["ph"] = "M";
  e["name"] = name;
  e["pid"] = pid;
  if (tid != nullptr)
    e["tid"] = *tid;
  e["ts"] = 0;
  e["args"] = std::move(args);
  return e;
}

// A complete event ("X") when the op took time, else an instant on its thread ("i", "s":"t").
Json op_event(const sim::Op& op, std::int64_t pid, std::int64_t tid, const sim::OpTiming& t,
              Json args) {
  const std::int64_t start_ns = to_ns(t.start_s);
  const bool takes_time = t.end_s > t.start_s;
  Json e = Json::object();
  e["ph"] = takes_time ? "X" : "i";
  e["name"] = op.name;
  e["cat"] = sim::category_name(op.category);
  e["pid"] = pid;
  e["tid"] = tid;
  e["ts"] = ns_to_us(start_ns);
  if (takes_time)
    e["dur"] = ns_to_us(to_ns(t.end_s) - start_ns);
  else
    e["s"] = "t";
  e["args"] = std::move(args);
  return e;
}

Json counter(const char* name, std::int64_t pid, std::int64_t tid, std::int64_t ts_ns, double gib) {
  Json e = Json::object();
  e["ph"] = "C";
  e["name"] = name;
  e["cat"] = "memory";
  e["pid"] = pid;
  e["tid"] = tid;
  e["ts"] = ns_to_us(ts_ns);
  Json args = Json::object();
  args["GiB"] = gib;
  e["args"] = std::move(args);
  return e;
}

// Where a flow end sits inside its op. Perfetto binds a flow event to the slice open on its
// thread when it processes the event, and at equal timestamps it processes every "X" before any
// flow event: a flow at the sender's exact end would bind to the next op on that stream when it
// starts back to back. Strictly inside the slice the binding is unambiguous; Perfetto draws the
// arrow from the sender's end to the receiver's start whatever the point inside.
std::int64_t flow_point_ns(const sim::OpTiming& t) {
  const std::int64_t start_ns = to_ns(t.start_s);
  const std::int64_t end_ns = to_ns(t.end_s);
  return end_ns > start_ns ? start_ns + (end_ns - start_ns) / 2 : start_ns;
}

Json flow(char phase, std::uint64_t id, const std::string& name, std::int64_t pid, std::int64_t tid,
          std::int64_t ts_ns) {
  Json e = Json::object();
  e["ph"] = std::string(1, phase);
  e["id"] = id;
  e["name"] = name;
  e["cat"] = "dependency";
  e["pid"] = pid;
  e["tid"] = tid;
  e["ts"] = ns_to_us(ts_ns);
  if (phase == 'f')
    e["bp"] = "e"; // bind to the enclosing slice (the receiver), not the next one
  return e;
}

std::string process_label(const sim::RankClass& rc) {
  return fmt::format("{} (×{} {})", rc.name, rc.multiplicity,
                     rc.multiplicity == 1 ? "rank" : "ranks");
}

} // namespace

std::string chrome_trace_json(const sim::Schedule& s, const sim::SimResult& r,
                              const TraceOptions& o) {
  check_fit(s, r);
  const Tracks tracks(s);
  const std::size_t classes = s.classes.size();

  std::vector<std::vector<bool>> critical(classes);
  std::vector<bool> on_path(classes, false);
  for (std::size_t c = 0; c < classes; ++c)
    critical[c].assign(s.classes[c].ops.size(), false);
  for (const sim::CriticalStep& step : r.critical_path) {
    const auto c = static_cast<std::size_t>(step.rank_class);
    critical[c][static_cast<std::size_t>(step.op)] = true;
    on_path[c] = true;
  }

  EventList events;

  // Names and order of every track first, so viewers label them before any slice arrives.
  for (std::size_t c = 0; c < classes; ++c) {
    const sim::RankClass& rc = s.classes[c];
    const std::int64_t pid = Tracks::pid(c);
    events.add(metadata("process_name", pid, nullptr, Json{{"name", process_label(rc)}}));
    events.add(metadata("process_sort_index", pid, nullptr, Json{{"sort_index", c}}));
    if (on_path[c]) {
      const Json tid = tracks.critical_tid(c);
      events.add(metadata("thread_name", pid, &tid, Json{{"name", "critical path"}}));
      events.add(metadata("thread_sort_index", pid, &tid, Json{{"sort_index", 0}}));
    }
    for (std::size_t st = 0; st < rc.streams.size(); ++st) {
      const Json tid = tracks.stream_tid(c, static_cast<int>(st));
      events.add(metadata("thread_name", pid, &tid, Json{{"name", rc.streams[st]}}));
      events.add(metadata("thread_sort_index", pid, &tid, Json{{"sort_index", st + 1}}));
    }
  }

  // Every op on its stream, in program order.
  for (std::size_t c = 0; c < classes; ++c) {
    const sim::RankClass& rc = s.classes[c];
    for (std::size_t i = 0; i < rc.ops.size(); ++i) {
      const sim::Op& op = rc.ops[i];
      events.add(op_event(op, Tracks::pid(c), tracks.stream_tid(c, op.stream), r.classes[c].ops[i],
                          op_args(s, op, i, critical[c][i])));
    }
  }

  // The critical path again, on one thread per class, so it reads as one track.
  for (const sim::CriticalStep& step : r.critical_path) {
    const auto c = static_cast<std::size_t>(step.rank_class);
    const auto i = static_cast<std::size_t>(step.op);
    const sim::Op& op = s.classes[c].ops[i];
    Json args = op_args(s, op, i, true);
    args["stream"] = s.classes[c].streams[static_cast<std::size_t>(op.stream)];
    events.add(
        op_event(op, Tracks::pid(c), tracks.critical_tid(c), r.classes[c].ops[i], std::move(args)));
  }

  if (o.memory_counters) {
    for (std::size_t c = 0; c < classes; ++c) {
      const std::int64_t pid = Tracks::pid(c);
      const std::int64_t tid = tracks.stream_tid(c, 0);
      const auto& timeline = r.classes[c].memory.timeline;
      for (const sim::Device device : {sim::Device::hbm, sim::Device::host}) {
        const char* name = device == sim::Device::hbm ? "HBM" : "host";
        // A value at t=0 makes the track exist even when nothing was allocated on the device.
        const bool starts_at_zero =
            std::any_of(timeline.begin(), timeline.end(), [&](const sim::MemorySample& m) {
              return m.device == device && to_ns(m.time_s) <= 0;
            });
        if (!starts_at_zero)
          events.add(counter(name, pid, tid, 0, 0.0));
        for (const sim::MemorySample& m : timeline) {
          if (m.device == device)
            events.add(counter(name, pid, tid, to_ns(m.time_s), to_gib(m.bytes)));
        }
      }
    }
  }

  // Flows last, every start before every end: at equal timestamps Perfetto keeps file order for
  // non-"X" events, so a start is seen before its end and after the instant it binds to.
  if (o.flows) {
    std::vector<Json> ends;
    std::uint64_t id = 0;
    for (std::size_t c = 0; c < classes; ++c) {
      const sim::RankClass& rc = s.classes[c];
      for (std::size_t i = 0; i < rc.ops.size(); ++i) {
        const sim::Op& receiver = rc.ops[i];
        for (const sim::RemoteDep& d : receiver.remote_deps) {
          ++id;
          const auto sc = static_cast<std::size_t>(d.rank_class);
          const auto si = static_cast<std::size_t>(d.op);
          const sim::Op& sender = s.classes[sc].ops[si];
          events.add(flow('s', id, sender.name, Tracks::pid(sc),
                          tracks.stream_tid(sc, sender.stream),
                          flow_point_ns(r.classes[sc].ops[si])));
          ends.push_back(flow('f', id, sender.name, Tracks::pid(c),
                              tracks.stream_tid(c, receiver.stream),
                              flow_point_ns(r.classes[c].ops[i])));
        }
      }
    }
    for (const Json& e : ends)
      events.add(e);
  }

  Json other = Json::object();
  other["title"] = o.title;
  other["step_time_s"] = r.step_time_s;
  other["generator"] = "mop";

  std::string out = "{\"traceEvents\":[\n";
  out += events.text();
  out += "\n],\n\"displayTimeUnit\":\"ms\",\n\"otherData\":";
  out += dump(other);
  out += "}\n";
  return out;
}

void write_chrome_trace(const std::string& path, const sim::Schedule& s, const sim::SimResult& r,
                        const TraceOptions& o) {
  write_output_file(path, chrome_trace_json(s, r, o));
}

} // namespace mop::trace
