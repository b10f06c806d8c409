#pragma once
// Host-side measurements for `mop calibrate` that need no GPU: the AdamW update rate of the CPU
// optimizer kernel (real::adamw, the one the executors run for host optimizer steps) and the
// host's memory bandwidth, each on a given number of threads over arrays far larger than the
// caches. Each is the median of `reps` timed passes after one untimed pass.
#include <cstddef>

namespace mop::real {

// Parameters updated per second by `threads` threads, each updating its own slice of `params`
// float parameters (fp32 parameter, gradient and both moments: 28 bytes of traffic each).
double measure_host_adam_params_per_s(std::size_t params, int threads, int reps);

// Bytes read plus written per second by `threads` threads copying slices of a `bytes`-byte
// array into another (STREAM's "copy").
double measure_host_copy_bytes_per_s(std::size_t bytes, int threads, int reps);

} // namespace mop::real
