#pragma once
// CUDA twins of the CPU kernels of real_backend/cpu/kernels.hpp (float only), behind a plain C++
// interface: no CUDA header, so CPU code and tests include it. Each function takes host vectors,
// copies them to device 0, runs the kernel, waits for it and copies the results back; the
// semantics are those of the CPU twin of the same name. The per-element arithmetic is that of
// real_backend/kernels/math.hpp, compiled for the device. A CUDA error throws
// std::runtime_error, inputs of inconsistent sizes throw std::invalid_argument.
#include "real_backend/cpu/kernels.hpp" // AdamWParams

#include <cstdint>
#include <vector>

namespace mop::real::cuda {

// SwiGLU: out = silu(gate) * up, elementwise; gate and up have the same size.
std::vector<float> swiglu_fwd(const std::vector<float>& gate, const std::vector<float>& up);
// dgate = dout * d out/d gate, dup = dout * d out/d up; both resized and overwritten.
void swiglu_bwd(const std::vector<float>& gate, const std::vector<float>& up,
                const std::vector<float>& dout, std::vector<float>& dgate, std::vector<float>& dup);

// RMSNorm over rows of `dim`: x[rows, dim], w[dim]; y[rows, dim] and rstd[rows] are resized and
// overwritten.
void rmsnorm_fwd(int rows, int dim, const std::vector<float>& x, const std::vector<float>& w,
                 double eps, std::vector<float>& y, std::vector<float>& rstd);
// dx[rows, dim] is resized and overwritten; dw[dim] must have dim elements and is accumulated
// (+=), as in the CPU twin.
void rmsnorm_bwd(int rows, int dim, const std::vector<float>& x, const std::vector<float>& w,
                 const std::vector<float>& rstd, const std::vector<float>& dy,
                 std::vector<float>& dx, std::vector<float>& dw);

// Rotary position embedding in place on x[tokens, heads, head_dim], positions[tokens];
// inverse = true rotates by the negative angle.
void rope(int tokens, int heads, int head_dim, const std::vector<std::int64_t>& positions,
          double theta, std::vector<float>& x, bool inverse);

// One AdamW step (step counts from 1) over param, m and v in place, all the size of grad.
void adamw(const AdamWParams& p, std::int64_t step, std::vector<float>& param,
           const std::vector<float>& grad, std::vector<float>& m, std::vector<float>& v);

} // namespace mop::real::cuda
