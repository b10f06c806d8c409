#include "strategies/mesh.hpp"

#include <algorithm>
#include <numeric>

namespace mop::strategy {

CpSplit cp_split(const Plan& p, int gpus_per_node) {
  const AttentionMapping& a = p.attention;
  if (a.cp <= 1)
    return {};
  switch (a.cp_kind) {
  case CpKind::ring:
    return {1, a.cp};
  case CpKind::ulysses:
    return {a.cp, 1};
  case CpKind::hybrid:
    break;
  }
  const int ulysses = std::gcd(a.cp, std::max(1, gpus_per_node / a.tp));
  return {ulysses, a.cp / ulysses};
}

sim::Mesh plan_mesh(const Plan& p, int gpus_per_node) {
  const CpSplit cp = cp_split(p, gpus_per_node);
  sim::Mesh m;
  m.gpus_per_node = gpus_per_node;
  m.views.emplace_back("attention", std::vector<sim::MeshDim>{{"tp", p.attention.tp},
                                                              {"cp.ulysses", cp.ulysses},
                                                              {"cp.ring", cp.ring},
                                                              {"dp", p.attention.dp},
                                                              {"pp", p.pp}});
  m.views.emplace_back("moe",
                       std::vector<sim::MeshDim>{
                           {"etp", p.moe.etp}, {"ep", p.moe.ep}, {"edp", p.moe.edp}, {"pp", p.pp}});
  m.views.emplace_back(
      "dense", std::vector<sim::MeshDim>{{"tp", p.dense.tp}, {"dp", p.dense.dp}, {"pp", p.pp}});
  m.views.emplace_back(
      "embed", std::vector<sim::MeshDim>{{"tp", p.embed.tp}, {"dp", p.embed.dp}, {"pp", p.pp}});
  return m;
}

sim::GroupSpec tp_group() {
  return {"attention", {"tp"}};
}
sim::GroupSpec cp_ulysses_group() {
  return {"attention", {"cp.ulysses"}};
}
sim::GroupSpec cp_ring_group() {
  return {"attention", {"cp.ring"}};
}
sim::GroupSpec ep_group() {
  return {"moe", {"ep"}};
}
sim::GroupSpec etp_group() {
  return {"moe", {"etp"}};
}
sim::GroupSpec dense_tp_group() {
  return {"dense", {"tp"}};
}
sim::GroupSpec embed_tp_group() {
  return {"embed", {"tp"}};
}
sim::GroupSpec stage_group() {
  return {"attention", {"tp", "cp.ulysses", "cp.ring", "dp"}};
}

sim::GroupSpec data_parallel_group(LayerKind kind) {
  switch (kind) {
  case LayerKind::attention:
    return {"attention", {"cp.ulysses", "cp.ring", "dp"}};
  case LayerKind::moe:
    return {"moe", {"edp"}};
  case LayerKind::dense:
    return {"dense", {"dp"}};
  case LayerKind::embedding:
    return {"embed", {"dp"}};
  }
  return {};
}

int data_parallel_ranks(const Plan& p, LayerKind kind) {
  switch (kind) {
  case LayerKind::attention:
    return p.attention.cp * p.attention.dp;
  case LayerKind::moe:
    return p.moe.edp;
  case LayerKind::dense:
    return p.dense.dp;
  case LayerKind::embedding:
    return p.embed.dp;
  }
  return 1;
}

sim::GroupSpec shard_group(const Plan& p, LayerKind kind) {
  sim::GroupSpec g = data_parallel_group(kind);
  const int d = data_parallel_ranks(p, kind);
  const int sg = p.state[static_cast<int>(kind)].shard_group;
  if (sg > 0 && sg < d && d % sg == 0)
    g.block = sg;
  return g;
}

sim::GroupSpec replica_group(const Plan& p, LayerKind kind) {
  sim::GroupSpec g = shard_group(p, kind);
  if (g.block == 0)
    return {g.view, {}};
  g.across_blocks = true;
  return g;
}

} // namespace mop::strategy
