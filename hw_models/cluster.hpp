#pragma once
// Hardware specs: one GPU, one node of them, the fabric between nodes. Loaded from
// configs/clusters/<id>.json (compiled in) or from a user's file of the same shape
// (docs/HARDWARE.md). All figures are SI base units in double: bytes, bytes/s, FLOP/s, seconds.
#include "common/json_io.hpp"
#include "hw_models/memory_overheads.hpp"

#include <string>
#include <utility>
#include <vector>

namespace mop::hw {

// Selects NCCL's per-architecture tuner constants (src/graph/tuning.cc: compCapIndex) and the
// tensor-core formats the GPU has (Ampere: no FP8; MXFP8 on Blackwell only).
enum class GpuArch { ampere, hopper, blackwell };
// NCCL charges a different network post overhead per host CPU vendor (tuning.cc getNetOverhead).
enum class CpuVendor { intel, amd };

// FlashAttention efficiency against the dense BF16 peak at one head dimension:
// η(L) = efficiency_max · L / (L + half_efficiency_kv_len), L = keys visited per query tile.
struct AttentionEfficiency {
  double head_dim = 128;
  double efficiency_max = 0;
  double half_efficiency_kv_len = 0;
  // The kernel's benchmark at its upper fit point and at longer lengths, where the curve's rise
  // no longer holds (cuDNN slows past 32K on Blackwell, its backward on Hopper): one call of
  // seq_len queries and keys, causal or not, and its TFLOPS on the kept pairs as published. Past
  // the first point's keys per block, η follows them, linear in log L, and the last one's beyond.
  struct Point {
    double seq_len = 0;
    double tflops = 0;
    bool causal = true;
  };
  std::vector<Point> points;
};

struct GpuSpec {
  std::string name;
  GpuArch arch = GpuArch::hopper;
  double hbm_bytes = 0;                // as CUDA reports it (totalGlobalMem)
  double hbm_bandwidth = 0;            // datasheet ceiling, bytes/s
  double hbm_bandwidth_achievable = 0; // STREAM-style copy, bytes/s
  double peak_flops_bf16 = 0;          // dense tensor core
  double peak_flops_fp8 = 0;           // dense tensor core; 0: no FP8 tensor cores (Ampere)
  double peak_flops_fp32 = 0;          // non-tensor FP32
  int sm_count = 0;
  double gemm_efficiency_bf16 = 0; // large-GEMM fraction of peak (cuBLAS, best shapes)
  double gemm_efficiency_fp8 = 0; // 0 where peak_flops_fp8 is 0
  double gemm_efficiency_fp32 = 0;
  double kernel_launch_s = 0; // fixed cost of one kernel (launch, prologue, epilogue)
  // The attention curves' figures come from benchmarks that rest the GPU between kernels; in
  // training, back-to-back kernels hold it at its power limit and its clock drops: the fraction
  // of the burst throughput sustained (1: no sustained measurement, burst figures used).
  double attention_sustained = 1;
  std::vector<AttentionEfficiency> attention_fwd; // sorted by head_dim, at least one
  std::vector<AttentionEfficiency> attention_bwd;
  // Other attention kernels' curves (attention_kernels.flash2 / .cudnn in the JSON; empty: none
  // published for this GPU, priced with the curves above).
  std::vector<AttentionEfficiency> flash2_fwd, flash2_bwd, cudnn_fwd, cudnn_bwd;
};

struct NodeSpec {
  int gpus_per_node = 0;
  double nvlink_bandwidth = 0;      // per direction per GPU, datasheet (line rate)
  double nvlink_nccl_bandwidth = 0; // per direction per GPU that NCCL's ring reaches (busbw)
  double nvlink_copy_bandwidth = 0; // copy-engine GPU→GPU, one direction
  bool nvls = false;                // NVSwitch multicast/reduction (NVLink SHARP)
  double nvls_efficiency = 0;       // NCCL tuning.cc nvlsEfficiency (0 on Ampere: no NVLS)
  double pcie_bandwidth = 0;        // host↔device per GPU per direction, datasheet
  double pcie_h2d_bandwidth = 0;    // pinned, copy engine, measured
  double pcie_d2h_bandwidth = 0;
  double pcie_duplex_factor = 0;       // both directions at once: total / one direction
  double pcie_duplex_h2d_share = 0;    // H2D's share of that total
  bool nic_shares_pcie_switch = false; // the GPU's x16 link also carries its NIC's RDMA
  int host_cores = 0;
  CpuVendor cpu_vendor = CpuVendor::intel;
  double host_memory_bytes = 0;
  double host_memory_bandwidth = 0;            // theoretical (channels × MT/s × 8 B)
  double host_memory_bandwidth_achievable = 0; // what STREAM-like traffic gets
  int nics = 0;                                // compute-fabric NICs
  double nic_line_rate = 0;                    // per NIC per direction, bytes/s
  double nic_bandwidth = 0;                    // per NIC per direction that NCCL reaches
  // Hierarchical MoE dispatch (DeepEP's normal kernels): per GPU, the bytes it sends across
  // nodes (once per destination node) and the NVLink share that forwards them; default: the
  // NIC's and NCCL's NVLink bandwidth.
  double ep_rdma_bandwidth = 0;
  double ep_nvlink_bandwidth = 0;
  // DeepEP's intranode kernels (an EP group inside one node); default: NCCL's NVLink bandwidth.
  double ep_nvlink_intranode_bandwidth = 0;
};

struct FabricSpec {
  std::string kind;     // "InfiniBand NDR"
  std::string topology; // "rail-optimized": GPU i of every node on the same leaf switch
  double latency_s = 0; // added to every inter-node step, as NCCL adds the net's latency
};

struct HostOptimizerSpec {
  // hardware.md §4: suggested 1.5e9 params/s per node (DeepSpeed CPU-Adam, ≈1.4e9 measured).
  double adam_params_per_s = 1.5e9; // per node with all host cores
  // hardware.md §4: read p, g, m, v (16 B) + write p, m, v (12 B) + write bf16 copy (2 B).
  double adam_bytes_per_param = 30;
  // hardware.md §4 (MAINT, DeepSpeed docs and PR #378): DeepSpeed's vectorised CPU-Adam is
  // 5.1–6.5× faster than torch's AdamW on the CPU; torch's runs this many times slower.
  double torch_adam_slowdown = 5.8;
};

struct ClusterSpec {
  std::string name;
  std::string description;
  GpuSpec gpu;
  NodeSpec node;
  FabricSpec fabric;
  HostOptimizerSpec host_optimizer;
  MemoryOverheads overheads;
  // "gpu.hbm_bytes" → "MEAS: NVIDIA/cuda-samples #311 ...", in file order.
  std::vector<std::pair<std::string, std::string>> sources;
};

// The node types compiled in: "a100", "b200", "h100", "h100-96gb-500w", "h200".
std::vector<std::string> cluster_ids();
// A catalog id, or a path (contains '/', ends in .json, or names an existing file).
ClusterSpec load_cluster(const std::string& name_or_path);
// Reads a parsed cluster JSON; `origin` names it in error sentences.
ClusterSpec cluster_from_json(const Json& json, const std::string& origin,
                              const std::string& default_name);

std::string_view gpu_arch_name(GpuArch arch);
std::string_view cpu_vendor_name(CpuVendor vendor);
// Every figure of the spec by its dotted name ("gpu.hbm_bytes"), as `mop hw show` prints it.
Json cluster_to_json(const ClusterSpec& cluster);
// The source of one figure, "" when the file gives none.
std::string source_of(const ClusterSpec& cluster, const std::string& field);

} // namespace mop::hw
