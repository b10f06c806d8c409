#include "lowering/program.hpp"

#include "common/error.hpp"
#include "lowering/passes.hpp"
#include "strategies/mesh.hpp"
#include "strategies/pipeline.hpp"
#include "workload/flops.hpp"

#include <algorithm>
#include <cmath>
#include <fmt/format.h>
#include <map>
#include <stdexcept>
#include <tuple>

namespace mop::lowering {

using sim::Category;
using sim::Element;
using sim::Kernel;
using sim::OpKind;
using sim::TensorRole;
using strategy::LayerKind;
using strategy::Plan;
using Shape = std::vector<std::int64_t>;

namespace {

enum Stream { kCompute, kTp, kCp, kEp, kDp, kPp, kH2d, kD2h, kHost, kNumStreams };
const char* const kStreamNames[kNumStreams] = {"compute",  "comm.tp",  "comm.cp",
                                               "comm.ep",  "comm.dp",  "comm.pp",
                                               "copy.h2d", "copy.d2h", "host"};

std::int64_t numel(const Shape& s) {
  std::int64_t n = 1;
  for (auto d : s)
    n *= d;
  return n;
}

sim::MemoryKind memory_kind(TensorRole r) {
  switch (r) {
  case TensorRole::param:
  case TensorRole::param_shard:
    return sim::MemoryKind::weights;
  case TensorRole::grad:
    return sim::MemoryKind::grads;
  case TensorRole::optimizer_state:
    return sim::MemoryKind::optimizer;
  case TensorRole::comm_buffer:
    return sim::MemoryKind::comm_buffers;
  default:
    return sim::MemoryKind::activations;
  }
}

// A communicator's name from its spec: "attention.tp", "moe.edp", "dense.dp/8" (an HSDP block
// of 8), "dense.dp/8x" (across those blocks).
std::string group_name(const sim::GroupSpec& g) {
  std::string s = g.view;
  for (const std::string& d : g.dims)
    s += "." + d;
  if (g.block > 0)
    s += fmt::format("/{}{}", g.block, g.across_blocks ? "x" : "");
  if (g.ends_only)
    s += ".ends";
  return s;
}

// The parameters of one layer kind in one layer (or the embedding and head), reduced together
// over the kind's data-parallel ranks. A `replicated` parameter (a norm, the router) is held
// whole by every rank of the kind's TP group, each seeing other tokens under SP: its gradient is
// first summed over that group (Megatron's _allreduce_layernorm_grads in finalize_model_grads),
// then reduced in its kind's bucket with the rest. Under a pipeline the embedding (first stage)
// and the head (last stage) are separate buckets.
struct BucketKey {
  int layer = -1;
  LayerKind kind = LayerKind::embedding;
  bool replicated = false; // the parameter, not the bucket: buckets ignore it
  bool head = false;       // the last stage's final norm and LM head, under a pipeline
  // Replicated over TP but each rank holding a partial gradient (MLA's latent projections):
  // summed over the stage even without sequence parallelism.
  bool tp_partial = false;
  bool operator==(const BucketKey&) const = default;
};

// The activation collectives of tensor, expert and Ulysses context parallelism block the compute
// stream in issue order, as the cost-only lowering chains them on the data path: each starts after
// the compute op issued before it (a backward's reduce-scatter after the weight-gradient GEMM that
// precedes it, as autograd issues them) and the compute op issued after it waits for it (the
// compute stream waits for a blocking collective's result). The ring's hops and the data-parallel
// and pipeline traffic overlap: their dependencies are their operands'.
bool blocks_compute(const sim::Op& op) {
  return op.kernel == Kernel::collective && (op.stream == kTp || op.stream == kEp ||
                                             (op.stream == kCp && op.kind == OpKind::all_to_all));
}

void order_blocking_collectives(sim::RankClass& rc) {
  int last_compute = -1;
  std::vector<int> pending; // blocking collectives issued since the last compute op
  for (std::size_t i = 0; i < rc.ops.size(); ++i) {
    sim::Op& op = rc.ops[i];
    if (blocks_compute(op)) {
      if (last_compute >= 0)
        op.deps.push_back(last_compute);
      pending.push_back(static_cast<int>(i));
    } else if (op.stream == kCompute) {
      op.deps.insert(op.deps.end(), pending.begin(), pending.end());
      pending.clear();
      last_compute = static_cast<int>(i);
    }
  }
}

class Builder {
public:
  Builder(const Plan& p, const ProgramContext& c) : p_(p), c_(c), m_(*c.model) {
    const auto& a = m_.attention;
    h_ = m_.hidden_size;
    mla_ = a.kind == workload::AttentionKind::mla;
    d_ = a.qk_head_dim();
    dv_ = a.v_dim();
    hl_ = a.num_heads / p_.attention.tp;
    // MLA expands its latent to every head; key/value heads fewer than the TP ranks are
    // replicated, one on each rank (Megatron-Core).
    kv_replicated_ = !mla_ && a.num_kv_heads % p_.attention.tp != 0;
    kvl_ = mla_ ? hl_ : std::max<std::int64_t>(1, a.num_kv_heads / p_.attention.tp);
    sp_ = p_.attention.sp ||
          std::max({p_.attention.tp, p_.dense.tp, p_.embed.tp, p_.moe.etp}) == 1; // nothing split
    // A sequence that does not split evenly over CP (2·cp chunks with a ring) or rows over TP
    // are priced with the rounded-up share; such a program is priced only (tokens() says so).
    const strategy::CpSplit cps = strategy::cp_split(p_, c_.gpus_per_node);
    const std::int64_t cp_chunks = cps.ring > 1 ? 2 * p_.attention.cp : p_.attention.cp;
    lc_ = (c_.seq + cp_chunks - 1) / cp_chunks * (cp_chunks / p_.attention.cp);
    ng_ = p_.micro_batch * lc_;
    n_ = sp_ ? (ng_ + p_.attention.tp - 1) / p_.attention.tp : ng_;
    // A vocabulary the embedding TP does not divide is padded to a multiple of it (Megatron pads
    // to one of 128·tp); priced only, as the checkpoint's table has the model's rows.
    vl_ = (m_.vocab_size + p_.embed.tp - 1) / p_.embed.tp;
    vocab_ = vl_ * p_.embed.tp;
    // Without SP the ranks of every TP group must hold the same rows (one TP degree for all
    // kinds, as Megatron has); other degrees are priced only.
    inexact_ = lc_ * p_.attention.cp != c_.seq || (sp_ && n_ * p_.attention.tp != ng_) ||
               (!sp_ && (p_.dense.tp != p_.attention.tp || p_.embed.tp != p_.attention.tp)) ||
               vocab_ != m_.vocab_size;
    f_ = m_.dense_mlp.intermediate_size / p_.dense.tp;
    rows_e_ = sp_ ? n_ * p_.embed.tp : n_;
    rows_d_ = sp_ ? n_ * p_.dense.tp : n_;
    const strategy::CpSplit cp = strategy::cp_split(p_, c_.gpus_per_node);
    uly_ = cp.ulysses;
    ring_ = cp.ring;
  }

  sim::Schedule run();

private:
  const Plan& p_;
  const ProgramContext& c_;
  const workload::ModelSpec& m_;
  std::int64_t h_ = 0, d_ = 0, hl_ = 0, kvl_ = 0, lc_ = 0, ng_ = 0, n_ = 0, f_ = 0, vl_ = 0;
  std::int64_t dv_ = 0;        // the value head dim (d_ is q's and k's; they differ under MLA)
  std::int64_t vocab_ = 0;     // the vocabulary, padded to a multiple of the embedding TP
  bool mla_ = false;           // multi-head latent attention
  bool kv_replicated_ = false; // fewer key/value heads than TP ranks: one replica per rank
  bool sp_ = true;             // sequence parallelism (without it: all-reduces, whole rows)
  bool inexact_ = false;       // uneven CP or SP shares: priced with rounded-up shapes only
  std::int64_t rows_e_ = 0, rows_d_ = 0; // rows gathered over the embedding / dense TP group
  int uly_ = 1, ring_ = 1;               // context parallelism's Ulysses and ring parts
  int g_uly_ = -1, g_ring_ = -1;
  sim::Schedule s_;
  sim::RankClass* rc_ = nullptr;
  int g_tp_ = -1, g_dtp_ = -1, g_etp_ = -1;
  int g_ep_ = -1, g_xtp_ = -1; // MoE: expert parallel, expert tensor parallel

  // Pipeline: the stage being built (its rank class), the virtual stages' layer bounds
  // (strategy::virtual_stage_bounds), the point-to-point group and the tied embeddings' group.
  int stage_ = 0, chunks_ = 1;
  std::vector<int> bounds_;
  int g_pp_ = -1, g_tied_ = -1;
  std::vector<int> bucket_stage_; // the stage holding each bucket
  int emb_param_ = -1;            // the embedding table (first stage)
  int head_param_ = -1;           // the LM head's weight: lm_head, or the (copy of the) table
  // Each pipeline send, by (stage, forward?, chunk, micro-batch), and each recv with the send
  // it receives, paired once every stage is built.
  struct PipeKey {
    int stage, forward, chunk, mb;
    auto operator<=>(const PipeKey&) const = default;
  };
  struct PendingRecv {
    int stage, op; // the recv
    PipeKey send;  // the send it receives
  };
  std::map<PipeKey, int> sends_;
  std::vector<PendingRecv> recvs_;

  // Parameters: the tensor each one computes with (gathered under ZeRO-3: one per use), its
  // gradient, and the buckets' state.
  struct ParamTensors {
    int value = -1; // the slice (ZeRO 0-2: resident)
    // The slice's gradient: accumulated over micro-batches (resident), or under a
    // per-micro-batch flow (GradFlow) the current micro-batch's.
    int grad = -1;
  };
  std::vector<ParamTensors> pt_;
  struct BucketTensors {
    int shard = -1;      // ZeRO-3: the flat parameter shard (resident)
    int grad_shard = -1; // ZeRO >= 1: the reduced flat gradient shard
    int m = -1, v = -1;  // AdamW moments over what the rank owns
    int master = -1;     // host optimizer: the FP32 master weights it owns (host memory)
    int host_grad = -1;  // GradFlow::host: the reduced FP32 gradients it owns (host memory)
  };
  std::vector<BucketTensors> bt_;
  // Per-micro-batch gradients being accumulated: (bucket, micro-batch) -> the members' tensors.
  std::map<std::pair<int, int>, std::vector<int>> mb_grads_;
  // GradFlow::host: whether the step's first download into the bucket's host gradients is
  // emitted already (it overwrites them; later ones add).
  std::vector<bool> downloaded_;
  std::vector<BucketKey> bucket_keys_;
  std::map<std::tuple<int, std::string, int>, std::vector<int>> gathered_;
  int loss_ = -1;

  // --- building blocks --------------------------------------------------------------------
  int group(const std::string& name, sim::GroupSpec spec) {
    const sim::MeshView& v = s_.mesh.view(spec.view);
    const int size = v.group_size(spec);
    if (size <= 1)
      return -1;
    for (std::size_t i = 0; i < s_.groups.size(); ++i)
      if (s_.groups[i].spec == spec)
        return static_cast<int>(i);
    s_.groups.push_back(
        sim::Group{name, size, v.ranks_per_node(spec, c_.gpus_per_node), std::move(spec)});
    return static_cast<int>(s_.groups.size()) - 1;
  }

  int tensor(std::string name, Shape shape, TensorRole role, Element e = Element::real,
             sim::Dtype dtype = sim::Dtype::bf16) {
    sim::Tensor t;
    t.name = std::move(name);
    t.shape = std::move(shape);
    t.role = role;
    t.element = e;
    t.dtype = dtype;
    t.kind = memory_kind(role);
    t.bytes = tensor_bytes(t);
    rc_->tensors.push_back(std::move(t));
    return static_cast<int>(rc_->tensors.size()) - 1;
  }
  const Shape& shape(int t) const { return rc_->tensors[static_cast<std::size_t>(t)].shape; }
  // What an op reads or writes of tensor t as the simulator prices it: its shape's bytes (for
  // runtime rows the expected ones; Tensor::bytes holds the buffer reserved for them).
  double bytes(int t) const { return tensor_bytes(rc_->tensors[static_cast<std::size_t>(t)]); }

  struct OpSpec {
    std::string name;
    Kernel kernel = Kernel::none;
    OpKind kind = OpKind::elementwise;
    Category category = Category::forward;
    int stream = kCompute;
    int group = -1;
    std::vector<int> in, out;
    sim::Attrs attrs;
    int layer = -1;
    int mb = -1;
    double flops_scale = 1; // of the model FLOPs counted (see scaled())
  };
  // Zero-bubble: weight-gradient GEMMs held back to the pipeline order's next flush.
  bool defer_wgrad_ = false;
  std::vector<OpSpec> held_wgrad_;

  int emit(OpSpec o) {
    sim::Op op;
    op.name = std::move(o.name);
    op.kernel = o.kernel;
    op.kind = o.kind;
    op.category = o.category;
    op.stream = o.stream;
    op.group = o.group;
    op.inputs = std::move(o.in);
    op.outputs = std::move(o.out);
    if (!(o.attrs == sim::Attrs{}))
      rc_->set_attrs(op) = o.attrs;
    op.layer = o.layer;
    op.micro_batch = o.mb;
    price(op);
    if ((op.kind == OpKind::gemm || op.kind == OpKind::grouped_gemm) && op.layer >= 0)
      op.dtype = c_.gemm_dtype;
    rc_->ops.push_back(std::move(op));
    return static_cast<int>(rc_->ops.size()) - 1;
  }
  // What the simulator charges, from the operands.
  void price(sim::Op& op) const {
    double in = 0, out = 0;
    // Count tables (the trailing attrs.count_inputs inputs) size and split; they move nothing.
    const std::size_t data_inputs =
        op.inputs.size() - static_cast<std::size_t>(rc_->attrs_of(op).count_inputs);
    for (std::size_t i = 0; i < data_inputs; ++i)
      in += bytes(op.inputs[i]);
    for (int t : op.outputs)
      out += bytes(t);
    switch (op.kernel) {
    case Kernel::matmul: {
      const sim::Attrs& a = rc_->attrs_of(op);
      // Each operand is a matrix [shape[0], the rest]; blocks add columns.
      auto cols = [&](int t) {
        const Shape& sh = shape(t);
        return static_cast<double>(numel(sh) / sh[0]);
      };
      double a_cols = 0, b_cols = 0;
      for (int i = 0; i < a.a_blocks; ++i)
        a_cols += cols(op.inputs[static_cast<std::size_t>(i)]);
      for (std::size_t i = static_cast<std::size_t>(a.a_blocks); i < op.inputs.size(); ++i)
        b_cols += cols(op.inputs[i]);
      const double a_rows = static_cast<double>(shape(op.inputs[0])[0]);
      const double b_rows =
          static_cast<double>(shape(op.inputs[static_cast<std::size_t>(a.a_blocks)])[0]);
      const double m = a.trans_a ? a_cols : a_rows, k = a.trans_a ? a_rows : a_cols;
      const double n = a.trans_b ? b_rows : b_cols;
      op.gemm = sim::GemmShape{m, n, k, 1, {}};
      op.model_flops = op.category == Category::recompute ? 0 : 2 * m * n * k;
      return;
    }
    case Kernel::attention_fwd:
    case Kernel::attention_bwd: {
      const sim::Attrs& a = rc_->attrs_of(op);
      const Shape& q = shape(op.inputs[0]);
      const Shape& k = shape(op.inputs[1]);
      // q and k share a head dim; v's may differ (MLA: 192 and 128).
      const double dqk = static_cast<double>(q[2]);
      const double dv = static_cast<double>(shape(op.inputs[2])[2]);
      const double len = static_cast<double>(q[0]) / a.sequences;
      if (ring_ > 1) {
        // One step of the load-balanced ring (strategies/lower.cpp prices it so): my queries
        // against half a block of keys on average, unmasked; the model FLOPs are my share of
        // the whole sequences' attention (a window included), spread evenly over the steps.
        op.attention = sim::AttentionShape{static_cast<double>(a.sequences),
                                           static_cast<double>(q[1]),
                                           static_cast<double>(k[1]),
                                           len,
                                           len / 2,
                                           dqk,
                                           dv,
                                           false,
                                           0,
                                           c_.attention_kernel};
        const double pairs = a.sequences * workload::attended_pairs(c_.seq, a.window) / ring_;
        const double fwd = 2 * pairs * static_cast<double>(q[1]) * (dqk + dv) / ring_;
        op.model_flops = op.category == Category::recompute
                             ? 0
                             : (op.kernel == Kernel::attention_bwd ? 2 : 1) * fwd;
        return;
      }
      op.attention = sim::AttentionShape{static_cast<double>(a.sequences),
                                         static_cast<double>(q[1]),
                                         static_cast<double>(k[1]),
                                         len,
                                         static_cast<double>(k[0]) / a.sequences,
                                         dqk,
                                         dv,
                                         a.causal,
                                         static_cast<double>(a.window),
                                         c_.attention_kernel};
      const double pairs =
          a.sequences * workload::attended_pairs(static_cast<std::int64_t>(len), a.window);
      const double fwd = 2 * pairs * static_cast<double>(q[1]) * (dqk + dv);
      op.model_flops = op.category == Category::recompute
                           ? 0
                           : (op.kernel == Kernel::attention_bwd ? 2 : 1) * fwd;
      return;
    }
    case Kernel::grouped_matmul:
      price_grouped(op);
      return;
    case Kernel::collective:
      // nccl-tests' size: the gathered buffer of an all-gather, the input of the others.
      op.bytes = op.kind == OpKind::all_gather ? out : in;
      return;
    case Kernel::tokens:
      op.bytes = 0;
      return;
    case Kernel::copy: // what crosses the link
      op.bytes = in;
      return;
    case Kernel::zero:
      op.bytes = out;
      return;
    default:
      op.bytes = in + out;
      return;
    }
  }

  // A collective of `kind` over group g; a group of one rank is no op at all: the output is
  // the input.
  int collective(const std::string& name, OpKind kind, Category cat, int stream, int g, int x,
                 const Shape& out_shape, TensorRole role, int layer, int mb) {
    if (g < 0)
      return x;
    const int y = tensor(name, out_shape, role);
    OpSpec o{name, Kernel::collective, kind, cat, stream, g, {x}, {y}, {}, layer, mb};
    emit(std::move(o));
    return y;
  }
  // C (+)= op(A)·op(B) over column blocks (Kernel::matmul's operand convention).
  static OpSpec matmul_spec(const std::string& name, std::vector<int> a, std::vector<int> b,
                            std::vector<int> c, bool ta, bool tb, bool acc, Category cat, int layer,
                            int mb) {
    OpSpec o;
    o.name = name;
    o.kernel = Kernel::matmul;
    o.kind = OpKind::gemm;
    o.category = cat;
    o.attrs.trans_a = ta;
    o.attrs.trans_b = tb;
    o.attrs.accumulate = acc;
    o.attrs.a_blocks = static_cast<int>(a.size());
    o.in = std::move(a);
    o.in.insert(o.in.end(), b.begin(), b.end());
    o.out = std::move(c);
    o.layer = layer;
    o.mb = mb;
    return o;
  }
  int matmul(const std::string& name, std::vector<int> a, std::vector<int> b, std::vector<int> c,
             bool ta, bool tb, bool acc, Category cat, int layer, int mb) {
    return emit(
        matmul_spec(name, std::move(a), std::move(b), std::move(c), ta, tb, acc, cat, layer, mb));
  }
  // A weight-gradient GEMM (dW += ...): emitted now, or under zero-bubble held back until the
  // pipeline order's next flush (flush_wgrad), where the stage would otherwise wait.
  void wgrad(const std::string& name, std::vector<int> a, std::vector<int> b, std::vector<int> c,
             bool ta, int layer, int mb) {
    OpSpec o = matmul_spec(name, std::move(a), std::move(b), std::move(c), ta, false, true,
                           Category::backward, layer, mb);
    if (defer_wgrad_)
      held_wgrad_.push_back(std::move(o));
    else
      emit(std::move(o));
  }
  void flush_wgrad() {
    for (OpSpec& o : held_wgrad_) {
      const double f = o.flops_scale;
      scaled(emit(std::move(o)), f);
    }
    held_wgrad_.clear();
  }
  int simple(const std::string& name, Kernel k, std::vector<int> in, std::vector<int> out,
             Category cat, int layer, int mb, sim::Attrs attrs = {}) {
    return emit(OpSpec{name, k, OpKind::elementwise, cat, kCompute, -1, std::move(in),
                       std::move(out), attrs, layer, mb});
  }
  // Work the TP ranks repeat (MLA's down projections, replicated key/value heads) counts once
  // in the model FLOPs: op's are scaled by f.
  int scaled(int op, double f) {
    rc_->ops[static_cast<std::size_t>(op)].model_flops *= f;
    return op;
  }
  int replicated(int op) { return scaled(op, 1.0 / p_.attention.tp); }
  // The share of the q/k/v projection's FLOPs the model counts: 1, or with replicated key/value
  // heads each head once (the cost-only lowering's count).
  double kv_share() const {
    if (!kv_replicated_)
      return 1;
    const double kv = static_cast<double>(m_.attention.num_kv_heads) / p_.attention.tp;
    return (static_cast<double>(hl_) + 2 * kv) / static_cast<double>(hl_ + 2 * kvl_);
  }
  // A weight-gradient GEMM of such work (held back under zero-bubble: scaled when placed).
  void scaled_wgrad(double f, const std::string& name, std::vector<int> a, std::vector<int> b,
                    std::vector<int> c, bool ta, int layer, int mb) {
    const std::size_t before = rc_->ops.size();
    wgrad(name, std::move(a), std::move(b), std::move(c), ta, layer, mb);
    if (rc_->ops.size() > before)
      scaled(static_cast<int>(before), f);
    else
      held_wgrad_.back().flops_scale = f;
  }
  // Op `op` keeps the price its kernel gave it but no executor runs it (Kernel::none): a
  // feature the executable layer does not express (MLA's split rotary heads, a sigmoid router,
  // replicated key/value heads, ...). An executor refuses the program by the op's name.
  int price_only(int op) {
    rc_->ops[static_cast<std::size_t>(op)].kernel = Kernel::none;
    return op;
  }

  // --- Mixture-of-Experts building blocks ---------------------------------------------------
  // A tensor whose rows the routing decides: `expected` rows as the simulator prices them,
  // sized at run time from the count table `counts` (sim::RuntimeRows); the buffer it reserves
  // is the expected one times the plan's imbalance (the memory model's assumption).
  int routed(std::string name, Shape shape, TensorRole role, int counts, bool padded) {
    const int t = tensor(std::move(name), std::move(shape), role);
    sim::Tensor& ten = rc_->tensors.back();
    ten.rows = sim::RuntimeRows{counts, padded};
    ten.bytes = tensor_bytes(ten) * p_.moe.imbalance;
    return t;
  }
  // A tensor of `cols` columns with the rows of tensor `like` (static or runtime).
  int rows_like(int like, std::string name, std::int64_t cols, TensorRole role) {
    const sim::RuntimeRows r = rc_->tensors[static_cast<std::size_t>(like)].rows;
    const Shape sh{shape(like)[0], cols};
    if (r.counts < 0)
      return tensor(std::move(name), sh, role);
    return routed(std::move(name), sh, role, r.counts, r.padded);
  }
  // Expert copies a rank may hold (LLEP's foreign weights and their gradients): shape[0] is the
  // plan's reserve of copies per layer (at least one), sized at run time from `counts`.
  int reserved(std::string name, Shape shape, TensorRole role, int counts,
               sim::Dtype dtype = sim::Dtype::bf16) {
    shape[0] = std::max<std::int64_t>(1, static_cast<std::int64_t>(std::ceil(p_.moe.spill_copies)));
    const int t = tensor(std::move(name), std::move(shape), role, Element::real, dtype);
    rc_->tensors.back().rows = sim::RuntimeRows{counts, false, true};
    return t;
  }
  // The i-th of an expert's n weights as expert_up_weights and the down projection list them.
  static const char* expert_weight_name(std::size_t i, std::size_t n) {
    if (i + 1 == n)
      return "down";
    return i + 2 == n ? "up" : "gate";
  }
  // Least-loaded expert rebalancing runs in the program (docs/EXECUTOR.md).
  bool llep() const {
    return p_.moe.rebalance == strategy::Rebalance::least_loaded && g_ep_ >= 0;
  }
  // A grouped matmul over the table's groups [first, first + count) (count 0: all of them).
  int grouped_matmul(const std::string& name, std::vector<int> a, std::vector<int> b,
                     std::vector<int> c, int counts, bool ta, bool tb, bool acc, Category cat,
                     int layer, int mb, int first, int count) {
    OpSpec o;
    o.name = name;
    o.kernel = Kernel::grouped_matmul;
    o.kind = OpKind::grouped_gemm;
    o.category = cat;
    o.attrs.trans_a = ta;
    o.attrs.trans_b = tb;
    o.attrs.accumulate = acc;
    o.attrs.a_blocks = static_cast<int>(a.size());
    o.attrs.count_inputs = 1;
    o.attrs.group_first = first;
    o.attrs.group_count = count;
    o.in = std::move(a);
    o.in.insert(o.in.end(), b.begin(), b.end());
    o.in.push_back(counts);
    o.out = std::move(c);
    o.layer = layer;
    o.mb = mb;
    return emit(std::move(o));
  }
  int grouped_matmul(const std::string& name, std::vector<int> a, std::vector<int> b,
                     std::vector<int> c, int counts, bool ta, bool tb, bool acc, Category cat,
                     int layer, int mb) {
    return grouped_matmul(name, std::move(a), std::move(b), std::move(c), counts, ta, tb, acc, cat,
                          layer, mb, 0, 0);
  }
  // One GEMM per group over its expected rows (balanced routing: the row-segmented operand's
  // expected rows, shared equally by the G groups of the count table).
  void price_grouped(sim::Op& op) const {
    const sim::Attrs& a = rc_->attrs_of(op);
    const auto na = static_cast<std::size_t>(a.a_blocks);
    const std::size_t nb = op.inputs.size() - na - 1;
    const int counts = op.inputs.back();
    const double groups = a.group_count > 0 ? static_cast<double>(a.group_count)
                                            : static_cast<double>(shape(counts).back());
    double a_cols = 0, b_cols = 0;
    for (std::size_t i = 0; i < na; ++i)
      a_cols += static_cast<double>(numel(shape(op.inputs[i])) / shape(op.inputs[i])[0]);
    const double rows = static_cast<double>(shape(op.inputs[0])[0]);
    double m = rows, n = 0, k = a_cols;
    if (a.trans_a) { // C[g] = A[rows of g]ᵀ · B[rows of g]: reduction over the group's rows
      for (std::size_t i = 0; i < nb; ++i)
        b_cols +=
            static_cast<double>(numel(shape(op.inputs[na + i])) / shape(op.inputs[na + i])[0]);
      n = b_cols;
    } else { // B stacked per group [G, k, n]
      const Shape& b0 = shape(op.inputs[na]);
      for (std::size_t i = 0; i < nb; ++i)
        b_cols += static_cast<double>(shape(op.inputs[na + i])[2]);
      n = a.trans_b ? static_cast<double>(b0[1]) : b_cols;
    }
    // A rebalanced block's received copies (groups after the own experts'): balanced routing
    // spills nothing, so they are priced empty.
    if (a.group_first > 0)
      m = 0;
    op.gemm = sim::GemmShape{m, n, k, 1,
                             std::vector<double>(static_cast<std::size_t>(groups), m / groups)};
    op.model_flops = op.category == Category::recompute ? 0 : 2 * m * n * k;
  }

  // --- parameters ----------------------------------------------------------------------------
  // The first parameter of that name (a lookup per weight use: indexed, not searched).
  std::map<std::string, int, std::less<>> param_index_;
  int find_param(const std::string& name) const {
    const auto it = param_index_.find(name);
    return it == param_index_.end() ? -1 : it->second;
  }
  bool shards_state(LayerKind kind) const {
    const sim::GroupSpec g = strategy::data_parallel_group(kind);
    return (p_.state[static_cast<int>(kind)].zero >= 1 || p_.params == strategy::Placement::host) &&
           s_.mesh.view(g.view).group_size(g) > 1;
  }
  int bucket_of(BucketKey key) {
    // The last stage's copy of tied embeddings sums its gradient with the first stage's after
    // the data-parallel reduction: with sharded state the final norm keeps a bucket of its own
    // there, so that both copies' buckets shard alike (Megatron's
    // _does_param_require_new_bucket for the shared embedding under the distributed optimizer).
    if (!(key.head && m_.tied_embeddings && p_.pp > 1 && shards_state(key.kind)))
      key.replicated = false;
    key.tp_partial = false; // summed over TP into the kind's bucket (partial_grads)
    for (std::size_t i = 0; i < bucket_keys_.size(); ++i)
      if (bucket_keys_[i] == key)
        return static_cast<int>(i);
    sim::Bucket b;
    if (key.layer >= 0)
      b.name = fmt::format("L{}.{}", key.layer, strategy::layer_kind_name(key.kind));
    else
      b.name = key.head ? (key.replicated ? "final norm" : "head") : "embedding";
    b.grads = strategy::data_parallel_group(key.kind);
    const int zero_kind = static_cast<int>(key.kind);
    b.zero = p_.state[zero_kind].zero;
    if (p_.params == strategy::Placement::host)
      b.zero = std::max(b.zero, 3);
    const int sg = p_.state[zero_kind].shard_group;
    const int g = s_.mesh.view(b.grads.view).group_size(b.grads);
    if (g == 1) // nothing to shard over
      b.zero = 0;
    if (b.zero > 0) {
      b.shard = b.grads;
      if (sg > 0 && sg < g) {
        b.shard.block = sg;
        b.replicas = b.shard;
        b.replicas.across_blocks = true;
      }
    }
    s_.buckets.push_back(std::move(b));
    bucket_keys_.push_back(key);
    bucket_stage_.push_back(key.layer >= 0 ? stage_of_layer(key.layer)
                                           : (key.head ? p_.pp - 1 : 0));
    return static_cast<int>(s_.buckets.size()) - 1;
  }
  // Declares a parameter: its full shape and which axes the plan splits.
  int param(const std::string& name, Shape full, std::vector<sim::AxisSplit> splits,
            BucketKey key) {
    sim::ParamSpec ps;
    ps.name = name;
    ps.shape = full;
    ps.splits = std::move(splits);
    ps.bucket = bucket_of(key);
    // Under SP each TP rank saw other tokens (or, tp_partial, other heads' share): the replicated
    // parameter's gradient is summed over TP first; without SP every TP rank has all of it.
    if (key.replicated && (sp_ || key.tp_partial)) {
      sim::GroupSpec tp = key.kind == LayerKind::attention   ? strategy::tp_group()
                          : key.kind == LayerKind::embedding ? strategy::embed_tp_group()
                                                             : strategy::dense_tp_group();
      if (s_.mesh.view(tp.view).group_size(tp) > 1)
        ps.partial_grads = std::move(tp);
    }
    param_index_.emplace(name, static_cast<int>(s_.params.size()));
    s_.params.push_back(std::move(ps));
    s_.buckets[static_cast<std::size_t>(s_.params.back().bucket)].params.push_back(
        static_cast<int>(s_.params.size()) - 1);
    return static_cast<int>(s_.params.size()) - 1;
  }
  Shape local_shape(int param) const {
    const sim::ParamSpec& ps = s_.params[static_cast<std::size_t>(param)];
    Shape shape = ps.shape;
    for (const sim::AxisSplit& sp : ps.splits)
      shape[static_cast<std::size_t>(sp.axis)] /= s_.mesh.view(sp.view).extent(sp.dim);
    return shape;
  }
  std::int64_t bucket_numel(int b) const {
    std::int64_t n = 0;
    for (int p : s_.buckets[static_cast<std::size_t>(b)].params)
      n += numel(local_shape(p));
    return n;
  }
  int shard_size(int b) const {
    const sim::Bucket& bk = s_.buckets[static_cast<std::size_t>(b)];
    return bk.shard.dims.empty() ? 1 : s_.mesh.view(bk.shard.view).group_size(bk.shard);
  }
  std::int64_t chunk(int b) const {
    const std::int64_t g = shard_size(b);
    return (bucket_numel(b) + g - 1) / g;
  }

  // The pipeline stage holding decoder layer l.
  int stage_of_layer(int l) const {
    for (std::size_t v = 0; v + 1 < bounds_.size(); ++v)
      if (l >= bounds_[v] && l < bounds_[v + 1])
        return static_cast<int>(v) % p_.pp;
    throw std::logic_error(fmt::format("no virtual stage holds layer {}", l));
  }
  bool on_stage(int bucket) const {
    return bucket_stage_[static_cast<std::size_t>(bucket)] == stage_;
  }

  void declare_params();
  void declare_mla_params(int l);
  void declare_moe_params(int l);
  void make_state();
  void resident_costs();
  // The tensors a pass computes with for the parameters of bucket b: the resident slices, or
  // under ZeRO-3 a fresh gather of the bucket's shard.
  std::vector<int> use_bucket(int b, std::string pass, int layer, int mb);
  int bucket_of_param(const std::string& name) const {
    const int p = find_param(name);
    if (p < 0)
      throw std::logic_error("no parameter " + name);
    return s_.params[static_cast<std::size_t>(p)].bucket;
  }
  int value_of(const std::string& name, const std::vector<int>& gathered, int b) const;

  // --- the model ---------------------------------------------------------------------------
  struct AttnSaved {
    int x = -1, xn = -1, rstd = -1, xg = -1, q_pre = -1, k_pre = -1, q_rstd = -1, k_rstd = -1;
    int q = -1, k = -1, v = -1, o = -1; // the token layout: this rank's rows, its TP heads
    // The attention core's operands: the token layout's, or after Ulysses' all-to-all whole
    // sequences (the Ulysses group's chunks) with heads / ulysses heads.
    int cq = -1, ck = -1, cv = -1, co = -1, lse = -1;
    // MLA: the q and kv latents before and after their norms.
    int q_lat = -1, q_latn = -1, q_lat_rstd = -1, kv_lat = -1, kv_latn = -1, kv_lat_rstd = -1;
  };
  struct MlpSaved {
    int x = -1, rstd = -1, xg = -1, gu = -1, act = -1;
  };
  // An MoE block's tensors kept for its backward (and, for `recv`, the dispatched rows' shape).
  struct MoeSaved {
    int x = -1, rstd = -1, xn = -1, probs = -1, idx = -1, weights = -1, order = -1;
    int counts = -1;      // [experts]: my routed rows per expert
    int recv_counts = -1; // [ep, experts / ep]: the rows each EP rank sends to my experts
    int table = -1;       // the count table of the expert rows (ETP: [etp, ep, experts / ep])
    int recv = -1;        // the rows dispatched to me (runtime rows)
    int rows_in = -1;     // the experts' input rows (after the ETP gather)
    int gu = -1, act = -1, ret = -1;
    int sh_xg = -1, sh_gu = -1, sh_act = -1; // the shared experts'
    // Least-loaded rebalancing (llep_plan's outputs; recv_counts is its recv_slots): the
    // dispatch order, my rows per destination slot, the weight copies sent and received, and
    // the received copies (gate, up, down as present).
    int llep_order = -1, send_slots = -1, send_copies = -1, recv_copies = -1;
    std::vector<int> foreign;
  };
  struct LayerSaved {
    AttnSaved a;
    MlpSaved m;
    MoeSaved e;
  };
  struct HeadSaved {
    int x = -1, rstd = -1, xg = -1, dlogits = -1;
    int dx = -1; // chunked loss: the head's input gradient, formed in the forward
  };
  std::vector<std::vector<LayerSaved>> saved_;
  std::vector<HeadSaved> head_;
  std::vector<int> ids_, labels_; // per micro-batch: the embedding group's rows' ids and labels

  void tokens(int mb);
  int embed_forward(int mb);
  void embed_backward(int mb, int dx);
  // --- context parallelism (the attention core) -------------------------------------------
  sim::Attrs core_attrs(int l) const;
  int transpose(const std::string& name, int x, int y, std::int64_t a, std::int64_t b, Category cat,
                int l, int mb);
  int cp_collective(const std::string& name, OpKind kind, int g, std::vector<int> in,
                    std::vector<int> out, int l, int mb);
  int to_heads(const std::string& name, int x, std::int64_t heads, TensorRole role, Category cat,
               int l, int mb);
  int to_tokens(const std::string& name, int x, std::int64_t heads, TensorRole role, Category cat,
                int l, int mb);
  void core_forward(int l, int mb, AttnSaved& s, Category cat = Category::forward);
  void core_backward(int l, int mb, const AttnSaved& s, int dout, int& dq, int& dk, int& dv);

  // `cat` recompute: the block (or its attention core alone, `core_only`) runs again in the
  // backward pass, with the backward's parameter gathers.
  int attn_forward(int l, int mb, int x, AttnSaved& s, Category cat = Category::forward,
                   bool core_only = false);
  int attn_backward(int l, int mb, const AttnSaved& s, int dy);
  void gqa_qkv_forward(int l, int mb, AttnSaved& s, Category cat, const std::vector<int>& w, int b,
                       const std::vector<int>& wr, int br);
  int gqa_qkv_backward(int l, int mb, const AttnSaved& s, int dq, int dk, int dv,
                       const std::vector<int>& w, int b, const std::vector<int>& wr, int br);
  void mla_qkv_forward(int l, int mb, AttnSaved& s, Category cat);
  int mla_qkv_backward(int l, int mb, const AttnSaved& s, int dq, int dk, int dv);
  int attn_weight(int l, const char* role, const std::vector<int>& w, int b,
                  const std::vector<int>& wr, int br) const;
  int sp_scatter(const std::string& name, int g, int x, const Shape& scattered, int l, int mb);
  int sp_gather(const std::string& name, int g, int x, const Shape& gathered, TensorRole role,
                int l, int mb);
  int dense_forward(int l, int mb, int x, MlpSaved& s, Category cat = Category::forward);
  std::vector<int> dense_up_weights(int l, const std::vector<int>& w, int b) const;
  // Recompute before a block's backward (the CPU executor's order): the MLP block, or under
  // selective recompute its activation function alone; the attention block, or its core alone.
  void recompute_mlp(int l, int mb, MlpSaved& s);
  // Activation offload: the first fraction of the stage's layers move what their backward reads
  // to host memory after their forward, and back before their backward (one copy each way).
  bool offloads(int index_in_stage, int layers_in_stage) const {
    return p_.activation_offload > 0 &&
           index_in_stage < std::ceil(p_.activation_offload * layers_in_stage - 1e-9);
  }
  std::vector<int*> backward_reads(LayerSaved& sv);
  // A tensor like `t` (shape, element, dtype, runtime rows and reserved bytes) under a new name.
  int clone(int t, std::string name, TensorRole role, sim::Device device) {
    const sim::Tensor src = rc_->tensors[static_cast<std::size_t>(t)];
    sim::Tensor c = src;
    c.name = std::move(name);
    c.role = role;
    c.kind = memory_kind(role);
    c.device = device;
    c.resident = false;
    c.param = -1;
    c.bucket = -1;
    rc_->tensors.push_back(std::move(c));
    return static_cast<int>(rc_->tensors.size()) - 1;
  }
  void offload(int l, int mb, LayerSaved& sv);
  void reload(int l, int mb, LayerSaved& sv);
  // FSDP2's prefetch bound (strategies/lower.cpp's gates): the ZeRO-3 parameter gathers, their
  // host uploads and the activation reloads among ops [begin, end of program) wait for op `gate`
  // (none when -1), a control dependency on top of the operands'.
  void gate_prefetch(int begin, int gate);
  std::map<std::pair<int, int>, std::vector<int>> host_copies_; // (layer, mb) -> host tensors
  std::map<std::pair<int, int>, int> layer_bwd_end_; // (layer, mb) -> its backward's last op
  void recompute_attention(int l, int mb, AttnSaved& s);
  void renorm(int l, int mb, const char* block, int x, int& rstd, int& xg);
  // Full recompute of both of a layer's blocks checkpoints the layer's input alone (Megatron's
  // full recompute of a transformer layer, torchtitan's full activation checkpointing of a
  // TransformerBlock, the memory model's one checkpoint): its backward first re-runs the
  // attention block, whose output is the MLP block's input, then the MLP block.
  bool checkpoints_layer(int l) const;
  void recompute_layer(int l, int mb, LayerSaved& sv);
  int dense_backward(int l, int mb, const MlpSaved& s, int dy);
  bool is_moe(int l) const {
    return m_.layers[static_cast<std::size_t>(l)].mlp == workload::MlpKind::moe;
  }
  int moe_forward(int l, int mb, int x, MoeSaved& s, Category cat = Category::forward);
  void recompute_moe(int l, int mb, MoeSaved& s);
  int moe_backward(int l, int mb, const MoeSaved& s, int dy);
  void llep_dispatch(int l, int mb, int xp, const std::vector<int>& w, int be, MoeSaved& s,
                     Category cat);
  void llep_return_grads(int l, int mb, const MoeSaved& s, const std::vector<int>& foreign_grads,
                         const std::vector<int>& grads);
  std::vector<int> expert_up_weights(int l, const std::vector<int>& w, int be) const;
  // An all-to-all-v over EP of `x` into `y`, sized by the count tables `send` and `recv`.
  void ep_alltoallv(const std::string& name, int x, int send, int recv, int y, int l, int mb);
  // Least-loaded rebalancing: rows computed by slot go back to their senders (`exchange`, the
  // dispatch's tables swapped) and each to its permuted place; returns that tensor.
  int llep_return(const std::string& exchange, const std::string& back_name,
                  const std::string& unsort, int x, const MoeSaved& s, int out, Category cat,
                  int l, int mb);
  int shared_forward(int l, int mb, MoeSaved& s, Category cat);
  int shared_backward(int l, int mb, const MoeSaved& s, int dy);
  // The executable router: softmax top-k without biases, on SP shares of the rows (without SP
  // every TP rank would route the same rows: Megatron-Core refuses MoE with TP but no SP).
  bool softmax_router() const {
    const workload::MoeSpec& e = m_.moe;
    return !e.router_bias && !e.router_score_correction &&
           (sp_ || std::max(p_.attention.tp, p_.dense.tp) == 1);
  }
  void head_forward(int mb, int x);
  void loss(const std::string& what, int mb, int logits, int labels, int dlogits);
  int loss_chunks() const;
  void chunked_loss(int mb, int w);
  int head_backward(int mb);
  void dp_comm(std::string name, OpKind kind, int g, std::vector<int> in, std::vector<int> out,
               int layer, bool deferred);
  std::vector<int> reduce_bucket(int b); // returns the rank's reduced gradients of the bucket
  // The sum of bucket b's gradients `grads` over the ranks holding the same slices: in place under
  // ZeRO-0 (all-reduce), else reduce-scattered into `shard`, then (HSDP) all-reduced over the
  // replicas; returns what the rank owns of it. mb >= 0: one micro-batch's, named so and held
  // back with the weight-gradient GEMMs under zero-bubble.
  std::vector<int> reduce_over_data_parallel(int b, const std::vector<int>& grads, int shard,
                                             int layer, int mb);
  void sum_partial_grads(int b, const std::vector<int>& grads, int layer, int mb);
  // How a bucket's gradients travel over a step.
  //   step: the members' FP32 gradients are resident and accumulate over the micro-batches;
  //     they are reduced once, after the last micro-batch's backward (Megatron's
  //     finalize_model_grads).
  //   shard: a layer's bucket reduce-scatters every micro-batch's gradients after the layer's
  //     backward into its resident FP32 gradient shard: under ZeRO-3 (FSDP2's post-backward
  //     reduce-scatter) and, with gradients kept on the host for an optimizer on the GPU, under
  //     ZeRO 1-2 (DeepSpeed reduces each backward's gradients). Under a pipeline a ZeRO-3
  //     layer keeps the step flow: torch.distributed.pipelining turns FSDP2's gradient sync
  //     off but for the last backward, so the unsharded gradients accumulate over the step.
  //   host: with gradients kept on the host for the host optimizer, every micro-batch's
  //     gradients are reduced once written (into a transient shard under ZeRO >= 1, in place
  //     under ZeRO-0, not at all over a data-parallel group of one) and downloaded into the
  //     bucket's resident FP32 host gradients, where they add up (DeepSpeed's ZeRO-Offload
  //     copies each backward's reduced partition to the CPU and accumulates it there); the host
  //     optimizer reads them in place. Tied copies across pipeline stages keep the step flow
  //     (their sum over the stages runs once per step), and so does the LM head under GPipe
  //     with a chunked loss, whose every micro-batch's forward would hold its own FP32 head
  //     gradients until its backward.
  enum class GradFlow { step, shard, host };
  GradFlow grad_flow(int b) const {
    const sim::Bucket& bk = s_.buckets[static_cast<std::size_t>(b)];
    const BucketKey& key = bucket_keys_[static_cast<std::size_t>(b)];
    const bool host_grads = p_.grads == strategy::Placement::host;
    const bool head_in_forward = key.head && !key.replicated && p_.pp > 1 &&
                                 p_.schedule == strategy::PipelineSchedule::gpipe &&
                                 loss_chunks() > 1;
    if (host_grads && p_.optimizer_on_host && bk.tied.dims.empty() && !head_in_forward)
      return GradFlow::host;
    if (((bk.zero >= 3 && (p_.pp == 1 || host_grads)) || (bk.zero >= 1 && host_grads)) &&
        key.layer >= 0)
      return GradFlow::shard;
    return GradFlow::step;
  }
  // Micro-batch mb's gradients of bucket b under a per-micro-batch flow: fresh FP32 tensors the
  // backward accumulates into, zeroed before its first write (made once per micro-batch).
  const std::vector<int>& begin_bucket_grads(int b, int layer, int mb);
  // After the micro-batch's last write into them: their reduction (and download).
  void finish_bucket_grads(int b, int layer, int mb);
  // The gradient micro-batch mb's backward writes for parameter p (the embedding and head).
  int grad_of(int p, int mb);
  void begin_layer_grads(int l, int mb);
  void scatter_layer_grads(int l, int mb);
  void step_bucket(int b, const std::vector<int>& owned_grads, bool deferred);
  void zero_grads(int b, bool deferred);
  void download_grads(int b, const std::vector<int>& owned_grads);
  bool streams_forward(int b) const; // the bucket's update runs in the next step's forward
  std::vector<int> layer_buckets(int l) const {
    std::vector<int> out;
    for (std::size_t b = 0; b < bucket_keys_.size(); ++b)
      if (bucket_keys_[b].layer == l)
        out.push_back(static_cast<int>(b));
    return out;
  }
  std::vector<int> owned_grads(int b) const; // the bucket's gradients the rank steps from

  // --- the pipeline ----------------------------------------------------------------------------
  void build_stage(int stage);
  int neighbour(int chunk, bool fwd, bool sending, int* peer_chunk) const;
  void send_activation(int mb, int chunk, int x, bool fwd);
  int recv_activation(int mb, int chunk, bool fwd);
  void pair_pipeline();

  std::string pname(int l, const char* role) const { return fmt::format("L{}.{}", l, role); }
  sim::Attrs norm_attrs() const {
    sim::Attrs a;
    a.eps = m_.norm_eps;
    return a;
  }
  // RMSNorm's backward: dx (a new tensor shaped like x) from dy, the weight's gradient
  // accumulated into dw. Returns dx.
  int norm_backward(const std::string& name, const std::string& dx_name, int x, int w, int rstd,
                    int dy, int dw, int layer, int mb) {
    const int dx = tensor(dx_name, shape(x), TensorRole::activation);
    sim::Attrs a = norm_attrs();
    a.accumulate = true;
    emit(OpSpec{name,
                Kernel::rmsnorm_bwd,
                OpKind::elementwise,
                Category::backward,
                kCompute,
                -1,
                {x, w, rstd, dy},
                {dx, dw},
                a,
                layer,
                mb});
    return dx;
  }
};

void Builder::declare_params() {
  using sim::AxisSplit;
  const std::int64_t h = h_, hq = m_.attention.num_heads * d_, hkv = m_.attention.num_kv_heads * d_;
  const AxisSplit a_tp_cols{1, "attention", "tp"}, a_tp_rows{0, "attention", "tp"};
  const AxisSplit d_tp_cols{1, "dense", "tp"}, d_tp_rows{0, "dense", "tp"};
  const bool pipe = p_.pp > 1;
  // The embedding and the head are separate buckets (torchtitan's fully_shard of
  // tok_embeddings and of [norm, output]), on the first and the last stage.
  const BucketKey emb{-1, LayerKind::embedding, false, false};
  const BucketKey head{-1, LayerKind::embedding, false, true};
  const BucketKey head_rep{-1, LayerKind::embedding, true, true};
  emb_param_ = param("embedding", {vocab_, h}, {{0, "embed", "tp"}}, emb);
  for (int l = 0; l < static_cast<int>(m_.num_layers()); ++l) {
    const BucketKey att{l, LayerKind::attention, false}, att_rep{l, LayerKind::attention, true};
    param(pname(l, "attn.norm"), {h}, {}, att_rep);
    if (mla_) {
      declare_mla_params(l);
    } else if (kv_replicated_) {
      // Each rank holds the one key/value head its query heads use (a replica of it).
      param(pname(l, "attn.wq"), {h, hq}, {a_tp_cols}, att);
      param(pname(l, "attn.wk"), {h, kvl_ * d_}, {}, att);
      param(pname(l, "attn.wv"), {h, kvl_ * d_}, {}, att);
      param(pname(l, "attn.wo"), {hq, h}, {a_tp_rows}, att);
    } else {
      param(pname(l, "attn.wq"), {h, hq}, {a_tp_cols}, att);
      param(pname(l, "attn.wk"), {h, hkv}, {a_tp_cols}, att);
      param(pname(l, "attn.wv"), {h, hkv}, {a_tp_cols}, att);
      param(pname(l, "attn.wo"), {hq, h}, {a_tp_rows}, att);
    }
    if (m_.attention.qk_norm) {
      param(pname(l, "attn.q_norm"), {d_}, {}, att_rep);
      param(pname(l, "attn.k_norm"), {d_}, {}, att_rep);
    }
    const BucketKey mlp{l, LayerKind::dense, false}, mlp_rep{l, LayerKind::dense, true};
    param(pname(l, "mlp.norm"), {h}, {}, mlp_rep);
    if (is_moe(l)) {
      declare_moe_params(l);
      continue;
    }
    const std::int64_t f = m_.dense_mlp.intermediate_size;
    if (m_.dense_mlp.gated) // else one up projection and a GELU (GPT)
      param(pname(l, "mlp.gate"), {h, f}, {d_tp_cols}, mlp);
    param(pname(l, "mlp.up"), {h, f}, {d_tp_cols}, mlp);
    param(pname(l, "mlp.down"), {f, h}, {d_tp_rows}, mlp);
  }
  param("final_norm", {h}, {}, head_rep);
  if (!m_.tied_embeddings) {
    head_param_ = param("lm_head", {h, vocab_}, {{1, "embed", "tp"}}, head);
  } else if (!pipe) {
    head_param_ = emb_param_;
  } else {
    // The last stage's copy of the tied table; the two copies' gradients sum over the first
    // and last stage (Megatron's embedding group).
    head_param_ = param("embedding", {vocab_, h}, {{0, "embed", "tp"}}, head);
    sim::GroupSpec ends{"embed", {"pp"}};
    ends.ends_only = true;
    g_tied_ = group(group_name(ends), ends);
    for (int p : {emb_param_, head_param_})
      s_.buckets[static_cast<std::size_t>(s_.params[static_cast<std::size_t>(p)].bucket)].tied =
          ends;
  }
}

// Multi-head latent attention (DeepSeek-V3, Kimi-K2; Megatron-Core's MLASelfAttention): the
// down projections to the q and kv latents (with the shared rotary key, kv_a = [latent | k_rope])
// and their norms are replicated on the TP ranks, each of which computes them on the gathered
// rows and only its heads' share of their gradients: they sum over the whole stage. The up
// projections (q_b: the heads' q; kv_b: the heads' k_nope and v) split by head, as does wo.
void Builder::declare_mla_params(int l) {
  const workload::AttentionSpec& a = m_.attention;
  const std::int64_t h = h_, heads = a.num_heads;
  const sim::AxisSplit cols{1, "attention", "tp"}, rows{0, "attention", "tp"};
  const BucketKey att{l, LayerKind::attention, false};
  // Without SP the norms' gradients are whole on every TP rank, the latents' still partial.
  const BucketKey latent{l, LayerKind::attention, true, false, !sp_ && p_.attention.tp > 1};
  if (a.q_lora_rank > 0) {
    param(pname(l, "attn.wq_a"), {h, a.q_lora_rank}, {}, latent);
    param(pname(l, "attn.q_a_norm"), {a.q_lora_rank}, {}, latent);
    param(pname(l, "attn.wq_b"), {a.q_lora_rank, heads * d_}, {cols}, att);
  } else {
    param(pname(l, "attn.wq"), {h, heads * d_}, {cols}, att);
  }
  param(pname(l, "attn.wkv_a"), {h, a.kv_lora_rank}, {}, latent);
  param(pname(l, "attn.wk_rope"), {h, a.qk_rope_head_dim}, {}, latent);
  param(pname(l, "attn.kv_a_norm"), {a.kv_lora_rank}, {}, latent);
  param(pname(l, "attn.wk_b"), {a.kv_lora_rank, heads * a.qk_nope_head_dim}, {cols}, att);
  param(pname(l, "attn.wv_b"), {a.kv_lora_rank, heads * dv_}, {cols}, att);
  param(pname(l, "attn.wo"), {heads * dv_, h}, {rows}, att);
}

// Resident state: each parameter's slice (ZeRO 0-2) or each bucket's flat shard (ZeRO-3), the
// slices' gradients (under a per-micro-batch GradFlow they live only from the micro-batch's
// backward to their reduction), the reduced gradient shard (ZeRO >= 1) or the host gradients
// (GradFlow::host), the moments, and the step's loss.
void Builder::make_state() {
  pt_.assign(s_.params.size(), {});
  bt_.assign(s_.buckets.size(), {});
  mb_grads_.clear();
  downloaded_.assign(s_.buckets.size(), false);
  for (std::size_t b = 0; b < s_.buckets.size(); ++b) {
    const sim::Bucket& bk = s_.buckets[b];
    const int bi = static_cast<int>(b);
    if (!on_stage(bi))
      continue;
    const GradFlow flow = grad_flow(bi);
    const std::int64_t owned = bk.zero >= 1 ? chunk(bi) : bucket_numel(bi);
    for (int p : bk.params) {
      const auto pi = static_cast<std::size_t>(p);
      const std::string& name = s_.params[pi].name;
      if (bk.zero < 3) {
        pt_[pi].value = tensor(name, local_shape(p), TensorRole::param);
        rc_->tensors.back().param = p;
        rc_->tensors.back().resident = true;
      }
      if (flow != GradFlow::step)
        continue; // one gradient per micro-batch (begin_bucket_grads)
      pt_[pi].grad =
          tensor(name + ".grad", local_shape(p), TensorRole::grad, Element::real, sim::Dtype::fp32);
      rc_->tensors.back().param = p;
      rc_->tensors.back().resident = true;
    }
    if (bk.zero >= 3) {
      bt_[b].shard = tensor(bk.name + ".shard", {chunk(bi)}, TensorRole::param_shard);
      rc_->tensors.back().bucket = bi;
      rc_->tensors.back().resident = true;
    }
    if (bk.zero >= 1 && flow != GradFlow::host) {
      bt_[b].grad_shard = tensor(bk.name + ".grad_shard", {chunk(bi)}, TensorRole::grad,
                                 Element::real, sim::Dtype::fp32);
      rc_->tensors.back().bucket = bi;
      rc_->tensors.back().resident = true;
    }
    if (flow == GradFlow::host) {
      // What the rank owns: its flat shard (ZeRO >= 1) or the whole bucket, flattened in member
      // order.
      bt_[b].host_grad = tensor(bk.name + ".grads (host)", {owned}, TensorRole::host_copy,
                                Element::real, sim::Dtype::fp32);
      rc_->tensors.back().kind = sim::MemoryKind::grads;
      rc_->tensors.back().bucket = bi;
      rc_->tensors.back().resident = true;
      rc_->tensors.back().device = sim::Device::host;
    }
    const bool state_on_host = p_.optimizer == strategy::Placement::host;
    for (int* t : {&bt_[b].m, &bt_[b].v}) {
      *t = tensor(bk.name + (t == &bt_[b].m ? ".adam_m" : ".adam_v"), {owned},
                  TensorRole::optimizer_state, Element::real, sim::Dtype::fp32);
      rc_->tensors.back().bucket = bi;
      rc_->tensors.back().resident = true;
      rc_->tensors.back().slot =
          t == &bt_[b].m ? sim::Tensor::Slot::first_moment : sim::Tensor::Slot::second_moment;
      if (state_on_host)
        rc_->tensors.back().device = sim::Device::host;
    }
    // Parameters on the host are the ZeRO-3 shards; a bucket with nothing to shard over (one
    // rank) keeps them in HBM, with master weights on the host like any host optimizer.
    if (p_.optimizer_on_host && (p_.params != strategy::Placement::host || bk.zero < 3)) {
      bt_[b].master = tensor(bk.name + ".master", {owned}, TensorRole::optimizer_state,
                             Element::real, sim::Dtype::fp32);
      rc_->tensors.back().slot = sim::Tensor::Slot::master_weights;
      rc_->tensors.back().bucket = bi;
      rc_->tensors.back().resident = true;
      rc_->tensors.back().device = sim::Device::host;
    }
    if (bk.zero >= 3 && p_.params == strategy::Placement::host)
      rc_->tensors[static_cast<std::size_t>(bt_[b].shard)].device = sim::Device::host;
  }
  loss_ = tensor("loss", {1}, TensorRole::loss, Element::real, sim::Dtype::fp32);
  rc_->tensors.back().resident = true;
  resident_costs();
}

// What the frameworks hold for the whole step besides the program's tensors, as the memory
// model counts it (strategies/memory.cpp), as resident cost tensors no executor binds: the
// CUDA context (cuBLAS workspaces, kernels), NCCL's buffers per communicator and the
// all-to-all buffers (strategy::resident_comm_bytes), and under a GPU optimizer the FP32
// master weights of what the rank owns (mixed-precision AdamW: Megatron's distributed
// optimizer, FSDP2's sharded FP32 parameters; 4 of the memory model's 12 optimizer bytes per
// parameter, the moments being the program's adam_m and adam_v). The program's AdamW updates
// the BF16 parameters it computes with; the master copy is the memory it stands for.
void Builder::resident_costs() {
  using sim::MemoryKind;
  auto add = [&](const char* name, double bytes, sim::Device device, MemoryKind kind) {
    if (bytes > 0)
      rc_->tensors.push_back(sim::cost_tensor(name, bytes, device, kind, true));
  };
  add("CUDA context", c_.hw.cuda_context_bytes, sim::Device::hbm, MemoryKind::other);
  add("NCCL and all-to-all buffers", strategy::resident_comm_bytes(p_, c_.hw), sim::Device::hbm,
      MemoryKind::comm_buffers);
  if (p_.optimizer_on_host)
    return; // the host step's master weights are the program's own tensors (make_state)
  double owned = 0;
  for (std::size_t b = 0; b < s_.buckets.size(); ++b)
    if (on_stage(static_cast<int>(b)))
      owned += static_cast<double>(s_.buckets[b].zero >= 1 ? chunk(static_cast<int>(b))
                                                           : bucket_numel(static_cast<int>(b)));
  add("FP32 master weights", 4 * owned,
      p_.optimizer == strategy::Placement::host ? sim::Device::host : sim::Device::hbm,
      MemoryKind::optimizer);
}

std::vector<int> Builder::use_bucket(int b, std::string pass, int layer, int mb) {
  const sim::Bucket& bk = s_.buckets[static_cast<std::size_t>(b)];
  std::vector<int> out;
  // One gather per bucket, pass and micro-batch: a recompute reuses the backward's. Under a
  // pipeline, one per step: FSDP2 under torch.distributed.pipelining keeps the parameters
  // gathered from the first forward to the last backward (torchtitan's reshard_after_forward
  // is off when pp is on, "to avoid per-microbatch all-gathers"; the pipeline stage turns
  // reshard_after_backward off but for the last backward).
  if (bk.zero >= 3 && p_.pp > 1) {
    pass = "step";
    mb = -1;
  }
  const auto key = std::make_tuple(b, pass, mb);
  if (const auto it = gathered_.find(key); it != gathered_.end())
    return it->second;
  if (bk.zero < 3) {
    for (int p : bk.params)
      out.push_back(pt_[static_cast<std::size_t>(p)].value);
    return out;
  }
  for (int p : bk.params) {
    out.push_back(
        tensor(fmt::format("{} ({} mb{})", s_.params[static_cast<std::size_t>(p)].name, pass, mb),
               local_shape(p), TensorRole::param));
    rc_->tensors.back().param = p;
  }
  const int g = group(group_name(bk.shard), bk.shard);
  int shard = bt_[static_cast<std::size_t>(b)].shard;
  if (p_.params == strategy::Placement::host) { // FSDP2 CPU offload: upload the shard first
    const int dev = tensor(fmt::format("{}.shard ({} mb{}, uploaded)", bk.name, pass, mb),
                           {chunk(b)}, TensorRole::param_shard);
    rc_->tensors.back().bucket = b;
    emit(OpSpec{fmt::format("{}.param_upload.{}.mb{}", bk.name, pass, mb),
                Kernel::copy,
                OpKind::copy_h2d,
                Category::offload,
                kH2d,
                -1,
                {shard},
                {dev},
                {},
                layer,
                mb});
    shard = dev;
  }
  OpSpec o{fmt::format("{}.fsdp_gather.{}.mb{}", bk.name, pass, mb),
           Kernel::collective,
           OpKind::all_gather,
           Category::dp_comm,
           kDp,
           g,
           {shard},
           out,
           {},
           layer,
           mb};
  emit(std::move(o));
  gathered_[key] = out;
  return out;
}

int Builder::value_of(const std::string& name, const std::vector<int>& gathered, int b) const {
  const sim::Bucket& bk = s_.buckets[static_cast<std::size_t>(b)];
  for (std::size_t i = 0; i < bk.params.size(); ++i)
    if (s_.params[static_cast<std::size_t>(bk.params[i])].name == name)
      return gathered[i];
  throw std::logic_error("bucket " + bk.name + " has no parameter " + name);
}

// --- embedding and head --------------------------------------------------------------------------

// The embedding group's ids and labels of micro-batch mb (the first stage reads the ids, the
// last the labels; one stage without a pipeline).
void Builder::tokens(int mb) {
  const auto m = static_cast<std::size_t>(mb);
  ids_[m] = tensor(fmt::format("ids mb{}", mb), {rows_e_}, TensorRole::index, Element::i32);
  labels_[m] = tensor(fmt::format("labels mb{}", mb), {rows_e_}, TensorRole::index, Element::i32);
  OpSpec t;
  t.name = fmt::format("tokens.mb{}", mb);
  t.kernel = Kernel::tokens;
  t.group = sp_ ? g_etp_ : -1; // without SP every rank of the group holds the same rows
  t.out = {ids_[m], labels_[m]};
  t.attrs.sequence_parallel = sp_;
  t.mb = mb;
  const int op = emit(std::move(t));
  if (inexact_) // rounded-up shares of an uneven split: no executor's token layout
    price_only(op);
}

// The embedding group's rows (each member's SP share, in group order): their ids are looked up
// in this rank's vocabulary shard, and a reduce-scatter sums the shards and returns each rank
// its own rows (Megatron's vocab-parallel embedding with sequence parallelism).
int Builder::embed_forward(int mb) {
  const auto m = static_cast<std::size_t>(mb);
  tokens(mb);
  const int b = s_.params[static_cast<std::size_t>(emb_param_)].bucket;
  const std::vector<int> w = use_bucket(b, "fwd", -1, mb);
  const int y = tensor(fmt::format("embedded mb{}", mb), {rows_e_, h_}, TensorRole::activation);
  simple(fmt::format("embedding.mb{}", mb), Kernel::embedding_fwd,
         {ids_[m], value_of("embedding", w, b)}, {y}, Category::forward, -1, mb);
  if (g_etp_ < 0)
    return y;
  return sp_scatter(fmt::format("embedding_sp_scatter.mb{}", mb), g_etp_, y, {n_, h_}, -1, mb);
}

void Builder::embed_backward(int mb, int dx) {
  const auto m = static_cast<std::size_t>(mb);
  const int dyg = sp_gather(fmt::format("embedding_sp_gather.mb{}.bwd", mb), g_etp_, dx,
                            {rows_e_, h_}, TensorRole::activation, -1, mb);
  const int p = emb_param_;
  OpSpec o;
  o.name = fmt::format("embedding.mb{}.bwd", mb);
  o.kernel = Kernel::embedding_bwd;
  o.category = Category::backward;
  o.in = {ids_[m], dyg};
  o.out = {grad_of(p, mb)};
  o.attrs.accumulate = true;
  o.mb = mb;
  emit(std::move(o));
}

// Final norm, vocabulary-parallel LM head and cross-entropy; the logits' gradient is formed in
// the forward pass, as fused kernels do.
void Builder::head_forward(int mb, int x) {
  const auto m = static_cast<std::size_t>(mb);
  if (labels_[m] < 0) // the last stage of a pipeline: its own copy of the labels
    tokens(mb);
  HeadSaved& hs = head_[m];
  hs.x = x;
  const int bn = bucket_of_param("final_norm");
  const std::vector<int> wn = use_bucket(bn, "head", -1, mb);
  const int xn = tensor(fmt::format("final_norm mb{}", mb), {n_, h_}, TensorRole::activation);
  hs.rstd = tensor(fmt::format("final_norm rstd mb{}", mb), {n_}, TensorRole::saved, Element::real,
                   sim::Dtype::fp32);
  simple(fmt::format("final_norm.mb{}", mb), Kernel::rmsnorm_fwd,
         {x, value_of("final_norm", wn, bn)}, {xn, hs.rstd}, Category::forward, -1, mb,
         norm_attrs());
  hs.xg = sp_gather(fmt::format("head_sp_gather.mb{}", mb), g_etp_, xn, {rows_e_, h_},
                    TensorRole::saved, -1, mb);
  const bool tied = m_.tied_embeddings;
  const std::string wname = tied ? "embedding" : "lm_head";
  const int bw = s_.params[static_cast<std::size_t>(head_param_)].bucket;
  const std::vector<int> w = use_bucket(bw, "head", -1, mb);
  const int head_w = value_of(wname, w, bw);
  if (loss_chunks() > 1) {
    chunked_loss(mb, head_w);
    return;
  }
  const int logits = tensor(fmt::format("logits mb{}", mb), {rows_e_, vl_}, TensorRole::activation);
  matmul(fmt::format("lm_head.mb{}", mb), {hs.xg}, {head_w}, {logits}, false, tied, false,
         Category::forward, -1, mb);
  // The logits' gradient in FP32, as PyTorch's cross-entropy forms it from the FP32 upcast of
  // the BF16 logits (the memory model's 2 + 4 bytes per logit while both live).
  hs.dlogits = tensor(fmt::format("dlogits mb{}", mb), {rows_e_, vl_}, TensorRole::saved,
                      Element::real, sim::Dtype::fp32);
  loss(fmt::format("mb{}", mb), mb, logits, labels_[m], hs.dlogits);
}

// Cross-entropy of `logits` against `labels` (rows of the embedding group), its gradient into
// `dlogits` and the loss into the step's sum; over the vocabulary shards with embedding TP.
void Builder::loss(const std::string& what, int mb, int logits, int labels, int dlogits) {
  if (g_etp_ < 0) {
    simple(fmt::format("loss.{}", what), Kernel::cross_entropy, {logits, labels}, {dlogits, loss_},
           Category::forward, -1, mb);
    return;
  }
  const Shape rows{shape(logits)[0]};
  auto f32 = [&](const char* name) {
    return tensor(fmt::format("{} {}", name, what), rows, TensorRole::activation, Element::real,
                  sim::Dtype::fp32);
  };
  const int mx = f32("logit max");
  simple(fmt::format("loss.max.{}", what), Kernel::ce_max, {logits}, {mx}, Category::forward, -1,
         mb);
  OpSpec mx_all{fmt::format("loss.max_all_reduce.{}", what),
                Kernel::collective,
                OpKind::all_reduce,
                Category::tp_comm,
                kTp,
                g_etp_,
                {mx},
                {mx},
                {},
                -1,
                mb};
  mx_all.attrs.reduce_max = true;
  emit(std::move(mx_all));
  const int sum = f32("exp sum"), target = f32("target logit");
  // The vocabulary shard is this rank's place in the embedding TP group.
  emit(OpSpec{fmt::format("loss.sums.{}", what),
              Kernel::ce_sums,
              OpKind::elementwise,
              Category::forward,
              kCompute,
              g_etp_,
              {logits, mx, labels},
              {sum, target},
              {},
              -1,
              mb});
  for (int t : {sum, target})
    emit(OpSpec{fmt::format("loss.{}_all_reduce.{}", t == sum ? "sum" : "target", what),
                Kernel::collective,
                OpKind::all_reduce,
                Category::tp_comm,
                kTp,
                g_etp_,
                {t},
                {t},
                {},
                -1,
                mb});
  emit(OpSpec{fmt::format("loss.{}", what),
              Kernel::ce_finish,
              OpKind::elementwise,
              Category::forward,
              kCompute,
              g_etp_,
              {logits, mx, sum, target, labels},
              {dlogits, loss_},
              {},
              -1,
              mb});
}

// Chunked loss (Plan::chunked_loss: Liger's fused linear cross-entropy, TRL's chunked NLL): the
// head's rows in chunks of about ProgramContext::loss_chunk_tokens per sequence of the
// micro-batch (the memory model's kLossChunkTokens), each chunk's logits, loss, logits' gradient
// and the head's input and weight gradients formed in the forward, so one chunk's logits live at a
// time.
int Builder::loss_chunks() const {
  if (!p_.chunked_loss)
    return 1;
  const std::int64_t target = c_.loss_chunk_tokens * static_cast<std::int64_t>(p_.micro_batch);
  std::int64_t c = (rows_e_ + target - 1) / target;
  while (c < rows_e_ && rows_e_ % c != 0)
    ++c;
  return static_cast<int>(c);
}

void Builder::chunked_loss(int mb, int w) {
  const auto m = static_cast<std::size_t>(mb);
  HeadSaved& hs = head_[m];
  const bool tied = m_.tied_embeddings;
  const int c = loss_chunks();
  const std::int64_t rows = rows_e_ / c;
  std::vector<int> xs, ls, dxs;
  for (int i = 0; i < c; ++i) {
    xs.push_back(
        tensor(fmt::format("head input chunk {} mb{}", i, mb), {rows, h_}, TensorRole::activation));
    ls.push_back(tensor(fmt::format("labels chunk {} mb{}", i, mb), {rows}, TensorRole::index,
                        Element::i32));
    dxs.push_back(
        tensor(fmt::format("head dx chunk {} mb{}", i, mb), {rows, h_}, TensorRole::activation));
  }
  simple(fmt::format("head_input.split.mb{}", mb), Kernel::copy, {hs.xg}, xs, Category::forward, -1,
         mb);
  simple(fmt::format("labels.split.mb{}", mb), Kernel::copy, {labels_[m]}, ls, Category::forward,
         -1, mb);
  const int g = grad_of(head_param_, mb);
  for (int i = 0; i < c; ++i) {
    const std::string what = fmt::format("chunk{}.mb{}", i, mb);
    const int logits = tensor(fmt::format("logits {}", what), {rows, vl_}, TensorRole::activation);
    matmul(fmt::format("lm_head.{}", what), {xs[static_cast<std::size_t>(i)]}, {w}, {logits}, false,
           tied, false, Category::forward, -1, mb);
    const int dlogits = tensor(fmt::format("dlogits {}", what), {rows, vl_}, TensorRole::activation,
                               Element::real, sim::Dtype::fp32);
    loss(what, mb, logits, ls[static_cast<std::size_t>(i)], dlogits);
    matmul(fmt::format("lm_head.{}.dgrad", what), {dlogits}, {w},
           {dxs[static_cast<std::size_t>(i)]}, false, !tied, false, Category::backward, -1, mb);
    if (tied) // dE[v, h] += dlogitsᵀ · x
      matmul(fmt::format("lm_head.{}.wgrad", what), {dlogits}, {xs[static_cast<std::size_t>(i)]},
             {g}, true, false, true, Category::backward, -1, mb);
    else // dW[h, v] += xᵀ · dlogits
      matmul(fmt::format("lm_head.{}.wgrad", what), {xs[static_cast<std::size_t>(i)]}, {dlogits},
             {g}, true, false, true, Category::backward, -1, mb);
  }
  hs.dx = tensor(fmt::format("head dx mb{}", mb), {rows_e_, h_}, TensorRole::saved);
  simple(fmt::format("head_dx.concat.mb{}", mb), Kernel::copy, dxs, {hs.dx}, Category::backward, -1,
         mb);
}

int Builder::head_backward(int mb) {
  const auto m = static_cast<std::size_t>(mb);
  HeadSaved& hs = head_[m];
  const bool tied = m_.tied_embeddings;
  const std::string wname = tied ? "embedding" : "lm_head";
  const int bw = s_.params[static_cast<std::size_t>(head_param_)].bucket;
  int dxg = hs.dx; // chunked loss: formed in the forward
  if (dxg < 0) {
    const std::vector<int> w = use_bucket(bw, "head.bwd", -1, mb);
    dxg = tensor(fmt::format("head dx mb{}", mb), {rows_e_, h_}, TensorRole::activation);
    matmul(fmt::format("lm_head.mb{}.dgrad", mb), {hs.dlogits}, {value_of(wname, w, bw)}, {dxg},
           false, !tied, false, Category::backward, -1, mb);
    const int g = grad_of(head_param_, mb);
    if (tied) // dE[v, h] += dlogitsᵀ · x
      wgrad(fmt::format("lm_head.mb{}.wgrad", mb), {hs.dlogits}, {hs.xg}, {g}, true, -1, mb);
    else // dW[h, v] += xᵀ · dlogits
      wgrad(fmt::format("lm_head.mb{}.wgrad", mb), {hs.xg}, {hs.dlogits}, {g}, true, -1, mb);
  }
  const int dxn =
      sp_scatter(fmt::format("head_sp_scatter.mb{}.bwd", mb), g_etp_, dxg, {n_, h_}, -1, mb);
  const int bn = bucket_of_param("final_norm");
  const std::vector<int> wn = use_bucket(bn, "head.bwd", -1, mb);
  return norm_backward(fmt::format("final_norm.mb{}.bwd", mb),
                       fmt::format("final_norm dx mb{}", mb), hs.x, value_of("final_norm", wn, bn),
                       hs.rstd, dxn, grad_of(find_param("final_norm"), mb), -1, mb);
}

// --- attention -----------------------------------------------------------------------------------

// RMSNorm, SP all-gather over TP, column-parallel q/k/v (one fused GEMM), per-head q/k norm,
// RoPE, attention over the rank's heads, row-parallel output projection, SP reduce-scatter,
// residual. Without SP every TP rank holds the whole rows and the output all-reduces.
int Builder::attn_forward(int l, int mb, int x, AttnSaved& s, Category cat, bool core_only) {
  const bool again = cat == Category::recompute;
  auto nm = [&](const char* what) {
    return fmt::format("L{}.{}.mb{}{}", l, what, mb, again ? ".recompute" : "");
  };
  const char* pass = again ? "bwd" : "fwd";
  const int b = bucket_of_param(pname(l, "attn.wo"));
  const int br = bucket_of_param(pname(l, "attn.norm"));
  const std::vector<int> w = use_bucket(b, pass, l, mb);
  const std::vector<int> wr = use_bucket(br, pass, l, mb);
  if (!core_only) {
    s.x = x;
    s.xn = tensor(nm("attn_norm"), {n_, h_}, TensorRole::activation);
    s.rstd = tensor(nm("attn_norm rstd"), {n_}, TensorRole::saved, Element::real, sim::Dtype::fp32);
    simple(nm("attn_norm"), Kernel::rmsnorm_fwd, {x, value_of(pname(l, "attn.norm"), wr, br)},
           {s.xn, s.rstd}, cat, l, mb, norm_attrs());
    s.xg = sp_gather(nm("attn_sp_gather"), g_tp_, s.xn, {ng_, h_}, TensorRole::saved, l, mb);
    if (mla_)
      mla_qkv_forward(l, mb, s, cat);
    else
      gqa_qkv_forward(l, mb, s, cat, w, b, wr, br);
  }
  core_forward(l, mb, s, cat);
  if (core_only)
    return -1;
  const int out = tensor(nm("o_proj out"), {ng_, h_}, TensorRole::activation);
  matmul(nm("o_proj"), {s.o}, {value_of(pname(l, "attn.wo"), w, b)}, {out}, false, false, false,
         cat, l, mb);
  const int y = sp_scatter(nm("attn_sp_scatter"), g_tp_, out, {n_, h_}, l, mb);
  const int h = tensor(nm("attn residual"), {n_, h_}, TensorRole::saved);
  simple(nm("attn_residual"), Kernel::add, {x, y}, {h}, cat, l, mb);
  return h;
}

// The rows' reduction over TP after a row-parallel GEMM: a reduce-scatter to this rank's SP
// share, or without SP an all-reduce (Megatron's RowParallelLinear either way).
int Builder::sp_scatter(const std::string& name, int g, int x, const Shape& scattered, int l,
                        int mb) {
  if (sp_)
    return collective(name, OpKind::reduce_scatter, Category::tp_comm, kTp, g, x, scattered,
                      TensorRole::activation, l, mb);
  std::string n = name;
  for (const char* sp_name : {"_sp_scatter", "_sp_gather"})
    if (const auto at = n.find(sp_name); at != std::string::npos)
      n.replace(at, std::string(sp_name).size(), "_tp_all_reduce");
  return collective(n, OpKind::all_reduce, Category::tp_comm, kTp, g, x, shape(x),
                    TensorRole::activation, l, mb);
}

// The SP all-gather before a column-parallel GEMM (its input's rows of the whole TP group);
// without SP the rows are already whole: no op.
int Builder::sp_gather(const std::string& name, int g, int x, const Shape& gathered,
                       TensorRole role, int l, int mb) {
  if (!sp_)
    return x;
  return collective(name, OpKind::all_gather, Category::tp_comm, kTp, g, x, gathered, role, l, mb);
}

void Builder::gqa_qkv_forward(int l, int mb, AttnSaved& s, Category cat, const std::vector<int>& w,
                              int b, const std::vector<int>& wr, int br) {
  const bool again = cat == Category::recompute;
  auto nm = [&](const char* what) {
    return fmt::format("L{}.{}.mb{}{}", l, what, mb, again ? ".recompute" : "");
  };
  const bool qkn = m_.attention.qk_norm;
  const int q = tensor(nm("q"), {ng_, hl_, d_}, TensorRole::saved);
  const int k = tensor(nm("k"), {ng_, kvl_, d_}, TensorRole::saved);
  s.v = tensor(nm("v"), {ng_, kvl_, d_}, TensorRole::saved);
  const int proj = matmul(nm("qkv_proj"), {s.xg},
                          {value_of(pname(l, "attn.wq"), w, b), value_of(pname(l, "attn.wk"), w, b),
                           value_of(pname(l, "attn.wv"), w, b)},
                          {q, k, s.v}, false, false, false, cat, l, mb);
  if (kv_replicated_) // each rank computes its key/value head's replica
    scaled(price_only(proj), kv_share());
  int qr = q, kr = k;
  if (qkn) {
    s.q_pre = q;
    s.k_pre = k;
    qr = tensor(nm("q normed"), {ng_, hl_, d_}, TensorRole::activation);
    kr = tensor(nm("k normed"), {ng_, kvl_, d_}, TensorRole::activation);
    s.q_rstd =
        tensor(nm("q rstd"), {ng_ * hl_}, TensorRole::saved, Element::real, sim::Dtype::fp32);
    s.k_rstd =
        tensor(nm("k rstd"), {ng_ * kvl_}, TensorRole::saved, Element::real, sim::Dtype::fp32);
    simple(nm("q_norm"), Kernel::rmsnorm_fwd, {q, value_of(pname(l, "attn.q_norm"), wr, br)},
           {qr, s.q_rstd}, cat, l, mb, norm_attrs());
    simple(nm("k_norm"), Kernel::rmsnorm_fwd, {k, value_of(pname(l, "attn.k_norm"), wr, br)},
           {kr, s.k_rstd}, cat, l, mb, norm_attrs());
  }
  sim::Attrs rope;
  rope.theta = m_.rope_theta;
  s.q = tensor(nm("q rotated"), {ng_, hl_, d_}, TensorRole::saved);
  s.k = tensor(nm("k rotated"), {ng_, kvl_, d_}, TensorRole::saved);
  simple(nm("rope_q"), Kernel::rope, {qr}, {s.q}, cat, l, mb, rope);
  simple(nm("rope_k"), Kernel::rope, {kr}, {s.k}, cat, l, mb, rope);
}

// The value of layer l's attention parameter `role` from the pass's gathers of the head-split
// bucket b and the replicated bucket br.
int Builder::attn_weight(int l, const char* role, const std::vector<int>& w, int b,
                         const std::vector<int>& wr, int br) const {
  const std::string name = pname(l, role);
  return bucket_of_param(name) == b ? value_of(name, w, b) : value_of(name, wr, br);
}

// MLA's projections on the gathered rows (Megatron-Core's MLASelfAttention): q = q_b(norm(q_a
// x)) (or q_proj x), [c_kv | k_rope] = kv_a x, [k_nope | v] = kv_b(norm(c_kv)); then RoPE on
// q's and the shared key's rotary parts and the heads' q and k put together, [nope | rope] of
// qk_head_dim, priced as an elementwise pass, which the executable layer does not express.
void Builder::mla_qkv_forward(int l, int mb, AttnSaved& s, Category cat) {
  const bool again = cat == Category::recompute;
  auto nm = [&](const char* what) {
    return fmt::format("L{}.{}.mb{}{}", l, what, mb, again ? ".recompute" : "");
  };
  const char* pass = again ? "bwd" : "fwd";
  const workload::AttentionSpec& a = m_.attention;
  const int b = bucket_of_param(pname(l, "attn.wo"));
  const int br = bucket_of_param(pname(l, "attn.wkv_a"));
  const std::vector<int> w = use_bucket(b, pass, l, mb);
  const std::vector<int> wr = use_bucket(br, pass, l, mb);
  auto wt = [&](const char* role) { return attn_weight(l, role, w, b, wr, br); };
  const int q = tensor(nm("q"), {ng_, hl_, d_}, TensorRole::activation);
  if (a.q_lora_rank > 0) {
    s.q_lat = tensor(nm("q latent"), {ng_, a.q_lora_rank}, TensorRole::saved);
    replicated(matmul(nm("q_a_proj"), {s.xg}, {wt("attn.wq_a")}, {s.q_lat}, false, false, false,
                      cat, l, mb));
    s.q_latn = tensor(nm("q latent normed"), {ng_, a.q_lora_rank}, TensorRole::saved);
    s.q_lat_rstd =
        tensor(nm("q latent rstd"), {ng_}, TensorRole::saved, Element::real, sim::Dtype::fp32);
    simple(nm("q_a_norm"), Kernel::rmsnorm_fwd, {s.q_lat, wt("attn.q_a_norm")},
           {s.q_latn, s.q_lat_rstd}, cat, l, mb, norm_attrs());
    matmul(nm("q_b_proj"), {s.q_latn}, {wt("attn.wq_b")}, {q}, false, false, false, cat, l, mb);
  } else {
    matmul(nm("q_proj"), {s.xg}, {wt("attn.wq")}, {q}, false, false, false, cat, l, mb);
  }
  s.kv_lat = tensor(nm("kv latent"), {ng_, a.kv_lora_rank}, TensorRole::saved);
  const int k_rope = tensor(nm("k rope"), {ng_, a.qk_rope_head_dim}, TensorRole::activation);
  replicated(matmul(nm("kv_a_proj"), {s.xg}, {wt("attn.wkv_a"), wt("attn.wk_rope")},
                    {s.kv_lat, k_rope}, false, false, false, cat, l, mb));
  s.kv_latn = tensor(nm("kv latent normed"), {ng_, a.kv_lora_rank}, TensorRole::saved);
  s.kv_lat_rstd =
      tensor(nm("kv latent rstd"), {ng_}, TensorRole::saved, Element::real, sim::Dtype::fp32);
  simple(nm("kv_a_norm"), Kernel::rmsnorm_fwd, {s.kv_lat, wt("attn.kv_a_norm")},
         {s.kv_latn, s.kv_lat_rstd}, cat, l, mb, norm_attrs());
  const int k_nope = tensor(nm("k nope"), {ng_, hl_, a.qk_nope_head_dim}, TensorRole::activation);
  s.v = tensor(nm("v"), {ng_, hl_, dv_}, TensorRole::saved);
  matmul(nm("kv_b_proj"), {s.kv_latn}, {wt("attn.wk_b"), wt("attn.wv_b")}, {k_nope, s.v}, false,
         false, false, cat, l, mb);
  sim::Attrs rope;
  rope.theta = m_.rope_theta;
  s.q = tensor(nm("q rotated"), {ng_, hl_, d_}, TensorRole::saved);
  s.k = tensor(nm("k rotated"), {ng_, hl_, d_}, TensorRole::saved);
  price_only(
      simple(nm("mla_rope"), Kernel::rope, {q, k_nope, k_rope}, {s.q, s.k}, cat, l, mb, rope));
}

int Builder::attn_backward(int l, int mb, const AttnSaved& s, int dy) {
  auto nm = [&](const char* what) { return fmt::format("L{}.{}.mb{}.bwd", l, what, mb); };
  const int b = bucket_of_param(pname(l, "attn.wo"));
  const int br = bucket_of_param(pname(l, "attn.norm"));
  const std::vector<int> w = use_bucket(b, "bwd", l, mb);
  const std::vector<int> wr = use_bucket(br, "bwd", l, mb);
  auto grad = [&](const char* role) {
    return pt_[static_cast<std::size_t>(find_param(pname(l, role)))].grad;
  };
  const int dyg =
      sp_gather(nm("attn_sp_gather"), g_tp_, dy, {ng_, h_}, TensorRole::activation, l, mb);
  const int dout = tensor(nm("d attn out"), {ng_, hl_, dv_}, TensorRole::activation);
  matmul(nm("o_proj.dgrad"), {dyg}, {value_of(pname(l, "attn.wo"), w, b)}, {dout}, false, true,
         false, Category::backward, l, mb);
  wgrad(nm("o_proj.wgrad"), {s.o}, {dyg}, {grad("attn.wo")}, true, l, mb);
  int dq = -1, dk = -1, dv = -1;
  core_backward(l, mb, s, dout, dq, dk, dv);
  const int dxg = mla_ ? mla_qkv_backward(l, mb, s, dq, dk, dv)
                       : gqa_qkv_backward(l, mb, s, dq, dk, dv, w, b, wr, br);
  const int dxn = sp_scatter(nm("attn_sp_scatter"), g_tp_, dxg, {n_, h_}, l, mb);
  const int dxa =
      norm_backward(nm("attn_norm"), nm("d attn norm input"), s.x,
                    value_of(pname(l, "attn.norm"), wr, br), s.rstd, dxn, grad("attn.norm"), l, mb);
  const int dx = tensor(nm("d layer input"), {n_, h_}, TensorRole::activation);
  simple(nm("attn_residual"), Kernel::add, {dxa, dy}, {dx}, Category::backward, l, mb);
  return dx;
}

int Builder::gqa_qkv_backward(int l, int mb, const AttnSaved& s, int dq, int dk, int dv,
                              const std::vector<int>& w, int b, const std::vector<int>& wr,
                              int br) {
  auto nm = [&](const char* what) { return fmt::format("L{}.{}.mb{}.bwd", l, what, mb); };
  auto grad = [&](const char* role) {
    return pt_[static_cast<std::size_t>(find_param(pname(l, role)))].grad;
  };
  sim::Attrs inv;
  inv.theta = m_.rope_theta;
  inv.inverse = true;
  const int dqr = tensor(nm("dq unrotated"), {ng_, hl_, d_}, TensorRole::activation);
  const int dkr = tensor(nm("dk unrotated"), {ng_, kvl_, d_}, TensorRole::activation);
  simple(nm("rope_q"), Kernel::rope, {dq}, {dqr}, Category::backward, l, mb, inv);
  simple(nm("rope_k"), Kernel::rope, {dk}, {dkr}, Category::backward, l, mb, inv);
  dq = dqr;
  dk = dkr;
  if (m_.attention.qk_norm) {
    dq = norm_backward(nm("q_norm"), nm("dq pre-norm"), s.q_pre,
                       value_of(pname(l, "attn.q_norm"), wr, br), s.q_rstd, dq, grad("attn.q_norm"),
                       l, mb);
    dk = norm_backward(nm("k_norm"), nm("dk pre-norm"), s.k_pre,
                       value_of(pname(l, "attn.k_norm"), wr, br), s.k_rstd, dk, grad("attn.k_norm"),
                       l, mb);
  }
  const int dxg = tensor(nm("d attn input"), {ng_, h_}, TensorRole::activation);
  scaled(matmul(nm("qkv_proj.dgrad"), {dq, dk, dv},
                {value_of(pname(l, "attn.wq"), w, b), value_of(pname(l, "attn.wk"), w, b),
                 value_of(pname(l, "attn.wv"), w, b)},
                {dxg}, false, true, false, Category::backward, l, mb),
         kv_share());
  scaled_wgrad(kv_share(), nm("qkv_proj.wgrad"), {s.xg}, {dq, dk, dv},
               {grad("attn.wq"), grad("attn.wk"), grad("attn.wv")}, true, l, mb);
  return dxg;
}

// MLA's backward from the core's dq, dk, dv: the rotary pass undone (k's rotary part summed over
// the heads), then each projection's data and weight gradient, the norms', the input gradients
// of the latent paths summed into the rows' gradient.
int Builder::mla_qkv_backward(int l, int mb, const AttnSaved& s, int dq, int dk, int dv) {
  auto nm = [&](const char* what) { return fmt::format("L{}.{}.mb{}.bwd", l, what, mb); };
  const workload::AttentionSpec& a = m_.attention;
  const Category bwd = Category::backward;
  const int b = bucket_of_param(pname(l, "attn.wo"));
  const int br = bucket_of_param(pname(l, "attn.wkv_a"));
  const std::vector<int> w = use_bucket(b, "bwd", l, mb);
  const std::vector<int> wr = use_bucket(br, "bwd", l, mb);
  auto wt = [&](const char* role) { return attn_weight(l, role, w, b, wr, br); };
  auto grad = [&](const char* role) {
    return pt_[static_cast<std::size_t>(find_param(pname(l, role)))].grad;
  };
  sim::Attrs inv;
  inv.theta = m_.rope_theta;
  inv.inverse = true;
  const int dqp = tensor(nm("dq unrotated"), {ng_, hl_, d_}, TensorRole::activation);
  const int dk_nope = tensor(nm("dk nope"), {ng_, hl_, a.qk_nope_head_dim}, TensorRole::activation);
  const int dk_rope = tensor(nm("dk rope"), {ng_, a.qk_rope_head_dim}, TensorRole::activation);
  price_only(
      simple(nm("mla_rope"), Kernel::rope, {dq, dk}, {dqp, dk_nope, dk_rope}, bwd, l, mb, inv));
  const int dkvn = tensor(nm("d kv latent normed"), {ng_, a.kv_lora_rank}, TensorRole::activation);
  matmul(nm("kv_b_proj.dgrad"), {dk_nope, dv}, {wt("attn.wk_b"), wt("attn.wv_b")}, {dkvn}, false,
         true, false, bwd, l, mb);
  wgrad(nm("kv_b_proj.wgrad"), {s.kv_latn}, {dk_nope, dv}, {grad("attn.wk_b"), grad("attn.wv_b")},
        true, l, mb);
  const int dkv = norm_backward(nm("kv_a_norm"), nm("d kv latent"), s.kv_lat, wt("attn.kv_a_norm"),
                                s.kv_lat_rstd, dkvn, grad("attn.kv_a_norm"), l, mb);
  const int dxg = tensor(nm("d attn input"), {ng_, h_}, TensorRole::activation);
  replicated(matmul(nm("kv_a_proj.dgrad"), {dkv, dk_rope}, {wt("attn.wkv_a"), wt("attn.wk_rope")},
                    {dxg}, false, true, false, bwd, l, mb));
  scaled_wgrad(1.0 / p_.attention.tp, nm("kv_a_proj.wgrad"), {s.xg}, {dkv, dk_rope},
               {grad("attn.wkv_a"), grad("attn.wk_rope")}, true, l, mb);
  if (a.q_lora_rank > 0) {
    const int dcqn = tensor(nm("d q latent normed"), {ng_, a.q_lora_rank}, TensorRole::activation);
    matmul(nm("q_b_proj.dgrad"), {dqp}, {wt("attn.wq_b")}, {dcqn}, false, true, false, bwd, l, mb);
    wgrad(nm("q_b_proj.wgrad"), {s.q_latn}, {dqp}, {grad("attn.wq_b")}, true, l, mb);
    const int dcq = norm_backward(nm("q_a_norm"), nm("d q latent"), s.q_lat, wt("attn.q_a_norm"),
                                  s.q_lat_rstd, dcqn, grad("attn.q_a_norm"), l, mb);
    replicated(matmul(nm("q_a_proj.dgrad"), {dcq}, {wt("attn.wq_a")}, {dxg}, false, true, true, bwd,
                      l, mb));
    scaled_wgrad(1.0 / p_.attention.tp, nm("q_a_proj.wgrad"), {s.xg}, {dcq}, {grad("attn.wq_a")},
                 true, l, mb);
  } else {
    matmul(nm("q_proj.dgrad"), {dqp}, {wt("attn.wq")}, {dxg}, false, true, true, bwd, l, mb);
    wgrad(nm("q_proj.wgrad"), {s.xg}, {dqp}, {grad("attn.wq")}, true, l, mb);
  }
  return dxg;
}

// --- context parallelism -------------------------------------------------------------------------

sim::Attrs Builder::core_attrs(int l) const {
  sim::Attrs a;
  a.sequences = p_.micro_batch;
  a.causal = true;
  a.window = m_.layers[static_cast<std::size_t>(l)].window;
  a.scale = 1.0 / std::sqrt(static_cast<double>(d_));
  a.full_sequence = uly_ > 1;
  return a;
}

// y [b, a, rest] from x viewed as [a, b, rest].
int Builder::transpose(const std::string& name, int x, int y, std::int64_t a, std::int64_t b,
                       Category cat, int l, int mb) {
  sim::Attrs at;
  at.transpose_a = a;
  at.transpose_b = b;
  return simple(name, Kernel::transpose, {x}, {y}, cat, l, mb, at);
}

int Builder::cp_collective(const std::string& name, OpKind kind, int g, std::vector<int> in,
                           std::vector<int> out, int l, int mb) {
  return emit(OpSpec{name,
                     Kernel::collective,
                     kind,
                     Category::cp_comm,
                     kCp,
                     g,
                     std::move(in),
                     std::move(out),
                     {},
                     l,
                     mb});
}

// Ulysses' all-to-all from my rows with all `heads` heads [ng, heads, d] to whole sequences
// (the Ulysses group's chunks, in group order) with heads / ulysses heads [B·u·lc, hs, d]:
// pack the block for Ulysses rank j (its heads j·hs ..) first, exchange equal blocks, then put
// each sequence's u received chunks together (no copy for one sequence: already in order).
// Key/value heads fewer than the Ulysses ranks are first repeated to one per rank (priced, not
// executable; their gradients are summed back in to_tokens).
int Builder::to_heads(const std::string& name, int x, std::int64_t heads, TensorRole role,
                      Category cat, int l, int mb) {
  if (uly_ == 1)
    return x;
  if (heads < uly_) {
    const int rep = tensor(name + " replicated", {ng_, uly_, shape(x)[2]}, TensorRole::activation);
    price_only(simple(name + ".replicate", Kernel::transpose, {x}, {rep}, cat, l, mb));
    x = rep;
    heads = uly_;
  }
  const std::int64_t hs = heads / uly_, B = p_.micro_batch, d = shape(x)[2];
  const int send = tensor(name + " packed", {uly_, ng_, hs, d}, TensorRole::comm_buffer);
  transpose(name + ".pack", x, send, ng_, uly_, cat, l, mb);
  const int recv = tensor(name + (B > 1 ? " received" : ""), {uly_ * ng_, hs, d},
                          B > 1 ? TensorRole::comm_buffer : role);
  cp_collective(name + ".all_to_all", OpKind::all_to_all, g_uly_, {send}, {recv}, l, mb);
  if (B == 1)
    return recv;
  const int y = tensor(name, {uly_ * ng_, hs, d}, role);
  transpose(name + ".unpack", recv, y, uly_, B, cat, l, mb);
  return y;
}

// The inverse: whole sequences with heads / ulysses heads back to my rows with all heads.
int Builder::to_tokens(const std::string& name, int x, std::int64_t heads, TensorRole role,
                       Category cat, int l, int mb) {
  if (uly_ == 1)
    return x;
  if (heads < uly_) { // replicated key/value heads: their gradients summed over the replicas
    const int all = to_tokens(name + " replicas", x, uly_, TensorRole::activation, cat, l, mb);
    const int y = tensor(name, {ng_, heads, shape(all)[2]}, role);
    price_only(simple(name + ".sum_replicas", Kernel::transpose, {all}, {y}, cat, l, mb));
    return y;
  }
  const std::int64_t hs = heads / uly_, B = p_.micro_batch, d = shape(x)[2];
  int send = x;
  if (B > 1) {
    send = tensor(name + " packed", {uly_ * ng_, hs, d}, TensorRole::comm_buffer);
    transpose(name + ".pack", x, send, B, uly_, cat, l, mb);
  }
  const int recv = tensor(name + " received", {uly_, ng_, hs, d}, TensorRole::comm_buffer);
  cp_collective(name + ".all_to_all", OpKind::all_to_all, g_uly_, {send}, {recv}, l, mb);
  const int y = tensor(name, {ng_, heads, d}, role);
  transpose(name + ".unpack", recv, y, uly_, ng_, cat, l, mb);
  return y;
}

// The attention core over the CP group, as the CPU executor runs it: Ulysses' all-to-alls of q,
// k and v (each its own, as DeepSpeed's DistributedAttention), then the ring: step i attends my
// queries to the key/value block of ring rank (me - i) while the next block travels (K and V in
// one message per hop, ring - 1 hops), merging into o and lse; then o back to my rows (the
// log-sum-exp stays head-sharded: only the backward reads it). Without CP: one attention call.
void Builder::core_forward(int l, int mb, AttnSaved& s, Category cat) {
  const bool again = cat == Category::recompute;
  auto nm = [&](const char* what) {
    return fmt::format("L{}.{}.mb{}{}", l, what, mb, again ? ".recompute" : "");
  };
  const Category fwd = cat;
  s.cq = to_heads(nm("q heads"), s.q, hl_, TensorRole::saved, fwd, l, mb);
  s.ck = to_heads(nm("k heads"), s.k, kvl_, TensorRole::saved, fwd, l, mb);
  s.cv = to_heads(nm("v heads"), s.v, kvl_, TensorRole::saved, fwd, l, mb);
  // Copies: tensor() grows the list. The output has v's head dim.
  const Shape qs = shape(s.cq), ks = shape(s.ck), vs = shape(s.cv);
  s.co = tensor(nm("attn out"), {qs[0], qs[1], vs[2]}, TensorRole::saved);
  s.lse =
      tensor(nm("attn lse"), {qs[0], qs[1]}, TensorRole::saved, Element::real, sim::Dtype::fp32);
  int kb = s.ck, vb = s.cv;
  for (int i = 0; i < ring_; ++i) {
    int kn = -1, vn = -1;
    if (i + 1 < ring_) {
      kn =
          tensor(fmt::format("{} k block {}", nm("attn_core"), i + 1), ks, TensorRole::comm_buffer);
      vn =
          tensor(fmt::format("{} v block {}", nm("attn_core"), i + 1), vs, TensorRole::comm_buffer);
      cp_collective(fmt::format("{}.ring_kv.{}", nm("attn_core"), i), OpKind::send_recv, g_ring_,
                    {kb, vb}, {kn, vn}, l, mb);
    }
    OpSpec core;
    core.name = ring_ > 1 ? fmt::format("{}.{}", nm("attn_core"), i) : nm("attn_core");
    core.kernel = Kernel::attention_fwd;
    core.kind = OpKind::attention_fwd;
    core.category = fwd;
    core.in = {s.cq, kb, vb};
    core.out = {s.co, s.lse};
    core.attrs = core_attrs(l);
    core.attrs.ring_step = i;
    core.layer = l;
    core.mb = mb;
    emit(std::move(core));
    kb = kn;
    vb = vn;
  }
  s.o = to_tokens(nm("attn out tokens"), s.co, hl_, TensorRole::saved, fwd, l, mb);
}

// Its backward: dO to the core's layout, the ring again (the key/value blocks travel ring - 1
// hops; each block's gradient travels with it, one hop after every step, ring hops in all so
// that it arrives home, accumulating each step's share), then dq, dk, dv back to my rows.
void Builder::core_backward(int l, int mb, const AttnSaved& s, int dout, int& dq, int& dk,
                            int& dv) {
  auto nm = [&](const std::string& what) { return fmt::format("L{}.{}.mb{}.bwd", l, what, mb); };
  const Category bwd = Category::backward;
  const int cdo = to_heads(nm("d attn out heads"), dout, hl_, TensorRole::activation, bwd, l, mb);
  const Shape qs = shape(s.cq), ks = shape(s.ck), vs = shape(s.cv); // copies
  const std::string heads = uly_ > 1 ? " heads" : "";
  const int cdq = tensor(nm("dq" + heads), qs, TensorRole::activation);
  auto block = [&](const std::string& what, int i) {
    const Shape& bs = what == "dv" ? vs : ks;
    return ring_ > 1 ? tensor(fmt::format("{} {} block {}", nm("attn_core"), what, i), bs,
                              TensorRole::comm_buffer)
                     : tensor(nm(what + heads), bs, TensorRole::activation);
  };
  // With a ring, each step writes its own share of the block's gradient; once the block's
  // travelling gradient has arrived (the previous step's hop) it is added and sent on, so the next
  // step's attention overlaps the hop (Transformer Engine's ring: compute, wait, add, send).
  int kb = s.ck, vb = s.cv, dkb = -1, dvb = -1;
  if (ring_ == 1) {
    dkb = block("dk", 0);
    dvb = block("dv", 0);
  }
  for (int i = 0; i < ring_; ++i) {
    int kn = -1, vn = -1;
    if (i + 1 < ring_) {
      kn =
          tensor(fmt::format("{} k block {}", nm("attn_core"), i + 1), ks, TensorRole::comm_buffer);
      vn =
          tensor(fmt::format("{} v block {}", nm("attn_core"), i + 1), vs, TensorRole::comm_buffer);
      cp_collective(fmt::format("{}.ring_kv.{}", nm("attn_core"), i), OpKind::send_recv, g_ring_,
                    {kb, vb}, {kn, vn}, l, mb);
    }
    int dkp = dkb, dvp = dvb; // this step's share of the block's gradient
    if (ring_ > 1) {
      dkp = tensor(fmt::format("{} dk share {}", nm("attn_core"), i), ks, TensorRole::comm_buffer);
      dvp = tensor(fmt::format("{} dv share {}", nm("attn_core"), i), ks, TensorRole::comm_buffer);
    }
    OpSpec core;
    core.name = ring_ > 1 ? fmt::format("{}.{}", nm("attn_core"), i) : nm("attn_core");
    core.kernel = Kernel::attention_bwd;
    core.kind = OpKind::attention_bwd;
    core.category = bwd;
    core.in = {s.cq, kb, vb, s.co, s.lse, cdo};
    core.out = {cdq, dkp, dvp};
    core.attrs = core_attrs(l);
    core.attrs.ring_step = i;
    core.attrs.accumulate = true;
    core.layer = l;
    core.mb = mb;
    emit(std::move(core));
    if (ring_ > 1) {
      if (i == 0) {
        dkb = dkp;
        dvb = dvp;
      } else { // the arrived gradient plus this step's share
        const int dks =
            tensor(fmt::format("{} dk sum {}", nm("attn_core"), i), ks, TensorRole::comm_buffer);
        const int dvs =
            tensor(fmt::format("{} dv sum {}", nm("attn_core"), i), ks, TensorRole::comm_buffer);
        simple(fmt::format("{}.dk_add.{}", nm("attn_core"), i), Kernel::add, {dkb, dkp}, {dks}, bwd,
               l, mb);
        simple(fmt::format("{}.dv_add.{}", nm("attn_core"), i), Kernel::add, {dvb, dvp}, {dvs}, bwd,
               l, mb);
        dkb = dks;
        dvb = dvs;
      }
      const int dkn = block("dk", i + 1), dvn = block("dv", i + 1);
      cp_collective(fmt::format("{}.ring_dkv.{}", nm("attn_core"), i), OpKind::send_recv, g_ring_,
                    {dkb, dvb}, {dkn, dvn}, l, mb);
      dkb = dkn;
      dvb = dvn;
    }
    kb = kn;
    vb = vn;
  }
  dq = to_tokens(nm("dq"), cdq, hl_, TensorRole::activation, bwd, l, mb);
  dk = to_tokens(nm("dk"), dkb, kvl_, TensorRole::activation, bwd, l, mb);
  dv = to_tokens(nm("dv"), dvb, kvl_, TensorRole::activation, bwd, l, mb);
}

// --- dense MLP -----------------------------------------------------------------------------------

// RMSNorm, SP all-gather over the dense TP group, column-parallel gate|up (one fused GEMM),
// SwiGLU, row-parallel down, reduce-scatter, residual.
int Builder::dense_forward(int l, int mb, int x, MlpSaved& s, Category cat) {
  const bool again = cat == Category::recompute;
  auto nm = [&](const char* what) {
    return fmt::format("L{}.{}.mb{}{}", l, what, mb, again ? ".recompute" : "");
  };
  const char* pass = again ? "bwd" : "fwd";
  const int b = bucket_of_param(pname(l, "mlp.up"));
  const int br = bucket_of_param(pname(l, "mlp.norm"));
  const std::vector<int> w = use_bucket(b, pass, l, mb);
  const std::vector<int> wr = use_bucket(br, pass, l, mb);
  s.x = x;
  const int xn = tensor(nm("mlp_norm"), {n_, h_}, TensorRole::activation);
  s.rstd = tensor(nm("mlp_norm rstd"), {n_}, TensorRole::saved, Element::real, sim::Dtype::fp32);
  simple(nm("mlp_norm"), Kernel::rmsnorm_fwd, {x, value_of(pname(l, "mlp.norm"), wr, br)},
         {xn, s.rstd}, cat, l, mb, norm_attrs());
  s.xg = sp_gather(nm("mlp_sp_gather"), g_dtp_, xn, {rows_d_, h_}, TensorRole::saved, l, mb);
  const bool gated = m_.dense_mlp.gated;
  s.gu = tensor(nm("gate_up"), {rows_d_, (gated ? 2 : 1) * f_}, TensorRole::saved);
  matmul(nm("mlp_gate_up"), {s.xg}, dense_up_weights(l, w, b), {s.gu}, false, false, false, cat, l,
         mb);
  s.act = tensor(nm("mlp act"), {rows_d_, f_}, TensorRole::saved);
  const int act = simple(nm("mlp_act"), Kernel::swiglu_fwd, {s.gu}, {s.act}, cat, l, mb);
  if (!gated) // GELU: priced like the SwiGLU pass, not in the executable layer
    price_only(act);
  const int out = tensor(nm("mlp out"), {rows_d_, h_}, TensorRole::activation);
  matmul(nm("mlp_down"), {s.act}, {value_of(pname(l, "mlp.down"), w, b)}, {out}, false, false,
         false, cat, l, mb);
  const int y = sp_scatter(nm("mlp_sp_scatter"), g_dtp_, out, {n_, h_}, l, mb);
  const int o = tensor(nm("mlp residual"), {n_, h_}, TensorRole::activation);
  simple(nm("mlp_residual"), Kernel::add, {x, y}, {o}, cat, l, mb);
  return o;
}

int Builder::dense_backward(int l, int mb, const MlpSaved& s, int dy) {
  auto nm = [&](const char* what) { return fmt::format("L{}.{}.mb{}.bwd", l, what, mb); };
  const int b = bucket_of_param(pname(l, "mlp.up"));
  const int br = bucket_of_param(pname(l, "mlp.norm"));
  const std::vector<int> w = use_bucket(b, "bwd", l, mb);
  const std::vector<int> wr = use_bucket(br, "bwd", l, mb);
  auto grad = [&](const char* role) {
    return pt_[static_cast<std::size_t>(find_param(pname(l, role)))].grad;
  };
  const int dyg =
      sp_gather(nm("mlp_sp_gather"), g_dtp_, dy, {rows_d_, h_}, TensorRole::activation, l, mb);
  const int dact = tensor(nm("d mlp act"), {rows_d_, f_}, TensorRole::activation);
  matmul(nm("mlp_down.dgrad"), {dyg}, {value_of(pname(l, "mlp.down"), w, b)}, {dact}, false, true,
         false, Category::backward, l, mb);
  wgrad(nm("mlp_down.wgrad"), {s.act}, {dyg}, {grad("mlp.down")}, true, l, mb);
  const bool gated = m_.dense_mlp.gated;
  const int dgu = tensor(nm("d gate_up"), {rows_d_, (gated ? 2 : 1) * f_}, TensorRole::activation);
  const int act =
      simple(nm("mlp_act"), Kernel::swiglu_bwd, {s.gu, dact}, {dgu}, Category::backward, l, mb);
  if (!gated)
    price_only(act);
  const int dxg = tensor(nm("d mlp input"), {rows_d_, h_}, TensorRole::activation);
  matmul(nm("mlp_gate_up.dgrad"), {dgu}, dense_up_weights(l, w, b), {dxg}, false, true, false,
         Category::backward, l, mb);
  std::vector<int> up_grads;
  if (gated)
    up_grads.push_back(grad("mlp.gate"));
  up_grads.push_back(grad("mlp.up"));
  wgrad(nm("mlp_gate_up.wgrad"), {s.xg}, {dgu}, up_grads, true, l, mb);
  const int dxn = sp_scatter(nm("mlp_sp_scatter"), g_dtp_, dxg, {n_, h_}, l, mb);
  const int dxa =
      norm_backward(nm("mlp_norm"), nm("d mlp norm input"), s.x,
                    value_of(pname(l, "mlp.norm"), wr, br), s.rstd, dxn, grad("mlp.norm"), l, mb);
  const int dx = tensor(nm("d mlp block input"), {n_, h_}, TensorRole::activation);
  simple(nm("mlp_residual"), Kernel::add, {dxa, dy}, {dx}, Category::backward, l, mb);
  return dx;
}

// The dense MLP's first projection's weights: gate and up (SwiGLU), or up alone.
std::vector<int> Builder::dense_up_weights(int l, const std::vector<int>& w, int b) const {
  std::vector<int> out;
  if (m_.dense_mlp.gated)
    out.push_back(value_of(pname(l, "mlp.gate"), w, b));
  out.push_back(value_of(pname(l, "mlp.up"), w, b));
  return out;
}

// --- activation offload -------------------------------------------------------------------------

std::vector<int*> Builder::backward_reads(LayerSaved& sv) {
  using strategy::Recompute;
  const Recompute ra = p_.recompute[static_cast<int>(LayerKind::attention)];
  const Recompute rm = p_.recompute[static_cast<int>(LayerKind::dense)];
  AttnSaved& a = sv.a;
  MlpSaved& m = sv.m;
  const LayerKind mlp = sv.e.x >= 0 ? LayerKind::moe : LayerKind::dense;
  if (ra == Recompute::full && p_.recompute[static_cast<int>(mlp)] == Recompute::full)
    return {&a.x}; // the layer's one checkpoint (checkpoints_layer)
  std::vector<int*> out;
  if (ra == Recompute::full)
    out = {&a.x};
  else
    out = {&a.x, &a.q_pre, &a.k_pre,  &a.q_rstd,     &a.k_rstd, &a.q,       &a.k,
           &a.v, &a.q_lat, &a.q_latn, &a.q_lat_rstd, &a.kv_lat, &a.kv_latn, &a.kv_lat_rstd};
  if (ra == Recompute::none) // selective recomputes the norm and its gather (renorm)
    for (int* f : {&a.rstd, &a.xg})
      out.push_back(f);
  if (ra == Recompute::none)
    for (int* f : {&a.o, &a.cq, &a.ck, &a.cv, &a.co, &a.lse})
      out.push_back(f);
  if (rm == Recompute::full) {
    out.push_back(&m.x);
  } else {
    for (int* f : {&m.x, &m.gu})
      out.push_back(f);
    if (rm == Recompute::none)
      for (int* f : {&m.rstd, &m.xg, &m.act})
        out.push_back(f);
  }
  // An MoE block's real-valued saved tensors (its index and count tables are small and stay).
  MoeSaved& e = sv.e;
  const Recompute re = p_.recompute[static_cast<int>(LayerKind::moe)];
  if (re == Recompute::full) {
    out.push_back(&e.x);
  } else {
    for (int* f : {&e.x, &e.rstd, &e.xn, &e.probs, &e.weights, &e.rows_in, &e.gu, &e.ret, &e.sh_xg,
                   &e.sh_gu})
      out.push_back(f);
    if (re == Recompute::none) {
      out.push_back(&e.act);
      out.push_back(&e.sh_act);
    }
  }
  std::erase_if(out, [](const int* f) { return *f < 0; });
  return out;
}

void Builder::offload(int l, int mb, LayerSaved& sv) {
  std::vector<int> dev;
  for (int* f : backward_reads(sv))
    if (std::find(dev.begin(), dev.end(), *f) == dev.end())
      dev.push_back(*f);
  std::vector<int> host;
  for (int t : dev)
    host.push_back(clone(t, rc_->tensors[static_cast<std::size_t>(t)].name + " (host)",
                         TensorRole::host_copy, sim::Device::host));
  emit(OpSpec{fmt::format("L{}.act_offload.mb{}", l, mb),
              Kernel::copy,
              OpKind::copy_d2h,
              Category::offload,
              kD2h,
              -1,
              dev,
              host,
              {},
              l,
              mb});
  host_copies_[{l, mb}] = host;
}

void Builder::reload(int l, int mb, LayerSaved& sv) {
  const auto it = host_copies_.find({l, mb});
  if (it == host_copies_.end())
    return;
  std::vector<int*> fields = backward_reads(sv);
  std::vector<int> dev, back;
  for (int* f : fields)
    if (std::find(dev.begin(), dev.end(), *f) == dev.end())
      dev.push_back(*f);
  for (int t : dev)
    back.push_back(clone(t, rc_->tensors[static_cast<std::size_t>(t)].name + " (reloaded)",
                         TensorRole::saved, sim::Device::hbm));
  const int op = emit(OpSpec{fmt::format("L{}.act_reload.mb{}", l, mb),
                             Kernel::copy,
                             OpKind::copy_h2d,
                             Category::offload,
                             kH2d,
                             -1,
                             it->second,
                             back,
                             {},
                             l,
                             mb});
  // Reloads run one layer ahead of the backward (the cost-only lowering's bound): layer l's
  // starts once layer l + 2's backward has ended, so at most two layers' reloaded activations
  // live at a time (the memory model's reload double buffer), not every layer's at once.
  if (const auto gate = layer_bwd_end_.find({l + 2, mb}); gate != layer_bwd_end_.end())
    rc_->ops[static_cast<std::size_t>(op)].deps.push_back(gate->second);
  for (int* f : fields)
    *f = back[static_cast<std::size_t>(std::find(dev.begin(), dev.end(), *f) - dev.begin())];
  host_copies_.erase(it);
}

void Builder::gate_prefetch(int begin, int gate) {
  if (gate < 0)
    return;
  for (std::size_t i = static_cast<std::size_t>(begin); i < rc_->ops.size(); ++i) {
    sim::Op& op = rc_->ops[i];
    const bool gather =
        op.kernel == Kernel::collective && op.kind == OpKind::all_gather && op.stream == kDp;
    const bool upload = op.kernel == Kernel::copy && op.kind == OpKind::copy_h2d &&
                        op.category == Category::offload;
    if (gather || upload)
      op.deps.push_back(gate);
  }
}

// --- recompute ----------------------------------------------------------------------------------

void Builder::recompute_mlp(int l, int mb, MlpSaved& s) {
  const strategy::Recompute r = p_.recompute[static_cast<int>(LayerKind::dense)];
  if (r == strategy::Recompute::full) {
    dense_forward(l, mb, s.x, s, Category::recompute);
  } else if (r == strategy::Recompute::selective) {
    renorm(l, mb, "mlp", s.x, s.rstd, s.xg);
    s.act =
        tensor(fmt::format("L{}.mlp act.mb{}.recompute", l, mb), {rows_d_, f_}, TensorRole::saved);
    const int op = simple(fmt::format("L{}.mlp_act.mb{}.recompute", l, mb), Kernel::swiglu_fwd,
                          {s.gu}, {s.act}, Category::recompute, l, mb);
    if (!m_.dense_mlp.gated)
      price_only(op);
  }
}

void Builder::recompute_moe(int l, int mb, MoeSaved& s) {
  const strategy::Recompute r = p_.recompute[static_cast<int>(LayerKind::moe)];
  if (r == strategy::Recompute::full) {
    moe_forward(l, mb, s.x, s, Category::recompute);
  } else if (r == strategy::Recompute::selective) { // the experts' activation function only
    const int act = clone(s.act, fmt::format("L{}.experts act.mb{}.recompute", l, mb),
                          TensorRole::saved, sim::Device::hbm);
    const int op = simple(fmt::format("L{}.experts_act.mb{}.recompute", l, mb), Kernel::swiglu_fwd,
                          {s.gu}, {act}, Category::recompute, l, mb);
    if (!m_.moe.gated || m_.moe.expert_bias)
      price_only(op);
    s.act = act;
    if (s.sh_act >= 0) { // the shared experts' activation too
      const int sh = clone(s.sh_act, fmt::format("L{}.shared act.mb{}.recompute", l, mb),
                           TensorRole::saved, sim::Device::hbm);
      const int sop = simple(fmt::format("L{}.shared_act.mb{}.recompute", l, mb),
                             Kernel::swiglu_fwd, {s.sh_gu}, {sh}, Category::recompute, l, mb);
      if (!m_.moe.gated)
        price_only(sop);
      s.sh_act = sh;
    }
  }
}

bool Builder::checkpoints_layer(int l) const {
  using strategy::Recompute;
  const LayerKind mlp = is_moe(l) ? LayerKind::moe : LayerKind::dense;
  return p_.recompute[static_cast<int>(LayerKind::attention)] == Recompute::full &&
         p_.recompute[static_cast<int>(mlp)] == Recompute::full;
}

void Builder::recompute_layer(int l, int mb, LayerSaved& sv) {
  const int h = attn_forward(l, mb, sv.a.x, sv.a, Category::recompute);
  if (is_moe(l))
    moe_forward(l, mb, h, sv.e, Category::recompute);
  else
    dense_forward(l, mb, h, sv.m, Category::recompute);
}

void Builder::recompute_attention(int l, int mb, AttnSaved& s) {
  const strategy::Recompute r = p_.recompute[static_cast<int>(LayerKind::attention)];
  if (r == strategy::Recompute::selective)
    renorm(l, mb, "attn", s.x, s.rstd, s.xg);
  if (r != strategy::Recompute::none)
    attn_forward(l, mb, s.x, s, Category::recompute, r == strategy::Recompute::selective);
}

// Selective recompute re-runs a block's norm and its sequence-parallel all-gather before the
// backward, so the forward keeps the block's input alone of them (the memory model's selective
// policy: no norm output saved). torchtitan's selective activation checkpointing saves neither
// the norms' outputs nor the all-gathers' (its save list holds GEMMs, attention and
// reduce-scatters); Megatron-LM saves the sequence-parallel shard and all-gathers it again in
// the backward for the weight gradient.
void Builder::renorm(int l, int mb, const char* block, int x, int& rstd, int& xg) {
  const bool attn = std::string(block) == "attn";
  auto nm = [&](const char* what) {
    return fmt::format("L{}.{}_{}.mb{}.recompute", l, block, what, mb);
  };
  const std::string wname = pname(l, attn ? "attn.norm" : "mlp.norm");
  const int br = bucket_of_param(wname);
  const std::vector<int> wr = use_bucket(br, "bwd", l, mb);
  const int xn = tensor(nm("norm"), {n_, h_}, TensorRole::activation);
  rstd = tensor(nm("norm rstd"), {n_}, TensorRole::saved, Element::real, sim::Dtype::fp32);
  simple(nm("norm"), Kernel::rmsnorm_fwd, {x, value_of(wname, wr, br)}, {xn, rstd},
         Category::recompute, l, mb, norm_attrs());
  xg = collective(nm("sp_gather"), OpKind::all_gather, Category::tp_comm, kTp,
                  attn ? g_tp_ : g_dtp_, xn, {attn ? ng_ : rows_d_, h_}, TensorRole::saved, l, mb);
}

// --- Mixture-of-Experts MLP ----------------------------------------------------------------------

// The block's norm and router are replicated on every rank, like the norms, and follow the
// dense kind (Megatron-Core reduces them with the non-expert parameters); the experts' stacked
// weights are split on the expert axis over EP and on their width over ETP, and reduce over the
// expert data-parallel group.
void Builder::declare_moe_params(int l) {
  const workload::MoeSpec& e = m_.moe;
  const std::int64_t h = h_, experts = e.num_routed_experts, f = e.expert_intermediate_size;
  const BucketKey rep{l, LayerKind::dense, true}, exp{l, LayerKind::moe, false};
  const sim::AxisSplit by_ep{0, "moe", "ep"};
  param(pname(l, "moe.router"), {h, experts}, {}, rep);
  if (e.router_bias)
    param(pname(l, "moe.router.bias"), {experts}, {}, rep);
  if (e.router_score_correction) // DeepSeek-V3's per-expert selection bias
    param(pname(l, "moe.router.score_correction"), {experts}, {}, rep);
  if (e.gated)
    param(pname(l, "moe.experts.gate"), {experts, h, f}, {by_ep, {2, "moe", "etp"}}, exp);
  param(pname(l, "moe.experts.up"), {experts, h, f}, {by_ep, {2, "moe", "etp"}}, exp);
  param(pname(l, "moe.experts.down"), {experts, f, h}, {by_ep, {1, "moe", "etp"}}, exp);
  if (e.expert_bias) {
    param(pname(l, "moe.experts.up_bias"), {experts, (e.gated ? 2 : 1) * f},
          {by_ep, {1, "moe", "etp"}}, exp);
    param(pname(l, "moe.experts.down_bias"), {experts, h}, {by_ep}, exp);
  }
  if (e.num_shared_experts > 0) {
    // Shared experts: a dense MLP under the dense TP (Megatron-Core's SharedExpertMLP).
    const BucketKey mlp{l, LayerKind::dense, false};
    const std::int64_t fs = e.num_shared_experts * e.shared_intermediate_size;
    const sim::AxisSplit cols{1, "dense", "tp"}, rows{0, "dense", "tp"};
    if (e.gated)
      param(pname(l, "moe.shared.gate"), {h, fs}, {cols}, mlp);
    param(pname(l, "moe.shared.up"), {h, fs}, {cols}, mlp);
    param(pname(l, "moe.shared.down"), {fs, h}, {rows}, mlp);
  }
}

// Dropless top-k MoE (Megatron-Core's all-to-all token dispatcher, as the CPU executor runs it):
// RMSNorm on this rank's rows, router GEMM and top-k, permute the (row, slot) copies by expert,
// exchange the per-expert counts over EP (one all-to-all), dispatch the rows (all-to-all-v), with
// ETP gather the group's count tables and rows, grouped SwiGLU GEMMs over my experts' columns,
// reduce-scatter over ETP, combine (all-to-all-v back), unpermute weighted by the routing
// weights, residual.
int Builder::moe_forward(int l, int mb, int x, MoeSaved& s, Category cat) {
  const bool again = cat == Category::recompute;
  auto nm = [&](const char* what) {
    return fmt::format("L{}.{}.mb{}{}", l, what, mb, again ? ".recompute" : "");
  };
  const char* pass = again ? "bwd" : "fwd";
  const workload::MoeSpec& e = m_.moe;
  const std::int64_t experts = e.num_routed_experts, k = e.experts_per_token;
  const std::int64_t ep = p_.moe.ep, etp = p_.moe.etp, per_rank = experts / ep;
  const std::int64_t f = e.expert_intermediate_size / etp, routed_rows = n_ * k;
  const int be = bucket_of_param(pname(l, "moe.experts.up"));
  const int br = bucket_of_param(pname(l, "mlp.norm"));
  const std::vector<int> w = use_bucket(be, pass, l, mb);
  const std::vector<int> wr = use_bucket(br, pass, l, mb);
  auto wt = [&](const char* role) { return value_of(pname(l, role), w, be); };
  auto wrt = [&](const char* role) { return value_of(pname(l, role), wr, br); };
  s.x = x;
  s.xn = tensor(nm("mlp_norm"), {n_, h_}, TensorRole::saved);
  s.rstd = tensor(nm("mlp_norm rstd"), {n_}, TensorRole::saved, Element::real, sim::Dtype::fp32);
  simple(nm("mlp_norm"), Kernel::rmsnorm_fwd, {x, value_of(pname(l, "mlp.norm"), wr, br)},
         {s.xn, s.rstd}, cat, l, mb, norm_attrs());
  const int logits = tensor(nm("router logits"), {n_, experts}, TensorRole::activation);
  matmul(nm("router"), {s.xn}, {value_of(pname(l, "moe.router"), wr, br)}, {logits}, false, false,
         false, cat, l, mb);
  s.probs =
      tensor(nm("router probs"), {n_, experts}, TensorRole::saved, Element::real, sim::Dtype::fp32);
  s.idx = tensor(nm("router idx"), {n_, k}, TensorRole::index, Element::i32);
  s.weights =
      tensor(nm("router weights"), {n_, k}, TensorRole::saved, Element::real, sim::Dtype::fp32);
  sim::Attrs route;
  route.top_k = static_cast<int>(k);
  route.normalize = true; // norm_topk_prob, as the executable model routes
  std::vector<int> router_in{logits};
  if (e.router_bias)
    router_in.push_back(wrt("moe.router.bias"));
  if (e.router_score_correction)
    router_in.push_back(wrt("moe.router.score_correction"));
  const int topk = simple(nm("router_topk"), Kernel::router_topk_fwd, router_in,
                          {s.probs, s.idx, s.weights}, cat, l, mb, route);
  if (!softmax_router())
    price_only(topk);
  const int xp = tensor(nm("permuted"), {routed_rows, h_}, TensorRole::activation);
  s.order = tensor(nm("permute order"), {routed_rows}, TensorRole::index, Element::i32);
  s.counts = tensor(nm("expert counts"), {experts}, TensorRole::index, Element::i64);
  const int perm =
      simple(nm("permute"), Kernel::permute, {s.xn, s.idx}, {xp, s.order, s.counts}, cat, l, mb);
  if (p_.moe.capacity_factor > 0) // token dropping: priced as dropless (balanced routing)
    price_only(perm);
  // One all-to-all of per-expert counts: row j says how many rows of each of my experts EP rank
  // j sends; rows arrive grouped by source rank, then expert, so it also names their experts.
  s.recv_counts = s.counts;
  s.recv = xp;
  const bool rebalance = llep();
  if (rebalance) {
    llep_dispatch(l, mb, xp, w, be, s, cat);
  } else if (g_ep_ >= 0) {
    s.recv_counts = tensor(nm("ep counts"), {ep, per_rank}, TensorRole::index, Element::i64);
    emit(OpSpec{nm("ep_counts"),
                Kernel::collective,
                OpKind::all_to_all,
                Category::ep_comm,
                kEp,
                g_ep_,
                {s.counts},
                {s.recv_counts},
                {},
                l,
                mb});
    s.recv =
        routed(nm("dispatched"), {routed_rows, h_}, TensorRole::activation, s.recv_counts, false);
    ep_alltoallv(nm("ep_dispatch"), xp, s.counts, s.recv_counts, s.recv, l, mb);
  }
  // ETP: the group's count tables (from which each rank sizes the others' rows and finds their
  // experts), then the rows, each member's padded to the group's largest count.
  s.table = s.recv_counts;
  s.rows_in = s.recv;
  if (g_xtp_ >= 0) {
    s.table = tensor(nm("etp counts"), {etp, ep, per_rank}, TensorRole::index, Element::i64);
    emit(OpSpec{nm("etp_counts"),
                Kernel::collective,
                OpKind::all_gather,
                Category::ep_comm,
                kEp,
                g_xtp_,
                {s.recv_counts},
                {s.table},
                {},
                l,
                mb});
    s.rows_in =
        routed(nm("etp gathered"), {etp * routed_rows, h_}, TensorRole::saved, s.table, true);
    OpSpec o{nm("etp_gather"),
             Kernel::collective,
             OpKind::all_gather,
             Category::ep_comm,
             kEp,
             g_xtp_,
             {s.recv, s.table},
             {s.rows_in},
             {},
             l,
             mb};
    o.attrs.count_inputs = 1;
    emit(std::move(o));
  }
  const std::int64_t up = e.gated ? 2 * f : f;
  s.gu = rows_like(s.rows_in, nm("experts gate_up"), up, TensorRole::saved);
  // With rebalancing the table's groups are my slots: my experts, then the received copies.
  const int own = rebalance ? static_cast<int>(per_rank) : 0;
  const int others = static_cast<int>(experts - per_rank);
  const std::size_t nf = s.foreign.size();
  grouped_matmul(nm("experts_gate_up"), {s.rows_in}, expert_up_weights(l, w, be), {s.gu}, s.table,
                 false, false, false, cat, l, mb, 0, own);
  if (rebalance)
    grouped_matmul(nm("experts_gate_up.foreign"), {s.rows_in},
                   std::vector<int>(s.foreign.begin(), s.foreign.end() - 1), {s.gu}, s.table,
                   false, false, true, cat, l, mb, own, others);
  s.act = rows_like(s.rows_in, nm("experts act"), f, TensorRole::saved);
  std::vector<int> act_in{s.gu};
  if (e.expert_bias) { // the projections' biases, added around the activation
    act_in.push_back(wt("moe.experts.up_bias"));
    act_in.push_back(wt("moe.experts.down_bias"));
  }
  const int act = simple(nm("experts_act"), Kernel::swiglu_fwd, act_in, {s.act}, cat, l, mb);
  if (!e.gated || e.expert_bias)
    price_only(act);
  const int out = rows_like(s.rows_in, nm("experts out"), h_, TensorRole::activation);
  grouped_matmul(nm("experts_down"), {s.act}, {value_of(pname(l, "moe.experts.down"), w, be)},
                 {out}, s.table, false, false, false, cat, l, mb, 0, own);
  if (rebalance)
    grouped_matmul(nm("experts_down.foreign"), {s.act}, {s.foreign[nf - 1]}, {out}, s.table, false,
                   false, true, cat, l, mb, own, others);
  int mine = out;
  if (g_xtp_ >= 0) {
    mine = rows_like(s.recv, nm("etp scattered"), h_, TensorRole::activation);
    emit(OpSpec{nm("etp_scatter"),
                Kernel::collective,
                OpKind::reduce_scatter,
                Category::ep_comm,
                kEp,
                g_xtp_,
                {out},
                {mine},
                {},
                l,
                mb});
  }
  s.ret = mine;
  if (rebalance) {
    s.ret = llep_return(nm("ep_combine"), nm("llep combined"), nm("llep_unsort"), mine, s,
                        tensor(nm("combined"), {routed_rows, h_}, TensorRole::saved), cat, l, mb);
  } else if (g_ep_ >= 0) {
    s.ret = tensor(nm("combined"), {routed_rows, h_}, TensorRole::saved);
    ep_alltoallv(nm("ep_combine"), mine, s.recv_counts, s.counts, s.ret, l, mb);
  }
  int y = tensor(nm("moe out"), {n_, h_}, TensorRole::activation);
  simple(nm("unpermute"), Kernel::unpermute, {s.ret, s.order, s.weights}, {y}, cat, l, mb);
  if (e.num_shared_experts > 0) {
    const int ys = shared_forward(l, mb, s, cat);
    const int sum = tensor(nm("moe and shared out"), {n_, h_}, TensorRole::activation);
    simple(nm("shared_add"), Kernel::add, {y, ys}, {sum}, cat, l, mb);
    y = sum;
  }
  const int o = tensor(nm("mlp residual"), {n_, h_}, TensorRole::activation);
  simple(nm("mlp_residual"), Kernel::add, {x, y}, {o}, cat, l, mb);
  return o;
}

// Least-loaded expert rebalancing (LLEP, workload/rebalance.hpp): the EP ranks all-gather their
// per-expert counts, each computes the same assignment (llep_plan), owners send a copy of each
// spilled expert's weights to the ranks that got a segment of its rows (group_copies, one
// all-to-all-v per weight), and the rows go out sorted by destination slot (index_rows, the
// all-to-all-v dispatch). s.recv_counts becomes the slot table of the received rows.
void Builder::llep_dispatch(int l, int mb, int xp, const std::vector<int>& w, int be, MoeSaved& s,
                            Category cat) {
  const bool again = cat == Category::recompute;
  auto nm = [&](const std::string& what) {
    return fmt::format("L{}.{}.mb{}{}", l, what, mb, again ? ".recompute" : "");
  };
  const workload::MoeSpec& e = m_.moe;
  const std::int64_t experts = e.num_routed_experts, ep = p_.moe.ep, per = experts / ep;
  const std::int64_t routed_rows = n_ * e.experts_per_token;
  const int all = tensor(nm("llep counts"), {ep, experts}, TensorRole::index, Element::i64);
  emit(OpSpec{nm("llep_counts"),
              Kernel::collective,
              OpKind::all_gather,
              Category::ep_comm,
              kEp,
              g_ep_,
              {s.counts},
              {all},
              {},
              l,
              mb});
  s.llep_order = tensor(nm("llep order"), {routed_rows}, TensorRole::index, Element::i32);
  s.send_slots = tensor(nm("llep send counts"), {ep, experts}, TensorRole::index, Element::i64);
  s.recv_counts = tensor(nm("llep recv counts"), {ep, experts}, TensorRole::index, Element::i64);
  s.send_copies = tensor(nm("llep send copies"), {ep, per}, TensorRole::index, Element::i64);
  s.recv_copies = tensor(nm("llep recv copies"), {ep, per}, TensorRole::index, Element::i64);
  OpSpec plan{nm("llep_plan"),
              Kernel::llep_plan,
              OpKind::elementwise,
              cat,
              kCompute,
              g_ep_,
              {all},
              {s.llep_order, s.send_slots, s.recv_counts, s.send_copies, s.recv_copies},
              {},
              l,
              mb};
  plan.attrs.threshold = p_.moe.rebalance_threshold;
  plan.attrs.capacity = p_.moe.rebalance_capacity;
  plan.attrs.min_tokens = p_.moe.rebalance_min_tokens;
  plan.attrs.ranks_per_node = s_.groups[static_cast<std::size_t>(g_ep_)].ranks_per_node;
  emit(std::move(plan));
  // The weights: my spilled experts' copies, by destination, then one all-to-all-v each.
  std::vector<int> mine = expert_up_weights(l, w, be);
  mine.push_back(value_of(pname(l, "moe.experts.down"), w, be));
  std::vector<int> copies;
  s.foreign.clear();
  for (std::size_t i = 0; i < mine.size(); ++i) {
    const Shape sh = shape(mine[i]);
    const std::string what = expert_weight_name(i, mine.size());
    copies.push_back(reserved(nm("llep copies " + what), sh, TensorRole::comm_buffer,
                              s.send_copies));
    s.foreign.push_back(reserved(nm("llep foreign " + what), sh, TensorRole::param, s.recv_copies));
  }
  OpSpec cp{nm("llep_weight_copies"), Kernel::group_copies, OpKind::elementwise, cat, kCompute,
            -1, mine, copies, {}, l, mb};
  cp.in.push_back(s.send_copies);
  cp.attrs.count_inputs = 1;
  emit(std::move(cp));
  for (std::size_t i = 0; i < copies.size(); ++i) {
    ep_alltoallv(nm(fmt::format("llep_weights{}", i)), copies[i], s.send_copies, s.recv_copies,
                 s.foreign[i], l, mb);
  }
  // The rows: sorted by destination slot, then dispatched.
  const int sorted = tensor(nm("llep sorted"), {routed_rows, h_}, TensorRole::activation);
  simple(nm("llep_sort"), Kernel::index_rows, {xp, s.llep_order}, {sorted}, cat, l, mb);
  s.recv =
      routed(nm("dispatched"), {routed_rows, h_}, TensorRole::activation, s.recv_counts, false);
  ep_alltoallv(nm("ep_dispatch"), sorted, s.send_slots, s.recv_counts, s.recv, l, mb);
}

// The received copies' weight gradients go back to their owners (the weight exchange reversed)
// and add into the owners' gradients of those experts, before the bucket is reduced.
void Builder::llep_return_grads(int l, int mb, const MoeSaved& s,
                                const std::vector<int>& foreign_grads,
                                const std::vector<int>& grads) {
  auto nm = [&](const std::string& what) { return fmt::format("L{}.{}.mb{}.bwd", l, what, mb); };
  std::vector<int> back;
  for (std::size_t i = 0; i < foreign_grads.size(); ++i) {
    const int t = foreign_grads[i];
    back.push_back(reserved(nm(std::string("llep returned grad ") +
                               expert_weight_name(i, foreign_grads.size())),
                            shape(t), TensorRole::comm_buffer, s.send_copies, sim::Dtype::fp32));
    ep_alltoallv(nm(fmt::format("llep_grads{}", i)), t, s.recv_copies, s.send_copies,
                 back.back(), l, mb);
  }
  OpSpec add{nm("llep_grad_add"), Kernel::group_copies_bwd, OpKind::elementwise,
             Category::backward, kCompute, -1, back, grads, {}, l, mb};
  add.in.push_back(s.send_copies);
  add.attrs.count_inputs = 1;
  add.attrs.accumulate = true;
  emit(std::move(add));
}

// The forward in reverse: the combine's adjoint (and the routing weights' gradient), the
// dispatch direction for the rows' gradients, the ETP gather, the grouped GEMMs' data and weight
// gradients, the ETP reduce-scatter, the combine direction, the permutation's adjoint, the
// router's backward and GEMMs, the norm.
int Builder::moe_backward(int l, int mb, const MoeSaved& s, int dy) {
  auto nm = [&](const std::string& what) { return fmt::format("L{}.{}.mb{}.bwd", l, what, mb); };
  const workload::MoeSpec& e = m_.moe;
  const std::int64_t experts = e.num_routed_experts, k = e.experts_per_token;
  const std::int64_t f = e.expert_intermediate_size / p_.moe.etp, routed_rows = n_ * k;
  const int be = bucket_of_param(pname(l, "moe.experts.up"));
  const int br = bucket_of_param(pname(l, "mlp.norm"));
  const std::vector<int> w = use_bucket(be, "bwd", l, mb);
  const std::vector<int> wr = use_bucket(br, "bwd", l, mb);
  auto grad = [&](const char* role) {
    return pt_[static_cast<std::size_t>(find_param(pname(l, role)))].grad;
  };
  const int dret = tensor(nm("d combined"), {routed_rows, h_}, TensorRole::activation);
  const int dweights = tensor(nm("d router weights"), {n_, k}, TensorRole::activation,
                              Element::real, sim::Dtype::fp32);
  simple(nm("unpermute"), Kernel::unpermute_bwd, {dy, s.ret, s.order, s.weights}, {dret, dweights},
         Category::backward, l, mb);
  int drecv = dret;
  const bool rebalance = s.llep_order >= 0;
  const std::int64_t per = experts / p_.moe.ep;
  const int own = rebalance ? static_cast<int>(per) : 0;
  const int others = static_cast<int>(experts - per);
  if (rebalance) {
    const int dsorted = tensor(nm("d llep sorted"), {routed_rows, h_}, TensorRole::activation);
    simple(nm("llep_sort"), Kernel::index_rows, {dret, s.llep_order}, {dsorted},
           Category::backward, l, mb);
    drecv = rows_like(s.recv, nm("d dispatched"), h_, TensorRole::activation);
    ep_alltoallv(nm("ep_combine"), dsorted, s.send_slots, s.recv_counts, drecv, l, mb);
  } else if (g_ep_ >= 0) {
    drecv = rows_like(s.recv, nm("d dispatched"), h_, TensorRole::activation);
    ep_alltoallv(nm("ep_combine"), dret, s.counts, s.recv_counts, drecv, l, mb);
  }
  int dout = drecv;
  if (g_xtp_ >= 0) {
    dout = rows_like(s.rows_in, nm("d etp gathered"), h_, TensorRole::activation);
    OpSpec o{nm("etp_scatter"),
             Kernel::collective,
             OpKind::all_gather,
             Category::ep_comm,
             kEp,
             g_xtp_,
             {drecv, s.table},
             {dout},
             {},
             l,
             mb};
    o.attrs.count_inputs = 1;
    emit(std::move(o));
  }
  const int dact = rows_like(s.rows_in, nm("d experts act"), f, TensorRole::activation);
  // With rebalancing: the received copies' slots too, their weight gradients into buffers of
  // their own, which go back to the owners.
  const std::size_t nf = s.foreign.size();
  std::vector<int> fgrads;
  for (int t : s.foreign)
    fgrads.push_back(reserved(nm(fmt::format("llep foreign grad {}",
                                             expert_weight_name(fgrads.size(), nf))),
                              shape(t), TensorRole::grad, s.recv_copies, sim::Dtype::fp32));
  grouped_matmul(nm("experts_down.dgrad"), {dout}, {value_of(pname(l, "moe.experts.down"), w, be)},
                 {dact}, s.table, false, true, false, Category::backward, l, mb, 0, own);
  if (rebalance)
    grouped_matmul(nm("experts_down.dgrad.foreign"), {dout}, {s.foreign[nf - 1]}, {dact}, s.table,
                   false, true, true, Category::backward, l, mb, own, others);
  grouped_matmul(nm("experts_down.wgrad"), {s.act}, {dout}, {grad("moe.experts.down")}, s.table,
                 true, false, true, Category::backward, l, mb, 0, own);
  if (rebalance)
    grouped_matmul(nm("experts_down.wgrad.foreign"), {s.act}, {dout}, {fgrads[nf - 1]}, s.table,
                   true, false, false, Category::backward, l, mb, own, others);
  const int dgu =
      rows_like(s.rows_in, nm("d experts gate_up"), e.gated ? 2 * f : f, TensorRole::activation);
  const int act =
      simple(nm("experts_act"), Kernel::swiglu_bwd, {s.gu, dact}, {dgu}, Category::backward, l, mb);
  if (!e.gated || e.expert_bias)
    price_only(act);
  const int dxr = rows_like(s.rows_in, nm("d experts input"), h_, TensorRole::activation);
  grouped_matmul(nm("experts_gate_up.dgrad"), {dgu}, expert_up_weights(l, w, be), {dxr}, s.table,
                 false, true, false, Category::backward, l, mb, 0, own);
  if (rebalance)
    grouped_matmul(nm("experts_gate_up.dgrad.foreign"), {dgu},
                   std::vector<int>(s.foreign.begin(), s.foreign.end() - 1), {dxr}, s.table, false,
                   true, true, Category::backward, l, mb, own, others);
  std::vector<int> up_grads;
  if (e.gated)
    up_grads.push_back(grad("moe.experts.gate"));
  up_grads.push_back(grad("moe.experts.up"));
  grouped_matmul(nm("experts_gate_up.wgrad"), {s.rows_in}, {dgu}, up_grads, s.table, true, false,
                 true, Category::backward, l, mb, 0, own);
  if (rebalance) {
    grouped_matmul(nm("experts_gate_up.wgrad.foreign"), {s.rows_in}, {dgu},
                   std::vector<int>(fgrads.begin(), fgrads.end() - 1), s.table, true, false, false,
                   Category::backward, l, mb, own, others);
    std::vector<int> grads = up_grads;
    grads.push_back(grad("moe.experts.down"));
    llep_return_grads(l, mb, s, fgrads, grads);
  }
  int dmine = dxr;
  if (g_xtp_ >= 0) {
    dmine = rows_like(s.recv, nm("d etp scattered"), h_, TensorRole::activation);
    emit(OpSpec{nm("etp_gather"),
                Kernel::collective,
                OpKind::reduce_scatter,
                Category::ep_comm,
                kEp,
                g_xtp_,
                {dxr},
                {dmine},
                {},
                l,
                mb});
  }
  int dsent = dmine;
  if (rebalance) {
    dsent = llep_return(nm("ep_dispatch"), nm("d llep sorted back"), nm("llep_unsort"), dmine, s,
                        tensor(nm("d permuted"), {routed_rows, h_}, TensorRole::activation),
                        Category::backward, l, mb);
  } else if (g_ep_ >= 0) {
    dsent = tensor(nm("d permuted"), {routed_rows, h_}, TensorRole::activation);
    ep_alltoallv(nm("ep_dispatch"), dmine, s.recv_counts, s.counts, dsent, l, mb);
  }
  const int dxn = tensor(nm("d mlp norm out"), {n_, h_}, TensorRole::activation);
  simple(nm("permute"), Kernel::permute_bwd, {dsent, s.order}, {dxn}, Category::backward, l, mb);
  const int dlogits = tensor(nm("d router logits"), {n_, experts}, TensorRole::activation);
  sim::Attrs route;
  route.top_k = static_cast<int>(k);
  route.normalize = true;
  const int topk = simple(nm("router_topk"), Kernel::router_topk_bwd, {s.probs, s.idx, dweights},
                          {dlogits}, Category::backward, l, mb, route);
  if (!softmax_router())
    price_only(topk);
  matmul(nm("router.dgrad"), {dlogits}, {value_of(pname(l, "moe.router"), wr, br)}, {dxn}, false,
         true, true, Category::backward, l, mb);
  matmul(nm("router.wgrad"), {s.xn}, {dlogits}, {grad("moe.router")}, true, false, true,
         Category::backward, l, mb);
  int dxn_all = dxn;
  if (e.num_shared_experts > 0) {
    const int dxs = shared_backward(l, mb, s, dy);
    dxn_all = tensor(nm("d mlp norm out (with shared)"), {n_, h_}, TensorRole::activation);
    simple(nm("shared_add"), Kernel::add, {dxn, dxs}, {dxn_all}, Category::backward, l, mb);
  }
  const int dxa = norm_backward(nm("mlp_norm"), nm("d mlp norm input"), s.x,
                                value_of(pname(l, "mlp.norm"), wr, br), s.rstd, dxn_all,
                                grad("mlp.norm"), l, mb);
  const int dx = tensor(nm("d mlp block input"), {n_, h_}, TensorRole::activation);
  simple(nm("mlp_residual"), Kernel::add, {dxa, dy}, {dx}, Category::backward, l, mb);
  return dx;
}

void Builder::ep_alltoallv(const std::string& name, int x, int send, int recv, int y, int l,
                           int mb) {
  OpSpec o{name, Kernel::collective, OpKind::all_to_all, Category::ep_comm, kEp, g_ep_,
           {x, send, recv}, {y}, {}, l, mb};
  o.attrs.count_inputs = 2;
  emit(std::move(o));
}

int Builder::llep_return(const std::string& exchange, const std::string& back_name,
                         const std::string& unsort, int x, const MoeSaved& s, int out,
                         Category cat, int l, int mb) {
  const std::int64_t rows = m_.moe.experts_per_token * n_;
  const int back = tensor(back_name, {rows, h_}, TensorRole::activation);
  ep_alltoallv(exchange, x, s.recv_counts, s.send_slots, back, l, mb);
  sim::Attrs inv;
  inv.inverse = true;
  simple(unsort, Kernel::index_rows, {back, s.llep_order}, {out}, cat, l, mb, inv);
  return out;
}

// The experts' first projection's weights: gate and up (SwiGLU), or up alone.
std::vector<int> Builder::expert_up_weights(int l, const std::vector<int>& w, int be) const {
  std::vector<int> out;
  if (m_.moe.gated)
    out.push_back(value_of(pname(l, "moe.experts.gate"), w, be));
  out.push_back(value_of(pname(l, "moe.experts.up"), w, be));
  return out;
}

// The shared experts on the block's normed rows: SP all-gather over the dense TP group,
// column-parallel gate|up, the activation, row-parallel down, reduce-scatter (Megatron-Core's
// SharedExpertMLP, as the cost-only lowering prices it: after the routed experts' combine).
int Builder::shared_forward(int l, int mb, MoeSaved& s, Category cat) {
  const bool again = cat == Category::recompute;
  auto nm = [&](const char* what) {
    return fmt::format("L{}.{}.mb{}{}", l, what, mb, again ? ".recompute" : "");
  };
  const workload::MoeSpec& e = m_.moe;
  const std::int64_t fs = e.num_shared_experts * e.shared_intermediate_size / p_.dense.tp;
  const int b = bucket_of_param(pname(l, "moe.shared.up"));
  const std::vector<int> w = use_bucket(b, again ? "bwd" : "fwd", l, mb);
  s.sh_xg =
      sp_gather(nm("shared_sp_gather"), g_dtp_, s.xn, {rows_d_, h_}, TensorRole::saved, l, mb);
  std::vector<int> wu;
  if (e.gated)
    wu.push_back(value_of(pname(l, "moe.shared.gate"), w, b));
  wu.push_back(value_of(pname(l, "moe.shared.up"), w, b));
  s.sh_gu = tensor(nm("shared gate_up"), {rows_d_, (e.gated ? 2 : 1) * fs}, TensorRole::saved);
  matmul(nm("shared_gate_up"), {s.sh_xg}, wu, {s.sh_gu}, false, false, false, cat, l, mb);
  s.sh_act = tensor(nm("shared act"), {rows_d_, fs}, TensorRole::saved);
  const int act = simple(nm("shared_act"), Kernel::swiglu_fwd, {s.sh_gu}, {s.sh_act}, cat, l, mb);
  if (!e.gated)
    price_only(act);
  const int out = tensor(nm("shared out"), {rows_d_, h_}, TensorRole::activation);
  matmul(nm("shared_down"), {s.sh_act}, {value_of(pname(l, "moe.shared.down"), w, b)}, {out}, false,
         false, false, cat, l, mb);
  return sp_scatter(nm("shared_sp_scatter"), g_dtp_, out, {n_, h_}, l, mb);
}

// Its backward: the gradient of the normed rows through the shared experts.
int Builder::shared_backward(int l, int mb, const MoeSaved& s, int dy) {
  auto nm = [&](const char* what) { return fmt::format("L{}.{}.mb{}.bwd", l, what, mb); };
  const workload::MoeSpec& e = m_.moe;
  const std::int64_t fs = e.num_shared_experts * e.shared_intermediate_size / p_.dense.tp;
  const int b = bucket_of_param(pname(l, "moe.shared.up"));
  const std::vector<int> w = use_bucket(b, "bwd", l, mb);
  auto grad = [&](const char* role) {
    return pt_[static_cast<std::size_t>(find_param(pname(l, role)))].grad;
  };
  const int dyg =
      sp_gather(nm("shared_sp_gather"), g_dtp_, dy, {rows_d_, h_}, TensorRole::activation, l, mb);
  const int dact = tensor(nm("d shared act"), {rows_d_, fs}, TensorRole::activation);
  matmul(nm("shared_down.dgrad"), {dyg}, {value_of(pname(l, "moe.shared.down"), w, b)}, {dact},
         false, true, false, Category::backward, l, mb);
  wgrad(nm("shared_down.wgrad"), {s.sh_act}, {dyg}, {grad("moe.shared.down")}, true, l, mb);
  const int dgu =
      tensor(nm("d shared gate_up"), {rows_d_, (e.gated ? 2 : 1) * fs}, TensorRole::activation);
  const int act = simple(nm("shared_act"), Kernel::swiglu_bwd, {s.sh_gu, dact}, {dgu},
                         Category::backward, l, mb);
  if (!e.gated)
    price_only(act);
  std::vector<int> wu, gu;
  if (e.gated) {
    wu.push_back(value_of(pname(l, "moe.shared.gate"), w, b));
    gu.push_back(grad("moe.shared.gate"));
  }
  wu.push_back(value_of(pname(l, "moe.shared.up"), w, b));
  gu.push_back(grad("moe.shared.up"));
  const int dxg = tensor(nm("d shared input"), {rows_d_, h_}, TensorRole::activation);
  matmul(nm("shared_gate_up.dgrad"), {dgu}, wu, {dxg}, false, true, false, Category::backward, l,
         mb);
  wgrad(nm("shared_gate_up.wgrad"), {s.sh_xg}, {dgu}, gu, true, l, mb);
  return sp_scatter(nm("shared_sp_scatter"), g_dtp_, dxg, {n_, h_}, l, mb);
}

// --- gradients and the optimizer -----------------------------------------------------------------

// Per bucket, after the last micro-batch's backward (Megatron's finalize_model_grads): the
// replicated parameters' gradients summed over the kind's TP group, then the sum over the
// ranks holding the same slices: an all-reduce under ZeRO-0, a reduce-scatter to the owned
// shard under ZeRO 1-2 (Megatron's distributed optimizer, DeepSpeed ZeRO-2) and with HSDP an
// all-reduce of the shards across replicas; then AdamW over what the rank owns and, under
// ZeRO 1-2, an all-gather of the updated parameters. A ZeRO-3 layer (FSDP2) reduce-scatters
// each micro-batch's gradients after its backward instead (scatter_layer_grads), summing them
// into the owned shard; the embedding and head once per step. With gradients on the host for
// the host optimizer every bucket reduces each micro-batch's gradients and sums them on the
// host (GradFlow::host).
// A collective of the optimizer's part over group g (no op for a group of one rank).
void Builder::dp_comm(std::string name, OpKind kind, int g, std::vector<int> in,
                      std::vector<int> out, int layer, bool deferred) {
  if (g < 0)
    return;
  OpSpec o{std::move(name),
           Kernel::collective,
           kind,
           Category::dp_comm,
           kDp,
           g,
           std::move(in),
           std::move(out),
           {},
           layer,
           -1};
  o.attrs.deferred = deferred;
  emit(std::move(o));
}

std::vector<int> Builder::owned_grads(int b) const {
  const auto bi = static_cast<std::size_t>(b);
  const sim::Bucket& bk = s_.buckets[bi];
  if (bt_[bi].host_grad >= 0)
    return {bt_[bi].host_grad};
  if (bk.zero >= 1)
    return {bt_[bi].grad_shard};
  std::vector<int> grads;
  for (int p : bk.params)
    grads.push_back(pt_[static_cast<std::size_t>(p)].grad);
  return grads;
}

// The replicated members' gradients of bucket b summed over their TP group, in one all-reduce
// (Megatron's _allreduce_layernorm_grads).
void Builder::sum_partial_grads(int b, const std::vector<int>& grads, int layer, int mb) {
  const sim::Bucket& bk = s_.buckets[static_cast<std::size_t>(b)];
  std::vector<int> partial;
  const sim::GroupSpec* spec = nullptr;
  for (std::size_t i = 0; i < bk.params.size(); ++i) {
    const sim::ParamSpec& ps = s_.params[static_cast<std::size_t>(bk.params[i])];
    if (ps.partial_grads.dims.empty())
      continue;
    spec = &ps.partial_grads;
    partial.push_back(grads[i]);
  }
  if (spec == nullptr)
    return;
  OpSpec o{fmt::format("{}.grad_tp_sum{}", bk.name, mb >= 0 ? fmt::format(".mb{}", mb) : ""),
           Kernel::collective,
           OpKind::all_reduce,
           Category::tp_comm,
           kTp,
           group(group_name(*spec), *spec),
           partial,
           partial,
           {},
           layer,
           mb};
  if (defer_wgrad_)
    held_wgrad_.push_back(std::move(o));
  else
    emit(std::move(o));
}

std::vector<int> Builder::reduce_bucket(int b) {
  const auto bi = static_cast<std::size_t>(b);
  const sim::Bucket& bk = s_.buckets[bi];
  const BucketTensors& bt = bt_[bi];
  const int layer = bucket_keys_[bi].layer;
  const GradFlow flow = grad_flow(b);
  if (flow == GradFlow::host) // reduced and downloaded micro-batch by micro-batch already
    return {bt.host_grad};
  std::vector<int> owned;
  if (flow == GradFlow::shard) {
    owned = {bt.grad_shard}; // reduce-scattered micro-batch by micro-batch already
  } else {
    std::vector<int> grads;
    for (int p : bk.params)
      grads.push_back(pt_[static_cast<std::size_t>(p)].grad);
    sum_partial_grads(b, grads, layer, -1);
    owned = reduce_over_data_parallel(b, grads, bt.grad_shard, layer, -1);
  }
  // The micro-batches' reduce-scatters summed the shard over its group; the replicas sum once.
  if (flow == GradFlow::shard && !bk.replicas.dims.empty())
    dp_comm(bk.name + ".grad_replica_all_reduce", OpKind::all_reduce,
            group(group_name(bk.replicas), bk.replicas), owned, owned, layer, false);
  // Tied embeddings under a pipeline: the first and the last stage's copies sum their gradients
  // (unsharded: the copy's own, not the final norm's beside it).
  if (!bk.tied.dims.empty()) {
    std::vector<int> tied = owned;
    if (bk.zero == 0) {
      tied.clear();
      for (int p : bk.params)
        if (p == emb_param_ || p == head_param_)
          tied.push_back(pt_[static_cast<std::size_t>(p)].grad);
    }
    dp_comm(bk.name + ".tied_grad_all_reduce", OpKind::all_reduce, g_tied_, tied, tied, layer,
            false);
  }
  return owned;
}

std::vector<int> Builder::reduce_over_data_parallel(int b, const std::vector<int>& grads, int shard,
                                                    int layer, int mb) {
  const sim::Bucket& bk = s_.buckets[static_cast<std::size_t>(b)];
  const std::string suffix = mb >= 0 ? fmt::format(".mb{}", mb) : std::string();
  auto reduction = [&](const char* name, OpKind kind, const sim::GroupSpec& spec,
                       std::vector<int> in, std::vector<int> out) {
    OpSpec o{bk.name + name + suffix,
             Kernel::collective,
             kind,
             Category::dp_comm,
             kDp,
             group(group_name(spec), spec),
             std::move(in),
             std::move(out),
             {},
             layer,
             mb};
    if (o.group < 0) // a group of one rank has nothing to reduce
      return;
    if (mb >= 0 && defer_wgrad_)
      held_wgrad_.push_back(std::move(o));
    else
      emit(std::move(o));
  };
  if (bk.zero == 0) {
    reduction(".grad_all_reduce", OpKind::all_reduce, bk.grads, grads, grads);
    return grads;
  }
  reduction(".grad_reduce_scatter", OpKind::reduce_scatter, bk.shard, grads, {shard});
  if (!bk.replicas.dims.empty())
    reduction(".grad_replica_all_reduce", OpKind::all_reduce, bk.replicas, {shard}, {shard});
  return {shard};
}

// Micro-batch mb's gradients of bucket b: fresh tensors the backward accumulates into, zeroed
// before its first write (FSDP2's unsharded gradients live from the layer's backward to their
// reduce-scatter; DeepSpeed's gradient buckets from the backward to their copy to the host).
const std::vector<int>& Builder::begin_bucket_grads(int b, int layer, int mb) {
  const auto key = std::make_pair(b, mb);
  if (const auto it = mb_grads_.find(key); it != mb_grads_.end())
    return it->second;
  std::vector<int> grads;
  for (int p : s_.buckets[static_cast<std::size_t>(b)].params) {
    const auto pi = static_cast<std::size_t>(p);
    pt_[pi].grad = tensor(fmt::format("{}.grad (mb{})", s_.params[pi].name, mb), local_shape(p),
                          TensorRole::grad, Element::real, sim::Dtype::fp32);
    rc_->tensors.back().param = p;
    grads.push_back(pt_[pi].grad);
  }
  emit(OpSpec{fmt::format("{}.zero_grads.mb{}", s_.buckets[static_cast<std::size_t>(b)].name, mb),
              Kernel::zero,
              OpKind::elementwise,
              Category::backward,
              kCompute,
              -1,
              {},
              grads,
              {},
              layer,
              mb});
  return mb_grads_[key] = std::move(grads);
}

// Micro-batch mb's gradients of bucket b, once written: the replicated members' summed over
// their TP group first; then (GradFlow::shard) reduce-scattered and summed into the resident
// gradient shard, or (GradFlow::host) reduced and copied to the host gradients, the step's first
// copy overwriting them and the others adding to them. Under zero-bubble they wait, with the
// weight-gradient GEMMs held back, for the pipeline order's next flush.
void Builder::finish_bucket_grads(int b, int layer, int mb) {
  const GradFlow flow = grad_flow(b);
  if (flow == GradFlow::step)
    return;
  const auto it = mb_grads_.find({b, mb});
  if (it == mb_grads_.end())
    throw std::logic_error(fmt::format("bucket {} finishes micro-batch {}'s gradients that no "
                                       "op wrote",
                                       s_.buckets[static_cast<std::size_t>(b)].name, mb));
  const std::vector<int> grads = it->second;
  mb_grads_.erase(it);
  const auto bi = static_cast<std::size_t>(b);
  const sim::Bucket& bk = s_.buckets[bi];
  auto place = [&](OpSpec o) {
    if (defer_wgrad_)
      held_wgrad_.push_back(std::move(o));
    else
      emit(std::move(o));
  };
  sum_partial_grads(b, grads, layer, mb);
  if (flow == GradFlow::shard) { // summed into the resident shard (FSDP2's micro-batches)
    OpSpec o{fmt::format("{}.grad_reduce_scatter.mb{}", bk.name, mb),
             Kernel::collective,
             OpKind::reduce_scatter,
             Category::dp_comm,
             kDp,
             group(group_name(bk.shard), bk.shard),
             grads,
             {bt_[bi].grad_shard},
             {},
             layer,
             mb};
    o.attrs.accumulate = true;
    if (o.group >= 0) // a group of one rank has nothing to reduce
      place(std::move(o));
    return;
  }
  const int shard = bk.zero == 0
                        ? -1
                        : tensor(fmt::format("{}.grad_shard (mb{})", bk.name, mb), {chunk(b)},
                                 TensorRole::grad, Element::real, sim::Dtype::fp32);
  std::vector<int> reduced = reduce_over_data_parallel(b, grads, shard, layer, mb);
  OpSpec d{fmt::format("{}.grad_download.mb{}", bk.name, mb),
           Kernel::copy,
           OpKind::copy_d2h,
           Category::offload,
           kD2h,
           -1,
           std::move(reduced),
           {bt_[bi].host_grad},
           {},
           layer,
           mb};
  d.attrs.accumulate = downloaded_[bi];
  downloaded_[bi] = true;
  place(std::move(d));
}

int Builder::grad_of(int p, int mb) {
  const int b = s_.params[static_cast<std::size_t>(p)].bucket;
  if (grad_flow(b) == GradFlow::step)
    return pt_[static_cast<std::size_t>(p)].grad;
  const std::vector<int>& grads =
      begin_bucket_grads(b, bucket_keys_[static_cast<std::size_t>(b)].layer, mb);
  const std::vector<int>& members = s_.buckets[static_cast<std::size_t>(b)].params;
  return grads[static_cast<std::size_t>(std::find(members.begin(), members.end(), p) -
                                        members.begin())];
}

// Layer l's buckets' gradients of micro-batch mb, before its backward (a per-micro-batch
// GradFlow).
void Builder::begin_layer_grads(int l, int mb) {
  for (int b : layer_buckets(l))
    if (grad_flow(b) != GradFlow::step)
      begin_bucket_grads(b, l, mb);
}

// After layer l's backward of micro-batch mb (after its held-back weight gradients under
// zero-bubble).
void Builder::scatter_layer_grads(int l, int mb) {
  for (int b : layer_buckets(l))
    finish_bucket_grads(b, l, mb);
}

// AdamW over what the rank owns of bucket b from its reduced gradients `owned_grads`: on the
// GPU, or on the host (gradients downloaded, the FP32 master weights updated there and uploaded
// as the new parameters); under ZeRO 1-2 the updated shards are then all-gathered. `deferred`:
// the update of the previous step's gradients, streamed into this step's forward.
void Builder::step_bucket(int b, const std::vector<int>& owned_grads, bool deferred) {
  const auto bi = static_cast<std::size_t>(b);
  const sim::Bucket& bk = s_.buckets[bi];
  const BucketTensors& bt = bt_[bi];
  std::vector<int> values;
  for (int p : bk.params)
    values.push_back(pt_[static_cast<std::size_t>(p)].value);
  const int layer = bucket_keys_[bi].layer;
  const bool host = p_.optimizer_on_host;
  auto op = [&](std::string name, Kernel k, OpKind kind, Category cat, int stream,
                std::vector<int> in, std::vector<int> out, int params = 1) {
    OpSpec o{std::move(name), k,  kind,  cat, stream, -1, std::move(in),
             std::move(out),  {}, layer, -1};
    o.attrs.params = params;
    o.attrs.deferred = deferred;
    return emit(std::move(o));
  };
  // Where the update lands: the ZeRO-3 shard, the unsharded slices, or a fresh updated shard
  // that an all-gather spreads (ZeRO 1-2).
  std::vector<int> target = bk.zero >= 3 ? std::vector<int>{bt.shard} : values;
  int updated = -1;
  if (bk.zero == 1 || bk.zero == 2) {
    updated = tensor(bk.name + ".updated_shard", {chunk(b)}, TensorRole::comm_buffer);
    rc_->tensors.back().bucket = b;
    target = {updated};
  }
  if (!host) {
    std::vector<int> in = bk.zero >= 3 ? std::vector<int>{bt.shard} : values;
    const int np = static_cast<int>(in.size());
    in.insert(in.end(), owned_grads.begin(), owned_grads.end());
    in.push_back(bt.m);
    in.push_back(bt.v);
    std::vector<int> out = target;
    out.push_back(bt.m);
    out.push_back(bt.v);
    op(bk.name + ".adamw", Kernel::adamw, OpKind::elementwise, Category::optimizer, kCompute,
       std::move(in), std::move(out), np);
  } else {
    // The host gradients the micro-batches' downloads summed (GradFlow::host), or the reduced
    // gradients downloaded now.
    int gh = bt.host_grad;
    if (gh < 0) {
      std::int64_t n = 0;
      for (int t : owned_grads)
        n += numel(shape(t));
      gh = tensor(bk.name + ".grads (host)", {n}, TensorRole::host_copy, Element::real,
                  sim::Dtype::fp32);
      rc_->tensors.back().device = sim::Device::host;
      op(bk.name + ".grad_download", Kernel::copy, OpKind::copy_d2h, Category::offload, kD2h,
         owned_grads, {gh});
    }
    // With the parameters on the host (ZeRO-3 shards), the step updates them in place;
    // otherwise it updates the host's FP32 master weights, uploaded as the new parameters.
    const bool params_on_host = p_.params == strategy::Placement::host && bk.zero >= 3;
    const int master = params_on_host ? bt.shard : bt.master;
    const int a = op(bk.name + ".host_adamw", Kernel::adamw, OpKind::host_adam, Category::optimizer,
                     kHost, {master, gh, bt.m, bt.v}, {master, bt.m, bt.v});
    rc_->ops[static_cast<std::size_t>(a)].params = static_cast<double>(numel(shape(bt.m)));
    rc_->ops[static_cast<std::size_t>(a)].torch_kernel = p_.torch_host_optimizer;
    if (!params_on_host)
      op(bk.name + ".param_upload", Kernel::copy, OpKind::copy_h2d, Category::optimizer, kH2d,
         {master}, target);
  }
  if (updated >= 0) {
    dp_comm(bk.name + ".param_all_gather", OpKind::all_gather,
            group(group_name(bk.shard), bk.shard), {updated}, values, layer, deferred);
  }
}

// Gradients kept in host memory for an optimizer on the GPU (the cost-only lowering's
// placement): the reduced gradients the rank owns are downloaded to their resident host copy
// once reduced; the step then reads them on the GPU. No executor keeps such a copy.
void Builder::download_grads(int b, const std::vector<int>& owned_grads) {
  const sim::Bucket& bk = s_.buckets[static_cast<std::size_t>(b)];
  std::int64_t n = 0;
  for (int t : owned_grads)
    n += numel(shape(t));
  const int gh = tensor(bk.name + ".grads (host)", {n}, TensorRole::host_copy, Element::real,
                        sim::Dtype::fp32);
  rc_->tensors.back().device = sim::Device::host;
  rc_->tensors.back().kind = sim::MemoryKind::grads;
  rc_->tensors.back().resident = true;
  rc_->tensors.back().bucket = b;
  price_only(emit(OpSpec{bk.name + ".grad_download",
                         Kernel::copy,
                         OpKind::copy_d2h,
                         Category::offload,
                         kD2h,
                         -1,
                         owned_grads,
                         {gh},
                         {},
                         bucket_keys_[static_cast<std::size_t>(b)].layer,
                         -1}));
}

// Gradients are zeroed by the program: at the start of the step, or for a bucket whose update is
// streamed into the next forward, right after that update has read them. Host gradients need
// none: the step's first download overwrites them.
void Builder::zero_grads(int b, bool deferred) {
  const sim::Bucket& bk = s_.buckets[static_cast<std::size_t>(b)];
  const GradFlow flow = grad_flow(b);
  if (flow == GradFlow::host)
    return;
  std::vector<int> grads;
  if (flow == GradFlow::shard) // the shard the micro-batches' reduce-scatters sum into
    grads.push_back(bt_[static_cast<std::size_t>(b)].grad_shard);
  else
    for (int p : bk.params)
      grads.push_back(pt_[static_cast<std::size_t>(p)].grad);
  OpSpec o{bk.name + ".zero_grads",
           Kernel::zero,
           OpKind::elementwise,
           Category::optimizer,
           kCompute,
           -1,
           {},
           grads,
           {},
           bucket_keys_[static_cast<std::size_t>(b)].layer,
           -1};
  o.attrs.deferred = deferred;
  emit(std::move(o));
}

bool Builder::streams_forward(int b) const {
  return p_.optimizer_on_host && p_.overlap == strategy::OptimizerOverlap::stream_forward &&
         bucket_keys_[static_cast<std::size_t>(b)].layer >= 0;
}

// --- the pipeline --------------------------------------------------------------------------------

// Pipeline neighbours, as the CPU executor pairs them: forward activations go to the next virtual
// stage (the next stage, or from the last stage to the first for the next chunk), gradients
// come back the same way.
int Builder::neighbour(int chunk, bool fwd, bool sending, int* peer_chunk) const {
  const strategy::VirtualStage peer =
      strategy::virtual_neighbour(p_, stage_, chunk, fwd == sending ? +1 : -1);
  *peer_chunk = peer.chunk;
  return peer.stage;
}

// The residual stream of one micro-batch ([rows, hidden], this rank's SP share) to the same
// place in the neighbouring stage.
void Builder::send_activation(int mb, int chunk, int x, bool fwd) {
  int pc = 0;
  const int to = neighbour(chunk, fwd, true, &pc);
  const int op =
      emit(OpSpec{fmt::format("pp.send_{}.chunk{}.mb{}", fwd ? "act" : "grad", chunk, mb),
                  Kernel::collective,
                  OpKind::send,
                  Category::pp_comm,
                  kPp,
                  g_pp_,
                  {x},
                  {},
                  {},
                  -1,
                  mb});
  rc_->ops[static_cast<std::size_t>(op)].peer_class = to;
  sends_[PipeKey{stage_, fwd ? 1 : 0, chunk, mb}] = op;
}

int Builder::recv_activation(int mb, int chunk, bool fwd) {
  int pc = 0;
  const int from = neighbour(chunk, fwd, false, &pc);
  const std::string name = fmt::format("pp.recv_{}.chunk{}.mb{}", fwd ? "act" : "grad", chunk, mb);
  const int x = tensor(name, {n_, h_}, TensorRole::activation);
  const int op = emit(OpSpec{
      name, Kernel::collective, OpKind::recv, Category::pp_comm, kPp, g_pp_, {}, {x}, {}, -1, mb});
  rc_->ops[static_cast<std::size_t>(op)].peer_class = from;
  recvs_.push_back(PendingRecv{stage_, op, PipeKey{from, fwd ? 1 : 0, pc, mb}});
  return x;
}

// Each recv depends on the send it receives (the old lowering's pairing, strategies/lower.cpp).
void Builder::pair_pipeline() {
  for (const PendingRecv& r : recvs_) {
    const auto it = sends_.find(r.send);
    if (it == sends_.end())
      throw std::logic_error(fmt::format("stage {} receives micro-batch {} chunk {} that stage {} "
                                         "never sends",
                                         r.stage, r.send.mb, r.send.chunk, r.send.stage));
    s_.classes[static_cast<std::size_t>(r.stage)]
        .ops[static_cast<std::size_t>(r.op)]
        .remote_deps.push_back(sim::RemoteDep{r.send.stage, it->second});
  }
}

// One stage's program: its state, every (micro-batch, chunk) pass in the pipeline order
// (strategy::pipeline_order, with zero-bubble's held-back weight gradients flushed where it
// says), then its buckets' reductions and optimizer steps.
void Builder::build_stage(int stage) {
  stage_ = stage;
  rc_ = &s_.classes[static_cast<std::size_t>(stage)];
  rc_->stage = stage;
  rc_->name = fmt::format("stage {} of {}", stage, p_.pp);
  rc_->multiplicity = p_.ranks_per_stage();
  rc_->streams.assign(kStreamNames, kStreamNames + kNumStreams);
  // The stages' programs are about the same size: size this one as the previous one, so that
  // building it does not copy growing lists.
  if (stage > 0) {
    const sim::RankClass& before = s_.classes[static_cast<std::size_t>(stage) - 1];
    rc_->ops.reserve(before.ops.size() * 9 / 8);
    rc_->tensors.reserve(before.tensors.size() * 9 / 8);
    rc_->attrs.reserve(before.attrs.size() * 9 / 8);
  }
  make_state();
  const int micro = p_.micro_batches();
  const int layers = static_cast<int>(m_.num_layers());
  layer_bwd_end_.clear();
  saved_.assign(static_cast<std::size_t>(layers),
                std::vector<LayerSaved>(static_cast<std::size_t>(micro)));
  head_.assign(static_cast<std::size_t>(micro), {});
  ids_.assign(static_cast<std::size_t>(micro), -1);
  labels_.assign(static_cast<std::size_t>(micro), -1);
  const bool first = stage == 0, last = stage == p_.pp - 1;
  std::vector<int> here; // the stage's buckets
  for (int b = 0; b < static_cast<int>(s_.buckets.size()); ++b)
    if (on_stage(b))
      here.push_back(b);
  for (int b : here)
    if (!streams_forward(b))
      zero_grads(b, false);
  std::vector<bool> reduced(s_.buckets.size(), false), stepped(s_.buckets.size(), false);
  const int stage_layers = [&] {
    int n = 0;
    for (int ch = 0; ch < chunks_; ++ch) {
      const auto v = static_cast<std::size_t>(ch * p_.pp + stage);
      n += bounds_[v + 1] - bounds_[v];
    }
    return n;
  }();
  auto index_in_stage = [&](int l) { // the stage's layers in chunk order
    int i = 0;
    for (int ch = 0; ch < chunks_; ++ch) {
      const auto v = static_cast<std::size_t>(ch * p_.pp + stage);
      for (int k = bounds_[v]; k < bounds_[v + 1]; ++k, ++i)
        if (k == l)
          return i;
    }
    return i;
  };
  // The last op of each of the stage's layers' latest forward and backward (by index in the
  // stage): layer i's gathers wait for layer i - 2's forward end (i + 2's backward end), so that
  // parameters are prefetched one layer ahead (FSDP2's default; the cost-only lowering's gates).
  // FSDP2 issues layer i + 1's gather as layer i starts (layer i - 1's in backward, explicit
  // backward prefetch): emitted there, ahead of layer i's gradient reductions on the DP stream.
  std::vector<int> fwd_end(static_cast<std::size_t>(stage_layers), -1), bwd_end = fwd_end;
  auto prefetch = [&](int l, int mb, const char* pass, int gate) {
    const int begin = static_cast<int>(rc_->ops.size());
    for (int b : layer_buckets(l))
      use_bucket(b, pass, l, mb);
    gate_prefetch(begin, gate);
  };
  auto forward = [&](int mb, int chunk) {
    const auto v = static_cast<std::size_t>(chunk * p_.pp + stage);
    int x = first && chunk == 0 ? embed_forward(mb) : recv_activation(mb, chunk, true);
    for (int l = bounds_[v]; l < bounds_[v + 1]; ++l) {
      if (mb == 0) // the layer's first forward: the previous step's update streamed in
        for (int b : layer_buckets(l))
          if (streams_forward(b)) {
            step_bucket(b, owned_grads(b), true);
            zero_grads(b, true);
          }
      LayerSaved& sv = saved_[static_cast<std::size_t>(l)][static_cast<std::size_t>(mb)];
      const int i = index_in_stage(l);
      prefetch(l, mb, "fwd", i >= 2 ? fwd_end[static_cast<std::size_t>(i - 2)] : -1);
      // (Not ahead of the next layer's update streamed into this forward: it writes the shard.)
      const auto streamed = [&](int k) {
        const std::vector<int> bs = layer_buckets(k);
        return mb == 0 &&
               std::any_of(bs.begin(), bs.end(), [&](int b) { return streams_forward(b); });
      };
      if (l + 1 < bounds_[v + 1] && !streamed(l + 1))
        prefetch(l + 1, mb, "fwd", i >= 1 ? fwd_end[static_cast<std::size_t>(i - 1)] : -1);
      x = attn_forward(l, mb, x, sv.a);
      x = is_moe(l) ? moe_forward(l, mb, x, sv.e) : dense_forward(l, mb, x, sv.m);
      fwd_end[static_cast<std::size_t>(i)] = static_cast<int>(rc_->ops.size()) - 1;
      if (offloads(i, stage_layers))
        offload(l, mb, sv);
    }
    if (last && chunk == chunks_ - 1)
      head_forward(mb, x);
    else
      send_activation(mb, chunk, x, true);
  };
  auto backward = [&](int mb, int chunk) {
    const auto v = static_cast<std::size_t>(chunk * p_.pp + stage);
    int dx = -1;
    if (last && chunk == chunks_ - 1) {
      dx = head_backward(mb);
      // The head's gradients of the micro-batch are all written (with tied embeddings on one
      // stage the table's are not until the embedding's backward).
      const int head = s_.params[static_cast<std::size_t>(head_param_)].bucket;
      const int norm = bucket_of_param("final_norm");
      if (head_param_ != emb_param_)
        finish_bucket_grads(head, -1, mb);
      if (norm != head)
        finish_bucket_grads(norm, -1, mb);
    } else {
      dx = recv_activation(mb, chunk, false);
    }
    for (int l = bounds_[v + 1] - 1; l >= bounds_[v]; --l) {
      LayerSaved& sv = saved_[static_cast<std::size_t>(l)][static_cast<std::size_t>(mb)];
      const int i = index_in_stage(l);
      auto bwd_gate = [&](int j) {
        return j < stage_layers ? bwd_end[static_cast<std::size_t>(j)] : -1;
      };
      const int begin = static_cast<int>(rc_->ops.size());
      reload(l, mb, sv);
      gate_prefetch(begin, bwd_gate(i + 2));
      prefetch(l, mb, "bwd", bwd_gate(i + 2));
      if (l - 1 >= bounds_[v])
        prefetch(l - 1, mb, "bwd", bwd_gate(i + 1));
      begin_layer_grads(l, mb);
      const bool whole = checkpoints_layer(l);
      if (whole)
        recompute_layer(l, mb, sv);
      if (is_moe(l)) {
        if (!whole)
          recompute_moe(l, mb, sv.e);
        dx = moe_backward(l, mb, sv.e, dx);
      } else {
        if (!whole)
          recompute_mlp(l, mb, sv.m);
        dx = dense_backward(l, mb, sv.m, dx);
      }
      if (!whole)
        recompute_attention(l, mb, sv.a);
      dx = attn_backward(l, mb, sv.a, dx);
      layer_bwd_end_[{l, mb}] = static_cast<int>(rc_->ops.size()) - 1;
      bwd_end[static_cast<std::size_t>(i)] = static_cast<int>(rc_->ops.size()) - 1;
      scatter_layer_grads(l, mb);
      // A layer's buckets reduce as soon as its last micro-batch's backward is done, under the
      // rest of the backward (Megatron's overlap_grad_reduce; FSDP2's last reduce-scatter), and
      // with the host optimizer streamed into the backward step there too.
      if (mb == micro - 1 && !defer_wgrad_)
        for (int b : layer_buckets(l)) {
          const std::vector<int> owned = reduce_bucket(b);
          reduced[static_cast<std::size_t>(b)] = true;
          if (p_.optimizer_on_host && p_.overlap == strategy::OptimizerOverlap::stream_backward) {
            step_bucket(b, owned, false);
            stepped[static_cast<std::size_t>(b)] = true;
          }
        }
    }
    if (first && chunk == 0) {
      embed_backward(mb, dx);
      finish_bucket_grads(s_.params[static_cast<std::size_t>(emb_param_)].bucket, -1, mb);
    } else {
      send_activation(mb, chunk, dx, false);
    }
  };
  defer_wgrad_ = strategy::defers_weight_gradients(p_);
  strategy::play_pipeline(
      p_, stage, [&] { flush_wgrad(); }, forward, backward);
  defer_wgrad_ = false;
  if (!mb_grads_.empty())
    throw std::logic_error(fmt::format(
        "stage {} leaves bucket {}'s gradients of micro-batch {} "
        "unreduced",
        stage, s_.buckets[static_cast<std::size_t>(mb_grads_.begin()->first.first)].name,
        mb_grads_.begin()->first.second));
  for (int b : here) {
    const auto bi = static_cast<std::size_t>(b);
    if (stepped[bi])
      continue;
    const std::vector<int> owned = reduced[bi] ? owned_grads(b) : reduce_bucket(b);
    if (p_.grads == strategy::Placement::host && !p_.optimizer_on_host)
      download_grads(b, owned);
    if (!streams_forward(b))
      step_bucket(b, owned, false);
  }
}

sim::Schedule Builder::run() {
  s_.world = p_.world;
  s_.gpus_per_node = c_.gpus_per_node;
  s_.mesh = strategy::plan_mesh(p_, c_.gpus_per_node);
  s_.tokens_per_step = static_cast<double>(p_.global_batch) * static_cast<double>(c_.seq);
  s_.tokens.seq_len = static_cast<int>(c_.seq);
  s_.tokens.micro_batch = p_.micro_batch;
  s_.tokens.global_batch = p_.global_batch;
  s_.tokens.cp_dims = {"cp.ulysses", "cp.ring"};
  s_.tokens.cp_balanced = ring_ > 1;
  g_tp_ = group("attention.tp", strategy::tp_group());
  g_dtp_ = group("dense.tp", strategy::dense_tp_group());
  g_etp_ = group("embed.tp", strategy::embed_tp_group());
  g_uly_ = group("attention.cp.ulysses", strategy::cp_ulysses_group());
  g_ring_ = group("attention.cp.ring", strategy::cp_ring_group());
  g_ep_ = group("moe.ep", strategy::ep_group());
  g_xtp_ = group("moe.etp", strategy::etp_group());
  chunks_ = strategy::chunks_per_stage(p_);
  bounds_ = strategy::virtual_stage_bounds(p_, static_cast<int>(m_.num_layers()));
  if (p_.pp > 1) {
    // Point to point between the same place of adjacent stages: on one node when both stages'
    // ranks fit in it (as the old lowering prices it).
    const int per_stage = p_.ranks_per_stage(), gpn = c_.gpus_per_node;
    s_.groups.push_back(
        sim::Group{"pp", 2, per_stage >= gpn ? 1 : (2 * per_stage <= gpn ? 2 : 1), {}});
    g_pp_ = static_cast<int>(s_.groups.size()) - 1;
  }
  declare_params();
  s_.classes.resize(static_cast<std::size_t>(p_.pp));
  for (int stage = 0; stage < p_.pp; ++stage)
    build_stage(stage);
  pair_pipeline();
  double flops = 0;
  for (sim::RankClass& rc : s_.classes) {
    for (const sim::Op& op : rc.ops)
      flops += op.model_flops * rc.multiplicity;
    order_blocking_collectives(rc);
    derive_dependencies(rc);
    derive_liveness(rc);
  }
  s_.model_flops_per_step = flops;
  return std::move(s_);
}

} // namespace

void check_programmable(const Plan& p, const ProgramContext& c) {
  if (c.model == nullptr || c.seq <= 0)
    throw InputError("lowering needs a model and a positive sequence length.");
  const workload::ModelSpec& m = *c.model;
  // What the program prices but no executor runs (MLA, shared experts, other routers, token
  // dropping, replicated key/value heads, uneven splits) it builds as priced-only ops; what is
  // left here cannot be built at all.
  if (m.is_moe()) {
    const workload::MoeSpec& e = m.moe;
    if (e.num_routed_experts % p.moe.ep != 0 || e.expert_intermediate_size % p.moe.etp != 0)
      throw InputError(fmt::format("ep {} must divide the {} experts and etp {} their width {}",
                                   p.moe.ep, e.num_routed_experts, p.moe.etp,
                                   e.expert_intermediate_size));
  }
  if (m.is_moe() && p.moe.rebalance == strategy::Rebalance::least_loaded && p.moe.ep > 1 &&
      p.moe.etp > 1)
    throw InputError(fmt::format("least-loaded expert rebalancing is not built with expert tensor "
                                 "parallelism (etp {}): use etp 1 or no rebalancing",
                                 p.moe.etp));
  if (p.attention.cp > 1) {
    const strategy::CpSplit cp = strategy::cp_split(p, c.gpus_per_node);
    const std::int64_t heads = m.attention.num_heads / p.attention.tp;
    const std::int64_t kv =
        m.attention.kind == workload::AttentionKind::mla
            ? heads
            : std::max<std::int64_t>(1, m.attention.num_kv_heads / p.attention.tp);
    // Key/value heads fewer than the Ulysses ranks are replicated to one per rank.
    if (cp.ulysses > 1 &&
        (heads % cp.ulysses != 0 || (kv % cp.ulysses != 0 && cp.ulysses % kv != 0)))
      throw InputError(fmt::format("Ulysses cp {} must divide the heads left on a tp rank ({} "
                                   "query, {} key/value)",
                                   cp.ulysses, heads, kv));
  }
  if (m.attention.num_heads % p.attention.tp != 0)
    throw InputError(fmt::format("tp {} does not divide the {} attention heads", p.attention.tp,
                                 m.attention.num_heads));
  if (m.attention.kind != workload::AttentionKind::mla &&
      m.attention.num_kv_heads % p.attention.tp != 0 &&
      p.attention.tp % m.attention.num_kv_heads != 0)
    throw InputError(fmt::format("tp {} neither divides nor is a multiple of the {} key/value "
                                 "heads",
                                 p.attention.tp, m.attention.num_kv_heads));
  if (m.dense_mlp.intermediate_size % p.dense.tp != 0)
    throw InputError(fmt::format("dense tp {} does not divide the MLP width {}", p.dense.tp,
                                 m.dense_mlp.intermediate_size));
  if (m.is_moe() && m.moe.num_shared_experts > 0 &&
      (m.moe.num_shared_experts * m.moe.shared_intermediate_size) % p.dense.tp != 0)
    throw InputError(fmt::format("dense tp {} does not divide the shared experts' width {}",
                                 p.dense.tp,
                                 m.moe.num_shared_experts * m.moe.shared_intermediate_size));
  if (p.global_batch <= 0 || p.micro_batches() < 1)
    throw InputError("the plan has no micro-batch per step");
}

sim::Schedule lower_program(const Plan& p, const ProgramContext& c) {
  check_programmable(p, c);
  return Builder(p, c).run();
}

} // namespace mop::lowering
