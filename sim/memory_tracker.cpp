#include "sim/memory_tracker.hpp"

#include <algorithm>
#include <limits>
#include <utility>

namespace mop::sim {

namespace {
constexpr std::int64_t kNever = std::numeric_limits<std::int64_t>::max();
}

MemoryTracker::MemoryTracker(const RankClass& rank_class, bool record_timeline, bool by_layer)
    : rank_class_(&rank_class), record_timeline_(record_timeline), by_layer_(by_layer),
      alloc_step_(rank_class.tensors.size(), kNever),
      free_step_(rank_class.tensors.size(), kNever) {
  const std::size_t n = rank_class.tensors.size();
  bytes_.resize(n);
  on_host_.resize(n);
  kind_.resize(n);
  for (std::size_t t = 0; t < n; ++t) {
    const Tensor& tensor = rank_class.tensors[t];
    bytes_[t] = tensor.bytes;
    on_host_[t] = tensor.device == Device::host;
    kind_[t] = static_cast<std::uint8_t>(tensor.kind);
    if (!tensor.resident)
      continue;
    alloc_step_[t] = 0;
    if (tensor.device == Device::hbm) {
      hbm_bytes_ += tensor.bytes;
      hbm_by_kind_[static_cast<int>(tensor.kind)] += tensor.bytes;
    } else {
      host_bytes_ += tensor.bytes;
    }
  }
  memory_.peak_hbm_bytes = hbm_bytes_;
  memory_.peak_host_bytes = host_bytes_;
  memory_.peak_time_s = 0;
  std::copy(std::begin(hbm_by_kind_), std::end(hbm_by_kind_), std::begin(memory_.at_peak));
  if (record_timeline_) {
    memory_.timeline.push_back({0, Device::hbm, hbm_bytes_});
    memory_.timeline.push_back({0, Device::host, host_bytes_});
  }
  if (by_layer_) {
    ProgramPieces pieces = program_pieces(rank_class);
    piece_of_op_ = std::move(pieces.of_op);
    memory_.by_layer.resize(pieces.layer.size());
    for (std::size_t i = 0; i < pieces.layer.size(); ++i) {
      memory_.by_layer[i].layer = pieces.layer[i];
      memory_.by_layer[i].pass = pieces.pass[i];
    }
    note_piece(0);
  }
}

void MemoryTracker::allocate(std::span<const int> tensors, double time_s, int op) {
  if (tensors.empty())
    return;
  change(tensors, time_s, +1);
  if (by_layer_)
    note_piece(piece_of_op_[static_cast<std::size_t>(op)]);
}

void MemoryTracker::note_piece(int piece) {
  ClassMemory::LayerPeak& p = memory_.by_layer[static_cast<std::size_t>(piece)];
  p.host_bytes = std::max(p.host_bytes, host_bytes_);
  if (hbm_bytes_ > p.hbm_bytes) {
    p.hbm_bytes = hbm_bytes_;
    std::copy(std::begin(hbm_by_kind_), std::end(hbm_by_kind_), std::begin(p.at_peak));
  }
}

void MemoryTracker::free(std::span<const int> tensors, double time_s) {
  if (!tensors.empty())
    change(tensors, time_s, -1);
}

void MemoryTracker::change(std::span<const int> tensors, double time_s, double sign) {
  ++step_;
  bool hbm_changed = false, host_changed = false;
  for (int t : tensors) {
    const std::size_t ti = static_cast<std::size_t>(t);
    (sign > 0 ? alloc_step_ : free_step_)[ti] = step_;
    if (!on_host_[ti]) {
      hbm_bytes_ += sign * bytes_[ti];
      hbm_by_kind_[kind_[ti]] += sign * bytes_[ti];
      hbm_changed = true;
    } else {
      host_bytes_ += sign * bytes_[ti];
      host_changed = true;
    }
  }
  if (record_timeline_) {
    if (hbm_changed)
      memory_.timeline.push_back({time_s, Device::hbm, hbm_bytes_});
    if (host_changed)
      memory_.timeline.push_back({time_s, Device::host, host_bytes_});
  }
  // Strictly greater: the peak is the first moment the class reaches its maximum.
  if (hbm_bytes_ > memory_.peak_hbm_bytes) {
    memory_.peak_hbm_bytes = hbm_bytes_;
    memory_.peak_time_s = time_s;
    peak_step_ = step_;
    std::copy(std::begin(hbm_by_kind_), std::end(hbm_by_kind_), std::begin(memory_.at_peak));
  }
  memory_.peak_host_bytes = std::max(memory_.peak_host_bytes, host_bytes_);
}

ClassMemory MemoryTracker::finish(std::size_t largest) {
  ClassMemory out = std::move(memory_);
  std::vector<int> live;
  for (std::size_t t = 0; t < rank_class_->tensors.size(); ++t) {
    const Tensor& tensor = rank_class_->tensors[t];
    if (tensor.device == Device::hbm && tensor.bytes > 0 && alloc_step_[t] <= peak_step_ &&
        peak_step_ < free_step_[t])
      live.push_back(static_cast<int>(t));
  }
  const auto bigger = [&](int a, int b) {
    const double ba = rank_class_->tensors[static_cast<std::size_t>(a)].bytes;
    const double bb = rank_class_->tensors[static_cast<std::size_t>(b)].bytes;
    return ba != bb ? ba > bb : a < b;
  };
  const std::size_t keep = std::min(largest, live.size());
  std::partial_sort(live.begin(), live.begin() + static_cast<std::ptrdiff_t>(keep), live.end(),
                    bigger);
  for (std::size_t i = 0; i < keep; ++i)
    out.largest_at_peak.push_back(rank_class_->tensors[static_cast<std::size_t>(live[i])].name);
  return out;
}

} // namespace mop::sim
