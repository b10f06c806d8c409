#pragma once
// A Plan's device mesh and its communicators (sim/mesh.hpp): the one rank layout the lowering,
// the memory model and every executor use. Inside a stage, ranks are laid out tensor-parallel
// innermost, then context parallel (Ulysses inside ring), then data parallel; stages outermost
// (Megatron-LM's tp-cp-dp-pp order). Experts fold over the same ranks as etp, ep, edp; dense
// MLPs and embeddings as tp, dp.
#include "sim/mesh.hpp"
#include "strategies/plan.hpp"

namespace mop::strategy {

// Context parallelism's two parts: `ulysses` all-to-all ranks inside `ring` ring ranks.
// Ring: (1, cp); Ulysses: (cp, 1); hybrid: Ulysses over the CP ranks that share a node.
struct CpSplit {
  int ulysses = 1;
  int ring = 1;
};
CpSplit cp_split(const Plan& p, int gpus_per_node);

// Views "attention" (tp, cp.ulysses, cp.ring, dp, pp), "moe" (etp, ep, edp, pp), "dense"
// (tp, dp, pp) and "embed" (tp, dp, pp). The plan must be complete (complete_plan).
sim::Mesh plan_mesh(const Plan& p, int gpus_per_node);

// The communicators, each as a GroupSpec of plan_mesh's views.
sim::GroupSpec tp_group();         // attention TP/SP
sim::GroupSpec cp_ulysses_group(); // Ulysses all-to-all
sim::GroupSpec cp_ring_group();    // ring send/recv
sim::GroupSpec ep_group();         // expert dispatch and combine
sim::GroupSpec etp_group();        // expert tensor parallel
sim::GroupSpec dense_tp_group();   // dense MLP TP
sim::GroupSpec embed_tp_group();   // vocabulary-parallel embedding and LM head
sim::GroupSpec stage_group();      // every rank of a pipeline stage
// The ranks that hold the same slice of a layer kind's parameters and sum its gradients
// (the data-parallel ranks of that kind: for attention, CP and DP together).
sim::GroupSpec data_parallel_group(LayerKind kind);
int data_parallel_ranks(const Plan& p, LayerKind kind); // its size (attention: cp · dp)
// ZeRO's shard group of a layer kind: its data-parallel group, or with HSDP (shard_group g
// below it) a block of g consecutive members; `replica_group` is the matching HSDP replica
// group (the same position in every block), empty dims when there is none.
sim::GroupSpec shard_group(const Plan& p, LayerKind kind);
sim::GroupSpec replica_group(const Plan& p, LayerKind kind);

} // namespace mop::strategy
