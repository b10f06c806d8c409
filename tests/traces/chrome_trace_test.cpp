#include "traces/chrome_trace.hpp"

#include "common/error.hpp"
#include "common/json_io.hpp"
#include "tests/support/approx.hpp"

#include <cmath>
#include <doctest/doctest.h>
#include <filesystem>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

namespace traces_chrome_trace_test {

namespace fs = std::filesystem;
using mop::Json;
namespace sim = mop::sim;
namespace trace = mop::trace;

namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
const std::string kOddName = "say \"hi\" \\ then C:\\path"; // quotes and backslashes

// Two pipeline stages of a toy layer, written by hand (times in seconds):
//   stage 0: q_proj GEMM [0, 1.5 ms] -> TP all-reduce [1.5, 2.5 ms] -> send [2.5, 4 ms];
//            an elementwise op with an odd name [2.5, 3 ms] beside the send, off the path.
//   stage 1: recv at 4 ms (zero duration, remote dep on the send) -> experts [4, 6.5 ms]
//            -> reduce-scatter [6.5, 7 ms].
// The critical path is every op but the elementwise one.
struct Fixture {
  sim::Schedule s;
  sim::SimResult r;

  Fixture() {
    s.groups = {{"tp", 2, 2, {}}, {"pp.0-1", 2, 1, {}}};
    s.world = 8;
    for (int c = 0; c < 2; ++c) {
      sim::RankClass rc;
      rc.name = "stage " + std::to_string(c) + " of 2";
      rc.multiplicity = 4;
      rc.stage = c;
      rc.streams = {"compute", "comm.tp", "comm.pp"};
      rc.tensors = {
          sim::cost_tensor("weights", 1.0 * kGiB, sim::Device::hbm, sim::MemoryKind::weights, true),
          sim::cost_tensor("act", 0.5 * kGiB, sim::Device::hbm, sim::MemoryKind::activations,
                           false)};
      s.classes.push_back(rc);
    }
    auto& s0 = s.classes[0].ops;
    auto& s1 = s.classes[1].ops;

    sim::Op q;
    q.name = "L0.attn.q_proj.fwd";
    q.kind = sim::OpKind::gemm;
    q.stream = 0;
    q.gemm.m = 4096;
    q.gemm.n = 1024;
    q.gemm.k = 2048;
    q.model_flops = 2.0 * 4096 * 1024 * 2048; // 2·m·n·k
    q.layer = 0;
    q.micro_batch = 0;
    q.allocs = {1};
    s0.push_back(q);

    sim::Op ar;
    ar.name = "L0.tp.all_reduce";
    ar.kind = sim::OpKind::all_reduce;
    ar.category = sim::Category::tp_comm;
    ar.stream = 1;
    ar.group = 0;
    ar.bytes = 8.0 * 1024 * 1024;
    ar.layer = 0;
    ar.micro_batch = 0;
    ar.deps = {0};
    s0.push_back(ar);

    sim::Op send;
    send.name = "L0.send.mb0";
    send.kind = sim::OpKind::send;
    send.category = sim::Category::pp_comm;
    send.stream = 2;
    send.group = 1;
    send.peer_class = 1;
    send.bytes = 16.0 * 1024 * 1024;
    send.micro_batch = 0;
    send.deps = {1};
    send.frees = {1};
    s0.push_back(send);

    sim::Op odd;
    odd.name = kOddName;
    odd.kind = sim::OpKind::elementwise;
    odd.stream = 0;
    odd.bytes = 1e6;
    odd.deps = {1};
    s0.push_back(odd);

    sim::Op recv;
    recv.name = "L1.recv.mb0";
    recv.kind = sim::OpKind::recv;
    recv.category = sim::Category::pp_comm;
    recv.stream = 2;
    recv.group = 1;
    recv.peer_class = 0;
    recv.bytes = 16.0 * 1024 * 1024;
    recv.micro_batch = 0;
    recv.remote_deps = {{0, 2}};
    recv.allocs = {1};
    s1.push_back(recv);

    sim::Op experts;
    experts.name = "L1.mlp.experts.fwd";
    experts.kind = sim::OpKind::grouped_gemm;
    experts.stream = 0;
    experts.gemm.n = 2048;
    experts.gemm.k = 7168;
    experts.gemm.rows_per_expert = {100, 200, 300};
    experts.layer = 1;
    experts.micro_batch = 0;
    experts.deps = {0};
    s1.push_back(experts);

    sim::Op rs;
    rs.name = "L1.tp.reduce_scatter";
    rs.kind = sim::OpKind::reduce_scatter;
    rs.category = sim::Category::tp_comm;
    rs.stream = 1;
    rs.group = 0;
    rs.bytes = 4.0 * 1024 * 1024;
    rs.layer = 1;
    rs.deps = {1};
    rs.frees = {1};
    s1.push_back(rs);

    r.classes.resize(2);
    r.classes[0].ops = {{0.0, 0.0015}, {0.0015, 0.0025}, {0.0025, 0.004}, {0.0025, 0.003}};
    r.classes[1].ops = {{0.004, 0.004}, {0.004, 0.0065}, {0.0065, 0.007}};
    r.classes[0].memory.timeline = {{0.0, sim::Device::hbm, 1.0 * kGiB},
                                    {0.0, sim::Device::host, 2.0 * kGiB},
                                    {0.001, sim::Device::hbm, 1.5 * kGiB},
                                    {0.004, sim::Device::hbm, 1.0 * kGiB}};
    // Stage 1 holds nothing on the host and its first HBM sample comes late.
    r.classes[1].memory.timeline = {{0.004, sim::Device::hbm, 3.0 * kGiB},
                                    {0.0065, sim::Device::hbm, 2.5 * kGiB}};
    r.classes[0].end_s = 0.004;
    r.classes[1].end_s = 0.007;
    r.step_time_s = 0.007;
    r.critical_path = {{0, 0}, {0, 1}, {0, 2}, {1, 0}, {1, 1}, {1, 2}};
    sim::check_schedule(s); // the fixture itself must be a valid schedule
  }
};

Json parse(const std::string& text) {
  return mop::parse_json(text, "trace");
}

std::vector<Json> with_phase(const Json& trace, const std::string& ph) {
  std::vector<Json> out;
  for (const Json& e : trace["traceEvents"])
    if (e["ph"] == ph)
      out.push_back(e);
  return out;
}

// (pid, tid) -> thread name, and pid -> process name, from the metadata events.
struct Names {
  std::map<std::pair<std::int64_t, std::int64_t>, std::string> threads;
  std::map<std::int64_t, std::string> processes;

  explicit Names(const Json& trace) {
    for (const Json& e : with_phase(trace, "M")) {
      if (e["name"] == "thread_name")
        threads[{e["pid"].get<std::int64_t>(), e["tid"].get<std::int64_t>()}] =
            e["args"]["name"].get<std::string>();
      if (e["name"] == "process_name")
        processes[e["pid"].get<std::int64_t>()] = e["args"]["name"].get<std::string>();
    }
  }
  std::string thread_of(const Json& e) const {
    auto it = threads.find({e["pid"].get<std::int64_t>(), e["tid"].get<std::int64_t>()});
    return it == threads.end() ? "" : it->second;
  }
  std::int64_t pid_of(const std::string& process) const {
    for (const auto& [pid, name] : processes)
      if (name == process)
        return pid;
    return -1;
  }
};

std::set<std::string> keys_of(const Json& object) {
  std::set<std::string> keys;
  for (const auto& [k, v] : object.items())
    keys.insert(k);
  return keys;
}

// An op's event on its stream's thread (not the critical-path copy).
Json stream_event(const Json& trace, const Names& names, const std::string& op_name) {
  for (const Json& e : trace["traceEvents"])
    if ((e["ph"] == "X" || e["ph"] == "i") && e["name"] == op_name &&
        names.thread_of(e) != "critical path")
      return e;
  return Json();
}

} // namespace

TEST_CASE("the trace is JSON with traceEvents, displayTimeUnit and otherData" *
          doctest::test_suite("plumbing")) {
  const Fixture f;
  const Json t = parse(trace::chrome_trace_json(f.s, f.r, {.title = "toy step"}));
  CHECK(keys_of(t) == std::set<std::string>{"traceEvents", "displayTimeUnit", "otherData"});
  CHECK(t["traceEvents"].is_array());
  CHECK(t["displayTimeUnit"] == "ms");
  CHECK(t["otherData"]["title"] == "toy step");
  CHECK(t["otherData"]["generator"] == "mop");
  CHECK(t["otherData"]["step_time_s"].get<double>() == mop::test::rel(0.007));
}

TEST_CASE("every op that takes time is one complete event with ts and dur in microseconds" *
          doctest::test_suite("plumbing")) {
  const Fixture f;
  const Json t = parse(trace::chrome_trace_json(f.s, f.r));
  const Names names(t);
  // 4 ops of stage 0 and 2 of stage 1 have end > start; the recv takes no time.
  int on_streams = 0;
  for (const Json& e : with_phase(t, "X"))
    on_streams += names.thread_of(e) != "critical path";
  CHECK(on_streams == 6);
  for (std::size_t c = 0; c < 2; ++c) {
    const auto& rc = f.s.classes[c];
    const std::int64_t pid = names.pid_of(rc.name + " (×4 ranks)");
    REQUIRE(pid >= 0);
    for (std::size_t i = 0; i < rc.ops.size(); ++i) {
      const auto& op = rc.ops[i];
      const auto& timing = f.r.classes[c].ops[i];
      CAPTURE(op.name);
      const Json e = stream_event(t, names, op.name);
      REQUIRE(e.is_object());
      CHECK(e["pid"] == pid);
      CHECK(names.thread_of(e) == rc.streams[static_cast<std::size_t>(op.stream)]);
      CHECK(e["cat"] == sim::category_name(op.category));
      CHECK(e["args"]["kind"] == sim::op_kind_name(op.kind));
      CHECK(e["args"]["op"] == i);
      // Times are rounded once to the nanosecond (traces/chrome_trace.cpp): ts within half a
      // nanosecond (0.0005 µs) of the start, dur within one of the duration.
      CHECK(std::fabs(e["ts"].get<double>() - timing.start_s * 1e6) <= 0.5e-3 + 1e-9);
      if (timing.end_s > timing.start_s) {
        CHECK(e["ph"] == "X");
        CHECK(std::fabs(e["dur"].get<double>() - (timing.end_s - timing.start_s) * 1e6) <=
              1e-3 + 1e-9);
      } else {
        CHECK(e["ph"] == "i");
        CHECK(e["s"] == "t");
      }
    }
  }
}

TEST_CASE("args carry the shape the cost model priced" * doctest::test_suite("plumbing")) {
  const Fixture f;
  const Json t = parse(trace::chrome_trace_json(f.s, f.r));
  const Names names(t);
  const Json q = stream_event(t, names, "L0.attn.q_proj.fwd")["args"];
  CHECK(q["m"] == 4096);
  CHECK(q["n"] == 1024);
  CHECK(q["k"] == 2048);
  CHECK(q["dtype"] == "bf16");
  CHECK(q["layer"] == 0);
  CHECK(q["micro_batch"] == 0);
  CHECK(q["model_flops"] == 17179869184LL); // 2·4096·1024·2048
  const Json experts = stream_event(t, names, "L1.mlp.experts.fwd")["args"];
  CHECK(experts["rows_per_expert"] == Json::parse("[100, 200, 300]"));
  CHECK(experts["experts"] == 3);
  const Json ar = stream_event(t, names, "L0.tp.all_reduce")["args"];
  CHECK(ar["bytes"] == 8388608); // 8 MiB
  CHECK(ar["group"] == "tp");
  CHECK(ar["group_ranks"] == 2);
  CHECK(stream_event(t, names, "L0.send.mb0")["args"]["peer"] == "stage 1 of 2");
}

TEST_CASE("every rank class is a named process and every stream a named thread" *
          doctest::test_suite("plumbing")) {
  const Fixture f;
  const Json t = parse(trace::chrome_trace_json(f.s, f.r));
  const Names names(t);
  std::map<std::int64_t, std::int64_t> process_sort;
  std::map<std::pair<std::int64_t, std::int64_t>, std::int64_t> thread_sort;
  for (const Json& e : with_phase(t, "M")) {
    if (e["name"] == "process_sort_index")
      process_sort[e["pid"]] = e["args"]["sort_index"];
    if (e["name"] == "thread_sort_index")
      thread_sort[{e["pid"], e["tid"]}] = e["args"]["sort_index"];
  }
  std::set<std::int64_t> tids;
  for (std::size_t c = 0; c < f.s.classes.size(); ++c) {
    const auto& rc = f.s.classes[c];
    const std::int64_t pid = names.pid_of(rc.name + " (×4 ranks)");
    REQUIRE(pid >= 0);
    CHECK(process_sort[pid] == static_cast<std::int64_t>(c));
    for (std::size_t st = 0; st < rc.streams.size(); ++st) {
      int found = 0;
      for (const auto& [key, name] : names.threads) {
        if (key.first == pid && name == rc.streams[st]) {
          ++found;
          // The critical path sorts first (0), then the streams in their order.
          CHECK(thread_sort[key] == static_cast<std::int64_t>(st + 1));
        }
      }
      CHECK(found == 1);
    }
  }
  // Perfetto names threads by tid alone: no tid may repeat across processes.
  for (const auto& [key, name] : names.threads)
    CHECK(tids.insert(key.second).second);
  CHECK(names.threads.size() == 2 * 3 + 2); // three streams and a critical path per class
}

TEST_CASE("a single-rank class says 'rank'" * doctest::test_suite("plumbing")) {
  Fixture f;
  f.s.classes[1].multiplicity = 1;
  const Names names(parse(trace::chrome_trace_json(f.s, f.r)));
  CHECK(names.pid_of("stage 1 of 2 (×1 rank)") >= 0);
}

TEST_CASE("memory counters: HBM and host per process in GiB, each starting at t=0" *
          doctest::test_suite("plumbing")) {
  const Fixture f;
  const Json t = parse(trace::chrome_trace_json(f.s, f.r));
  const Names names(t);
  const std::int64_t p0 = names.pid_of("stage 0 of 2 (×4 ranks)");
  const std::int64_t p1 = names.pid_of("stage 1 of 2 (×4 ranks)");
  // (pid, counter) -> [(ts µs, GiB)] in file order.
  std::map<std::pair<std::int64_t, std::string>, std::vector<std::pair<double, double>>> series;
  for (const Json& e : with_phase(t, "C")) {
    CHECK(keys_of(e["args"]) == std::set<std::string>{"GiB"});
    series[{e["pid"], e["name"]}].emplace_back(e["ts"].get<double>(),
                                               e["args"]["GiB"].get<double>());
  }
  using Series = std::vector<std::pair<double, double>>;
  // Stage 0's samples as written in the fixture: 1 GiB at 0, 1.5 GiB at 1 ms, 1 GiB at 4 ms.
  CHECK(series[{p0, "HBM"}] == Series{{0.0, 1.0}, {1000.0, 1.5}, {4000.0, 1.0}});
  CHECK(series[{p0, "host"}] == Series{{0.0, 2.0}});
  // Stage 1: nothing before 4 ms, so a zero at t=0 opens the track; no host samples at all.
  CHECK(series[{p1, "HBM"}] == Series{{0.0, 0.0}, {4000.0, 3.0}, {6500.0, 2.5}});
  CHECK(series[{p1, "host"}] == Series{{0.0, 0.0}});
  CHECK(series.size() == 4);

  const Json without = parse(trace::chrome_trace_json(f.s, f.r, {.memory_counters = false}));
  CHECK(with_phase(without, "C").empty());
}

TEST_CASE("a remote dependency is a flow from the sender to the receiver" *
          doctest::test_suite("plumbing")) {
  const Fixture f;
  const Json t = parse(trace::chrome_trace_json(f.s, f.r));
  const Names names(t);
  const auto starts = with_phase(t, "s");
  const auto ends = with_phase(t, "f");
  REQUIRE(starts.size() == 1); // the fixture has one remote dependency
  REQUIRE(ends.size() == 1);
  const Json& s = starts[0];
  const Json& e = ends[0];
  CHECK(s["id"] == e["id"]);
  CHECK(s["name"] == e["name"]); // Perfetto matches v1 flows by id, cat and name
  CHECK(s["cat"] == e["cat"]);
  CHECK(e["bp"] == "e");
  // The start sits on stage 0's comm.pp thread inside the send [2500, 4000] µs, strictly inside
  // so that Perfetto binds it to the send; the end sits on stage 1's comm.pp thread at the recv.
  CHECK(s["pid"] == names.pid_of("stage 0 of 2 (×4 ranks)"));
  CHECK(names.thread_of(s) == "comm.pp");
  CHECK(s["ts"].get<double>() > 2500.0);
  CHECK(s["ts"].get<double>() < 4000.0);
  CHECK(e["pid"] == names.pid_of("stage 1 of 2 (×4 ranks)"));
  CHECK(names.thread_of(e) == "comm.pp");
  CHECK(e["ts"].get<double>() == mop::test::rel(4000.0));

  const Json without = parse(trace::chrome_trace_json(f.s, f.r, {.flows = false}));
  CHECK(with_phase(without, "s").empty());
  CHECK(with_phase(without, "f").empty());
}

TEST_CASE("flow ids are unique, one per remote dependency" * doctest::test_suite("plumbing")) {
  Fixture f;
  // A second dependency of the reduce-scatter on the send: two flows from one sender.
  f.s.classes[1].ops[2].remote_deps = {{0, 2}};
  const Json t = parse(trace::chrome_trace_json(f.s, f.r));
  std::set<std::int64_t> start_ids, end_ids;
  for (const Json& e : with_phase(t, "s"))
    start_ids.insert(e["id"].get<std::int64_t>());
  for (const Json& e : with_phase(t, "f"))
    end_ids.insert(e["id"].get<std::int64_t>());
  CHECK(start_ids.size() == 2);
  CHECK(start_ids == end_ids);
}

TEST_CASE("critical ops say so and also form a 'critical path' thread per process" *
          doctest::test_suite("plumbing")) {
  const Fixture f;
  const Json t = parse(trace::chrome_trace_json(f.s, f.r));
  const Names names(t);
  for (const auto& [c, i] : std::vector<std::pair<int, int>>{{0, 0}, {0, 1}, {0, 2}, {1, 0}}) {
    const std::string& name =
        f.s.classes[static_cast<std::size_t>(c)].ops[static_cast<std::size_t>(i)].name;
    CAPTURE(name);
    CHECK(stream_event(t, names, name)["args"]["critical"] == true);
  }
  CHECK_FALSE(stream_event(t, names, kOddName)["args"].contains("critical"));

  // Per process, the critical thread holds its part of the path in order.
  std::map<std::int64_t, std::vector<std::string>> path;
  for (const Json& e : t["traceEvents"])
    if ((e["ph"] == "X" || e["ph"] == "i") && names.thread_of(e) == "critical path") {
      CHECK(e["args"]["critical"] == true);
      path[e["pid"]].push_back(e["name"]);
    }
  using OpNames = std::vector<std::string>;
  CHECK(path[names.pid_of("stage 0 of 2 (×4 ranks)")] ==
        OpNames{"L0.attn.q_proj.fwd", "L0.tp.all_reduce", "L0.send.mb0"});
  CHECK(path[names.pid_of("stage 1 of 2 (×4 ranks)")] ==
        OpNames{"L1.recv.mb0", "L1.mlp.experts.fwd", "L1.tp.reduce_scatter"});
  const Json copy = [&] {
    for (const Json& e : with_phase(t, "X"))
      if (e["name"] == "L0.tp.all_reduce" && names.thread_of(e) == "critical path")
        return e;
    return Json();
  }();
  CHECK(copy["args"]["stream"] == "comm.tp");
  CHECK(copy["ts"] == stream_event(t, names, "L0.tp.all_reduce")["ts"]);
}

TEST_CASE("a class off the critical path gets no critical-path thread" *
          doctest::test_suite("plumbing")) {
  Fixture f;
  f.r.critical_path = {{1, 1}};
  const Names names(parse(trace::chrome_trace_json(f.s, f.r)));
  int critical_threads = 0;
  for (const auto& [key, name] : names.threads)
    if (name == "critical path") {
      ++critical_threads;
      CHECK(key.first == names.pid_of("stage 1 of 2 (×4 ranks)"));
    }
  CHECK(critical_threads == 1);
}

TEST_CASE("the same inputs give byte-identical traces" * doctest::test_suite("plumbing")) {
  const Fixture f;
  const trace::TraceOptions o{.title = "determinism"};
  const std::string a = trace::chrome_trace_json(f.s, f.r, o);
  const Fixture g;
  CHECK(a == trace::chrome_trace_json(g.s, g.r, o));
  CHECK(a == trace::chrome_trace_json(f.s, f.r, o));
}

TEST_CASE("names with quotes and backslashes round-trip" * doctest::test_suite("plumbing")) {
  Fixture f;
  f.s.classes[0].name = "stage \"0\" \\ first";
  f.s.classes[0].streams[1] = "comm.\"tp\"\\x";
  const std::string text = trace::chrome_trace_json(f.s, f.r, {.title = "a \"b\" \\ c"});
  const Json t = parse(text);
  const Names names(t);
  CHECK(stream_event(t, names, kOddName).is_object());
  CHECK(names.pid_of("stage \"0\" \\ first (×4 ranks)") >= 0);
  CHECK(stream_event(t, names, "L0.tp.all_reduce").is_object());
  CHECK(names.thread_of(stream_event(t, names, "L0.tp.all_reduce")) == "comm.\"tp\"\\x");
  CHECK(t["otherData"]["title"] == "a \"b\" \\ c");
}

TEST_CASE("invalid UTF-8 in a name still gives a parsable trace" *
          doctest::test_suite("plumbing")) {
  Fixture f;
  f.s.classes[0].ops[0].name = std::string("bad\xff") + "name";
  CHECK(parse(trace::chrome_trace_json(f.s, f.r))["traceEvents"].is_array());
}

TEST_CASE("event shapes: the keys of each kind of event (format golden)" *
          doctest::test_suite("plumbing")) {
  // The format's shape only, no numbers: the keys every viewer relies on, per phase, and the
  // args keys per op kind. A deliberate format change updates this table.
  const Json golden = Json::parse(R"({
    "M process_name": ["args", "name", "ph", "pid", "ts"],
    "M process_sort_index": ["args", "name", "ph", "pid", "ts"],
    "M thread_name": ["args", "name", "ph", "pid", "tid", "ts"],
    "M thread_sort_index": ["args", "name", "ph", "pid", "tid", "ts"],
    "X": ["args", "cat", "dur", "name", "ph", "pid", "tid", "ts"],
    "i": ["args", "cat", "name", "ph", "pid", "s", "tid", "ts"],
    "C": ["args", "cat", "name", "ph", "pid", "tid", "ts"],
    "s": ["cat", "id", "name", "ph", "pid", "tid", "ts"],
    "f": ["bp", "cat", "id", "name", "ph", "pid", "tid", "ts"],
    "args gemm": ["critical", "dtype", "instances", "k", "kind", "layer", "m", "micro_batch",
                  "model_flops", "n", "op"],
    "args grouped_gemm": ["critical", "dtype", "experts", "k", "kind", "layer", "micro_batch",
                          "model_flops", "n", "op", "rows_per_expert"],
    "args all_reduce": ["bytes", "critical", "group", "group_ranks", "kind", "layer",
                        "micro_batch", "model_flops", "op"],
    "args send": ["bytes", "critical", "group", "group_ranks", "kind", "layer", "micro_batch",
                  "model_flops", "op", "peer"],
    "args elementwise": ["bytes", "kind", "layer", "micro_batch", "model_flops", "op"]
  })");
  const Fixture f;
  const Json t = parse(trace::chrome_trace_json(f.s, f.r));
  const Names names(t);
  std::map<std::string, std::set<std::string>> seen;
  for (const Json& e : t["traceEvents"]) {
    std::string kind = e["ph"];
    if (kind == "M")
      kind += " " + e["name"].get<std::string>();
    if (seen.count(kind))
      CHECK(seen[kind] == keys_of(e)); // every event of a kind has the same keys
    seen[kind] = keys_of(e);
    if ((e["ph"] == "X" || e["ph"] == "i") && names.thread_of(e) != "critical path")
      seen["args " + e["args"]["kind"].get<std::string>()] = keys_of(e["args"]);
  }
  for (const auto& item : golden.items()) {
    const std::string& kind = item.key();
    const auto& keys = item.value();
    CAPTURE(kind);
    CHECK(seen[kind] == keys.get<std::set<std::string>>());
  }
}

TEST_CASE("write_chrome_trace writes a file that parses" * doctest::test_suite("plumbing")) {
  const Fixture f;
  const fs::path dir = fs::temp_directory_path() / "mop-chrome-trace-test";
  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::string path = (dir / "step.trace.json").string();
  trace::write_chrome_trace(path, f.s, f.r, {.title = "file"});
  const Json t = mop::read_json_file(path);
  CHECK(t["otherData"]["title"] == "file");
  CHECK(!t["traceEvents"].empty());
  int files = 0;
  for (const auto& entry : fs::directory_iterator(dir)) {
    (void)entry;
    ++files;
  }
  CHECK(files == 1); // no temporary left beside it
  fs::remove_all(dir);
}

TEST_CASE("writing into a missing folder is an InputError and leaves no file" *
          doctest::test_suite("plumbing")) {
  const Fixture f;
  const fs::path dir = fs::temp_directory_path() / "mop-chrome-trace-missing";
  fs::remove_all(dir);
  const std::string path = (dir / "step.trace.json").string();
  CHECK_THROWS_AS(trace::write_chrome_trace(path, f.s, f.r), mop::InputError);
  CHECK_FALSE(fs::exists(path));
  CHECK_FALSE(fs::exists(dir));
}

TEST_CASE("a result that does not fit the schedule is refused" * doctest::test_suite("plumbing")) {
  Fixture f;
  SUBCASE("class count") {
    f.r.classes.pop_back();
  }
  SUBCASE("op count") {
    f.r.classes[1].ops.pop_back();
  }
  SUBCASE("an op ending before it starts") {
    f.r.classes[0].ops[1] = {0.002, 0.001};
  }
  SUBCASE("a critical step out of range") {
    f.r.critical_path.push_back({1, 9});
  }
  SUBCASE("a stream out of range") {
    f.s.classes[0].ops[0].stream = 3;
  }
  CHECK_THROWS_AS(trace::chrome_trace_json(f.s, f.r), std::invalid_argument);
}

} // namespace traces_chrome_trace_test
