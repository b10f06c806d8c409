#pragma once
// What playing a Schedule produces: when each op ran, memory over time, the step's totals.
// The trace writer (traces/) and the report read it; both executors will produce it.
#include "sim/schedule.hpp"

#include <string>
#include <vector>

namespace mop::sim {

struct OpTiming {
  double start_s = 0;
  double end_s = 0;
};

// A step of a memory counter: after time_s, the class's device holds `bytes` of `kind`.
struct MemorySample {
  double time_s = 0;
  Device device = Device::hbm;
  double bytes = 0; // all kinds together, after this event
};

struct ClassMemory {
  double peak_hbm_bytes = 0;
  double peak_host_bytes = 0;               // this class's ranks' share of host memory (per rank)
  double peak_time_s = 0;                   // when HBM peaked
  double at_peak[6] = {0, 0, 0, 0, 0, 0};   // HBM bytes by MemoryKind when HBM peaked
  std::vector<std::string> largest_at_peak; // names of the largest live tensors at the peak
  std::vector<MemorySample> timeline;
  // With EngineOptions::memory_by_layer: the highest HBM and host use reached as the ops of each
  // piece of the class's program allocated, each with its HBM breakdown at that moment. A piece
  // is a stretch of consecutive ops of one decoder layer (with the ops of no layer that follow
  // it): `layer`, and `pass`, which of that layer's stretches it is in program order (its
  // forward, its backward, once per micro-batch); the ops before any layer's, with the resident
  // tensors, are layer -1. The peak is the largest of them (planner/fold.hpp extrapolates them
  // to a deeper model).
  struct LayerPeak {
    int layer = -1;
    int pass = 0;
    double hbm_bytes = 0;
    double host_bytes = 0;
    double at_peak[6] = {0, 0, 0, 0, 0, 0};
  };
  std::vector<LayerPeak> by_layer;
};

struct ClassResult {
  std::vector<OpTiming> ops; // parallel to RankClass::ops
  ClassMemory memory;
  double end_s = 0; // when its last op ended
};

// Time on the critical path by what it was spent on (CLI.md simulate breakdown_s).
struct Breakdown {
  double compute = 0;      // forward, backward and recompute kernels
  double recompute = 0;    // the recompute part of compute
  double exposed_comm = 0; // communication not hidden behind compute
  double exposed_comm_by_category[10] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0}; // by Category index
  double bubble = 0;        // waiting for another pipeline stage
  double offload_stall = 0; // waiting for PCIe copies
  double optimizer = 0;     // the optimizer step
};

// Applies f(part of a, part of b) to every part of two breakdowns, pairwise (scaling one,
// adding or extrapolating another into it).
template <class F> void each_part(Breakdown& a, const Breakdown& b, F f) {
  f(a.compute, b.compute);
  f(a.recompute, b.recompute);
  f(a.exposed_comm, b.exposed_comm);
  for (int c = 0; c < 10; ++c)
    f(a.exposed_comm_by_category[c], b.exposed_comm_by_category[c]);
  f(a.bubble, b.bubble);
  f(a.offload_stall, b.offload_stall);
  f(a.optimizer, b.optimizer);
}

struct CriticalStep {
  int rank_class = 0;
  int op = 0;
};

struct SimResult {
  std::vector<ClassResult> classes; // parallel to Schedule::classes
  double step_time_s = 0;
  Breakdown breakdown;
  std::vector<CriticalStep> critical_path; // first op to last
  std::int64_t events = 0;                 // events the engine processed
};

} // namespace mop::sim
