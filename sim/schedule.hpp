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
#include <optional>
#include <string>
#include <string_view>
#include <utility>
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
  // a meeting point of several rank classes: ends when its deps and remote deps have ended,
  // takes no time and occupies nothing (a collective whose members run different programs
  // waits on one: uneven expert routing, strategies/lower.hpp)
  barrier,
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

// Which attention kernel runs the op (hw::AttentionKernel): the newest FlashAttention with
// figures for the GPU, FlashAttention-2, or cuDNN's fused attention.
enum class AttentionKernel : std::uint8_t { flash, flash2, cudnn };
const char* attention_kernel_name(AttentionKernel k); // "flash", "flash2", "cudnn"
// The kernel of that name; empty for any other text.
std::optional<AttentionKernel> parse_attention_kernel(std::string_view name);

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
  AttentionKernel kernel = AttentionKernel::flash;
};

// ---- The executable layer -------------------------------------------------------------------
// An op's `kind` is how the simulator prices it; its `kernel` is what an executor computes, on its
// `inputs` and `outputs` (tensor ids of its rank class). Data dependencies follow from the
// operands; `deps` adds the control-only ones. Kernel::none marks a cost-only op (FP8 GEMMs, MLA
// projections, capacity dropping, ...): priced, never executed; an executor refuses it by name.
//
// Shapes are row-major and local to a rank. "Rows" are this rank's tokens of one micro-batch, in
// the order of the token layout (Schedule::tokens).
enum class Kernel {
  none,
  // tokens: outputs ids [rows] (i32) and labels [rows] (i32, -1 for no label): this rank's rows
  //   of micro-batch `Op::micro_batch` (its data-parallel sequences, its CP chunk's positions,
  //   and with attrs.sequence_parallel its SP share).
  tokens,
  // embedding_fwd: inputs ids, table [vocab_shard, hidden] (a parameter); output y [rows, hidden]:
  //   the table's row of each id inside the table's shard, 0 for the others.
  // embedding_bwd: inputs ids, dy; output dtable (accumulates).
  embedding_fwd,
  embedding_bwd,
  // matmul: inputs a1 [, a2 ...] (attrs.a_blocks of them), b1 [, b2 ...]; outputs c1 [, c2 ...].
  //   Each operand is a matrix of shape[0] rows and the rest of its elements as columns; each
  //   list holds the column blocks of one stored matrix (side by side):
  //   C (+)= op(A)·op(B), op(X) = Xᵀ when attrs.trans_a / trans_b. Fused weights (q|k|v,
  //   gate|up) are several parameters read as one matrix; their gradients come out as several.
  matmul,
  // rmsnorm_fwd: inputs x [rows, dim], w [dim]; outputs y, rstd [rows].
  // rmsnorm_bwd: inputs x, w, rstd, dy; outputs dx, dw (dw accumulates).
  rmsnorm_fwd,
  rmsnorm_bwd,
  // rope: input x [rows, heads, head_dim]; output y, rotated by each row's position (the token
  //   layout's), inverse rotation with attrs.inverse (the backward).
  rope,
  // swiglu_fwd: input gu [rows, 2F] (gate then up in each row); output act [rows, F].
  // swiglu_bwd: inputs gu, dact; output dgu.
  swiglu_fwd,
  swiglu_bwd,
  // add: inputs a, b; output a + b.
  add,
  // attention_fwd: inputs q [rows, heads, d], k, v [rows, kv_heads, d]; outputs o, lse
  //   [rows, heads], over attrs.sequences sequences (or CP chunks) of rows / sequences tokens.
  //   attrs.ring_step s > 0: k and v are the block of ring rank (mine - s) mod ring (over the
  //   token layout's "cp.ring" dim), and the result merges into o and lse (exactly, by
  //   log-sum-exp). attrs.full_sequence (after a Ulysses all-to-all): each sequence's rows are
  //   the chunks of the "cp.ulysses" group's ranks in group order (whole sequences at positions
  //   0.. with Ulysses alone; with a ring as well, the ring rank's group's chunks), else this
  //   rank's chunk: the token layout's positions.
  // attention_bwd: inputs q, k, v, o, lse, do; outputs dq, dk, dv (all accumulate; with
  //   attrs.ring_step, dk and dv are the travelling gradient of that step's k/v block).
  attention_fwd,
  attention_bwd,
  // cross_entropy: inputs logits [rows, vocab], labels; outputs dlogits, loss [1] (accumulates):
  //   softmax cross-entropy summed over labelled rows, gradient scaled by 1 / the step's
  //   labelled tokens (the whole batch's).
  cross_entropy,
  // Vocabulary-parallel cross-entropy (Megatron's): ce_max: input logits; output max [rows].
  //   ce_sums: inputs logits, max, labels; outputs sum of exp(logit - max) [rows], the label's
  //   logit [rows] (0 outside this shard). ce_finish: inputs logits, max, sum, target, labels;
  //   outputs dlogits, loss [1] (accumulates; each row counted by one rank of the group).
  ce_max,
  ce_sums,
  ce_finish,
  // transpose: input x viewed as [a, b, rest] (a = attrs.transpose_a, b = attrs.transpose_b);
  //   output y [b, a, rest]: whole rest-blocks move. The layout change on each side of an
  //   equal-split all_to_all (Ulysses: pack a rank's rows by destination head group, unpack
  //   the received blocks into whole sequences), as DeepSpeed-Ulysses and Transformer Engine
  //   permute contiguously before and after theirs; a CUDA executor runs it as one copy kernel.
  transpose,
  // adamw: inputs params..., grads..., m, v (attrs.params: how many of the inputs are params);
  //   outputs params'..., m, v. One AdamW step of the step's index over the bucket's
  //   elements this rank owns: m and v are the bucket's flat shard (ZeRO >= 1) or all of it.
  //   Each list is read as a flat concatenation; a list covering the whole bucket is first cut
  //   to this rank's shard. The output params' are the updated shard (a param_shard tensor) or,
  //   unsharded, the members themselves.
  adamw,
  // copy: inputs read as a flat concatenation are written to the outputs' flat concatenation
  //   (equal sizes; real tensors, or i32 ones alike): offload and reload (OpKind copy_d2h /
  //   copy_h2d), parameter uploads, the chunks of a chunked loss. With attrs.accumulate (real
  //   tensors) the inputs are added into the outputs' current values instead: each
  //   micro-batch's reduced gradients summed into the host gradients (the step's first such
  //   copy overwrites them). The simulator prices either by the bytes that cross the link.
  copy,
  // zero: sets its outputs to 0 (gradient buffers at the start of a step).
  zero,
  // collectives (OpKind says which; over Op::group). Several inputs (or outputs) are read (or
  //   written) as the concatenation of their flattened contents, in order; the last
  //   attrs.count_inputs inputs are count tables (below), read for sizes, not moved. all_gather
  //   concatenates the group's inputs in group-rank order; outputs take its first elements
  //   (a flat shard's padding is dropped); into an output of padded runtime rows each rank's
  //   contribution is its inputs zero-padded to 1/group of the output (ETP's gather of routed
  //   rows, padded to the group's largest count). reduce_scatter sums the group's inputs,
  //   zero-padded to a multiple of the group, and keeps this rank's part (outputs take its first
  //   elements; with attrs.accumulate they add into them: FSDP2's micro-batches summed into the
  //   gradient shard); all_reduce sums (attrs.reduce_max: the maximum) into outputs of the
  //   inputs' sizes; send_recv passes the input to the next ring rank and receives the previous
  //   one's. K and V travel a ring hop in one message as inputs {k, v}, outputs {k', v'}.
  //   all_to_all: without count tables the input is cut into group-size equal parts, part j
  //   going to group rank j, and the output holds the parts received, in group-rank order
  //   (NCCL's equal-split all-to-all: Ulysses' layout changes are transpose ops around it). With
  //   count tables send_counts, recv_counts (all-to-all-v, attrs.count_inputs = 2) the input's
  //   rows are cut by send_counts: its elements cut into group-size equal parts, rank j gets
  //   the sum of part j rows; from rank j come the sum of part j of recv_counts rows.
  //   Pipeline send (inputs, no outputs) and recv (outputs, no inputs) talk to the rank at this
  //   rank's place (its coordinates but "pp") in the stage of Op::peer_class; a recv's first
  //   remote dependency names the send it receives, and between two ranks messages arrive in
  //   the order they were sent. Their group is the point-to-point group (empty spec): the
  //   simulator prices the link, the executor needs none.
  collective,
  // --- Mixture-of-Experts (dropless top-k routing) ---------------------------------------------
  // Count tables are Element::i64 index tensors of rows per expert. Rows whose number depends
  // on the routing are runtime rows (Tensor::rows): the shape says the expected count.
  // router_topk_fwd: input logits [rows, experts]; outputs probs [rows, experts] (softmax),
  //   idx [rows, k] (i32: the k most probable experts, decreasing, ties to the lower index),
  //   weights [rows, k] (their probabilities, divided by their sum with attrs.normalize);
  //   k = attrs.top_k.
  // router_topk_bwd: inputs probs, idx, dweights; output dlogits (through the normalisation and
  //   the softmax).
  router_topk_fwd,
  router_topk_bwd,
  // permute: inputs x [rows, dim], idx [rows, k]; outputs xp [rows·k, dim], order [rows·k] (i32),
  //   counts [experts] (i64). The (row, slot) pairs sorted by expert, stably (so by destination
  //   EP rank, then expert, then row): order[i] = row·k + slot of the i-th, xp[i] = x[row],
  //   counts[e] = pairs routed to expert e (experts = the last dimension of the router's
  //   logits; the op reads it from counts' shape).
  // permute_bwd: inputs dxp [rows·k, dim], order; output dx [rows, dim]: the sum of each row's
  //   copies (attrs.accumulate: added to dx).
  permute,
  permute_bwd,
  // unpermute: inputs y [rows·k, dim] (permuted order), order, weights [rows, k]; output
  //   out [rows, dim] = the sum over a row's slots of weight · y (the weighted combine).
  // unpermute_bwd: inputs dout [rows, dim], y, order, weights; outputs dy [rows·k, dim] (weight ·
  //   dout of the row), dweights [rows, k] (dout · y of the pair).
  unpermute,
  unpermute_bwd,
  // grouped_matmul: a matmul (inputs a..., b..., outputs c... as Kernel::matmul, attrs.a_blocks)
  //   per group of rows, over row segments given by a count table, the last input
  //   (attrs.count_inputs = 1) of shape [..., G]: G groups (local experts); its elements, in
  //   order, are consecutive row segments, segment i of counts[i] rows belonging to group
  //   i mod G. When the row operands have padded runtime rows (Tensor::rows.padded) the table is
  //   [P, ..., G]: P blocks of rows, block p holding the segments of counts[p] and padded to the
  //   largest block; padding rows belong to no group (outputs stay 0 there). Without trans_a,
  //   A and C are row-segmented and B is stacked per group ([G, k, n], op(B) per group):
  //   C[rows of g] = A[rows of g] · op(B[g]). With trans_a, A and B are row-segmented and C is
  //   stacked per group: C[g] (+)= A[rows of g]ᵀ · B[rows of g] (expert weight gradients).
  //   Priced as OpKind::grouped_gemm, GemmShape::rows_per_expert the expected rows of each group.
  //   attrs.group_count > 0: the op computes only the table's groups group_first ..
  //   group_first + group_count, which are the stacked operand's groups 0, 1, ... (rows of the
  //   other groups are not its own: C stays as it is there, or 0 without accumulate). A stacked
  //   operand with runtime rows (received expert copies) may hold fewer groups; the groups
  //   beyond them must have no rows.
  grouped_matmul,
  // --- Least-loaded expert rebalancing (LLEP, workload/rebalance.hpp) --------------------------
  // Every rank holds the same global count table and so computes the same assignment. A rank's
  // slots are its own experts (per = experts / ep, the rows it keeps) then its foreign copies:
  // the other ranks' experts it got a segment of, by expert index (so received source by
  // source). An expert's rows in their global order are source rank 0's (in its permuted
  // order), then source 1's, ...; the assignment cuts that order into contiguous segments.
  // llep_plan: input counts [ep, experts] (i64: row j = what EP rank j routes to each expert,
  //   the all-gather of the permute's counts); outputs, from workload::least_loaded on the
  //   column sums (whole counts, attrs.threshold, capacity, min_tokens, ranks_per_node):
  //   order [rows·k] (i32: my permuted rows in dispatch order: by destination rank, then its
  //   slot, then permuted order), send_slots [ep, per + F] (i64: my rows for each rank's
  //   slots), recv_slots [ep, per + F] (what each rank sends to my slots), send_copies
  //   [ep, per] (1 where I send my expert e's weights to rank d), recv_copies [ep, per] (1 where
  //   rank j sends me its expert e); F = experts - per, the most foreign slots a rank can have.
  //   Without rebalancing (max <= λ·mean) every row stays with its expert's owner: order is the
  //   identity and the tables are Megatron's dispatch counts.
  llep_plan,
  // index_rows: inputs x [rows, ...], index [rows'] (i32); output y [rows', ...], y[i] =
  //   x[index[i]]; with attrs.inverse (index a permutation) y[index[i]] = x[i].
  index_rows,
  // group_copies: inputs x1 [, x2 ...] (stacked [G, ...]), counts (attrs.count_inputs = 1: a
  //   table [..., G]); outputs y1 [, y2 ...] (runtime rows: the table's sum): segment i of the
  //   table is counts[i] copies of block i mod G (an owner's expert weights for the ranks that
  //   got its rows). group_copies_bwd: inputs dy1 [, dy2 ...], counts; outputs dx1 [, dx2 ...]:
  //   each segment's blocks summed into block i mod G (attrs.accumulate: added to dx; the
  //   helpers' gradients of a copy added to the owner's).
  group_copies,
  group_copies_bwd,
};
const char* kernel_name(Kernel k);

// What a tensor holds (the memory breakdown uses MemoryKind; this is what an executor binds).
enum class TensorRole {
  activation,      // produced and consumed within a pass
  saved,           // produced in forward, read in backward
  param,           // a parameter as the rank computes with it (its slice, gathered)
  param_shard,     // a parameter's ZeRO flat shard (what the rank owns between uses)
  grad,            // a parameter's gradient (slice or flat shard, like the param it belongs to)
  optimizer_state, // AdamW moments (m, v) over what the rank owns
  comm_buffer,     // a collective's staging buffer
  host_copy,       // an offloaded copy in host memory
  index,           // integers: token ids, labels, routing indices, counts
  loss,            // the summed loss
};
const char* tensor_role_name(TensorRole r);

// Element type of a tensor's storage: real numbers (bytes by the tensor's dtype) or integers.
enum class Element { real, i32, i64 };

// Routing-dependent sizes (MoE dispatch): a tensor whose number of rows the routing decides at
// run time. Its shape[0] is the expected row count (balanced routing: the rank's routed
// (token, slot) pairs, tokens·top_k, as each EP rank receives on average; times etp after the
// ETP gather) and is what the simulator prices; its Tensor::bytes is the buffer the plan
// reserves (the expected bytes times Plan::moe.imbalance). An executor sizes it from the count
// table `counts` (an Element::i64 tensor of the same rank class, written before the tensor is
// made): shape[0] = the sum of the table's elements, or with `padded` the table's shape[0]
// times the largest sum over its first dimension (the ETP group's rows, each member's padded
// to the largest). The other dimensions are static.
// With `reserve` the rows are expert copies a rank may hold (LLEP's foreign weights and their
// gradients): shape[0] is the plan's reserve, not a share of the routed rows, so the world's rows
// need not sum to the expected ones.
struct RuntimeRows {
  int counts = -1; // the count table; -1: a static shape
  bool padded = false;
  bool reserve = false;
};

// How a parameter sits on the ranks: axis `axis` of its full shape is split into the `dim`
// extent of mesh view `view`, a rank holding part coord(dim).
struct AxisSplit {
  int axis = 0;
  std::string view;
  std::string dim;
};

// A model parameter as the program refers to it. A parameter held by two stages (tied
// embeddings under a pipeline) is listed once per copy, under the same name, each in its own
// bucket.
struct ParamSpec {
  std::string name;                // the model's name for it ("L1.attn.wq")
  std::vector<std::int64_t> shape; // full, unsharded
  std::vector<AxisSplit> splits;   // the slice each rank holds
  int bucket = -1;                 // index into Schedule::buckets
  // A parameter the ranks of this group all hold whole while each sees other tokens (a
  // sequence-parallel norm or router): their gradients are first summed over it (Megatron's
  // _allreduce_layernorm_grads), then reduced with the bucket; its first member writes the
  // parameter back. No dims: none.
  GroupSpec partial_grads;
};

// Parameters whose gradients are reduced and whose state is sharded together (FSDP's flat
// parameter of a module, Megatron's gradient buffer bucket): the concatenation of its members'
// slices, flattened in member order and zero-padded to a multiple of the shard group, is cut
// into equal flat shards over `shard` (no dims: not sharded). Gradients sum over `grads` (the
// ranks holding the same slices); with HSDP the shards' gradients then sum over `replicas`.
// A bucket's members all live on one pipeline stage.
struct Bucket {
  std::string name;        // "L3.attention", "L3.dense", "embedding"
  std::vector<int> params; // members, indices into Schedule::params
  GroupSpec grads;
  GroupSpec shard;
  GroupSpec replicas;
  // Tied parameters held by two stages (the embedding and the LM head's copy of it, on the
  // first and last pipeline stage): after the reduction above, the owned gradients sum over
  // this group ({"embed", {"pp"}} with ends_only); each copy steps identically, and only the
  // group's first member writes the state back. Empty dims: not tied.
  GroupSpec tied;
  int zero = 0; // 0 replicate, 1 shard optimizer state, 2 + gradients, 3 + parameters
};

// Which tokens each rank holds: micro-batch m of data-parallel rank d holds sequences
// (m·dp + d)·micro_batch .. + micro_batch; CP rank c holds positions c·L .. (L = seq_len / cp),
// or with load balancing (ring and hybrid CP) the chunks c and 2·cp - 1 - c of 2·cp; with sequence
// parallelism TP rank t holds the t-th of tp equal parts of those rows.
struct TokenLayout {
  int seq_len = 0;
  int micro_batch = 1;  // sequences per micro-batch per data-parallel rank
  int global_batch = 0; // sequences per step
  std::string view = "attention";
  std::string dp_dim = "dp";
  std::vector<std::string> cp_dims; // the CP coordinate: first dim fastest
  bool cp_balanced = false;         // ring CP's 2·cp chunks
  std::string sp_dim = "tp";
};

struct Attrs {
  bool trans_a = false, trans_b = false; // matmul
  bool accumulate = false;               // outputs add into their current values
  bool inverse = false;                  // rope: the backward rotation
  bool sequence_parallel = false;        // tokens: this rank's SP share only
  bool reduce_max = false;               // all_reduce of the maximum
  int ring_step = 0;                     // attention: the ring block (see Kernel)
  bool full_sequence = false;            // attention: whole sequences after Ulysses
  int sequences = 1;                     // attention: sequences or chunks in the call
  bool causal = true;
  std::int64_t window = 0;
  double scale = 0; // attention: softmax scale
  double eps = 0;   // rmsnorm
  double theta = 0; // rope base
  // The previous step's update, streamed into this step's forward (host optimizer): an executor
  // skips it in a run's first step and runs the deferred ops once more after the last step.
  bool deferred = false;
  int params = 1;   // adamw: tensors in the params list
  int a_blocks = 1; // matmul: inputs that are column blocks of A (the rest are B's)
  std::int64_t transpose_a = 1, transpose_b = 1; // transpose: the [a, b, rest] view
  int top_k = 0;                                 // router_topk: experts per token
  bool normalize = true; // router_topk: weights divided by their sum (norm_topk_prob)
  int count_inputs = 0;  // collectives, grouped_matmul: trailing inputs that are count tables
  int group_first = 0, group_count = 0; // grouped_matmul: the table's groups it computes
  // llep_plan: workload::RebalanceOptions (λ, α, the smallest helper share, EP ranks per node)
  double threshold = 0, capacity = 0, min_tokens = 0;
  int ranks_per_node = 1;
  bool operator==(const Attrs&) const = default;
};

// How an op's size depends on the MoE routing. The op is sized for balanced routing; a
// simulation of uneven routing (every expert-parallel rank its own class) rescales it by the
// rank's tokens, as an executor's count tables would.
enum class Routed : std::uint8_t {
  no,
  rows,     // work over this rank's routed rows (expert GEMMs and activations, ETP gathers)
  exchange, // the expert-parallel dispatch or combine (all-to-all-v): its members wait for
            // each other, and the rank receiving most sets its time
  saved,    // a copy of a layer's saved activations (offload, reload): its routed share
  spill,    // least-loaded rebalancing's expert copies (and their gradients' return): the
            // copies this rank sends or receives, a barrier when it moves none
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
  double bytes = 0;       // elementwise: HBM bytes read+written; collective: per-rank size; copy;
                          // FP8 GEMMs: their quantize kernels' HBM bytes (casts, amax, transposes)
  double params = 0;      // host_adam: parameters updated
  // A MoE dispatch or combine by DeepEP or HybridEP (all_to_all): the bytes this rank sends
  // across nodes, each token once per destination node, and the bytes it sends to other GPUs,
  // each token once per destination GPU (over NVLink, directly or after its RDMA hop). Both 0:
  // NCCL's all-to-all of every (token, expert) copy.
  double rdma_bytes = 0;
  double nvl_bytes = 0;
  double model_flops = 0; // counted towards MFU (0 for recompute, communication, copies)
  int group = -1;         // collectives: index into Schedule::groups
  int peer_class = -1;    // send/recv: the rank class at the other end
  int layer = -1;         // decoder layer it belongs to, -1 for none (trace grouping)
  int micro_batch = -1;   // micro-batch it belongs to, -1 for none
  // The executable layer: what an executor computes (below), and its attributes, an index into
  // RankClass::attrs (-1: all defaults; most ops, and every cost-only one, have none, so the
  // attributes stay out of the op record the simulator walks).
  Kernel kernel = Kernel::none;
  int attrs = -1;
  Routed routed = Routed::no;
  bool torch_kernel = false; // host_adam: torch's AdamW on the CPU instead of a vectorised
                             // CPU-Adam (DeepSpeed's); slower by the cluster's measured factor
  // The host's side (Schedule::host_issue_s): the kernels the framework launches for this op
  // (0: none, e.g. a barrier), and whether the host waits for the op to end before it issues
  // anything after it (a dropless MoE layer reading its expert counts on the CPU).
  std::uint8_t kernels = 1;
  bool host_sync = false;
  std::vector<int> deps;     // ops of this class that must end before this one starts
  std::vector<RemoteDep> remote_deps; // ops of other classes that must end first
  std::vector<int> allocs;            // tensors (of this class) allocated when the op starts
  std::vector<int> frees;             // tensors freed when the op ends
  std::vector<int> inputs;            // tensors read
  std::vector<int> outputs;           // tensors written
};

struct Tensor {
  std::string name;
  double bytes = 0;
  Device device = Device::hbm;
  MemoryKind kind = MemoryKind::activations;
  // Resident tensors (weight shards, optimizer state, the CUDA context) live for the whole step:
  // allocated before the first op, never freed. Every other tensor must be freed by some op.
  bool resident = false;
  // The executable layer: the local shape (empty for a cost-only tensor), what it holds, and
  // for a parameter's tensors (param, param_shard, grad, optimizer_state) which parameter.
  std::vector<std::int64_t> shape;
  Element element = Element::real;
  Dtype dtype = Dtype::bf16; // of real elements, as the memory model counts them
  TensorRole role = TensorRole::activation;
  int param = -1;  // a member's slice: index into Schedule::params
  int bucket = -1; // a bucket's flat shard (param_shard, grad, optimizer_state): its index
  // Which optimizer state an optimizer_state tensor holds (what a checkpoint stores it as).
  enum class Slot { none, first_moment, second_moment, master_weights } slot = Slot::none;
  RuntimeRows rows; // routing-dependent rows (MoE); counts < 0 for a static shape
};

// A tensor the simulator counts but no executor binds (no shape): bytes and where they live.
inline Tensor cost_tensor(std::string name, double bytes, Device device, MemoryKind kind,
                          bool resident) {
  Tensor t;
  t.name = std::move(name);
  t.bytes = bytes;
  t.device = device;
  t.kind = kind;
  t.resident = resident;
  return t;
}

// A communicator: which ranks form it (`spec`, over Schedule::mesh; an executor derives each
// rank's members from it) and how they sit on the topology (the simulator's cost).
struct Group {
  std::string name; // "tp", "cp", "ep", "fsdp.attention", "pp.0-1"
  int ranks = 1;
  int ranks_per_node = 1; // ranks of the group that share a node
  GroupSpec spec;         // empty view: point-to-point between stages (pipeline)
  // Its collectives stay on NVLink (every member in one node), else they cross the NIC.
  bool inside_node() const { return ranks_per_node == ranks; }
};

struct RankClass {
  std::string name; // "stage 0 of 4"
  int multiplicity = 1;
  int stage = 0;
  std::vector<std::string> streams; // "compute", "comm.tp", "comm.dp", "copy.h2d", "host", ...
  std::vector<Tensor> tensors;
  std::vector<Op> ops;      // program order: on one stream, ops run in this order
  std::vector<Attrs> attrs; // the executable attributes ops refer to (Op::attrs)

  // An op's attributes (the defaults when it has none).
  const Attrs& attrs_of(const Op& op) const;
  // Gives op its own attributes (a copy of the defaults when it had none) to set.
  Attrs& set_attrs(Op& op);
};

// The pieces of a class's program: stretches of consecutive ops of one decoder layer (with the
// ops of no layer that follow them), numbered in program order; piece 0 holds the ops before
// any layer's. Each piece's layer (-1 for piece 0) and pass: which of its layer's stretches it
// is (its forward, its backward, once per micro-batch). The memory tracker's per-layer peaks
// and planner/fold.hpp's settling check read them.
struct ProgramPieces {
  std::vector<int> of_op; // parallel to RankClass::ops
  std::vector<int> layer, pass;
};
ProgramPieces program_pieces(const RankClass& rc);

struct Schedule {
  std::vector<RankClass> classes;
  std::vector<Group> groups;
  Mesh mesh; // the ranks' layout, which every group's spec refers to
  int world = 1;
  int gpus_per_node = 8;
  std::vector<ParamSpec> params; // the executable layer's parameters
  std::vector<Bucket> buckets;
  TokenLayout tokens;              // the executable layer's token layout
  double tokens_per_step = 0;      // tokens the whole world trains on per optimizer step
  double model_flops_per_step = 0; // whole world, the model-FLOPs convention (README)
  // The framework's CPU time to issue one kernel (docs/ENGINE.md "Host issue"): each rank's host
  // issues its class's ops in program order, Op::kernels each, and an op cannot start before it
  // is issued; Op::host_sync ops stall the host until they end. 0: the host is not modelled
  // (every op issued at once, host_sync ignored).
  double host_issue_s = 0;
};

// Structural checks, each a one-sentence std::invalid_argument naming the class and op:
// indices in range; dependencies acyclic within and across classes (Boost.Graph); every
// non-resident tensor allocated once and freed once, after its allocation; every collective's
// group exists, matches its mesh spec (size, ranks per node), and every recv has a matching
// send in its peer class; the executable layer's operands, parameters and buckets are in range
// and its shapes are sizes.
void check_schedule(const Schedule& s);

} // namespace mop::sim
