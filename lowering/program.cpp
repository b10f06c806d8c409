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

[[noreturn]] void not_yet(const std::string& what) {
  throw InputError(fmt::format("the program lowering does not build {} yet", what));
}

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

// The parameters of one layer kind in one layer (or the embedding and head), split by the group
// their gradients sum over: sharded by the kind's TP (or EP) and summed over its data-parallel
// ranks, or replicated over the stage (norms, the router) and summed over all of it. Under a
// pipeline the embedding (first stage) and the head (last stage) are separate buckets.
struct BucketKey {
  int layer = -1;
  LayerKind kind = LayerKind::embedding;
  bool replicated = false;
  bool head = false; // the last stage's final norm and LM head, under a pipeline
  bool operator==(const BucketKey&) const = default;
};

class Builder {
public:
  Builder(const Plan& p, const ProgramContext& c) : p_(p), c_(c), m_(*c.model) {
    const auto& a = m_.attention;
    h_ = m_.hidden_size;
    d_ = a.head_dim;
    hl_ = a.num_heads / p_.attention.tp;
    kvl_ = a.num_kv_heads / p_.attention.tp;
    lc_ = c_.seq / p_.attention.cp;
    ng_ = p_.micro_batch * lc_;
    n_ = ng_ / p_.attention.tp;
    f_ = m_.dense_mlp.intermediate_size / p_.dense.tp;
    vl_ = m_.vocab_size / p_.embed.tp;
    rows_e_ = n_ * p_.embed.tp;
    rows_d_ = n_ * p_.dense.tp;
  }

  sim::Schedule run();

private:
  const Plan& p_;
  const ProgramContext& c_;
  const workload::ModelSpec& m_;
  std::int64_t h_ = 0, d_ = 0, hl_ = 0, kvl_ = 0, lc_ = 0, ng_ = 0, n_ = 0, f_ = 0, vl_ = 0;
  std::int64_t rows_e_ = 0, rows_d_ = 0; // rows gathered over the embedding / dense TP group
  sim::Schedule s_;
  sim::RankClass* rc_ = nullptr;
  int g_tp_ = -1, g_dtp_ = -1, g_etp_ = -1;

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
    int grad = -1;  // the slice's gradient, accumulated over micro-batches (resident)
  };
  std::vector<ParamTensors> pt_;
  struct BucketTensors {
    int shard = -1;      // ZeRO-3: the flat parameter shard (resident)
    int grad_shard = -1; // ZeRO >= 2: the reduced flat gradient shard
    int m = -1, v = -1;  // AdamW moments over what the rank owns
  };
  std::vector<BucketTensors> bt_;
  std::vector<BucketKey> bucket_keys_;
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
  double bytes(int t) const { return rc_->tensors[static_cast<std::size_t>(t)].bytes; }

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
    op.attrs = o.attrs;
    op.layer = o.layer;
    op.micro_batch = o.mb;
    price(op);
    rc_->ops.push_back(std::move(op));
    return static_cast<int>(rc_->ops.size()) - 1;
  }
  // What the simulator charges, from the operands.
  void price(sim::Op& op) const {
    double in = 0, out = 0;
    for (int t : op.inputs)
      in += bytes(t);
    for (int t : op.outputs)
      out += bytes(t);
    switch (op.kernel) {
    case Kernel::matmul: {
      const sim::Attrs& a = op.attrs;
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
      const sim::Attrs& a = op.attrs;
      const Shape& q = shape(op.inputs[0]);
      const Shape& k = shape(op.inputs[1]);
      const double len = static_cast<double>(q[0]) / a.sequences;
      op.attention = sim::AttentionShape{static_cast<double>(a.sequences),
                                         static_cast<double>(q[1]),
                                         static_cast<double>(k[1]),
                                         len,
                                         static_cast<double>(k[0]) / a.sequences,
                                         static_cast<double>(q[2]),
                                         static_cast<double>(q[2]),
                                         a.causal,
                                         static_cast<double>(a.window)};
      const double pairs =
          a.sequences * workload::attended_pairs(static_cast<std::int64_t>(len), a.window);
      const double fwd = 2 * pairs * static_cast<double>(q[1] * 2 * q[2]);
      op.model_flops = op.category == Category::recompute
                           ? 0
                           : (op.kernel == Kernel::attention_bwd ? 2 : 1) * fwd;
      return;
    }
    case Kernel::collective:
      // nccl-tests' size: the gathered buffer of an all-gather, the input of the others.
      op.bytes = op.kind == OpKind::all_gather ? out : in;
      return;
    case Kernel::tokens:
      op.bytes = 0;
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
  int matmul(const std::string& name, std::vector<int> a, std::vector<int> b, std::vector<int> c,
             bool ta, bool tb, bool acc, Category cat, int layer, int mb) {
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
    return emit(std::move(o));
  }
  // A weight-gradient GEMM (dW += ...): emitted now, or under zero-bubble held back until the
  // pipeline order's next flush (flush_wgrad), where the stage would otherwise wait.
  void wgrad(const std::string& name, std::vector<int> a, std::vector<int> b, std::vector<int> c,
             bool ta, int layer, int mb) {
    OpSpec o;
    o.name = name;
    o.kernel = Kernel::matmul;
    o.kind = OpKind::gemm;
    o.category = Category::backward;
    o.attrs.trans_a = ta;
    o.attrs.accumulate = true;
    o.attrs.a_blocks = static_cast<int>(a.size());
    o.in = std::move(a);
    o.in.insert(o.in.end(), b.begin(), b.end());
    o.out = std::move(c);
    o.layer = layer;
    o.mb = mb;
    if (defer_wgrad_)
      held_wgrad_.push_back(std::move(o));
    else
      emit(std::move(o));
  }
  void flush_wgrad() {
    for (OpSpec& o : held_wgrad_)
      emit(std::move(o));
    held_wgrad_.clear();
  }
  int simple(const std::string& name, Kernel k, std::vector<int> in, std::vector<int> out,
             Category cat, int layer, int mb, sim::Attrs attrs = {}) {
    return emit(OpSpec{name, k, OpKind::elementwise, cat, kCompute, -1, std::move(in),
                       std::move(out), attrs, layer, mb});
  }

  // --- parameters ----------------------------------------------------------------------------
  int find_param(const std::string& name) const {
    for (std::size_t i = 0; i < s_.params.size(); ++i)
      if (s_.params[i].name == name)
        return static_cast<int>(i);
    return -1;
  }
  int bucket_of(const BucketKey& key) {
    for (std::size_t i = 0; i < bucket_keys_.size(); ++i)
      if (bucket_keys_[i] == key)
        return static_cast<int>(i);
    sim::Bucket b;
    if (key.layer >= 0)
      b.name = fmt::format("L{}.{}", key.layer, strategy::layer_kind_name(key.kind));
    else if (p_.pp == 1)
      b.name = "embedding and head";
    else
      b.name = key.head ? "head" : "embedding";
    if (key.replicated)
      b.name += ".replicated";
    b.grads = key.replicated ? strategy::stage_group() : strategy::data_parallel_group(key.kind);
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
                                           : (key.head || key.replicated ? p_.pp - 1 : 0));
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
  void make_state();
  // The tensors a pass computes with for the parameters of bucket b: the resident slices, or
  // under ZeRO-3 a fresh gather of the bucket's shard.
  std::vector<int> use_bucket(int b, const std::string& pass, int layer, int mb);
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
    int q = -1, k = -1, v = -1, o = -1, lse = -1;
  };
  struct MlpSaved {
    int x = -1, rstd = -1, xg = -1, gu = -1, act = -1;
  };
  struct LayerSaved {
    AttnSaved a;
    MlpSaved m;
  };
  struct HeadSaved {
    int x = -1, rstd = -1, xg = -1, dlogits = -1;
  };
  std::vector<std::vector<LayerSaved>> saved_;
  std::vector<HeadSaved> head_;
  std::vector<int> ids_, labels_; // per micro-batch: the embedding group's rows' ids and labels

  void tokens(int mb);
  int embed_forward(int mb);
  void embed_backward(int mb, int dx);
  int attn_forward(int l, int mb, int x, AttnSaved& s);
  int attn_backward(int l, int mb, const AttnSaved& s, int dy);
  int dense_forward(int l, int mb, int x, MlpSaved& s);
  int dense_backward(int l, int mb, const MlpSaved& s, int dy);
  void head_forward(int mb, int x);
  int head_backward(int mb);
  void reduce_and_step();

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
};

void Builder::declare_params() {
  using sim::AxisSplit;
  const std::int64_t h = h_, hq = m_.attention.num_heads * d_, hkv = m_.attention.num_kv_heads * d_;
  const AxisSplit a_tp_cols{1, "attention", "tp"}, a_tp_rows{0, "attention", "tp"};
  const AxisSplit d_tp_cols{1, "dense", "tp"}, d_tp_rows{0, "dense", "tp"};
  const bool pipe = p_.pp > 1;
  const BucketKey emb{-1, LayerKind::embedding, false, false};
  const BucketKey head{-1, LayerKind::embedding, false, pipe};
  const BucketKey head_rep{-1, LayerKind::embedding, true, pipe};
  emb_param_ = param("embedding", {m_.vocab_size, h}, {{0, "embed", "tp"}}, emb);
  for (int l = 0; l < static_cast<int>(m_.num_layers()); ++l) {
    const BucketKey att{l, LayerKind::attention, false}, att_rep{l, LayerKind::attention, true};
    param(pname(l, "attn.norm"), {h}, {}, att_rep);
    param(pname(l, "attn.wq"), {h, hq}, {a_tp_cols}, att);
    param(pname(l, "attn.wk"), {h, hkv}, {a_tp_cols}, att);
    param(pname(l, "attn.wv"), {h, hkv}, {a_tp_cols}, att);
    param(pname(l, "attn.wo"), {hq, h}, {a_tp_rows}, att);
    if (m_.attention.qk_norm) {
      param(pname(l, "attn.q_norm"), {d_}, {}, att_rep);
      param(pname(l, "attn.k_norm"), {d_}, {}, att_rep);
    }
    const BucketKey mlp{l, LayerKind::dense, false}, mlp_rep{l, LayerKind::dense, true};
    param(pname(l, "mlp.norm"), {h}, {}, mlp_rep);
    const std::int64_t f = m_.dense_mlp.intermediate_size;
    param(pname(l, "mlp.gate"), {h, f}, {d_tp_cols}, mlp);
    param(pname(l, "mlp.up"), {h, f}, {d_tp_cols}, mlp);
    param(pname(l, "mlp.down"), {f, h}, {d_tp_rows}, mlp);
  }
  param("final_norm", {h}, {}, head_rep);
  if (!m_.tied_embeddings) {
    head_param_ = param("lm_head", {h, m_.vocab_size}, {{1, "embed", "tp"}}, head);
  } else if (!pipe) {
    head_param_ = emb_param_;
  } else {
    // The last stage's copy of the tied table; the two copies' gradients sum over the first
    // and last stage (Megatron's embedding group).
    head_param_ = param("embedding", {m_.vocab_size, h}, {{0, "embed", "tp"}}, head);
    sim::GroupSpec ends{"embed", {"pp"}};
    ends.ends_only = true;
    g_tied_ = group(group_name(ends), ends);
    for (int p : {emb_param_, head_param_})
      s_.buckets[static_cast<std::size_t>(s_.params[static_cast<std::size_t>(p)].bucket)].tied =
          ends;
  }
}

// Resident state: each parameter's slice (ZeRO 0-2) or each bucket's flat shard (ZeRO-3), the
// slices' gradients, the moments, and the step's loss.
void Builder::make_state() {
  pt_.assign(s_.params.size(), {});
  bt_.assign(s_.buckets.size(), {});
  for (std::size_t b = 0; b < s_.buckets.size(); ++b) {
    const sim::Bucket& bk = s_.buckets[b];
    const int bi = static_cast<int>(b);
    if (!on_stage(bi))
      continue;
    const std::int64_t owned = bk.zero >= 1 ? chunk(bi) : bucket_numel(bi);
    for (int p : bk.params) {
      const auto pi = static_cast<std::size_t>(p);
      const std::string& name = s_.params[pi].name;
      if (bk.zero < 3) {
        pt_[pi].value = tensor(name, local_shape(p), TensorRole::param);
        rc_->tensors.back().param = p;
        rc_->tensors.back().resident = true;
      }
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
    if (bk.zero >= 2) {
      bt_[b].grad_shard = tensor(bk.name + ".grad_shard", {chunk(bi)}, TensorRole::grad,
                                 Element::real, sim::Dtype::fp32);
      rc_->tensors.back().bucket = bi;
      rc_->tensors.back().resident = true;
    }
    for (int* t : {&bt_[b].m, &bt_[b].v}) {
      *t = tensor(bk.name + (t == &bt_[b].m ? ".adam_m" : ".adam_v"), {owned},
                  TensorRole::optimizer_state, Element::real, sim::Dtype::fp32);
      rc_->tensors.back().bucket = bi;
      rc_->tensors.back().resident = true;
    }
  }
  loss_ = tensor("loss", {1}, TensorRole::loss, Element::real, sim::Dtype::fp32);
  rc_->tensors.back().resident = true;
}

std::vector<int> Builder::use_bucket(int b, const std::string& pass, int layer, int mb) {
  const sim::Bucket& bk = s_.buckets[static_cast<std::size_t>(b)];
  std::vector<int> out;
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
  OpSpec o{fmt::format("{}.fsdp_gather.{}.mb{}", bk.name, pass, mb),
           Kernel::collective,
           OpKind::all_gather,
           Category::dp_comm,
           kDp,
           g,
           {bt_[static_cast<std::size_t>(b)].shard},
           out,
           {},
           layer,
           mb};
  emit(std::move(o));
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
  t.group = g_etp_;
  t.out = {ids_[m], labels_[m]};
  t.attrs.sequence_parallel = true;
  t.mb = mb;
  emit(std::move(t));
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
  return collective(fmt::format("embedding_sp_scatter.mb{}", mb), OpKind::reduce_scatter,
                    Category::tp_comm, kTp, g_etp_, y, {n_, h_}, TensorRole::activation, -1, mb);
}

void Builder::embed_backward(int mb, int dx) {
  const auto m = static_cast<std::size_t>(mb);
  const int dyg =
      collective(fmt::format("embedding_sp_gather.mb{}.bwd", mb), OpKind::all_gather,
                 Category::tp_comm, kTp, g_etp_, dx, {rows_e_, h_}, TensorRole::activation, -1, mb);
  const int p = emb_param_;
  OpSpec o;
  o.name = fmt::format("embedding.mb{}.bwd", mb);
  o.kernel = Kernel::embedding_bwd;
  o.category = Category::backward;
  o.in = {ids_[m], dyg};
  o.out = {pt_[static_cast<std::size_t>(p)].grad};
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
  const std::vector<int> wn = use_bucket(bn, "fwd", -1, mb);
  const int xn = tensor(fmt::format("final_norm mb{}", mb), {n_, h_}, TensorRole::activation);
  hs.rstd = tensor(fmt::format("final_norm rstd mb{}", mb), {n_}, TensorRole::saved, Element::real,
                   sim::Dtype::fp32);
  simple(fmt::format("final_norm.mb{}", mb), Kernel::rmsnorm_fwd,
         {x, value_of("final_norm", wn, bn)}, {xn, hs.rstd}, Category::forward, -1, mb,
         norm_attrs());
  hs.xg = collective(fmt::format("head_sp_gather.mb{}", mb), OpKind::all_gather, Category::tp_comm,
                     kTp, g_etp_, xn, {rows_e_, h_}, TensorRole::saved, -1, mb);
  const bool tied = m_.tied_embeddings;
  const std::string wname = tied ? "embedding" : "lm_head";
  const int bw = s_.params[static_cast<std::size_t>(head_param_)].bucket;
  const std::vector<int> w = use_bucket(bw, "head", -1, mb);
  const int logits = tensor(fmt::format("logits mb{}", mb), {rows_e_, vl_}, TensorRole::activation);
  matmul(fmt::format("lm_head.mb{}", mb), {hs.xg}, {value_of(wname, w, bw)}, {logits}, false, tied,
         false, Category::forward, -1, mb);
  hs.dlogits = tensor(fmt::format("dlogits mb{}", mb), {rows_e_, vl_}, TensorRole::saved);
  if (g_etp_ < 0) {
    simple(fmt::format("loss.mb{}", mb), Kernel::cross_entropy, {logits, labels_[m]},
           {hs.dlogits, loss_}, Category::forward, -1, mb);
    return;
  }
  const Shape rows{rows_e_};
  auto f32 = [&](const char* what) {
    return tensor(fmt::format("{} mb{}", what, mb), rows, TensorRole::activation, Element::real,
                  sim::Dtype::fp32);
  };
  const int mx = f32("logit max");
  simple(fmt::format("loss.max.mb{}", mb), Kernel::ce_max, {logits}, {mx}, Category::forward, -1,
         mb);
  OpSpec mx_all{fmt::format("loss.max_all_reduce.mb{}", mb),
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
  emit(OpSpec{fmt::format("loss.sums.mb{}", mb),
              Kernel::ce_sums,
              OpKind::elementwise,
              Category::forward,
              kCompute,
              g_etp_,
              {logits, mx, labels_[m]},
              {sum, target},
              {},
              -1,
              mb});
  for (int t : {sum, target})
    emit(OpSpec{fmt::format("loss.{}_all_reduce.mb{}", t == sum ? "sum" : "target", mb),
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
  emit(OpSpec{fmt::format("loss.mb{}", mb),
              Kernel::ce_finish,
              OpKind::elementwise,
              Category::forward,
              kCompute,
              g_etp_,
              {logits, mx, sum, target, labels_[m]},
              {hs.dlogits, loss_},
              {},
              -1,
              mb});
}

int Builder::head_backward(int mb) {
  const auto m = static_cast<std::size_t>(mb);
  HeadSaved& hs = head_[m];
  const bool tied = m_.tied_embeddings;
  const std::string wname = tied ? "embedding" : "lm_head";
  const int bw = s_.params[static_cast<std::size_t>(head_param_)].bucket;
  const std::vector<int> w = use_bucket(bw, "head.bwd", -1, mb);
  const int dxg = tensor(fmt::format("head dx mb{}", mb), {rows_e_, h_}, TensorRole::activation);
  matmul(fmt::format("lm_head.mb{}.dgrad", mb), {hs.dlogits}, {value_of(wname, w, bw)}, {dxg},
         false, !tied, false, Category::backward, -1, mb);
  const int g = pt_[static_cast<std::size_t>(head_param_)].grad;
  if (tied) // dE[v, h] += dlogitsᵀ · x
    wgrad(fmt::format("lm_head.mb{}.wgrad", mb), {hs.dlogits}, {hs.xg}, {g}, true, -1, mb);
  else // dW[h, v] += xᵀ · dlogits
    wgrad(fmt::format("lm_head.mb{}.wgrad", mb), {hs.xg}, {hs.dlogits}, {g}, true, -1, mb);
  const int dxn =
      collective(fmt::format("head_sp_scatter.mb{}.bwd", mb), OpKind::reduce_scatter,
                 Category::tp_comm, kTp, g_etp_, dxg, {n_, h_}, TensorRole::activation, -1, mb);
  const int bn = bucket_of_param("final_norm");
  const std::vector<int> wn = use_bucket(bn, "bwd", -1, mb);
  const int dx = tensor(fmt::format("final_norm dx mb{}", mb), {n_, h_}, TensorRole::activation);
  OpSpec o;
  o.name = fmt::format("final_norm.mb{}.bwd", mb);
  o.kernel = Kernel::rmsnorm_bwd;
  o.category = Category::backward;
  o.in = {hs.x, value_of("final_norm", wn, bn), hs.rstd, dxn};
  o.out = {dx, pt_[static_cast<std::size_t>(find_param("final_norm"))].grad};
  o.attrs = norm_attrs();
  o.attrs.accumulate = true;
  o.mb = mb;
  emit(std::move(o));
  return dx;
}

// --- attention -----------------------------------------------------------------------------------

// RMSNorm, SP all-gather over TP, column-parallel q/k/v (one fused GEMM), per-head q/k norm,
// RoPE, attention over the rank's heads, row-parallel output projection, SP reduce-scatter,
// residual.
int Builder::attn_forward(int l, int mb, int x, AttnSaved& s) {
  const std::string pre = fmt::format("L{}.", l);
  auto nm = [&](const char* what) { return fmt::format("L{}.{}.mb{}", l, what, mb); };
  const int b = bucket_of_param(pname(l, "attn.wq"));
  const int br = bucket_of_param(pname(l, "attn.norm"));
  const std::vector<int> w = use_bucket(b, "fwd", l, mb);
  const std::vector<int> wr = use_bucket(br, "fwd", l, mb);
  s.x = x;
  s.xn = tensor(nm("attn_norm"), {n_, h_}, TensorRole::activation);
  s.rstd = tensor(nm("attn_norm rstd"), {n_}, TensorRole::saved, Element::real, sim::Dtype::fp32);
  simple(nm("attn_norm"), Kernel::rmsnorm_fwd, {x, value_of(pname(l, "attn.norm"), wr, br)},
         {s.xn, s.rstd}, Category::forward, l, mb, norm_attrs());
  s.xg = collective(nm("attn_sp_gather"), OpKind::all_gather, Category::tp_comm, kTp, g_tp_, s.xn,
                    {ng_, h_}, TensorRole::saved, l, mb);
  const bool qkn = m_.attention.qk_norm;
  const int q = tensor(nm("q"), {ng_, hl_, d_}, TensorRole::saved);
  const int k = tensor(nm("k"), {ng_, kvl_, d_}, TensorRole::saved);
  s.v = tensor(nm("v"), {ng_, kvl_, d_}, TensorRole::saved);
  matmul(nm("qkv_proj"), {s.xg},
         {value_of(pname(l, "attn.wq"), w, b), value_of(pname(l, "attn.wk"), w, b),
          value_of(pname(l, "attn.wv"), w, b)},
         {q, k, s.v}, false, false, false, Category::forward, l, mb);
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
           {qr, s.q_rstd}, Category::forward, l, mb, norm_attrs());
    simple(nm("k_norm"), Kernel::rmsnorm_fwd, {k, value_of(pname(l, "attn.k_norm"), wr, br)},
           {kr, s.k_rstd}, Category::forward, l, mb, norm_attrs());
  }
  sim::Attrs rope;
  rope.theta = m_.rope_theta;
  s.q = tensor(nm("q rotated"), {ng_, hl_, d_}, TensorRole::saved);
  s.k = tensor(nm("k rotated"), {ng_, kvl_, d_}, TensorRole::saved);
  simple(nm("rope_q"), Kernel::rope, {qr}, {s.q}, Category::forward, l, mb, rope);
  simple(nm("rope_k"), Kernel::rope, {kr}, {s.k}, Category::forward, l, mb, rope);
  s.o = tensor(nm("attn out"), {ng_, hl_, d_}, TensorRole::saved);
  s.lse = tensor(nm("attn lse"), {ng_, hl_}, TensorRole::saved, Element::real, sim::Dtype::fp32);
  OpSpec core;
  core.name = nm("attn_core");
  core.kernel = Kernel::attention_fwd;
  core.kind = OpKind::attention_fwd;
  core.in = {s.q, s.k, s.v};
  core.out = {s.o, s.lse};
  core.attrs.sequences = p_.micro_batch;
  core.attrs.causal = true;
  core.attrs.window = m_.layers[static_cast<std::size_t>(l)].window;
  core.attrs.scale = 1.0 / std::sqrt(static_cast<double>(d_));
  core.layer = l;
  core.mb = mb;
  emit(std::move(core));
  const int out = tensor(nm("o_proj out"), {ng_, h_}, TensorRole::activation);
  matmul(nm("o_proj"), {s.o}, {value_of(pname(l, "attn.wo"), w, b)}, {out}, false, false, false,
         Category::forward, l, mb);
  const int y = collective(nm("attn_sp_scatter"), OpKind::reduce_scatter, Category::tp_comm, kTp,
                           g_tp_, out, {n_, h_}, TensorRole::activation, l, mb);
  const int h = tensor(nm("attn residual"), {n_, h_}, TensorRole::saved);
  simple(nm("attn_residual"), Kernel::add, {x, y}, {h}, Category::forward, l, mb);
  return h;
}

int Builder::attn_backward(int l, int mb, const AttnSaved& s, int dy) {
  auto nm = [&](const char* what) { return fmt::format("L{}.{}.mb{}.bwd", l, what, mb); };
  const int b = bucket_of_param(pname(l, "attn.wq"));
  const int br = bucket_of_param(pname(l, "attn.norm"));
  const std::vector<int> w = use_bucket(b, "bwd", l, mb);
  const std::vector<int> wr = use_bucket(br, "bwd", l, mb);
  auto grad = [&](const char* role) {
    return pt_[static_cast<std::size_t>(find_param(pname(l, role)))].grad;
  };
  const int dyg = collective(nm("attn_sp_gather"), OpKind::all_gather, Category::tp_comm, kTp,
                             g_tp_, dy, {ng_, h_}, TensorRole::activation, l, mb);
  const int dout = tensor(nm("d attn out"), {ng_, hl_, d_}, TensorRole::activation);
  matmul(nm("o_proj.dgrad"), {dyg}, {value_of(pname(l, "attn.wo"), w, b)}, {dout}, false, true,
         false, Category::backward, l, mb);
  wgrad(nm("o_proj.wgrad"), {s.o}, {dyg}, {grad("attn.wo")}, true, l, mb);
  int dq = tensor(nm("dq"), {ng_, hl_, d_}, TensorRole::activation);
  int dk = tensor(nm("dk"), {ng_, kvl_, d_}, TensorRole::activation);
  const int dv = tensor(nm("dv"), {ng_, kvl_, d_}, TensorRole::activation);
  OpSpec core;
  core.name = nm("attn_core");
  core.kernel = Kernel::attention_bwd;
  core.kind = OpKind::attention_bwd;
  core.category = Category::backward;
  core.in = {s.q, s.k, s.v, s.o, s.lse, dout};
  core.out = {dq, dk, dv};
  core.attrs.sequences = p_.micro_batch;
  core.attrs.causal = true;
  core.attrs.window = m_.layers[static_cast<std::size_t>(l)].window;
  core.attrs.scale = 1.0 / std::sqrt(static_cast<double>(d_));
  core.attrs.accumulate = true;
  core.layer = l;
  core.mb = mb;
  emit(std::move(core));
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
    const int dqp = tensor(nm("dq pre-norm"), {ng_, hl_, d_}, TensorRole::activation);
    const int dkp = tensor(nm("dk pre-norm"), {ng_, kvl_, d_}, TensorRole::activation);
    sim::Attrs a = norm_attrs();
    a.accumulate = true;
    OpSpec qn{nm("q_norm"),
              Kernel::rmsnorm_bwd,
              OpKind::elementwise,
              Category::backward,
              kCompute,
              -1,
              {s.q_pre, value_of(pname(l, "attn.q_norm"), wr, br), s.q_rstd, dq},
              {dqp, grad("attn.q_norm")},
              a,
              l,
              mb};
    emit(std::move(qn));
    OpSpec kn{nm("k_norm"),
              Kernel::rmsnorm_bwd,
              OpKind::elementwise,
              Category::backward,
              kCompute,
              -1,
              {s.k_pre, value_of(pname(l, "attn.k_norm"), wr, br), s.k_rstd, dk},
              {dkp, grad("attn.k_norm")},
              a,
              l,
              mb};
    emit(std::move(kn));
    dq = dqp;
    dk = dkp;
  }
  const int dxg = tensor(nm("d attn input"), {ng_, h_}, TensorRole::activation);
  matmul(nm("qkv_proj.dgrad"), {dq, dk, dv},
         {value_of(pname(l, "attn.wq"), w, b), value_of(pname(l, "attn.wk"), w, b),
          value_of(pname(l, "attn.wv"), w, b)},
         {dxg}, false, true, false, Category::backward, l, mb);
  wgrad(nm("qkv_proj.wgrad"), {s.xg}, {dq, dk, dv},
        {grad("attn.wq"), grad("attn.wk"), grad("attn.wv")}, true, l, mb);
  const int dxn = collective(nm("attn_sp_scatter"), OpKind::reduce_scatter, Category::tp_comm, kTp,
                             g_tp_, dxg, {n_, h_}, TensorRole::activation, l, mb);
  const int dxa = tensor(nm("d attn norm input"), {n_, h_}, TensorRole::activation);
  sim::Attrs a = norm_attrs();
  a.accumulate = true;
  emit(OpSpec{nm("attn_norm"),
              Kernel::rmsnorm_bwd,
              OpKind::elementwise,
              Category::backward,
              kCompute,
              -1,
              {s.x, value_of(pname(l, "attn.norm"), wr, br), s.rstd, dxn},
              {dxa, grad("attn.norm")},
              a,
              l,
              mb});
  const int dx = tensor(nm("d layer input"), {n_, h_}, TensorRole::activation);
  simple(nm("attn_residual"), Kernel::add, {dxa, dy}, {dx}, Category::backward, l, mb);
  return dx;
}

// --- dense MLP -----------------------------------------------------------------------------------

// RMSNorm, SP all-gather over the dense TP group, column-parallel gate|up (one fused GEMM),
// SwiGLU, row-parallel down, reduce-scatter, residual.
int Builder::dense_forward(int l, int mb, int x, MlpSaved& s) {
  auto nm = [&](const char* what) { return fmt::format("L{}.{}.mb{}", l, what, mb); };
  const int b = bucket_of_param(pname(l, "mlp.gate"));
  const int br = bucket_of_param(pname(l, "mlp.norm"));
  const std::vector<int> w = use_bucket(b, "fwd", l, mb);
  const std::vector<int> wr = use_bucket(br, "fwd", l, mb);
  s.x = x;
  const int xn = tensor(nm("mlp_norm"), {n_, h_}, TensorRole::activation);
  s.rstd = tensor(nm("mlp_norm rstd"), {n_}, TensorRole::saved, Element::real, sim::Dtype::fp32);
  simple(nm("mlp_norm"), Kernel::rmsnorm_fwd, {x, value_of(pname(l, "mlp.norm"), wr, br)},
         {xn, s.rstd}, Category::forward, l, mb, norm_attrs());
  s.xg = collective(nm("mlp_sp_gather"), OpKind::all_gather, Category::tp_comm, kTp, g_dtp_, xn,
                    {rows_d_, h_}, TensorRole::saved, l, mb);
  s.gu = tensor(nm("gate_up"), {rows_d_, 2 * f_}, TensorRole::saved);
  matmul(nm("mlp_gate_up"), {s.xg},
         {value_of(pname(l, "mlp.gate"), w, b), value_of(pname(l, "mlp.up"), w, b)}, {s.gu}, false,
         false, false, Category::forward, l, mb);
  s.act = tensor(nm("mlp act"), {rows_d_, f_}, TensorRole::saved);
  simple(nm("mlp_act"), Kernel::swiglu_fwd, {s.gu}, {s.act}, Category::forward, l, mb);
  const int out = tensor(nm("mlp out"), {rows_d_, h_}, TensorRole::activation);
  matmul(nm("mlp_down"), {s.act}, {value_of(pname(l, "mlp.down"), w, b)}, {out}, false, false,
         false, Category::forward, l, mb);
  const int y = collective(nm("mlp_sp_scatter"), OpKind::reduce_scatter, Category::tp_comm, kTp,
                           g_dtp_, out, {n_, h_}, TensorRole::activation, l, mb);
  const int o = tensor(nm("mlp residual"), {n_, h_}, TensorRole::activation);
  simple(nm("mlp_residual"), Kernel::add, {x, y}, {o}, Category::forward, l, mb);
  return o;
}

int Builder::dense_backward(int l, int mb, const MlpSaved& s, int dy) {
  auto nm = [&](const char* what) { return fmt::format("L{}.{}.mb{}.bwd", l, what, mb); };
  const int b = bucket_of_param(pname(l, "mlp.gate"));
  const int br = bucket_of_param(pname(l, "mlp.norm"));
  const std::vector<int> w = use_bucket(b, "bwd", l, mb);
  const std::vector<int> wr = use_bucket(br, "bwd", l, mb);
  auto grad = [&](const char* role) {
    return pt_[static_cast<std::size_t>(find_param(pname(l, role)))].grad;
  };
  const int dyg = collective(nm("mlp_sp_gather"), OpKind::all_gather, Category::tp_comm, kTp,
                             g_dtp_, dy, {rows_d_, h_}, TensorRole::activation, l, mb);
  const int dact = tensor(nm("d mlp act"), {rows_d_, f_}, TensorRole::activation);
  matmul(nm("mlp_down.dgrad"), {dyg}, {value_of(pname(l, "mlp.down"), w, b)}, {dact}, false, true,
         false, Category::backward, l, mb);
  wgrad(nm("mlp_down.wgrad"), {s.act}, {dyg}, {grad("mlp.down")}, true, l, mb);
  const int dgu = tensor(nm("d gate_up"), {rows_d_, 2 * f_}, TensorRole::activation);
  simple(nm("mlp_act"), Kernel::swiglu_bwd, {s.gu, dact}, {dgu}, Category::backward, l, mb);
  const int dxg = tensor(nm("d mlp input"), {rows_d_, h_}, TensorRole::activation);
  matmul(nm("mlp_gate_up.dgrad"), {dgu},
         {value_of(pname(l, "mlp.gate"), w, b), value_of(pname(l, "mlp.up"), w, b)}, {dxg}, false,
         true, false, Category::backward, l, mb);
  wgrad(nm("mlp_gate_up.wgrad"), {s.xg}, {dgu}, {grad("mlp.gate"), grad("mlp.up")}, true, l, mb);
  const int dxn = collective(nm("mlp_sp_scatter"), OpKind::reduce_scatter, Category::tp_comm, kTp,
                             g_dtp_, dxg, {n_, h_}, TensorRole::activation, l, mb);
  const int dxa = tensor(nm("d mlp norm input"), {n_, h_}, TensorRole::activation);
  sim::Attrs a = norm_attrs();
  a.accumulate = true;
  emit(OpSpec{nm("mlp_norm"),
              Kernel::rmsnorm_bwd,
              OpKind::elementwise,
              Category::backward,
              kCompute,
              -1,
              {s.x, value_of(pname(l, "mlp.norm"), wr, br), s.rstd, dxn},
              {dxa, grad("mlp.norm")},
              a,
              l,
              mb});
  const int dx = tensor(nm("d mlp block input"), {n_, h_}, TensorRole::activation);
  simple(nm("mlp_residual"), Kernel::add, {dxa, dy}, {dx}, Category::backward, l, mb);
  return dx;
}

// --- gradients and the optimizer -----------------------------------------------------------------

// Per bucket of the stage, after the last micro-batch's backward: the gradient sum over the
// ranks holding the same slices (an all-reduce under ZeRO 0-1, a reduce-scatter to the owned
// shard under ZeRO 2-3 and with HSDP an all-reduce of the shards across replicas), for tied
// embeddings under a pipeline an all-reduce with the other stage's copy, then AdamW over what
// the rank owns and, under ZeRO 1-2, an all-gather of the updated parameters.
void Builder::reduce_and_step() {
  for (std::size_t bi = 0; bi < s_.buckets.size(); ++bi) {
    if (!on_stage(static_cast<int>(bi)))
      continue;
    const sim::Bucket& bk = s_.buckets[bi];
    const BucketTensors& bt = bt_[bi];
    std::vector<int> grads, values;
    for (int p : bk.params) {
      grads.push_back(pt_[static_cast<std::size_t>(p)].grad);
      values.push_back(pt_[static_cast<std::size_t>(p)].value);
    }
    const int layer = bucket_keys_[bi].layer;
    auto comm = [&](std::string name, OpKind kind, int g, std::vector<int> in, std::vector<int> out,
                    Category cat) {
      if (g < 0)
        return;
      emit(OpSpec{std::move(name),
                  Kernel::collective,
                  kind,
                  cat,
                  kDp,
                  g,
                  std::move(in),
                  std::move(out),
                  {},
                  layer,
                  -1});
    };
    std::vector<int> owned_grads = grads;
    if (bk.zero <= 1) {
      comm(bk.name + ".grad_all_reduce", OpKind::all_reduce, group(group_name(bk.grads), bk.grads),
           grads, grads, Category::dp_comm);
    } else {
      comm(bk.name + ".grad_reduce_scatter", OpKind::reduce_scatter,
           group(group_name(bk.shard), bk.shard), grads, {bt.grad_shard}, Category::dp_comm);
      if (!bk.replicas.dims.empty())
        comm(bk.name + ".grad_replica_all_reduce", OpKind::all_reduce,
             group(group_name(bk.replicas), bk.replicas), {bt.grad_shard}, {bt.grad_shard},
             Category::dp_comm);
      owned_grads = {bt.grad_shard};
    }
    if (!bk.tied.dims.empty())
      comm(bk.name + ".tied_grad_all_reduce", OpKind::all_reduce, g_tied_, owned_grads, owned_grads,
           Category::dp_comm);
    OpSpec adam;
    adam.name = bk.name + ".adamw";
    adam.kernel = Kernel::adamw;
    adam.category = Category::optimizer;
    adam.layer = layer;
    if (bk.zero >= 3) {
      adam.in = {bt.shard, bt.grad_shard, bt.m, bt.v};
      adam.out = {bt.shard, bt.m, bt.v};
      adam.attrs.params = 1;
      emit(std::move(adam));
      continue;
    }
    adam.in = values;
    adam.in.insert(adam.in.end(), owned_grads.begin(), owned_grads.end());
    adam.in.push_back(bt.m);
    adam.in.push_back(bt.v);
    adam.attrs.params = static_cast<int>(values.size());
    if (bk.zero == 0) {
      adam.out = values;
      adam.out.push_back(bt.m);
      adam.out.push_back(bt.v);
      emit(std::move(adam));
      continue;
    }
    const int updated =
        tensor(bk.name + ".updated_shard", {chunk(static_cast<int>(bi))}, TensorRole::comm_buffer);
    rc_->tensors.back().bucket = static_cast<int>(bi);
    adam.out = {updated, bt.m, bt.v};
    emit(std::move(adam));
    comm(bk.name + ".param_all_gather", OpKind::all_gather, group(group_name(bk.shard), bk.shard),
         {updated}, values, Category::dp_comm);
  }
}

// --- the pipeline --------------------------------------------------------------------------------

// Pipeline neighbours, as the CPU executor pairs them: forward activations go to the next virtual
// stage (the next stage, or from the last stage to the first for the next chunk), gradients
// come back the same way.
int Builder::neighbour(int chunk, bool fwd, bool sending, int* peer_chunk) const {
  const int dir = (fwd == sending) ? +1 : -1; // towards later virtual stages?
  int ps = stage_ + dir, pc = chunk;
  if (ps == p_.pp) {
    ps = 0;
    pc = chunk + 1;
  } else if (ps < 0) {
    ps = p_.pp - 1;
    pc = chunk - 1;
  }
  *peer_chunk = pc;
  return ps;
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
  make_state();
  const int micro = p_.micro_batches();
  const int layers = static_cast<int>(m_.num_layers());
  saved_.assign(static_cast<std::size_t>(layers),
                std::vector<LayerSaved>(static_cast<std::size_t>(micro)));
  head_.assign(static_cast<std::size_t>(micro), {});
  ids_.assign(static_cast<std::size_t>(micro), -1);
  labels_.assign(static_cast<std::size_t>(micro), -1);
  const bool first = stage == 0, last = stage == p_.pp - 1;
  auto forward = [&](int mb, int chunk) {
    const auto v = static_cast<std::size_t>(chunk * p_.pp + stage);
    int x = first && chunk == 0 ? embed_forward(mb) : recv_activation(mb, chunk, true);
    for (int l = bounds_[v]; l < bounds_[v + 1]; ++l) {
      LayerSaved& sv = saved_[static_cast<std::size_t>(l)][static_cast<std::size_t>(mb)];
      x = attn_forward(l, mb, x, sv.a);
      x = dense_forward(l, mb, x, sv.m);
    }
    if (last && chunk == chunks_ - 1)
      head_forward(mb, x);
    else
      send_activation(mb, chunk, x, true);
  };
  auto backward = [&](int mb, int chunk) {
    const auto v = static_cast<std::size_t>(chunk * p_.pp + stage);
    int dx = last && chunk == chunks_ - 1 ? head_backward(mb) : recv_activation(mb, chunk, false);
    for (int l = bounds_[v + 1] - 1; l >= bounds_[v]; --l) {
      const LayerSaved& sv = saved_[static_cast<std::size_t>(l)][static_cast<std::size_t>(mb)];
      dx = dense_backward(l, mb, sv.m, dx);
      dx = attn_backward(l, mb, sv.a, dx);
    }
    if (first && chunk == 0)
      embed_backward(mb, dx);
    else
      send_activation(mb, chunk, dx, false);
  };
  defer_wgrad_ = strategy::defers_weight_gradients(p_);
  strategy::play_pipeline(
      p_, stage, [&] { flush_wgrad(); }, forward, backward);
  defer_wgrad_ = false;
  reduce_and_step();
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
  s_.tokens.cp_balanced = p_.attention.cp > 1 && p_.attention.cp_kind == strategy::CpKind::ring;
  g_tp_ = group("attention.tp", strategy::tp_group());
  g_dtp_ = group("dense.tp", strategy::dense_tp_group());
  g_etp_ = group("embed.tp", strategy::embed_tp_group());
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
    derive_dependencies(rc);
    derive_liveness(rc);
  }
  s_.model_flops_per_step = flops;
  return s_;
}

} // namespace

void check_programmable(const Plan& p, const ProgramContext& c) {
  if (c.model == nullptr || c.seq <= 0)
    throw InputError("lowering needs a model and a positive sequence length.");
  const workload::ModelSpec& m = *c.model;
  if (m.is_moe())
    not_yet("Mixture-of-Experts layers");
  if (m.attention.kind != workload::AttentionKind::gqa)
    not_yet("multi-head latent attention");
  if (p.attention.cp > 1)
    not_yet("context parallelism");
  for (auto r : p.recompute)
    if (r != strategy::Recompute::none)
      not_yet("recompute");
  if (p.activation_offload > 0)
    not_yet("activation offload");
  if (p.optimizer_on_host || p.params == strategy::Placement::host ||
      p.grads == strategy::Placement::host)
    not_yet("host placement of the optimizer, parameters or gradients");
  const int any_tp = std::max({p.attention.tp, p.dense.tp, p.embed.tp});
  if (any_tp > 1 && !p.attention.sp)
    not_yet("tensor parallelism without sequence parallelism");
  const std::int64_t rows = p.micro_batch * (c.seq / p.attention.cp);
  if (rows % p.attention.tp != 0)
    throw InputError(fmt::format("the {} tokens of a micro-batch do not split over tp {}", rows,
                                 p.attention.tp));
  if (m.attention.num_heads % p.attention.tp != 0 || m.attention.num_kv_heads % p.attention.tp != 0)
    not_yet("key/value heads replicated over tensor-parallel ranks");
  if (m.dense_mlp.intermediate_size % p.dense.tp != 0)
    throw InputError(fmt::format("dense tp {} does not divide the MLP width {}", p.dense.tp,
                                 m.dense_mlp.intermediate_size));
  if (m.vocab_size % p.embed.tp != 0)
    throw InputError(
        fmt::format("embedding tp {} does not divide the vocabulary {}", p.embed.tp, m.vocab_size));
  if (p.global_batch <= 0 || p.micro_batches() < 1)
    throw InputError("the plan has no micro-batch per step");
  const auto bounds = strategy::virtual_stage_bounds(p, static_cast<int>(m.num_layers()));
  for (std::size_t v = 0; v + 1 < bounds.size(); ++v)
    if (bounds[v + 1] <= bounds[v])
      throw InputError(fmt::format("virtual pipeline stage {} holds no layer ({} layers over {} "
                                   "stages)",
                                   v, m.num_layers(), bounds.size() - 1));
}

sim::Schedule lower_program(const Plan& p, const ProgramContext& c) {
  check_programmable(p, c);
  return Builder(p, c).run();
}

} // namespace mop::lowering
