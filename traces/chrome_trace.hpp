#pragma once
// The trace writer: a played Schedule (predicted by sim/, measured by real_backend/) as Chrome
// Trace Event Format JSON, the format ui.perfetto.dev and chrome://tracing open
// (docs/TRACES.md: tracks, events, and why flows sit where they do).
//
// One process per rank class, one thread per stream, plus a "critical path" thread in every
// process the step's critical path passes through; HBM and host memory as counter tracks;
// remote dependencies (pipeline send -> recv) as flow arrows. The same inputs give the same
// bytes.
#include "sim/result.hpp"
#include "sim/schedule.hpp"

#include <string>

namespace mop::trace {

struct TraceOptions {
  bool memory_counters = true; // "HBM" and "host" counter tracks per rank class
  bool flows = true;           // an arrow per remote dependency
  std::string title = {};      // otherData.title
};

// The whole trace as one JSON document. A SimResult that does not fit the Schedule (class or op
// counts, critical-path or dependency indices out of range, an op that ends before it starts) is
// a programming error: std::invalid_argument naming the class and op.
std::string chrome_trace_json(const sim::Schedule& s, const sim::SimResult& r,
                              const TraceOptions& o = {});

// Writes chrome_trace_json() to `path` through mop::write_output_file: a regular file gets either
// the whole trace or stays as it was, a FIFO or character device is written through; a missing
// folder, a folder or a failed write is an InputError naming the path.
void write_chrome_trace(const std::string& path, const sim::Schedule& s, const sim::SimResult& r,
                        const TraceOptions& o = {});

} // namespace mop::trace
