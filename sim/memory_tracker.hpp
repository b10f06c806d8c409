#pragma once
// Memory of one rank class over a simulated step: HBM and host bytes after every allocation and
// free, the HBM peak with its breakdown by MemoryKind and its largest live tensors.
#include "sim/result.hpp"
#include "sim/schedule.hpp"

#include <cstdint>
#include <span>
#include <vector>

namespace mop::sim {

class MemoryTracker {
public:
  // Resident tensors are allocated at t = 0. `by_layer`: keep each program piece's peak as
  // well (ClassMemory::by_layer).
  MemoryTracker(const RankClass& rank_class, bool record_timeline, bool by_layer = false);

  // One op's allocations (at its start) or frees (at its end), all at `time_s`; `op` is the
  // allocating op's index in the class.
  void allocate(std::span<const int> tensors, double time_s, int op = 0);
  void free(std::span<const int> tensors, double time_s);

  // The class's memory at the end of the step, with the names of up to `largest` biggest HBM
  // tensors live at the peak. Moves the timeline out: call it once, last.
  ClassMemory finish(std::size_t largest = 5);

private:
  void change(std::span<const int> tensors, double time_s, double sign);
  void note_piece(int piece);

  const RankClass* rank_class_;
  bool record_timeline_;
  bool by_layer_;
  double hbm_bytes_ = 0, host_bytes_ = 0;
  double hbm_by_kind_[6] = {0, 0, 0, 0, 0, 0};
  // Each change is a numbered step; a tensor is live at step p when alloc_step <= p < free_step.
  std::int64_t step_ = 0, peak_step_ = 0;
  std::vector<std::int64_t> alloc_step_, free_step_;
  // Flat copies of each tensor's size and where it counts: the hot loop reads only these.
  std::vector<double> bytes_;
  std::vector<std::uint8_t> on_host_, kind_;
  std::vector<int> piece_of_op_; // by_layer: index into memory_.by_layer of each op
  ClassMemory memory_;
};

} // namespace mop::sim
