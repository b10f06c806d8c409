#include "strategies/lower.hpp"
#include "strategies/mesh.hpp"
#include "strategies/pipeline.hpp"

#include "common/error.hpp"
#include "workload/flops.hpp"
#include "workload/params.hpp"

#include <algorithm>
#include <cmath>
#include <fmt/format.h>
#include <numeric>

namespace mop::strategy {

using sim::Category;
using sim::OpKind;
using workload::AttentionKind;
using workload::LayerSpec;
using workload::MlpKind;
using workload::ModelSpec;

namespace {

enum Stream { kCompute, kTp, kCp, kEp, kDp, kPp, kH2d, kD2h, kHost, kNumStreams };
const char* const kStreamNames[kNumStreams] = {"compute",  "comm.tp",  "comm.cp",
                                               "comm.ep",  "comm.dp",  "comm.pp",
                                               "copy.h2d", "copy.d2h", "host"};

// Bytes per element (mixed precision, as the memory model counts them).
constexpr double kAct = 2;  // BF16 activations and weights
constexpr double kGrad = 4; // FP32 gradients reduced
// AdamW on the GPU reads BF16 param, FP32 grad, master, m, v and writes master, m, v, BF16 param.
constexpr double kAdamBytesPerParam = 2 + 4 + 4 + 4 + 4 + 4 + 4 + 4 + 2;

// The communicators a plan uses, as indices into Schedule::groups (-1: not used).
struct Groups {
  int tp = -1, cp_a2a = -1, cp_ring = -1, ep = -1, etp = -1, pp = -1;
  int fsdp[kNumLayerKinds] = {-1, -1, -1, -1};
};

// One forward operation of a layer as the lowering emits it; backward is derived from it.
struct Step {
  std::string name;
  OpKind kind = OpKind::elementwise;
  Category comm_category = Category::forward; // for collectives
  int stream = kCompute;
  sim::GemmShape gemm;
  sim::AttentionShape attention;
  double bytes = 0;
  int group = -1;
  double flops = 0;      // forward model FLOPs
  int ring_steps = 0;    // > 0: ring attention over this many steps (attention shape per step)
  double ring_bytes = 0; // K/V bytes passed per ring step
  bool selective_keep = false; // recomputed under selective recompute
};

Step make_step(std::string name, OpKind kind, Category comm_category = Category::forward,
               int stream = kCompute) {
  Step st;
  st.name = std::move(name);
  st.kind = kind;
  st.comm_category = comm_category;
  st.stream = stream;
  return st;
}

double attention_flops(const sim::AttentionShape& a) {
  const double pairs =
      a.causal ? a.batch * workload::attended_pairs(static_cast<std::int64_t>(a.q_len),
                                                    static_cast<std::int64_t>(a.window))
               : a.batch * a.q_len * (a.window > 0 ? std::min(a.window, a.kv_len) : a.kv_len);
  return 2 * pairs * a.heads * (a.qk_head_dim + a.v_head_dim);
}

class Lowering {
public:
  Lowering(const Plan& p, const LoweringContext& c) : p_(p), c_(c), m_(*c.model) {
    tokens_ = static_cast<double>(p.micro_batch) * static_cast<double>(c.seq) / p.attention.cp;
    sp_ = p.attention.sp && p.attention.tp > 1 ? p.attention.tp : 1;
    make_groups();
  }

  sim::Schedule run();
  std::vector<ForwardKernel> forward_kernels(const LayerSpec& layer);

private:
  const Plan& p_;
  const LoweringContext& c_;
  const ModelSpec& m_;
  double tokens_ = 0; // tokens of one micro-batch on a rank (sequence split over CP)
  int sp_ = 1;        // sequence-parallel divisor of norm/residual regions
  sim::Schedule s_;
  Groups g_;

  // Per-class building state.
  sim::RankClass* rc_ = nullptr;
  int cursor_ = -1; // the op the next op on the data path waits for
  // Zero-bubble (ZB-H1): weight-gradient GEMMs are held back and placed where the stage would
  // otherwise wait, after the next recv; each keeps its dependency on its input-gradient GEMM.
  bool defer_wgrad_ = false;
  std::vector<sim::Op> pending_wgrad_;

  void make_groups();
  std::vector<Step> layer_steps(const LayerSpec& layer) const;
  int add(sim::Op op, bool on_path = true);
  int tensor(std::string name, double bytes, sim::Device device, sim::MemoryKind kind,
             bool resident = false);
  int emit_forward(const Step& st, const std::string& prefix, Category category, int layer, int mb);
  void emit_backward(const Step& st, const std::string& prefix, int layer, int mb);
  int emit_attention(const Step& st, const std::string& prefix, Category category, int layer,
                     int mb, bool backward);
  void emit_wgrad(sim::Op wgrad);
  sim::Op host_adam_op(std::string name, double params, int layer) const;
  sim::Op pipeline_op(std::string name, OpKind kind, int peer, int mb, double bytes) const;
  sim::Op op_of(const Step& st, const std::string& name, Category category, int layer, int mb);
};

void Lowering::make_groups() {
  const int gpn = c_.gpus_per_node;
  s_.mesh = plan_mesh(p_, gpn);
  auto add_group_p2p = [&](std::string name, int per_node) {
    s_.groups.push_back(sim::Group{std::move(name), 2, per_node, {}});
    return static_cast<int>(s_.groups.size()) - 1;
  };
  auto add_group = [&](std::string name, sim::GroupSpec spec) {
    const sim::MeshView& v = s_.mesh.view(spec.view);
    s_.groups.push_back(sim::Group{std::move(name), v.group_size(spec), v.ranks_per_node(spec, gpn),
                                   std::move(spec)});
    return static_cast<int>(s_.groups.size()) - 1;
  };
  const CpSplit cp = cp_split(p_, gpn);
  if (p_.attention.tp > 1)
    g_.tp = add_group("tp", tp_group());
  if (cp.ulysses > 1)
    g_.cp_a2a = add_group("cp.ulysses", cp_ulysses_group());
  if (cp.ring > 1)
    g_.cp_ring = add_group("cp.ring", cp_ring_group());
  if (p_.moe.ep > 1)
    g_.ep = add_group("ep", ep_group());
  if (p_.moe.etp > 1)
    g_.etp = add_group("etp", etp_group());
  for (int k = 0; k < kNumLayerKinds; ++k) {
    const auto kind = static_cast<LayerKind>(k);
    sim::GroupSpec spec = shard_group(p_, kind);
    if (s_.mesh.view(spec.view).group_size(spec) > 1)
      g_.fsdp[k] = add_group(fmt::format("dp.{}", layer_kind_name(kind)), std::move(spec));
  }
  if (p_.pp > 1) {
    // Point to point between adjacent stages at the same place in each: on one node when
    // both stages' ranks fit in it.
    const int per_stage = p_.world / p_.pp;
    g_.pp = add_group_p2p("pp", per_stage >= gpn ? 1 : (2 * per_stage <= gpn ? 2 : 1));
  }
}

std::vector<Step> Lowering::layer_steps(const LayerSpec& layer) const {
  std::vector<Step> out;
  const workload::AttentionSpec& a = m_.attention;
  const double h = static_cast<double>(m_.hidden_size);
  const double tp = p_.attention.tp;
  const double t = tokens_;
  const double heads = static_cast<double>(a.num_heads) / tp;
  const double kv_heads = a.kind == AttentionKind::mla
                              ? heads
                              : std::max(1.0, static_cast<double>(a.num_kv_heads) / tp);
  const double dqk = static_cast<double>(a.qk_head_dim());
  const double dv = static_cast<double>(a.v_dim());
  auto gemm = [&](std::string name, double m, double n, double k) {
    Step st = make_step(std::move(name), OpKind::gemm);
    st.gemm = sim::GemmShape{m, n, k, 1, {}};
    st.flops = 2 * m * n * k;
    out.push_back(std::move(st));
  };
  auto elementwise = [&](std::string name, double bytes, bool recomputed_by_selective) {
    Step st = make_step(std::move(name), OpKind::elementwise);
    st.bytes = bytes;
    st.selective_keep = recomputed_by_selective;
    out.push_back(std::move(st));
  };
  auto collective = [&](std::string name, OpKind kind, Category cat, int stream, int group,
                        double bytes) {
    if (group < 0)
      return;
    Step st = make_step(std::move(name), kind, cat, stream);
    st.group = group;
    st.bytes = bytes;
    out.push_back(std::move(st));
  };
  const int tp_group = g_.tp;
  const bool sp = p_.attention.sp;
  // --- attention block ---
  elementwise("attn_norm", 2 * kAct * t * h / sp_, true);
  // TP with SP: gather the sequence-sharded input; the size is the gathered buffer.
  if (sp)
    collective("attn_sp_gather", OpKind::all_gather, Category::tp_comm, kTp, tp_group,
               kAct * t * h);
  // Work replicated across TP ranks (K/V heads when TP exceeds them, MLA's unsplit down
  // projections) runs on every rank but counts once in the model FLOPs.
  auto replicated = [&](double share) { out.back().flops *= share; };
  if (a.kind == AttentionKind::gqa) {
    gemm("qkv_proj", t, (heads + 2 * kv_heads) * dqk, h);
    const double kv_true = static_cast<double>(a.num_kv_heads) / tp; // may be below 1
    out.back().flops = 2 * t * h * (heads + 2 * kv_true) * dqk;
  } else {
    const double qr = static_cast<double>(a.q_lora_rank);
    const double kvr = static_cast<double>(a.kv_lora_rank);
    const double rope = static_cast<double>(a.qk_rope_head_dim);
    const double nope = static_cast<double>(a.qk_nope_head_dim);
    if (a.q_lora_rank > 0) {
      gemm("q_a_proj", t, qr, h);
      replicated(1 / tp);
      gemm("q_b_proj", t, heads * dqk, qr);
    } else {
      gemm("q_proj", t, heads * dqk, h);
    }
    gemm("kv_a_proj", t, kvr + rope, h);
    replicated(1 / tp);
    gemm("kv_b_proj", t, heads * (nope + dv), kvr);
  }
  elementwise("rope_qk_norm", 2 * kAct * t * (heads + kv_heads) * dqk, true);
  // Context parallelism.
  const double seq = static_cast<double>(c_.seq);
  const double b = p_.micro_batch;
  const double window = static_cast<double>(layer.window);
  const int ulysses = g_.cp_a2a >= 0 ? s_.groups[static_cast<std::size_t>(g_.cp_a2a)].ranks : 1;
  const int ring = g_.cp_ring >= 0 ? s_.groups[static_cast<std::size_t>(g_.cp_ring)].ranks : 1;
  const double qkv_bytes = kAct * t * (heads * dqk + kv_heads * (dqk + dv));
  if (ulysses > 1)
    collective("ulysses_qkv_a2a", OpKind::all_to_all, Category::cp_comm, kCp, g_.cp_a2a, qkv_bytes);
  {
    // After Ulysses each rank holds heads/u of the sequence's ring chunk (ring·tokens... the
    // tokens of u ranks): queries per rank u·t, heads/u.
    Step st = make_step("attn_core", OpKind::attention_fwd);
    const double q_len = seq / ring;
    st.attention = sim::AttentionShape{
        b, heads / ulysses, std::max(1.0, kv_heads / ulysses), q_len, q_len, dqk, dv, true, window};
    sim::AttentionShape whole_sequence = st.attention; // this rank's share of the whole
    whole_sequence.q_len = whole_sequence.kv_len = seq;
    whole_sequence.batch = b / ring;
    if (ring > 1 && window > 0 && window <= q_len) {
      // A sliding window shorter than a chunk needs no ring: the previous rank's last `window`
      // keys and values arrive once (a halo), then the chunk attends locally.
      Step halo = make_step("window_halo", OpKind::send_recv, Category::cp_comm, kCp);
      halo.group = g_.cp_ring;
      halo.bytes = kAct * b * window * std::max(1.0, kv_heads / ulysses) * (dqk + dv);
      out.push_back(std::move(halo));
      st.flops = attention_flops(whole_sequence);
    } else if (ring > 1) {
      // Load-balanced ring (2·ring chunks): each of `ring` steps computes its queries against
      // half a chunk of keys on average; K and V of one chunk pass to the next rank per step.
      // (A window longer than a chunk is priced as full attention: an upper bound.)
      st.ring_steps = ring;
      st.attention = sim::AttentionShape{b,     heads / ulysses, std::max(1.0, kv_heads / ulysses),
                                         q_len, q_len / 2,       dqk,
                                         dv,    false,           0};
      st.ring_bytes = kAct * b * q_len * std::max(1.0, kv_heads / ulysses) * (dqk + dv);
      st.flops = attention_flops(whole_sequence);
    } else {
      st.flops = attention_flops(st.attention);
    }
    st.selective_keep = true;
    out.push_back(std::move(st));
  }
  if (ulysses > 1)
    collective("ulysses_out_a2a", OpKind::all_to_all, Category::cp_comm, kCp, g_.cp_a2a,
               kAct * t * heads * dv);
  gemm("o_proj", t, h, heads * dv);
  if (sp)
    collective("attn_sp_scatter", OpKind::reduce_scatter, Category::tp_comm, kTp, tp_group,
               kAct * t * h);
  else
    collective("attn_tp_reduce", OpKind::all_reduce, Category::tp_comm, kTp, tp_group,
               kAct * t * h);
  elementwise("attn_residual", 3 * kAct * t * h / sp_, false);
  // --- MLP block ---
  elementwise("mlp_norm", 2 * kAct * t * h / sp_, true);
  if (layer.mlp == MlpKind::dense) {
    const double dtp = p_.dense.tp;
    const double inter = static_cast<double>(m_.dense_mlp.intermediate_size) / dtp;
    const double up = (m_.dense_mlp.gated ? 2 : 1) * inter;
    if (sp)
      collective("mlp_sp_gather", OpKind::all_gather, Category::tp_comm, kTp, tp_group,
                 kAct * t * h);
    gemm("mlp_gate_up", t, up, h);
    elementwise("mlp_act", 3 * kAct * t * inter, true);
    gemm("mlp_down", t, h, inter);
    if (sp)
      collective("mlp_sp_scatter", OpKind::reduce_scatter, Category::tp_comm, kTp, tp_group,
                 kAct * t * h);
    else
      collective("mlp_tp_reduce", OpKind::all_reduce, Category::tp_comm, kTp, tp_group,
                 kAct * t * h);
  } else {
    const workload::MoeSpec& e = m_.moe;
    const double tm = t / sp_; // tokens entering the MoE block on this rank
    const double experts = static_cast<double>(e.num_routed_experts);
    const double k = static_cast<double>(e.experts_per_token);
    gemm("router", tm, experts, h);
    elementwise("router_topk", kAct * tm * experts, false);
    // Dispatch: every token copy goes to its expert's rank (balanced routing).
    const double routed = tm * k;
    collective("ep_dispatch", OpKind::all_to_all, Category::ep_comm, kEp, g_.ep, kAct * routed * h);
    const double local_experts = experts / p_.moe.ep;
    const double inter = static_cast<double>(e.expert_intermediate_size) / p_.moe.etp;
    // Expert tensor parallelism: the etp ranks of an expert see the tokens of all of them, each
    // computing 1/etp of the expert's width.
    const double expert_rows = routed * p_.moe.etp;
    {
      Step st = make_step("experts_gate_up", OpKind::grouped_gemm);
      st.gemm.rows_per_expert.assign(static_cast<std::size_t>(local_experts),
                                     expert_rows / local_experts);
      st.gemm.n = (e.gated ? 2 : 1) * inter;
      st.gemm.k = h;
      st.gemm.m = expert_rows;
      st.flops = 2 * expert_rows * st.gemm.n * h;
      out.push_back(std::move(st));
    }
    elementwise("experts_act", 3 * kAct * expert_rows * inter, true);
    {
      Step st = make_step("experts_down", OpKind::grouped_gemm);
      st.gemm.rows_per_expert.assign(static_cast<std::size_t>(local_experts),
                                     expert_rows / local_experts);
      st.gemm.n = h;
      st.gemm.k = inter;
      st.gemm.m = expert_rows;
      st.flops = 2 * expert_rows * h * inter;
      out.push_back(std::move(st));
    }
    collective("etp_reduce", OpKind::all_reduce, Category::ep_comm, kEp, g_.etp, kAct * routed * h);
    collective("ep_combine", OpKind::all_to_all, Category::ep_comm, kEp, g_.ep, kAct * routed * h);
    elementwise("experts_combine", kAct * routed * h + kAct * tm * h, false);
    if (e.num_shared_experts > 0) {
      // Shared experts are a dense MLP under the dense TP (Megatron-Core): on the gathered
      // sequence with the width split, between the SP gather and scatter.
      const double shared =
          static_cast<double>(e.num_shared_experts * e.shared_intermediate_size) / p_.dense.tp;
      if (sp)
        collective("shared_sp_gather", OpKind::all_gather, Category::tp_comm, kTp, tp_group,
                   kAct * t * h);
      gemm("shared_gate_up", t, (e.gated ? 2 : 1) * shared, h);
      elementwise("shared_act", 3 * kAct * t * shared, true);
      gemm("shared_down", t, h, shared);
      if (sp)
        collective("shared_sp_scatter", OpKind::reduce_scatter, Category::tp_comm, kTp, tp_group,
                   kAct * t * h);
    }
  }
  elementwise("mlp_residual", 3 * kAct * t * h / sp_, false);
  return out;
}

int Lowering::tensor(std::string name, double bytes, sim::Device device, sim::MemoryKind kind,
                     bool resident) {
  rc_->tensors.push_back(sim::cost_tensor(std::move(name), bytes, device, kind, resident));
  return static_cast<int>(rc_->tensors.size()) - 1;
}

int Lowering::add(sim::Op op, bool on_path) {
  if (on_path && cursor_ >= 0)
    op.deps.push_back(cursor_);
  std::sort(op.deps.begin(), op.deps.end());
  op.deps.erase(std::unique(op.deps.begin(), op.deps.end()), op.deps.end());
  rc_->ops.push_back(std::move(op));
  const int i = static_cast<int>(rc_->ops.size()) - 1;
  if (on_path)
    cursor_ = i;
  return i;
}

sim::Op Lowering::op_of(const Step& st, const std::string& name, Category category, int layer,
                        int mb) {
  sim::Op op;
  op.name = name;
  op.kind = st.kind;
  op.category = sim::is_collective(st.kind) ? st.comm_category : category;
  op.stream = st.stream;
  op.gemm = st.gemm;
  op.attention = st.attention;
  op.bytes = st.bytes;
  op.group = st.group;
  op.layer = layer;
  op.micro_batch = mb;
  op.model_flops = category == Category::forward ? st.flops : 0;
  if (st.kind == OpKind::gemm || st.kind == OpKind::grouped_gemm)
    op.dtype = c_.gemm_dtype;
  return op;
}

// Attention over `steps` ring steps (1: a plain call). Step i computes on the K/V chunk that
// arrived in step i-1 while step i's chunk travels on the CP stream; backward passes K/V and
// their gradients (twice the bytes) and runs flash attention's backward.
int Lowering::emit_attention(const Step& st, const std::string& prefix, Category category,
                             int layer, int mb, bool backward) {
  const int steps = std::max(1, st.ring_steps);
  const int start = cursor_;
  int prev_comm = -1, last = -1;
  for (int i = 0; i < steps; ++i) {
    int comm_index = -1;
    if (i + 1 < steps) {
      sim::Op comm;
      comm.name = fmt::format("{}.{}.{}", prefix, backward ? "ring_dkv" : "ring_kv", i);
      comm.kind = OpKind::send_recv;
      comm.category = Category::cp_comm;
      comm.stream = kCp;
      comm.bytes = (backward ? 2 : 1) * st.ring_bytes;
      comm.group = g_.cp_ring;
      comm.layer = layer;
      comm.micro_batch = mb;
      if (start >= 0)
        comm.deps.push_back(start);
      if (prev_comm >= 0)
        comm.deps.push_back(prev_comm);
      comm_index = add(std::move(comm), false);
    }
    const std::string name = steps > 1 ? fmt::format("{}{}.{}", prefix, backward ? ".bwd" : "", i)
                                       : prefix + (backward ? ".bwd" : "");
    sim::Op compute = op_of(st, name, category, layer, mb);
    if (backward) {
      compute.kind = OpKind::attention_bwd;
      compute.model_flops = 2 * st.flops / steps;
    } else {
      compute.model_flops = category == Category::forward ? st.flops / steps : 0;
    }
    if (prev_comm >= 0)
      compute.deps.push_back(prev_comm);
    last = add(std::move(compute));
    prev_comm = comm_index;
  }
  return last;
}

int Lowering::emit_forward(const Step& st, const std::string& prefix, Category category, int layer,
                           int mb) {
  if (st.kind == OpKind::attention_fwd)
    return emit_attention(st, prefix, category, layer, mb, false);
  return add(op_of(st, prefix, category, layer, mb));
}

// A pipeline send (of `bytes`) or recv between this stage and rank class `peer`.
sim::Op Lowering::pipeline_op(std::string name, OpKind kind, int peer, int mb, double bytes) const {
  sim::Op op;
  op.name = std::move(name);
  op.kind = kind;
  op.category = Category::pp_comm;
  op.stream = kPp;
  op.bytes = kind == OpKind::send ? bytes : 0;
  op.group = g_.pp;
  op.peer_class = peer;
  op.micro_batch = mb;
  return op;
}

// AdamW over `params` parameters on the host CPU, with the plan's optimizer implementation.
sim::Op Lowering::host_adam_op(std::string name, double params, int layer) const {
  sim::Op adam;
  adam.name = std::move(name);
  adam.kind = OpKind::host_adam;
  adam.torch_kernel = p_.torch_host_optimizer;
  adam.category = Category::optimizer;
  adam.stream = kHost;
  adam.params = params;
  adam.layer = layer;
  return adam;
}

void Lowering::emit_wgrad(sim::Op wgrad) {
  if (defer_wgrad_) {
    wgrad.deps.push_back(cursor_);
    pending_wgrad_.push_back(std::move(wgrad));
  } else {
    add(std::move(wgrad));
  }
}

void Lowering::emit_backward(const Step& st, const std::string& prefix, int layer, int mb) {
  switch (st.kind) {
  case OpKind::gemm: {
    // dX = dY·Wᵀ (m x k over n) and dW = Xᵀ·dY (k x n over m): twice the forward FLOPs.
    sim::Op dgrad = op_of(st, prefix + ".dgrad", Category::backward, layer, mb);
    dgrad.gemm = sim::GemmShape{st.gemm.m, st.gemm.k, st.gemm.n, st.gemm.instances, {}};
    dgrad.model_flops = st.flops;
    add(std::move(dgrad));
    sim::Op wgrad = op_of(st, prefix + ".wgrad", Category::backward, layer, mb);
    wgrad.gemm = sim::GemmShape{st.gemm.k, st.gemm.n, st.gemm.m, st.gemm.instances, {}};
    wgrad.model_flops = st.flops;
    emit_wgrad(std::move(wgrad));
    return;
  }
  case OpKind::grouped_gemm: {
    sim::Op dgrad = op_of(st, prefix + ".dgrad", Category::backward, layer, mb);
    dgrad.gemm.n = st.gemm.k;
    dgrad.gemm.k = st.gemm.n;
    dgrad.model_flops = st.flops;
    add(std::move(dgrad));
    // Weight gradient per expert: (k x n) over that expert's rows; priced as the same grouped
    // shape with the reduction over rows (FLOPs equal).
    sim::Op wgrad = op_of(st, prefix + ".wgrad", Category::backward, layer, mb);
    wgrad.model_flops = st.flops;
    emit_wgrad(std::move(wgrad));
    return;
  }
  case OpKind::attention_fwd:
    emit_attention(st, prefix, Category::backward, layer, mb, true);
    return;
  case OpKind::elementwise: {
    sim::Op op = op_of(st, prefix + ".bwd", Category::backward, layer, mb);
    op.bytes = 2 * st.bytes; // reads saved input and incoming gradient, writes the gradient
    add(std::move(op));
    return;
  }
  case OpKind::all_gather: // the transpose of a gather is a reduce-scatter, and vice versa
  case OpKind::reduce_scatter:
  case OpKind::all_reduce:
  case OpKind::all_to_all:
  case OpKind::send_recv: { // a halo's gradients travel back the way it came
    sim::Op op = op_of(st, prefix + ".bwd", Category::backward, layer, mb);
    if (st.kind == OpKind::all_gather)
      op.kind = OpKind::reduce_scatter;
    else if (st.kind == OpKind::reduce_scatter)
      op.kind = OpKind::all_gather;
    add(std::move(op));
    return;
  }
  default:
    return;
  }
}

sim::Schedule Lowering::run() {
  const int L = static_cast<int>(m_.num_layers());
  const int micro = p_.micro_batches();
  const double h = static_cast<double>(m_.hidden_size);
  const MemoryReport mem = analyze_memory(m_, p_, c_.seq, c_.hw, c_.activations);
  s_.world = p_.world;
  s_.gpus_per_node = c_.gpus_per_node;
  s_.tokens_per_step = static_cast<double>(p_.global_batch) * static_cast<double>(c_.seq);
  s_.classes.resize(static_cast<std::size_t>(p_.pp));
  // Pipeline bookkeeping: the op index of each stage's send for (micro-batch, direction), and
  // the recvs that wait for them, patched once every stage is built.
  // Indexed [stage][chunk * micro + micro-batch]; a chunk is one of the stage's vp virtual
  // stages (interleaved 1F1B), chunk 0 otherwise.
  const int vp = chunks_per_stage(p_);
  std::vector<std::vector<int>> send_fwd(
      static_cast<std::size_t>(p_.pp), std::vector<int>(static_cast<std::size_t>(micro * vp), -1));
  // Virtual stage v = chunk * pp + stage holds layers [virtual_begin[v], virtual_begin[v + 1]).
  const std::vector<int> virtual_begin = virtual_stage_bounds(p_, L);
  std::vector<std::vector<int>> send_bwd = send_fwd, recv_fwd = send_fwd, recv_bwd = send_fwd;
  const double pp_bytes = kAct * tokens_ * h / sp_;
  const bool host_opt = p_.optimizer_on_host;
  const Recompute rc_att = p_.recompute[static_cast<int>(LayerKind::attention)];

  for (int stage = 0; stage < p_.pp; ++stage) {
    sim::RankClass& rc = s_.classes[static_cast<std::size_t>(stage)];
    rc_ = &rc;
    cursor_ = -1;
    rc.stage = stage;
    rc.multiplicity = p_.ranks_per_stage();
    rc.name = mem.classes[static_cast<std::size_t>(stage)].name;
    rc.streams.assign(kStreamNames, kStreamNames + kNumStreams);
    // The stage's layers, chunk by chunk: local index i is global layer layer_id[i].
    std::vector<int> layer_id, chunk_begin;
    for (int chunk = 0; chunk < vp; ++chunk) {
      chunk_begin.push_back(static_cast<int>(layer_id.size()));
      const int v = chunk * p_.pp + stage;
      for (int l = virtual_begin[static_cast<std::size_t>(v)];
           l < virtual_begin[static_cast<std::size_t>(v + 1)]; ++l)
        layer_id.push_back(l);
    }
    chunk_begin.push_back(static_cast<int>(layer_id.size()));
    const int n_layers = static_cast<int>(layer_id.size());
    const bool first = stage == 0, last = stage == p_.pp - 1;
    const RankClassMemory& cm = mem.classes[static_cast<std::size_t>(stage)];

    // Resident state, as the memory model sizes it.
    using sim::Device;
    using sim::MemoryKind;
    tensor("weights (resident shards)", cm.hbm.weights, Device::hbm, MemoryKind::weights, true);
    tensor("gradients (resident)", cm.hbm.grads, Device::hbm, MemoryKind::grads, true);
    tensor("optimizer state", cm.hbm.optimizer, Device::hbm, MemoryKind::optimizer, true);
    tensor("NCCL and all-to-all buffers", resident_comm_bytes(p_, c_.hw), Device::hbm,
           MemoryKind::comm_buffers, true);
    tensor("CUDA context", c_.hw.cuda_context_bytes, Device::hbm, MemoryKind::other, true);
    tensor("host: weights", cm.host.weights, Device::host, MemoryKind::weights, true);
    tensor("host: gradients", cm.host.grads, Device::host, MemoryKind::grads, true);
    tensor("host: optimizer state", cm.host.optimizer, Device::host, MemoryKind::optimizer, true);

    // Per-layer facts.
    std::vector<std::vector<Step>> steps(static_cast<std::size_t>(n_layers));
    std::vector<KindParams> local(static_cast<std::size_t>(n_layers));
    std::vector<double> saved(static_cast<std::size_t>(n_layers));
    std::vector<double> full(static_cast<std::size_t>(n_layers));
    for (int i = 0; i < n_layers; ++i) {
      const LayerSpec& layer =
          m_.layers[static_cast<std::size_t>(layer_id[static_cast<std::size_t>(i)])];
      steps[static_cast<std::size_t>(i)] = layer_steps(layer);
      local[static_cast<std::size_t>(i)] = layer_local_params(m_, layer, p_);
      saved[static_cast<std::size_t>(i)] =
          saved_activation_bytes(m_, layer, p_, c_.seq, c_.activations);
      full[static_cast<std::size_t>(i)] =
          layer_activation_bytes(m_, layer, p_, c_.seq, Recompute::none, c_.activations);
    }
    auto gathered = [&](int i, LayerKind k) {
      const int ki = static_cast<int>(k);
      const bool z3 = p_.state[ki].zero >= 3 || p_.params == Placement::host;
      return z3 && g_.fsdp[ki] >= 0 ? local[static_cast<std::size_t>(i)][k] : 0.0;
    };
    constexpr LayerKind kLayerKinds[] = {LayerKind::attention, LayerKind::moe, LayerKind::dense};

    // ZeRO-3 gather of layer i's parameters (per kind, over its own group); returns the ops the
    // layer's compute must wait for. `gate` is the op that bounds prefetch to one layer ahead.
    std::vector<int> last_gather;
    auto gather = [&](int i, int mb, int gate, const char* pass) {
      std::vector<int> ops;
      for (LayerKind k : kLayerKinds) {
        const double params = gathered(i, k);
        if (params <= 0)
          continue;
        const int ki = static_cast<int>(k);
        const double shard = shard_degree(p_, k);
        sim::Op up;
        int upload = -1;
        if (p_.params == Placement::host) { // FSDP2 CPU offload: bring the shard to HBM first
          up.name = fmt::format("L{}.{}.param_upload.{}", layer_id[static_cast<std::size_t>(i)],
                                layer_kind_name(k), pass);
          up.kind = OpKind::copy_h2d;
          up.category = Category::offload;
          up.stream = kH2d;
          up.bytes = kAct * params / shard;
          up.layer = layer_id[static_cast<std::size_t>(i)];
          up.micro_batch = mb;
          if (gate >= 0)
            up.deps.push_back(gate);
          upload = add(std::move(up), false);
        }
        sim::Op op;
        op.name = fmt::format("L{}.{}.fsdp_gather.{}", layer_id[static_cast<std::size_t>(i)],
                              layer_kind_name(k), pass);
        op.kind = OpKind::all_gather;
        op.category = Category::dp_comm;
        op.stream = kDp;
        op.bytes = kAct * params;
        op.group = g_.fsdp[ki];
        op.layer = layer_id[static_cast<std::size_t>(i)];
        op.micro_batch = mb;
        if (gate >= 0)
          op.deps.push_back(gate);
        if (upload >= 0)
          op.deps.push_back(upload);
        op.allocs.push_back(
            tensor(fmt::format("L{}.{} gathered ({} mb{})", layer_id[static_cast<std::size_t>(i)],
                               layer_kind_name(k), pass, mb),
                   kAct * params, Device::hbm, MemoryKind::comm_buffers));
        ops.push_back(add(std::move(op), false));
      }
      return ops;
    };
    auto free_gathered = [&](const std::vector<int>& gathers, int at_op) {
      for (int gi : gathers)
        for (int t : rc.ops[static_cast<std::size_t>(gi)].allocs)
          rc.ops[static_cast<std::size_t>(at_op)].frees.push_back(t);
    };

    // Host optimizer streamed into the forward: layer i's step (from the previous step's
    // gradients) and its parameter upload run before layer i's first forward.
    std::vector<int> param_ready(static_cast<std::size_t>(n_layers), -1);
    if (host_opt && p_.overlap == OptimizerOverlap::stream_forward) {
      for (int i = 0; i < n_layers; ++i) {
        double shard_params = 0;
        for (LayerKind k : kLayerKinds)
          shard_params += local[static_cast<std::size_t>(i)][k] / shard_degree(p_, k);
        sim::Op adam = host_adam_op(fmt::format("L{}.adam", layer_id[static_cast<std::size_t>(i)]),
                                    shard_params, layer_id[static_cast<std::size_t>(i)]);
        const int a = add(std::move(adam), false);
        sim::Op up;
        up.name = fmt::format("L{}.param_upload", layer_id[static_cast<std::size_t>(i)]);
        up.kind = OpKind::copy_h2d;
        up.category = Category::optimizer;
        up.stream = kH2d;
        up.bytes = kAct * shard_params;
        up.layer = layer_id[static_cast<std::size_t>(i)];
        up.deps = {a};
        param_ready[static_cast<std::size_t>(i)] = add(std::move(up), false);
      }
    }

    // Activation tensors per (layer, micro-batch).
    struct Saved {
      int kept = -1, offloaded = -1, host = -1, reload = -1, d2h = -1;
    };
    std::vector<std::vector<Saved>> act(static_cast<std::size_t>(n_layers),
                                        std::vector<Saved>(static_cast<std::size_t>(micro)));
    std::vector<int> logits(static_cast<std::size_t>(micro), -1);
    std::vector<int> layer_fwd_end(static_cast<std::size_t>(n_layers), -1);

    auto forward = [&](int mb, int chunk) {
      const bool embeds = first && chunk == 0, heads = last && chunk == vp - 1;
      const std::size_t key = static_cast<std::size_t>(chunk * micro + mb);
      if (!embeds) {
        sim::Op r = pipeline_op(fmt::format("recv_act.mb{}", mb), OpKind::recv,
                                stage > 0 ? stage - 1 : p_.pp - 1, mb, 0);
        recv_fwd[static_cast<std::size_t>(stage)][key] = add(std::move(r));
      } else {
        sim::Op e;
        e.name = fmt::format("embedding.mb{}", mb);
        e.kind = OpKind::elementwise;
        e.category = Category::forward;
        e.bytes = 2 * kAct * tokens_ * h;
        e.micro_batch = mb;
        add(std::move(e));
      }
      for (int i = chunk_begin[static_cast<std::size_t>(chunk)];
           i < chunk_begin[static_cast<std::size_t>(chunk + 1)]; ++i) {
        const int l = layer_id[static_cast<std::size_t>(i)];
        // Prefetch bound: layer i's gather may start once layer i-2's forward ended.
        const int gate = i >= 2 ? layer_fwd_end[static_cast<std::size_t>(i - 2)] : -1;
        const std::vector<int> gathers = gather(i, mb, gate, "fwd");
        Saved& sv = act[static_cast<std::size_t>(i)][static_cast<std::size_t>(mb)];
        const double s_bytes = saved[static_cast<std::size_t>(i)];
        const double off = p_.activation_offload;
        sv.kept = tensor(fmt::format("L{} saved mb{}", l, mb), s_bytes * (1 - off), Device::hbm,
                         MemoryKind::activations);
        if (off > 0)
          sv.offloaded = tensor(fmt::format("L{} saved mb{} (to offload)", l, mb), s_bytes * off,
                                Device::hbm, MemoryKind::activations);
        bool first_op = true;
        for (const Step& st : steps[static_cast<std::size_t>(i)]) {
          const int before = static_cast<int>(rc.ops.size());
          emit_forward(st, fmt::format("L{}.{}.mb{}", l, st.name, mb), Category::forward, l, mb);
          if (first_op) {
            sim::Op& o = rc.ops[static_cast<std::size_t>(before)];
            for (int gi : gathers)
              o.deps.push_back(gi);
            if (param_ready[static_cast<std::size_t>(i)] >= 0 && mb == 0)
              o.deps.push_back(param_ready[static_cast<std::size_t>(i)]);
            o.allocs.push_back(sv.kept);
            if (sv.offloaded >= 0)
              o.allocs.push_back(sv.offloaded);
            first_op = false;
          }
        }
        layer_fwd_end[static_cast<std::size_t>(i)] = cursor_;
        free_gathered(gathers, cursor_);
        if (off > 0) {
          sim::Op d2h;
          d2h.name = fmt::format("L{}.act_offload.mb{}", l, mb);
          d2h.kind = OpKind::copy_d2h;
          d2h.category = Category::offload;
          d2h.stream = kD2h;
          d2h.bytes = s_bytes * off;
          d2h.layer = l;
          d2h.micro_batch = mb;
          d2h.deps = {cursor_};
          sv.host = tensor(fmt::format("L{} saved mb{} (host)", l, mb), s_bytes * off, Device::host,
                           MemoryKind::activations);
          d2h.allocs = {sv.host};
          d2h.frees = {sv.offloaded};
          sv.d2h = add(std::move(d2h), false);
        }
      }
      if (heads) {
        sim::Op head;
        head.name = fmt::format("lm_head.mb{}", mb);
        head.kind = OpKind::gemm;
        head.category = Category::forward;
        const double v = static_cast<double>(m_.vocab_size) / p_.embed.tp;
        head.gemm = sim::GemmShape{tokens_, v, h, 1, {}};
        head.model_flops = 2 * tokens_ * v * h;
        head.micro_batch = mb;
        logits[static_cast<std::size_t>(mb)] =
            tensor(fmt::format("logits mb{}", mb), logits_bytes(m_, p_, c_.seq), Device::hbm,
                   MemoryKind::activations);
        head.allocs = {logits[static_cast<std::size_t>(mb)]};
        add(std::move(head));
        sim::Op loss;
        loss.name = fmt::format("loss.mb{}", mb);
        loss.kind = OpKind::elementwise;
        loss.category = Category::forward;
        loss.bytes = kAct * tokens_ * v * 3;
        loss.micro_batch = mb;
        add(std::move(loss));
      } else {
        sim::Op snd = pipeline_op(fmt::format("send_act.mb{}", mb), OpKind::send,
                                  last ? 0 : stage + 1, mb, pp_bytes);
        snd.deps = {cursor_};
        send_fwd[static_cast<std::size_t>(stage)][key] = add(std::move(snd), false);
      }
    };

    std::vector<int> layer_bwd_end(static_cast<std::size_t>(n_layers), -1);
    // Gradient reduction of local layer i after op `after`: ZeRO-3 (FSDP2) reduce-scatters every
    // micro-batch; lower stages accumulate and reduce on the last (Megatron's
    // overlap_grad_reduce).
    std::vector<int> grad_ready; // ops after which this step's gradients are reduced / on host
    auto reduce_grads = [&](int i, int mb, bool last_mb, int after) {
      const int l = layer_id[static_cast<std::size_t>(i)];
      const int end = after;
      for (LayerKind k : kLayerKinds) {
        const int ki = static_cast<int>(k);
        const double params = local[static_cast<std::size_t>(i)][k];
        if (params <= 0 || g_.fsdp[ki] < 0)
          continue;
        const int zero = p_.state[ki].zero;
        if (zero < 3 && !last_mb)
          continue;
        sim::Op red;
        red.name = fmt::format("L{}.{}.grad_reduce.mb{}", l, layer_kind_name(k), mb);
        red.kind = zero >= 1 ? OpKind::reduce_scatter : OpKind::all_reduce;
        red.category = Category::dp_comm;
        red.stream = kDp;
        red.bytes = kGrad * params;
        red.group = g_.fsdp[ki];
        red.layer = l;
        red.micro_batch = mb;
        red.deps = {end};
        const int buf =
            tensor(fmt::format("L{}.{} unsharded grads mb{}", l, layer_kind_name(k), mb),
                   kGrad * params, Device::hbm, MemoryKind::comm_buffers);
        rc.ops[static_cast<std::size_t>(end)].allocs.push_back(buf);
        red.frees = {buf};
        int r = add(std::move(red), false);
        if (last_mb && p_.grads == Placement::host) {
          sim::Op d2h;
          d2h.name = fmt::format("L{}.{}.grad_download", l, layer_kind_name(k));
          d2h.kind = OpKind::copy_d2h;
          d2h.category = Category::offload;
          d2h.stream = kD2h;
          d2h.bytes = kGrad * params / shard_degree(p_, k);
          d2h.layer = l;
          d2h.deps = {r};
          r = add(std::move(d2h), false);
        }
        if (last_mb)
          grad_ready.push_back(r);
      }
    };
    struct PendingTail {
      int i, mb;
      bool last_mb;
      std::vector<int> frees;
      std::size_t wgrads; // pending weight gradients up to and including this layer's
    };
    std::vector<PendingTail> pending_tails;
    // Places the held-back weight gradients (zero-bubble), then the frees and reductions that
    // waited for them.
    auto flush_wgrad = [&]() {
      std::vector<int> placed;
      for (sim::Op& w : pending_wgrad_)
        placed.push_back(add(std::move(w), false));
      for (PendingTail& t : pending_tails) {
        const int last_w = placed[t.wgrads - 1];
        for (int f : t.frees)
          rc.ops[static_cast<std::size_t>(last_w)].frees.push_back(f);
        reduce_grads(t.i, t.mb, t.last_mb, last_w);
      }
      pending_wgrad_.clear();
      pending_tails.clear();
    };

    auto backward = [&](int mb, int chunk) {
      const bool embeds = first && chunk == 0, heads = last && chunk == vp - 1;
      const std::size_t key = static_cast<std::size_t>(chunk * micro + mb);
      const bool last_mb = mb == micro - 1;
      if (heads) {
        sim::Op head;
        head.name = fmt::format("lm_head.mb{}.bwd", mb);
        head.kind = OpKind::gemm;
        head.category = Category::backward;
        const double v = static_cast<double>(m_.vocab_size) / p_.embed.tp;
        head.gemm = sim::GemmShape{tokens_, h, v, 2, {}}; // dgrad and wgrad
        head.model_flops = 4 * tokens_ * v * h;
        head.micro_batch = mb;
        head.frees = {logits[static_cast<std::size_t>(mb)]};
        add(std::move(head));
      } else {
        sim::Op r = pipeline_op(fmt::format("recv_grad.mb{}", mb), OpKind::recv,
                                last ? 0 : stage + 1, mb, 0);
        recv_bwd[static_cast<std::size_t>(stage)][key] = add(std::move(r));
      }
      for (int i = chunk_begin[static_cast<std::size_t>(chunk + 1)] - 1;
           i >= chunk_begin[static_cast<std::size_t>(chunk)]; --i) {
        const int l = layer_id[static_cast<std::size_t>(i)];
        const int gate = i + 2 < n_layers ? layer_bwd_end[static_cast<std::size_t>(i + 2)] : -1;
        const std::vector<int> gathers = gather(i, mb, gate, "bwd");
        Saved& sv = act[static_cast<std::size_t>(i)][static_cast<std::size_t>(mb)];
        int reload = -1;
        if (sv.host >= 0) {
          sim::Op h2d;
          h2d.name = fmt::format("L{}.act_reload.mb{}", l, mb);
          h2d.kind = OpKind::copy_h2d;
          h2d.category = Category::offload;
          h2d.stream = kH2d;
          h2d.bytes = rc.tensors[static_cast<std::size_t>(sv.host)].bytes;
          h2d.layer = l;
          h2d.micro_batch = mb;
          h2d.deps = {sv.d2h};
          if (gate >= 0)
            h2d.deps.push_back(gate);
          sv.reload = tensor(fmt::format("L{} saved mb{} (reloaded)", l, mb),
                             rc.tensors[static_cast<std::size_t>(sv.host)].bytes, Device::hbm,
                             MemoryKind::activations);
          h2d.allocs = {sv.reload};
          h2d.frees = {sv.host};
          reload = add(std::move(h2d), false);
        }
        const int begin = static_cast<int>(rc.ops.size());
        // Recompute: full re-runs the layer's forward; selective re-runs the attention core,
        // norms and activation functions.
        const bool any_rc = rc_att != Recompute::none ||
                            p_.recompute[static_cast<int>(LayerKind::moe)] != Recompute::none ||
                            p_.recompute[static_cast<int>(LayerKind::dense)] != Recompute::none;
        int work = -1;
        if (any_rc)
          work = tensor(
              fmt::format("L{} recomputed mb{}", l, mb),
              std::max(0.0, full[static_cast<std::size_t>(i)] - saved[static_cast<std::size_t>(i)]),
              Device::hbm, MemoryKind::activations);
        const bool full_rc = rc_att == Recompute::full;
        if (any_rc) {
          for (const Step& st : steps[static_cast<std::size_t>(i)]) {
            if (!full_rc && !st.selective_keep)
              continue;
            if (!full_rc && sim::is_collective(st.kind))
              continue;
            emit_forward(st, fmt::format("L{}.{}.mb{}.recompute", l, st.name, mb),
                         Category::recompute, l, mb);
          }
        }
        const auto& layer_steps_list = steps[static_cast<std::size_t>(i)];
        for (auto it = layer_steps_list.rbegin(); it != layer_steps_list.rend(); ++it)
          emit_backward(*it, fmt::format("L{}.{}.mb{}", l, it->name, mb), l, mb);
        if (begin < static_cast<int>(rc.ops.size())) {
          sim::Op& o = rc.ops[static_cast<std::size_t>(begin)];
          for (int gi : gathers)
            o.deps.push_back(gi);
          if (reload >= 0)
            o.deps.push_back(reload);
          if (work >= 0)
            o.allocs.push_back(work);
        }
        const int end = cursor_;
        layer_bwd_end[static_cast<std::size_t>(i)] = end;
        free_gathered(gathers, end);
        std::vector<int> frees = {sv.kept};
        if (sv.reload >= 0)
          frees.push_back(sv.reload);
        if (work >= 0)
          frees.push_back(work);
        if (defer_wgrad_ && !pending_wgrad_.empty()) {
          // The saved inputs feed the held-back weight gradients: freed, and the gradients
          // reduced, once those have run.
          pending_tails.push_back(
              PendingTail{i, mb, last_mb, std::move(frees), pending_wgrad_.size()});
          continue;
        }
        for (int t : frees)
          rc.ops[static_cast<std::size_t>(end)].frees.push_back(t);
        reduce_grads(i, mb, last_mb, end);
      }
      if (!embeds) {
        sim::Op snd = pipeline_op(fmt::format("send_grad.mb{}", mb), OpKind::send,
                                  stage > 0 ? stage - 1 : p_.pp - 1, mb, pp_bytes);
        snd.deps = {cursor_};
        send_bwd[static_cast<std::size_t>(stage)][key] = add(std::move(snd), false);
      }
    };

    // Pipeline order of this stage (strategies/pipeline.hpp).
    defer_wgrad_ = defers_weight_gradients(p_);
    play_pipeline(p_, stage, flush_wgrad, forward, backward);
    defer_wgrad_ = false;

    // The optimizer step.
    double shard_params = 0;
    for (int i = 0; i < n_layers; ++i)
      for (LayerKind k : kLayerKinds)
        shard_params += local[static_cast<std::size_t>(i)][k] / shard_degree(p_, k);
    const double emb =
        (first || last) ? embedding_local_params(m_, p_) *
                              ((first ? 1 : 0) + (last && !(first && m_.tied_embeddings) ? 1 : 0)) /
                              shard_degree(p_, LayerKind::embedding)
                        : 0;
    shard_params += emb;
    if (!host_opt) {
      sim::Op adam;
      adam.name = "optimizer.adamw";
      adam.kind = OpKind::elementwise;
      adam.category = Category::optimizer;
      adam.bytes = kAdamBytesPerParam * shard_params;
      adam.deps = grad_ready;
      add(std::move(adam));
      // ZeRO-1/2: gather the updated BF16 parameters (Megatron's distributed optimizer).
      for (LayerKind k : kLayerKinds) {
        const int ki = static_cast<int>(k);
        if (p_.state[ki].zero < 1 || p_.state[ki].zero >= 3 || g_.fsdp[ki] < 0)
          continue;
        double params = 0;
        for (int i = 0; i < n_layers; ++i)
          params += local[static_cast<std::size_t>(i)][k];
        if (params <= 0)
          continue;
        sim::Op ag;
        ag.name = fmt::format("{}.param_gather", layer_kind_name(k));
        ag.kind = OpKind::all_gather;
        ag.category = Category::dp_comm;
        ag.stream = kDp;
        ag.bytes = kAct * params;
        ag.group = g_.fsdp[ki];
        add(std::move(ag));
      }
    } else if (p_.overlap != OptimizerOverlap::stream_forward) {
      // After backward (or streamed per layer as gradients arrive): AdamW on the host, then the
      // updated BF16 shard goes back to HBM.
      sim::Op adam = host_adam_op("optimizer.host_adamw", shard_params, -1);
      adam.deps = grad_ready;
      if (p_.overlap == OptimizerOverlap::after_backward && cursor_ >= 0)
        adam.deps.push_back(cursor_);
      const int a = add(std::move(adam), p_.overlap == OptimizerOverlap::after_backward);
      if (p_.params == Placement::hbm) {
        sim::Op up;
        up.name = "optimizer.param_upload";
        up.kind = OpKind::copy_h2d;
        up.category = Category::optimizer;
        up.stream = kH2d;
        up.bytes = kAct * shard_params;
        up.deps = {a};
        add(std::move(up), false);
      }
    } else {
      // Streamed into the next forward: the embedding's step and the gradient downloads end the
      // step; the layers' steps were placed before their forwards.
      sim::Op adam = host_adam_op("optimizer.host_adamw.embedding", emb, -1);
      adam.deps = grad_ready;
      add(std::move(adam), false);
    }
  }

  // Pipeline pairs: each recv waits for the matching send of its neighbour (the previous
  // virtual stage for activations, the next one for gradients).
  for (int stage = 0; stage < p_.pp; ++stage) {
    for (int chunk = 0; chunk < vp; ++chunk) {
      for (int mb = 0; mb < micro; ++mb) {
        const std::size_t key = static_cast<std::size_t>(chunk * micro + mb);
        auto& ops = s_.classes[static_cast<std::size_t>(stage)].ops;
        const int rf = recv_fwd[static_cast<std::size_t>(stage)][key];
        if (rf >= 0) {
          const int from = stage > 0 ? stage - 1 : p_.pp - 1;
          const int from_chunk = stage > 0 ? chunk : chunk - 1;
          ops[static_cast<std::size_t>(rf)].remote_deps.push_back(
              sim::RemoteDep{from, send_fwd[static_cast<std::size_t>(from)]
                                           [static_cast<std::size_t>(from_chunk * micro + mb)]});
        }
        const int rb = recv_bwd[static_cast<std::size_t>(stage)][key];
        if (rb >= 0) {
          const int from = stage < p_.pp - 1 ? stage + 1 : 0;
          const int from_chunk = stage < p_.pp - 1 ? chunk : chunk + 1;
          ops[static_cast<std::size_t>(rb)].remote_deps.push_back(
              sim::RemoteDep{from, send_bwd[static_cast<std::size_t>(from)]
                                           [static_cast<std::size_t>(from_chunk * micro + mb)]});
        }
      }
    }
  }
  double flops = 0;
  for (const sim::RankClass& rc : s_.classes)
    for (const sim::Op& op : rc.ops)
      flops += op.model_flops * rc.multiplicity;
  s_.model_flops_per_step = flops;
  return std::move(s_);
}

} // namespace

std::vector<ForwardKernel> Lowering::forward_kernels(const LayerSpec& layer) {
  const std::vector<Step> steps = layer_steps(layer);
  std::vector<ForwardKernel> out;
  out.reserve(steps.size());
  for (const Step& st : steps) {
    if (sim::is_collective(st.kind))
      continue;
    out.push_back(ForwardKernel{op_of(st, st.name, Category::forward, 0, 0),
                                std::max(1, st.ring_steps), st.selective_keep});
  }
  return out;
}

std::vector<std::vector<ForwardKernel>>
layer_forward_kernels(const Plan& plan, const LoweringContext& ctx,
                      std::span<const workload::LayerSpec> layers) {
  if (ctx.model == nullptr || ctx.seq <= 0)
    throw InputError("lowering needs a model and a positive sequence length.");
  Lowering lowering(plan, ctx);
  std::vector<std::vector<ForwardKernel>> out;
  out.reserve(layers.size());
  for (const LayerSpec& layer : layers)
    out.push_back(lowering.forward_kernels(layer));
  return out;
}

sim::Schedule lower(const Plan& plan, const LoweringContext& ctx) {
  if (ctx.model == nullptr || ctx.seq <= 0)
    throw InputError("lowering needs a model and a positive sequence length.");
  return Lowering(plan, ctx).run();
}

} // namespace mop::strategy
