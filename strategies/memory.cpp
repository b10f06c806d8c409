#include "strategies/memory.hpp"
#include "strategies/mesh.hpp"
#include "strategies/pipeline.hpp"

#include "common/units.hpp"
#include "workload/flops.hpp"
#include "workload/params.hpp"

#include <algorithm>
#include <array>
#include <fmt/format.h>

namespace mop::strategy {

using workload::AttentionKind;
using workload::LayerSpec;
using workload::MlpKind;
using workload::ModelSpec;

namespace {

// Bytes per element of the states (mixed-precision training as Megatron-LM and FSDP2 run it):
constexpr double kParamBytes = 2;      // BF16 weights used by the kernels
constexpr double kGradBytes = 4;       // FP32 gradients accumulated and reduced
constexpr double kOptimizerBytes = 12; // FP32 master weights + Adam m + Adam v
// Chunked cross-entropy processes this many tokens' logits at a time (Liger / torchtitan style).
constexpr double kLossChunkTokens = 4096;

int kind_index(LayerKind k) {
  return static_cast<int>(k);
}

// Tokens of one micro-batch held by a rank in the attention layout (sequence split over CP).
double tokens_per_rank(const Plan& p, std::int64_t seq) {
  return static_cast<double>(p.micro_batch) * static_cast<double>(seq) / p.attention.cp;
}

// Divisor of tensors in sequence-parallel regions (norms, residuals, dropout): TP with SP.
double sp_div(const Plan& p) {
  return p.attention.sp ? p.attention.tp : 1;
}

} // namespace

bool torch_op_sac(const Plan& p) {
  return p.family == "fsdp2";
}

bool torch_ring_cp(const Plan& p) {
  return p.family == "fsdp2" && p.attention.cp > 1 && p.attention.cp_kind == CpKind::ring;
}

double torch_ring_accumulator_bytes(double query_elements, double kv_elements) {
  return 4 * query_elements + 2 * 4 * kv_elements;
}

namespace {

double attention_block_bytes(const ModelSpec& m, const Plan& p, std::int64_t seq,
                             const LayerSpec& layer, Recompute rc, const ActivationOptions& o) {
  const double t = tokens_per_rank(p, seq);
  const double h = static_cast<double>(m.hidden_size);
  const double tp = p.attention.tp;
  const auto& a = m.attention;
  const double heads = static_cast<double>(a.num_heads);
  const double dqk = static_cast<double>(a.qk_head_dim());
  const double dv = static_cast<double>(a.v_dim());
  const double block_input = workload::kActivationBytes * t * h / sp_div(p);
  if (rc == Recompute::full)
    return block_input;
  double bytes = block_input; // norm input
  if (rc == Recompute::selective && torch_op_sac(p) && a.kind == AttentionKind::gqa) {
    // torchtitan's op-level SAC keeps the outputs of every other matmul (wq and wv; wk and wo
    // are recomputed) and of flash attention with its log-sum-exp (docs/PLANS.md).
    const double kv = std::max(1.0, static_cast<double>(a.num_kv_heads) / tp);
    return bytes + workload::kActivationBytes * t * (heads / tp * dqk + kv * dv) +
           workload::kActivationBytes * t * heads / tp * dv + 4 * t * heads / tp;
  }
  if (rc != Recompute::selective)
    bytes += workload::kActivationBytes * t * h / sp_div(p); // norm output = projection input
  if (a.kind == AttentionKind::gqa) {
    // K and V heads replicate when TP exceeds them.
    const double kv = std::max(1.0, static_cast<double>(a.num_kv_heads) / tp);
    bytes += workload::kActivationBytes * t * (heads / tp * dqk + kv * (dqk + dv)); // Q, K, V
  } else {
    // MLA: latents from the (unsplit) down projections, then per-head Q, K, V.
    bytes += workload::kActivationBytes * t *
             static_cast<double>(a.q_lora_rank + a.kv_lora_rank + a.qk_rope_head_dim);
    bytes += workload::kActivationBytes * t * heads / tp * (2 * dqk + dv);
  }
  bytes += workload::kActivationBytes * t * heads / tp * dv; // attention output = o_proj input
  if (o.flash_attention) {
    bytes += 4 * t * heads / tp; // FP32 log-sum-exp per query and head
  } else if (rc == Recompute::none) {
    // Scores: softmax output (2), dropout mask (1), dropout output (2) per kept score; Korthikanti
    // et al. count the full S x S block per head (5·a·s²·b bytes).
    const double keys = layer.window > 0 ? std::min<double>(layer.window, static_cast<double>(seq))
                                         : static_cast<double>(seq);
    bytes += (o.dropout ? 5 : 2) * heads / tp * t * keys;
  }
  if (o.dropout)
    bytes += t * h / sp_div(p); // dropout mask after the output projection (1 byte)
  return bytes;
}

double mlp_block_bytes(const ModelSpec& m, const Plan& p, std::int64_t seq, const LayerSpec& layer,
                       Recompute rc, const ActivationOptions& o) {
  const double t = tokens_per_rank(p, seq);
  const double h = static_cast<double>(m.hidden_size);
  const double block_input = workload::kActivationBytes * t * h / sp_div(p);
  if (rc == Recompute::full)
    return block_input;
  double bytes = block_input; // norm input
  const bool keep_norm_out = rc != Recompute::selective;
  const bool keep_act_out = rc != Recompute::selective; // selective recomputes the activation
  auto mlp = [&](double tokens, double inter, bool gated, double split) {
    double b =
        workload::kActivationBytes * tokens * (gated ? 2 : 1) * inter / split; // gate/up outputs
    if (keep_act_out)
      b += workload::kActivationBytes * tokens * inter / split; // activation output
    return b;
  };
  if (keep_norm_out)
    bytes += workload::kActivationBytes * t * h / sp_div(p); // norm output = MLP / router input
  if (rc == Recompute::selective && torch_op_sac(p) && layer.mlp == MlpKind::dense) {
    // op-level SAC: w1's output and w2's are kept, w3's recomputed.
    const double inter = static_cast<double>(m.dense_mlp.intermediate_size) / p.dense.tp;
    return bytes + workload::kActivationBytes * t * inter +
           workload::kActivationBytes * t * h / sp_div(p) + (o.dropout ? t * h / sp_div(p) : 0);
  }
  if (layer.mlp == MlpKind::dense) {
    bytes +=
        mlp(t, static_cast<double>(m.dense_mlp.intermediate_size), m.dense_mlp.gated, p.dense.tp);
  } else {
    const auto& e = m.moe;
    const double experts = static_cast<double>(e.num_routed_experts);
    bytes += 4 * t / sp_div(p) * experts; // FP32 router probabilities
    // Routed token copies arriving at this rank after dispatch: the tokens of its attention
    // layout times top-k, times the imbalance the plan assumes (capacity caps it).
    double load = p.moe.imbalance;
    if (p.moe.capacity_factor > 0)
      load = std::min(load, p.moe.capacity_factor);
    const double routed = t / sp_div(p) * static_cast<double>(e.experts_per_token) * load;
    bytes += workload::kActivationBytes * routed * h; // permuted expert inputs
    bytes += mlp(routed, static_cast<double>(e.expert_intermediate_size), e.gated, p.moe.etp);
    bytes += workload::kActivationBytes * routed * h; // expert outputs, for the combine's gradient
    if (e.num_shared_experts > 0)
      bytes += mlp(t, static_cast<double>(e.num_shared_experts * e.shared_intermediate_size),
                   e.gated, p.dense.tp);
  }
  if (o.dropout)
    bytes += t * h / sp_div(p); // dropout mask (1 byte)
  return bytes;
}

double in_flight(const Plan& p, int stage, int num_layers) {
  const int m = p.micro_batches();
  if (p.pp == 1)
    return 1;
  switch (p.schedule) {
  case PipelineSchedule::gpipe:
    return m;
  case PipelineSchedule::one_f_one_b:
  case PipelineSchedule::zero_bubble: // ZB-H1 keeps 1F1B's activation memory
    return std::min(m, p.pp - stage);
  case PipelineSchedule::interleaved_1f1b: {
    // The stage's warm-up forwards, then one forward and one backward at a time, in its
    // pipeline order (strategies/pipeline.hpp, as Megatron-Core's interleaved schedule): the
    // most layers' activations it holds at once, each chunk with its own layers (a stage's
    // chunks may differ by one), as a share of the stage's layers. With even chunks the first
    // stage holds Megatron-LM's theoretical_memory_usage.py figure, pp · (1 + (pp - 1)/(pp ·
    // vp)) micro-batches; the last holds more than plain 1F1B's one.
    const std::vector<int> bounds = virtual_stage_bounds(p, num_layers);
    auto layers = [&](int chunk) {
      const auto v = static_cast<std::size_t>(chunk * p.pp + stage);
      return static_cast<double>(bounds[v + 1] - bounds[v]);
    };
    double stage_layers = 0;
    for (int c = 0; c < p.vp; ++c)
      stage_layers += layers(c);
    if (stage_layers <= 0)
      return 0;
    const long items = static_cast<long>(m) * p.vp, period = static_cast<long>(p.pp) * p.vp;
    const long warmup = warmup_forwards(p, stage);
    double held = 0;
    for (long k = 0; k < warmup; ++k)
      held += layers(forward_chunk(p, k));
    double most = held;
    // The steady phase repeats every pp · vp forwards.
    for (long f = warmup, b = 0; f < items && b < period; ++f, ++b) {
      held += layers(forward_chunk(p, f));
      most = std::max(most, held);
      held -= layers(backward_chunk(p, b));
    }
    return most / stage_layers;
  }
  }
  return 1;
}

const char* largest_component(const MemoryBreakdown& b) {
  const std::array<std::pair<double, const char*>, 6> parts = {
      {{b.weights, "weights"},
       {b.grads, "gradients"},
       {b.optimizer, "optimizer state"},
       {b.activations, "activations"},
       {b.comm_buffers, "communication buffers"},
       {b.other, "CUDA context and fragmentation"}}};
  return std::max_element(parts.begin(), parts.end())->second;
}

} // namespace

double layer_activation_bytes(const ModelSpec& m, const LayerSpec& layer, const Plan& plan,
                              std::int64_t seq, Recompute recompute,
                              const ActivationOptions& options) {
  if (recompute == Recompute::full) // one checkpoint: the layer input
    return workload::kActivationBytes * tokens_per_rank(plan, seq) *
           static_cast<double>(m.hidden_size) / sp_div(plan);
  return attention_block_bytes(m, plan, seq, layer, recompute, options) +
         mlp_block_bytes(m, plan, seq, layer, recompute, options);
}

KindParams layer_local_params(const ModelSpec& m, const LayerSpec& layer, const Plan& p) {
  const workload::ParamCounts c = workload::layer_params(m, layer);
  const double half_norms = static_cast<double>(c.norms) / 2; // one norm before each block
  KindParams k;
  k.by_kind[kind_index(LayerKind::attention)] =
      static_cast<double>(c.attention) / p.attention.tp + half_norms;
  k.by_kind[kind_index(LayerKind::moe)] =
      static_cast<double>(c.routed_experts) / (p.moe.ep * p.moe.etp);
  k.by_kind[kind_index(LayerKind::dense)] =
      static_cast<double>(c.dense_mlp + c.shared_experts) / p.dense.tp +
      static_cast<double>(c.router) + half_norms;
  return k;
}

double expert_copy_bytes(const ModelSpec& m, const Plan& p) {
  for (const LayerSpec& layer : m.layers)
    if (layer.mlp == MlpKind::moe && m.moe.num_routed_experts > 0)
      return kParamBytes * static_cast<double>(workload::layer_params(m, layer).routed_experts) /
             static_cast<double>(m.moe.num_routed_experts) / p.moe.etp;
  return 0;
}

double embedding_local_params(const ModelSpec& m, const Plan& p) {
  return static_cast<double>(m.vocab_size) * static_cast<double>(m.hidden_size) / p.embed.tp;
}

bool unsharded_for_step(const Plan& plan, int zero) {
  return zero >= 3 && plan.pp > 1 && plan.grads == Placement::hbm;
}

double shard_degree(const Plan& p, LayerKind kind) {
  const int d = data_parallel_ranks(p, kind);
  // Bounds-checked: GCC's -Warray-bounds misreads this read once inlined into a unity batch.
  const auto i = static_cast<std::size_t>(kind_index(kind));
  const int group = i < std::size(p.state) ? p.state[i].shard_group : 0;
  return group > 0 ? std::min(d, group) : d;
}

double saved_activation_bytes(const ModelSpec& m, const LayerSpec& layer, const Plan& p,
                              std::int64_t seq, const ActivationOptions& options) {
  const Recompute rc_att = p.recompute[kind_index(LayerKind::attention)];
  const Recompute rc_mlp =
      p.recompute[kind_index(layer.mlp == MlpKind::moe ? LayerKind::moe : LayerKind::dense)];
  if (rc_att == Recompute::full && rc_mlp == Recompute::full)
    return layer_activation_bytes(m, layer, p, seq, Recompute::full, options);
  return attention_block_bytes(m, p, seq, layer, rc_att, options) +
         mlp_block_bytes(m, p, seq, layer, rc_mlp, options);
}

double loss_bytes_per_logit(const Plan& p, const ActivationOptions& options) {
  // Megatron's fused cross-entropy: the BF16 logits and one FP32 buffer (the softmax, then its
  // gradient in place). Compiled PyTorch (torchtitan compiles the loss with the model since
  // February 2025, components/loss.py; before, its train.py left it eager) fuses the upcast
  // away likewise.
  if (p.family != "fsdp2" || options.compiled_loss)
    return 2 + 4;
  // The PyTorch family's eager loss upcasts the whole tensor (torchtitan's cross_entropy(
  // pred.flatten(0, 1).float(), ...); Hugging Face's ForCausalLMLoss, logits.float()). Forward:
  // the BF16 logits, their FP32 copy and the FP32 log-softmax (2 + 4 + 4 B). Backward, after
  // train.py's `del pred`: the saved log-softmax, nll_loss's FP32 gradient and log-softmax's
  // gradient (4 + 4 + 4 B). With the vocabulary sharded over TP, torch's loss_parallel
  // (torch/distributed/tensor/parallel/loss.py) decomposes log-softmax, one FP32 tensor more
  // each way: the shifted logits beside the exponentials in forward (2 + 4 + 4 + 4), the zeroed
  // gradient, its sum with the exponentials and the product in backward (4 + 4 + 4 + 4). In a
  // pipeline stage the schedule keeps the stage's output until its backward (torch
  // distributed.pipelining's fwd_cache): + 2 B in backward.
  const bool sharded = p.embed.tp > 1;
  const double forward = sharded ? 2 + 4 + 4 + 4 : 2 + 4 + 4;
  const double backward = (sharded ? 4 + 4 + 4 + 4 : 4 + 4 + 4) + (p.pp > 1 ? 2 : 0);
  return std::max(forward, backward);
}

double logits_bytes(const ModelSpec& m, const Plan& p, std::int64_t seq,
                    const ActivationOptions& options) {
  const double tokens = tokens_per_rank(p, seq);
  const double loss_tokens =
      p.chunked_loss ? std::min(tokens, kLossChunkTokens * p.micro_batch) : tokens;
  return loss_tokens * static_cast<double>(m.vocab_size) / p.embed.tp *
         loss_bytes_per_logit(p, options);
}

double resident_comm_bytes(const Plan& p, const MemoryHardware& hw) {
  double bytes = 0;
  if (p.moe.ep > 1 || (p.attention.cp > 1 && p.attention.cp_kind != CpKind::ring))
    bytes += hw.alltoall_buffer_bytes;
  int communicators = 0;
  for (int degree : {p.attention.tp, p.attention.cp, p.attention.dp, p.moe.ep, p.moe.etp, p.moe.edp,
                     p.dense.tp, p.embed.tp})
    communicators += degree > 1 ? 1 : 0;
  communicators += p.pp > 1 ? 2 : 0; // send and receive neighbours
  return bytes + communicators * hw.nccl_bytes_per_communicator;
}

MemoryReport analyze_memory(const ModelSpec& m, const Plan& p, std::int64_t seq,
                            const MemoryHardware& hw, const ActivationOptions& options) {
  MemoryReport r;
  r.hbm_capacity_bytes = hw.hbm_bytes;
  r.host_capacity_bytes = hw.host_bytes;
  const double h = static_cast<double>(m.hidden_size);
  const int att = kind_index(LayerKind::attention), moe = kind_index(LayerKind::moe),
            den = kind_index(LayerKind::dense), emb = kind_index(LayerKind::embedding);
  double shard[kNumLayerKinds];
  for (int k = 0; k < kNumLayerKinds; ++k)
    shard[k] = shard_degree(p, static_cast<LayerKind>(k));

  const double tokens = tokens_per_rank(p, seq);
  int first_layer = 0;
  for (int stage = 0; stage < p.pp; ++stage) {
    const int n_layers = p.layers_in_stage(stage, static_cast<int>(m.num_layers()));
    const bool first = stage == 0, last = stage == p.pp - 1;
    // Local parameters (after tensor/expert splitting) per state kind.
    double local[kNumLayerKinds] = {0, 0, 0, 0};
    double largest_block = 0; // the biggest layer's gathered bytes under ZeRO-3
    double saved = 0;         // activations saved by this stage's layers, one micro-batch
    double largest_layer_full = 0;
    double largest_checkpoint = 0;
    double a2a_tokens = 0;
    for (int i = first_layer; i < first_layer + n_layers; ++i) {
      const LayerSpec& layer = m.layers[static_cast<std::size_t>(i)];
      const KindParams lp = layer_local_params(m, layer, p);
      const double la = lp[LayerKind::attention];
      const double le = lp[LayerKind::moe];
      const double ld = lp[LayerKind::dense];
      local[att] += la;
      local[moe] += le;
      local[den] += ld;
      double block = 0;
      if (p.state[att].zero >= 3 || p.params == Placement::host)
        block += la;
      if (p.state[moe].zero >= 3 || p.params == Placement::host)
        block += le;
      if (p.state[den].zero >= 3 || p.params == Placement::host)
        block += ld;
      largest_block = std::max(largest_block, block);
      const double layer_saved = saved_activation_bytes(m, layer, p, seq, options);
      saved += layer_saved;
      largest_checkpoint = std::max(largest_checkpoint, layer_saved);
      largest_layer_full = std::max(
          largest_layer_full, layer_activation_bytes(m, layer, p, seq, Recompute::none, options));
      if (layer.mlp == MlpKind::moe)
        a2a_tokens =
            std::max(a2a_tokens, tokens / sp_div(p) * static_cast<double>(m.moe.experts_per_token) *
                                     p.moe.imbalance);
    }
    first_layer += n_layers;
    const double table = embedding_local_params(m, p);
    if (first)
      local[emb] += table;
    if (last)
      local[emb] += table + h; // LM head (a copy when tied and pp > 1) and final norm
    if (last && first && m.tied_embeddings)
      local[emb] -= table;

    RankClassMemory rc;
    rc.stage = stage;
    rc.ranks = p.ranks_per_stage();
    rc.layers = n_layers;
    rc.name = p.pp == 1 ? "every rank"
                        : fmt::format("pipeline stage {} of {}{}", stage, p.pp,
                                      first  ? " (first)"
                                      : last ? " (last)"
                                             : "");
    rc.micro_batches_in_flight = in_flight(p, stage, static_cast<int>(m.num_layers()));
    MemoryBreakdown& hbm = rc.hbm;
    MemoryBreakdown& host = rc.host;
    for (int k = 0; k < kNumLayerKinds; ++k) {
      const int zero = p.state[k].zero;
      const bool whole_step = unsharded_for_step(p, zero);
      const double w = kParamBytes * (zero >= 3 ? local[k] / shard[k] : local[k]) +
                       (whole_step ? kParamBytes * local[k] : 0);
      const double g = kGradBytes * (zero >= 2 && !whole_step ? local[k] / shard[k] : local[k]);
      const double o = kOptimizerBytes * (zero >= 1 ? local[k] / shard[k] : local[k]);
      (p.params == Placement::hbm ? hbm : host).weights += w;
      (p.grads == Placement::hbm ? hbm : host).grads += g;
      (p.optimizer == Placement::hbm ? hbm : host).optimizer += o;
    }
    // Activations: saved tensors of the micro-batches in flight, the part not offloaded, plus
    // the working set of the layer in backward (recomputed activations, or a reloaded layer).
    const double kept = 1.0 - p.activation_offload;
    hbm.activations = saved * rc.micro_batches_in_flight * kept;
    host.activations = saved * rc.micro_batches_in_flight * p.activation_offload;
    const bool recomputes = p.recompute[att] != Recompute::none ||
                            p.recompute[moe] != Recompute::none ||
                            p.recompute[den] != Recompute::none;
    if (recomputes)
      hbm.activations += largest_layer_full;
    if (p.activation_offload > 0)
      hbm.activations += 2 * largest_checkpoint * p.activation_offload; // reload double buffer
    if (last)
      hbm.activations += logits_bytes(m, p, seq, options);
    // Communication buffers.
    hbm.comm_buffers += 2 * kParamBytes * largest_block; // ZeRO-3 gather: current + prefetch
    // Unsharded gradients being reduced (ZeRO 2 and 3; ZeRO 0 and 1 reduce them in place).
    if (p.params == Placement::host ||
        std::any_of(std::begin(p.state), std::end(p.state),
                    [](const StatePolicy& s) { return s.zero >= 2; }))
      hbm.comm_buffers += kParamBytes * largest_block;
    if (p.attention.tp > 1)
      hbm.comm_buffers += workload::kActivationBytes * tokens * h; // SP all-gathered layer input
    if (p.attention.cp > 1) {
      // Ring: K/V blocks in flight (double buffer); Ulysses: re-laid-out Q, K, V.
      const auto& a = m.attention;
      const double kv_width =
          a.kind == AttentionKind::mla
              ? static_cast<double>(a.num_heads) / p.attention.tp *
                    static_cast<double>(a.qk_head_dim() + a.v_dim())
              : std::max(1.0, static_cast<double>(a.num_kv_heads) / p.attention.tp) *
                    static_cast<double>(a.qk_head_dim() + a.v_dim());
      hbm.comm_buffers += 2 * workload::kActivationBytes * tokens * kv_width;
      if (torch_ring_cp(p)) {
        const double q_width = static_cast<double>(a.num_heads) / p.attention.tp *
                               static_cast<double>(a.qk_head_dim());
        hbm.comm_buffers += torch_ring_accumulator_bytes(tokens * q_width, tokens * kv_width);
      }
    }
    if (p.moe.ep > 1 || p.moe.etp > 1)
      hbm.comm_buffers +=
          2 * workload::kActivationBytes * a2a_tokens * h; // dispatch and combine buffers
    // Least-loaded rebalancing: the expert copies a rank receives for one layer, and in
    // backward their gradients beside them (docs/ROUTING.md).
    if (p.moe.rebalance == Rebalance::least_loaded)
      hbm.comm_buffers += 2 * p.moe.spill_copies * expert_copy_bytes(m, p);
    hbm.comm_buffers += resident_comm_bytes(p, hw);
    hbm.other = hw.cuda_context_bytes + hw.fragmentation * (hbm.activations + hbm.comm_buffers);
    // Host: pinned staging for whatever moves over PCIe.
    if (p.activation_offload > 0)
      host.comm_buffers += 2 * largest_checkpoint * p.activation_offload;
    if (p.optimizer_on_host || p.params == Placement::host || p.grads == Placement::host)
      host.comm_buffers += (kParamBytes + kGradBytes) * std::max(largest_block, local[att]);
    rc.peak_hbm_bytes = hbm.total();
    rc.host_bytes_per_node = hw.gpus_per_node * host.total() + hw.host_reserved_bytes;
    rc.dominant = largest_component(hbm);
    r.classes.push_back(rc);
  }
  for (std::size_t i = 0; i < r.classes.size(); ++i) {
    const RankClassMemory& c = r.classes[i];
    if (c.peak_hbm_bytes > r.classes[static_cast<std::size_t>(r.worst)].peak_hbm_bytes)
      r.worst = static_cast<int>(i);
    r.peak_hbm_bytes = std::max(r.peak_hbm_bytes, c.peak_hbm_bytes);
    r.peak_host_bytes = std::max(r.peak_host_bytes, c.host_bytes_per_node);
  }
  r.fits_hbm = hw.fits_hbm(r.peak_hbm_bytes);
  r.fits_host = r.peak_host_bytes <= hw.host_bytes;
  const RankClassMemory& w = r.classes[static_cast<std::size_t>(r.worst)];
  if (!r.fits_hbm) {
    // Against the HBM less the headroom a plan must leave free (--hbm-headroom).
    const double usable = hw.hbm_bytes - hw.hbm_headroom_bytes;
    r.first_to_run_out =
        fmt::format("HBM runs out first on {}: {} needed of {}{}, {} over, {} the largest part "
                    "({})",
                    w.name, format_bytes(w.peak_hbm_bytes), format_bytes(usable),
                    hw.hbm_headroom_bytes > 0
                        ? fmt::format(" ({} less {} headroom)", format_bytes(hw.hbm_bytes),
                                      format_bytes(hw.hbm_headroom_bytes))
                        : std::string(),
                    format_bytes(w.peak_hbm_bytes - usable), w.dominant,
                    format_bytes(std::max({w.hbm.weights, w.hbm.grads, w.hbm.optimizer,
                                           w.hbm.activations, w.hbm.comm_buffers, w.hbm.other})));
  } else if (!r.fits_host) {
    r.first_to_run_out =
        fmt::format("host memory runs out first: {} needed per node of {} ({} over)",
                    format_bytes(r.peak_host_bytes), format_bytes(hw.host_bytes),
                    format_bytes(r.peak_host_bytes - hw.host_bytes));
  }
  return r;
}

} // namespace mop::strategy
