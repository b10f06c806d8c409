#pragma once
// The Schedule IR: the contract between planning (strategies/ lowers a Plan into it) and
// execution (sim/ plays it on the hardware model; real_backend/ will run it with CUDA and NCCL).
//
// A Schedule holds one program per *rank class* (ranks that behave identically, described once
// with a multiplicity). A program is an ordered list of ops on named streams, with explicit
// dependencies and explicit tensor allocations and frees. Everything that decides time or memory
// is visible here; nothing is hidden inside an executor. Ops carry their shapes, dtypes and byte
// counts as plain numbers: this header includes only the standard library.
#include "sim/mesh.hpp"

#include <cstdint>
#include <string>
#include <vector>

namespace mop::sim {

enum class OpKind {
  // GPU compute
  gemm,          // C[m,n] = A[m,k]·B[k,n], `gemm.instances` independent copies
  grouped_gemm,  // one GEMM per expert: rows_per_expert[i] x n x k
  attention_fwd, // flash attention forward over `attention`
  attention_bwd, // flash attention backward over `attention`
  elementwise,   // memory-bound: norms, activations, RoPE, softmax, loss; priced by `bytes`
  // communication (NCCL) over `group`; `bytes` is nccl-tests' "size" per rank
  all_gather,
  reduce_scatter,
  all_reduce,
  all_to_all,
  send_recv, // ring exchange inside `group`: every rank sends to the next, receives from the
             // previous (NCCL send/recv pairs; context-parallel ring attention)
  send,      // point-to-point to `peer_class` (pipeline); the matching recv names this op
  recv,      // completes when the matching send (remote_deps) completes; takes no time itself
  // host <-> device over PCIe, pinned memory
  copy_h2d,
  copy_d2h,
  // host CPU
  host_adam, // AdamW over `params` parameters on the host, FP32 master weights and moments
};
const char* op_kind_name(OpKind k);
bool is_collective(OpKind k); // all_gather .. recv (send_recv included)
bool is_copy(OpKind k);       // copy_h2d, copy_d2h

// What an op is for: the report's time breakdown and the trace's colours use it.
enum class Category {
  forward,
  backward,
  recompute,
  tp_comm,   // tensor/sequence-parallel collectives
  cp_comm,   // context-parallel ring exchanges or Ulysses all-to-all
  ep_comm,   // expert dispatch and combine
  dp_comm,   // FSDP/ZeRO gathers and gradient reductions
  pp_comm,   // pipeline send/recv
  offload,   // activation offload and reload, gradient download, parameter upload
  optimizer, // the optimizer step (GPU or host)
};
const char* category_name(Category c);

enum class Dtype { bf16, fp8, fp32 };
enum class Device { hbm, host };

// What a tensor is, for the memory breakdown (CLI.md memory_breakdown keys).
enum class MemoryKind { weights, grads, optimizer, activations, comm_buffers, other };
const char* memory_kind_name(MemoryKind k);

struct GemmShape {
  double m = 0, n = 0, k = 0;
  double instances = 1;                // gemm: independent copies (batched)
  std::vector<double> rows_per_expert; // grouped_gemm: rows of each expert's GEMM (m ignored)
};

struct AttentionShape {
  double batch = 0;    // sequences (or sequence chunks) in the call
  double heads = 0;    // query heads on this rank
  double kv_heads = 0; // key/value heads on this rank
  double q_len = 0;    // queries per sequence
  double kv_len = 0;   // keys per sequence
  double qk_head_dim = 0;
  double v_head_dim = 0;
  bool causal = true;
  double window = 0; // sliding window in tokens; 0 = none
};

struct RemoteDep {
  int rank_class = 0; // the other rank class
  int op = 0;         // index of the op in that class's program
};

struct Op {
  std::string name; // "L12.attn.q_proj.fwd", "L12.fsdp.all_gather", "opt.adam.L3"
  OpKind kind = OpKind::elementwise;
  Category category = Category::forward;
  int stream = 0; // index into RankClass::streams
  Dtype dtype = Dtype::bf16;
  GemmShape gemm;
  AttentionShape attention;
  double bytes = 0;          // elementwise: HBM bytes read+written; collective: per-rank size; copy
  int group = -1;            // collectives: index into Schedule::groups
  int peer_class = -1;       // send/recv: the rank class at the other end
  double params = 0;         // host_adam: parameters updated
  bool torch_kernel = false; // host_adam: torch's AdamW on the CPU instead of a vectorised
                             // CPU-Adam (DeepSpeed's); slower by the cluster's measured factor
  double model_flops = 0;    // counted towards MFU (0 for recompute, communication, copies)
  int layer = -1;            // decoder layer it belongs to, -1 for none (trace grouping)
  int micro_batch = -1;      // micro-batch it belongs to, -1 for none
  std::vector<int> deps;     // ops of this class that must end before this one starts
  std::vector<RemoteDep> remote_deps; // ops of other classes that must end first
  std::vector<int> allocs;            // tensors (of this class) allocated when the op starts
  std::vector<int> frees;             // tensors freed when the op ends
};

struct Tensor {
  std::string name;
  double bytes = 0;
  Device device = Device::hbm;
  MemoryKind kind = MemoryKind::activations;
  // Resident tensors (weight shards, optimizer state, the CUDA context) live for the whole step:
  // allocated before the first op, never freed. Every other tensor must be freed by some op.
  bool resident = false;
};

// A communicator: which ranks form it (`spec`, over Schedule::mesh; an executor derives each
// rank's members from it) and how they sit on the topology (the simulator's cost).
struct Group {
  std::string name; // "tp", "cp", "ep", "fsdp.attention", "pp.0-1"
  int ranks = 1;
  int ranks_per_node = 1; // ranks of the group that share a node
  GroupSpec spec;         // empty view: point-to-point between stages (pipeline)
};

struct RankClass {
  std::string name; // "stage 0 of 4"
  int multiplicity = 1;
  int stage = 0;
  std::vector<std::string> streams; // "compute", "comm.tp", "comm.dp", "copy.h2d", "host", ...
  std::vector<Tensor> tensors;
  std::vector<Op> ops; // program order: on one stream, ops run in this order
};

struct Schedule {
  std::vector<RankClass> classes;
  std::vector<Group> groups;
  Mesh mesh; // the ranks' layout, which every group's spec refers to
  int world = 1;
  int gpus_per_node = 8;
  double tokens_per_step = 0;      // tokens the whole world trains on per optimizer step
  double model_flops_per_step = 0; // whole world, the model-FLOPs convention (README)
};

// Structural checks, each a one-sentence std::invalid_argument naming the class and op:
// indices in range; dependencies acyclic within and across classes (Boost.Graph); every
// non-resident tensor allocated once and freed once, after its allocation; every collective's
// group exists, matches its mesh spec (size, ranks per node), and every recv has a matching
// send in its peer class.
void check_schedule(const Schedule& s);

} // namespace mop::sim
