#pragma once
// The single-rank reference: the whole model's forward and backward on one rank, written as
// plainly as possible (no sharding, no communication, no schedule). Every parallel plan's step
// is checked against it.
#include "real_backend/cpu/tiny_model.hpp"

#include <vector>

namespace mop::real {

// Loss = mean cross-entropy over the batch's labelled tokens (labels >= 0). When grads is not
// null it receives d loss / d parameter for every parameter of the layout (same shapes).
// MoE layers are dropless (every routed token is computed), with no auxiliary loss.
template <class T>
double reference_step(const TinyConfig& c, const std::vector<std::vector<T>>& params,
                      const Batch& batch, std::vector<std::vector<T>>* grads);

} // namespace mop::real
