#include "strategies/lower.hpp"
#include "strategies/mesh.hpp"
#include "strategies/pipeline.hpp"
#include "strategies/routing.hpp"

#include "common/error.hpp"
#include "workload/flops.hpp"
#include "workload/params.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <fmt/format.h>
#include <limits>
#include <map>
#include <numeric>

namespace mop::strategy {

using sim::Category;
using sim::OpKind;
using workload::AttentionKind;
using workload::LayerSpec;
using workload::MlpKind;
using workload::ModelSpec;

namespace {

enum Stream { kCompute = kComputeStream, kTp, kCp, kEp, kDp, kPp, kH2d, kD2h, kHost, kNumStreams };
const char* const kStreamNames[kNumStreams] = {"compute",  "comm.tp",  "comm.cp",
                                               "comm.ep",  "comm.dp",  "comm.pp",
                                               "copy.h2d", "copy.d2h", "host"};

// Bytes per element (mixed precision, as the memory model counts them).
constexpr double kGrad = 4; // FP32 gradients reduced
// AdamW on the GPU reads BF16 param, FP32 grad, master, m, v and writes master, m, v, BF16 param.
constexpr double kAdamBytesPerParam = 2 + 4 + 4 + 4 + 4 + 4 + 4 + 4 + 2;

// The communicators a plan uses, as indices into Schedule::groups (-1: not used).
struct Groups {
  int tp = -1, cp_a2a = -1, cp_ring = -1, ep = -1, etp = -1, pp = -1;
  int spill_node = -1, spill_net = -1; // least-loaded rebalancing's weight copies (point to point)
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
  // PyTorch's ring (torch_ring_cp, docs/HARDWARE.md "PyTorch's ring"): each step's partial
  // output or gradient merged by eager FP32 kernels (the bytes those move per step, forward and
  // backward; 0: Transformer Engine's ring), the K/V gradients sent in FP32, the backward's FP32
  // accumulators; with its default rotater (`ring_gather`) the K/V blocks arrive in one
  // all-gather instead of per-step hops.
  bool ring_gather = false;
  double ring_merge_bytes = 0, ring_merge_grad_bytes = 0;
  double ring_grad_buffer_bytes = 0;
  bool selective_keep = false;            // recomputed under selective recompute
  bool forward_only = false;              // no transpose in backward (the MoE count exchanges)
  bool backward_only = false;             // nothing in forward (rebalancing's backward fetch)
  sim::Routed routed = sim::Routed::no;   // how its size follows the routing (sim::Routed)
  LayerKind owner = LayerKind::attention; // whose recompute policy re-runs it
  std::uint8_t kernels = 1;               // kernels the framework launches for it (Op::kernels)
  bool host_sync = false;                 // the host waits for it to end (Op::host_sync)
  // GEMMs: FP8 quantize traffic (Op::bytes) of the output gradient, charged to the input
  // gradient's GEMM (the forward's, of its input and weight, is `bytes`); elementwise: the
  // backward's bytes where they are not twice the forward's (a token permutation's transpose
  // moves as much as it); `high_precision`: left out of the FP8 recipe (Megatron-Core's router,
  // in FP32).
  double grad_bytes = 0;
  bool high_precision = false;
  // DeepEP's dispatch/combine: bytes sent across nodes and to other GPUs (Op::rdma_bytes,
  // Op::nvl_bytes).
  double rdma_bytes = 0;
  double nvl_bytes = 0;
};

// Parameters gathered, reduced and stepped together: those of one layer (or of the embedding, or
// of the final norm and LM head), of one kind, over one communicator (the CPU executor's
// buckets). Under tensor parallelism with SP, the parameters a kind does not split (norms, the
// router) see other tokens on each TP rank: their gradients are first summed over the kind's TP
// group (Megatron-Core's sequence-parallel norm gradients), then reduced with the bucket.
struct ParamBucket {
  std::string name; // "attention", "moe", "dense", "embedding", "head"
  LayerKind kind = LayerKind::attention;
  double params = 0;        // on this rank, before ZeRO sharding
  int zero = 0;             // the kind's ZeRO stage (3 when the parameters live on the host)
  int all_reduce = -1;      // ZeRO-0: the group the gradients are summed over
  int shard = -1;           // ZeRO 1-3: the shard group (reduce-scatter, gathers)
  int shard_ranks = 1;      // its size
  int replicas = -1;        // HSDP: the shard's replicas, all-reduced after the reduce-scatter
  bool embedding = false;   // holds the (tied) embedding table
  int tp_sum = -1;          // the TP group the unsplit parameters' gradients are summed over
  double tp_sum_params = 0; // those parameters
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
// Dropless dispatch sizes its all-to-all on the host: the host waits for the counts
// (Megatron-Core's MoEAlltoAllTokenDispatcher synchronises before the EP all-to-all; NCCL's
// all-to-all-v takes host-side counts). A capacity factor fixes the sizes.
bool syncs_host_per_moe_layer(const Plan& p) {
  return p.moe.capacity_factor <= 0;
}

// Of the embedding kind's buckets, those the embedding lookup reads (the table) and those the LM
// head reads (the final norm, the head weight, or the table when tied).
bool read_by_lookup(const ParamBucket& b) {
  return b.name == "embedding";
}
bool read_by_head(const ParamBucket& b, bool tied_embeddings) {
  return b.name != "embedding" || tied_embeddings;
}
struct EmbeddingBuckets {
  std::vector<ParamBucket> table, head;
};
EmbeddingBuckets split_embedding_buckets(const std::vector<ParamBucket>& list, bool tied) {
  EmbeddingBuckets out;
  for (const ParamBucket& b : list) {
    if (read_by_lookup(b))
      out.table.push_back(b);
    if (read_by_head(b, tied))
      out.head.push_back(b);
  }
  return out;
}

class Lowering {
public:
  Lowering(const Plan& p, const LoweringContext& c)
      : p_(p), c_(c), m_(*c.model), attention_kernel_(attention_kernel(p, c)),
        quantize_(c.gemm_dtype == sim::Dtype::fp8
                      ? quantize_traffic(fp8_recipe(p, c), c.hw.fp8_transposes)
                      : QuantizeTraffic{}) {
    tokens_ = static_cast<double>(p.micro_batch) * static_cast<double>(c.seq) / p.attention.cp;
    sp_ = p.attention.sp && p.attention.tp > 1 ? p.attention.tp : 1;
    spill_copy_bytes_ = expert_copy_bytes(m_, p_);
    activations_ = c.activations;
    activations_.compiled_loss = c.compiled_loss.value_or(c.compiled.value_or(false));
    make_groups();
  }

  sim::Schedule run();
  PassModel pass_model(bool with_passes);

private:
  // A ZeRO-3 bucket of a pipeline stage is gathered once per step (its first forward) and
  // reduce-scattered once (its last backward): unsharded_for_step (strategies/memory.hpp), as
  // the program lowering builds it (lowering/program.cpp).
  bool whole_step(const ParamBucket& b) const { return unsharded_for_step(p_, b.zero); }
  const Plan& p_;
  const LoweringContext& c_;
  const ModelSpec& m_;
  sim::AttentionKernel attention_kernel_;
  QuantizeTraffic quantize_;      // all 0 without FP8
  ActivationOptions activations_; // the context's, with its torch.compile
  double tokens_ = 0;             // tokens of one micro-batch on a rank (sequence split over CP)
  int sp_ = 1;                    // sequence-parallel divisor of norm/residual regions
  sim::Schedule s_;
  Groups g_;

  // Per-class building state.
  sim::RankClass* rc_ = nullptr;
  int cursor_ = -1; // the op the next op on the data path waits for
  // Zero-bubble (ZB-H1): weight-gradient GEMMs are held back and placed where the stage would
  // otherwise wait, after the next recv; each keeps its dependency on its input-gradient GEMM.
  bool defer_wgrad_ = false;
  std::vector<sim::Op> pending_wgrad_;
  // Least-loaded rebalancing: the expert copies received for the layer being emitted, freed
  // after the experts' last GEMM (forward) or with the gradients' return (backward).
  int spill_copies_ = -1;
  double spill_copy_bytes_ = 0; // one expert's weights as a rank holds them
  bool rebalancing() const { return p_.moe.rebalance == Rebalance::least_loaded && g_.ep >= 0; }
  // When set, add() records here whether each op joined the data path (pass_model()).
  std::vector<bool>* path_log_ = nullptr;
  // Uneven routing: each stage's tensors holding a MoE layer's saved activations (tensor,
  // layer), rescaled per expert-parallel rank by expand_routing().
  // `work`: the recomputed layer's working set (its activations less the saved ones).
  struct RoutedTensor {
    int tensor = -1, layer = -1;
    bool work = false;
    double spill = 0; // > 0: expert copies, this many bytes per copy received
  };
  std::vector<std::vector<RoutedTensor>> routed_tensors_;
  void note_routed(int tensor, int layer, bool work = false) {
    if (tensor < 0 || c_.expert_loads == nullptr ||
        m_.layers[static_cast<std::size_t>(layer)].mlp != MlpKind::moe)
      return;
    routed_tensors_[static_cast<std::size_t>(rc_ - s_.classes.data())].push_back(
        RoutedTensor{tensor, layer, work});
  }
  // Least-loaded rebalancing's copies (and, with `times` 2, their gradients): sized per rank.
  void note_spill(int tensor, int layer, double times = 1) {
    const auto st = static_cast<std::size_t>(rc_ - s_.classes.data());
    if (c_.expert_loads == nullptr || st >= s_.classes.size())
      return;
    routed_tensors_[st].push_back(RoutedTensor{tensor, layer, false, times * spill_copy_bytes_});
  }
  void expand_routing();

  void make_groups();
  int comm_group(const std::string& name, sim::GroupSpec spec);
  ParamBucket param_bucket(std::string name, LayerKind kind, double params);
  std::vector<ParamBucket> layer_buckets(const LayerSpec& layer, const KindParams& local);
  std::vector<ParamBucket> embedding_buckets(bool first, bool last);
  std::vector<Step> layer_steps(const LayerSpec& layer) const;
  int add(sim::Op&& op, bool on_path = true);
  // An op's or tensor's name, formatted only when the context asks for names (traces, reports,
  // tests); the search's evaluations leave them empty.
  template <class... A> std::string label(fmt::format_string<A...> f, A&&... a) const {
    return c_.names ? fmt::format(f, std::forward<A>(a)...) : std::string();
  }
  // `prefix` (a label) followed by `suffix`, or nothing without names.
  std::string label_with(const std::string& prefix, const char* suffix) const {
    return c_.names ? prefix + suffix : std::string();
  }
  int tensor(std::string name, double bytes, sim::Device device, sim::MemoryKind kind,
             bool resident = false);
  int emit_forward(const Step& st, const std::string& prefix, Category category, int layer, int mb);
  void emit_backward(const Step& st, const std::string& prefix, int layer, int mb);
  void emit_layer_backward(const std::vector<Step>& steps, int layer, int mb);
  PassOps layer_pass(const LayerSpec& layer);
  sim::Op embedding_op(int mb) const;
  sim::Op head_op(int mb, bool backward) const;
  sim::Op loss_op(int mb) const;
  sim::Op embedding_tp_op(const char* name, OpKind kind, int mb, int group) const;
  double vocab_per_rank() const { return static_cast<double>(m_.vocab_size) / p_.embed.tp; }
  // The parameters this stage's rank steps: its layers' (and, on the first and last stage, the
  // embedding kind's) local shards.
  double stage_shard_params(const std::vector<int>& layer_ids, bool first, bool last) const;
  // Layer i's shard (stream-forward host steps).
  double layer_shard_params(const LayerSpec& layer) const;
  int emit_attention(const Step& st, const std::string& prefix, Category category, int layer,
                     int mb, bool backward);
  void emit_wgrad(sim::Op&& wgrad);
  // Whether selective recompute re-runs the step.
  bool selective_recomputes(const Step& st) const;
  sim::Op host_adam_op(std::string name, double params, int layer) const;
  sim::Op pipeline_op(std::string name, OpKind kind, int peer, int mb, double bytes) const;
  // The reductions of bucket b's gradients after a backward of micro-batch mb (of the step's
  // last one: `last_mb`), in order, each to wait for the one before it: none when the bucket
  // reduces on another micro-batch. `tied_group`: the tied embedding's pair (-1: none).
  std::vector<sim::Op> reduction_chain(const ParamBucket& b, const std::string& what, int layer,
                                       int mb, bool last_mb, int tied_group) const;
  // ZeRO 1 and 2: the all-gathers of `list`'s updated parameters after the step, in order.
  std::vector<sim::Op> param_gather_ops(const std::vector<ParamBucket>& list,
                                        const std::string& what, int layer) const;
  // ZeRO-3: the all-gather of bucket b's parameters before a use (`pass`: "fwd" or "bwd").
  sim::Op fsdp_gather_op(const ParamBucket& b, const std::string& what, const char* pass, int layer,
                         int mb) const;
  // ZeRO-3 buckets of a pipeline stage, gathered once per step (whole_step): their gathers.
  std::vector<sim::Op> step_gather_ops(const std::vector<ParamBucket>& list,
                                       const std::string& what) const;
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
  if (p_.moe.rebalance == Rebalance::least_loaded && g_.ep >= 0) {
    // Expert copies travel point to point: on the node over NVLink, across nodes over the NIC.
    g_.spill_node = add_group_p2p("ep.spill.node", 2);
    g_.spill_net = add_group_p2p("ep.spill.net", 1);
  }
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

// The communicator of `spec` (-1 for one rank), added on first use under `name`.
int Lowering::comm_group(const std::string& name, sim::GroupSpec spec) {
  const sim::MeshView& v = s_.mesh.view(spec.view);
  const int ranks = v.group_size(spec);
  if (ranks <= 1)
    return -1;
  for (std::size_t i = 0; i < s_.groups.size(); ++i)
    if (s_.groups[i].spec == spec)
      return static_cast<int>(i);
  s_.groups.push_back(
      sim::Group{name, ranks, v.ranks_per_node(spec, c_.gpus_per_node), std::move(spec)});
  return static_cast<int>(s_.groups.size()) - 1;
}

// A bucket of `params` parameters of layer kind `kind`, whose gradients sum over the kind's
// data-parallel ranks, under its ZeRO stage and HSDP shard group (strategies/mesh.hpp, as the
// CPU executor shards them).
ParamBucket Lowering::param_bucket(std::string name, LayerKind kind, double params) {
  ParamBucket b;
  b.kind = kind;
  b.params = params;
  const StatePolicy& policy = p_.state[static_cast<int>(kind)];
  b.zero = p_.params == Placement::host ? std::max(policy.zero, 3) : policy.zero;
  if (b.zero == 0) {
    b.all_reduce = comm_group("dp." + name, data_parallel_group(kind));
  } else {
    sim::GroupSpec shard = shard_group(p_, kind);
    b.shard_ranks = s_.mesh.view(shard.view).group_size(shard);
    b.shard = comm_group("dp." + name, std::move(shard));
    const sim::GroupSpec replicas = replica_group(p_, kind);
    if (!replicas.dims.empty())
      b.replicas = comm_group("dp." + name + ".replicas", replicas);
  }
  b.name = std::move(name);
  return b;
}

std::vector<ParamBucket> Lowering::layer_buckets(const LayerSpec& layer, const KindParams& local) {
  std::vector<ParamBucket> out;
  const workload::ParamCounts counts = workload::layer_params(m_, layer);
  const double norm = static_cast<double>(counts.norms) / 2; // one norm before each block
  auto add = [&](const char* kind_name, LayerKind kind, int tp, double unsplit) {
    if (local[kind] <= 0)
      return;
    out.push_back(param_bucket(kind_name, kind, local[kind]));
    if (tp > 1 && unsplit > 0) {
      out.back().tp_sum = kind == LayerKind::attention ? comm_group("tp", tp_group())
                                                       : comm_group("tp.dense", dense_tp_group());
      out.back().tp_sum_params = unsplit;
    }
  };
  const double qk_norms =
      m_.attention.qk_norm ? 2.0 * static_cast<double>(m_.attention.head_dim) : 0.0;
  add("attention", LayerKind::attention, p_.attention.tp, norm + qk_norms);
  add("moe", LayerKind::moe, 1, 0);
  add("dense", LayerKind::dense, p_.dense.tp, norm + static_cast<double>(counts.router));
  return out;
}

// The embedding kind's buckets on a stage: the embedding table on the first stage; the final
// norm with the LM head (or, across stages, the tied copy of the table) on the last.
std::vector<ParamBucket> Lowering::embedding_buckets(bool first, bool last) {
  std::vector<ParamBucket> out;
  const int etp = p_.embed.tp;
  const double table = embedding_local_params(m_, p_);
  const double h = static_cast<double>(m_.hidden_size);
  if (first) {
    out.push_back(param_bucket("embedding", LayerKind::embedding, table));
    out.back().embedding = true;
  }
  if (last) {
    const double head = m_.tied_embeddings && first ? 0 : table;
    const bool tied_copy = m_.tied_embeddings && !first;
    out.push_back(param_bucket("head", LayerKind::embedding, head + h));
    out.back().embedding = tied_copy;
    // Under sharded state the tied copy is a bucket of its own, so that it shards as the first
    // stage's table does (Megatron's _does_param_require_new_bucket): the final norm apart.
    if (tied_copy && out.back().shard >= 0) {
      out.back().params = head;
      out.push_back(param_bucket("final_norm", LayerKind::embedding, h));
    }
    if (etp > 1) {
      out.back().tp_sum = comm_group("tp.embedding", embed_tp_group());
      out.back().tp_sum_params = h;
    }
  }
  return out;
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
  // FP8: the quantize kernels around a GEMM (docs/HARDWARE.md "FP8 quantization"): its input
  // (fused into the norm before it where the framework fuses one), its weight where the recipe
  // casts it every micro-batch, and in backward its output's gradient.
  const QuantizeTraffic& q = quantize_;
  // `input_cast`: false where the GEMM shares an input another GEMM of the block has already
  // cast (separate projections of one input under torch.compile, whose graph CSE keeps one cast).
  auto quantize = [&](Step& st, double m, double n, double k, bool after_norm, bool input_cast) {
    st.bytes =
        (input_cast ? m * k * (after_norm ? q.input_after_norm : q.input) : 0) + n * k * q.weight;
    st.grad_bytes = m * n * q.grad;
    if (st.bytes > 0 || st.grad_bytes > 0)
      st.kernels = static_cast<std::uint8_t>(st.kernels + q.kernels);
  };
  auto gemm = [&](std::string name, double m, double n, double k, bool input_cast = true) {
    const bool after_norm = name == "qkv_proj" || name == "q_proj" || name == "k_proj" ||
                            name == "v_proj" || name == "q_a_proj" || name == "kv_a_proj" ||
                            name == "mlp_gate_up" || name == "mlp_gate" || name == "mlp_up" ||
                            name == "shared_gate_up";
    Step st = make_step(std::move(name), OpKind::gemm);
    st.gemm = sim::GemmShape{m, n, k, 1, {}};
    st.flops = 2 * m * n * k;
    quantize(st, m, n, k, after_norm, input_cast);
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
  // Kernels the framework launches for the step just emitted, where it is more than one
  // (Op::kernels, read in the frameworks' sources: docs/ENGINE.md "Host issue").
  const bool te = p_.family == "megatron"; // Megatron-Core with Transformer Engine
  // torchtitan's PyTorch layer, eager unless compiled: then fused as the others are, but for
  // RoPE, whose complex product Inductor leaves to eager kernels (torchtitan issue #15).
  const bool torch_layer = p_.family == "fsdp2";
  const bool eager = torch_layer && !c_.compiled.value_or(false);
  EagerTraffic unfused = eager ? eager_traffic() : EagerTraffic{};
  if (torch_layer)
    unfused.rope = eager_traffic().rope;
  // torchtitan's and Hugging Face's layers keep the query, key and value projections and the
  // MLP's gate and up projections as separate nn.Linear modules (torchtitan models/llama/
  // model.py wq, wk, wv, w1, w3 at f6a9daa; transformers' q_proj, k_proj, v_proj, gate_proj,
  // up_proj) where Megatron-Core fuses each group into one GEMM: every projection reads the
  // shared input again, writes its own input gradient, and autograd sums the gradients
  // (docs/HARDWARE.md "Separate projections").
  const bool separate_projections = torch_layer;
  const bool compiled_layer = torch_layer && !eager;
  // The sum of `uses` input gradients, a backward-only kernel before the projections' input
  // gradient leaves for the norm: eager autograd adds them in place one at a time (uses − 1
  // adds, each reading two and writing one); compiled, Inductor sums them in one kernel (uses
  // reads, a write) or, without SP's reduce-scatter in between, inside the norm's backward
  // (only the extra reads).
  auto input_gradient_sum = [&](std::string name, double uses) {
    const double grad = workload::kActivationBytes * t * h;
    Step st = make_step(std::move(name), OpKind::elementwise);
    st.backward_only = true;
    const bool scattered = sp_ > 1; // SP's reduce-scatter follows the sum
    st.bytes = (!compiled_layer ? 3 * (uses - 1) : scattered ? uses + 1 : uses - 1) * grad;
    if (compiled_layer && !scattered)
      st.kernels = 0;
    out.push_back(std::move(st));
  };
  // A grouped GEMM's kernels beyond its quantize kernels (which kernels() adds once): a GEMM
  // per expert and, unless one fused kernel casts every expert's rows (delayed scaling), each
  // expert's own quantize kernels.
  const bool fused_group_cast = c_.gemm_dtype != sim::Dtype::fp8 ||
                                fp8_recipe(p_, c_) == Fp8Recipe::delayed;
  auto grouped_kernels = [&](double experts) {
    return static_cast<int>(experts) +
           (fused_group_cast ? 0 : (static_cast<int>(experts) - 1) * quantize_.kernels);
  };
  auto kernels = [&](int te_count, int eager_count) {
    const Step& last = out.back();
    const bool quantized = (last.kind == OpKind::gemm || last.kind == OpKind::grouped_gemm) &&
                           (last.bytes > 0 || last.grad_bytes > 0);
    const int k = (te ? te_count : eager ? eager_count : 1) + (quantized ? q.kernels : 0);
    out.back().kernels = static_cast<std::uint8_t>(std::clamp(k, 0, 255));
  };
  // --- attention block ---
  elementwise("attn_norm", 2 * workload::kActivationBytes * t * h / sp_ * unfused.norm, true);
  kernels(1, 8); // TE's fused RMSNorm; torchtitan's Python RMSNorm (cast, pow, mean, add,
                 // rsqrt, mul, cast, scale)
  // TP with SP: gather the sequence-sharded input; the size is the gathered buffer.
  if (sp)
    collective("attn_sp_gather", OpKind::all_gather, Category::tp_comm, kTp, tp_group,
               workload::kActivationBytes * t * h);
  // Work replicated across TP ranks (K/V heads when TP exceeds them, MLA's unsplit down
  // projections) runs on every rank but counts once in the model FLOPs.
  auto replicated = [&](double share) { out.back().flops *= share; };
  if (a.kind == AttentionKind::gqa && separate_projections) {
    const double kv_true = static_cast<double>(a.num_kv_heads) / tp; // may be below 1
    input_gradient_sum("attn_grad_sum", 3);
    gemm("q_proj", t, heads * dqk, h);
    gemm("k_proj", t, kv_heads * dqk, h, !compiled_layer);
    out.back().flops = 2 * t * h * kv_true * dqk;
    gemm("v_proj", t, kv_heads * dqk, h, !compiled_layer);
    out.back().flops = 2 * t * h * kv_true * dqk;
  } else if (a.kind == AttentionKind::gqa) {
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
  elementwise("rope_qk_norm",
              2 * workload::kActivationBytes * t * (heads + kv_heads) * dqk * unfused.rope, true);
  // TE: fused RoPE on q and k, the query reshape and v made contiguous; torchtitan, compiled or
  // not: RoPE's casts and complex products on q and k (6), repeat_kv's two copies.
  kernels(4, 8);
  if (torch_layer)
    out.back().kernels = 8;
  // Context parallelism.
  const double seq = static_cast<double>(c_.seq);
  const double b = p_.micro_batch;
  const double window = static_cast<double>(layer.window);
  const int ulysses = g_.cp_a2a >= 0 ? s_.groups[static_cast<std::size_t>(g_.cp_a2a)].ranks : 1;
  const int ring = g_.cp_ring >= 0 ? s_.groups[static_cast<std::size_t>(g_.cp_ring)].ranks : 1;
  // Ulysses: q, k and v each in their own all-to-all (DeepSpeed's DistributedAttention; the CPU
  // executor likewise). They sit inside the recomputed attention core, as in Megatron-Core with
  // Transformer Engine's all-to-all context parallelism.
  if (ulysses > 1) {
    collective("ulysses_q_a2a", OpKind::all_to_all, Category::cp_comm, kCp, g_.cp_a2a,
               workload::kActivationBytes * t * heads * dqk);
    out.back().selective_keep = true;
    collective("ulysses_k_a2a", OpKind::all_to_all, Category::cp_comm, kCp, g_.cp_a2a,
               workload::kActivationBytes * t * kv_heads * dqk);
    out.back().selective_keep = true;
    collective("ulysses_v_a2a", OpKind::all_to_all, Category::cp_comm, kCp, g_.cp_a2a,
               workload::kActivationBytes * t * kv_heads * dv);
    out.back().selective_keep = true;
  }
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
      halo.bytes =
          workload::kActivationBytes * b * window * std::max(1.0, kv_heads / ulysses) * (dqk + dv);
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
      // The K/V the ring passes are those the attention kernel gets: the query heads' count
      // where the framework repeats K/V heads first (torchtitan's repeat_kv before SDPA).
      const double ring_kv_heads = c_.kv_heads_repeated.value_or(false)
                                       ? heads / ulysses
                                       : std::max(1.0, kv_heads / ulysses);
      st.ring_bytes = workload::kActivationBytes * b * q_len * ring_kv_heads * (dqk + dv);
      st.flops = attention_flops(whole_sequence);
      if (torch_ring_cp(p_)) {
        // PyTorch's _templated_ring_attention (convert_to_f32, load balancing): after every
        // step but the first, _SDPAMerger casts the step's output to FP32
        // (2 + 4 B an element) and merges it, out − sigmoid(lse' − lse)·(out − out'), in eager
        // kernels (12 + 8 + 12 B); the steps where only the later half of the queries attend
        // (half of them) do it on half the rows and then rebuild the whole FP32 output with
        // torch.cat (8 B an element of it). In backward every step adds its query gradient into
        // an FP32 accumulator (4 + 2 + 4 B) and its key and value gradients into the FP32 ones
        // that arrived (the same), on half the rows with a torch.cat rebuild (8 B) on half the
        // steps, then packs the K/V gradients for the next rank (torch.cat, 8 B).
        const double outputs = b * q_len * (heads / ulysses) * dv;
        const double queries = b * q_len * (heads / ulysses) * dqk;
        const double keys_values = b * q_len * ring_kv_heads * (dqk + dv);
        st.ring_gather = c_.cp_gathers_kv.value_or(false);
        st.ring_merge_bytes = 34 * 0.75 * outputs + 8 * 0.5 * outputs;
        st.ring_merge_grad_bytes =
            (10 * 0.75 + 8 * 0.5) * (queries + keys_values) + 8 * keys_values;
        st.ring_grad_buffer_bytes = torch_ring_accumulator_bytes(queries, keys_values);
      }
    } else {
      st.flops = attention_flops(st.attention);
    }
    st.selective_keep = true;
    out.push_back(std::move(st));
    kernels(2, 2); // cuDNN's graph and TE's RNG-state kernel; SDPA and the output's transpose
  }
  if (ulysses > 1) {
    collective("ulysses_out_a2a", OpKind::all_to_all, Category::cp_comm, kCp, g_.cp_a2a,
               workload::kActivationBytes * t * heads * dv);
    out.back().selective_keep = true;
  }
  gemm("o_proj", t, h, heads * dv);
  if (sp)
    collective("attn_sp_scatter", OpKind::reduce_scatter, Category::tp_comm, kTp, tp_group,
               workload::kActivationBytes * t * h);
  else
    collective("attn_tp_reduce", OpKind::all_reduce, Category::tp_comm, kTp, tp_group,
               workload::kActivationBytes * t * h);
  elementwise("attn_residual", 3 * workload::kActivationBytes * t * h / sp_, false);
  const std::size_t mlp_begin = out.size();
  // --- MLP block ---
  elementwise("mlp_norm", 2 * workload::kActivationBytes * t * h / sp_ * unfused.norm, true);
  kernels(1, 8);
  if (layer.mlp == MlpKind::dense) {
    const double dtp = p_.dense.tp;
    const double inter = static_cast<double>(m_.dense_mlp.intermediate_size) / dtp;
    const double up = (m_.dense_mlp.gated ? 2 : 1) * inter;
    if (sp)
      collective("mlp_sp_gather", OpKind::all_gather, Category::tp_comm, kTp, tp_group,
                 workload::kActivationBytes * t * h);
    if (separate_projections && m_.dense_mlp.gated) {
      input_gradient_sum("mlp_grad_sum", 2);
      gemm("mlp_gate", t, inter, h);
      gemm("mlp_up", t, inter, h, !compiled_layer);
    } else {
      gemm("mlp_gate_up", t, up, h);
    }
    elementwise("mlp_act", 3 * workload::kActivationBytes * t * inter * unfused.activation, true);
    kernels(1, 2); // compiled bias-SwiGLU; eager silu and product
    gemm("mlp_down", t, h, inter);
    if (sp)
      collective("mlp_sp_scatter", OpKind::reduce_scatter, Category::tp_comm, kTp, tp_group,
                 workload::kActivationBytes * t * h);
    else
      collective("mlp_tp_reduce", OpKind::all_reduce, Category::tp_comm, kTp, tp_group,
                 workload::kActivationBytes * t * h);
  } else {
    const workload::MoeSpec& e = m_.moe;
    const double tm = t / sp_; // tokens entering the MoE block on this rank
    const double experts = static_cast<double>(e.num_routed_experts);
    const double k = static_cast<double>(e.experts_per_token);
    gemm("router", tm, experts, h);
    out.back().high_precision = true;
    out.back().bytes = out.back().grad_bytes = 0;
    out.back().kernels = 1;
    elementwise("router_topk", workload::kActivationBytes * tm * experts, false);
    // Megatron-Core's router with its load-balancing loss launches 31 kernels with router
    // fusion (72 without): the router GEMM and 30 more (NVIDIA/Megatron-LM DeepSeek-V3 GB200
    // guide, eb0783b6, §2.1.4).
    kernels(30, 1);
    // Dispatch: every token copy goes to its expert's rank (balanced routing). Dropless routing
    // first exchanges how many rows each rank sends to each expert (one int64 per expert of the
    // model; Megatron-Core's MoEAlltoAllTokenDispatcher), which also tells every rank the
    // expert of each row it receives; backward reuses the counts.
    const double routed = tm * k;
    collective("ep_counts", OpKind::all_to_all, Category::ep_comm, kEp, g_.ep, 8 * experts);
    if (!out.empty() && out.back().name == "ep_counts") {
      out.back().forward_only = true;
      out.back().host_sync = syncs_host_per_moe_layer(p_);
      kernels(8, 1); // the dispatcher's preprocess: counts, splits, their copies to the host
    }
    // Least-loaded rebalancing (LLEP): every rank gathers every rank's counts and computes the
    // same assignment; the owners of spilled experts send copies of their weights to the
    // helpers (their gradients come back in backward, where the copies are fetched again).
    // Sized per rank by the full-rank expansion (expand_routing); balanced routing moves
    // nothing, so the copies are zero-time barriers until then.
    auto spill_step = [&](const char* name, int group, bool backward_only) {
      Step st = make_step(name, OpKind::barrier, Category::ep_comm, kEp);
      st.group = group;
      st.bytes = spill_copy_bytes_;
      st.routed = sim::Routed::spill;
      st.backward_only = backward_only;
      out.push_back(std::move(st));
    };
    if (rebalancing()) {
      collective("llep_counts", OpKind::all_gather, Category::ep_comm, kEp, g_.ep,
                 8 * experts * p_.moe.ep);
      out.back().forward_only = true;
      spill_step("llep_weights.node", g_.spill_node, false);
      spill_step("llep_weights.net", g_.spill_net, false);
    }
    // What follows the routing: the exchanges, and the rows this rank's experts receive.
    auto routed_last = [&](const char* name, sim::Routed how) {
      if (!out.empty() && out.back().name == name)
        out.back().routed = how;
    };
    // DeepEP (docs/HARDWARE.md "Hierarchical dispatch"): each token crosses once to every other
    // node holding one of its experts and reaches once every other GPU holding one (its layout
    // kernel counts tokens per rank: get_dispatch_layout's is_token_in_rank), where NCCL's
    // all-to-all sends one copy per (token, expert).
    // HybridEP (Megatron's other flex backend) moves the same bytes: Megatron-LM's moe_perf
    // baselines time its MoE layer within 6 % of DeepEP's on H100.
    const bool deepep =
        c_.ep_dispatcher.value_or(EpDispatcher::alltoall) != EpDispatcher::alltoall && g_.ep >= 0;
    double rdma = 0, nvl = 0, reached_gpus = 1;
    if (deepep) {
      const sim::Group& eg = s_.groups[static_cast<std::size_t>(g_.ep)];
      const int ep_nodes = eg.ranks / std::max(1, eg.ranks_per_node);
      const double other_gpus = expected_remote_nodes(experts, k, eg.ranks);
      rdma = workload::kActivationBytes * tm * h * expected_remote_nodes(experts, k, ep_nodes);
      nvl = workload::kActivationBytes * tm * h * other_gpus;
      // The GPUs a token reaches, its own included (by symmetry, the same share of every GPU).
      reached_gpus = std::max(1.0, other_gpus * eg.ranks / (eg.ranks - 1.0));
    }
    auto deepep_bytes = [&](const char* name) {
      if (deepep && !out.empty() && out.back().name == name) {
        out.back().rdma_bytes = rdma;
        out.back().nvl_bytes = nvl;
      }
    };
    const double local_experts = experts / p_.moe.ep;
    // The token permutations around the exchange (docs/HARDWARE.md "Token permutation"):
    // memory-bound copies of every routed row, which Megatron-Core's dispatchers run as their
    // own kernels (token_dispatcher.py: permute, sort_chunks_by_idxs, unpermute; TE's
    // moe_permute / moe_sort_chunks_by_index when fused). Their backward moves the same bytes
    // the other way (a gather's transpose is a scatter).
    const double row = workload::kActivationBytes * h;
    auto permutation = [&](const char* name, double bytes, sim::Routed how, int te_kernels) {
      elementwise(name, bytes, false);
      out.back().grad_bytes = bytes;
      out.back().routed = how;
      kernels(te_kernels, te_kernels);
    };
    if (!deepep)
      // All-to-all: every copy of a token is gathered into destination order before the
      // exchange (reads the token rows, writes the copies).
      permutation("ep_permute", row * (tm + routed), sim::Routed::no, 4);
    collective("ep_dispatch", OpKind::all_to_all, Category::ep_comm, kEp, g_.ep,
               workload::kActivationBytes * routed * h);
    routed_last("ep_dispatch", sim::Routed::exchange);
    deepep_bytes("ep_dispatch");
    if (!out.empty() && out.back().name == "ep_dispatch")
      kernels(2, 1); // the tokens' and the probabilities' exchanges
    if (deepep) {
      // DeepEP and HybridEP deliver one copy per destination GPU; the rows are then expanded
      // into expert order (the manager's permute, or HybridEP's permute blocks).
      permutation("ep_permute", row * (tm * reached_gpus + routed), sim::Routed::rows, 4);
    } else if (local_experts > 1) {
      // All-to-all: the rows arrive grouped by source rank (and gathered over the expert's
      // tensor-parallel ranks) and are sorted by local expert.
      permutation("ep_sort", 2 * row * routed * p_.moe.etp, sim::Routed::rows, 2);
    }
    // Expert tensor parallelism: the etp ranks of an expert gather each other's count tables
    // (forward only), then their rows (padded to the largest count), compute their share of the
    // expert's width on all of them, and reduce-scatter the partial outputs back.
    collective("etp_counts", OpKind::all_gather, Category::ep_comm, kEp, g_.etp,
               8 * experts * p_.moe.etp);
    if (!out.empty() && out.back().name == "etp_counts")
      out.back().forward_only = true;
    collective("etp_gather", OpKind::all_gather, Category::ep_comm, kEp, g_.etp,
               workload::kActivationBytes * routed * p_.moe.etp * h);
    routed_last("etp_gather", sim::Routed::rows);
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
      st.routed = sim::Routed::rows;
      quantize(st, expert_rows, st.gemm.n, h, false, true);
      st.bytes += (local_experts - 1) * st.gemm.n * h * q.weight; // every expert's weight
      out.push_back(std::move(st));
      // TE's GroupedLinear launches one cuBLAS GEMM per local expert (TransformerEngine v2.8
      // pytorch/module/grouped_linear.py; issues #1386, #1499) and quantizes each expert's rows
      // with its own quantizer: one fused cast-transpose for all of them under delayed scaling,
      // each expert's own kernels under the other recipes (csrc/extensions/cast.cpp
      // split_quantize → multi_tensor_quantize_impl at d0067d0).
      kernels(grouped_kernels(local_experts), 1);
    }
    elementwise("experts_act",
                3 * workload::kActivationBytes * expert_rows * inter * unfused.activation, true);
    routed_last("experts_act", sim::Routed::rows);
    {
      Step st = make_step("experts_down", OpKind::grouped_gemm);
      st.gemm.rows_per_expert.assign(static_cast<std::size_t>(local_experts),
                                     expert_rows / local_experts);
      st.gemm.n = h;
      st.gemm.k = inter;
      st.gemm.m = expert_rows;
      st.flops = 2 * expert_rows * h * inter;
      st.routed = sim::Routed::rows;
      quantize(st, expert_rows, h, inter, false, true);
      st.bytes += (local_experts - 1) * h * inter * q.weight;
      out.push_back(std::move(st));
      kernels(grouped_kernels(local_experts), 1);
    }
    if (te && e.expert_bias) {
      // Megatron-Core adds the down projection's biases outside Transformer Engine's grouped
      // GEMM, weighted by each row's routing probability, expert by expert in eager PyTorch
      // (TEGroupedMLP._apply_bias, moe/experts.py from a329dd6, 2025-09, until the packed path of
      // #6000, 2026-08: `t + b * p` per expert, then torch.cat). Per BF16 element of the output:
      // b * p written (2 B), read with the output and the sum written (6 B), the cat's copy
      // (4 B); backward, autograd's mul gives the bias's and the probability's gradients, each a
      // product and a reduction over the rows (6 + 6 B). Kernels: two per expert and the cat.
      elementwise("experts_bias", 6 * workload::kActivationBytes * expert_rows * h, false);
      out.back().grad_bytes = 6 * workload::kActivationBytes * expert_rows * h;
      out.back().routed = sim::Routed::rows;
      kernels(2 * local_experts + 1, 1);
    }
    if (!deepep && local_experts > 1)
      permutation("ep_unsort", 2 * row * routed * p_.moe.etp, sim::Routed::rows, 3);
    collective("etp_scatter", OpKind::reduce_scatter, Category::ep_comm, kEp, g_.etp,
               workload::kActivationBytes * routed * p_.moe.etp * h);
    routed_last("etp_scatter", sim::Routed::rows);
    collective("ep_combine", OpKind::all_to_all, Category::ep_comm, kEp, g_.ep,
               workload::kActivationBytes * routed * h);
    routed_last("ep_combine", sim::Routed::exchange);
    deepep_bytes("ep_combine");
    if (rebalancing()) {
      spill_step("llep_refetch.node", g_.spill_node, true);
      spill_step("llep_refetch.net", g_.spill_net, true);
    }
    elementwise("experts_combine",
                workload::kActivationBytes * routed * h + workload::kActivationBytes * tm * h,
                false);
    if (e.num_shared_experts > 0) {
      // Shared experts are a dense MLP under the dense TP (Megatron-Core): on the gathered
      // sequence with the width split, between the SP gather and scatter.
      const double shared =
          static_cast<double>(e.num_shared_experts * e.shared_intermediate_size) / p_.dense.tp;
      if (sp)
        collective("shared_sp_gather", OpKind::all_gather, Category::tp_comm, kTp, tp_group,
                   workload::kActivationBytes * t * h);
      gemm("shared_gate_up", t, (e.gated ? 2 : 1) * shared, h);
      elementwise("shared_act", 3 * workload::kActivationBytes * t * shared * unfused.activation,
                  true);
      gemm("shared_down", t, h, shared);
      if (sp)
        collective("shared_sp_scatter", OpKind::reduce_scatter, Category::tp_comm, kTp, tp_group,
                   workload::kActivationBytes * t * h);
    }
  }
  elementwise("mlp_residual", 3 * workload::kActivationBytes * t * h / sp_, false);
  for (std::size_t i = mlp_begin; i < out.size(); ++i)
    out[i].owner = layer.mlp == MlpKind::moe ? LayerKind::moe : LayerKind::dense;
  return out;
}

int Lowering::tensor(std::string name, double bytes, sim::Device device, sim::MemoryKind kind,
                     bool resident) {
  rc_->tensors.push_back(sim::cost_tensor(std::move(name), bytes, device, kind, resident));
  return static_cast<int>(rc_->tensors.size()) - 1;
}

} // namespace

double host_issue_s(const Plan& plan, const LoweringContext& ctx) {
  // Megatron-Core launches its GEMMs, norms and casts through Transformer Engine's modules, whose
  // Python and C++ prologues cost far more host time than the kernels they launch. On GB200's
  // Grace, forward and backward (TransformerEngine PR #3523, 2026-09, before its change): Linear
  // BF16 311 us for 3 kernels (GEMM, dgrad, wgrad); Linear MXFP8 441 us for 6 (the input's, the
  // weight's and the gradient's casts besides); LayerNormLinear BF16 398 us for 6 (the norm and
  // its two backward kernels besides) and MXFP8 519 us for 8: 65-104 us a kernel, 77 on average.
  // A Grace core runs the same module code 2.75x slower than the Xeon 8480C of a DGX H100 (torch
  // Linear forward 37.08 vs 13.48 us, TransformerEngine issue #2053): 77 / 2.75 = 28 us a kernel
  // on an x86 host, which every node type in the catalog has.
  // Before Transformer Engine 2.10 (its first CPU-overhead reductions, PRs #2377 and #2400,
  // November 2025) the same Linear forward took 99.66 us on GB200 (issue #2053, August 2025)
  // against 59.19 us (PR #3523): 1.68x, 47 us a kernel.
  if (plan.family == "megatron")
    return ctx.transformer_engine && *ctx.transformer_engine < 210 ? 28e-6 * 99.66 / 59.19
                                                                   : 28e-6;
  // PyTorch eager without Transformer Engine (torchtitan, DeepSpeed-Ulysses): torch's Linear
  // forward, one GEMM, takes 13.48 us of CPU time on a DGX H100 (TransformerEngine issue #2053);
  // a bare eager op submits in ~8 us (flagos-ai/Torch-FL PR #27, FlagGems #4812).
  if (plan.family == "fsdp2" || plan.family == "ulysses-zero3")
    return 13.5e-6;
  // mop's executor launches from C++: a raw cuLaunchKernel enqueue takes 2.6-2.8 us (ocannl
  // issue #488).
  if (plan.family == "mop")
    return 2.7e-6;
  return 0;
}

std::optional<int> parse_transformer_engine(std::string_view version) {
  int major = 0, minor = 0;
  const char* const end = version.data() + version.size();
  auto [p, ec] = std::from_chars(version.data(), end, major);
  if (ec != std::errc{} || p == end || *p != '.')
    return std::nullopt;
  auto [q, ec2] = std::from_chars(p + 1, end, minor);
  if (ec2 != std::errc{} || (q != end && *q != '.') || major < 0 || major > 99 || minor < 0 ||
      minor > 99)
    return std::nullopt;
  return major * 100 + minor;
}

sim::AttentionKernel attention_kernel(const Plan& plan, const LoweringContext& ctx) {
  if (ctx.attention_kernel)
    return *ctx.attention_kernel;
  if (plan.family == "megatron" || plan.family == "fsdp2" || plan.family == "mop")
    return sim::AttentionKernel::cudnn;
  if (plan.family == "ulysses-zero3")
    return sim::AttentionKernel::flash2;
  return sim::AttentionKernel::flash;
}

const char* fp8_recipe_name(Fp8Recipe r) {
  switch (r) {
  case Fp8Recipe::delayed:
    return "delayed";
  case Fp8Recipe::current:
    return "current";
  case Fp8Recipe::mxfp8:
    return "mxfp8";
  case Fp8Recipe::tensorwise:
    return "tensorwise";
  case Fp8Recipe::rowwise:
    return "rowwise";
  }
  return "delayed";
}

std::optional<Fp8Recipe> parse_fp8_recipe(std::string_view name) {
  for (Fp8Recipe r : {Fp8Recipe::delayed, Fp8Recipe::current, Fp8Recipe::mxfp8,
                      Fp8Recipe::tensorwise, Fp8Recipe::rowwise})
    if (name == fp8_recipe_name(r))
      return r;
  return std::nullopt;
}

const char* ep_dispatcher_name(EpDispatcher d) {
  switch (d) {
  case EpDispatcher::deepep:
    return "deepep";
  case EpDispatcher::hybridep:
    return "hybridep";
  case EpDispatcher::alltoall:
    break;
  }
  return "alltoall";
}

std::optional<EpDispatcher> parse_ep_dispatcher(std::string_view name) {
  if (name == "alltoall")
    return EpDispatcher::alltoall;
  if (name == "deepep")
    return EpDispatcher::deepep;
  if (name == "hybridep")
    return EpDispatcher::hybridep;
  return std::nullopt;
}

double expected_remote_nodes(double experts, double top_k, int nodes) {
  if (nodes <= 1 || experts <= 0 || top_k <= 0)
    return 0;
  // P(a given node holds none of the k picks) = prod_{i<k} (E - E/n - i) / (E - i).
  const double per_node = experts / nodes;
  double miss = 1;
  for (int i = 0; i < static_cast<int>(top_k); ++i)
    miss *= std::max(0.0, experts - per_node - i) / (experts - i);
  return (nodes - 1) * (1 - miss);
}

EagerTraffic eager_traffic() {
  // Bytes per element of the BF16 activation, against the fused kernel's (docs/HARDWARE.md):
  // - RMSNorm (torchtitan models/norms.py): x.float() 2+4, pow(2) 4+4, mean 4, x * rsqrt 4+4,
  //   type_as 4+2, * weight 2+2 = 36 B, against 4 fused (read 2, write 2): 9x.
  // - RoPE (apply_rotary_emb): float() 2+4, complex product with freqs_cis 4+4, type_as 4+2 =
  //   20 B, against 4 fused: 5x.
  // - SwiGLU (F.silu(w1(x)) * w3(x)): silu 2+2, product 2+2+2 = 10 B per element of the
  //   intermediate, against 6 fused: 5/3.
  return EagerTraffic{36.0 / 4, 20.0 / 4, 10.0 / 6};
}

Fp8Recipe fp8_recipe(const Plan& plan, const LoweringContext& ctx) {
  if (ctx.fp8_recipe)
    return *ctx.fp8_recipe;
  // torchtitan's float8 converter defaults to row-wise scaling (torchtitan
  // components/quantization/float8.py); Megatron-Core plans run current scaling, the recipe
  // Megatron-Bridge's FP8 tables use ("FP8-CS") and mop writes into a Megatron-LM launch
  // (--fp8-recipe tensorwise); DeepSpeed's Transformer Engine layers TE's default, delayed.
  if (plan.family == "fsdp2")
    return Fp8Recipe::rowwise;
  if (plan.family == "ulysses-zero3")
    return Fp8Recipe::delayed;
  return Fp8Recipe::current;
}

QuantizeTraffic quantize_traffic(Fp8Recipe recipe, bool transposes) {
  // Bytes per element of the tensor quantized (docs/HARDWARE.md "FP8 quantization"), read in
  // TransformerEngine d0067d0 (pytorch/module/linear.py, layernorm_linear.py, tensor/
  // float8_tensor.py, common/transpose/cast_transpose.cu) and torchao's float8 cost model
  // (torchao/float8 roofline_utils.py), one cast reading BF16 (2 B) and writing FP8 (1 B):
  switch (recipe) {
  case Fp8Recipe::delayed:
    // One cast-transpose kernel (amax computed inside) writes the FP8 copy and, on Hopper, its
    // transpose: 4 B (3 without the transpose). After TE's LayerNormLinear the norm writes FP8
    // itself; only the transpose remains (2 B; none on Blackwell). Weights: once per step.
    return transposes ? QuantizeTraffic{4, 2, 4, 0, 1} : QuantizeTraffic{3, 0, 3, 0, 1};
  case Fp8Recipe::current:
    // A separate amax pass reads the tensor again (+2 B) and a scale kernel runs between; the
    // norm computes the amax but writes BF16, which the cast reads back.
    return transposes ? QuantizeTraffic{6, 4, 6, 0, 3} : QuantizeTraffic{5, 3, 5, 0, 3};
  case Fp8Recipe::mxfp8:
    // One kernel reads once and writes the row-wise and column-wise copies with their 1-in-32
    // E8M0 scales; the norm is not fused by default.
    return QuantizeTraffic{4.0625, 4.0625, 4.0625, 0, 1};
  case Fp8Recipe::tensorwise:
    // torchao: an amax then a cast per operand and direction, the weight cast every
    // micro-batch (8 B per weight element).
    return QuantizeTraffic{6, 6, 6, 8, 2};
  case Fp8Recipe::rowwise:
    // torchao row-wise: the column-wise scales need a BF16 transpose written first.
    return QuantizeTraffic{8, 8, 8, 10, 2};
  }
  return {};
}

namespace {

int Lowering::add(sim::Op&& op, bool on_path) {
  if (on_path && cursor_ >= 0)
    op.deps.push_back(cursor_);
  std::sort(op.deps.begin(), op.deps.end());
  op.deps.erase(std::unique(op.deps.begin(), op.deps.end()), op.deps.end());
  rc_->ops.push_back(std::move(op));
  if (path_log_ != nullptr)
    path_log_->push_back(on_path);
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
  op.attention.kernel = attention_kernel_;
  op.bytes = st.bytes;
  op.group = st.group;
  op.layer = layer;
  op.micro_batch = mb;
  op.routed = st.routed;
  op.kernels = st.kernels;
  op.host_sync = st.host_sync;
  op.rdma_bytes = st.rdma_bytes;
  op.nvl_bytes = st.nvl_bytes;
  op.model_flops = category == Category::forward ? st.flops : 0;
  if ((st.kind == OpKind::gemm || st.kind == OpKind::grouped_gemm) && !st.high_precision)
    op.dtype = c_.gemm_dtype;
  return op;
}

// Attention over `steps` ring steps (1: a plain call). Forward: step i computes on the K/V block
// that arrived in step i-1 while step i's block travels on the CP stream (steps - 1 hops).
// Backward: the K/V blocks travel the same steps - 1 hops, and each block's gradient (dK/dV)
// follows it, one hop after every step, the last hop bringing each rank's own gradient home
// (steps hops): the q/k/v projections' backward waits for it.
int Lowering::emit_attention(const Step& st, const std::string& prefix, Category category,
                             int layer, int mb, bool backward) {
  const int steps = std::max(1, st.ring_steps);
  const int start = cursor_;
  auto ring_hop = [&](const char* what, int i, std::vector<int> deps) {
    sim::Op comm;
    comm.name = label("{}.{}.{}", prefix, what, i);
    comm.kind = OpKind::send_recv;
    comm.category = Category::cp_comm;
    comm.stream = kCp;
    comm.bytes = st.ring_bytes;
    comm.group = g_.cp_ring;
    comm.layer = layer;
    comm.micro_batch = mb;
    comm.deps = std::move(deps);
    comm.deps.erase(std::remove(comm.deps.begin(), comm.deps.end(), -1), comm.deps.end());
    return comm;
  };
  // PyTorch's all-gather rotater gathers every K/V block at once, forward and again in
  // backward. The gathered blocks, and in backward PyTorch's FP32 gradient accumulators, live
  // until the attention ends.
  int gathered = -1, buffers = -1;
  const bool torch_ring = st.ring_merge_bytes > 0;
  if (torch_ring && steps > 1) {
    const double gathered_bytes = st.ring_gather ? st.ring_bytes * steps : 0;
    const double bytes = gathered_bytes + (backward ? st.ring_grad_buffer_bytes : 0);
    if (bytes > 0)
      buffers = tensor(
          label("{} {}", prefix, st.ring_gather ? "gathered K/V" : "FP32 K/V and query gradients"),
          bytes, sim::Device::hbm, sim::MemoryKind::comm_buffers);
    if (st.ring_gather) {
      sim::Op gather = ring_hop(backward ? "ring_kv_gather_bwd" : "ring_kv_gather", 0, {start});
      gather.kind = OpKind::all_gather;
      gather.bytes = gathered_bytes;
      gathered = add(std::move(gather), false);
    }
  }
  auto merge = [&](int i, double bytes) {
    sim::Op op;
    op.name = label("{}.merge{}.{}", prefix, backward ? ".bwd" : "", i);
    op.kind = OpKind::elementwise;
    op.category = category;
    op.bytes = bytes;
    op.layer = layer;
    op.micro_batch = mb;
    op.kernels = 6;
    return add(std::move(op));
  };
  int prev_kv = -1, prev_dkv = -1, last = -1;
  for (int i = 0; i < steps; ++i) {
    int kv = -1;
    if (gathered >= 0)
      kv = i + 1 < steps ? gathered : -1;
    else if (i + 1 < steps)
      kv = add(ring_hop(backward ? "ring_kv_bwd" : "ring_kv", i, {start, prev_kv}), false);
    const std::string name = steps > 1 ? label("{}{}.{}", prefix, backward ? ".bwd" : "", i)
                                       : label_with(prefix, backward ? ".bwd" : "");
    sim::Op compute = op_of(st, name, category, layer, mb);
    if (backward) {
      compute.kind = OpKind::attention_bwd;
      compute.model_flops = 2 * st.flops / steps;
    } else {
      compute.model_flops = category == Category::forward ? st.flops / steps : 0;
    }
    if (prev_kv >= 0)
      compute.deps.push_back(prev_kv);
    const int computed = add(std::move(compute));
    if (i == 0 && buffers >= 0)
      rc_->ops[static_cast<std::size_t>(gathered >= 0 ? gathered : computed)].allocs.push_back(
          buffers);
    last = computed;
    if (torch_ring && (backward || i > 0))
      last = merge(i, backward ? st.ring_merge_grad_bytes : st.ring_merge_bytes);
    // The block's accumulated gradient leaves once this step's share is added to what arrived
    // with it (the next step accumulates locally meanwhile, as Transformer Engine's ring does);
    // the last hop brings my own block's gradient home, on the data path.
    if (backward && steps > 1) {
      sim::Op dkv = ring_hop("ring_dkv", i, {last, prev_dkv});
      if (torch_ring)
        dkv.bytes *= 2; // FP32
      prev_dkv = last = add(std::move(dkv), i + 1 == steps);
    }
    prev_kv = kv;
  }
  if (buffers >= 0)
    rc_->ops[static_cast<std::size_t>(last)].frees.push_back(buffers);
  return last;
}

int Lowering::emit_forward(const Step& st, const std::string& prefix, Category category, int layer,
                           int mb) {
  if (st.backward_only)
    return cursor_;
  if (st.kind == OpKind::attention_fwd)
    return emit_attention(st, prefix, category, layer, mb, false);
  sim::Op op = op_of(st, prefix, category, layer, mb);
  if (st.routed == sim::Routed::spill && spill_copies_ < 0) {
    // The copies this rank receives for the layer: none until the expansion sizes them.
    spill_copies_ = tensor(label("L{} expert copies mb{}", layer, mb), 0, sim::Device::hbm,
                           sim::MemoryKind::comm_buffers);
    note_spill(spill_copies_, layer);
    op.allocs.push_back(spill_copies_);
  } else if (st.name == "experts_down" && spill_copies_ >= 0) {
    op.frees.push_back(spill_copies_);
    spill_copies_ = -1;
  }
  return add(std::move(op));
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

std::vector<sim::Op> Lowering::reduction_chain(const ParamBucket& b, const std::string& what,
                                               int layer, int mb, bool last_mb,
                                               int tied_group) const {
  std::vector<sim::Op> ops;
  if (!last_mb && !(b.zero >= 3 && layer >= 0 && !whole_step(b)))
    return ops;
  auto reduction = [&](const char* step, OpKind kind, int group, double bytes) {
    sim::Op op;
    op.name = label("{}.{}.{}.mb{}", what, b.name, step, mb);
    op.kind = kind;
    op.category = Category::dp_comm;
    op.stream = kDp;
    op.group = group;
    op.bytes = bytes;
    op.micro_batch = mb;
    op.layer = layer;
    ops.push_back(std::move(op));
  };
  if (b.tp_sum >= 0) {
    reduction("grad_tp_sum", OpKind::all_reduce, b.tp_sum, kGrad * b.tp_sum_params);
    ops.back().category = Category::tp_comm;
    ops.back().stream = kTp;
  }
  if (b.zero == 0 && b.all_reduce >= 0)
    reduction("grad_reduce", OpKind::all_reduce, b.all_reduce, kGrad * b.params);
  if (b.zero > 0 && b.shard >= 0)
    reduction("grad_reduce", OpKind::reduce_scatter, b.shard, kGrad * b.params);
  if (last_mb && b.zero > 0 && b.replicas >= 0)
    reduction("grad_replicas", OpKind::all_reduce, b.replicas, kGrad * b.params / b.shard_ranks);
  if (last_mb && b.embedding && tied_group >= 0)
    reduction("tied_grad_sum", OpKind::all_reduce, tied_group,
              kGrad * b.params / (b.zero > 0 ? b.shard_ranks : 1));
  return ops;
}

std::vector<sim::Op> Lowering::param_gather_ops(const std::vector<ParamBucket>& list,
                                                const std::string& what, int layer) const {
  std::vector<sim::Op> ops;
  for (const ParamBucket& b : list) {
    if ((b.zero != 1 && b.zero != 2) || b.shard < 0)
      continue;
    sim::Op op;
    op.name = label("{}.{}.param_gather", what, b.name);
    op.kind = OpKind::all_gather;
    op.category = Category::dp_comm;
    op.stream = kDp;
    op.group = b.shard;
    op.bytes = workload::kActivationBytes * b.params;
    op.layer = layer;
    ops.push_back(std::move(op));
  }
  return ops;
}

sim::Op Lowering::fsdp_gather_op(const ParamBucket& b, const std::string& what, const char* pass,
                                 int layer, int mb) const {
  sim::Op op;
  op.name = label("{}.{}.fsdp_gather.{}", what, b.name, pass);
  op.kind = OpKind::all_gather;
  op.category = Category::dp_comm;
  op.stream = kDp;
  op.bytes = workload::kActivationBytes * b.params;
  op.group = b.shard;
  op.layer = layer;
  op.micro_batch = mb;
  return op;
}

std::vector<sim::Op> Lowering::step_gather_ops(const std::vector<ParamBucket>& list,
                                               const std::string& what) const {
  std::vector<sim::Op> ops;
  for (const ParamBucket& b : list)
    if (b.zero >= 3 && b.shard >= 0 && whole_step(b))
      ops.push_back(fsdp_gather_op(b, what, "fwd", 0, 0));
  return ops;
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

double Lowering::layer_shard_params(const LayerSpec& layer) const {
  const KindParams local = layer_local_params(m_, layer, p_);
  double shard = 0;
  for (LayerKind k : {LayerKind::attention, LayerKind::moe, LayerKind::dense})
    shard += local[k] / shard_degree(p_, k);
  return shard;
}

double Lowering::stage_shard_params(const std::vector<int>& layer_ids, bool first,
                                    bool last) const {
  double shard = 0;
  for (int l : layer_ids)
    shard += layer_shard_params(m_.layers[static_cast<std::size_t>(l)]);
  if (first || last)
    shard += embedding_local_params(m_, p_) *
             ((first ? 1 : 0) + (last && !(first && m_.tied_embeddings) ? 1 : 0)) /
             shard_degree(p_, LayerKind::embedding);
  return shard;
}

sim::Op Lowering::embedding_op(int mb) const {
  sim::Op e;
  e.name = label("embedding.mb{}", mb);
  e.kind = OpKind::elementwise;
  e.category = Category::forward;
  e.bytes = 2 * workload::kActivationBytes * tokens_ * static_cast<double>(m_.hidden_size);
  e.micro_batch = mb;
  return e;
}

// The LM head's GEMM; its backward prices the input and weight gradients as one op.
sim::Op Lowering::head_op(int mb, bool backward) const {
  sim::Op head;
  head.name = backward ? label("lm_head.mb{}.bwd", mb) : label("lm_head.mb{}", mb);
  head.kind = OpKind::gemm;
  head.category = backward ? Category::backward : Category::forward;
  const double v = vocab_per_rank();
  const double h = static_cast<double>(m_.hidden_size);
  head.gemm =
      backward ? sim::GemmShape{tokens_, h, v, 2, {}} : sim::GemmShape{tokens_, v, h, 1, {}};
  head.model_flops = (backward ? 4 : 2) * tokens_ * v * h;
  head.micro_batch = mb;
  return head;
}

sim::Op Lowering::loss_op(int mb) const {
  sim::Op loss;
  loss.name = label("loss.mb{}", mb);
  loss.kind = OpKind::elementwise;
  loss.category = Category::forward;
  loss.bytes = workload::kActivationBytes * tokens_ * vocab_per_rank() * 3;
  loss.micro_batch = mb;
  return loss;
}

// Vocabulary parallelism's collectives over the embedding TP group `group`.
sim::Op Lowering::embedding_tp_op(const char* name, OpKind kind, int mb, int group) const {
  sim::Op op;
  op.name = label("{}.mb{}", name, mb);
  op.kind = kind;
  op.category = Category::tp_comm;
  op.stream = kTp;
  op.group = group;
  op.bytes = kind == OpKind::all_reduce
                 ? 4 * tokens_
                 : workload::kActivationBytes * tokens_ * static_cast<double>(m_.hidden_size);
  op.micro_batch = mb;
  return op;
}

// Recompute (full: every step of the block, its collectives included; selective: the steps
// marked for it), then the backward of every step in reverse.
void Lowering::emit_layer_backward(const std::vector<Step>& steps, int layer, int mb) {
  for (const Step& st : steps) {
    const Recompute r = p_.recompute[static_cast<int>(st.owner)];
    if (r == Recompute::none || (r == Recompute::selective && !selective_recomputes(st)))
      continue;
    emit_forward(st, label("L{}.{}.mb{}.recompute", layer, st.name, mb), Category::recompute, layer,
                 mb);
  }
  for (auto it = steps.rbegin(); it != steps.rend(); ++it)
    emit_backward(*it, label("L{}.{}.mb{}", layer, it->name, mb), layer, mb);
}

bool Lowering::selective_recomputes(const Step& st) const {
  if (!torch_op_sac(p_) || m_.attention.kind != AttentionKind::gqa)
    return st.selective_keep;
  // torchtitan's op-level SAC (torchtitan 9dec370 parallelize_llama.py, _save_list): matmul and
  // flash-attention outputs are saved, but every second matmul of the block is recomputed (wk,
  // wo, w3 of wq, wk, wv, wo, w1, w3, w2), with every elementwise op.
  if (st.kind == OpKind::attention_fwd)
    return false;
  if (st.name == "k_proj" || st.name == "o_proj" || st.name == "mlp_up")
    return true;
  if (st.kind == OpKind::gemm || st.kind == OpKind::grouped_gemm)
    return false;
  return st.selective_keep;
}

void Lowering::emit_wgrad(sim::Op&& wgrad) {
  if (defer_wgrad_) {
    wgrad.deps.push_back(cursor_);
    pending_wgrad_.push_back(std::move(wgrad));
  } else {
    add(std::move(wgrad));
  }
}

void Lowering::emit_backward(const Step& st, const std::string& prefix, int layer, int mb) {
  if (st.forward_only)
    return;
  switch (st.kind) {
  case OpKind::gemm: {
    // dX = dY·Wᵀ (m x k over n) and dW = Xᵀ·dY (k x n over m): twice the forward FLOPs.
    sim::Op dgrad = op_of(st, label_with(prefix, ".dgrad"), Category::backward, layer, mb);
    dgrad.gemm = sim::GemmShape{st.gemm.m, st.gemm.k, st.gemm.n, st.gemm.instances, {}};
    dgrad.model_flops = st.flops;
    dgrad.bytes = st.grad_bytes;
    add(std::move(dgrad));
    sim::Op wgrad = op_of(st, label_with(prefix, ".wgrad"), Category::backward, layer, mb);
    wgrad.gemm = sim::GemmShape{st.gemm.k, st.gemm.n, st.gemm.m, st.gemm.instances, {}};
    wgrad.model_flops = st.flops;
    wgrad.bytes = 0;
    emit_wgrad(std::move(wgrad));
    return;
  }
  case OpKind::grouped_gemm: {
    sim::Op dgrad = op_of(st, label_with(prefix, ".dgrad"), Category::backward, layer, mb);
    dgrad.gemm.n = st.gemm.k;
    dgrad.gemm.k = st.gemm.n;
    dgrad.model_flops = st.flops;
    dgrad.bytes = st.grad_bytes;
    add(std::move(dgrad));
    // Weight gradient per expert: (k x n) over that expert's rows; priced as the same grouped
    // shape with the reduction over rows (FLOPs equal).
    sim::Op wgrad = op_of(st, label_with(prefix, ".wgrad"), Category::backward, layer, mb);
    wgrad.model_flops = st.flops;
    wgrad.bytes = 0;
    emit_wgrad(std::move(wgrad));
    return;
  }
  case OpKind::attention_fwd:
    emit_attention(st, prefix, Category::backward, layer, mb, true);
    return;
  case OpKind::barrier: { // rebalancing's copies: fetched again, or their gradients returned
    sim::Op op = op_of(st, label_with(prefix, st.backward_only ? "" : ".bwd"), Category::backward,
                       layer, mb);
    if (st.backward_only && spill_copies_ < 0) {
      // The copies and, beside them, their gradients until they return.
      spill_copies_ = tensor(label("L{} expert copies and gradients mb{}", layer, mb), 0,
                             sim::Device::hbm, sim::MemoryKind::comm_buffers);
      note_spill(spill_copies_, layer, 2);
      op.allocs.push_back(spill_copies_);
    } else if (!st.backward_only && st.group == g_.spill_node && spill_copies_ >= 0) {
      op.frees.push_back(spill_copies_); // the last of the returns
      spill_copies_ = -1;
    }
    add(std::move(op));
    return;
  }
  case OpKind::elementwise: {
    sim::Op op = op_of(st, label_with(prefix, st.backward_only ? "" : ".bwd"), Category::backward,
                       layer, mb);
    // Reads the saved input and the incoming gradient, writes the gradient; a backward-only
    // kernel says its own traffic.
    // A pure copy (a token permutation) says its backward's bytes in grad_bytes.
    op.bytes = st.backward_only ? st.bytes : st.grad_bytes > 0 ? st.grad_bytes : 2 * st.bytes;
    add(std::move(op));
    return;
  }
  case OpKind::all_gather: // the transpose of a gather is a reduce-scatter, and vice versa
  case OpKind::reduce_scatter:
  case OpKind::all_reduce:
  case OpKind::all_to_all:
  case OpKind::send_recv: { // a halo's gradients travel back the way it came
    sim::Op op = op_of(st, label_with(prefix, ".bwd"), Category::backward, layer, mb);
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
  const MemoryReport mem = analyze_memory(m_, p_, c_.seq, c_.hw, activations_);
  s_.world = p_.world;
  s_.gpus_per_node = c_.gpus_per_node;
  s_.tokens_per_step = static_cast<double>(p_.global_batch) * static_cast<double>(c_.seq);
  s_.host_issue_s = host_issue_s(p_, c_);
  s_.classes.resize(static_cast<std::size_t>(p_.pp));
  routed_tensors_.assign(static_cast<std::size_t>(p_.pp), {});
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
  const double pp_bytes = workload::kActivationBytes * tokens_ * h / sp_;
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
    // The stages' programs are about the same size: size this one as the previous one, so that
    // building it does not copy a growing op list.
    if (stage > 0)
      rc.ops.reserve(s_.classes[static_cast<std::size_t>(stage) - 1].ops.size() * 9 / 8);
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
    std::vector<std::vector<ParamBucket>> buckets(static_cast<std::size_t>(n_layers));
    for (int i = 0; i < n_layers; ++i) {
      const LayerSpec& layer =
          m_.layers[static_cast<std::size_t>(layer_id[static_cast<std::size_t>(i)])];
      steps[static_cast<std::size_t>(i)] = layer_steps(layer);
      local[static_cast<std::size_t>(i)] = layer_local_params(m_, layer, p_);
      buckets[static_cast<std::size_t>(i)] =
          layer_buckets(layer, local[static_cast<std::size_t>(i)]);
      saved[static_cast<std::size_t>(i)] =
          saved_activation_bytes(m_, layer, p_, c_.seq, c_.activations);
      full[static_cast<std::size_t>(i)] =
          layer_activation_bytes(m_, layer, p_, c_.seq, Recompute::none, c_.activations);
    }
    if (stage == 0) {
      // The first stage's program, sized from its layers' steps (a forward op per step, a ring
      // step per hop, two or three per step in backward, with recompute): growing it op by op
      // would move every op several times.
      std::size_t per_micro = 32;
      for (const std::vector<Step>& layer_steps : steps)
        for (const Step& st : layer_steps)
          per_micro += 5 + 3 * static_cast<std::size_t>(std::max(0, st.ring_steps));
      rc.ops.reserve(per_micro * static_cast<std::size_t>(micro));
    }
    // The embedding kind on this stage; the buckets the embedding lookup reads, and those the LM
    // head reads (the final norm, the head weight or the tied table).
    const std::vector<ParamBucket> emb_buckets = embedding_buckets(first, last);
    const EmbeddingBuckets emb_split = split_embedding_buckets(emb_buckets, m_.tied_embeddings);
    const std::vector<ParamBucket>& table_buckets = emb_split.table;
    const std::vector<ParamBucket>& head_buckets = emb_split.head;
    const int etp_group = comm_group("tp.embedding", embed_tp_group());
    // The tied table's copies on the first and last stage: a pair of ranks at the same place in
    // their stages (on one node only if both stages fit in it).
    int tied_group = -1;
    if (m_.tied_embeddings && p_.pp > 1) {
      const int apart = (p_.pp - 1) * p_.ranks_per_stage();
      const int gpn = c_.gpus_per_node;
      s_.groups.push_back(
          sim::Group{"embedding.tied", 2, apart >= gpn ? 1 : std::min(2, gpn / apart), {}});
      tied_group = static_cast<int>(s_.groups.size()) - 1;
    }

    std::map<std::string, int> step_gathers; // whole_step buckets: their one gather
    // ZeRO-3 gathers of `list` (one all-gather per bucket, over its shard group); returns the ops
    // the compute must wait for. `gate` is the op that bounds prefetch to one layer ahead.
    auto gather_buckets = [&](const std::vector<ParamBucket>& list, const std::string& what,
                              int layer, int mb, int gate, const char* pass) {
      std::vector<int> ops;
      for (const ParamBucket& b : list) {
        if (b.zero < 3 || b.shard < 0)
          continue;
        const bool once = whole_step(b);
        const std::string key = what + "." + b.name;
        if (once) {
          if (const auto it = step_gathers.find(key); it != step_gathers.end()) {
            ops.push_back(it->second);
            continue;
          }
        }
        int upload = -1;
        if (p_.params == Placement::host) { // FSDP2 CPU offload: bring the shard to HBM first
          sim::Op up;
          up.name = label("{}.{}.param_upload.{}", what, b.name, pass);
          up.kind = OpKind::copy_h2d;
          up.category = Category::offload;
          up.stream = kH2d;
          up.bytes = workload::kActivationBytes * b.params / b.shard_ranks;
          up.layer = layer;
          up.micro_batch = mb;
          if (gate >= 0)
            up.deps.push_back(gate);
          upload = add(std::move(up), false);
        }
        sim::Op op = fsdp_gather_op(b, what, pass, layer, mb);
        if (gate >= 0)
          op.deps.push_back(gate);
        if (upload >= 0)
          op.deps.push_back(upload);
        // A whole-step gather lands in the unsharded parameters the resident weights count.
        if (!once)
          op.allocs.push_back(tensor(label("{}.{} gathered ({} mb{})", what, b.name, pass, mb),
                                     workload::kActivationBytes * b.params, Device::hbm,
                                     MemoryKind::comm_buffers));
        const int id = add(std::move(op), false);
        if (once)
          step_gathers[key] = id;
        ops.push_back(id);
      }
      return ops;
    };
    // Vocabulary parallelism with SP (Megatron's VocabParallelEmbedding and
    // vocab_parallel_cross_entropy): the embedding's partial rows reduce-scatter over the
    // embedding tp group (an all-gather of their gradients in backward); the head gathers the
    // sequence-parallel rows (a reduce-scatter in backward) and the loss all-reduces each row's
    // max, its target logit and its sum of exponentials (FP32).
    auto embedding_tp_op = [&](const char* name, OpKind kind, int mb) {
      return this->embedding_tp_op(name, kind, mb, etp_group);
    };
    // ZeRO 1 and 2: the all-gathers of `list`'s updated parameters after op `after`, chained on
    // the DP stream; returns the last (or `after` when there is none).
    auto param_gathers = [&](const std::vector<ParamBucket>& list, const std::string& what,
                             int layer, int after) {
      int last_op = after;
      for (sim::Op& op : param_gather_ops(list, what, layer)) {
        op.deps = {last_op};
        last_op = add(std::move(op), false);
      }
      return last_op;
    };
    auto gather = [&](int i, int mb, int gate, const char* pass) {
      const int l = layer_id[static_cast<std::size_t>(i)];
      return gather_buckets(buckets[static_cast<std::size_t>(i)], label("L{}", l), l, mb, gate,
                            pass);
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
        const double shard_params = layer_shard_params(
            m_.layers[static_cast<std::size_t>(layer_id[static_cast<std::size_t>(i)])]);
        sim::Op adam = host_adam_op(label("L{}.adam", layer_id[static_cast<std::size_t>(i)]),
                                    shard_params, layer_id[static_cast<std::size_t>(i)]);
        const int a = add(std::move(adam), false);
        sim::Op up;
        up.name = label("L{}.param_upload", layer_id[static_cast<std::size_t>(i)]);
        up.kind = OpKind::copy_h2d;
        up.category = Category::optimizer;
        up.stream = kH2d;
        up.bytes = workload::kActivationBytes * shard_params;
        up.layer = layer_id[static_cast<std::size_t>(i)];
        up.deps = {a};
        param_ready[static_cast<std::size_t>(i)] =
            param_gathers(buckets[static_cast<std::size_t>(i)],
                          label("L{}", layer_id[static_cast<std::size_t>(i)]),
                          layer_id[static_cast<std::size_t>(i)], add(std::move(up), false));
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
        sim::Op r = pipeline_op(label("recv_act.mb{}", mb), OpKind::recv,
                                stage > 0 ? stage - 1 : p_.pp - 1, mb, 0);
        recv_fwd[static_cast<std::size_t>(stage)][key] = add(std::move(r));
      } else {
        const std::vector<int> gathers =
            gather_buckets(table_buckets, "embedding", -1, mb, -1, "fwd");
        sim::Op e = embedding_op(mb);
        e.deps = gathers;
        free_gathered(gathers, add(std::move(e)));
        if (etp_group >= 0)
          add(embedding_tp_op("embedding_sp_scatter", OpKind::reduce_scatter, mb));
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
        sv.kept = tensor(label("L{} saved mb{}", l, mb), s_bytes * (1 - off), Device::hbm,
                         MemoryKind::activations);
        note_routed(sv.kept, l);
        if (off > 0) {
          sv.offloaded = tensor(label("L{} saved mb{} (to offload)", l, mb), s_bytes * off,
                                Device::hbm, MemoryKind::activations);
          note_routed(sv.offloaded, l);
        }
        bool first_op = true;
        for (const Step& st : steps[static_cast<std::size_t>(i)]) {
          const int before = static_cast<int>(rc.ops.size());
          emit_forward(st, label("L{}.{}.mb{}", l, st.name, mb), Category::forward, l, mb);
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
          d2h.name = label("L{}.act_offload.mb{}", l, mb);
          d2h.kind = OpKind::copy_d2h;
          d2h.category = Category::offload;
          d2h.stream = kD2h;
          d2h.bytes = s_bytes * off;
          d2h.layer = l;
          d2h.micro_batch = mb;
          d2h.deps = {cursor_};
          sv.host = tensor(label("L{} saved mb{} (host)", l, mb), s_bytes * off, Device::host,
                           MemoryKind::activations);
          note_routed(sv.host, l);
          if (m_.layers[static_cast<std::size_t>(l)].mlp == MlpKind::moe)
            d2h.routed = sim::Routed::saved;
          d2h.allocs = {sv.host};
          d2h.frees = {sv.offloaded};
          sv.d2h = add(std::move(d2h), false);
        }
      }
      if (heads) {
        const std::vector<int> gathers = gather_buckets(head_buckets, "head", -1, mb, -1, "fwd");
        if (etp_group >= 0) {
          sim::Op ag = embedding_tp_op("head_sp_gather", OpKind::all_gather, mb);
          ag.deps = gathers;
          add(std::move(ag));
        }
        sim::Op head = head_op(mb, false);
        head.deps = gathers;
        logits[static_cast<std::size_t>(mb)] =
            tensor(label("logits mb{}", mb), logits_bytes(m_, p_, c_.seq, activations_),
                   Device::hbm, MemoryKind::activations);
        head.allocs = {logits[static_cast<std::size_t>(mb)]};
        add(std::move(head));
        if (etp_group >= 0)
          add(embedding_tp_op("loss_max", OpKind::all_reduce, mb));
        add(loss_op(mb));
        if (etp_group >= 0) {
          add(embedding_tp_op("loss_target", OpKind::all_reduce, mb));
          add(embedding_tp_op("loss_sum_exp", OpKind::all_reduce, mb));
        }
        free_gathered(gathers, cursor_);
      } else {
        sim::Op snd = pipeline_op(label("send_act.mb{}", mb), OpKind::send, last ? 0 : stage + 1,
                                  mb, pp_bytes);
        snd.deps = {cursor_};
        send_fwd[static_cast<std::size_t>(stage)][key] = add(std::move(snd), false);
      }
    };

    std::vector<int> layer_bwd_end(static_cast<std::size_t>(n_layers), -1);
    // Gradient reduction of a bucket after op `after`: ZeRO-3 (FSDP2) reduce-scatters a layer's
    // buckets every micro-batch (once per step in a pipeline stage: whole_step above); the
    // others, and the embedding kind, reduce on the last
    // (Megatron's overlap_grad_reduce): ZeRO-0 all-reduces, ZeRO 1 and 2 reduce-scatter (each
    // rank steps only its shard). HSDP then all-reduces the shard over the replicas once per
    // step, and tied embeddings sum the first and last stages' copies.
    std::vector<int> grad_ready; // ops after which this step's gradients are reduced / on host
    auto reduce_bucket = [&](const ParamBucket& b, const std::string& what, int layer, int mb,
                             bool last_mb, int end) {
      int r = -1;
      std::vector<sim::Op> ops = reduction_chain(b, what, layer, mb, last_mb, tied_group);
      if (ops.empty())
        return;
      ops.front().deps = {end};
      // ZeRO 0 and 1 keep every gradient whole (the resident gradients) and reduce them in
      // place (Megatron-Core's grad buffer: an all-reduce, or a reduce-scatter into the rank's
      // view of it); sharded gradients are written whole first, then reduced into the shard.
      if (b.zero >= 2) {
        const int buf = tensor(label("{}.{} unsharded grads mb{}", what, b.name, mb),
                               kGrad * b.params, Device::hbm, MemoryKind::comm_buffers);
        rc.ops[static_cast<std::size_t>(end)].allocs.push_back(buf);
        ops.front().frees = {buf};
      }
      for (sim::Op& op : ops) {
        if (r >= 0)
          op.deps = {r};
        r = add(std::move(op), false);
      }
      if (last_mb && p_.grads == Placement::host) {
        sim::Op d2h;
        d2h.name = label("{}.{}.grad_download", what, b.name);
        d2h.kind = OpKind::copy_d2h;
        d2h.category = Category::offload;
        d2h.stream = kD2h;
        d2h.bytes = kGrad * b.params / b.shard_ranks;
        d2h.layer = layer;
        d2h.deps = {r};
        r = add(std::move(d2h), false);
      }
      if (last_mb)
        grad_ready.push_back(r);
    };
    auto reduce_grads = [&](int i, int mb, bool last_mb, int after) {
      const int l = layer_id[static_cast<std::size_t>(i)];
      for (const ParamBucket& b : buckets[static_cast<std::size_t>(i)])
        reduce_bucket(b, label("L{}", l), l, mb, last_mb, after);
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
        const std::vector<int> gathers = gather_buckets(head_buckets, "head", -1, mb, -1, "bwd");
        sim::Op head = head_op(mb, true);
        head.deps = gathers;
        head.frees = {logits[static_cast<std::size_t>(mb)]};
        add(std::move(head));
        if (etp_group >= 0)
          add(embedding_tp_op("head_sp_gather.bwd", OpKind::reduce_scatter, mb));
        free_gathered(gathers, cursor_);
      } else {
        sim::Op r =
            pipeline_op(label("recv_grad.mb{}", mb), OpKind::recv, last ? 0 : stage + 1, mb, 0);
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
          h2d.name = label("L{}.act_reload.mb{}", l, mb);
          h2d.kind = OpKind::copy_h2d;
          h2d.category = Category::offload;
          h2d.stream = kH2d;
          h2d.bytes = rc.tensors[static_cast<std::size_t>(sv.host)].bytes;
          h2d.layer = l;
          h2d.micro_batch = mb;
          h2d.deps = {sv.d2h};
          if (gate >= 0)
            h2d.deps.push_back(gate);
          sv.reload = tensor(label("L{} saved mb{} (reloaded)", l, mb),
                             rc.tensors[static_cast<std::size_t>(sv.host)].bytes, Device::hbm,
                             MemoryKind::activations);
          note_routed(sv.reload, l);
          if (m_.layers[static_cast<std::size_t>(l)].mlp == MlpKind::moe)
            h2d.routed = sim::Routed::saved;
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
              label("L{} recomputed mb{}", l, mb),
              std::max(0.0, full[static_cast<std::size_t>(i)] - saved[static_cast<std::size_t>(i)]),
              Device::hbm, MemoryKind::activations);
        note_routed(work, l, true);
        emit_layer_backward(steps[static_cast<std::size_t>(i)], l, mb);
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
      if (embeds && etp_group >= 0)
        add(embedding_tp_op("embedding_sp_scatter.bwd", OpKind::all_gather, mb));
      if (!embeds) {
        sim::Op snd = pipeline_op(label("send_grad.mb{}", mb), OpKind::send,
                                  stage > 0 ? stage - 1 : p_.pp - 1, mb, pp_bytes);
        snd.deps = {cursor_};
        send_bwd[static_cast<std::size_t>(stage)][key] = add(std::move(snd), false);
      }
    };

    // Pipeline order of this stage (strategies/pipeline.hpp).
    defer_wgrad_ = defers_weight_gradients(p_);
    play_pipeline(p_, stage, flush_wgrad, forward, backward);
    defer_wgrad_ = false;
    // The embedding kind's gradients, once per step after the last backward.
    const int backward_end = cursor_;
    for (const ParamBucket& b : emb_buckets)
      reduce_bucket(b, "embedding", -1, micro - 1, true, backward_end);

    // The optimizer step. ZeRO 1 and 2 then all-gather each bucket's updated BF16 parameters
    // (Megatron's distributed optimizer; DeepSpeed's after a host step).
    auto param_gathers_after = [&](int after) {
      for (int i = 0; i < n_layers; ++i)
        param_gathers(buckets[static_cast<std::size_t>(i)],
                      label("L{}", layer_id[static_cast<std::size_t>(i)]),
                      layer_id[static_cast<std::size_t>(i)], after);
      param_gathers(emb_buckets, "embedding", -1, after);
    };
    const double shard_params = stage_shard_params(layer_id, first, last);
    if (!host_opt) {
      sim::Op adam;
      adam.name = "optimizer.adamw";
      adam.kind = OpKind::elementwise;
      adam.category = Category::optimizer;
      adam.bytes = kAdamBytesPerParam * shard_params;
      adam.deps = grad_ready;
      param_gathers_after(add(std::move(adam)));
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
        up.bytes = workload::kActivationBytes * shard_params;
        up.deps = {a};
        param_gathers_after(add(std::move(up), false));
      }
    } else {
      // Streamed into the next forward: the embedding's step and the gradient downloads end the
      // step; the layers' steps were placed before their forwards.
      sim::Op adam =
          host_adam_op("optimizer.host_adamw.embedding", stage_shard_params({}, first, last), -1);
      adam.deps = grad_ready;
      param_gathers(emb_buckets, "embedding", -1, add(std::move(adam), false));
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
          const VirtualStage from = virtual_neighbour(p_, stage, chunk, -1);
          ops[static_cast<std::size_t>(rf)].remote_deps.push_back(sim::RemoteDep{
              from.stage, send_fwd[static_cast<std::size_t>(from.stage)]
                                  [static_cast<std::size_t>(from.chunk * micro + mb)]});
        }
        const int rb = recv_bwd[static_cast<std::size_t>(stage)][key];
        if (rb >= 0) {
          const VirtualStage from = virtual_neighbour(p_, stage, chunk, +1);
          ops[static_cast<std::size_t>(rb)].remote_deps.push_back(sim::RemoteDep{
              from.stage, send_bwd[static_cast<std::size_t>(from.stage)]
                                  [static_cast<std::size_t>(from.chunk * micro + mb)]});
        }
      }
    }
  }
  double flops = 0;
  for (const sim::RankClass& rc : s_.classes)
    for (const sim::Op& op : rc.ops)
      flops += op.model_flops * rc.multiplicity;
  s_.model_flops_per_step = flops;
  if (c_.expert_loads != nullptr)
    expand_routing();
  return std::move(s_);
}

// Uneven routing: every stage's class becomes one class per expert-parallel rank (the ranks
// sharing an ep coordinate hold the same experts and receive the same share of tokens), each
// the balanced program with its routed work rescaled by its rank's load:
// - expert GEMMs over each local expert's rows, the activations and ETP exchanges by the
//   rank's tokens;
// - the dispatch and combine by the group's most loaded rank (an all-to-all-v lasts until the
//   rank receiving most has its rows), every member starting once all are ready: each class's
//   exchange waits on a barrier in the stage's first class, which waits for every class's
//   predecessors of the exchange;
// - a MoE layer's saved activations (and their offload copies) by the rank's share.
void Lowering::expand_routing() {
  const int L = static_cast<int>(m_.num_layers());
  if (!m_.is_moe())
    return;
  const RankLoads loads =
      rank_loads(p_, m_, *c_.expert_loads, routing_scale(p_, m_, c_.seq, c_.gpus_per_node));
  if (loads.uniform)
    return; // balanced: the rank-class program as it is (rebalancing's copies stay barriers)
  const int ep = loads.ep;
  const auto local = static_cast<std::size_t>(loads.local_experts);
  const std::vector<std::vector<double>>& capped = loads.capped;
  const std::vector<std::vector<double>>& rank_load = loads.rank;
  const std::vector<double>& exchange = loads.exchange;
  const double cap =
      p_.moe.capacity_factor > 0 ? p_.moe.capacity_factor : std::numeric_limits<double>::infinity();
  // Saved activations: bytes = base + load · unit (the memory model's), the plan's lowering
  // sized at its own load (its imbalance, capped); a recomputed layer's working set (all its
  // activations less the saved ones) likewise.
  std::vector<double> base(static_cast<std::size_t>(L), 0), unit(static_cast<std::size_t>(L), 0);
  std::vector<double> work_base = base, work_unit = unit;
  {
    Plan one = p_, two = p_;
    one.moe.capacity_factor = two.moe.capacity_factor = 0;
    one.moe.imbalance = 1;
    two.moe.imbalance = 2;
    for (int l = 0; l < L; ++l) {
      const LayerSpec& layer = m_.layers[static_cast<std::size_t>(l)];
      if (layer.mlp != MlpKind::moe)
        continue;
      const double s1 = saved_activation_bytes(m_, layer, one, c_.seq, c_.activations);
      const double s2 = saved_activation_bytes(m_, layer, two, c_.seq, c_.activations);
      unit[static_cast<std::size_t>(l)] = s2 - s1;
      base[static_cast<std::size_t>(l)] = s1 - (s2 - s1);
      const double w1 =
          layer_activation_bytes(m_, layer, one, c_.seq, Recompute::none, c_.activations) - s1;
      const double w2 =
          layer_activation_bytes(m_, layer, two, c_.seq, Recompute::none, c_.activations) - s2;
      work_unit[static_cast<std::size_t>(l)] = w2 - w1;
      work_base[static_cast<std::size_t>(l)] = w1 - (w2 - w1);
    }
  }
  const double plan_load = std::min(p_.moe.imbalance, cap);
  auto saved_ratio = [&](int l, int r) {
    const auto li = static_cast<std::size_t>(l);
    const double planned = base[li] + plan_load * unit[li];
    if (!(planned > 0))
      return 1.0;
    return (base[li] + rank_load[li][static_cast<std::size_t>(r)] * unit[li]) / planned;
  };
  auto work_bytes = [&](int l, int r) {
    const auto li = static_cast<std::size_t>(l);
    return std::max(0.0,
                    work_base[li] + rank_load[li][static_cast<std::size_t>(r)] * work_unit[li]);
  };

  // Rebalancing: the loads of the segments each rank's GEMMs take (its own experts' kept rows,
  // then the spilled ones), per layer; and the expert copies it receives.
  std::vector<std::vector<std::vector<double>>> segment_loads;
  if (loads.rebalanced) {
    segment_loads.resize(static_cast<std::size_t>(L));
    for (int l = 0; l < L; ++l) {
      const auto li = static_cast<std::size_t>(l);
      if (loads.segments[li].empty() && loads.capped[li].empty())
        continue;
      auto& per_rank = segment_loads[li];
      per_rank.assign(static_cast<std::size_t>(ep), {});
      const auto experts = static_cast<std::int64_t>(loads.capped[li].size());
      for (int own = 1; own >= 0; --own)
        for (const workload::Segment& sg : loads.segments[li])
          if ((workload::expert_owner(sg.expert, experts, ep) == sg.rank) == (own == 1))
            per_rank[static_cast<std::size_t>(sg.rank)].push_back(sg.tokens());
    }
  }
  auto copies_in = [&](std::size_t l, int r) {
    return loads.copies_in_node[l][static_cast<std::size_t>(r)] +
           loads.copies_in_net[l][static_cast<std::size_t>(r)];
  };

  std::vector<sim::RankClass> old = std::move(s_.classes);
  s_.classes.clear();
  s_.classes.reserve(old.size() * static_cast<std::size_t>(ep));
  const int stages = static_cast<int>(old.size());
  for (int st = 0; st < stages; ++st) {
    const sim::RankClass& from = old[static_cast<std::size_t>(st)];
    // The stage's exchanges and, for each, the ops it waits for (deps and its stream's previous).
    std::vector<int> exchanges;
    std::vector<std::vector<int>> ready;
    if (ep > 1) {
      std::vector<int> last(from.streams.size(), -1);
      for (std::size_t i = 0; i < from.ops.size(); ++i) {
        const sim::Op& op = from.ops[i];
        int& prev = last[static_cast<std::size_t>(op.stream)];
        if (op.routed == sim::Routed::exchange) {
          exchanges.push_back(static_cast<int>(i));
          ready.push_back(op.deps);
          if (prev >= 0)
            ready.back().push_back(prev);
        }
        prev = static_cast<int>(i);
      }
    }
    for (int r = 0; r < ep; ++r) {
      sim::RankClass rc = from;
      if (c_.names && ep > 1)
        rc.name =
            p_.pp == 1 ? fmt::format("ep rank {}", r) : fmt::format("{}, ep rank {}", from.name, r);
      rc.multiplicity = from.multiplicity / ep;
      for (sim::Op& op : rc.ops) {
        if (op.peer_class >= 0)
          op.peer_class = op.peer_class * ep + r;
        for (sim::RemoteDep& d : op.remote_deps)
          d.rank_class = d.rank_class * ep + r;
        if (op.routed == sim::Routed::no || op.layer < 0)
          continue;
        const auto li = static_cast<std::size_t>(op.layer);
        if (rank_load[li].empty())
          continue;
        const double f = rank_load[li][static_cast<std::size_t>(r)];
        const double balanced_rows = op.gemm.m;
        switch (op.routed) {
        case sim::Routed::rows:
          if (op.kind == OpKind::grouped_gemm && loads.rebalanced) {
            // Its segments' rows: the balanced program gives every local expert the same.
            const double per = op.gemm.rows_per_expert.empty() ? 0 : op.gemm.rows_per_expert[0];
            op.gemm.rows_per_expert.clear();
            double rows = 0;
            for (double x : segment_loads[li][static_cast<std::size_t>(r)]) {
              op.gemm.rows_per_expert.push_back(per * x);
              rows += per * x;
            }
            op.gemm.m = rows;
          } else if (op.kind == OpKind::grouped_gemm) {
            double rows = 0;
            for (std::size_t i = 0; i < op.gemm.rows_per_expert.size(); ++i) {
              op.gemm.rows_per_expert[i] *= capped[li][static_cast<std::size_t>(r) * local + i];
              rows += op.gemm.rows_per_expert[i];
            }
            op.gemm.m = rows;
          } else {
            op.bytes *= f;
          }
          if (op.kind == OpKind::grouped_gemm && balanced_rows > 0)
            op.bytes *= op.gemm.m / balanced_rows; // its quantize traffic follows its rows
          op.model_flops *= f;
          break;
        case sim::Routed::exchange:
          op.bytes *= exchange[li];
          op.rdma_bytes *= exchange[li];
          op.nvl_bytes *= exchange[li];
          break;
        case sim::Routed::saved:
          op.bytes *= saved_ratio(op.layer, r);
          break;
        case sim::Routed::spill: {
          // The copies this rank sends or receives over this link (both ways at once).
          const bool node = op.group == g_.spill_node;
          const auto ri = static_cast<std::size_t>(r);
          const int moved = std::max((node ? loads.copies_in_node : loads.copies_in_net)[li][ri],
                                     (node ? loads.copies_out_node : loads.copies_out_net)[li][ri]);
          if (moved > 0) {
            op.kind = OpKind::send_recv;
            op.bytes *= moved;
          } else {
            op.bytes = 0;
          }
          break;
        }
        case sim::Routed::no:
          break;
        }
      }
      for (const RoutedTensor& t : routed_tensors_[static_cast<std::size_t>(st)]) {
        double& bytes = rc.tensors[static_cast<std::size_t>(t.tensor)].bytes;
        bytes = t.spill > 0 ? t.spill * copies_in(static_cast<std::size_t>(t.layer), r)
                : t.work    ? work_bytes(t.layer, r)
                            : bytes * saved_ratio(t.layer, r);
      }
      s_.classes.push_back(std::move(rc));
    }
    if (exchanges.empty())
      continue;
    // The barriers, in the stage's first class on a stream of their own.
    sim::RankClass& hub = s_.classes[static_cast<std::size_t>(st * ep)];
    const int sync_stream = static_cast<int>(hub.streams.size());
    hub.streams.push_back("sync.ep");
    for (std::size_t x = 0; x < exchanges.size(); ++x) {
      const int i = exchanges[x];
      sim::Op b;
      b.kind = OpKind::barrier;
      b.category = Category::ep_comm;
      b.stream = sync_stream;
      const sim::Op& op = hub.ops[static_cast<std::size_t>(i)];
      b.layer = op.layer;
      b.micro_batch = op.micro_batch;
      if (c_.names)
        b.name = op.name + ".barrier";
      b.deps = ready[x];
      for (int r = 1; r < ep; ++r)
        for (int d : ready[x])
          b.remote_deps.push_back(sim::RemoteDep{st * ep + r, d});
      hub.ops.push_back(std::move(b));
      const int bi = static_cast<int>(hub.ops.size()) - 1;
      hub.ops[static_cast<std::size_t>(i)].deps.push_back(bi);
      for (int r = 1; r < ep; ++r)
        s_.classes[static_cast<std::size_t>(st * ep + r)]
            .ops[static_cast<std::size_t>(i)]
            .remote_deps.push_back(sim::RemoteDep{st * ep, bi});
    }
  }
}

} // namespace

// One micro-batch through one layer, emitted into a scratch rank class by the same functions
// run() uses, each op sorted by whether add() put it on the data path.
PassOps Lowering::layer_pass(const LayerSpec& layer) {
  sim::RankClass scratch;
  std::vector<bool> on_path;
  rc_ = &scratch;
  cursor_ = -1;
  path_log_ = &on_path;
  defer_wgrad_ = defers_weight_gradients(p_);
  const std::vector<Step> steps = layer_steps(layer);
  for (const Step& st : steps)
    emit_forward(st, st.name, Category::forward, 0, 0);
  const std::size_t forward_end = scratch.ops.size();
  emit_layer_backward(steps, 0, 0);
  PassOps out;
  out.forward_end = forward_end;
  out.roles.reserve(scratch.ops.size() + pending_wgrad_.size());
  for (std::size_t i = 0; i < scratch.ops.size(); ++i)
    out.roles.push_back(on_path[i]
                            ? (i < forward_end ? PassOps::Role::forward : PassOps::Role::backward)
                        : scratch.ops[i].stream == kCompute ? PassOps::Role::off_path_compute
                                                            : PassOps::Role::off_path);
  out.ops = std::move(scratch.ops);
  for (sim::Op& w : pending_wgrad_) {
    out.ops.push_back(std::move(w));
    out.roles.push_back(PassOps::Role::off_path_compute);
  }
  pending_wgrad_.clear();
  defer_wgrad_ = false;
  path_log_ = nullptr;
  rc_ = nullptr;
  cursor_ = -1;
  return out;
}

namespace {
// Every op of a pass built by hand on the data path, in order (the embedding's, the head's).
void on_the_path(PassOps& pass) {
  pass.roles.clear();
  for (std::size_t i = 0; i < pass.ops.size(); ++i)
    pass.roles.push_back(i < pass.forward_end ? PassOps::Role::forward : PassOps::Role::backward);
}
} // namespace

PassModel Lowering::pass_model(bool with_passes) {
  const int L = static_cast<int>(m_.num_layers());
  PassModel out;
  s_.world = p_.world;
  s_.gpus_per_node = c_.gpus_per_node;
  const int etp_group = comm_group("tp.embedding", embed_tp_group());
  // The distinct layers (a layer's steps depend on its MLP kind and window only).
  std::vector<LayerSpec> kinds;
  std::vector<int> pass_of(static_cast<std::size_t>(L));
  for (int l = 0; l < L; ++l) {
    const LayerSpec& layer = m_.layers[static_cast<std::size_t>(l)];
    std::size_t k = 0;
    while (k < kinds.size() &&
           std::pair{kinds[k].mlp, kinds[k].window} != std::pair{layer.mlp, layer.window})
      ++k;
    if (k == kinds.size()) {
      kinds.push_back(layer);
      out.passes.push_back(with_passes ? layer_pass(layer) : PassOps{});
    }
    pass_of[static_cast<std::size_t>(l)] = static_cast<int>(k);
  }
  // The embedding and the head with the loss: their data-path ops as run() places them.
  const int embedding_pass = static_cast<int>(out.passes.size());
  if (!with_passes) {
    out.passes.resize(out.passes.size() + 2);
  } else {
    PassOps e;
    e.ops.push_back(embedding_op(0));
    if (etp_group >= 0)
      e.ops.push_back(
          embedding_tp_op("embedding_sp_scatter", OpKind::reduce_scatter, 0, etp_group));
    e.forward_end = e.ops.size();
    if (etp_group >= 0)
      e.ops.push_back(
          embedding_tp_op("embedding_sp_scatter.bwd", OpKind::all_gather, 0, etp_group));
    on_the_path(e);
    out.passes.push_back(std::move(e));
  }
  const int head_pass = embedding_pass + 1;
  out.embedding_pass = embedding_pass;
  out.head_pass = head_pass;
  if (with_passes) {
    PassOps hd;
    if (etp_group >= 0)
      hd.ops.push_back(embedding_tp_op("head_sp_gather", OpKind::all_gather, 0, etp_group));
    hd.ops.push_back(head_op(0, false));
    if (etp_group >= 0)
      hd.ops.push_back(embedding_tp_op("loss_max", OpKind::all_reduce, 0, etp_group));
    hd.ops.push_back(loss_op(0));
    if (etp_group >= 0) {
      hd.ops.push_back(embedding_tp_op("loss_target", OpKind::all_reduce, 0, etp_group));
      hd.ops.push_back(embedding_tp_op("loss_sum_exp", OpKind::all_reduce, 0, etp_group));
    }
    hd.forward_end = hd.ops.size();
    hd.ops.push_back(head_op(0, true));
    if (etp_group >= 0)
      hd.ops.push_back(embedding_tp_op("head_sp_gather.bwd", OpKind::reduce_scatter, 0, etp_group));
    on_the_path(hd);
    out.passes.push_back(std::move(hd));
  }
  const int vp = chunks_per_stage(p_);
  const std::vector<int> virtual_begin = virtual_stage_bounds(p_, L);
  const bool host_opt = p_.optimizer_on_host;
  // Layers of one kind have the same buckets and the same shard: each kind's are built once
  // and counted per stage.
  std::vector<std::vector<ParamBucket>> kind_buckets;
  std::vector<double> kind_shard;
  for (const LayerSpec& layer : kinds) {
    kind_buckets.push_back(layer_buckets(layer, layer_local_params(m_, layer, p_)));
    kind_shard.push_back(layer_shard_params(layer));
  }
  // The chunk replay's pieces: the pipeline's transfer and, per kind of layer, its once-a-step
  // reductions and parameter gathers.
  out.pp_send =
      pipeline_op("send", OpKind::send, 0, 0,
                  workload::kActivationBytes * tokens_ * static_cast<double>(m_.hidden_size) / sp_);
  out.reductions.resize(out.passes.size());
  out.param_gathers.resize(out.passes.size());
  for (std::size_t k = 0; k < kinds.size(); ++k) {
    for (const ParamBucket& b : kind_buckets[k])
      if (std::vector<sim::Op> chain = reduction_chain(b, "L", 0, 0, true, -1); !chain.empty())
        out.reductions[k].push_back(std::move(chain));
    out.param_gathers[k] = param_gather_ops(kind_buckets[k], "L", 0);
    out.step_gathers.push_back(step_gather_ops(kind_buckets[k], "L"));
  }
  out.step_gathers.resize(out.passes.size());
  for (int stage = 0; stage < p_.pp; ++stage) {
    PassModel::Stage st;
    st.count.assign(out.passes.size(), 0);
    st.count_chunk0.assign(out.passes.size(), 0);
    st.chunks.resize(static_cast<std::size_t>(vp));
    std::vector<int> layer_ids;
    for (int chunk = 0; chunk < vp; ++chunk) {
      auto count = [&](int pass) {
        ++st.count[static_cast<std::size_t>(pass)];
        if (chunk == 0)
          ++st.count_chunk0[static_cast<std::size_t>(pass)];
        st.chunks[static_cast<std::size_t>(chunk)].push_back(pass);
      };
      const int v = chunk * p_.pp + stage;
      if (v == 0)
        count(embedding_pass);
      for (int l = virtual_begin[static_cast<std::size_t>(v)];
           l < virtual_begin[static_cast<std::size_t>(v + 1)]; ++l) {
        count(pass_of[static_cast<std::size_t>(l)]);
        layer_ids.push_back(l);
        st.last_layer_pass = pass_of[static_cast<std::size_t>(l)];
      }
      if (v == vp * p_.pp - 1)
        count(head_pass);
    }
    const bool first = stage == 0, last = stage == p_.pp - 1;
    // The DP stream, as run() emits it: per bucket, ZeRO-3 gathers its parameters before each
    // forward and backward use and (a layer's) reduce-scatters its gradients every micro-batch
    // (once a step each in a pipeline stage: whole_step); the rest reduce once a step, ZeRO-1/2
    // gather their updated shards after the step, HSDP sums the shards over the replicas once.
    const double micro = p_.micro_batches();
    auto dp_op = [&](OpKind kind, int group, double bytes, double count) {
      if (group < 0 || count <= 0)
        return;
      for (auto& [op, n] : st.dp_ops)
        if (op.kind == kind && op.group == group && op.bytes == bytes) {
          n += count;
          return;
        }
      sim::Op op;
      op.name = "dp";
      op.kind = kind;
      op.category = Category::dp_comm;
      op.stream = kDp;
      op.group = group;
      op.bytes = bytes;
      st.dp_ops.emplace_back(std::move(op), count);
    };
    // `layers`: how many of the stage's layers hold such a bucket.
    auto bucket_ops = [&](const ParamBucket& b, double gathers_per_micro, bool layer,
                          double layers) {
      const bool once = whole_step(b);
      if (b.zero >= 3 && b.shard >= 0)
        dp_op(OpKind::all_gather, b.shard, workload::kActivationBytes * b.params,
              once ? (gathers_per_micro > 0 ? layers : 0) : layers * gathers_per_micro * micro);
      if (b.zero == 0)
        dp_op(OpKind::all_reduce, b.all_reduce, kGrad * b.params, layers);
      if (b.zero > 0)
        dp_op(OpKind::reduce_scatter, b.shard, kGrad * b.params,
              layers * (b.zero >= 3 && layer && !once ? micro : 1));
      if (b.zero > 0 && b.replicas >= 0)
        dp_op(OpKind::all_reduce, b.replicas, kGrad * b.params / b.shard_ranks, layers);
      if (b.zero == 1 || b.zero == 2)
        dp_op(OpKind::all_gather, b.shard, workload::kActivationBytes * b.params, layers);
    };
    for (std::size_t k = 0; k < kinds.size(); ++k)
      if (st.count[k] > 0)
        for (const ParamBucket& b : kind_buckets[k])
          bucket_ops(b, 2, true, st.count[k]);
    const std::vector<ParamBucket> emb_buckets = embedding_buckets(first, last);
    for (const ParamBucket& b : emb_buckets) {
      // The table is gathered for the embedding's forward; the head's buckets (the final norm,
      // the head or the tied table) for the head's forward and backward.
      const bool table = read_by_lookup(b), head = read_by_head(b, m_.tied_embeddings);
      bucket_ops(b, (table && first ? 1 : 0) + (head && last ? 2 : 0), false, 1);
      if (std::vector<sim::Op> chain = reduction_chain(b, "embedding", -1, 0, true, -1);
          !chain.empty())
        st.embedding_reductions.push_back(std::move(chain));
    }
    st.embedding_gathers = param_gather_ops(emb_buckets, "embedding", -1);
    {
      // The table's buckets before the embedding's forward, the head's before the head's.
      const EmbeddingBuckets split = split_embedding_buckets(emb_buckets, m_.tied_embeddings);
      if (first)
        st.table_step_gathers = step_gather_ops(split.table, "embedding");
      if (last)
        st.head_step_gathers = step_gather_ops(split.head, "head");
    }
    const double shard = stage_shard_params(layer_ids, first, last);
    if (!host_opt) {
      st.gpu_step.name = "optimizer.adamw";
      st.gpu_step.kind = OpKind::elementwise;
      st.gpu_step.category = Category::optimizer;
      st.gpu_step.bytes = kAdamBytesPerParam * shard;
      st.has_gpu_step = true;
      st.step_on_path = true;
    } else if (p_.overlap != OptimizerOverlap::stream_forward) {
      st.host_steps.emplace_back(host_adam_op("optimizer.host_adamw", shard, -1), 1);
      st.step_on_path = p_.overlap == OptimizerOverlap::after_backward;
    } else {
      for (std::size_t k = 0; k < kinds.size(); ++k)
        if (st.count[k] > 0)
          st.host_steps.emplace_back(host_adam_op("L.adam", kind_shard[k], -1), st.count[k]);
      if (!layer_ids.empty()) {
        const int l = layer_ids.back();
        st.upload_last.name = label("L{}.param_upload", l);
        st.upload_last.kind = OpKind::copy_h2d;
        st.upload_last.category = Category::optimizer;
        st.upload_last.stream = kH2d;
        st.upload_last.bytes =
            workload::kActivationBytes *
            kind_shard[static_cast<std::size_t>(pass_of[static_cast<std::size_t>(l)])];
      }
    }
    out.stages.push_back(std::move(st));
  }
  out.groups = std::move(s_);
  return out;
}

PassModel pass_model(const Plan& plan, const LoweringContext& ctx, bool with_passes) {
  if (ctx.model == nullptr || ctx.seq <= 0)
    throw InputError("lowering needs a model and a positive sequence length.");
  return Lowering(plan, ctx).pass_model(with_passes);
}

bool chunk_replayable(const Plan& plan, const LoweringContext& ctx) {
  if (plan.pp <= 1 || ctx.model == nullptr ||
      (plan.schedule != PipelineSchedule::interleaved_1f1b &&
       plan.schedule != PipelineSchedule::one_f_one_b))
    return false;
  // ZeRO-3 only as FSDP2 runs it in a pipeline stage: gathered once a step, reduced once.
  for (const StatePolicy& state : plan.state)
    if (state.zero >= 3 && !unsharded_for_step(plan, state.zero))
      return false;
  if (plan.activation_offload > 0 || plan.optimizer_on_host || plan.params != Placement::hbm ||
      plan.grads != Placement::hbm || plan.optimizer != Placement::hbm)
    return false;
  if (ctx.expert_loads != nullptr || ctx.model->tied_embeddings)
    return false;
  // A MoE layer's host sync (its expert counts read on the CPU) with a modelled host.
  const bool host_syncs = syncs_host_per_moe_layer(plan) &&
                          std::any_of(ctx.model->layers.begin(), ctx.model->layers.end(),
                                      [](const LayerSpec& l) { return l.mlp == MlpKind::moe; });
  return !(host_syncs && host_issue_s(plan, ctx) > 0);
}

Plan pass_key(Plan p) {
  // What a pass takes from the family: its attention kernel, FP8 recipe and (torchtitan's eager
  // layer) elementwise traffic.
  p.family = fmt::format(
      "{}/{}{}", sim::attention_kernel_name(attention_kernel(p, LoweringContext{})),
      fp8_recipe_name(fp8_recipe(p, LoweringContext{})), p.family == "fsdp2" ? "/eager" : "");
  p.global_batch = 0;
  p.stage_layers.clear();
  p.activation_offload = 0;
  p.params = p.grads = p.optimizer = Placement::hbm;
  p.optimizer_on_host = false;
  p.torch_host_optimizer = false;
  p.overlap = OptimizerOverlap::after_backward;
  return p;
}

sim::Schedule lower(const Plan& plan, const LoweringContext& ctx) {
  if (ctx.model == nullptr || ctx.seq <= 0)
    throw InputError("lowering needs a model and a positive sequence length.");
  return Lowering(plan, ctx).run();
}

} // namespace mop::strategy
