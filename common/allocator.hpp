#pragma once
// How the process allocates: a Schedule is hundreds of thousands of small records (ops, tensors,
// their operand lists), built, played and freed once per evaluated plan. glibc's allocator
// returns freed memory to the system early and grows the heap in small steps, so every
// evaluation pays its page faults again (about two thirds of an evaluation of the program
// lowering on Kimi-K2 at 1M: bench/simulate_bench.cpp). Called once at the start of a
// process, this keeps freed memory for the next evaluation and grows the heap in large steps.
// A no-op where the C library is not glibc.

namespace mop {

void keep_freed_memory();

} // namespace mop
