#pragma once
// Passes over a rank class's program that follow from its operands, so no emission writes
// them by hand.
#include "sim/schedule.hpp"

namespace mop::lowering {

// Data dependencies from the operands, in program order: an op waits for the last writer of
// each tensor it reads (read after write) and, for each tensor it writes, for the last writer
// and every reader since (write after write, write after read). Added to the op's existing
// control dependencies, sorted, without repeats.
void derive_dependencies(sim::RankClass& rc);

// Allocations and frees from liveness: a non-resident tensor is allocated at the start of the
// first op that touches it and freed at the end of the last one. Replaces every op's allocs and
// frees. A non-resident tensor no op touches is an error (std::logic_error): the emission made
// something it never used.
void derive_liveness(sim::RankClass& rc);

// Bytes of a tensor from its shape and element type (dtype bytes for real elements).
double tensor_bytes(const sim::Tensor& t);

} // namespace mop::lowering
