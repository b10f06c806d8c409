#include "sim/schedule.hpp"

#include <boost/graph/compressed_sparse_row_graph.hpp>
#include <boost/graph/depth_first_search.hpp>
#include <boost/graph/topological_sort.hpp>

#include <cctype>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

namespace mop::sim {

const char* attention_kernel_name(AttentionKernel k) {
  switch (k) {
  case AttentionKernel::flash:
    return "flash";
  case AttentionKernel::flash2:
    return "flash2";
  case AttentionKernel::cudnn:
    return "cudnn";
  }
  return "flash";
}

std::optional<AttentionKernel> parse_attention_kernel(std::string_view name) {
  for (AttentionKernel k : {AttentionKernel::flash, AttentionKernel::flash2, AttentionKernel::cudnn})
    if (name == attention_kernel_name(k))
      return k;
  return std::nullopt;
}


ProgramPieces program_pieces(const RankClass& rc) {
  ProgramPieces p;
  p.of_op.resize(rc.ops.size());
  p.layer.push_back(-1);
  p.pass.push_back(0);
  std::vector<int> passes; // of each layer so far
  int layer = -1;
  for (std::size_t i = 0; i < rc.ops.size(); ++i) {
    const int l = rc.ops[i].layer;
    if (l >= 0 && l != layer) {
      layer = l;
      if (static_cast<std::size_t>(l) >= passes.size())
        passes.resize(static_cast<std::size_t>(l) + 1, 0);
      p.layer.push_back(l);
      p.pass.push_back(passes[static_cast<std::size_t>(l)]++);
    }
    p.of_op[i] = static_cast<int>(p.layer.size()) - 1;
  }
  return p;
}

const Attrs& RankClass::attrs_of(const Op& op) const {
  static const Attrs defaults;
  return op.attrs < 0 ? defaults : attrs[static_cast<std::size_t>(op.attrs)];
}

Attrs& RankClass::set_attrs(Op& op) {
  if (op.attrs < 0) {
    op.attrs = static_cast<int>(attrs.size());
    attrs.emplace_back();
  }
  return attrs[static_cast<std::size_t>(op.attrs)];
}

const char* kernel_name(Kernel k) {
  switch (k) {
  case Kernel::none:
    return "none";
  case Kernel::tokens:
    return "tokens";
  case Kernel::embedding_fwd:
    return "embedding_fwd";
  case Kernel::embedding_bwd:
    return "embedding_bwd";
  case Kernel::matmul:
    return "matmul";
  case Kernel::rmsnorm_fwd:
    return "rmsnorm_fwd";
  case Kernel::rmsnorm_bwd:
    return "rmsnorm_bwd";
  case Kernel::rope:
    return "rope";
  case Kernel::swiglu_fwd:
    return "swiglu_fwd";
  case Kernel::swiglu_bwd:
    return "swiglu_bwd";
  case Kernel::add:
    return "add";
  case Kernel::attention_fwd:
    return "attention_fwd";
  case Kernel::attention_bwd:
    return "attention_bwd";
  case Kernel::cross_entropy:
    return "cross_entropy";
  case Kernel::ce_max:
    return "ce_max";
  case Kernel::ce_sums:
    return "ce_sums";
  case Kernel::ce_finish:
    return "ce_finish";
  case Kernel::transpose:
    return "transpose";
  case Kernel::adamw:
    return "adamw";
  case Kernel::copy:
    return "copy";
  case Kernel::zero:
    return "zero";
  case Kernel::collective:
    return "collective";
  case Kernel::router_topk_fwd:
    return "router_topk_fwd";
  case Kernel::router_topk_bwd:
    return "router_topk_bwd";
  case Kernel::permute:
    return "permute";
  case Kernel::permute_bwd:
    return "permute_bwd";
  case Kernel::unpermute:
    return "unpermute";
  case Kernel::unpermute_bwd:
    return "unpermute_bwd";
  case Kernel::grouped_matmul:
    return "grouped_matmul";
  case Kernel::llep_plan:
    return "llep_plan";
  case Kernel::index_rows:
    return "index_rows";
  case Kernel::group_copies:
    return "group_copies";
  case Kernel::group_copies_bwd:
    return "group_copies_bwd";
  }
  return "?";
}

const char* tensor_role_name(TensorRole r) {
  switch (r) {
  case TensorRole::activation:
    return "activation";
  case TensorRole::saved:
    return "saved";
  case TensorRole::param:
    return "param";
  case TensorRole::param_shard:
    return "param_shard";
  case TensorRole::grad:
    return "grad";
  case TensorRole::optimizer_state:
    return "optimizer_state";
  case TensorRole::comm_buffer:
    return "comm_buffer";
  case TensorRole::host_copy:
    return "host_copy";
  case TensorRole::index:
    return "index";
  case TensorRole::loss:
    return "loss";
  }
  return "?";
}

const char* op_kind_name(OpKind k) {
  switch (k) {
  case OpKind::gemm:
    return "gemm";
  case OpKind::grouped_gemm:
    return "grouped_gemm";
  case OpKind::attention_fwd:
    return "attention_fwd";
  case OpKind::attention_bwd:
    return "attention_bwd";
  case OpKind::elementwise:
    return "elementwise";
  case OpKind::all_gather:
    return "all_gather";
  case OpKind::reduce_scatter:
    return "reduce_scatter";
  case OpKind::all_reduce:
    return "all_reduce";
  case OpKind::all_to_all:
    return "all_to_all";
  case OpKind::send_recv:
    return "send_recv";
  case OpKind::send:
    return "send";
  case OpKind::recv:
    return "recv";
  case OpKind::copy_h2d:
    return "copy_h2d";
  case OpKind::copy_d2h:
    return "copy_d2h";
  case OpKind::host_adam:
    return "host_adam";
  case OpKind::barrier:
    return "barrier";
  }
  return "?";
}

bool is_collective(OpKind k) {
  return k == OpKind::all_gather || k == OpKind::reduce_scatter || k == OpKind::all_reduce ||
         k == OpKind::all_to_all || k == OpKind::send_recv || k == OpKind::send ||
         k == OpKind::recv;
}

bool is_copy(OpKind k) {
  return k == OpKind::copy_h2d || k == OpKind::copy_d2h;
}

const char* category_name(Category c) {
  switch (c) {
  case Category::forward:
    return "forward";
  case Category::backward:
    return "backward";
  case Category::recompute:
    return "recompute";
  case Category::tp_comm:
    return "tp_comm";
  case Category::cp_comm:
    return "cp_comm";
  case Category::ep_comm:
    return "ep_comm";
  case Category::dp_comm:
    return "dp_comm";
  case Category::pp_comm:
    return "pp_comm";
  case Category::offload:
    return "offload";
  case Category::optimizer:
    return "optimizer";
  }
  return "?";
}

const char* memory_kind_name(MemoryKind k) {
  switch (k) {
  case MemoryKind::weights:
    return "weights";
  case MemoryKind::grads:
    return "grads";
  case MemoryKind::optimizer:
    return "optimizer";
  case MemoryKind::activations:
    return "activations";
  case MemoryKind::comm_buffers:
    return "comm_buffers";
  case MemoryKind::other:
    return "other";
  }
  return "?";
}

} // namespace mop::sim

namespace mop::sim {
namespace {

std::string quoted(const std::string& name) {
  return "'" + name + "'";
}

// "rank class 'stage 0' (0), op 3 'L0.attn.fwd'": how every sentence names an op.
std::string where(const Schedule& s, int c, int i) {
  const RankClass& rc = s.classes[static_cast<std::size_t>(c)];
  return "rank class " + quoted(rc.name) + " (" + std::to_string(c) + "), op " + std::to_string(i) +
         " " + quoted(rc.ops[static_cast<std::size_t>(i)].name);
}

[[noreturn]] void fail(const std::string& sentence) {
  std::string text = sentence;
  if (!text.empty())
    text[0] = static_cast<char>(std::toupper(static_cast<unsigned char>(text[0])));
  throw std::invalid_argument(text + ".");
}

bool in_range(int index, std::size_t size) {
  return index >= 0 && static_cast<std::size_t>(index) < size;
}

void check_groups(const Schedule& s) {
  for (const MeshView& v : s.mesh.views)
    if (v.size() != s.world)
      fail("mesh view " + quoted(v.name()) + " spans " + std::to_string(v.size()) +
           " ranks, not the world's " + std::to_string(s.world));
  for (std::size_t g = 0; g < s.groups.size(); ++g) {
    const Group& group = s.groups[g];
    const std::string name = "group " + quoted(group.name) + " (" + std::to_string(g) + ")";
    if (group.ranks < 1)
      fail(name + " has " + std::to_string(group.ranks) + " ranks; it needs at least one");
    if (group.ranks_per_node < 1 || group.ranks_per_node > group.ranks ||
        group.ranks % group.ranks_per_node != 0)
      fail(name + " has " + std::to_string(group.ranks_per_node) +
           " ranks per node, which must be between 1 and its " + std::to_string(group.ranks) +
           " ranks and divide them");
    if (group.spec.view.empty())
      continue;
    int size = 0, per_node = 0;
    try {
      const MeshView& v = s.mesh.view(group.spec.view);
      size = v.group_size(group.spec);
      per_node = v.ranks_per_node(group.spec, s.mesh.gpus_per_node);
    } catch (const std::invalid_argument& e) {
      fail(name + ": " + e.what());
    }
    if (size != group.ranks || per_node != group.ranks_per_node)
      fail(name + " has " + std::to_string(group.ranks) + " ranks, " +
           std::to_string(group.ranks_per_node) + " per node, but its mesh spec gives " +
           std::to_string(size) + " ranks, " + std::to_string(per_node) + " per node");
  }
}

void check_indices(const Schedule& s) {
  const std::size_t classes = s.classes.size();
  for (std::size_t c = 0; c < classes; ++c) {
    const RankClass& rc = s.classes[c];
    const int ci = static_cast<int>(c);
    for (std::size_t i = 0; i < rc.ops.size(); ++i) {
      const Op& op = rc.ops[i];
      const auto at = [&] { return where(s, ci, static_cast<int>(i)); };
      if (!in_range(op.stream, rc.streams.size()))
        fail(at() + " runs on stream " + std::to_string(op.stream) + ", but the class has " +
             std::to_string(rc.streams.size()) + " streams");
      for (int d : op.deps)
        if (!in_range(d, rc.ops.size()))
          fail(at() + " depends on op " + std::to_string(d) + ", but the class has " +
               std::to_string(rc.ops.size()) + " ops");
      for (const RemoteDep& r : op.remote_deps) {
        if (!in_range(r.rank_class, classes) || r.rank_class == ci)
          fail(at() + " has a remote dependency on rank class " + std::to_string(r.rank_class) +
               ", which must be another of the schedule's " + std::to_string(classes) + " classes");
        const std::size_t other_ops = s.classes[static_cast<std::size_t>(r.rank_class)].ops.size();
        if (!in_range(r.op, other_ops))
          fail(at() + " has a remote dependency on op " + std::to_string(r.op) + " of rank class " +
               std::to_string(r.rank_class) + ", which has " + std::to_string(other_ops) + " ops");
      }
      for (int t : op.allocs)
        if (!in_range(t, rc.tensors.size()))
          fail(at() + " allocates tensor " + std::to_string(t) + ", but the class has " +
               std::to_string(rc.tensors.size()) + " tensors");
      for (int t : op.frees)
        if (!in_range(t, rc.tensors.size()))
          fail(at() + " frees tensor " + std::to_string(t) + ", but the class has " +
               std::to_string(rc.tensors.size()) + " tensors");
      // A recv takes no time of its own, so it may leave its group unset; every other
      // collective is priced over its group.
      const bool needs_group = is_collective(op.kind) && op.kind != OpKind::recv;
      if ((needs_group || op.group != -1) && !in_range(op.group, s.groups.size()))
        fail(at() + " (" + op_kind_name(op.kind) + ") names group " + std::to_string(op.group) +
             ", but the schedule has " + std::to_string(s.groups.size()) + " groups");
      if ((op.kind == OpKind::send || op.kind == OpKind::recv) &&
          (!in_range(op.peer_class, classes) || op.peer_class == ci))
        fail(at() + " (" + op_kind_name(op.kind) + ") names peer class " +
             std::to_string(op.peer_class) + ", which must be another of the schedule's " +
             std::to_string(classes) + " classes");
    }
  }
}

void check_tensors(const Schedule& s) {
  for (std::size_t c = 0; c < s.classes.size(); ++c) {
    const RankClass& rc = s.classes[c];
    const int ci = static_cast<int>(c);
    const std::size_t n = rc.tensors.size();
    std::vector<int> alloc_op(n, -1), free_op(n, -1);
    for (std::size_t i = 0; i < rc.ops.size(); ++i) {
      const int oi = static_cast<int>(i);
      for (int t : rc.ops[i].allocs) {
        const Tensor& tensor = rc.tensors[static_cast<std::size_t>(t)];
        if (tensor.resident)
          fail(where(s, ci, oi) + " allocates resident tensor " + quoted(tensor.name) +
               ", which lives for the whole step");
        int& first = alloc_op[static_cast<std::size_t>(t)];
        if (first != -1)
          fail(where(s, ci, oi) + " allocates tensor " + quoted(tensor.name) + " again (op " +
               std::to_string(first) + " already allocated it)");
        first = oi;
      }
      for (int t : rc.ops[i].frees) {
        const Tensor& tensor = rc.tensors[static_cast<std::size_t>(t)];
        if (tensor.resident)
          fail(where(s, ci, oi) + " frees resident tensor " + quoted(tensor.name) +
               ", which lives for the whole step");
        int& first = free_op[static_cast<std::size_t>(t)];
        if (first != -1)
          fail(where(s, ci, oi) + " frees tensor " + quoted(tensor.name) + " again (op " +
               std::to_string(first) + " already freed it)");
        first = oi;
      }
    }
    for (std::size_t t = 0; t < n; ++t) {
      const Tensor& tensor = rc.tensors[t];
      const int counts = tensor.rows.counts;
      if (counts != -1) {
        // Runtime rows: sized from a count table written no later than the tensor is made.
        if (!in_range(counts, n) ||
            rc.tensors[static_cast<std::size_t>(counts)].element != Element::i64 ||
            tensor.shape.empty() || tensor.resident)
          fail("rank class " + quoted(rc.name) + " (" + std::to_string(c) + "), tensor " +
               quoted(tensor.name) +
               " has runtime rows, which need a shape, no residency and an i64 count table");
        if (alloc_op[static_cast<std::size_t>(counts)] >= alloc_op[t])
          fail("rank class " + quoted(rc.name) + " (" + std::to_string(c) + "), tensor " +
               quoted(tensor.name) + " is made before the count table that sizes it");
      }
      if (tensor.resident)
        continue;
      const int a = alloc_op[t], f = free_op[t];
      if (a == -1 && f == -1)
        fail("rank class " + quoted(rc.name) + " (" + std::to_string(c) + "), tensor " +
             quoted(tensor.name) + " is neither resident nor allocated and freed by any op");
      if (a == -1)
        fail(where(s, ci, f) + " frees tensor " + quoted(tensor.name) + ", which no op allocates");
      if (f == -1)
        fail(where(s, ci, a) + " allocates tensor " + quoted(tensor.name) + ", which no op frees");
      // The freeing op must be able to end after the allocating op starts; in program order it
      // comes no earlier (the same op may allocate a workspace and free it).
      if (f < a)
        fail(where(s, ci, f) + " frees tensor " + quoted(tensor.name) + " before op " +
             std::to_string(a) + " allocates it in program order");
    }
  }
}

void check_recvs(const Schedule& s) {
  for (std::size_t c = 0; c < s.classes.size(); ++c) {
    const RankClass& rc = s.classes[c];
    for (std::size_t i = 0; i < rc.ops.size(); ++i) {
      const Op& op = rc.ops[i];
      if (op.kind != OpKind::recv)
        continue;
      bool matched = false;
      for (const RemoteDep& r : op.remote_deps) {
        if (r.rank_class != op.peer_class)
          continue;
        const Op& other =
            s.classes[static_cast<std::size_t>(r.rank_class)].ops[static_cast<std::size_t>(r.op)];
        if (other.kind == OpKind::send && other.peer_class == static_cast<int>(c))
          matched = true;
      }
      if (!matched)
        fail(where(s, static_cast<int>(c), static_cast<int>(i)) +
             " is a recv with no remote dependency on a send of its peer class " +
             std::to_string(op.peer_class) + " addressed to this class");
    }
  }
}

// Compressed sparse rows: the edges of a schedule of a million ops in two arrays, not a vector
// per op (building an adjacency list cost as much as lowering the program).
using DependencyGraph = boost::compressed_sparse_row_graph<boost::directedS>;

// Depth-first search stops at the first back edge (u → v): v is an ancestor of u, so both lie
// on a cycle.
struct BackEdgeFound {
  std::size_t from, to;
};
struct BackEdgeVisitor : boost::default_dfs_visitor {
  template <class Edge, class Graph> void back_edge(Edge e, const Graph& g) const {
    throw BackEdgeFound{boost::source(e, g), boost::target(e, g)};
  }
};

void check_acyclic(const Schedule& s) {
  std::vector<std::size_t> offset(s.classes.size() + 1, 0);
  for (std::size_t c = 0; c < s.classes.size(); ++c)
    offset[c + 1] = offset[c] + s.classes[c].ops.size();
  std::vector<std::pair<std::size_t, std::size_t>> edges;
  for (std::size_t c = 0; c < s.classes.size(); ++c) {
    const RankClass& rc = s.classes[c];
    std::vector<int> last_on_stream(rc.streams.size(), -1);
    for (std::size_t i = 0; i < rc.ops.size(); ++i) {
      const Op& op = rc.ops[i];
      const std::size_t v = offset[c] + i;
      int& previous = last_on_stream[static_cast<std::size_t>(op.stream)];
      if (previous != -1)
        edges.emplace_back(offset[c] + static_cast<std::size_t>(previous), v);
      previous = static_cast<int>(i);
      for (int d : op.deps)
        edges.emplace_back(offset[c] + static_cast<std::size_t>(d), v);
      for (const RemoteDep& r : op.remote_deps)
        edges.emplace_back(
            offset[static_cast<std::size_t>(r.rank_class)] + static_cast<std::size_t>(r.op), v);
    }
  }
  const DependencyGraph graph(boost::edges_are_unsorted_multi_pass, edges.begin(), edges.end(),
                              offset.back());
  std::vector<std::size_t> order;
  order.reserve(offset.back());
  try {
    boost::topological_sort(graph, std::back_inserter(order));
    return;
  } catch (const boost::not_a_dag&) {
  }
  auto name_of = [&](std::size_t v) {
    std::size_t c = 0;
    while (offset[c + 1] <= v)
      ++c;
    return where(s, static_cast<int>(c), static_cast<int>(v - offset[c]));
  };
  try {
    boost::depth_first_search(graph, boost::visitor(BackEdgeVisitor{}));
  } catch (const BackEdgeFound& found) {
    fail(name_of(found.to) + " is on a dependency cycle (through deps, remote deps or stream " +
         "order) that closes at " + name_of(found.from));
  }
  fail("the schedule's dependencies form a cycle");
}

} // namespace

// The executable layer: operands, parameters and buckets in range, shapes that are sizes, and
// a matmul's split of its inputs into A and B blocks possible.
void check_executable(const Schedule& s) {
  for (std::size_t b = 0; b < s.buckets.size(); ++b)
    for (int p : s.buckets[b].params)
      if (!in_range(p, s.params.size()))
        fail("bucket " + quoted(s.buckets[b].name) + " names parameter " + std::to_string(p) +
             ", but the schedule has " + std::to_string(s.params.size()) + " parameters");
  for (const ParamSpec& p : s.params)
    if (!in_range(p.bucket, s.buckets.size()))
      fail("parameter " + quoted(p.name) + " is in bucket " + std::to_string(p.bucket) +
           ", but the schedule has " + std::to_string(s.buckets.size()) + " buckets");
  for (std::size_t c = 0; c < s.classes.size(); ++c) {
    const RankClass& rc = s.classes[c];
    for (const Tensor& t : rc.tensors) {
      for (std::int64_t d : t.shape)
        if (d < 0)
          fail("tensor " + quoted(t.name) + " of " + rc.name + " has a negative dimension");
      if (t.param != -1 && !in_range(t.param, s.params.size()))
        fail("tensor " + quoted(t.name) + " of " + rc.name + " names parameter " +
             std::to_string(t.param) + ", but the schedule has " + std::to_string(s.params.size()) +
             " parameters");
      if (t.bucket != -1 && !in_range(t.bucket, s.buckets.size()))
        fail("tensor " + quoted(t.name) + " of " + rc.name + " names bucket " +
             std::to_string(t.bucket) + ", but the schedule has " +
             std::to_string(s.buckets.size()) + " buckets");
    }
    for (std::size_t i = 0; i < rc.ops.size(); ++i) {
      const Op& op = rc.ops[i];
      const auto at = [&] { return where(s, static_cast<int>(c), static_cast<int>(i)); };
      for (const auto* list : {&op.inputs, &op.outputs})
        for (int t : *list)
          if (!in_range(t, rc.tensors.size()))
            fail(at() + " has operand tensor " + std::to_string(t) + ", but the class has " +
                 std::to_string(rc.tensors.size()) + " tensors");
      if (op.attrs != -1 && !in_range(op.attrs, rc.attrs.size()))
        fail(at() + " has attributes " + std::to_string(op.attrs) + ", but the class has " +
             std::to_string(rc.attrs.size()));
      const Attrs& a = rc.attrs_of(op);
      if (op.kernel == Kernel::matmul &&
          (a.a_blocks < 1 || static_cast<std::size_t>(a.a_blocks) >= op.inputs.size() ||
           op.outputs.empty()))
        fail(at() + " is a matmul of " + std::to_string(op.inputs.size()) + " inputs with " +
             std::to_string(a.a_blocks) + " of them A blocks and " +
             std::to_string(op.outputs.size()) + " outputs");
    }
  }
}

void check_schedule(const Schedule& s) {
  check_groups(s);
  check_indices(s);
  check_executable(s);
  check_tensors(s);
  check_recvs(s);
  check_acyclic(s);
}

} // namespace mop::sim
