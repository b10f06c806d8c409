#include "real_backend/cpu/executor.hpp"

#include "common/error.hpp"
#include "real_backend/cpu/comm.hpp"
#include "real_backend/cpu/reference.hpp"
#include "real_backend/cpu/slice.hpp"
#include "strategies/mesh.hpp"
#include "strategies/pipeline.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <deque>
#include <fmt/format.h>
#include <functional>
#include <numeric>

namespace mop::real {

using strategy::CpKind;
using strategy::LayerKind;
using strategy::OptimizerOverlap;
using strategy::Plan;
using strategy::Recompute;

namespace {

using Clock = std::chrono::steady_clock;
using Index = std::size_t;

Index sz(std::int64_t v) {
  return static_cast<Index>(v);
}

[[noreturn]] void refuse(const std::string& sentence) {
  throw InputError(sentence);
}

// ---------------------------------------------------------------------------------------------
// Shared by the ranks of one run: the full state they start from and write back, the gathered
// gradients, and the per-rank loss and timing figures.
template <class T> struct Shared {
  TrainState<T> state;
  std::vector<std::vector<T>> grads;
  std::vector<double> loss_part; // per rank, this step
  std::vector<std::map<std::string, OpTiming>> ops;
};

// How a rank sits in the plan: its stage and its coordinates in every layer kind's view of the
// plan's mesh (strategies/mesh.hpp, the layout the lowering uses).
struct Coords {
  int stage = 0, local = 0, rps = 1;
  int a_tp = 0, a_cp = 0, a_dp = 0; // attention (a_cp: the whole CP coordinate)
  int m_etp = 0, m_ep = 0, m_edp = 0;
  int d_tp = 0, d_dp = 0;
  int e_tp = 0, e_dp = 0;
};

Coords coords_of(const sim::Mesh& mesh, int rank) {
  const sim::MeshView& a = mesh.view("attention");
  const sim::MeshView& m = mesh.view("moe");
  const sim::MeshView& d = mesh.view("dense");
  const sim::MeshView& e = mesh.view("embed");
  Coords c;
  c.rps = a.stride("pp");
  c.stage = a.coord(rank, "pp");
  c.local = rank % c.rps;
  c.a_tp = a.coord(rank, "tp");
  c.a_cp = a.coord(rank, "cp.ulysses") + a.extent("cp.ulysses") * a.coord(rank, "cp.ring");
  c.a_dp = a.coord(rank, "dp");
  c.m_etp = m.coord(rank, "etp");
  c.m_ep = m.coord(rank, "ep");
  c.m_edp = m.coord(rank, "edp");
  c.d_tp = d.coord(rank, "tp");
  c.d_dp = d.coord(rank, "dp");
  c.e_tp = e.coord(rank, "tp");
  c.e_dp = e.coord(rank, "dp");
  return c;
}

// The layer kind whose plan (ZeRO stage, shard group) a parameter follows, as the memory model
// and the lowering count them: an MoE layer's norm and router are non-expert parameters, in the
// dense kind (Megatron-Core reduces them with the dense parameters, not over the expert
// data-parallel group).
LayerKind kind_of(ParamRole r) {
  switch (r) {
  case ParamRole::attn_norm:
  case ParamRole::wq:
  case ParamRole::wk:
  case ParamRole::wv:
  case ParamRole::wo:
  case ParamRole::q_norm:
  case ParamRole::k_norm:
    return LayerKind::attention;
  case ParamRole::mlp_norm:
  case ParamRole::router:
  case ParamRole::dense_gate:
  case ParamRole::dense_up:
  case ParamRole::dense_down:
    return LayerKind::dense;
  case ParamRole::expert_gate:
  case ParamRole::expert_up:
  case ParamRole::expert_down:
    return LayerKind::moe;
  case ParamRole::embedding:
  case ParamRole::final_norm:
  case ParamRole::lm_head:
    return LayerKind::embedding;
  }
  return LayerKind::embedding;
}

} // namespace

// ---------------------------------------------------------------------------------------------
void check_executable(const TinyConfig& c, const Plan& p, int seq_len) {
  const auto& a = p.attention;
  if (seq_len <= 0)
    refuse("the sequence length must be positive");
  if (p.global_batch <= 0)
    refuse("the plan has no global batch; give the batch in sequences");
  if (a.cp > 1 && a.cp_kind == CpKind::hybrid)
    refuse("the CPU executor runs ring or Ulysses context parallelism, not hybrid");
  const int any_tp = std::max({a.tp, p.dense.tp, p.embed.tp, p.moe.etp});
  if (any_tp > 1 && !a.sp)
    refuse("the CPU executor runs tensor parallelism with sequence parallelism only (sp: true)");
  const int chunk = a.cp_kind == CpKind::ring ? 2 * a.cp : a.cp;
  if (seq_len % chunk != 0)
    refuse(fmt::format("the sequence length {} does not split into {} context-parallel chunks",
                       seq_len, chunk));
  const std::int64_t rows = static_cast<std::int64_t>(p.micro_batch) * (seq_len / a.cp);
  if (rows % a.tp != 0)
    refuse(fmt::format("the {} tokens of a micro-batch's context chunk do not split over tp {}",
                       rows, a.tp));
  if (c.heads % a.tp != 0 || c.kv_heads % a.tp != 0)
    refuse(fmt::format("tp {} must divide the {} query and {} key/value heads on the CPU "
                       "executor (it does not replicate key/value heads)",
                       a.tp, c.heads, c.kv_heads));
  if (a.cp > 1 && a.cp_kind == CpKind::ulysses &&
      ((c.heads / a.tp) % a.cp != 0 || (c.kv_heads / a.tp) % a.cp != 0))
    refuse(fmt::format("Ulysses cp {} must divide the heads left on a tp rank ({} query, {} "
                       "key/value)",
                       a.cp, c.heads / a.tp, c.kv_heads / a.tp));
  if (c.dense_ffn % p.dense.tp != 0)
    refuse(fmt::format("dense tp {} does not divide the MLP width {}", p.dense.tp, c.dense_ffn));
  if (c.vocab % p.embed.tp != 0)
    refuse(fmt::format("embedding tp {} does not divide the vocabulary {}", p.embed.tp, c.vocab));
  if (c.experts > 0 && (c.experts % p.moe.ep != 0 || c.expert_ffn % p.moe.etp != 0))
    refuse(fmt::format("ep {} must divide the {} experts and etp {} their width {}", p.moe.ep,
                       c.experts, p.moe.etp, c.expert_ffn));
  if (p.moe.capacity_factor > 0)
    refuse("the CPU executor runs dropless MoE only (capacity_factor 0)");
  const auto bounds = strategy::virtual_stage_bounds(p, c.num_layers());
  for (std::size_t v = 0; v + 1 < bounds.size(); ++v)
    if (bounds[v + 1] <= bounds[v])
      refuse(fmt::format("virtual pipeline stage {} holds no layer ({} layers over {} stages)", v,
                         c.num_layers(), bounds.size() - 1));
  if (p.micro_batches() < 1)
    refuse("the plan has no micro-batch per step");
}

template <class T> TrainState<T> initial_state(const TinyConfig& c, std::uint64_t seed) {
  TrainState<T> s;
  s.params = init_params<T>(c, seed);
  for (const auto& v : s.params) {
    s.adam_m.emplace_back(v.size(), T(0));
    s.adam_v.emplace_back(v.size(), T(0));
  }
  return s;
}
template TrainState<float> initial_state<float>(const TinyConfig&, std::uint64_t);
template TrainState<double> initial_state<double>(const TinyConfig&, std::uint64_t);

namespace {

// ---------------------------------------------------------------------------------------------
// One parameter as one rank holds it.
template <class T> struct LocalParam {
  int index = -1; // in param_layout
  ParamRole role = ParamRole::embedding;
  int layer = -1;
  LayerKind kind = LayerKind::embedding;
  Slice slice;
  Index n = 0;   // elements of the slice
  Comm grads;    // every rank holding the same slice (the gradient is summed over them)
  Comm shard;    // the ZeRO shard group (grads itself, or an HSDP block of it)
  Comm replicas; // HSDP: the same shard index in every block (size 1 otherwise)
  Comm tp_sum;   // norms and the router: the TP ranks whose gradients are summed first (size 1
                 // for TP-split parameters)
  bool writer = false;      // writes the state back (the first replica)
  bool tied_copy = false;   // the LM head's copy of tied embeddings on the last stage
  bool head_module = false; // the final norm and the LM head (layer -1, not the embedding)
  int bucket = -1;          // in Rank::buckets_
  int zero = 0;
  Index chunk = 0;      // elements per ZeRO shard (the slice padded to a multiple of the group)
  Index lo = 0, hi = 0; // my shard's range in the slice
  std::vector<T> value; // the slice; for ZeRO-3 only while gathered
  std::vector<T> owned; // ZeRO-3: my shard of the slice (padded to chunk)
  std::vector<T> grad;  // the slice's gradient, accumulated over micro-batches; after the
                        // reduction: the whole slice (ZeRO 0/1) or my shard (ZeRO 2/3)
  std::vector<T> acc;   // ZeRO-3 layers: my shard of the gradient, reduce-scattered after each
                        // micro-batch's backward (FSDP2) and summed over micro-batches
  std::vector<T> m, v;  // AdamW moments over what I own (the slice, or my shard)
  bool pending_step = false;         // reduced, AdamW step not yet applied
  bool keep_grad_until_step = false; // the pending step (streamed into the next forward) still
                                     // needs this gradient
  std::int64_t grad_step = 1;        // the optimizer step these gradients belong to (from 1)
};

struct OpCounter {
  std::map<std::string, OpTiming>* ops = nullptr;
  const char* kind = "";
  Clock::time_point t0 = Clock::now();
  ~OpCounter() {
    auto& t = (*ops)[kind];
    t.count += 1;
    t.seconds += std::chrono::duration<double>(Clock::now() - t0).count();
  }
};

// Parameters reduced, gathered and stepped together (Rank::make_params).
struct Bucket {
  std::vector<Index> members; // into Rank::params_
  int layer = -1;
  int zero = 0;
  Comm grads, shard, replicas; // as each member's
  bool reduced = false;
};

template <class T> struct AttnSaved {
  std::vector<T> x, rstd, xg, q_pre, k_pre, q_rstd, k_rstd, q, k, v, o, lse;
  std::vector<T> cq, ck, cv, co, clse; // Ulysses: the head-sharded full-sequence layout
  bool has_core = false, has_all = false;
};
template <class T> struct MlpSaved {
  std::vector<T> x, rstd, xg, gate, up, act;
  // MoE
  std::vector<T> xn, probs, weights, rows_in, ret;
  std::vector<std::int32_t> idx, order, rows_expert;
  std::vector<std::size_t> send_rows, recv_rows;
  std::int64_t etp_rows = 0, etp_max = 0;
  bool has_all = false;
  bool act_dropped = false; // selective recompute: act is recomputed from gate and up
};
template <class T> struct LayerSaved {
  AttnSaved<T> attn;
  MlpSaved<T> mlp;
  bool offloaded = false;
};
template <class T> struct HeadSaved { std::vector<T> x, rstd, xn, xg, dlogits; };

template <class T> class Rank {
public:
  Rank(World& world, int rank, const TinyConfig& c, const Plan& p, Shared<T>& shared,
       const RunOptions& o, const DataSource& data)
      : w_(world), rank_(rank), c_(c), p_(p), sh_(shared), o_(o), data_(data),
        mesh_(strategy::plan_mesh(p, /*gpus_per_node=*/8)), co_(coords_of(mesh_, rank)),
        layout_(param_layout(c)), ops_(&shared.ops[sz(rank)]) {
    make_groups();
    chunks_ = strategy::chunks_per_stage(p_);
    bounds_ = strategy::virtual_stage_bounds(p_, c_.num_layers());
    for (int ch = 0; ch < chunks_; ++ch) {
      const int v = ch * p_.pp + co_.stage;
      for (int l = bounds_[sz(v)]; l < bounds_[sz(v + 1)]; ++l) {
        layer_chunk_[l] = ch;
        layers_.push_back(l);
      }
    }
    make_params();
    hl_ = c_.heads / p_.attention.tp;
    kvl_ = c_.kv_heads / p_.attention.tp;
    lc_ = o_.seq_len / p_.attention.cp;
    ng_ = p_.micro_batch * lc_;
    n_ = ng_ / p_.attention.tp;
  }

  // One optimizer step: every pipeline pass of every micro-batch, the gradient reductions and
  // the AdamW steps, then the step's figures written to the shared state.
  void step(std::int64_t step_index) {
    step_index_ = step_index;
    batch_ = data_.batch(step_index, p_.global_batch, o_.seq_len);
    labelled_ = 0;
    for (auto l : batch_.labels)
      labelled_ += l >= 0 ? 1 : 0;
    loss_sum_ = 0;
    for (auto& lp : params_) {
      if (lp.pending_step)
        lp.keep_grad_until_step = true;
      else
        lp.grad.assign(lp.n, T(0));
      if (scatters_every_micro_batch(buckets_[sz(lp.bucket)]))
        lp.acc.assign(lp.chunk, T(0));
    }
    for (auto& b : buckets_)
      b.reduced = false;
    const int micro = p_.micro_batches();
    saved_.assign(sz(c_.num_layers()), std::vector<LayerSaved<T>>(sz(micro)));
    head_.assign(sz(micro), HeadSaved<T>{});
    remaining_bwd_.assign(sz(chunks_), micro);
    defer_ = strategy::defers_weight_gradients(p_);
    strategy::play_pipeline(
        p_, co_.stage, [this] { flush_wgrad(); }, [this](int mb, int chunk) { forward(mb, chunk); },
        [this](int mb, int chunk) { backward(mb, chunk); });
    // Layers whose reduction waited for held-back weight gradients, then the embedding, the
    // final norm and the LM head.
    for (int l : layers_)
      finish_layer(l);
    finish_others();
    for (auto& b : buckets_)
      if (pending(b) && (!host_streams_forward() || b.layer < 0))
        adam_step(b);
    publish_grads();
    sh_.loss_part[sz(rank_)] = loss_sum_;
  }

  // Applies held-back optimizer steps and writes the parameters and moments back.
  void finish_run() {
    for (auto& b : buckets_)
      if (pending(b))
        adam_step(b);
    for (auto& lp : params_)
      publish_state(lp);
  }

private:
  // --- topology ------------------------------------------------------------------------------
  void make_groups() {
    auto group = [&](const sim::GroupSpec& spec) {
      return w_.group(mesh_.view(spec.view).members(rank_, spec), rank_);
    };
    stage_ = group(strategy::stage_group());
    a_tp_ = group(strategy::tp_group());
    // The executor runs ring or Ulysses CP (hybrid is refused): one of the two CP dimensions.
    a_cp_ = group(p_.attention.cp_kind == CpKind::ulysses ? strategy::cp_ulysses_group()
                                                          : strategy::cp_ring_group());
    a_grad_ = group(strategy::data_parallel_group(LayerKind::attention));
    m_etp_ = group(strategy::etp_group());
    m_ep_ = group(strategy::ep_group());
    m_edp_ = group(strategy::data_parallel_group(LayerKind::moe));
    d_tp_ = group(strategy::dense_tp_group());
    d_dp_ = group(strategy::data_parallel_group(LayerKind::dense));
    e_tp_ = group(strategy::embed_tp_group());
    e_dp_ = group(strategy::data_parallel_group(LayerKind::embedding));
    if (c_.tied_embeddings && p_.pp > 1 && (co_.stage == 0 || co_.stage == p_.pp - 1)) {
      const std::vector<int> pipe =
          mesh_.view("attention").members(rank_, sim::GroupSpec{"attention", {"pp"}});
      tied_ = w_.group({pipe.front(), pipe.back()}, rank_);
    }
  }

  bool first_stage() const { return co_.stage == 0; }
  bool last_stage() const { return co_.stage == p_.pp - 1; }
  bool embeds(int chunk) const { return first_stage() && chunk == 0; }
  bool heads(int chunk) const { return last_stage() && chunk == chunks_ - 1; }
  bool host_streams_forward() const {
    return p_.optimizer_on_host && p_.overlap == OptimizerOverlap::stream_forward;
  }
  bool host_streams_backward() const {
    return p_.optimizer_on_host && p_.overlap == OptimizerOverlap::stream_backward;
  }

  void make_params() {
    const bool last = last_stage();
    idx_.assign(layout_.size(), -1);
    for (std::size_t i = 0; i < layout_.size(); ++i) {
      const ParamInfo& info = layout_[i];
      bool here = false, tied_copy = false;
      if (info.layer >= 0)
        here = layer_chunk_.count(info.layer) > 0;
      else if (info.role == ParamRole::embedding) {
        here = first_stage() || (last && c_.tied_embeddings);
        tied_copy = !first_stage();
      } else
        here = last;
      if (!here)
        continue;
      LocalParam<T> lp;
      lp.index = static_cast<int>(i);
      lp.role = info.role;
      lp.layer = info.layer;
      lp.tied_copy = tied_copy;
      lp.kind = kind_of(info.role);
      lp.head_module = info.layer < 0 && (info.role != ParamRole::embedding || tied_copy);
      lp.slice = full_slice(info.shape);
      // The dimension a layer kind's TP (or EP/ETP, vocab parallelism) splits, and the ranks
      // that hold the same slice and sum its gradient. Norms and the router stay whole on every
      // rank of the stage: under SP each TP rank sees other tokens, so their gradients are first
      // summed over the kind's TP group, then reduced with the kind's TP-split weights over its
      // data-parallel group (Megatron-Core's sequence-parallel norm gradients).
      Comm grads = stage_;
      sim::GroupSpec grads_spec = strategy::stage_group();
      Comm tp_sum = w_.group({rank_}, rank_);
      auto replicated = [&](const Comm& dp, const Comm& tp, LayerKind kind) {
        grads = dp;
        tp_sum = tp;
        grads_spec = strategy::data_parallel_group(kind);
      };
      auto shard = [&](int dim, int part, int parts, const Comm& same_slice, LayerKind kind) {
        split(lp.slice, dim, part, parts);
        grads = same_slice;
        grads_spec = strategy::data_parallel_group(kind);
      };
      using R = ParamRole;
      switch (info.role) {
      case R::wq:
      case R::wk:
      case R::wv:
        shard(2, co_.a_tp, p_.attention.tp, a_grad_, LayerKind::attention);
        break;
      case R::wo:
        shard(1, co_.a_tp, p_.attention.tp, a_grad_, LayerKind::attention);
        break;
      case R::dense_gate:
      case R::dense_up:
        shard(2, co_.d_tp, p_.dense.tp, d_dp_, LayerKind::dense);
        break;
      case R::dense_down:
        shard(1, co_.d_tp, p_.dense.tp, d_dp_, LayerKind::dense);
        break;
      case R::expert_gate:
      case R::expert_up:
        split(lp.slice, 0, co_.m_ep, p_.moe.ep);
        shard(2, co_.m_etp, p_.moe.etp, m_edp_, LayerKind::moe);
        break;
      case R::expert_down:
        split(lp.slice, 0, co_.m_ep, p_.moe.ep);
        shard(1, co_.m_etp, p_.moe.etp, m_edp_, LayerKind::moe);
        break;
      case R::embedding:
        shard(1, co_.e_tp, p_.embed.tp, e_dp_, LayerKind::embedding);
        break;
      case R::lm_head:
        shard(2, co_.e_tp, p_.embed.tp, e_dp_, LayerKind::embedding);
        break;
      case R::attn_norm:
      case R::q_norm:
      case R::k_norm:
        replicated(a_grad_, a_tp_, LayerKind::attention);
        break;
      case R::mlp_norm:
      case R::router:
        replicated(d_dp_, d_tp_, LayerKind::dense);
        break;
      case R::final_norm:
        replicated(e_dp_, e_tp_, LayerKind::embedding);
        break;
      }
      lp.n = lp.slice.numel();
      lp.grads = grads;
      lp.tp_sum = tp_sum;
      const auto& policy = p_.state[static_cast<int>(lp.kind)];
      lp.zero = policy.zero;
      if (p_.params == strategy::Placement::host)
        lp.zero = std::max(lp.zero, 3);
      // HSDP: shard inside blocks of the gradient group, replicate across them (plan rules
      // make the block divide the group).
      const int g = grads.size(), sg = policy.shard_group;
      if (sg > 0 && sg < g && lp.zero > 0) {
        const sim::MeshView& view = mesh_.view(grads_spec.view);
        sim::GroupSpec block = grads_spec;
        block.block = sg;
        lp.shard = w_.group(view.members(rank_, block), rank_);
        block.across_blocks = true;
        lp.replicas = w_.group(view.members(rank_, block), rank_);
      } else {
        lp.shard = lp.zero > 0 ? grads : w_.group({rank_}, rank_);
        lp.replicas = w_.group({rank_}, rank_);
      }
      if (lp.zero == 0)
        lp.writer = grads.rank() == 0;
      else
        lp.writer = lp.replicas.rank() == 0;
      if (lp.tied_copy || tp_sum.rank() != 0)
        lp.writer = false;
      const Index parts = sz(lp.shard.size());
      lp.chunk = (lp.n + parts - 1) / parts;
      lp.lo = std::min(lp.n, lp.chunk * sz(lp.shard.rank()));
      lp.hi = std::min(lp.n, lp.lo + lp.chunk);
      std::vector<T> value = extract(sh_.state.params[i], lp.slice);
      std::vector<T> m = extract(sh_.state.adam_m[i], lp.slice);
      std::vector<T> v = extract(sh_.state.adam_v[i], lp.slice);
      if (lp.zero == 0) {
        lp.value = std::move(value);
        lp.m = std::move(m);
        lp.v = std::move(v);
      } else {
        auto mine = [&](const std::vector<T>& all) {
          std::vector<T> out(lp.chunk, T(0));
          std::copy(all.begin() + static_cast<std::ptrdiff_t>(lp.lo),
                    all.begin() + static_cast<std::ptrdiff_t>(lp.hi), out.begin());
          return out;
        };
        lp.m = mine(m);
        lp.v = mine(v);
        if (lp.zero >= 3)
          lp.owned = mine(value);
        else
          lp.value = std::move(value);
      }
      idx_[i] = static_cast<int>(params_.size());
      params_.push_back(std::move(lp));
    }
    // Buckets: the parameters of one layer (or of the embedding, or of the final norm and LM
    // head), of one kind and one gradient group, travel together, one collective per bucket for
    // each gather, reduction and optimizer gather (FSDP2 gathers and reduces a module's
    // parameters as one flat buffer; Megatron-Core reduces gradients in buckets).
    for (Index k = 0; k < params_.size(); ++k) {
      auto& lp = params_[k];
      auto same = [&](const Bucket& b) {
        const auto& f = params_[b.members.front()];
        return f.layer == lp.layer && f.kind == lp.kind && f.head_module == lp.head_module &&
               f.grads.members() == lp.grads.members();
      };
      auto it = std::find_if(buckets_.begin(), buckets_.end(), same);
      if (it == buckets_.end()) {
        Bucket b;
        b.layer = lp.layer;
        b.zero = lp.zero;
        b.grads = lp.grads;
        b.shard = lp.shard;
        b.replicas = lp.replicas;
        buckets_.push_back(b);
        it = buckets_.end() - 1;
      }
      it->members.push_back(k);
      lp.bucket = static_cast<int>(it - buckets_.begin());
    }
  }

  LocalParam<T>& param(ParamRole role, int layer) {
    const int i = find_param(layout_, role, layer);
    if (i < 0 || idx_[sz(i)] < 0)
      throw std::logic_error(
          fmt::format("rank {} holds no {} of layer {}", rank_, role_name(role), layer));
    return params_[sz(idx_[sz(i)])];
  }
  bool has_param(ParamRole role, int layer) const {
    const int i = find_param(layout_, role, layer);
    return i >= 0 && idx_[sz(i)] >= 0;
  }
  const std::vector<T>& value(ParamRole role, int layer) {
    auto& lp = param(role, layer);
    ensure(bucket_of(lp));
    return lp.value;
  }
  Bucket& bucket_of(const LocalParam<T>& lp) { return buckets_[sz(lp.bucket)]; }
  bool pending(const Bucket& b) const { return params_[b.members.front()].pending_step; }
  std::vector<T>& grad(ParamRole role, int layer) { return param(role, layer).grad; }

  // ZeRO-3: gather the slices of every parameter of `layer` over their shard groups before the
  // layer runs, and drop them after (FSDP's reshard after forward).
  void gather_params(int layer) {
    for (auto& b : buckets_)
      if (b.layer == layer)
        ensure(b);
  }
  void release_params(int layer) {
    for (auto& b : buckets_)
      if (b.layer == layer)
        drop(b);
  }

  // --- timed kernels and collectives ---------------------------------------------------------
  void gemm(int m, int n, int k, const T* a, bool ta, const T* b, bool tb, T* out, bool acc) {
    OpCounter t{ops_, "gemm"};
    real::gemm<T>(m, n, k, a, ta, b, tb, out, acc);
  }
  // Weight-gradient GEMMs may be held back (zero-bubble); inputs are captured by value.
  void wgrad(std::function<void()> f) {
    if (defer_)
      deferred_.push_back(std::move(f));
    else
      f();
  }
  void flush_wgrad() {
    while (!deferred_.empty()) {
      auto f = std::move(deferred_.front());
      deferred_.pop_front();
      f();
    }
  }
  template <class U> std::vector<U> all_gather(const Comm& g, const std::vector<U>& x) {
    if (g.size() == 1)
      return x;
    OpCounter t{ops_, "all_gather"};
    std::vector<U> out(x.size() * sz(g.size()));
    g.all_gather(x.data(), x.size(), out.data());
    return out;
  }
  std::vector<T> reduce_scatter(const Comm& g, const std::vector<T>& x) {
    if (g.size() == 1)
      return x;
    OpCounter t{ops_, "reduce_scatter"};
    std::vector<T> out(x.size() / sz(g.size()));
    g.reduce_scatter(x.data(), out.size(), out.data());
    return out;
  }
  template <class U>
  std::vector<U> all_to_all(const Comm& g, const std::vector<U>& send,
                            const std::vector<std::size_t>& send_counts,
                            const std::vector<std::size_t>& recv_counts) {
    if (g.size() == 1) // a group of one keeps its rows: no call
      return send;
    OpCounter t{ops_, "all_to_all"};
    std::vector<U> out(std::accumulate(recv_counts.begin(), recv_counts.end(), std::size_t{0}));
    g.all_to_all_v(send.data(), send_counts, out.data(), recv_counts);
    return out;
  }

  // --- data ----------------------------------------------------------------------------------
  // Positions of context-parallel rank `cp` in a sequence: ring CP takes chunks cp and
  // 2·CP - 1 - cp of 2·CP (the causal load balance); Ulysses and no CP a contiguous chunk.
  std::vector<std::int64_t> cp_positions(int cp) const {
    const int CP = p_.attention.cp;
    std::vector<std::int64_t> pos;
    if (CP > 1 && p_.attention.cp_kind == CpKind::ring) {
      const int half = o_.seq_len / (2 * CP);
      for (int t = 0; t < half; ++t)
        pos.push_back(cp * half + t);
      for (int t = 0; t < half; ++t)
        pos.push_back((2 * CP - 1 - cp) * half + t);
    } else {
      for (int t = 0; t < lc_; ++t)
        pos.push_back(static_cast<std::int64_t>(cp) * lc_ + t);
    }
    return pos;
  }
  // The rows of micro-batch mb that the rank at `at` holds: the ids (or labels) of its SP share
  // of its CP chunk.
  std::vector<std::int32_t> rows_of(const Coords& at, int mb,
                                    const std::vector<std::int32_t>& all) const {
    const auto pos = cp_positions(at.a_cp);
    const int first = (mb * p_.attention.dp + at.a_dp) * p_.micro_batch;
    std::vector<std::int32_t> chunk;
    for (int b = 0; b < p_.micro_batch; ++b)
      for (auto t : pos)
        chunk.push_back(all[sz(first + b) * sz(o_.seq_len) + sz(t)]);
    return std::vector<std::int32_t>(chunk.begin() + static_cast<std::ptrdiff_t>(at.a_tp * n_),
                                     chunk.begin() +
                                         static_cast<std::ptrdiff_t>((at.a_tp + 1) * n_));
  }
  // The rows of every member of `g`, in member order: what an all-gather of their rows would
  // return, read from the batch every rank has.
  std::vector<std::int32_t> group_rows(const Comm& g, int mb,
                                       const std::vector<std::int32_t>& all) const {
    std::vector<std::int32_t> out;
    for (int member : g.members()) {
      const auto rows = rows_of(coords_of(mesh_, member), mb, all);
      out.insert(out.end(), rows.begin(), rows.end());
    }
    return out;
  }

  // --- passes --------------------------------------------------------------------------------
  void forward(int mb, int chunk) {
    std::vector<T> x;
    if (embeds(chunk))
      x = embed_forward(mb);
    else
      x = recv_activation(mb, chunk, true);
    const int v = chunk * p_.pp + co_.stage;
    for (int l = bounds_[sz(v)]; l < bounds_[sz(v + 1)]; ++l) {
      apply_pending(l);
      gather_params(l);
      x = layer_forward(l, mb, std::move(x));
      release_params(l);
      offload(l, mb);
    }
    if (heads(chunk))
      head_forward(mb, std::move(x));
    else
      send_activation(mb, chunk, x, true);
  }

  void backward(int mb, int chunk) {
    std::vector<T> dx;
    if (heads(chunk))
      dx = head_backward(mb);
    else
      dx = recv_activation(mb, chunk, false);
    const int v = chunk * p_.pp + co_.stage;
    for (int l = bounds_[sz(v + 1)] - 1; l >= bounds_[sz(v)]; --l) {
      reload(l, mb);
      gather_params(l);
      dx = layer_backward(l, mb, std::move(dx));
      // After the layer's weight gradients, which zero-bubble may hold back.
      wgrad([this, l] { scatter_micro_batch(l); });
      release_params(l);
    }
    if (embeds(chunk))
      embed_backward(mb, dx);
    else
      send_activation(mb, chunk, dx, false);
    if (--remaining_bwd_[sz(chunk)] == 0 && !defer_)
      for (int l = bounds_[sz(v + 1)] - 1; l >= bounds_[sz(v)]; --l)
        finish_layer(l);
  }

  // Pipeline neighbours: forward activations go to the next virtual stage (the next rank, or
  // from the last rank to the first for the next chunk), gradients come back the same way.
  // Each message carries (micro-batch, chunk) to catch a schedule that pairs them wrongly.
  int neighbour(int chunk, bool fwd, bool sending, int* peer_chunk) const {
    const int pp = p_.pp, s = co_.stage;
    const int dir = (fwd == sending) ? +1 : -1; // towards later virtual stages?
    int ps = s + dir, pc = chunk;
    if (ps == pp) {
      ps = 0;
      pc = chunk + 1;
    } else if (ps < 0) {
      ps = pp - 1;
      pc = chunk - 1;
    }
    *peer_chunk = pc;
    return ps * co_.rps + co_.local;
  }
  void send_activation(int mb, int chunk, const std::vector<T>& x, bool fwd) {
    int pc = 0;
    const int to = neighbour(chunk, fwd, true, &pc);
    std::vector<T> msg = x;
    msg.push_back(static_cast<T>(mb));
    msg.push_back(static_cast<T>(pc));
    OpCounter t{ops_, "send"};
    w_.send(rank_, to, msg.data(), msg.size());
  }
  std::vector<T> recv_activation(int mb, int chunk, bool fwd) {
    int pc = 0;
    const int from = neighbour(chunk, fwd, false, &pc);
    std::vector<T> msg(sz(n_) * sz(c_.hidden) + 2);
    {
      OpCounter t{ops_, "recv"};
      w_.recv(rank_, from, msg.data(), msg.size());
    }
    const int got_mb = static_cast<int>(msg[msg.size() - 2]),
              got_chunk = static_cast<int>(msg.back());
    if (got_mb != mb || got_chunk != chunk)
      throw std::logic_error(fmt::format("rank {} expected micro-batch {} chunk {} from rank {}, "
                                         "got micro-batch {} chunk {}",
                                         rank_, mb, chunk, from, got_mb, got_chunk));
    msg.resize(msg.size() - 2);
    return msg;
  }

  // Activation offload: the first fraction of the stage's layers keep their saved activations
  // on the host between forward and backward (moved out and back, counted as copies).
  bool offloads(int layer) const {
    if (p_.activation_offload <= 0)
      return false;
    const auto it = std::find(layers_.begin(), layers_.end(), layer);
    const double i = static_cast<double>(it - layers_.begin());
    return i < std::ceil(p_.activation_offload * static_cast<double>(layers_.size()) - 1e-9);
  }
  void offload(int layer, int mb) {
    if (!offloads(layer))
      return;
    OpCounter t{ops_, "copy_d2h"};
    host_[{layer, mb}] = std::move(saved_[sz(layer)][sz(mb)]);
    saved_[sz(layer)][sz(mb)] = LayerSaved<T>{};
    saved_[sz(layer)][sz(mb)].offloaded = true;
  }
  void reload(int layer, int mb) {
    if (!saved_[sz(layer)][sz(mb)].offloaded)
      return;
    OpCounter t{ops_, "copy_h2d"};
    auto it = host_.find({layer, mb});
    saved_[sz(layer)][sz(mb)] = std::move(it->second);
    host_.erase(it);
  }

  // Pre-norm RMSNorm of a block's input rows, and its backward plus the residual's gradient.
  std::vector<T> norm_forward(ParamRole role, int layer, const std::vector<T>& x,
                              std::vector<T>& rstd) {
    std::vector<T> y(x.size());
    rstd.assign(sz(n_), T(0));
    OpCounter t{ops_, "rmsnorm"};
    rmsnorm_fwd<T>(n_, c_.hidden, x.data(), value(role, layer).data(), c_.norm_eps, y.data(),
                   rstd.data());
    return y;
  }
  std::vector<T> norm_backward(ParamRole role, int layer, const std::vector<T>& x,
                               const std::vector<T>& rstd, const std::vector<T>& dy_norm,
                               const std::vector<T>* dy_residual) {
    std::vector<T> dx(x.size());
    {
      OpCounter t{ops_, "rmsnorm"};
      rmsnorm_bwd<T>(n_, c_.hidden, x.data(), value(role, layer).data(), rstd.data(),
                     dy_norm.data(), dx.data(), grad(role, layer).data());
    }
    if (dy_residual != nullptr)
      for (Index i = 0; i < dx.size(); ++i)
        dx[i] += (*dy_residual)[i];
    return dx;
  }

  // --- decoder layer -------------------------------------------------------------------------
  Recompute recompute_of(LayerKind k) const { return p_.recompute[static_cast<int>(k)]; }

  std::vector<T> layer_forward(int l, int mb, std::vector<T> x) {
    auto& s = saved_[sz(l)][sz(mb)];
    s.attn.x = std::move(x);
    std::vector<T> h = attn_compute(l, s.attn);
    const Recompute ra = recompute_of(LayerKind::attention);
    if (ra == Recompute::full)
      drop_attention(s.attn, true);
    else if (ra == Recompute::selective)
      drop_attention(s.attn, false);
    s.mlp.x = std::move(h);
    const bool moe = c_.layers[sz(l)].moe;
    std::vector<T> y = moe ? moe_compute(l, s.mlp) : dense_compute(l, s.mlp);
    const Recompute rm = recompute_of(moe ? LayerKind::moe : LayerKind::dense);
    if (rm == Recompute::full) {
      std::vector<T> keep = std::move(s.mlp.x);
      s.mlp = MlpSaved<T>{};
      s.mlp.x = std::move(keep);
    } else if (rm == Recompute::selective) { // only the activation function runs again
      s.mlp.act = {};
      s.mlp.act_dropped = true;
    }
    return y;
  }

  std::vector<T> layer_backward(int l, int mb, std::vector<T> dy) {
    auto& s = saved_[sz(l)][sz(mb)];
    const bool moe = c_.layers[sz(l)].moe;
    if (!s.mlp.has_all) { // recompute: the block's forward again, its ops counted as usual
      if (moe)
        moe_compute(l, s.mlp);
      else
        dense_compute(l, s.mlp);
    } else if (s.mlp.act_dropped) {
      OpCounter t{ops_, "swiglu"};
      s.mlp.act.assign(s.mlp.gate.size(), T(0));
      swiglu_fwd<T>(s.mlp.act.size(), s.mlp.gate.data(), s.mlp.up.data(), s.mlp.act.data());
      s.mlp.act_dropped = false;
    }
    std::vector<T> dh = moe ? moe_backward(l, s.mlp, dy) : dense_backward(l, s.mlp, dy);
    if (!s.attn.has_all)
      attn_compute(l, s.attn);
    else if (!s.attn.has_core)
      attn_core(l, s.attn);
    std::vector<T> dx = attn_backward(l, s.attn, dh);
    s = LayerSaved<T>{};
    return dx;
  }

  void drop_attention(AttnSaved<T>& s, bool all) {
    for (auto* v : {&s.o, &s.lse, &s.co, &s.clse})
      *v = {};
    s.has_core = false;
    if (all) {
      std::vector<T> keep = std::move(s.x);
      s = AttnSaved<T>{};
      s.x = std::move(keep);
    }
  }

  // Positions of the rows of my CP chunk (mb sequences of lc_ tokens each).
  std::vector<std::int64_t> chunk_row_positions() const {
    const auto pos = cp_positions(co_.a_cp);
    std::vector<std::int64_t> rows;
    for (int b = 0; b < p_.micro_batch; ++b)
      rows.insert(rows.end(), pos.begin(), pos.end());
    return rows;
  }

  AttentionParams attn_params(int l, int heads, int kv_heads) const {
    AttentionParams a;
    a.heads = heads;
    a.kv_heads = kv_heads;
    a.qk_dim = c_.head_dim;
    a.v_dim = c_.head_dim;
    a.causal = true;
    a.window = c_.layers[sz(l)].window;
    a.scale = 1.0 / std::sqrt(static_cast<double>(c_.head_dim));
    return a;
  }

  // Attention block: RMSNorm, SP all-gather over tp, column-parallel q/k/v (this rank's heads),
  // per-head q/k norm, RoPE, attention over the CP group, row-parallel output projection and SP
  // reduce-scatter, residual. Returns the block's output rows.
  std::vector<T> attn_compute(int l, AttnSaved<T>& s) {
    const int H = c_.hidden, d = c_.head_dim;
    std::vector<T> xn = norm_forward(ParamRole::attn_norm, l, s.x, s.rstd);
    s.xg = all_gather(a_tp_, xn);
    s.q.assign(sz(ng_) * sz(hl_ * d), T(0));
    s.k.assign(sz(ng_) * sz(kvl_ * d), T(0));
    s.v.assign(sz(ng_) * sz(kvl_ * d), T(0));
    gemm(ng_, hl_ * d, H, s.xg.data(), false, value(ParamRole::wq, l).data(), false, s.q.data(),
         false);
    gemm(ng_, kvl_ * d, H, s.xg.data(), false, value(ParamRole::wk, l).data(), false, s.k.data(),
         false);
    gemm(ng_, kvl_ * d, H, s.xg.data(), false, value(ParamRole::wv, l).data(), false, s.v.data(),
         false);
    if (c_.qk_norm) {
      OpCounter t{ops_, "rmsnorm"};
      s.q_pre = s.q;
      s.k_pre = s.k;
      s.q_rstd.assign(sz(ng_ * hl_), T(0));
      s.k_rstd.assign(sz(ng_ * kvl_), T(0));
      rmsnorm_fwd<T>(ng_ * hl_, d, s.q_pre.data(), value(ParamRole::q_norm, l).data(), c_.norm_eps,
                     s.q.data(), s.q_rstd.data());
      rmsnorm_fwd<T>(ng_ * kvl_, d, s.k_pre.data(), value(ParamRole::k_norm, l).data(), c_.norm_eps,
                     s.k.data(), s.k_rstd.data());
    }
    {
      OpCounter t{ops_, "rope"};
      const auto pos = chunk_row_positions();
      rope<T>(ng_, hl_, d, pos.data(), c_.rope_theta, s.q.data(), false);
      rope<T>(ng_, kvl_, d, pos.data(), c_.rope_theta, s.k.data(), false);
    }
    attn_core(l, s);
    std::vector<T> out(sz(ng_) * sz(H));
    gemm(ng_, H, hl_ * d, s.o.data(), false, value(ParamRole::wo, l).data(), false, out.data(),
         false);
    std::vector<T> y = reduce_scatter(a_tp_, out);
    for (Index i = 0; i < y.size(); ++i)
      y[i] += s.x[i];
    s.has_all = true;
    return y;
  }

  // The attention itself over the CP group; fills o (my chunk's rows, [ng, hl, d]) and lse.
  void attn_core(int l, AttnSaved<T>& s) {
    const int d = c_.head_dim, CP = p_.attention.cp, B = p_.micro_batch;
    s.o.assign(sz(ng_) * sz(hl_ * d), T(0));
    s.lse.assign(sz(ng_ * hl_), T(0));
    if (CP == 1 || p_.attention.cp_kind == CpKind::ring) {
      const AttentionParams a = attn_params(l, hl_, kvl_);
      const auto qpos = cp_positions(co_.a_cp);
      std::vector<T> kb = s.k, vb = s.v, po, pl;
      for (int step = 0; step < CP; ++step) {
        const int src = (co_.a_cp - step + CP) % CP;
        const auto kpos = cp_positions(src);
        for (int b = 0; b < B; ++b) {
          const Index qo = sz(b) * sz(lc_), ko = sz(b) * sz(lc_);
          T* o = s.o.data() + qo * sz(hl_ * d);
          T* lse = s.lse.data() + qo * sz(hl_);
          OpCounter t{ops_, "attention_fwd"};
          if (step == 0) {
            attention_fwd<T>(a, lc_, lc_, s.q.data() + qo * sz(hl_ * d),
                             kb.data() + ko * sz(kvl_ * d), vb.data() + ko * sz(kvl_ * d),
                             qpos.data(), kpos.data(), o, lse);
          } else {
            po.assign(sz(lc_ * hl_ * d), T(0));
            pl.assign(sz(lc_ * hl_), T(0));
            attention_fwd<T>(a, lc_, lc_, s.q.data() + qo * sz(hl_ * d),
                             kb.data() + ko * sz(kvl_ * d), vb.data() + ko * sz(kvl_ * d),
                             qpos.data(), kpos.data(), po.data(), pl.data());
            attention_merge<T>(lc_, hl_, d, o, lse, po.data(), pl.data());
          }
        }
        if (step + 1 < CP)
          ring_shift(kb, vb);
      }
    } else { // Ulysses: trade sequence for heads, attend over whole sequences, trade back
      const int hs = hl_ / CP, kvs = kvl_ / CP, S = o_.seq_len;
      const AttentionParams a = attn_params(l, hs, kvs);
      s.cq = to_heads(s.q, hl_);
      s.ck = to_heads(s.k, kvl_);
      s.cv = to_heads(s.v, kvl_);
      s.co.assign(sz(B) * sz(S) * sz(hs * d), T(0));
      s.clse.assign(sz(B) * sz(S) * sz(hs), T(0));
      std::vector<std::int64_t> pos(sz(S));
      std::iota(pos.begin(), pos.end(), 0);
      for (int b = 0; b < B; ++b) {
        OpCounter t{ops_, "attention_fwd"};
        const Index r = sz(b) * sz(S);
        attention_fwd<T>(a, S, S, s.cq.data() + r * sz(hs * d), s.ck.data() + r * sz(kvs * d),
                         s.cv.data() + r * sz(kvs * d), pos.data(), pos.data(),
                         s.co.data() + r * sz(hs * d), s.clse.data() + r * sz(hs));
      }
      s.o = to_tokens(s.co, hl_, d); // the log-sum-exp stays head-sharded: backward reads clse
    }
    s.has_core = true;
  }

  // One ring hop of a key/value block (or of its two gradients): both tensors travel in one
  // message, as ring attention implementations send K and V together.
  void ring_shift(std::vector<T>& a, std::vector<T>& b) {
    std::vector<T> send(a);
    send.insert(send.end(), b.begin(), b.end());
    std::vector<T> recv(send.size());
    {
      OpCounter t{ops_, "send_recv"};
      a_cp_.send_recv_ring(send.data(), recv.data(), send.size(), 1);
    }
    std::copy_n(recv.begin(), a.size(), a.begin());
    std::copy_n(recv.begin() + static_cast<std::ptrdiff_t>(a.size()), b.size(), b.begin());
  }

  // Ulysses all-to-all: my chunk's rows with all my heads [ng, heads, d] become whole sequences
  // with heads / CP heads [B, S, heads / CP, d] (CP rank j gets heads [j·hs, (j+1)·hs)).
  std::vector<T> to_heads(const std::vector<T>& x, int heads) {
    const int d = c_.head_dim, CP = p_.attention.cp, hs = heads / CP, B = p_.micro_batch;
    const Index block = sz(ng_) * sz(hs * d);
    std::vector<T> send(block * sz(CP));
    for (int j = 0; j < CP; ++j)
      for (int r = 0; r < ng_; ++r)
        std::copy_n(
            x.begin() + static_cast<std::ptrdiff_t>((sz(r) * sz(heads) + sz(j * hs)) * sz(d)),
            hs * d, send.begin() + static_cast<std::ptrdiff_t>(sz(j) * block + sz(r) * sz(hs * d)));
    const std::vector<std::size_t> counts(sz(CP), block);
    const std::vector<T> recv = all_to_all(a_cp_, send, counts, counts);
    std::vector<T> out(recv.size());
    for (int j = 0; j < CP; ++j)
      for (int b = 0; b < B; ++b)
        for (int t = 0; t < lc_; ++t) {
          const Index from = sz(j) * block + (sz(b) * sz(lc_) + sz(t)) * sz(hs * d);
          const Index to = (sz(b) * sz(o_.seq_len) + sz(j) * sz(lc_) + sz(t)) * sz(hs * d);
          std::copy_n(recv.begin() + static_cast<std::ptrdiff_t>(from), hs * d,
                      out.begin() + static_cast<std::ptrdiff_t>(to));
        }
    return out;
  }
  // The inverse all-to-all: [B, S, heads / CP, d] back to my chunk's rows [ng, heads, d].
  std::vector<T> to_tokens(const std::vector<T>& x, int heads, int d) {
    const int CP = p_.attention.cp, hs = heads / CP, B = p_.micro_batch;
    const Index block = sz(ng_) * sz(hs * d);
    std::vector<T> send(block * sz(CP));
    for (int j = 0; j < CP; ++j)
      for (int b = 0; b < B; ++b)
        for (int t = 0; t < lc_; ++t) {
          const Index from = (sz(b) * sz(o_.seq_len) + sz(j) * sz(lc_) + sz(t)) * sz(hs * d);
          const Index to = sz(j) * block + (sz(b) * sz(lc_) + sz(t)) * sz(hs * d);
          std::copy_n(x.begin() + static_cast<std::ptrdiff_t>(from), hs * d,
                      send.begin() + static_cast<std::ptrdiff_t>(to));
        }
    const std::vector<std::size_t> counts(sz(CP), block);
    const std::vector<T> recv = all_to_all(a_cp_, send, counts, counts);
    std::vector<T> out(recv.size());
    for (int j = 0; j < CP; ++j)
      for (int r = 0; r < ng_; ++r)
        std::copy_n(
            recv.begin() + static_cast<std::ptrdiff_t>(sz(j) * block + sz(r) * sz(hs * d)), hs * d,
            out.begin() + static_cast<std::ptrdiff_t>((sz(r) * sz(heads) + sz(j * hs)) * sz(d)));
    return out;
  }

  std::vector<T> attn_backward(int l, AttnSaved<T>& s, const std::vector<T>& dy) {
    const int H = c_.hidden, d = c_.head_dim, CP = p_.attention.cp, B = p_.micro_batch;
    std::vector<T> dyg = all_gather(a_tp_, dy);
    std::vector<T> dout(sz(ng_) * sz(hl_ * d));
    gemm(ng_, hl_ * d, H, dyg.data(), false, value(ParamRole::wo, l).data(), true, dout.data(),
         false);
    {
      T* g = grad(ParamRole::wo, l).data();
      wgrad([this, g, o = s.o, dyg, H, d] {
        gemm(hl_ * d, H, ng_, o.data(), true, dyg.data(), false, g, true);
      });
    }
    std::vector<T> dq(s.q.size(), T(0)), dk(s.k.size(), T(0)), dv(s.v.size(), T(0));
    if (CP == 1 || p_.attention.cp_kind == CpKind::ring) {
      const AttentionParams a = attn_params(l, hl_, kvl_);
      const auto qpos = cp_positions(co_.a_cp);
      std::vector<T> kb = s.k, vb = s.v, dkb(s.k.size(), T(0)), dvb(s.v.size(), T(0));
      for (int step = 0; step < CP; ++step) {
        const int src = (co_.a_cp - step + CP) % CP;
        const auto kpos = cp_positions(src);
        for (int b = 0; b < B; ++b) {
          OpCounter t{ops_, "attention_bwd"};
          const Index r = sz(b) * sz(lc_);
          attention_bwd<T>(a, lc_, lc_, s.q.data() + r * sz(hl_ * d), kb.data() + r * sz(kvl_ * d),
                           vb.data() + r * sz(kvl_ * d), qpos.data(), kpos.data(),
                           s.o.data() + r * sz(hl_ * d), s.lse.data() + r * sz(hl_),
                           dout.data() + r * sz(hl_ * d), dq.data() + r * sz(hl_ * d),
                           dkb.data() + r * sz(kvl_ * d), dvb.data() + r * sz(kvl_ * d));
        }
        if (CP > 1) { // the key/value gradients travel with their block and arrive home last
          if (step + 1 < CP)
            ring_shift(kb, vb);
          ring_shift(dkb, dvb);
        }
      }
      dk = std::move(dkb);
      dv = std::move(dvb);
    } else {
      const int hs = hl_ / CP, kvs = kvl_ / CP, S = o_.seq_len;
      const AttentionParams a = attn_params(l, hs, kvs);
      const std::vector<T> cdo = to_heads(dout, hl_);
      std::vector<T> cdq(s.cq.size(), T(0)), cdk(s.ck.size(), T(0)), cdv(s.cv.size(), T(0));
      std::vector<std::int64_t> pos(sz(S));
      std::iota(pos.begin(), pos.end(), 0);
      for (int b = 0; b < B; ++b) {
        OpCounter t{ops_, "attention_bwd"};
        const Index r = sz(b) * sz(S);
        attention_bwd<T>(a, S, S, s.cq.data() + r * sz(hs * d), s.ck.data() + r * sz(kvs * d),
                         s.cv.data() + r * sz(kvs * d), pos.data(), pos.data(),
                         s.co.data() + r * sz(hs * d), s.clse.data() + r * sz(hs),
                         cdo.data() + r * sz(hs * d), cdq.data() + r * sz(hs * d),
                         cdk.data() + r * sz(kvs * d), cdv.data() + r * sz(kvs * d));
      }
      dq = to_tokens(cdq, hl_, d);
      dk = to_tokens(cdk, kvl_, d);
      dv = to_tokens(cdv, kvl_, d);
    }
    {
      OpCounter t{ops_, "rope"};
      const auto pos = chunk_row_positions();
      rope<T>(ng_, hl_, d, pos.data(), c_.rope_theta, dq.data(), true);
      rope<T>(ng_, kvl_, d, pos.data(), c_.rope_theta, dk.data(), true);
    }
    if (c_.qk_norm) {
      OpCounter t{ops_, "rmsnorm"};
      std::vector<T> dqp(dq.size()), dkp(dk.size());
      rmsnorm_bwd<T>(ng_ * hl_, d, s.q_pre.data(), value(ParamRole::q_norm, l).data(),
                     s.q_rstd.data(), dq.data(), dqp.data(), grad(ParamRole::q_norm, l).data());
      rmsnorm_bwd<T>(ng_ * kvl_, d, s.k_pre.data(), value(ParamRole::k_norm, l).data(),
                     s.k_rstd.data(), dk.data(), dkp.data(), grad(ParamRole::k_norm, l).data());
      dq = std::move(dqp);
      dk = std::move(dkp);
    }
    std::vector<T> dxg(sz(ng_) * sz(H), T(0));
    gemm(ng_, H, hl_ * d, dq.data(), false, value(ParamRole::wq, l).data(), true, dxg.data(), true);
    gemm(ng_, H, kvl_ * d, dk.data(), false, value(ParamRole::wk, l).data(), true, dxg.data(),
         true);
    gemm(ng_, H, kvl_ * d, dv.data(), false, value(ParamRole::wv, l).data(), true, dxg.data(),
         true);
    {
      T* gq = grad(ParamRole::wq, l).data();
      T* gk = grad(ParamRole::wk, l).data();
      T* gv = grad(ParamRole::wv, l).data();
      wgrad([this, gq, gk, gv, xg = s.xg, dq, dk, dv, H, d] {
        gemm(H, hl_ * d, ng_, xg.data(), true, dq.data(), false, gq, true);
        gemm(H, kvl_ * d, ng_, xg.data(), true, dk.data(), false, gk, true);
        gemm(H, kvl_ * d, ng_, xg.data(), true, dv.data(), false, gv, true);
      });
    }
    std::vector<T> dxn = reduce_scatter(a_tp_, dxg);
    return norm_backward(ParamRole::attn_norm, l, s.x, s.rstd, dxn, &dy);
  }

  // Dense SwiGLU block: RMSNorm, SP all-gather over the dense tp group, column-parallel gate/up,
  // row-parallel down, reduce-scatter, residual.
  std::vector<T> dense_compute(int l, MlpSaved<T>& s) {
    const int H = c_.hidden, F = c_.dense_ffn / p_.dense.tp;
    std::vector<T> xn = norm_forward(ParamRole::mlp_norm, l, s.x, s.rstd);
    s.xg = all_gather(d_tp_, xn);
    const int rows = static_cast<int>(s.xg.size() / sz(H));
    s.gate.assign(sz(rows) * sz(F), T(0));
    s.up.assign(sz(rows) * sz(F), T(0));
    s.act.assign(sz(rows) * sz(F), T(0));
    gemm(rows, F, H, s.xg.data(), false, value(ParamRole::dense_gate, l).data(), false,
         s.gate.data(), false);
    gemm(rows, F, H, s.xg.data(), false, value(ParamRole::dense_up, l).data(), false, s.up.data(),
         false);
    {
      OpCounter t{ops_, "swiglu"};
      swiglu_fwd<T>(s.act.size(), s.gate.data(), s.up.data(), s.act.data());
    }
    std::vector<T> out(sz(rows) * sz(H));
    gemm(rows, H, F, s.act.data(), false, value(ParamRole::dense_down, l).data(), false, out.data(),
         false);
    std::vector<T> y = reduce_scatter(d_tp_, out);
    for (Index i = 0; i < y.size(); ++i)
      y[i] += s.x[i];
    s.has_all = true;
    return y;
  }

  std::vector<T> dense_backward(int l, MlpSaved<T>& s, const std::vector<T>& dy) {
    const int H = c_.hidden, F = c_.dense_ffn / p_.dense.tp;
    std::vector<T> dyg = all_gather(d_tp_, dy);
    const int rows = static_cast<int>(dyg.size() / sz(H));
    std::vector<T> dact(sz(rows) * sz(F)), dgate(dact.size()), dup(dact.size());
    gemm(rows, F, H, dyg.data(), false, value(ParamRole::dense_down, l).data(), true, dact.data(),
         false);
    {
      OpCounter t{ops_, "swiglu"};
      swiglu_bwd<T>(dact.size(), s.gate.data(), s.up.data(), dact.data(), dgate.data(), dup.data());
    }
    std::vector<T> dxg(sz(rows) * sz(H), T(0));
    gemm(rows, H, F, dgate.data(), false, value(ParamRole::dense_gate, l).data(), true, dxg.data(),
         true);
    gemm(rows, H, F, dup.data(), false, value(ParamRole::dense_up, l).data(), true, dxg.data(),
         true);
    {
      T* gd = grad(ParamRole::dense_down, l).data();
      T* gg = grad(ParamRole::dense_gate, l).data();
      T* gu = grad(ParamRole::dense_up, l).data();
      wgrad([this, gd, gg, gu, act = s.act, xg = s.xg, dyg, dgate, dup, rows, H, F] {
        gemm(F, H, rows, act.data(), true, dyg.data(), false, gd, true);
        gemm(H, F, rows, xg.data(), true, dgate.data(), false, gg, true);
        gemm(H, F, rows, xg.data(), true, dup.data(), false, gu, true);
      });
    }
    std::vector<T> dxn = reduce_scatter(d_tp_, dxg);
    return norm_backward(ParamRole::mlp_norm, l, s.x, s.rstd, dxn, &dy);
  }

  // MoE block (dropless): RMSNorm, router top-k on my rows, permute by destination expert,
  // all-to-all over the EP group, all-gather over the ETP group, grouped SwiGLU GEMMs over my
  // experts' columns, reduce-scatter over ETP, all-to-all back, unpermute weighted by the
  // routing weights, residual.
  std::vector<T> moe_compute(int l, MlpSaved<T>& s) {
    const int H = c_.hidden, E = c_.experts, K = c_.top_k, EP = p_.moe.ep;
    const int per_rank = E / EP;
    s.xn = norm_forward(ParamRole::mlp_norm, l, s.x, s.rstd);
    std::vector<T> logits(sz(n_) * sz(E));
    gemm(n_, E, H, s.xn.data(), false, value(ParamRole::router, l).data(), false, logits.data(),
         false);
    s.probs.assign(logits.size(), T(0));
    s.idx.assign(sz(n_) * sz(K), 0);
    s.weights.assign(sz(n_) * sz(K), T(0));
    {
      OpCounter t{ops_, "router"};
      router_topk_fwd<T>(n_, E, K, c_.normalize_top_k, logits.data(), s.probs.data(), s.idx.data(),
                         s.weights.data());
    }
    // Permute: (token, slot) pairs ordered by destination rank, then expert, then token.
    s.order.resize(sz(n_) * sz(K));
    std::iota(s.order.begin(), s.order.end(), 0);
    std::stable_sort(s.order.begin(), s.order.end(),
                     [&](std::int32_t a, std::int32_t b) { return s.idx[sz(a)] < s.idx[sz(b)]; });
    s.send_rows.assign(sz(EP), 0);
    std::vector<std::size_t> per_expert(sz(E), 0);
    std::vector<std::int32_t> tokens(s.order.size());
    for (Index i = 0; i < s.order.size(); ++i) {
      tokens[i] = s.order[i] / K;
      const int expert = s.idx[sz(s.order[i])];
      per_expert[sz(expert)] += 1;
      s.send_rows[sz(expert / per_rank)] += 1;
    }
    std::vector<T> send(s.order.size() * sz(H));
    {
      OpCounter t{ops_, "permute"};
      gather_rows<T>(static_cast<int>(tokens.size()), H, s.xn.data(), tokens.data(), send.data());
    }
    // One all-to-all of per-expert counts (Megatron-Core's MoEAlltoAllTokenDispatcher): row j
    // of `from` holds how many rows of each of my experts rank j sends. Rows arrive grouped by
    // source rank, then expert, so the counts also say which expert each received row is for.
    const std::vector<std::size_t> from = exchange_counts(m_ep_, per_expert, per_rank);
    s.recv_rows.assign(sz(EP), 0);
    for (int j = 0; j < EP; ++j)
      for (int e = 0; e < per_rank; ++e)
        s.recv_rows[sz(j)] += from[sz(j * per_rank + e)];
    const std::vector<T> recv =
        all_to_all(m_ep_, send, scaled(s.send_rows, H), scaled(s.recv_rows, H));
    // ETP: every rank of the group computes its columns for the group's tokens.
    const auto gathered = etp_gather(s, recv, from);
    s.rows_in = gathered.first;
    s.rows_expert = gathered.second;
    std::vector<T> out = experts_forward(l, s);
    std::vector<T> mine = etp_scatter(s, out);
    s.ret = all_to_all(m_ep_, mine, scaled(s.recv_rows, H), scaled(s.send_rows, H));
    std::vector<T> y = s.x;
    {
      OpCounter t{ops_, "unpermute"};
      for (Index i = 0; i < s.order.size(); ++i) {
        const Index tok = sz(s.order[i] / K);
        const T wgt = s.weights[sz(s.order[i])];
        for (int h = 0; h < H; ++h)
          y[tok * sz(H) + sz(h)] += wgt * s.ret[i * sz(H) + sz(h)];
      }
    }
    s.has_all = true;
    return y;
  }

  static std::vector<std::size_t> scaled(const std::vector<std::size_t>& rows, int h) {
    std::vector<std::size_t> out(rows);
    for (auto& r : out)
      r *= sz(h);
    return out;
  }
  // Sends every rank of `g` the counts of its `per_rank` experts (send: one count per expert of
  // the model, in expert order); returns [g.size() x per_rank]: what each rank sends me.
  std::vector<std::size_t> exchange_counts(const Comm& g, const std::vector<std::size_t>& send,
                                           int per_rank) {
    if (g.size() == 1)
      return send;
    std::vector<std::int64_t> s64(send.begin(), send.end()), r64(send.size());
    const std::vector<std::size_t> counts(sz(g.size()), sz(per_rank));
    {
      OpCounter t{ops_, "all_to_all"};
      g.all_to_all_v(s64.data(), counts, r64.data(), counts);
    }
    return std::vector<std::size_t>(r64.begin(), r64.end());
  }

  // The global expert of each row received from the EP group, from the counts [ep x per_rank].
  std::vector<std::int32_t> experts_of(const std::vector<std::size_t>& from) const {
    const int per_rank = c_.experts / p_.moe.ep;
    std::vector<std::int32_t> out;
    for (Index i = 0; i < from.size(); ++i)
      out.insert(out.end(), from[i],
                 static_cast<std::int32_t>(co_.m_ep * per_rank + static_cast<int>(i) % per_rank));
    return out;
  }

  // ETP: one all-gather of the group's count tables (each rank's [ep x per_rank] counts, from
  // which every rank derives the others' row counts, the largest, and each row's expert, as
  // Megatron-Core gathers counts rather than ids), then the all-gather of the rows, padded to
  // the group's largest count (expert id -1 marks padding).
  std::pair<std::vector<T>, std::vector<std::int32_t>>
  etp_gather(MlpSaved<T>& s, const std::vector<T>& rows, const std::vector<std::size_t>& from) {
    const int H = c_.hidden;
    std::vector<std::int32_t> experts = experts_of(from);
    s.etp_rows = static_cast<std::int64_t>(experts.size());
    if (m_etp_.size() == 1) {
      s.etp_max = s.etp_rows;
      return {rows, experts};
    }
    const std::vector<std::int64_t> mine(from.begin(), from.end());
    std::vector<std::int64_t> tables(mine.size() * sz(m_etp_.size()));
    {
      OpCounter t{ops_, "all_gather"};
      m_etp_.all_gather(mine.data(), mine.size(), tables.data());
    }
    std::vector<std::vector<std::int32_t>> member_experts;
    std::int64_t mx = 0;
    for (int r = 0; r < m_etp_.size(); ++r) {
      const auto first = tables.begin() + static_cast<std::ptrdiff_t>(sz(r) * mine.size());
      member_experts.push_back(experts_of(
          std::vector<std::size_t>(first, first + static_cast<std::ptrdiff_t>(mine.size()))));
      mx = std::max(mx, static_cast<std::int64_t>(member_experts.back().size()));
    }
    s.etp_max = mx;
    std::vector<std::int32_t> all_e;
    for (auto& e : member_experts) {
      e.resize(sz(mx), -1);
      all_e.insert(all_e.end(), e.begin(), e.end());
    }
    std::vector<T> pr(rows);
    pr.resize(sz(mx) * sz(H), T(0));
    return {all_gather(m_etp_, pr), all_e};
  }
  std::vector<T> etp_scatter(const MlpSaved<T>& s, const std::vector<T>& rows) {
    if (m_etp_.size() == 1)
      return rows;
    std::vector<T> mine = reduce_scatter(m_etp_, rows);
    mine.resize(sz(s.etp_rows) * sz(c_.hidden));
    return mine;
  }

  // The grouped GEMMs: rows of each of my experts through its SwiGLU (my ETP columns).
  std::vector<T> experts_forward(int l, MlpSaved<T>& s) {
    const int H = c_.hidden, F = c_.expert_ffn / p_.moe.etp, per_rank = c_.experts / p_.moe.ep;
    const Index rows = s.rows_expert.size();
    s.gate.assign(rows * sz(F), T(0));
    s.up.assign(rows * sz(F), T(0));
    s.act.assign(rows * sz(F), T(0));
    std::vector<T> out(rows * sz(H), T(0));
    const auto& wg = value(ParamRole::expert_gate, l);
    const auto& wu = value(ParamRole::expert_up, l);
    const auto& wd = value(ParamRole::expert_down, l);
    for (int e = 0; e < per_rank; ++e) {
      const std::vector<std::int32_t> sel = rows_of_expert(s, e);
      if (sel.empty())
        continue;
      const int r = static_cast<int>(sel.size());
      std::vector<T> x(sz(r) * sz(H)), g(sz(r) * sz(F)), u(g.size()), a(g.size()), o(sz(r) * sz(H));
      gather_rows<T>(r, H, s.rows_in.data(), sel.data(), x.data());
      OpCounter t{ops_, "grouped_gemm"};
      real::gemm<T>(r, F, H, x.data(), false, wg.data() + sz(e) * sz(H * F), false, g.data(),
                    false);
      real::gemm<T>(r, F, H, x.data(), false, wu.data() + sz(e) * sz(H * F), false, u.data(),
                    false);
      swiglu_fwd<T>(a.size(), g.data(), u.data(), a.data());
      real::gemm<T>(r, H, F, a.data(), false, wd.data() + sz(e) * sz(F * H), false, o.data(),
                    false);
      for (int i = 0; i < r; ++i) {
        std::copy_n(g.begin() + i * F, F,
                    s.gate.begin() + static_cast<std::ptrdiff_t>(sz(sel[sz(i)]) * sz(F)));
        std::copy_n(u.begin() + i * F, F,
                    s.up.begin() + static_cast<std::ptrdiff_t>(sz(sel[sz(i)]) * sz(F)));
        std::copy_n(a.begin() + i * F, F,
                    s.act.begin() + static_cast<std::ptrdiff_t>(sz(sel[sz(i)]) * sz(F)));
        std::copy_n(o.begin() + i * H, H,
                    out.begin() + static_cast<std::ptrdiff_t>(sz(sel[sz(i)]) * sz(H)));
      }
    }
    return out;
  }
  std::vector<std::int32_t> rows_of_expert(const MlpSaved<T>& s, int local_expert) const {
    const int global = co_.m_ep * (c_.experts / p_.moe.ep) + local_expert;
    std::vector<std::int32_t> sel;
    for (Index i = 0; i < s.rows_expert.size(); ++i)
      if (s.rows_expert[i] == global)
        sel.push_back(static_cast<std::int32_t>(i));
    return sel;
  }

  std::vector<T> moe_backward(int l, MlpSaved<T>& s, const std::vector<T>& dy) {
    const int H = c_.hidden, E = c_.experts, K = c_.top_k, F = c_.expert_ffn / p_.moe.etp;
    const int per_rank = E / p_.moe.ep;
    // Unpermute's adjoint: each sent row's gradient, and each routing weight's.
    std::vector<T> dret(s.ret.size());
    std::vector<T> dweights(s.weights.size(), T(0));
    for (Index i = 0; i < s.order.size(); ++i) {
      const Index tok = sz(s.order[i] / K);
      const T wgt = s.weights[sz(s.order[i])];
      T dot = 0;
      for (int h = 0; h < H; ++h) {
        dret[i * sz(H) + sz(h)] = wgt * dy[tok * sz(H) + sz(h)];
        dot += dy[tok * sz(H) + sz(h)] * s.ret[i * sz(H) + sz(h)];
      }
      dweights[sz(s.order[i])] = dot;
    }
    const std::vector<T> drecv =
        all_to_all(m_ep_, dret, scaled(s.send_rows, H), scaled(s.recv_rows, H));
    std::vector<T> dout = drecv;
    if (m_etp_.size() > 1) {
      dout.resize(sz(s.etp_max) * sz(H), T(0));
      dout = all_gather(m_etp_, dout);
    }
    const Index rows = s.rows_expert.size();
    std::vector<T> dx_rows(rows * sz(H), T(0));
    const auto& wg = value(ParamRole::expert_gate, l);
    const auto& wu = value(ParamRole::expert_up, l);
    const auto& wd = value(ParamRole::expert_down, l);
    T* gg = grad(ParamRole::expert_gate, l).data();
    T* gu = grad(ParamRole::expert_up, l).data();
    T* gd = grad(ParamRole::expert_down, l).data();
    for (int e = 0; e < per_rank; ++e) {
      const std::vector<std::int32_t> sel = rows_of_expert(s, e);
      if (sel.empty())
        continue;
      const int r = static_cast<int>(sel.size());
      std::vector<T> x(sz(r) * sz(H)), g(sz(r) * sz(F)), u(g.size()), a(g.size()),
          dox(sz(r) * sz(H));
      gather_rows<T>(r, H, s.rows_in.data(), sel.data(), x.data());
      gather_rows<T>(r, F, s.gate.data(), sel.data(), g.data());
      gather_rows<T>(r, F, s.up.data(), sel.data(), u.data());
      gather_rows<T>(r, F, s.act.data(), sel.data(), a.data());
      gather_rows<T>(r, H, dout.data(), sel.data(), dox.data());
      std::vector<T> da(g.size()), dg(g.size()), du(g.size()), dxe(sz(r) * sz(H), T(0));
      {
        OpCounter t{ops_, "grouped_gemm"};
        real::gemm<T>(r, F, H, dox.data(), false, wd.data() + sz(e) * sz(F * H), true, da.data(),
                      false);
        swiglu_bwd<T>(da.size(), g.data(), u.data(), da.data(), dg.data(), du.data());
        real::gemm<T>(r, H, F, dg.data(), false, wg.data() + sz(e) * sz(H * F), true, dxe.data(),
                      true);
        real::gemm<T>(r, H, F, du.data(), false, wu.data() + sz(e) * sz(H * F), true, dxe.data(),
                      true);
      }
      wgrad([this, e, r, H, F, gg, gu, gd, x, a, dox, dg, du] {
        OpCounter t{ops_, "grouped_gemm"};
        real::gemm<T>(F, H, r, a.data(), true, dox.data(), false, gd + sz(e) * sz(F * H), true);
        real::gemm<T>(H, F, r, x.data(), true, dg.data(), false, gg + sz(e) * sz(H * F), true);
        real::gemm<T>(H, F, r, x.data(), true, du.data(), false, gu + sz(e) * sz(H * F), true);
      });
      scatter_add_rows<T>(r, H, dxe.data(), sel.data(), dx_rows.data());
    }
    std::vector<T> dmine = etp_scatter(s, dx_rows);
    const std::vector<T> dsent =
        all_to_all(m_ep_, dmine, scaled(s.recv_rows, H), scaled(s.send_rows, H));
    std::vector<T> dxn(s.xn.size(), T(0));
    {
      OpCounter t{ops_, "unpermute"};
      std::vector<std::int32_t> tokens(s.order.size());
      for (Index i = 0; i < s.order.size(); ++i)
        tokens[i] = s.order[i] / K;
      scatter_add_rows<T>(static_cast<int>(tokens.size()), H, dsent.data(), tokens.data(),
                          dxn.data());
    }
    std::vector<T> dlogits(sz(n_) * sz(E));
    {
      OpCounter t{ops_, "router"};
      router_topk_bwd<T>(n_, E, K, c_.normalize_top_k, s.probs.data(), s.idx.data(),
                         dweights.data(), dlogits.data());
    }
    gemm(n_, H, E, dlogits.data(), false, value(ParamRole::router, l).data(), true, dxn.data(),
         true);
    gemm(H, E, n_, s.xn.data(), true, dlogits.data(), false, grad(ParamRole::router, l).data(),
         true);
    return norm_backward(ParamRole::mlp_norm, l, s.x, s.rstd, dxn, &dy);
  }

  // --- embedding and LM head -----------------------------------------------------------------
  // ZeRO-3: one all-gather of every member's shard over the bucket's shard group.
  void ensure(Bucket& b) {
    if (b.zero < 3 || !params_[b.members.front()].value.empty())
      return;
    std::vector<std::vector<T>> mine;
    for (Index k : b.members)
      mine.push_back(params_[k].owned);
    std::vector<std::vector<T>> all = gather_shards(b, mine);
    for (Index i = 0; i < b.members.size(); ++i)
      params_[b.members[i]].value = std::move(all[i]);
  }
  void drop(Bucket& b) {
    if (b.zero < 3)
      return;
    for (Index k : b.members) {
      params_[k].value.clear();
      params_[k].value.shrink_to_fit();
    }
  }
  // The whole slices of a bucket's members from their shards (`mine[i]`: chunk elements of
  // member i), in one all-gather: each rank's block holds its shard of every member in turn.
  std::vector<std::vector<T>> gather_shards(const Bucket& b,
                                            const std::vector<std::vector<T>>& mine) {
    const Index parts = sz(b.shard.size());
    Index total = 0;
    for (Index k : b.members)
      total += params_[k].chunk;
    std::vector<T> send;
    send.reserve(total);
    for (const auto& m : mine)
      send.insert(send.end(), m.begin(), m.end());
    std::vector<T> all = send;
    if (parts > 1) {
      all.assign(total * parts, T(0));
      OpCounter t{ops_, "all_gather"};
      b.shard.all_gather(send.data(), total, all.data());
    }
    std::vector<std::vector<T>> out;
    Index off = 0;
    for (Index k : b.members) {
      const auto& lp = params_[k];
      std::vector<T> whole;
      whole.reserve(lp.chunk * parts);
      for (Index r = 0; r < parts; ++r)
        whole.insert(whole.end(), all.begin() + static_cast<std::ptrdiff_t>(r * total + off),
                     all.begin() + static_cast<std::ptrdiff_t>(r * total + off + lp.chunk));
      whole.resize(lp.n);
      out.push_back(std::move(whole));
      off += lp.chunk;
    }
    return out;
  }
  // My shard of every member's summed slice gradient, in one reduce-scatter: the send buffer
  // holds, rank block after rank block, each member's part for that rank (padded to chunk).
  std::vector<std::vector<T>> scatter_grads(const Bucket& b) {
    const Index parts = sz(b.shard.size());
    Index total = 0;
    for (Index k : b.members)
      total += params_[k].chunk;
    std::vector<T> send(total * parts, T(0));
    Index off = 0;
    for (Index r = 0; r < parts; ++r)
      for (Index k : b.members) {
        const auto& lp = params_[k];
        const Index lo = std::min(lp.n, r * lp.chunk), hi = std::min(lp.n, lo + lp.chunk);
        std::copy(lp.grad.begin() + static_cast<std::ptrdiff_t>(lo),
                  lp.grad.begin() + static_cast<std::ptrdiff_t>(hi),
                  send.begin() + static_cast<std::ptrdiff_t>(off));
        off += lp.chunk;
      }
    std::vector<T> mine(send.begin(), send.begin() + static_cast<std::ptrdiff_t>(total));
    if (parts > 1) {
      OpCounter t{ops_, "reduce_scatter"};
      b.shard.reduce_scatter(send.data(), total, mine.data());
    }
    std::vector<std::vector<T>> out;
    off = 0;
    for (Index k : b.members) {
      out.emplace_back(mine.begin() + static_cast<std::ptrdiff_t>(off),
                       mine.begin() + static_cast<std::ptrdiff_t>(off + params_[k].chunk));
      off += params_[k].chunk;
    }
    return out;
  }
  // Sums every member's `grad` over `g` in one all-reduce.
  void all_reduce_grads(const Comm& g, const Bucket& b) {
    if (g.size() == 1)
      return;
    std::vector<T> all;
    for (Index k : b.members)
      all.insert(all.end(), params_[k].grad.begin(), params_[k].grad.end());
    {
      OpCounter t{ops_, "all_reduce"};
      g.all_reduce(all.data(), all.size());
    }
    Index off = 0;
    for (Index k : b.members) {
      auto& gr = params_[k].grad;
      std::copy_n(all.begin() + static_cast<std::ptrdiff_t>(off), gr.size(), gr.begin());
      off += gr.size();
    }
  }
  // The gradients of the bucket's norms and router, summed over their TP group in one
  // all-reduce (the TP-split members are not summed).
  void sum_over_tp(const Bucket& b) {
    std::vector<T> all;
    const Comm* g = nullptr;
    for (Index k : b.members)
      if (params_[k].tp_sum.size() > 1) {
        g = &params_[k].tp_sum;
        all.insert(all.end(), params_[k].grad.begin(), params_[k].grad.end());
      }
    if (g == nullptr)
      return;
    {
      OpCounter t{ops_, "all_reduce"};
      g->all_reduce(all.data(), all.size());
    }
    Index off = 0;
    for (Index k : b.members)
      if (params_[k].tp_sum.size() > 1) {
        auto& gr = params_[k].grad;
        std::copy_n(all.begin() + static_cast<std::ptrdiff_t>(off), gr.size(), gr.begin());
        off += gr.size();
      }
  }
  // ZeRO-3 layers reduce-scatter after every micro-batch's backward (FSDP2), so no unsharded
  // gradient outlives its layer's backward; the embedding and the LM head once per step.
  bool scatters_every_micro_batch(const Bucket& b) const { return b.zero >= 3 && b.layer >= 0; }
  void scatter_micro_batch(int layer) {
    for (auto& b : buckets_) {
      if (b.layer != layer || !scatters_every_micro_batch(b))
        continue;
      sum_over_tp(b);
      const auto mine = scatter_grads(b);
      for (Index i = 0; i < b.members.size(); ++i) {
        auto& lp = params_[b.members[i]];
        for (Index k = 0; k < lp.chunk; ++k)
          lp.acc[k] += mine[i][k];
        std::fill(lp.grad.begin(), lp.grad.end(), T(0));
      }
    }
  }

  // Vocab-parallel embedding: each rank of the embedding tp group reads the ids of the group's
  // rows (as Megatron's ranks each read the micro-batch), looks up those of its vocabulary shard,
  // and a reduce-scatter returns every rank its rows.
  std::vector<T> embed_forward(int mb) {
    const int H = c_.hidden, shard = c_.vocab / p_.embed.tp, lo = co_.e_tp * shard;
    auto& lp = param(ParamRole::embedding, -1);
    ensure(bucket_of(lp));
    const std::vector<std::int32_t> ids_g = group_rows(e_tp_, mb, batch_.tokens);
    std::vector<T> rows(ids_g.size() * sz(H), T(0));
    {
      OpCounter t{ops_, "embedding"};
      for (Index r = 0; r < ids_g.size(); ++r)
        if (ids_g[r] >= lo && ids_g[r] < lo + shard)
          std::copy_n(lp.value.begin() + static_cast<std::ptrdiff_t>(sz(ids_g[r] - lo) * sz(H)), H,
                      rows.begin() + static_cast<std::ptrdiff_t>(r * sz(H)));
    }
    drop(bucket_of(lp));
    return reduce_scatter(e_tp_, rows);
  }

  void embed_backward(int mb, const std::vector<T>& dx) {
    const int H = c_.hidden, shard = c_.vocab / p_.embed.tp, lo = co_.e_tp * shard;
    const std::vector<std::int32_t> ids_g = group_rows(e_tp_, mb, batch_.tokens);
    const std::vector<T> dxg = all_gather(e_tp_, dx);
    T* g = param(ParamRole::embedding, -1).grad.data();
    OpCounter t{ops_, "embedding"};
    for (Index r = 0; r < ids_g.size(); ++r)
      if (ids_g[r] >= lo && ids_g[r] < lo + shard)
        for (int h = 0; h < H; ++h)
          g[sz(ids_g[r] - lo) * sz(H) + sz(h)] += dxg[r * sz(H) + sz(h)];
  }

  LocalParam<T>& head_weight() {
    return c_.tied_embeddings ? param(ParamRole::embedding, -1) : param(ParamRole::lm_head, -1);
  }
  // The buckets the head reads (the final norm's and the head weight's), gathered for the
  // head's forward and again for its backward under ZeRO-3.
  std::vector<Bucket*> head_buckets() {
    std::vector<Bucket*> out{&bucket_of(param(ParamRole::final_norm, -1))};
    if (&bucket_of(head_weight()) != out.front())
      out.push_back(&bucket_of(head_weight()));
    return out;
  }

  // Final norm, vocab-parallel LM head and cross-entropy (max, sum of exponentials and the
  // label's logit all-reduced over the embedding tp group, as Megatron's
  // vocab_parallel_cross_entropy). The logits' gradient is formed here, as the fused kernels do.
  void head_forward(int mb, std::vector<T> x) {
    const int H = c_.hidden, V = c_.vocab / p_.embed.tp, lo = co_.e_tp * V;
    auto& hs = head_[sz(mb)];
    const auto held = head_buckets();
    for (Bucket* b : held)
      ensure(*b);
    hs.x = std::move(x);
    hs.xn = norm_forward(ParamRole::final_norm, -1, hs.x, hs.rstd);
    hs.xg = all_gather(e_tp_, hs.xn);
    const int rows = static_cast<int>(hs.xg.size() / sz(H));
    auto& w = head_weight();
    std::vector<T> logits(sz(rows) * sz(V));
    gemm(rows, V, H, hs.xg.data(), false, w.value.data(), c_.tied_embeddings, logits.data(), false);
    for (Bucket* b : held)
      drop(*b);
    const std::vector<std::int32_t> labels_g = group_rows(e_tp_, mb, batch_.labels);
    const double scale = 1.0 / static_cast<double>(labelled_);
    hs.dlogits.assign(logits.size(), T(0));
    OpCounter t{ops_, "cross_entropy"};
    if (e_tp_.size() == 1) {
      loss_sum_ +=
          cross_entropy<T>(rows, V, logits.data(), labels_g.data(), scale, hs.dlogits.data());
      return;
    }
    std::vector<T> mx(sz(rows)), sum(sz(rows), T(0)), target(sz(rows), T(0));
    for (int r = 0; r < rows; ++r)
      mx[sz(r)] = *std::max_element(logits.begin() + r * V, logits.begin() + (r + 1) * V);
    {
      OpCounter c{ops_, "all_reduce"};
      e_tp_.all_reduce_max(mx.data(), mx.size());
    }
    for (int r = 0; r < rows; ++r) {
      for (int v = 0; v < V; ++v)
        sum[sz(r)] += std::exp(logits[sz(r) * sz(V) + sz(v)] - mx[sz(r)]);
      const int label = labels_g[sz(r)];
      if (label >= lo && label < lo + V)
        target[sz(r)] = logits[sz(r) * sz(V) + sz(label - lo)];
    }
    {
      OpCounter c{ops_, "all_reduce"};
      e_tp_.all_reduce(sum.data(), sum.size());
    }
    {
      OpCounter c{ops_, "all_reduce"};
      e_tp_.all_reduce(target.data(), target.size());
    }
    const int me = e_tp_.rank(), own = rows / e_tp_.size();
    for (int r = 0; r < rows; ++r) {
      const int label = labels_g[sz(r)];
      if (label < 0)
        continue;
      if (r / own == me)
        loss_sum_ += static_cast<double>(std::log(sum[sz(r)]) + mx[sz(r)] - target[sz(r)]);
      for (int v = 0; v < V; ++v) {
        const T p = std::exp(logits[sz(r) * sz(V) + sz(v)] - mx[sz(r)]) / sum[sz(r)];
        hs.dlogits[sz(r) * sz(V) + sz(v)] =
            static_cast<T>(scale) * (p - (label == lo + v ? T(1) : T(0)));
      }
    }
  }

  std::vector<T> head_backward(int mb) {
    const int H = c_.hidden, V = c_.vocab / p_.embed.tp;
    auto& hs = head_[sz(mb)];
    const int rows = static_cast<int>(hs.xg.size() / sz(H));
    const auto held = head_buckets();
    for (Bucket* b : held)
      ensure(*b);
    auto& w = head_weight();
    std::vector<T> dxg(sz(rows) * sz(H), T(0));
    gemm(rows, H, V, hs.dlogits.data(), false, w.value.data(), !c_.tied_embeddings, dxg.data(),
         false);
    T* g = w.grad.data();
    if (c_.tied_embeddings)
      wgrad([this, g, rows, H, V, dl = hs.dlogits, xg = hs.xg] {
        gemm(V, H, rows, dl.data(), true, xg.data(), false, g, true);
      });
    else
      wgrad([this, g, rows, H, V, dl = hs.dlogits, xg = hs.xg] {
        gemm(H, V, rows, xg.data(), true, dl.data(), false, g, true);
      });
    std::vector<T> dxn = reduce_scatter(e_tp_, dxg);
    std::vector<T> dx = norm_backward(ParamRole::final_norm, -1, hs.x, hs.rstd, dxn, nullptr);
    for (Bucket* b : held)
      drop(*b);
    hs = HeadSaved<T>{};
    return dx;
  }

  // --- gradients and the optimizer -----------------------------------------------------------
  // The step's gradient reduction of a bucket: ZeRO-0 all-reduces; ZeRO 1 and 2 reduce-scatter
  // (each rank steps its shard only, as Megatron's distributed optimizer); ZeRO-3 layers have
  // reduce-scattered every micro-batch already. HSDP then all-reduces the shard over the
  // replicas, and tied embeddings sum their two copies' gradients.
  void reduce(Bucket& b) {
    if (b.reduced)
      return;
    b.reduced = true;
    if (!scatters_every_micro_batch(b))
      sum_over_tp(b);
    if (b.zero == 0) {
      all_reduce_grads(b.grads, b);
    } else {
      if (scatters_every_micro_batch(b)) {
        for (Index k : b.members)
          params_[k].grad = std::move(params_[k].acc);
      } else {
        auto mine = scatter_grads(b);
        for (Index i = 0; i < b.members.size(); ++i)
          params_[b.members[i]].grad = std::move(mine[i]);
      }
      all_reduce_grads(b.replicas, b);
    }
    for (Index k : b.members) {
      auto& lp = params_[k];
      if (lp.role == ParamRole::embedding && tied_.size() > 1) {
        OpCounter t{ops_, "all_reduce"};
        tied_.all_reduce(lp.grad.data(), lp.grad.size());
      }
      lp.pending_step = true;
      lp.grad_step = step_index_ + 1;
    }
    if (host_streams_backward() && b.layer >= 0)
      adam_step(b);
  }

  void finish_layer(int l) {
    for (auto& b : buckets_)
      if (b.layer == l)
        reduce(b);
  }
  void finish_others() {
    for (auto& b : buckets_)
      if (b.layer < 0)
        reduce(b);
  }
  void apply_pending(int l) {
    for (auto& b : buckets_)
      if (b.layer == l && pending(b))
        adam_step(b);
  }

  // AdamW on what each member owns; under ZeRO 1 and 2 one all-gather then brings every rank
  // the bucket's updated parameters.
  void adam_step(Bucket& b) {
    std::vector<std::vector<T>> mine;
    for (Index k : b.members) {
      auto& lp = params_[k];
      OpCounter t{ops_, p_.optimizer_on_host ? "host_adam" : "adamw"};
      lp.pending_step = false;
      const std::int64_t step = lp.grad_step;
      if (lp.zero == 0) {
        adamw<T>(lp.n, o_.adam, step, lp.value.data(), lp.grad.data(), lp.m.data(), lp.v.data());
      } else if (lp.zero >= 3) {
        adamw<T>(lp.hi - lp.lo, o_.adam, step, lp.owned.data(), lp.grad.data(), lp.m.data(),
                 lp.v.data());
        lp.value.clear(); // a gathered copy is stale now
      } else {
        std::vector<T> part(lp.chunk, T(0));
        std::copy(lp.value.begin() + static_cast<std::ptrdiff_t>(lp.lo),
                  lp.value.begin() + static_cast<std::ptrdiff_t>(lp.hi), part.begin());
        adamw<T>(lp.hi - lp.lo, o_.adam, step, part.data(), lp.grad.data(), lp.m.data(),
                 lp.v.data());
        mine.push_back(std::move(part));
      }
      if (lp.keep_grad_until_step) {
        lp.keep_grad_until_step = false;
        lp.grad.assign(lp.n, T(0));
      }
    }
    if (b.zero == 1 || b.zero == 2) {
      auto all = gather_shards(b, mine);
      for (Index i = 0; i < b.members.size(); ++i)
        params_[b.members[i]].value = std::move(all[i]);
    }
  }

  void publish_grads() {
    for (auto& lp : params_) {
      if (lp.tied_copy || lp.tp_sum.rank() != 0)
        continue;
      auto& full = sh_.grads[sz(lp.index)];
      if (lp.zero == 0) {
        if (lp.grads.rank() == 0)
          insert(lp.grad, lp.slice, full);
      } else if (lp.replicas.rank() == 0) {
        for (Index k = lp.lo; k < lp.hi; ++k)
          full[full_index(lp.slice, k)] = lp.grad[k - lp.lo];
      }
    }
  }

  void publish_state(LocalParam<T>& lp) {
    if (!lp.writer)
      return;
    auto& st = sh_.state;
    const auto i = sz(lp.index);
    if (lp.zero == 0) {
      insert(lp.value, lp.slice, st.params[i]);
      insert(lp.m, lp.slice, st.adam_m[i]);
      insert(lp.v, lp.slice, st.adam_v[i]);
      return;
    }
    for (Index k = lp.lo; k < lp.hi; ++k) {
      const Index f = full_index(lp.slice, k);
      st.params[i][f] = lp.zero >= 3 ? lp.owned[k - lp.lo] : lp.value[k];
      st.adam_m[i][f] = lp.m[k - lp.lo];
      st.adam_v[i][f] = lp.v[k - lp.lo];
    }
  }

  World& w_;
  int rank_;
  const TinyConfig& c_;
  const Plan& p_;
  Shared<T>& sh_;
  const RunOptions& o_;
  const DataSource& data_;
  // The layout: only hybrid CP's split depends on the node size, and hybrid CP is refused.
  sim::Mesh mesh_;
  Coords co_;
  std::vector<ParamInfo> layout_;
  std::map<std::string, OpTiming>* ops_;
  Comm stage_, a_tp_, a_cp_, a_grad_, m_etp_, m_ep_, m_edp_, d_tp_, d_dp_, e_tp_, e_dp_, tied_;
  int chunks_ = 1;
  std::vector<int> bounds_, layers_;
  std::map<int, int> layer_chunk_;
  std::vector<LocalParam<T>> params_;
  std::vector<Bucket> buckets_;
  std::vector<int> idx_;
  int hl_ = 0, kvl_ = 0, lc_ = 0, ng_ = 0, n_ = 0;
  std::int64_t step_index_ = 0;
  Batch batch_;
  std::int64_t labelled_ = 0;
  double loss_sum_ = 0;
  std::vector<std::vector<LayerSaved<T>>> saved_;
  std::map<std::pair<int, int>, LayerSaved<T>> host_;
  std::vector<HeadSaved<T>> head_;
  std::vector<int> remaining_bwd_;
  bool defer_ = false;
  std::deque<std::function<void()>> deferred_;
};

// ---------------------------------------------------------------------------------------------
} // namespace

template <class T>
RunResult<T> run_plan(const TinyConfig& c, const Plan& plan, const DataSource& data,
                      const TrainState<T>& start, const RunOptions& o) {
  check_executable(c, plan, o.seq_len);
  data.check_sequence_length(o.seq_len);
  if (o.steps < 1)
    refuse("the number of steps must be at least 1");
  const auto layout = param_layout(c);
  if (start.params.size() != layout.size())
    refuse("the starting state does not match the model's parameters");
  Shared<T> sh;
  sh.state = start;
  for (const auto& p : start.params)
    sh.grads.emplace_back(p.size(), T(0));
  sh.loss_part.assign(sz(plan.world), 0.0);
  sh.ops.resize(sz(plan.world));
  RunResult<T> res;
  std::unique_ptr<ReferenceTrainer<double>> ref;
  if (o.check)
    ref = std::make_unique<ReferenceTrainer<double>>(c, to_double(start), o.adam);
  std::vector<int> everyone(sz(plan.world));
  std::iota(everyone.begin(), everyone.end(), 0);

  World::run(plan.world, [&](World& w, int r) {
    Rank<T> rank(w, r, c, plan, sh, o, data);
    const Comm all = w.group(everyone, r);
    for (int k = 0; k < o.steps; ++k) {
      const auto t0 = Clock::now();
      rank.step(start.step + k);
      all.barrier();
      if (r == 0) {
        res.step_time_s.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
        const Batch batch = data.batch(start.step + k, plan.global_batch, o.seq_len);
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
      all.barrier();
    }
    rank.finish_run();
  });

  res.state = std::move(sh.state);
  res.state.step = start.step + o.steps;
  if (ref)
    res.max_param_rel_diff = max_rel_diff(res.state.params, ref->state().params);
  for (const auto& per_rank : sh.ops)
    for (const auto& [kind, t] : per_rank) {
      auto& total = res.ops[kind];
      total.count += t.count;
      total.seconds += t.seconds / plan.world;
    }
  return res;
}

template RunResult<float> run_plan<float>(const TinyConfig&, const Plan&, const DataSource&,
                                          const TrainState<float>&, const RunOptions&);
template RunResult<double> run_plan<double>(const TinyConfig&, const Plan&, const DataSource&,
                                            const TrainState<double>&, const RunOptions&);

} // namespace mop::real
