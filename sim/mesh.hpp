#pragma once
// The device mesh: the world's ranks as a grid of named dimensions, in several views of the same
// ranks. A view lists its dimensions innermost first (rank = Σ coordinate_d · stride_d, the
// first dimension has stride 1); every view spans the whole world. A plan uses one view per
// layer kind over the same ranks (Megatron-Core's "parallel folding"): attention as
// (tp, cp.ulysses, cp.ring, dp, pp), experts as (etp, ep, edp, pp), dense MLPs and embeddings as
// (tp, dp, pp). Every communicator is a set of dimensions of one view, optionally cut into
// blocks of consecutive members (HSDP's shard groups) or taken across those blocks (its
// replica groups), so the simulator (sizes, ranks per node) and every executor (the members of
// each rank's group) derive groups from one description. Standard library only: part of the IR.
#include <string>
#include <string_view>
#include <vector>

namespace mop::sim {

struct MeshDim {
  std::string name;
  int size = 1;
};

// Which ranks form one communicator: the dimensions it spans in a view, and optionally a cut
// of that group into blocks of `block` consecutive members, or only its two ends.
struct GroupSpec {
  std::string view;              // "attention", "moe", "dense", "embed"
  std::vector<std::string> dims; // dimensions of the view the group spans
  int block = 0;                 // > 0: cut the group into blocks of this many members
  bool across_blocks = false;    // with block: the members at my position in every block
  // Only the first and the last member of the group (one member when the group has one): the
  // pipeline's first and last stages, which hold the two copies of tied embeddings (Megatron's
  // embedding group), as {"embed", {"pp"}} with ends_only. A rank between the ends belongs to
  // no such group. Not combined with block.
  bool ends_only = false;
  bool operator==(const GroupSpec&) const = default;
};

class MeshView {
public:
  MeshView() = default;
  // Throws std::invalid_argument for a size below 1, a repeated or empty name, or a product
  // past 2^31 - 1.
  MeshView(std::string name, std::vector<MeshDim> dims);

  const std::string& name() const { return name_; }
  const std::vector<MeshDim>& dims() const { return dims_; }
  int size() const { return size_; }
  int extent(std::string_view dim) const;          // 1 for a dimension the view does not have
  int stride(std::string_view dim) const;          // the view's size for an absent dimension
  int coord(int rank, std::string_view dim) const; // 0 for an absent dimension

  // The ranks of the group over `dims` (a block of it, or across blocks, as `spec` says) that
  // contains `rank`, in increasing rank order; a rank's position there is its group rank.
  std::vector<int> members(int rank, const GroupSpec& spec) const;
  // Members of one group (all groups of a spec have the same count).
  int group_size(const GroupSpec& spec) const;
  // Members of the group of rank 0 that share its node of `gpus_per_node` consecutive ranks,
  // lowered to a divisor of the group size (the cost model's groups span whole nodes evenly).
  int ranks_per_node(const GroupSpec& spec, int gpus_per_node) const;

private:
  std::string name_;
  std::vector<MeshDim> dims_;
  std::vector<int> strides_;
  int size_ = 1;
  int index_of(std::string_view dim) const; // -1 when absent
  // The group over `dims` containing `rank`, in increasing rank order.
  std::vector<int> full_group(int rank, const std::vector<std::string>& dims) const;
};

struct Mesh {
  int gpus_per_node = 8;
  std::vector<MeshView> views;
  // Throws std::invalid_argument when there is no such view.
  const MeshView& view(std::string_view name) const;
};

} // namespace mop::sim
