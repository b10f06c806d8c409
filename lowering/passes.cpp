#include "lowering/passes.hpp"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace mop::lowering {

double tensor_bytes(const sim::Tensor& t) {
  double n = 1;
  for (std::int64_t d : t.shape)
    n *= static_cast<double>(d);
  switch (t.element) {
  case sim::Element::i32:
    return 4 * n;
  case sim::Element::i64:
    return 8 * n;
  case sim::Element::real:
    break;
  }
  switch (t.dtype) {
  case sim::Dtype::bf16:
    return 2 * n;
  case sim::Dtype::fp8:
    return n;
  case sim::Dtype::fp32:
    return 4 * n;
  }
  return 2 * n;
}

void derive_dependencies(sim::RankClass& rc) {
  const std::size_t n = rc.tensors.size();
  std::vector<int> last_writer(n, -1);
  // The readers of each tensor since its last write, as linked lists in one array (a list per
  // tensor would be an allocation per tensor): reader_head[t] is the latest reader's node.
  struct Reader {
    int op, next;
  };
  std::vector<int> reader_head(n, -1);
  std::vector<Reader> readers;
  std::vector<int> deps; // one op's, gathered, then sorted and stored once
  for (std::size_t i = 0; i < rc.ops.size(); ++i) {
    sim::Op& op = rc.ops[i];
    const int me = static_cast<int>(i);
    deps.assign(op.deps.begin(), op.deps.end());
    auto wait = [&](int other) {
      if (other >= 0 && other != me)
        deps.push_back(other);
    };
    for (int t : op.inputs)
      wait(last_writer[static_cast<std::size_t>(t)]);
    for (int t : op.outputs) {
      wait(last_writer[static_cast<std::size_t>(t)]);
      for (int r = reader_head[static_cast<std::size_t>(t)]; r >= 0;
           r = readers[static_cast<std::size_t>(r)].next)
        wait(readers[static_cast<std::size_t>(r)].op);
    }
    std::sort(deps.begin(), deps.end());
    deps.erase(std::unique(deps.begin(), deps.end()), deps.end());
    op.deps.assign(deps.begin(), deps.end());
    for (int t : op.inputs) {
      int& head = reader_head[static_cast<std::size_t>(t)];
      readers.push_back({me, head});
      head = static_cast<int>(readers.size()) - 1;
    }
    for (int t : op.outputs) {
      last_writer[static_cast<std::size_t>(t)] = me;
      reader_head[static_cast<std::size_t>(t)] = -1;
    }
  }
}

void derive_liveness(sim::RankClass& rc) {
  const std::size_t n = rc.tensors.size();
  std::vector<int> first(n, -1), last(n, -1);
  for (std::size_t i = 0; i < rc.ops.size(); ++i) {
    sim::Op& op = rc.ops[i];
    op.allocs.clear();
    op.frees.clear();
    auto touch = [&](int t) {
      const auto k = static_cast<std::size_t>(t);
      if (first[k] < 0)
        first[k] = static_cast<int>(i);
      last[k] = static_cast<int>(i);
    };
    for (int t : op.inputs)
      touch(t);
    for (int t : op.outputs)
      touch(t);
  }
  for (std::size_t t = 0; t < n; ++t) {
    if (rc.tensors[t].resident)
      continue;
    if (first[t] < 0)
      throw std::logic_error("tensor '" + rc.tensors[t].name + "' of " + rc.name +
                             " is made but no op uses it");
    rc.ops[static_cast<std::size_t>(first[t])].allocs.push_back(static_cast<int>(t));
    rc.ops[static_cast<std::size_t>(last[t])].frees.push_back(static_cast<int>(t));
  }
}

} // namespace mop::lowering
