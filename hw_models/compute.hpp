#pragma once
// Compute cost functions: GEMMs, grouped expert GEMMs, FlashAttention forward/backward and
// memory-bound kernels. Pure functions of the cluster spec, the calibration and the shape; the
// model and every constant are in docs/HARDWARE.md.
#include "hw_models/dtype.hpp"

#include <span>

namespace mop::hw {

struct ClusterSpec;
struct GpuSpec;
struct Calibration;

double peak_flops(const GpuSpec& gpu, Dtype dtype);

// C[m,n] = A[m,k]·B[k,n] in `dtype` (FP8 writes a BF16 C): 2·m·n·k FLOPs. A calibration point
// with the same (dtype, n, k) overrides the model within its measured range of m.
double gemm_time_s(const ClusterSpec& cluster, const Calibration& calibration, double m, double n,
                   double k, Dtype dtype);

// One grouped GEMM kernel over experts: expert e multiplies rows_per_expert[e] tokens by its own
// [k, n] weight. Experts run one after the other, each spread over the whole GPU, so a small
// per-expert batch pays tile and wave quantization and re-reads its weights; one launch in all.
double grouped_gemm_time_s(const ClusterSpec& cluster, const Calibration& calibration,
                           std::span<const double> rows_per_expert, double n, double k,
                           Dtype dtype);

// Attention of `batch` sequences: q_len queries against kv_len keys per head (queries are the
// last q_len positions when q_len < kv_len). window > 0: causal sliding window, each query sees
// at most `window` keys ending at its own position. BF16 FlashAttention.
// The attention kernel a framework runs (docs/HARDWARE.md "Attention kernels"): `flash` the
// newest FlashAttention the GPU has figures for (FA3 on Hopper, FA4 on Blackwell), `flash2`
// FlashAttention-2 (PyTorch SDPA's flash backend, the flash-attn 2 package), `cudnn` cuDNN's
// fused attention (Transformer Engine's choice on Hopper and Blackwell, PyTorch SDPA's cuDNN
// backend). A GPU without figures for a kernel prices it as `flash`.
enum class AttentionKernel { flash, flash2, cudnn };

struct AttentionShape {
  double batch = 1;
  double heads = 1;    // query heads
  double kv_heads = 1; // GQA/MQA: does not change FLOPs, only K/V bytes
  double q_len = 0;
  double kv_len = 0;
  double qk_head_dim = 128;
  double v_head_dim = 128;
  bool causal = true;
  double window = 0; // 0: no window
  AttentionKernel kernel = AttentionKernel::flash;
};

// Model FLOPs (the workload convention, README "FLOPs"): 2·pairs·heads·batch·(d_qk + d_v), pairs =
// (query, key) pairs the mask keeps; backward = 2.5 × forward (FlashAttention: 5 GEMMs vs 2).
double attention_flops(const AttentionShape& shape, bool backward);
double attention_fwd_time_s(const ClusterSpec& cluster, const Calibration& calibration,
                            const AttentionShape& shape);
double attention_bwd_time_s(const ClusterSpec& cluster, const Calibration& calibration,
                            const AttentionShape& shape);

// A kernel bound by HBM traffic (elementwise, norms, softmax, optimizer on device): bytes read
// plus written, at the STREAM-measured bandwidth, plus one launch.
double memory_bound_time_s(const ClusterSpec& cluster, const Calibration& calibration,
                           double bytes);

} // namespace mop::hw
