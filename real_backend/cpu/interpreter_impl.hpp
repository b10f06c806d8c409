#pragma once
// The program interpreter's walk of a Schedule (interpreter.hpp), generic over the backend that
// stores the tensors and runs the kernels: CpuKernels (real_backend/cpu/kernels.hpp) for the CPU
// executor, the CUDA backend's policy for `mop run --executor cuda` (real_backend/cuda). A backend
// policy K<T> provides Alloc<X> (the allocator of every tensor and every temporary a kernel
// reads), sync() (waits for the kernels issued so far: after each op, and inside an op wherever
// host code reads what a kernel of that op wrote) and the kernels with the CPU twins'
// signatures. Kernels may return before they finish; host code may write a buffer before a
// kernel that reads it is issued.
#include "common/error.hpp"
#include "real_backend/cpu/comm.hpp"
#include "real_backend/cpu/interpreter.hpp"
#include "real_backend/cpu/slice.hpp"
#include "workload/rebalance.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <fmt/format.h>
#include <limits>
#include <memory>
#include <numeric>
#include <stdexcept>

namespace mop::real {

namespace detail {
using sim::Kernel;
using sim::OpKind;
using sim::TensorRole;
} // namespace detail

namespace detail {

using Clock = std::chrono::steady_clock;
using Index = std::size_t;

inline Index sz(std::int64_t v) {
  return static_cast<Index>(v);
}

inline std::int64_t numel(const std::vector<std::int64_t>& shape) {
  std::int64_t n = 1;
  for (auto d : shape)
    n *= d;
  return n;
}

inline double element_bytes(const sim::Tensor& t) {
  switch (t.element) {
  case sim::Element::i32:
    return 4;
  case sim::Element::i64:
    return 8;
  case sim::Element::real:
    break;
  }
  switch (t.dtype) {
  case sim::Dtype::fp8:
    return 1;
  case sim::Dtype::fp32:
    return 4;
  case sim::Dtype::bf16:
    break;
  }
  return 2;
}

[[noreturn]] inline void bug(const std::string& what) {
  throw std::logic_error(what);
}

// Shared by the ranks of one run.
template <class T> struct Shared {
  TrainState<T> state;
  std::vector<std::vector<T>> grads;
  std::vector<double> loss_part;
  std::vector<std::map<std::string, OpTiming>> ops;
  std::vector<double> peak;
  std::vector<std::vector<ExecutedOp>> trace;
  std::vector<std::vector<std::vector<std::int64_t>>> runtime_rows;
  std::vector<std::vector<sim::OpTiming>> timeline; // absolute steady-clock seconds; -1: not run
  std::vector<std::vector<sim::MemorySample>> memory;
};

inline double clock_s(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(t.time_since_epoch()).count();
}

// The rank class that runs world rank `rank`: its pipeline stage's; nullptr for none.
inline const sim::RankClass* class_of_rank(const sim::Schedule& s, int rank) {
  const int stage = s.mesh.view(s.tokens.view).coord(rank, "pp");
  const sim::RankClass* found = nullptr;
  for (const sim::RankClass& rc : s.classes)
    if (rc.stage == stage)
      found = &rc;
  return found;
}

// K<T> is the backend's kernel policy (CpuKernels here, the CUDA backend's in
// real_backend/cuda): the storage every tensor lives in (K<T>::Alloc) and the kernels.
template <class T, template <class> class K> class RankInterpreter {
  using Kn = K<T>;
  template <class X> using Buf = std::vector<X, typename Kn::template Alloc<X>>;
  using Vec = Buf<T>;
  using Ints = Buf<std::int32_t>;
  using Longs = Buf<std::int64_t>;

public:
  RankInterpreter(World& w, int rank, const sim::Schedule& s, const TinyConfig& c, Shared<T>& sh,
                  const RunOptions& o, const DataSource& data)
      : w_(w), rank_(rank), s_(s), c_(c), sh_(sh), o_(o), data_(data), layout_(param_layout(c)) {
    rc_ = class_of_rank(s_, rank);
    if (rc_ == nullptr)
      bug(fmt::format("no rank class runs the stage of rank {}", rank));
    // The communicators this rank's ops use (a group of other stages, such as the tied
    // embeddings' ends, may not hold it); point-to-point groups need none.
    comms_.resize(s_.groups.size());
    for (const sim::Op& op : rc_->ops) {
      if (op.group < 0 || comms_[sz(op.group)].size() > 1)
        continue;
      const sim::GroupSpec& g = s_.groups[sz(op.group)].spec;
      if (!g.view.empty())
        comms_[sz(op.group)] = w_.group(s_.mesh.view(g.view).members(rank_, g), rank_);
    }
    bind_params();
    real_.resize(rc_->tensors.size());
    ints_.resize(rc_->tensors.size());
    longs_.resize(rc_->tensors.size());
    rows_.assign(rc_->tensors.size(), -1);
    sized_by_.resize(rc_->tensors.size());
    for (std::size_t t = 0; t < rc_->tensors.size(); ++t)
      if (rc_->tensors[t].rows.counts >= 0)
        sized_by_[sz(rc_->tensors[t].rows.counts)].push_back(static_cast<int>(t));
    for (std::size_t t = 0; t < rc_->tensors.size(); ++t)
      if (rc_->tensors[t].resident)
        allocate(static_cast<int>(t));
    load_state();
  }

  // Whether the next step records its ops' times (RunOptions::timeline, the last step).
  void record(bool on) {
    record_ = on;
    if (on) {
      sh_.timeline[sz(rank_)].assign(rc_->ops.size(), sim::OpTiming{-1, -1});
      sh_.memory[sz(rank_)].clear();
    }
  }

  void step(std::int64_t step_index) {
    step_index_ = step_index;
    batch_ = data_.batch(step_index, s_.tokens.global_batch, s_.tokens.seq_len);
    labelled_ = 0;
    for (auto l : batch_.labels)
      labelled_ += l >= 0 ? 1 : 0;
    if (o_.trace)
      sh_.runtime_rows[sz(rank_)].emplace_back(rc_->tensors.size(), -1);
    // The program zeroes its gradients itself (Kernel::zero); the loss restarts each step.
    for (std::size_t t = 0; t < rc_->tensors.size(); ++t)
      if (rc_->tensors[t].resident && rc_->tensors[t].role == TensorRole::loss)
        std::fill(real_[t].begin(), real_[t].end(), T(0));
    // AdamW's step count: this step's, or for an update deferred from the previous step, that
    // one's.
    for (const sim::Op& op : rc_->ops)
      if (!rc_->attrs_of(op).deferred || steps_run_ > 0) {
        adam_count_ = rc_->attrs_of(op).deferred ? step_index_ : step_index_ + 1;
        run(op);
      }
    ++steps_run_;
    publish_grads();
    const int loss = find_loss();
    sh_.loss_part[sz(rank_)] = loss < 0 ? 0.0 : static_cast<double>(real_[sz(loss)][0]);
  }

  // The updates still pending (streamed into a next forward that will not come) run now.
  void finish_run() {
    record_ = false; // the last step's times are kept as they were
    adam_count_ = step_index_ + 1;
    for (const sim::Op& op : rc_->ops)
      if (rc_->attrs_of(op).deferred)
        run(op);
    publish_state();
  }

private:
  World& w_;
  int rank_;
  const sim::Schedule& s_;
  const TinyConfig& c_;
  Shared<T>& sh_;
  const RunOptions& o_;
  const DataSource& data_;
  std::vector<ParamInfo> layout_;
  const sim::RankClass* rc_ = nullptr;
  std::vector<Comm> comms_;
  std::vector<Vec> real_;
  std::vector<Ints> ints_;
  std::vector<Longs> longs_;               // Element::i64 (count tables)
  std::vector<std::int64_t> rows_;         // runtime rows, once their table is written
  std::vector<std::vector<int>> sized_by_; // count table -> the tensors it sizes
  double live_ = 0, peak_ = 0;
  std::int64_t step_index_ = 0;
  int steps_run_ = 0;
  std::int64_t adam_count_ = 1;
  Batch batch_;
  std::int64_t labelled_ = 0;
  bool record_ = false;

  // Each parameter: its index in the model's layout and this rank's slice of it; each bucket:
  // its members' flat offsets, the padded shard size and this rank's shard.
  struct ParamBind {
    int layout = -1;
    Slice slice;
    bool writer = true; // writes the parameter back (the first of its ParamSpec::partial_grads)
  };
  std::vector<ParamBind> pb_;
  struct BucketBind {
    std::vector<std::int64_t> offset; // member i starts at flat element offset[i]
    std::int64_t n = 0;               // the members' slices' elements
    std::int64_t chunk = 0;           // elements per shard (n padded to the group, divided)
    std::int64_t lo = 0;              // this rank's shard starts here
    bool sharded = false;
    bool writer = false;       // writes its shard back (the first of its replicas)
    bool slice_writer = false; // writes the whole slices back (the first of the grads group)
  };
  std::vector<BucketBind> bb_;

  const Comm& comm(int g) const { return comms_[sz(g)]; }
  std::vector<int> members(const sim::GroupSpec& g) const {
    return s_.mesh.view(g.view).members(rank_, g);
  }

  void bind_params() {
    for (const sim::ParamSpec& ps : s_.params) {
      ParamBind b;
      for (std::size_t i = 0; i < layout_.size(); ++i)
        if (layout_[i].name == ps.name)
          b.layout = static_cast<int>(i);
      if (b.layout < 0 || layout_[sz(b.layout)].shape != ps.shape)
        bug(fmt::format("the Schedule's parameter {} is not the model's", ps.name));
      b.slice = full_slice(ps.shape);
      const int off = 3 - static_cast<int>(ps.shape.size());
      for (const sim::AxisSplit& sp : ps.splits) {
        const sim::MeshView& v = s_.mesh.view(sp.view);
        split(b.slice, off + sp.axis, v.coord(rank_, sp.dim), v.extent(sp.dim));
      }
      if (!ps.partial_grads.dims.empty())
        b.writer = members(ps.partial_grads).front() == rank_;
      pb_.push_back(b);
    }
    for (const sim::Bucket& bk : s_.buckets) {
      BucketBind b;
      for (int p : bk.params) {
        b.offset.push_back(b.n);
        b.n += static_cast<std::int64_t>(pb_[sz(p)].slice.numel());
      }
      b.sharded = !bk.shard.dims.empty();
      b.chunk = b.n;
      if (b.sharded) {
        const std::vector<int> g = members(bk.shard);
        const auto me = std::find(g.begin(), g.end(), rank_) - g.begin();
        const auto parts = static_cast<std::int64_t>(g.size());
        b.chunk = (b.n + parts - 1) / parts;
        b.lo = std::min(b.n, b.chunk * me);
        b.writer = bk.replicas.dims.empty() || members(bk.replicas).front() == rank_;
      }
      b.slice_writer = members(bk.grads).front() == rank_;
      if (!b.sharded)
        b.writer = b.slice_writer;
      // Tied copies (a parameter listed once per copy) hold the same values: the first stage's
      // writes them back; the members beside them (the final norm) are the bucket's own.
      if (!bk.tied.dims.empty() && members(bk.tied).front() != rank_)
        for (int p : bk.params) {
          const auto copies =
              std::count_if(s_.params.begin(), s_.params.end(), [&](const sim::ParamSpec& q) {
                return q.name == s_.params[sz(p)].name;
              });
          if (copies > 1)
            pb_[sz(p)].writer = false;
        }
      bb_.push_back(std::move(b));
    }
  }

  // The bucket's members' slices of a full-state list, flattened and concatenated.
  Vec bucket_flat(int b, const std::vector<std::vector<T>>& full) const {
    Vec out;
    for (int p : s_.buckets[sz(b)].params) {
      const auto part = extract(full[sz(pb_[sz(p)].layout)], pb_[sz(p)].slice);
      out.insert(out.end(), part.begin(), part.end());
    }
    return out;
  }
  // Elements [lo, lo + chunk) of a flat list, zero-padded.
  Vec shard_of(int b, const Vec& flat) const {
    const BucketBind& bb = bb_[sz(b)];
    Vec out(sz(bb.chunk), T(0));
    const std::int64_t hi = std::min(bb.n, bb.lo + bb.chunk);
    for (std::int64_t k = bb.lo; k < hi; ++k)
      out[sz(k - bb.lo)] = flat[sz(k)];
    return out;
  }
  // Writes flat bucket elements [lo, lo + count) into a full-state list.
  void write_flat(int b, const T* values, std::int64_t lo, std::int64_t count,
                  std::vector<std::vector<T>>& full) const {
    const sim::Bucket& bk = s_.buckets[sz(b)];
    const BucketBind& bb = bb_[sz(b)];
    for (std::size_t i = 0; i < bk.params.size(); ++i) {
      const ParamBind& pb = pb_[sz(bk.params[i])];
      if (!pb.writer)
        continue;
      const std::int64_t begin = bb.offset[i];
      const auto n = static_cast<std::int64_t>(pb.slice.numel());
      for (std::int64_t k = std::max(lo, begin); k < std::min(lo + count, begin + n); ++k)
        full[sz(pb.layout)][full_index(pb.slice, sz(k - begin))] = values[sz(k - lo)];
    }
  }

  // Which list of the training state an optimizer-state tensor holds: the AdamW moments, or
  // for the host optimizer's master weights the parameters themselves.
  static bool is_master(const sim::Tensor& t) {
    return t.slot == sim::Tensor::Slot::master_weights;
  }
  static std::vector<std::vector<T>>& state_list(const sim::Tensor& t, TrainState<T>& st) {
    if (is_master(t))
      return st.params;
    return t.slot == sim::Tensor::Slot::first_moment ? st.adam_m : st.adam_v;
  }

  void load_state() {
    TrainState<T>& st = sh_.state; // read only
    for (std::size_t t = 0; t < rc_->tensors.size(); ++t) {
      const sim::Tensor& ten = rc_->tensors[t];
      if (!ten.resident || ten.shape.empty()) // a cost tensor binds nothing
        continue;
      if (ten.role == TensorRole::param && ten.param >= 0) {
        const ParamBind& pb = pb_[sz(ten.param)];
        const auto part = extract(st.params[sz(pb.layout)], pb.slice);
        real_[t].assign(part.begin(), part.end());
      } else if (ten.role == TensorRole::param_shard) {
        real_[t] = shard_of(ten.bucket, bucket_flat(ten.bucket, st.params));
      } else if (ten.role == TensorRole::optimizer_state) {
        Vec flat = bucket_flat(ten.bucket, state_list(ten, st));
        real_[t] = bb_[sz(ten.bucket)].sharded ? shard_of(ten.bucket, flat) : std::move(flat);
      }
      check_size(static_cast<int>(t));
    }
  }

  void publish_state() {
    TrainState<T>& st = sh_.state;
    for (std::size_t b = 0; b < s_.buckets.size(); ++b) {
      const BucketBind& bb = bb_[b];
      const int bi = static_cast<int>(b);
      // Unsharded parameters (ZeRO 0-2): the slices themselves.
      if (bb.slice_writer)
        for (int p : s_.buckets[b].params) {
          const int t = resident_param(p);
          if (t >= 0 && pb_[sz(p)].writer)
            insert(real_[sz(t)], pb_[sz(p)].slice, st.params[sz(pb_[sz(p)].layout)]);
        }
      if (!bb.writer)
        continue;
      const std::int64_t count = std::min(bb.n, bb.lo + bb.chunk) - bb.lo;
      for (std::size_t t = 0; t < rc_->tensors.size(); ++t) {
        const sim::Tensor& ten = rc_->tensors[t];
        if (!ten.resident || ten.bucket != bi)
          continue;
        if (ten.role == TensorRole::param_shard)
          write_flat(bi, real_[t].data(), bb.lo, count, st.params);
        else if (ten.role == TensorRole::optimizer_state && !is_master(ten))
          write_flat(bi, real_[t].data(), bb.lo, count, state_list(ten, st));
      }
    }
  }

  void publish_grads() {
    for (std::size_t b = 0; b < s_.buckets.size(); ++b) {
      const BucketBind& bb = bb_[b];
      const int bi = static_cast<int>(b);
      const sim::Bucket& bk = s_.buckets[b];
      // The reduced gradient shard, or else the host gradients the micro-batches' downloads
      // summed (what the rank owns: its shard, or the whole bucket's slices flattened).
      int shard = -1, host = -1;
      for (std::size_t t = 0; t < rc_->tensors.size(); ++t) {
        const sim::Tensor& ten = rc_->tensors[t];
        if (!ten.resident || ten.bucket != bi)
          continue;
        if (ten.role == TensorRole::grad)
          shard = static_cast<int>(t);
        else if (ten.role == TensorRole::host_copy && ten.kind == sim::MemoryKind::grads)
          host = static_cast<int>(t);
      }
      if (shard < 0 && host >= 0) {
        if (bb.writer)
          write_flat(bi, real_[sz(host)].data(), bb.lo, std::min(bb.n, bb.lo + bb.chunk) - bb.lo,
                     sh_.grads);
        continue;
      }
      if (shard >= 0 ? !bb.writer : !bb.slice_writer)
        continue;
      if (shard >= 0) {
        const std::int64_t count = std::min(bb.n, bb.lo + bb.chunk) - bb.lo;
        write_flat(bi, real_[sz(shard)].data(), bb.lo, count, sh_.grads);
        continue;
      }
      for (int p : bk.params)
        for (std::size_t t = 0; t < rc_->tensors.size() && pb_[sz(p)].writer; ++t)
          if (rc_->tensors[t].resident && rc_->tensors[t].param == p &&
              rc_->tensors[t].role == TensorRole::grad)
            insert(real_[t], pb_[sz(p)].slice, sh_.grads[sz(pb_[sz(p)].layout)]);
    }
  }

  int resident_param(int p) const {
    for (std::size_t t = 0; t < rc_->tensors.size(); ++t)
      if (rc_->tensors[t].resident && rc_->tensors[t].param == p &&
          rc_->tensors[t].role == TensorRole::param)
        return static_cast<int>(t);
    return -1;
  }
  int find_loss() const {
    for (std::size_t t = 0; t < rc_->tensors.size(); ++t)
      if (rc_->tensors[t].role == TensorRole::loss)
        return static_cast<int>(t);
    return -1;
  }

  // --- tensors -------------------------------------------------------------------------------
  const sim::Tensor& info(int t) const { return rc_->tensors[sz(t)]; }
  bool is_int(int t) const { return info(t).element == sim::Element::i32; }
  bool is_long(int t) const { return info(t).element == sim::Element::i64; }
  // Elements of tensor t as made now: its shape, with runtime rows as its count table says.
  Index elements(int t) const {
    const sim::Tensor& ten = info(t);
    const auto n = sz(numel(ten.shape));
    if (ten.rows.counts < 0)
      return n;
    if (rows_[sz(t)] < 0)
      bug(fmt::format("tensor '{}' is made before its count table is written", ten.name));
    return n / sz(ten.shape[0]) * sz(rows_[sz(t)]);
  }
  Index stored(int t) const {
    return is_long(t) ? longs_[sz(t)].size()
                      : (is_int(t) ? ints_[sz(t)].size() : real_[sz(t)].size());
  }
  void allocate(int t) {
    const sim::Tensor& ten = info(t);
    if (ten.shape.empty()) { // a cost tensor (sim::cost_tensor): its bytes count, nothing binds
      if (ten.device == sim::Device::hbm) {
        live_ += ten.bytes;
        peak_ = std::max(peak_, live_);
      }
      return;
    }
    const Index n = elements(t);
    if (is_long(t))
      longs_[sz(t)].assign(n, 0);
    else if (is_int(t))
      ints_[sz(t)].assign(n, 0);
    else
      real_[sz(t)].assign(n, T(0));
    if (ten.device == sim::Device::hbm) {
      live_ += static_cast<double>(n) * element_bytes(ten);
      peak_ = std::max(peak_, live_);
    }
  }
  void release(int t) {
    const sim::Tensor& ten = info(t);
    if (ten.shape.empty()) {
      if (ten.device == sim::Device::hbm)
        live_ -= ten.bytes;
      return;
    }
    if (ten.device == sim::Device::hbm)
      live_ -= static_cast<double>(stored(t)) * element_bytes(ten);
    Vec().swap(real_[sz(t)]);
    Ints().swap(ints_[sz(t)]);
    Longs().swap(longs_[sz(t)]);
  }
  void check_size(int t) const {
    const Index want = elements(t), got = stored(t);
    if (want != got)
      bug(fmt::format("tensor '{}' holds {} elements, its shape says {}", info(t).name, got, want));
  }
  // A count table was written: the rows of the tensors it sizes (sim::RuntimeRows).
  void resolve_rows(int table) {
    const Longs& c = longs_[sz(table)];
    for (int t : sized_by_[sz(table)]) {
      std::int64_t rows = 0;
      if (!info(t).rows.padded) {
        for (auto v : c)
          rows += v;
      } else {
        const auto blocks = sz(info(table).shape[0]);
        const Index per = c.size() / blocks;
        std::int64_t largest = 0;
        for (Index b = 0; b < blocks; ++b) {
          std::int64_t sum = 0;
          for (Index i = 0; i < per; ++i)
            sum += c[b * per + i];
          largest = std::max(largest, sum);
        }
        rows = static_cast<std::int64_t>(blocks) * largest;
      }
      rows_[sz(t)] = rows;
      if (o_.trace)
        sh_.runtime_rows[sz(rank_)].back()[sz(t)] = rows;
    }
  }
  // Columns of tensor t (all but its first dimension), and its rows as made now (runtime rows
  // as the routing gave them, possibly none).
  Index cols_of(int t) const {
    const auto& sh = info(t).shape;
    return sz(numel(sh) / sh[0]);
  }
  Index actual_rows(int t) const { return elements(t) / cols_of(t); }
  Vec& R(int t) { return real_[sz(t)]; }
  Ints& I(int t) { return ints_[sz(t)]; }
  Longs& L(int t) { return longs_[sz(t)]; }
  double bytes_of(const std::vector<int>& ts) const {
    double b = 0;
    for (int t : ts)
      b += static_cast<double>(stored(t)) * element_bytes(info(t));
    return b;
  }
  // The data inputs of an op: its inputs less the trailing count tables.
  std::vector<int> data_inputs(const sim::Op& op) const {
    return std::vector<int>(op.inputs.begin(),
                            op.inputs.end() -
                                static_cast<std::ptrdiff_t>(rc_->attrs_of(op).count_inputs));
  }

  // --- the token layout ----------------------------------------------------------------------
  // The CP coordinate of `rank`, with its ring coordinate moved back by ring_shift and, when
  // ulysses >= 0, its Ulysses coordinate replaced.
  int coord_cp(int rank, int ring_shift, int ulysses = -1) const {
    const sim::MeshView& v = s_.mesh.view(s_.tokens.view);
    int c = 0, scale = 1;
    for (std::size_t i = 0; i < s_.tokens.cp_dims.size(); ++i) {
      const std::string& d = s_.tokens.cp_dims[i];
      int x = v.coord(rank, d);
      if (d == "cp.ring" && ring_shift != 0)
        x = ((x - ring_shift) % v.extent(d) + v.extent(d)) % v.extent(d);
      if (d == "cp.ulysses" && ulysses >= 0)
        x = ulysses;
      c += x * scale;
      scale *= v.extent(d);
    }
    return c;
  }
  int cp_size() const {
    const sim::MeshView& v = s_.mesh.view(s_.tokens.view);
    int n = 1;
    for (const std::string& d : s_.tokens.cp_dims)
      n *= v.extent(d);
    return n;
  }
  // Positions of CP rank `cp`'s chunk of a sequence.
  std::vector<std::int64_t> chunk_positions(int cp) const {
    const int CP = cp_size(), S = s_.tokens.seq_len;
    std::vector<std::int64_t> pos;
    if (CP > 1 && s_.tokens.cp_balanced) {
      const int half = S / (2 * CP);
      for (int t = 0; t < half; ++t)
        pos.push_back(static_cast<std::int64_t>(cp) * half + t);
      for (int t = 0; t < half; ++t)
        pos.push_back(static_cast<std::int64_t>(2 * CP - 1 - cp) * half + t);
    } else {
      const int len = S / CP;
      for (int t = 0; t < len; ++t)
        pos.push_back(static_cast<std::int64_t>(cp) * len + t);
    }
    return pos;
  }
  // Rank r's rows of micro-batch mb (ids or labels), its SP share when `sp`.
  void rows_of(int r, int mb, bool sp, Ints& ids, Ints& labels) const {
    const sim::MeshView& v = s_.mesh.view(s_.tokens.view);
    const int dp = v.extent(s_.tokens.dp_dim), d = v.coord(r, s_.tokens.dp_dim);
    const int first = (mb * dp + d) * s_.tokens.micro_batch;
    const std::vector<std::int64_t> pos = chunk_positions(coord_cp(r, 0));
    std::vector<std::int32_t> ci, cl;
    for (int b = 0; b < s_.tokens.micro_batch; ++b)
      for (auto t : pos) {
        const Index at = sz(first + b) * sz(s_.tokens.seq_len) + sz(t);
        ci.push_back(batch_.tokens[at]);
        cl.push_back(batch_.labels[at]);
      }
    Index lo = 0, n = ci.size();
    if (sp) {
      const int tp = v.extent(s_.tokens.sp_dim);
      n /= sz(tp);
      lo = sz(v.coord(r, s_.tokens.sp_dim)) * n;
    }
    ids.insert(ids.end(), ci.begin() + static_cast<std::ptrdiff_t>(lo),
               ci.begin() + static_cast<std::ptrdiff_t>(lo + n));
    labels.insert(labels.end(), cl.begin() + static_cast<std::ptrdiff_t>(lo),
                  cl.begin() + static_cast<std::ptrdiff_t>(lo + n));
  }
  // Positions of the rows of a [rows, ...] activation of `sequences` sequences.
  Longs row_positions(Index rows, const sim::Attrs& a, int ring_shift) const {
    std::vector<std::int64_t> per;
    if (a.full_sequence) { // the Ulysses group's chunks, in group order
      const int u = s_.mesh.view(s_.tokens.view).extent("cp.ulysses");
      for (int j = 0; j < u; ++j) {
        const auto part = chunk_positions(coord_cp(rank_, ring_shift, j));
        per.insert(per.end(), part.begin(), part.end());
      }
    } else {
      per = chunk_positions(coord_cp(rank_, ring_shift));
    }
    Longs out;
    while (out.size() < rows)
      out.insert(out.end(), per.begin(), per.end());
    out.resize(rows);
    return out;
  }

  // --- ops -----------------------------------------------------------------------------------
  void run(const sim::Op& op) {
    for (int t : op.allocs)
      allocate(t);
    const auto t0 = Clock::now();
    execute(op);
    Kn::sync(); // the op's kernels have finished: its time is theirs, and the host may read

    const std::string key = op_count_key(op);
    auto& timing = sh_.ops[sz(rank_)][key];
    timing.count += 1;
    const auto t1 = Clock::now();
    timing.seconds += std::chrono::duration<double>(t1 - t0).count();
    if (record_)
      sh_.timeline[sz(rank_)][sz(&op - rc_->ops.data())] = sim::OpTiming{clock_s(t0), clock_s(t1)};
    if (o_.trace) {
      double b = 0;
      if (op.kernel == Kernel::collective)
        b = op.kind == OpKind::all_gather ? bytes_of(op.outputs) : bytes_of(data_inputs(op));
      else if (op.kernel != Kernel::tokens)
        b = bytes_of(op.inputs) + bytes_of(op.outputs);
      sh_.trace[sz(rank_)].push_back(ExecutedOp{key, op.group, b});
    }
    for (int t : op.outputs) {
      check_size(t);
      if (!sized_by_[sz(t)].empty())
        resolve_rows(t);
    }
    for (int t : op.frees)
      release(t);
    sh_.peak[sz(rank_)] = peak_;
    if (record_)
      sh_.memory[sz(rank_)].push_back(sim::MemorySample{clock_s(t1), sim::Device::hbm, live_});
  }

  void execute(const sim::Op& op) {
    const std::vector<int>& in = op.inputs;
    const std::vector<int>& out = op.outputs;
    const sim::Attrs& a = rc_->attrs_of(op);
    switch (op.kernel) {
    case Kernel::none:
      throw InputError(
          fmt::format("op '{}' is priced but cannot run on the CPU interpreter", op.name));
    case Kernel::tokens: {
      Ints ids, labels;
      if (op.group >= 0)
        for (int r : comm(op.group).members())
          rows_of(r, op.micro_batch, a.sequence_parallel, ids, labels);
      else
        rows_of(rank_, op.micro_batch, a.sequence_parallel, ids, labels);
      I(out[0]) = std::move(ids);
      I(out[1]) = std::move(labels);
      return;
    }
    case Kernel::embedding_fwd: {
      const ParamBind& pb = table_bind(in[1]);
      const int H = c_.hidden;
      const std::int64_t lo = pb.slice.lo[1], hi = pb.slice.hi[1];
      const auto& ids = I(in[0]);
      const auto& w = R(in[1]);
      auto& y = R(out[0]);
      for (Index r = 0; r < ids.size(); ++r)
        if (ids[r] >= lo && ids[r] < hi)
          std::copy_n(w.begin() + static_cast<std::ptrdiff_t>(sz(ids[r] - lo) * sz(H)), H,
                      y.begin() + static_cast<std::ptrdiff_t>(r * sz(H)));
      return;
    }
    case Kernel::embedding_bwd: {
      const ParamBind& pb = table_bind(out[0]);
      const int H = c_.hidden;
      const std::int64_t lo = pb.slice.lo[1], hi = pb.slice.hi[1];
      const auto& ids = I(in[0]);
      const auto& dy = R(in[1]);
      auto& g = R(out[0]);
      for (Index r = 0; r < ids.size(); ++r)
        if (ids[r] >= lo && ids[r] < hi)
          for (int h = 0; h < H; ++h)
            g[sz(ids[r] - lo) * sz(H) + sz(h)] += dy[r * sz(H) + sz(h)];
      return;
    }
    case Kernel::matmul:
      return matmul(op);
    case Kernel::rmsnorm_fwd: {
      const auto dim = static_cast<int>(R(in[1]).size());
      const int rows = static_cast<int>(R(in[0]).size()) / dim;
      Kn::rmsnorm_fwd(rows, dim, R(in[0]).data(), R(in[1]).data(), a.eps, R(out[0]).data(),
                      R(out[1]).data());
      return;
    }
    case Kernel::rmsnorm_bwd: {
      const auto dim = static_cast<int>(R(in[1]).size());
      const int rows = static_cast<int>(R(in[0]).size()) / dim;
      Kn::rmsnorm_bwd(rows, dim, R(in[0]).data(), R(in[1]).data(), R(in[2]).data(), R(in[3]).data(),
                      R(out[0]).data(), R(out[1]).data());
      return;
    }
    case Kernel::rope: {
      const auto& sh = info(in[0]).shape;
      const auto rows = static_cast<int>(sh[0]);
      const auto pos = row_positions(sz(rows), a, 0);
      R(out[0]) = R(in[0]);
      Kn::rope(rows, static_cast<int>(sh[1]), static_cast<int>(sh[2]), pos.data(), a.theta,
               R(out[0]).data(), a.inverse);
      return;
    }
    case Kernel::swiglu_fwd:
    case Kernel::swiglu_bwd: {
      const auto& gu = R(in[0]);
      const Index rows = actual_rows(in[0]);
      const Index F = cols_of(in[0]) / 2;
      for (Index r = 0; r < rows; ++r) {
        const T* g = gu.data() + r * 2 * F;
        if (op.kernel == Kernel::swiglu_fwd) {
          Kn::swiglu_fwd(F, g, g + F, R(out[0]).data() + r * F);
        } else {
          T* dg = R(out[0]).data() + r * 2 * F;
          Kn::swiglu_bwd(F, g, g + F, R(in[1]).data() + r * F, dg, dg + F);
        }
      }
      return;
    }
    case Kernel::add: {
      auto& y = R(out[0]);
      const auto& x0 = R(in[0]);
      const auto& x1 = R(in[1]);
      for (Index i = 0; i < y.size(); ++i)
        y[i] = x0[i] + x1[i];
      return;
    }
    case Kernel::attention_fwd:
    case Kernel::attention_bwd:
      return attention(op);
    case Kernel::cross_entropy: {
      const auto& sh = info(in[0]).shape;
      const double scale = 1.0 / static_cast<double>(labelled_);
      R(out[1])
      [0] += static_cast<T>(Kn::cross_entropy(static_cast<int>(sh[0]), static_cast<int>(sh[1]),
                                              R(in[0]).data(), I(in[1]).data(), scale,
                                              R(out[0]).data()));
      return;
    }
    case Kernel::ce_max: {
      const auto& sh = info(in[0]).shape;
      const auto V = sz(sh[1]);
      for (Index r = 0; r < sz(sh[0]); ++r)
        R(out[0])
      [r] = *std::max_element(R(in[0]).begin() + static_cast<std::ptrdiff_t>(r * V),
                              R(in[0]).begin() + static_cast<std::ptrdiff_t>((r + 1) * V));
      return;
    }
    case Kernel::ce_sums: {
      const auto& sh = info(in[0]).shape;
      const auto V = sz(sh[1]);
      const auto lo = static_cast<std::int64_t>(comm(op.group).rank()) * sh[1];
      const auto& logits = R(in[0]);
      const auto& mx = R(in[1]);
      const auto& labels = I(in[2]);
      for (Index r = 0; r < sz(sh[0]); ++r) {
        T sum = 0;
        for (Index v = 0; v < V; ++v)
          sum += std::exp(logits[r * V + v] - mx[r]);
        R(out[0])[r] = sum;
        const std::int64_t l = labels[r];
        R(out[1])[r] = l >= lo && l < lo + sh[1] ? logits[r * V + sz(l - lo)] : T(0);
      }
      return;
    }
    case Kernel::ce_finish: {
      const auto& sh = info(in[0]).shape;
      const auto V = sz(sh[1]);
      const Comm& g = comm(op.group);
      const auto lo = static_cast<std::int64_t>(g.rank()) * sh[1];
      const auto rows = sz(sh[0]);
      const Index own = rows / sz(g.size());
      const T scale = static_cast<T>(1.0 / static_cast<double>(labelled_));
      const auto& logits = R(in[0]);
      const auto& mx = R(in[1]);
      const auto& sum = R(in[2]);
      const auto& target = R(in[3]);
      const auto& labels = I(in[4]);
      auto& dl = R(out[0]);
      for (Index r = 0; r < rows; ++r) {
        const std::int64_t label = labels[r];
        if (label < 0)
          continue;
        if (r / own == sz(g.rank()))
          R(out[1])[0] += std::log(sum[r]) + mx[r] - target[r];
        for (Index v = 0; v < V; ++v) {
          const T p = std::exp(logits[r * V + v] - mx[r]) / sum[r];
          dl[r * V + v] = scale * (p - (label == lo + static_cast<std::int64_t>(v) ? T(1) : T(0)));
        }
      }
      return;
    }
    case Kernel::transpose: {
      const auto& x = R(in[0]);
      auto& y = R(out[0]);
      const auto A = sz(a.transpose_a), B = sz(a.transpose_b);
      const Index rest = x.size() / (A * B);
      if (A * B * rest != x.size() || y.size() != x.size())
        bug(fmt::format("op '{}' transposes {} elements as [{}, {}, ...] into {}", op.name,
                        x.size(), A, B, y.size()));
      for (Index i = 0; i < A; ++i)
        for (Index j = 0; j < B; ++j)
          std::copy_n(x.begin() + static_cast<std::ptrdiff_t>((i * B + j) * rest), rest,
                      y.begin() + static_cast<std::ptrdiff_t>((j * A + i) * rest));
      return;
    }
    case Kernel::adamw:
      return adam(op);
    case Kernel::copy:
      if (is_int(in[0])) { // integer tensors (labels cut into the loss's chunks)
        std::vector<std::int32_t> flat;
        for (int t : in)
          flat.insert(flat.end(), I(t).begin(), I(t).end());
        Index at = 0;
        for (int t : out) {
          if (at + I(t).size() > flat.size())
            bug("a copy's outputs are larger than its inputs");
          std::copy_n(flat.begin() + static_cast<std::ptrdiff_t>(at), I(t).size(), I(t).begin());
          at += I(t).size();
        }
        return;
      }
      if (a.accumulate) { // added into the outputs (gradients summed on the host)
        Vec flat = concat(in);
        const Vec was = concat(out);
        if (was.size() != flat.size())
          bug(fmt::format("op '{}' adds {} elements into {}", op.name, flat.size(), was.size()));
        for (Index i = 0; i < flat.size(); ++i)
          flat[i] += was[i];
        return scatter_to(flat, out);
      }
      return scatter_to(concat(in), out);
    case Kernel::zero:
      for (int t : out)
        std::fill(R(t).begin(), R(t).end(), T(0));
      return;
    case Kernel::collective:
      return collective(op);
    case Kernel::router_topk_fwd:
    case Kernel::router_topk_bwd:
    case Kernel::permute:
    case Kernel::permute_bwd:
    case Kernel::unpermute:
    case Kernel::unpermute_bwd:
      return routing(op);
    case Kernel::grouped_matmul:
      return grouped_matmul(op);
    case Kernel::llep_plan:
      return llep_plan(op);
    case Kernel::index_rows:
      return index_rows(op);
    case Kernel::group_copies:
    case Kernel::group_copies_bwd:
      return group_copies(op);
    }
  }

  // --- Least-loaded expert rebalancing (sim::Kernel::llep_plan) ---------------------------------
  // The assignment of workload::least_loaded on the experts' global counts, which every EP rank
  // computes alike, turned into this rank's dispatch order and the count tables of the row and
  // weight exchanges.
  void llep_plan(const sim::Op& op) {
    const sim::Attrs& a = rc_->attrs_of(op);
    const Comm& g = comm(op.group);
    const Longs& counts = L(op.inputs[0]);
    const auto& cs = info(op.inputs[0]).shape;
    const Index ep = sz(cs[0]), E = sz(cs[1]);
    if (op.outputs.size() != 5 || ep != sz(g.size()) || E % ep != 0)
      bug(fmt::format("op '{}' plans {} experts over {} ranks in a group of {}", op.name, E, ep,
                      g.size()));
    const Index per = E / ep, S = E, me = sz(g.rank());
    std::vector<double> tokens(E, 0.0);
    // before[j][e]: expert e's rows routed by the sources before j (where j's rows start in
    // e's global order).
    std::vector<std::vector<std::int64_t>> before(ep + 1, std::vector<std::int64_t>(E, 0));
    for (Index j = 0; j < ep; ++j)
      for (Index e = 0; e < E; ++e) {
        before[j + 1][e] = before[j][e] + counts[j * E + e];
        tokens[e] += static_cast<double>(counts[j * E + e]);
      }
    workload::RebalanceOptions ro;
    ro.threshold = a.threshold;
    ro.capacity = a.capacity;
    ro.min_tokens = a.min_tokens;
    ro.ranks_per_node = a.ranks_per_node;
    ro.whole = true;
    const workload::Rebalanced rb = workload::least_loaded(tokens, static_cast<int>(ep), ro);
    struct Seg {
      Index rank;
      std::int64_t begin, end;
    };
    std::vector<std::vector<Seg>> segs(E);
    std::vector<std::vector<char>> holds(ep, std::vector<char>(E, 0));
    for (const workload::Segment& sg : rb.segments) {
      const Seg x{sz(sg.rank), std::llround(sg.begin), std::llround(sg.end)};
      segs[sz(sg.expert)].push_back(x);
      holds[x.rank][sz(sg.expert)] = 1;
    }
    for (Index e = 0; e < E; ++e) {
      std::int64_t covered = 0;
      for (const Seg& x : segs[e])
        covered += x.end - x.begin;
      if (covered != before[ep][e])
        bug(fmt::format("op '{}': the assignment covers {} of expert {}'s {} rows", op.name,
                        covered, e, before[ep][e]));
    }
    // Slots: a rank's own experts, then the others' experts it holds a segment of.
    std::vector<std::vector<std::int64_t>> slot(ep, std::vector<std::int64_t>(E, -1));
    for (Index d = 0; d < ep; ++d) {
      Index foreign = per;
      for (Index e = 0; e < E; ++e)
        if (e / per == d)
          slot[d][e] = static_cast<std::int64_t>(e - d * per);
        else if (holds[d][e])
          slot[d][e] = static_cast<std::int64_t>(foreign++);
    }
    Ints& order = I(op.outputs[0]);
    Longs& send = L(op.outputs[1]);
    Longs& recv = L(op.outputs[2]);
    Longs& send_copies = L(op.outputs[3]);
    Longs& recv_copies = L(op.outputs[4]);
    if (send.size() != ep * S || recv.size() != ep * S || send_copies.size() != ep * per ||
        recv_copies.size() != ep * per)
      bug(fmt::format("op '{}' writes tables of the wrong sizes", op.name));
    std::fill(send.begin(), send.end(), 0);
    std::fill(recv.begin(), recv.end(), 0);
    std::fill(send_copies.begin(), send_copies.end(), 0);
    std::fill(recv_copies.begin(), recv_copies.end(), 0);
    struct Piece {
      Index dest, slot;
      std::int64_t first, rows; // in my permuted rows
    };
    std::vector<Piece> pieces;
    for (Index j = 0; j < ep; ++j) {
      std::int64_t base = 0; // expert e's first row in j's permuted rows
      for (Index e = 0; e < E; ++e) {
        const std::int64_t lo = before[j][e], hi = before[j + 1][e];
        for (const Seg& x : segs[e]) {
          const std::int64_t b = std::max(lo, x.begin), t = std::min(hi, x.end);
          if (t <= b)
            continue;
          const Index s = sz(slot[x.rank][e]);
          if (j == me) {
            send[x.rank * S + s] += t - b;
            pieces.push_back(Piece{x.rank, s, base + (b - lo), t - b});
          }
          if (x.rank == me)
            recv[j * S + s] += t - b;
        }
        base += hi - lo;
      }
    }
    std::stable_sort(pieces.begin(), pieces.end(), [](const Piece& p, const Piece& q) {
      return p.dest != q.dest ? p.dest < q.dest : p.slot < q.slot;
    });
    Index at = 0;
    for (const Piece& p : pieces)
      for (std::int64_t r = 0; r < p.rows; ++r) {
        if (at >= order.size())
          bug(fmt::format("op '{}' dispatches more rows than its order holds", op.name));
        order[at++] = static_cast<std::int32_t>(p.first + r);
      }
    if (at != order.size())
      bug(fmt::format("op '{}' dispatches {} of its {} rows", op.name, at, order.size()));
    for (Index e = 0; e < E; ++e) {
      const Index owner = e / per;
      for (const Seg& x : segs[e]) {
        if (x.rank == owner)
          continue;
        if (owner == me)
          send_copies[x.rank * per + e - owner * per] = 1;
        if (x.rank == me)
          recv_copies[owner * per + e - owner * per] = 1;
      }
    }
  }

  // y[i] = x[index[i]], or with attrs.inverse y[index[i]] = x[i] (sim::Kernel::index_rows).
  void index_rows(const sim::Op& op) {
    const Vec& x = R(op.inputs[0]);
    const Ints& index = I(op.inputs[1]);
    Vec& y = R(op.outputs[0]);
    const Index cols = cols_of(op.inputs[0]);
    if (!rc_->attrs_of(op).inverse) {
      if (y.size() != index.size() * cols)
        bug(fmt::format("op '{}' gathers {} rows into {} elements", op.name, index.size(),
                        y.size()));
      Kn::gather_rows(static_cast<int>(index.size()), static_cast<int>(cols), x.data(),
                      index.data(), y.data());
      return;
    }
    if (x.size() != index.size() * cols || y.size() != x.size())
      bug(fmt::format("op '{}' scatters {} rows of {} elements into {}", op.name, index.size(),
                      x.size(), y.size()));
    for (Index i = 0; i < index.size(); ++i)
      std::copy_n(x.begin() + static_cast<std::ptrdiff_t>(i * cols), cols,
                  y.begin() + static_cast<std::ptrdiff_t>(sz(index[i]) * cols));
  }

  // Copies of stacked blocks by a count table, and the sum of the copies back into the blocks
  // (sim::Kernel::group_copies, group_copies_bwd).
  void group_copies(const sim::Op& op) {
    const int table = op.inputs.back();
    const Longs& c = L(table);
    const auto groups = sz(info(table).shape.back());
    const bool bwd = op.kernel == Kernel::group_copies_bwd;
    if (op.inputs.size() != op.outputs.size() + 1)
      bug(fmt::format("op '{}' pairs {} inputs with {} outputs", op.name, op.inputs.size() - 1,
                      op.outputs.size()));
    for (Index k = 0; k < op.outputs.size(); ++k) {
      const int x = op.inputs[k], y = op.outputs[k];
      const int stacked = bwd ? y : x, copies = bwd ? x : y;
      const Index block = cols_of(stacked);
      if (cols_of(copies) != block || actual_rows(stacked) != groups)
        bug(fmt::format("op '{}' copies blocks of {} elements into blocks of {}", op.name, block,
                        cols_of(copies)));
      Vec& out = R(y);
      const Vec& in = R(x);
      if (bwd && !rc_->attrs_of(op).accumulate)
        std::fill(out.begin(), out.end(), T(0));
      Index at = 0;
      for (Index i = 0; i < c.size(); ++i)
        for (std::int64_t n = 0; n < c[i]; ++n, ++at) {
          if (at >= actual_rows(copies))
            bug(fmt::format("op '{}': its table holds more copies than '{}'", op.name,
                            info(copies).name));
          const Index g = i % groups;
          if (bwd)
            for (Index v = 0; v < block; ++v)
              out[g * block + v] += in[at * block + v];
          else
            std::copy_n(in.begin() + static_cast<std::ptrdiff_t>(g * block), block,
                        out.begin() + static_cast<std::ptrdiff_t>(at * block));
        }
      if (at != actual_rows(copies))
        bug(fmt::format("op '{}': its table holds {} copies, '{}' {}", op.name, at,
                        info(copies).name, actual_rows(copies)));
    }
  }

  // --- Mixture-of-Experts ----------------------------------------------------------------------
  // The routing kernels (sim::Kernel's router_topk, permute, unpermute and their backwards).
  void routing(const sim::Op& op) {
    const std::vector<int>& in = op.inputs;
    const std::vector<int>& out = op.outputs;
    switch (op.kernel) {
    case Kernel::router_topk_fwd: {
      const auto& sh = info(in[0]).shape;
      Kn::router_topk_fwd(static_cast<int>(sh[0]), static_cast<int>(sh[1]), rc_->attrs_of(op).top_k,
                          rc_->attrs_of(op).normalize, R(in[0]).data(), R(out[0]).data(),
                          I(out[1]).data(), R(out[2]).data());
      return;
    }
    case Kernel::router_topk_bwd: {
      const auto& sh = info(in[0]).shape;
      Kn::router_topk_bwd(static_cast<int>(sh[0]), static_cast<int>(sh[1]), rc_->attrs_of(op).top_k,
                          rc_->attrs_of(op).normalize, R(in[0]).data(), I(in[1]).data(),
                          R(in[2]).data(), R(out[0]).data());
      return;
    }
    case Kernel::permute: {
      const auto dim = sz(info(in[0]).shape[1]);
      const auto& idx = I(in[1]);
      const auto k = static_cast<std::int32_t>(info(in[1]).shape[1]);
      auto& order = I(out[1]);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(),
                       [&](std::int32_t a, std::int32_t b) { return idx[sz(a)] < idx[sz(b)]; });
      auto& counts = L(out[2]);
      std::fill(counts.begin(), counts.end(), 0);
      Ints rows(order.size());
      for (Index i = 0; i < order.size(); ++i) {
        rows[i] = order[i] / k;
        counts[sz(idx[sz(order[i])])] += 1;
      }
      Kn::gather_rows(static_cast<int>(rows.size()), static_cast<int>(dim), R(in[0]).data(),
                      rows.data(), R(out[0]).data());
      return;
    }
    case Kernel::permute_bwd: {
      const auto dim = info(in[0]).shape[1];
      const auto& order = I(in[1]);
      auto& dx = R(out[0]);
      const auto k = static_cast<std::int32_t>(order.size() / (dx.size() / sz(dim)));
      if (!rc_->attrs_of(op).accumulate)
        std::fill(dx.begin(), dx.end(), T(0));
      Ints rows(order.size());
      for (Index i = 0; i < order.size(); ++i)
        rows[i] = order[i] / k;
      Kn::scatter_add_rows(static_cast<int>(rows.size()), static_cast<int>(dim), R(in[0]).data(),
                           rows.data(), dx.data());
      return;
    }
    case Kernel::unpermute: {
      const auto dim = sz(info(in[0]).shape[1]);
      const auto& y = R(in[0]);
      const auto& order = I(in[1]);
      const auto& w = R(in[2]);
      const auto k = static_cast<std::int32_t>(info(in[2]).shape[1]);
      auto& o = R(out[0]);
      std::fill(o.begin(), o.end(), T(0));
      for (Index i = 0; i < order.size(); ++i) {
        const Index row = sz(order[i] / k);
        const T wgt = w[sz(order[i])];
        for (Index h = 0; h < dim; ++h)
          o[row * dim + h] += wgt * y[i * dim + h];
      }
      return;
    }
    case Kernel::unpermute_bwd: {
      const auto dim = sz(info(in[0]).shape[1]);
      const auto& dout = R(in[0]);
      const auto& y = R(in[1]);
      const auto& order = I(in[2]);
      const auto& w = R(in[3]);
      const auto k = static_cast<std::int32_t>(info(in[3]).shape[1]);
      auto& dy = R(out[0]);
      auto& dw = R(out[1]);
      for (Index i = 0; i < order.size(); ++i) {
        const Index row = sz(order[i] / k);
        const T wgt = w[sz(order[i])];
        T dot = 0;
        for (Index h = 0; h < dim; ++h) {
          dy[i * dim + h] = wgt * dout[row * dim + h];
          dot += dout[row * dim + h] * y[i * dim + h];
        }
        dw[sz(order[i])] = dot;
      }
      return;
    }
    default:
      bug(fmt::format("op '{}' is not a routing kernel", op.name));
    }
  }

  // The group of each row of a row-segmented operand of `rows` rows, from the count table
  // (sim::Kernel::grouped_matmul); -1 for padding rows.
  std::vector<int> row_groups(int table, bool padded, Index rows) const {
    const Longs& c = longs_[sz(table)];
    const auto& ts = info(table).shape;
    const auto groups = static_cast<std::size_t>(ts.back());
    const Index blocks = padded ? sz(ts[0]) : 1;
    const Index per = c.size() / blocks, block_rows = rows / blocks;
    std::vector<int> out(rows, -1);
    for (Index b = 0; b < blocks; ++b) {
      Index r = b * block_rows;
      for (Index i = 0; i < per; ++i)
        for (std::int64_t n = 0; n < c[b * per + i]; ++n) {
          if (r >= (b + 1) * block_rows)
            bug(fmt::format("count table '{}' holds more rows than its operand", info(table).name));
          out[r++] = static_cast<int>(i % groups);
        }
      if (!padded && r != rows)
        bug(fmt::format("count table '{}' holds {} rows, its operand {}", info(table).name, r,
                        rows));
    }
    return out;
  }

  // Per group: the rows of `m` (rows x cols) at `sel`, and back.
  static Vec take_rows(const Vec& m, Index cols, const Ints& sel) {
    Vec out(sel.size() * cols);
    Kn::gather_rows(static_cast<int>(sel.size()), static_cast<int>(cols), m.data(), sel.data(),
                    out.data());
    return out;
  }
  // Group g's matrix of a list of stacked [G, rows, cols] tensors, side by side.
  Vec group_matrix(const std::vector<int>& ts, Index g, Index& rows, Index& cols) {
    rows = sz(info(ts[0]).shape[1]);
    cols = 0;
    for (int t : ts)
      cols += sz(info(t).shape[2]);
    Vec m(rows * cols);
    Index c0 = 0;
    for (int t : ts) {
      const Index w = sz(info(t).shape[2]);
      for (Index r = 0; r < rows; ++r)
        std::copy_n(R(t).begin() + static_cast<std::ptrdiff_t>((g * rows + r) * w), w,
                    m.begin() + static_cast<std::ptrdiff_t>(r * cols + c0));
      c0 += w;
    }
    return m;
  }
  void set_group_matrix(const std::vector<int>& ts, Index g, const Vec& m) {
    const Index rows = sz(info(ts[0]).shape[1]);
    Index cols = 0;
    for (int t : ts)
      cols += sz(info(t).shape[2]);
    Index c0 = 0;
    for (int t : ts) {
      const Index w = sz(info(t).shape[2]);
      for (Index r = 0; r < rows; ++r)
        std::copy_n(m.begin() + static_cast<std::ptrdiff_t>(r * cols + c0), w,
                    R(t).begin() + static_cast<std::ptrdiff_t>((g * rows + r) * w));
      c0 += w;
    }
  }

  void grouped_matmul(const sim::Op& op) {
    const sim::Attrs& a = rc_->attrs_of(op);
    const auto na = sz(a.a_blocks);
    const int table = op.inputs.back();
    const std::vector<int> as(op.inputs.begin(),
                              op.inputs.begin() + static_cast<std::ptrdiff_t>(na));
    const std::vector<int> bs(op.inputs.begin() + static_cast<std::ptrdiff_t>(na),
                              op.inputs.end() - 1);
    Index ar = 0, ac = 0;
    const Vec A = side_by_side(as, ar, ac);
    const std::vector<int> group = row_groups(table, info(as[0]).rows.padded, ar);
    // The table's groups this op computes: first .. first + groups, the stacked operand's
    // groups 0 .. groups; a stacked operand of runtime rows (received expert copies) holds
    // `held` of them, and the groups beyond must have no rows.
    const auto first = sz(a.group_first);
    const Index groups =
        a.group_count > 0 ? sz(a.group_count) : sz(info(table).shape.back()) - first;
    const Index held = actual_rows(a.trans_a ? op.outputs[0] : bs[0]);
    auto rows_of_group = [&](Index g) {
      Ints sel;
      for (Index r = 0; r < ar; ++r)
        if (group[r] == static_cast<int>(first + g))
          sel.push_back(static_cast<std::int32_t>(r));
      if (g >= held && !sel.empty())
        bug(fmt::format("op '{}' has rows of group {}, beyond the {} groups it holds", op.name,
                        first + g, held));
      return sel;
    };
    if (a.trans_a) { // C[g] (+)= A[rows of g]ᵀ · B[rows of g]
      Index br = 0, bc = 0;
      const Vec B = side_by_side(bs, br, bc);
      for (Index g = 0; g < std::min(groups, held); ++g) {
        const Ints sel = rows_of_group(g);
        Index cr = 0, cc = 0;
        Vec C = group_matrix(op.outputs, g, cr, cc);
        if (cr != ac || cc != bc)
          bug(fmt::format("op '{}' computes [{}x{}] per group into [{}x{}]", op.name, ac, bc, cr,
                          cc));
        if (!a.accumulate)
          std::fill(C.begin(), C.end(), T(0));
        if (!sel.empty()) {
          const Vec x = take_rows(A, ac, sel), y = take_rows(B, bc, sel);
          Kn::gemm(static_cast<int>(ac), static_cast<int>(bc), static_cast<int>(sel.size()),
                   x.data(), true, y.data(), false, C.data(), true);
          Kn::sync(); // the host reads C next
        }
        set_group_matrix(op.outputs, g, C);
      }
      for (Index g = held; g < groups; ++g)
        rows_of_group(g);
      return;
    }
    // C[rows of g] = A[rows of g] · op(B[g])
    Index cr = 0, cc = 0;
    Vec C = side_by_side(op.outputs, cr, cc);
    if (!a.accumulate)
      std::fill(C.begin(), C.end(), T(0));
    for (Index g = 0; g < groups; ++g) {
      const Ints sel = rows_of_group(g);
      if (sel.empty())
        continue;
      Index br = 0, bc = 0;
      const Vec B = group_matrix(bs, g, br, bc);
      const Index k = a.trans_b ? bc : br, n = a.trans_b ? br : bc;
      if (k != ac || n != cc || cr != ar)
        bug(fmt::format("op '{}' multiplies [{}x{}] by [{}x{}] into [{}x{}]", op.name, ar, ac, k, n,
                        cr, cc));
      const Vec x = take_rows(A, ac, sel);
      Vec y(sel.size() * n, T(0));
      Kn::gemm(static_cast<int>(sel.size()), static_cast<int>(n), static_cast<int>(k), x.data(),
               false, B.data(), a.trans_b, y.data(), false);
      Kn::sync(); // the host adds y next
      for (Index i = 0; i < sel.size(); ++i)
        for (Index j = 0; j < n; ++j)
          C[sz(sel[i]) * n + j] += y[i * n + j];
    }
    Index c0 = 0;
    for (int t : op.outputs) {
      const Index w = cols_of(t);
      for (Index r = 0; r < cr; ++r)
        std::copy_n(C.begin() + static_cast<std::ptrdiff_t>(r * cc + c0), w,
                    R(t).begin() + static_cast<std::ptrdiff_t>(r * w));
      c0 += w;
    }
  }

  const ParamBind& table_bind(int t) const {
    const int p = info(t).param;
    if (p < 0)
      bug(fmt::format("the embedding op's table '{}' is not a parameter", info(t).name));
    return pb_[sz(p)];
  }

  // A list of tensors read as one matrix: rows = shape[0] of each, columns side by side.
  Vec side_by_side(const std::vector<int>& ts, Index& rows, Index& cols) {
    rows = actual_rows(ts[0]);
    cols = 0;
    for (int t : ts)
      cols += cols_of(t);
    if (ts.size() == 1)
      return R(ts[0]);
    Vec m(rows * cols);
    Index c0 = 0;
    for (int t : ts) {
      const Index w = cols_of(t);
      for (Index r = 0; r < rows; ++r)
        std::copy_n(R(t).begin() + static_cast<std::ptrdiff_t>(r * w), w,
                    m.begin() + static_cast<std::ptrdiff_t>(r * cols + c0));
      c0 += w;
    }
    return m;
  }

  void matmul(const sim::Op& op) {
    const sim::Attrs& a = rc_->attrs_of(op);
    const auto na = sz(a.a_blocks);
    const std::vector<int> as(op.inputs.begin(),
                              op.inputs.begin() + static_cast<std::ptrdiff_t>(na));
    const std::vector<int> bs(op.inputs.begin() + static_cast<std::ptrdiff_t>(na), op.inputs.end());
    Index ar = 0, ac = 0, br = 0, bc = 0, cr = 0, cc = 0;
    const Vec A = side_by_side(as, ar, ac);
    const Vec B = side_by_side(bs, br, bc);
    Vec C = side_by_side(op.outputs, cr, cc);
    const Index m = a.trans_a ? ac : ar, k = a.trans_a ? ar : ac, n = a.trans_b ? br : bc;
    if ((a.trans_b ? bc : br) != k || cr != m || cc != n)
      bug(fmt::format("op '{}' multiplies [{}x{}] by [{}x{}] into [{}x{}]", op.name, m, k,
                      a.trans_b ? bc : br, n, cr, cc));
    Kn::gemm(static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), A.data(), a.trans_a,
             B.data(), a.trans_b, C.data(), a.accumulate);
    Kn::sync(); // the host copies C into the outputs next
    Index c0 = 0;
    for (int t : op.outputs) {
      const Index w = cols_of(t);
      for (Index r = 0; r < cr; ++r)
        std::copy_n(C.begin() + static_cast<std::ptrdiff_t>(r * cc + c0), w,
                    R(t).begin() + static_cast<std::ptrdiff_t>(r * w));
      c0 += w;
    }
  }

  void attention(const sim::Op& op) {
    const sim::Attrs& at = rc_->attrs_of(op);
    const auto& qs = info(op.inputs[0]).shape;
    const auto& ks = info(op.inputs[1]).shape;
    AttentionParams p;
    p.heads = static_cast<int>(qs[1]);
    p.kv_heads = static_cast<int>(ks[1]);
    p.qk_dim = static_cast<int>(qs[2]);
    p.v_dim = static_cast<int>(info(op.inputs[2]).shape[2]);
    p.causal = at.causal;
    p.window = at.window;
    p.scale = at.scale;
    const int B = at.sequences;
    const int tq = static_cast<int>(qs[0]) / B, tk = static_cast<int>(ks[0]) / B;
    const auto qpos = row_positions(sz(tq), at, 0);
    const auto kpos = row_positions(sz(tk), at, at.ring_step);
    const Index qh = sz(p.heads) * sz(p.qk_dim), kh = sz(p.kv_heads) * sz(p.qk_dim),
                vh = sz(p.kv_heads) * sz(p.v_dim), oh = sz(p.heads) * sz(p.v_dim);
    const auto& q = R(op.inputs[0]);
    const auto& k = R(op.inputs[1]);
    const auto& v = R(op.inputs[2]);
    for (int b = 0; b < B; ++b) {
      const Index rq = sz(b) * sz(tq), rk = sz(b) * sz(tk);
      if (op.kernel == Kernel::attention_fwd) {
        T* o = R(op.outputs[0]).data() + rq * oh;
        T* lse = R(op.outputs[1]).data() + rq * sz(p.heads);
        if (at.ring_step == 0) {
          Kn::attention_fwd(p, tq, tk, q.data() + rq * qh, k.data() + rk * kh, v.data() + rk * vh,
                            qpos.data(), kpos.data(), o, lse);
        } else {
          Vec po(sz(tq) * oh), pl(sz(tq) * sz(p.heads));
          Kn::attention_fwd(p, tq, tk, q.data() + rq * qh, k.data() + rk * kh, v.data() + rk * vh,
                            qpos.data(), kpos.data(), po.data(), pl.data());
          Kn::attention_merge(tq, p.heads, p.v_dim, o, lse, po.data(), pl.data());
        }
      } else {
        const auto& o = R(op.inputs[3]);
        const auto& lse = R(op.inputs[4]);
        const auto& dout = R(op.inputs[5]);
        Kn::attention_bwd(p, tq, tk, q.data() + rq * qh, k.data() + rk * kh, v.data() + rk * vh,
                          qpos.data(), kpos.data(), o.data() + rq * oh,
                          lse.data() + rq * sz(p.heads), dout.data() + rq * oh,
                          R(op.outputs[0]).data() + rq * qh, R(op.outputs[1]).data() + rk * kh,
                          R(op.outputs[2]).data() + rk * vh);
      }
    }
  }

  // Flat concatenation of a list of tensors, and its inverse.
  Vec concat(const std::vector<int>& ts) {
    Vec out;
    for (int t : ts)
      out.insert(out.end(), R(t).begin(), R(t).end());
    return out;
  }
  void scatter_to(const Vec& flat, const std::vector<int>& ts) {
    Index at = 0;
    for (int t : ts) {
      auto& y = R(t);
      if (at + y.size() > flat.size())
        bug("a collective's outputs are larger than what it produced");
      std::copy_n(flat.begin() + static_cast<std::ptrdiff_t>(at), y.size(), y.begin());
      at += y.size();
    }
  }

  // The rank at this rank's place in the stage of rank class c.
  int peer_rank(int c) const {
    const sim::MeshView& v = s_.mesh.view(s_.tokens.view);
    const int stage = s_.classes[sz(c)].stage;
    return rank_ + (stage - v.coord(rank_, "pp")) * v.stride("pp");
  }

  // Pipeline point to point: the message carries the send's op index after its payload, and
  // the recv checks it is the send its first remote dependency names (a Schedule pairing
  // them wrongly fails here instead of training on the wrong activations).
  void point_to_point(const sim::Op& op) {
    const int peer = peer_rank(op.peer_class);
    if (op.kind == OpKind::send) {
      Vec msg = concat(op.inputs);
      msg.push_back(static_cast<T>(&op - rc_->ops.data()));
      w_.send(rank_, peer, msg.data(), msg.size());
      return;
    }
    Index n = 0;
    for (int t : op.outputs)
      n += R(t).size();
    Vec msg(n + 1);
    w_.recv(rank_, peer, msg.data(), msg.size());
    const auto sent_by = static_cast<int>(msg.back());
    if (op.remote_deps.empty() || op.remote_deps.front().op != sent_by)
      bug(fmt::format("op '{}' of rank {} received the message of op {} of rank {}", op.name, rank_,
                      sent_by, peer));
    msg.pop_back();
    scatter_to(msg, op.outputs);
  }

  // Count tables move as integers: an equal all-to-all (the EP count exchange) or an
  // all-gather (ETP's tables).
  void count_collective(const sim::Op& op) {
    const Comm& g = comm(op.group);
    const auto n = sz(g.size());
    const Longs& x = L(op.inputs[0]);
    Longs& y = L(op.outputs[0]);
    if (op.inputs.size() != 1 || op.outputs.size() != 1 || !is_long(op.outputs[0]))
      bug(fmt::format("op '{}' moves count tables other than one to one", op.name));
    if (op.kind == OpKind::all_gather) {
      if (y.size() != x.size() * n)
        bug(fmt::format("op '{}' gathers {} counts into {}", op.name, x.size(), y.size()));
      g.all_gather(x.data(), x.size(), y.data());
      return;
    }
    if (op.kind != OpKind::all_to_all || x.size() % n != 0 || y.size() != x.size())
      bug(fmt::format("op '{}': the interpreter moves count tables by an equal all-to-all or an "
                      "all-gather only",
                      op.name));
    const std::vector<std::size_t> parts(n, x.size() / n);
    g.all_to_all_v(x.data(), parts, y.data(), parts);
  }

  // Rows sent to (or received from) each group rank: the sums of the table's group-size parts,
  // times the columns of a row.
  std::vector<std::size_t> split_of(int table, Index n, Index cols) const {
    const Longs& c = longs_[sz(table)];
    std::vector<std::size_t> out(n, 0);
    const Index per = c.size() / n;
    for (Index j = 0; j < n; ++j)
      for (Index i = 0; i < per; ++i)
        out[j] += sz(c[j * per + i]) * cols;
    return out;
  }

  void collective(const sim::Op& op) {
    if (op.kind == OpKind::send || op.kind == OpKind::recv)
      return point_to_point(op);
    if (is_long(op.inputs[0]))
      return count_collective(op);
    const Comm& g = comm(op.group);
    const auto n = sz(g.size());
    const std::vector<int> data = data_inputs(op);
    Vec x = concat(data);
    switch (op.kind) {
    case OpKind::all_gather: {
      // Into padded runtime rows, each rank's part is 1/group of the output (sim::Kernel).
      if (info(op.outputs[0]).rows.padded) {
        Index total = 0;
        for (int t : op.outputs)
          total += R(t).size();
        if (x.size() > total / n)
          bug(fmt::format("op '{}' gathers more rows than its padded output holds", op.name));
        x.resize(total / n, T(0));
      }
      Vec y(x.size() * n);
      g.all_gather(x.data(), x.size(), y.data());
      return scatter_to(y, op.outputs);
    }
    case OpKind::all_to_all: {
      std::vector<std::size_t> send(n, x.size() / n), recv = send;
      if (rc_->attrs_of(op).count_inputs == 2) {
        const auto& sh = info(data[0]).shape;
        const Index cols = sz(numel(sh) / sh[0]);
        send = split_of(op.inputs[op.inputs.size() - 2], n, cols);
        recv = split_of(op.inputs.back(), n, cols);
      } else if (x.size() % n != 0) {
        bug(fmt::format("op '{}' cuts {} elements into {} equal parts", op.name, x.size(), n));
      }
      Index total = 0;
      for (auto r : recv)
        total += r;
      Vec y(total);
      g.all_to_all_v(x.data(), send, y.data(), recv);
      return scatter_to(y, op.outputs);
    }
    case OpKind::reduce_scatter: {
      const Index chunk = (x.size() + n - 1) / n;
      x.resize(chunk * n, T(0));
      Vec y(chunk);
      g.reduce_scatter(x.data(), chunk, y.data());
      if (rc_->attrs_of(op)
              .accumulate) { // summed into the outputs (a gradient shard over micro-batches)
        const Vec was = concat(op.outputs);
        for (Index i = 0; i < std::min(was.size(), y.size()); ++i)
          y[i] += was[i];
      }
      return scatter_to(y, op.outputs);
    }
    case OpKind::all_reduce:
      if (rc_->attrs_of(op).reduce_max)
        g.all_reduce_max(x.data(), x.size());
      else
        g.all_reduce(x.data(), x.size());
      return scatter_to(x, op.outputs);
    case OpKind::send_recv: {
      Vec y(x.size());
      g.send_recv_ring(x.data(), y.data(), x.size(), 1);
      return scatter_to(y, op.outputs);
    }
    default:
      bug(fmt::format("op '{}': the interpreter does not run {} yet", op.name,
                      sim::op_kind_name(op.kind)));
    }
  }

  // AdamW over what this rank owns of the bucket (see sim::Kernel::adamw).
  void adam(const sim::Op& op) {
    const auto np = sz(rc_->attrs_of(op).params);
    const std::vector<int> ps(op.inputs.begin(),
                              op.inputs.begin() + static_cast<std::ptrdiff_t>(np));
    const std::vector<int> gs(op.inputs.begin() + static_cast<std::ptrdiff_t>(np),
                              op.inputs.end() - 2);
    const int mt = op.inputs[op.inputs.size() - 2], vt = op.inputs.back();
    const int b = info(mt).bucket;
    const BucketBind& bb = bb_[sz(b)];
    auto owned = [&](const std::vector<int>& ts) {
      Vec flat = concat(ts);
      if (bb.sharded && static_cast<std::int64_t>(flat.size()) == bb.n)
        return shard_of(b, flat);
      return flat;
    };
    Vec p = owned(ps);
    const Vec gr = owned(gs);
    const std::int64_t count = bb.sharded ? std::min(bb.n, bb.lo + bb.chunk) - bb.lo : bb.n;
    Kn::adamw(sz(count), o_.adam, adam_count_, p.data(), gr.data(), R(mt).data(), R(vt).data());
    Kn::sync(); // the host copies p into the outputs next
    const std::vector<int> outs(op.outputs.begin(), op.outputs.end() - 2);
    scatter_to(p, outs);
  }
};

} // namespace detail

// interpret (interpreter.hpp) with the kernels and storage of backend K.
//
// Every rank keeps its own copy of what the run reports (Shared) and writes there only what it
// holds; the ranks then all-reduce those copies, so every rank holds the whole result, whether
// the ranks are threads of this process or processes of a world (`process`): one way of
// gathering, the same bits. What one rank owns (its loss part, its ops' times, its peak) is
// written into zeroes and summed (x + 0 = x). Gradients and state are written by every rank that
// holds them (replicas hold the same bits) into -inf and max-reduced; an element no rank wrote
// keeps its start (a state) or zero (a gradient).
template <class T, template <class> class K>
RunResult<T> interpret_with(const sim::Schedule& s, const TinyConfig& c, const DataSource& data,
                            const TrainState<T>& start, const RunOptions& o,
                            World* process = nullptr) {
  using namespace detail;
  check_interpretable(s, c);
  data.check_sequence_length(s.tokens.seq_len);
  if (o.steps < 1)
    throw InputError("the number of steps must be at least 1");
  const auto layout = param_layout(c);
  if (start.params.size() != layout.size())
    throw InputError("the starting state does not match the model's parameters");
  if (process != nullptr && process->size() != s.world)
    throw InputError(fmt::format("the plan runs on {} ranks but {} {} started", s.world,
                                 process->size(),
                                 process->size() == 1 ? "process was" : "processes were"));
  if (process != nullptr && o.trace)
    throw InputError("the executed-op trace is recorded only when the ranks are threads of one "
                     "process");
  const auto world = sz(s.world);
  const T unwritten = -std::numeric_limits<T>::infinity();
  // Every op kind the Schedule holds, in one order on every rank (the times' all-reduce).
  std::vector<std::string> keys;
  for (const sim::RankClass& rc : s.classes)
    for (const sim::Op& op : rc.ops)
      keys.push_back(op_count_key(op));
  std::sort(keys.begin(), keys.end());
  keys.erase(std::unique(keys.begin(), keys.end()), keys.end());
  // Each rank's ops in the flattened timeline: the ops of its stage's class.
  std::vector<std::size_t> timeline_at(world + 1, 0);
  for (std::size_t r = 0; r < world; ++r) {
    const sim::RankClass* rc = class_of_rank(s, static_cast<int>(r));
    timeline_at[r + 1] = timeline_at[r] + (rc != nullptr ? rc->ops.size() : 0);
  }

  RunResult<T> res;
  std::unique_ptr<ReferenceTrainer<double>> ref;
  const bool lead_process = process == nullptr || process->process_rank() == 0;
  if (o.check && lead_process)
    ref = std::make_unique<ReferenceTrainer<double>>(c, to_double(start), o.adam);
  std::vector<int> everyone(world);
  std::iota(everyone.begin(), everyone.end(), 0);
  std::vector<std::vector<ExecutedOp>> traces(world);
  std::vector<std::vector<std::vector<std::int64_t>>> runtime_rows(world);

  const auto body = [&](World& w, int r) {
    const auto me = sz(r);
    Shared<T> sh;
    sh.state = start;
    for (const auto& p : start.params)
      sh.grads.emplace_back(p.size(), T(0));
    sh.loss_part.assign(world, 0.0);
    sh.ops.resize(world);
    sh.peak.assign(world, 0.0);
    sh.trace.resize(world);
    sh.runtime_rows.resize(world);
    sh.timeline.resize(world);
    sh.memory.resize(world);
    RankInterpreter<T, K> rank(w, r, s, c, sh, o, data);
    const Comm all = w.group(everyone, r);
    // Only one rank of an in-process world fills the result; every process of a world of
    // processes fills its own.
    const bool lead = process != nullptr || r == 0;
    double origin = 0; // this rank's clock when the recorded step started
    for (int k = 0; k < o.steps; ++k) {
      const bool recording = o.timeline && k + 1 == o.steps;
      const bool want_grads = o.check || k + 1 == o.steps;
      rank.record(recording);
      all.barrier(); // the ranks start the step together: its time, the trace's common origin
      const auto t0 = Clock::now();
      if (recording)
        origin = clock_s(t0);
      std::fill(sh.loss_part.begin(), sh.loss_part.end(), 0.0);
      for (auto& g : sh.grads)
        std::fill(g.begin(), g.end(), unwritten);
      rank.step(start.step + k);
      all.all_reduce(sh.loss_part.data(), world); // also the step's end on every rank
      const double step_s = std::chrono::duration<double>(Clock::now() - t0).count();
      if (want_grads)
        for (auto& g : sh.grads) {
          all.all_reduce_max(g.data(), g.size());
          for (T& x : g)
            x = x == unwritten ? T(0) : x;
        }
      if (!lead)
        continue;
      res.step_time_s.push_back(step_s);
      const Batch batch = data.batch(start.step + k, s.tokens.global_batch, s.tokens.seq_len);
      double labelled = 0, loss = 0;
      for (auto l : batch.labels)
        labelled += l >= 0 ? 1 : 0;
      for (double part : sh.loss_part)
        loss += part;
      loss /= labelled;
      res.losses.push_back(loss);
      if (ref) {
        const double want = ref->step(batch);
        res.max_loss_rel_diff =
            std::max(res.max_loss_rel_diff, std::abs(loss - want) / std::abs(want));
        res.max_grad_rel_diff =
            std::max(res.max_grad_rel_diff, max_rel_diff(sh.grads, ref->grads()));
      }
      if (k + 1 == o.steps)
        res.last_grads = sh.grads;
    }
    // The final state.
    for (auto* list : {&sh.state.params, &sh.state.adam_m, &sh.state.adam_v})
      for (auto& v : *list)
        std::fill(v.begin(), v.end(), unwritten);
    rank.finish_run();
    const TrainState<T>* from = &start;
    for (auto [list, first] : {std::pair{&sh.state.params, &from->params},
                               std::pair{&sh.state.adam_m, &from->adam_m},
                               std::pair{&sh.state.adam_v, &from->adam_v}})
      for (std::size_t i = 0; i < list->size(); ++i) {
        auto& v = (*list)[i];
        all.all_reduce_max(v.data(), v.size());
        for (std::size_t j = 0; j < v.size(); ++j)
          v[j] = v[j] == unwritten ? (*first)[i][j] : v[j];
      }
    // Op times and counts by kind, peaks.
    std::vector<std::int64_t> counts(keys.size(), 0);
    std::vector<double> seconds(keys.size(), 0.0);
    for (const auto& [key, t] : sh.ops[me]) {
      const auto at = sz(std::lower_bound(keys.begin(), keys.end(), key) - keys.begin());
      counts[at] = t.count;
      seconds[at] = t.seconds;
    }
    all.all_reduce(counts.data(), counts.size());
    all.all_reduce(seconds.data(), seconds.size());
    all.all_reduce(sh.peak.data(), world);
    // The last step's timeline, in seconds from this rank's start of the step (-1: not run),
    // and the memory samples (their counts first).
    std::vector<double> times;
    std::vector<std::int64_t> samples(world, 0);
    if (o.timeline) {
      times.assign(2 * timeline_at[world], 0.0);
      const auto& mine = sh.timeline[me];
      if (mine.size() != timeline_at[me + 1] - timeline_at[me])
        bug(fmt::format("rank {} timed {} ops, its class holds {}", r, mine.size(),
                        timeline_at[me + 1] - timeline_at[me]));
      for (std::size_t i = 0; i < mine.size(); ++i) {
        const bool ran = mine[i].start_s >= 0;
        times[2 * (timeline_at[me] + i)] = ran ? mine[i].start_s - origin : -1;
        times[2 * (timeline_at[me] + i) + 1] = ran ? mine[i].end_s - origin : -1;
      }
      all.all_reduce(times.data(), times.size());
      samples[me] = static_cast<std::int64_t>(sh.memory[me].size());
      all.all_reduce(samples.data(), world);
    }
    std::vector<std::size_t> sample_at(world + 1, 0);
    for (std::size_t q = 0; q < world; ++q)
      sample_at[q + 1] = sample_at[q] + sz(samples[q]);
    std::vector<double> memory(2 * sample_at[world], 0.0);
    if (o.timeline) {
      for (std::size_t i = 0; i < sh.memory[me].size(); ++i) {
        memory[2 * (sample_at[me] + i)] = sh.memory[me][i].time_s - origin;
        memory[2 * (sample_at[me] + i) + 1] = sh.memory[me][i].bytes;
      }
      all.all_reduce(memory.data(), memory.size());
    }
    traces[me] = std::move(sh.trace[me]);
    runtime_rows[me] = std::move(sh.runtime_rows[me]);
    if (!lead)
      return;
    res.state = std::move(sh.state);
    for (std::size_t i = 0; i < keys.size(); ++i)
      if (counts[i] > 0)
        res.ops[keys[i]] = OpTiming{counts[i], seconds[i] / s.world};
    res.peak_bytes = std::move(sh.peak);
    if (o.timeline) { // seconds from the earliest start over all ranks
      double first = std::numeric_limits<double>::infinity();
      for (std::size_t i = 0; i < timeline_at[world]; ++i)
        if (times[2 * i] >= 0)
          first = std::min(first, times[2 * i]);
      if (!std::isfinite(first))
        first = 0;
      res.timeline.assign(world, {});
      res.memory_timeline.assign(world, {});
      for (std::size_t q = 0; q < world; ++q) {
        for (std::size_t i = timeline_at[q]; i < timeline_at[q + 1]; ++i)
          res.timeline[q].push_back(times[2 * i] >= 0 ? sim::OpTiming{times[2 * i] - first,
                                                                      times[2 * i + 1] - first}
                                                      : sim::OpTiming{});
        for (std::size_t i = sample_at[q]; i < sample_at[q + 1]; ++i)
          res.memory_timeline[q].push_back(
              sim::MemorySample{memory[2 * i] - first, sim::Device::hbm, memory[2 * i + 1]});
      }
    }
  };

  if (process == nullptr) {
    World::run(s.world, body);
  } else {
    try {
      // Every group this rank may use, in the Schedule's order (the same count on every rank).
      const int me = process->process_rank();
      std::vector<std::vector<int>> groups{everyone};
      for (const sim::Group& g : s.groups)
        if (!g.spec.view.empty())
          groups.push_back(s.mesh.view(g.spec.view).members(me, g.spec));
      process->prepare(groups);
      body(*process, me);
    } catch (const std::exception& e) {
      process->abort(fmt::format("rank {} failed: {}", process->process_rank(), e.what()));
      throw;
    }
  }

  res.state.step = start.step + o.steps;
  if (ref)
    res.max_param_rel_diff = max_rel_diff(res.state.params, ref->state().params);
  for (const sim::RankClass& rc : s.classes)
    for (const sim::Op& op : rc.ops)
      res.scheduled[op_count_key(op)] += static_cast<std::int64_t>(rc.multiplicity) * o.steps;
  if (o.trace) {
    res.trace = std::move(traces);
    res.runtime_rows = std::move(runtime_rows);
  }
  return res;
}

} // namespace mop::real
