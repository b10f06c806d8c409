#include "sim/mesh.hpp"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>

namespace mop::sim {

MeshView::MeshView(std::string name, std::vector<MeshDim> dims)
    : name_(std::move(name)), dims_(std::move(dims)) {
  std::int64_t size = 1;
  for (std::size_t i = 0; i < dims_.size(); ++i) {
    const MeshDim& d = dims_[i];
    if (d.name.empty())
      throw std::invalid_argument("mesh view '" + name_ + "' has a dimension without a name");
    if (d.size < 1)
      throw std::invalid_argument("mesh dimension '" + d.name + "' of view '" + name_ +
                                  "' has size " + std::to_string(d.size) + "; it needs at least 1");
    for (std::size_t j = 0; j < i; ++j)
      if (dims_[j].name == d.name)
        throw std::invalid_argument("mesh view '" + name_ + "' names dimension '" + d.name +
                                    "' twice");
    strides_.push_back(static_cast<int>(size));
    size *= d.size;
    if (size > std::numeric_limits<int>::max())
      throw std::invalid_argument("mesh view '" + name_ + "' has more than 2^31 - 1 ranks");
  }
  size_ = static_cast<int>(size);
}

int MeshView::index_of(std::string_view dim) const {
  for (std::size_t i = 0; i < dims_.size(); ++i)
    if (dims_[i].name == dim)
      return static_cast<int>(i);
  return -1;
}

int MeshView::extent(std::string_view dim) const {
  const int i = index_of(dim);
  return i < 0 ? 1 : dims_[static_cast<std::size_t>(i)].size;
}

int MeshView::stride(std::string_view dim) const {
  const int i = index_of(dim);
  return i < 0 ? size_ : strides_[static_cast<std::size_t>(i)];
}

int MeshView::coord(int rank, std::string_view dim) const {
  const int i = index_of(dim);
  if (i < 0)
    return 0;
  return rank / strides_[static_cast<std::size_t>(i)] % dims_[static_cast<std::size_t>(i)].size;
}

std::vector<int> MeshView::full_group(int rank, const std::vector<std::string>& dims) const {
  if (rank < 0 || rank >= size_)
    throw std::invalid_argument("rank " + std::to_string(rank) + " is outside mesh view '" + name_ +
                                "' of " + std::to_string(size_) + " ranks");
  std::vector<int> index;
  for (const std::string& d : dims) {
    const int i = index_of(d);
    if (i < 0)
      throw std::invalid_argument("mesh view '" + name_ + "' has no dimension '" + d + "'");
    if (std::find(index.begin(), index.end(), i) != index.end())
      throw std::invalid_argument("a group names dimension '" + d + "' twice");
    index.push_back(i);
  }
  // The group's base: `rank` with every spanned coordinate set to 0.
  int base = rank;
  for (int i : index)
    base -= coord(rank, dims_[static_cast<std::size_t>(i)].name) *
            strides_[static_cast<std::size_t>(i)];
  std::vector<int> out{base};
  for (int i : index) {
    const int n = dims_[static_cast<std::size_t>(i)].size;
    const int s = strides_[static_cast<std::size_t>(i)];
    const std::size_t before = out.size();
    for (int c = 1; c < n; ++c)
      for (std::size_t j = 0; j < before; ++j)
        out.push_back(out[j] + c * s);
  }
  std::sort(out.begin(), out.end());
  return out;
}

int MeshView::group_size(const GroupSpec& spec) const {
  std::int64_t n = 1;
  for (const std::string& d : spec.dims) {
    if (index_of(d) < 0)
      throw std::invalid_argument("mesh view '" + name_ + "' has no dimension '" + d + "'");
    n *= extent(d);
  }
  if (spec.ends_only)
    return n > 1 ? 2 : 1;
  if (spec.block <= 0)
    return static_cast<int>(n);
  if (n % spec.block != 0)
    throw std::invalid_argument("a block of " + std::to_string(spec.block) +
                                " does not divide a group of " + std::to_string(n) + " ranks");
  return spec.across_blocks ? static_cast<int>(n / spec.block) : spec.block;
}

std::vector<int> MeshView::members(int rank, const GroupSpec& spec) const {
  const std::vector<int> all = full_group(rank, spec.dims);
  if (spec.ends_only)
    return all.size() > 1 ? std::vector<int>{all.front(), all.back()} : all;
  if (spec.block <= 0)
    return all;
  group_size(spec); // checks the block divides the group
  const auto at = static_cast<int>(std::find(all.begin(), all.end(), rank) - all.begin());
  const int block = spec.block;
  std::vector<int> out;
  if (spec.across_blocks) {
    for (int i = at % block; i < static_cast<int>(all.size()); i += block)
      out.push_back(all[static_cast<std::size_t>(i)]);
  } else {
    const int first = at / block * block;
    out.assign(all.begin() + first, all.begin() + first + block);
  }
  return out;
}

int MeshView::ranks_per_node(const GroupSpec& spec, int gpus_per_node) const {
  const int size = group_size(spec);
  if (gpus_per_node < 1)
    throw std::invalid_argument("a node needs at least one GPU");
  if (spec.ends_only) { // rank 0's pair: rank 0 and its group's last member
    const std::vector<int> ends = members(0, spec);
    return ends.back() < gpus_per_node ? size : 1;
  }
  // Rank 0's group, enumerated only below the first node's end: members grow with every
  // coordinate, so a partial sum past the node prunes the rest of its subtree.
  std::vector<std::pair<int, int>> dims; // (stride, extent), by increasing stride
  for (const std::string& d : spec.dims)
    dims.emplace_back(stride(d), extent(d));
  std::sort(dims.begin(), dims.end());
  std::vector<int> on_node{0};
  for (auto [s, n] : dims) {
    const std::size_t before = on_node.size();
    for (int c = 1; c < n && static_cast<std::int64_t>(c) * s < gpus_per_node; ++c)
      for (std::size_t j = 0; j < before; ++j)
        if (on_node[j] + c * s < gpus_per_node)
          on_node.push_back(on_node[j] + c * s);
  }
  std::sort(on_node.begin(), on_node.end());
  int count = static_cast<int>(on_node.size());
  if (spec.block > 0) { // rank 0's block holds the first `block` members of the group
    if (spec.across_blocks) {
      // Rank 0's replica set: every block's first member; member i of the group is at index
      // i, so those on the node are the on-node members whose group index is a multiple of
      // the block. The on-node members are the group's first `count` members.
      count = (count + spec.block - 1) / spec.block;
    } else {
      count = std::min(count, spec.block);
    }
  }
  count = std::clamp(count, 1, size);
  while (size % count != 0)
    --count;
  return count;
}

const MeshView& Mesh::view(std::string_view name) const {
  for (const MeshView& v : views)
    if (v.name() == name)
      return v;
  throw std::invalid_argument("the mesh has no view '" + std::string(name) + "'");
}

} // namespace mop::sim
