#include "hw_models/compute.hpp"

#include "common/error.hpp"
#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"

#include <algorithm>
#include <cmath>
#include <fmt/format.h>
#include <limits>

namespace mop::hw {
namespace {

// hardware.md §1.2 (NVIDIA "Matrix Multiplication Background User's Guide", DU-09799-001): M and
// N are padded up to the CTA tile (tile quantization) and the tiles run in waves of one per SM
// (wave quantization). 128×256 is the tile of the suggested model; cuBLAS also has its transpose.
constexpr double kTileShort = 128;
constexpr double kTileLong = 256;
// When the output has too few tiles to fill the SMs, cuBLAS/CUTLASS split K over several CTAs
// (split-K / stream-K). Assumption, documented in docs/HARDWARE.md: each split keeps at least
// 1024 of K and there are at most 16; this is what lets DeepGEMM's M = 64 rows with K = 7168 or
// 16384 stay memory-bound as measured (hardware.md §1.2 small-M table).
constexpr double kMinKPerSplit = 1024;
constexpr int kMaxSplits = 16;
// FlashAttention-2/3 work on 128-query × 128-key blocks at head dim ≤ 128 (FA3 paper, arXiv
// 2407.08608 §3); a causal or windowed mask wastes about half a block on each masked edge.
constexpr double kAttentionTile = 128;
// FlashAttention backward: 5 GEMMs against the forward's 2 (the FA2/FA3 papers count 2.5×).
constexpr double kBackwardFlopsRatio = 2.5;

void check_size(double v, const char* what) {
  if (!(v >= 0) || !std::isfinite(v))
    throw InputError(fmt::format("{} must be a non-negative number (got {}).", what, v));
}

// A GPU without FP8 tensor cores (peak_flops_fp8 = 0, Ampere) cannot price an FP8 GEMM.
void check_dtype(const ClusterSpec& c, Dtype dtype) {
  if (dtype == Dtype::fp8 && c.gpu.peak_flops_fp8 <= 0)
    throw InputError(fmt::format("an FP8 GEMM cannot run on {} ({}): it has no FP8 tensor cores.",
                                 c.name, c.gpu.name));
}

double gemm_efficiency(const GpuSpec& g, Dtype dtype) {
  switch (dtype) {
  case Dtype::bf16:
    return g.gemm_efficiency_bf16;
  case Dtype::fp8:
    return g.gemm_efficiency_fp8;
  case Dtype::fp32:
    return g.gemm_efficiency_fp32;
  }
  return g.gemm_efficiency_bf16;
}

// FP8 GEMMs write BF16 (Transformer Engine, DeepGEMM); the others write their own type.
double output_bytes(Dtype dtype) {
  return dtype == Dtype::fp32 ? 4 : 2;
}

// One GEMM's time on the whole GPU without the launch: the tile-quantized compute time and the
// compulsory HBM traffic combined as sqrt(compute² + memory²), a smooth roofline that equals the
// larger one far from the ridge and charges imperfect overlap near it (docs/HARDWARE.md).
double gemm_body_s(const GpuSpec& g, double m, double n, double k, Dtype dtype) {
  const double sms = g.sm_count;
  const double flops_per_sm_per_s = gemm_efficiency(g, dtype) * peak_flops(g, dtype) / sms;
  const int max_splits = std::clamp(static_cast<int>(std::floor(k / kMinKPerSplit)), 1, kMaxSplits);
  double compute_s = std::numeric_limits<double>::infinity();
  for (const auto& [tile_m, tile_n] :
       {std::pair{kTileShort, kTileLong}, std::pair{kTileLong, kTileShort}}) {
    const double tiles = std::ceil(m / tile_m) * std::ceil(n / tile_n);
    for (int splits = 1; splits <= max_splits; ++splits) {
      const double waves = std::ceil(tiles * splits / sms);
      compute_s =
          std::min(compute_s, waves * 2 * tile_m * tile_n * (k / splits) / flops_per_sm_per_s);
    }
  }
  const double bytes = (m * k + n * k) * dtype_bytes(dtype) + m * n * output_bytes(dtype);
  const double memory_s = bytes / g.hbm_bandwidth_achievable;
  return std::hypot(compute_s, memory_s);
}

double grouped_body_s(const GpuSpec& g, std::span<const double> rows, double n, double k,
                      Dtype dtype) {
  // Experts with the rows of the one before (all of them under balanced routing) cost what it
  // cost: priced once, summed in the same order.
  double t = 0, last_m = -1, last_t = 0;
  for (double m : rows)
    if (m > 0) {
      if (m != last_m) {
        last_t = gemm_body_s(g, m, n, k, dtype);
        last_m = m;
      }
      t += last_t;
    }
  return t;
}

// (query, key) pairs the mask keeps.
double kept_pairs(const AttentionShape& s) {
  const bool masked = s.causal || s.window > 0;
  if (!masked)
    return s.q_len * s.kv_len;
  // Query i (0-based) sits at position kv_len − q_len + i and sees keys 0 … that position, at
  // most `window` of them: counts run from a to b.
  const double a = s.kv_len - s.q_len + 1, b = s.kv_len;
  const double w = s.window > 0 ? s.window : std::numeric_limits<double>::infinity();
  if (w >= b)
    return (a + b) * s.q_len / 2;
  if (w <= a)
    return w * s.q_len;
  return (a + w) * (w - a + 1) / 2 + (b - w) * w;
}

AttentionEfficiency curve_at(const std::vector<AttentionEfficiency>& curves, double head_dim) {
  if (head_dim <= curves.front().head_dim)
    return curves.front();
  if (head_dim >= curves.back().head_dim)
    return curves.back();
  for (std::size_t i = 1; i < curves.size(); ++i) {
    const auto& lo = curves[i - 1];
    const auto& hi = curves[i];
    if (head_dim <= hi.head_dim) {
      const double f = (head_dim - lo.head_dim) / (hi.head_dim - lo.head_dim);
      // Between two head dimensions' curves: their parameters blended, no measured points.
      return {head_dim, lo.efficiency_max + f * (hi.efficiency_max - lo.efficiency_max),
              lo.half_efficiency_kv_len +
                  f * (hi.half_efficiency_kv_len - lo.half_efficiency_kv_len),
              {}};
    }
  }
  return curves.back();
}

// η at L keys per query block: the curve up to its first measured point (its upper fit point,
// which the curve passes through), then through the others, linear in log L, and the last one's beyond. Each point's L and η as
// attention_time_s counts them: a non-causal call of S tokens computes its S² pairs, S keys per
// block; a causal one keeps S(S+1)/2 and computes half of each diagonal tile besides,
// S/2 + 64 + 1/2 keys per block.
double burst_efficiency(const AttentionEfficiency& curve, double keys_per_block, double peak) {
  auto of_curve = [&](double L) {
    return curve.efficiency_max * L / (L + curve.half_efficiency_kv_len);
  };
  const auto& points = curve.points;
  if (points.empty())
    return of_curve(keys_per_block);
  auto keys = [](const AttentionEfficiency::Point& p) {
    return p.causal ? (p.seq_len + 1) / 2 + kAttentionTile / 2 : p.seq_len;
  };
  auto eta = [&](const AttentionEfficiency::Point& p) {
    if (!p.causal)
      return p.tflops * 1e12 / peak;
    const double kept = p.seq_len * (p.seq_len + 1) / 2;
    const double computed = kept + p.seq_len * kAttentionTile / 2;
    return p.tflops * 1e12 * (computed / kept) / peak;
  };
  if (keys_per_block <= keys(points.front()))
    return of_curve(keys_per_block);
  for (std::size_t i = 1; i < points.size(); ++i)
    if (keys_per_block <= keys(points[i])) {
      const double f = std::log(keys_per_block / keys(points[i - 1])) /
                       std::log(keys(points[i]) / keys(points[i - 1]));
      return eta(points[i - 1]) + f * (eta(points[i]) - eta(points[i - 1]));
    }
  return eta(points.back());
}

double attention_time_s(const ClusterSpec& c, const Calibration& calibration,
                        const AttentionShape& s, bool backward) {
  const double flops = attention_flops(s, backward); // validates the shape
  if (flops == 0)
    return 0;
  if (auto t = calibrated_attention_time_s(calibration, backward, s))
    return *t;
  const GpuSpec& g = c.gpu;
  const double tile = kAttentionTile;
  const double q_tiles = std::ceil(s.q_len / tile), kv_tiles = std::ceil(s.kv_len / tile);
  const double kept = kept_pairs(s);
  double computed = q_tiles * kv_tiles * tile * tile;
  if (s.causal || s.window > 0) {
    const double masked_edges = (s.window > 0 && s.window < s.kv_len) ? 2 : 1;
    computed = std::min(computed, kept + q_tiles * masked_edges * tile * tile / 2);
  }
  // Keys one query block iterates over: short loops pay the block's fixed prologue/epilogue,
  // which the saturating efficiency curve describes (fitted to the FA3 figures, hardware.md §1.3).
  const double keys_per_block = computed / (q_tiles * tile);
  const std::vector<AttentionEfficiency>* curves = backward ? &g.attention_bwd : &g.attention_fwd;
  if (s.kernel == AttentionKernel::flash2 && !g.flash2_fwd.empty())
    curves = backward ? &g.flash2_bwd : &g.flash2_fwd;
  else if (s.kernel == AttentionKernel::cudnn && !g.cudnn_fwd.empty())
    curves = backward ? &g.cudnn_bwd : &g.cudnn_fwd;
  const AttentionEfficiency curve = curve_at(*curves, (s.qk_head_dim + s.v_head_dim) / 2);
  const double efficiency =
      g.attention_sustained * burst_efficiency(curve, keys_per_block, g.peak_flops_bf16);
  // Forward parallelizes over query blocks, backward over key blocks; fewer blocks than SMs
  // leaves SMs idle (FA3's persistent scheduler balances the tail otherwise).
  const double blocks = s.batch * s.heads * (backward ? kv_tiles : q_tiles);
  const double fill = std::max(1.0, g.sm_count / blocks);
  return flops * (computed / kept) / (efficiency * g.peak_flops_bf16) * fill + g.kernel_launch_s;
}

} // namespace

double peak_flops(const GpuSpec& g, Dtype dtype) {
  switch (dtype) {
  case Dtype::bf16:
    return g.peak_flops_bf16;
  case Dtype::fp8:
    return g.peak_flops_fp8;
  case Dtype::fp32:
    return g.peak_flops_fp32;
  }
  return g.peak_flops_bf16;
}

double gemm_time_s(const ClusterSpec& c, const Calibration& calibration, double m, double n,
                   double k, Dtype dtype) {
  check_size(m, "GEMM m");
  check_size(n, "GEMM n");
  check_size(k, "GEMM k");
  check_dtype(c, dtype);
  if (m == 0 || n == 0 || k == 0)
    return 0;
  if (auto t = calibrated_gemm_time_s(calibration, dtype, 1, m, n, k))
    return *t;
  return gemm_body_s(c.gpu, m, n, k, dtype) + c.gpu.kernel_launch_s;
}

double grouped_gemm_time_s(const ClusterSpec& c, const Calibration& calibration,
                           std::span<const double> rows_per_expert, double n, double k,
                           Dtype dtype) {
  check_size(n, "grouped GEMM n");
  check_size(k, "grouped GEMM k");
  check_dtype(c, dtype);
  double total_rows = 0;
  int experts = 0;
  for (double m : rows_per_expert) {
    check_size(m, "grouped GEMM rows per expert");
    total_rows += m;
    experts += 1;
  }
  if (total_rows == 0 || n == 0 || k == 0)
    return 0;
  const double model_s = grouped_body_s(c.gpu, rows_per_expert, n, k, dtype);
  if (!calibration.gemm.empty()) {
    // A measured grouped GEMM is balanced (m rows per expert); the model supplies the penalty of
    // this routing's imbalance relative to the balanced one.
    const double mean = total_rows / experts;
    if (auto t = calibrated_gemm_time_s(calibration, dtype, experts, mean, n, k)) {
      const double balanced_s = experts * gemm_body_s(c.gpu, mean, n, k, dtype);
      return *t * (model_s / balanced_s);
    }
  }
  return model_s + c.gpu.kernel_launch_s;
}

double attention_flops(const AttentionShape& s, bool backward) {
  check_size(s.batch, "attention batch");
  check_size(s.heads, "attention heads");
  check_size(s.kv_heads, "attention kv_heads");
  check_size(s.q_len, "attention q_len");
  check_size(s.kv_len, "attention kv_len");
  check_size(s.qk_head_dim, "attention qk_head_dim");
  check_size(s.v_head_dim, "attention v_head_dim");
  check_size(s.window, "attention window");
  if ((s.causal || s.window > 0) && s.q_len > s.kv_len)
    throw InputError(fmt::format("causal attention needs q_len <= kv_len (got q_len {} and "
                                 "kv_len {}).",
                                 s.q_len, s.kv_len));
  if (s.batch == 0 || s.heads == 0 || s.q_len == 0 || s.kv_len == 0)
    return 0;
  const double forward = 2 * s.batch * s.heads * kept_pairs(s) * (s.qk_head_dim + s.v_head_dim);
  return backward ? kBackwardFlopsRatio * forward : forward;
}

double attention_fwd_time_s(const ClusterSpec& c, const Calibration& calibration,
                            const AttentionShape& s) {
  return attention_time_s(c, calibration, s, false);
}

double attention_bwd_time_s(const ClusterSpec& c, const Calibration& calibration,
                            const AttentionShape& s) {
  return attention_time_s(c, calibration, s, true);
}

double memory_bound_time_s(const ClusterSpec& c, const Calibration& calibration, double bytes) {
  check_size(bytes, "memory-bound kernel bytes");
  if (bytes == 0)
    return 0;
  const double bandwidth = calibration.hbm_bytes_per_s.value_or(c.gpu.hbm_bandwidth_achievable);
  return bytes / bandwidth + c.gpu.kernel_launch_s;
}

} // namespace mop::hw
