#include "sim/schedule.hpp"

namespace mop::sim {

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
  }
  return "?";
}

bool is_collective(OpKind k) {
  return k == OpKind::all_gather || k == OpKind::reduce_scatter || k == OpKind::all_reduce ||
         k == OpKind::all_to_all || k == OpKind::send || k == OpKind::recv;
}

bool is_copy(OpKind k) { return k == OpKind::copy_h2d || k == OpKind::copy_d2h; }

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
