// CUDA twins of the elementwise and row kernels of real_backend/cpu/kernels.cpp. The kernels are
// deliberately simple (one thread per element, pair or column; one block per row) and each one
// follows its CPU twin's loop body, calling the same functions of real_backend/kernels/math.hpp.
// Reductions run in a fixed order, so results are deterministic from run to run.
#include "real_backend/cuda/elementwise.hpp"

#include "real_backend/cuda/device_kernels.hpp"

#include "real_backend/cuda/check.hpp"
#include "real_backend/kernels/math.hpp"

#include <cmath>
#include <cstddef>
#include <cuda_runtime.h>
#include <stdexcept>
#include <string>

namespace mop::real::cuda {
namespace {

// Threads per block; a power of two, which block_sum's tree reduction needs.
constexpr int kThreads = 256;
// Grid size cap for the grid-stride loops (any n is covered; a larger grid would not help the
// simple kernels here).
constexpr std::size_t kMaxBlocks = 65535;

unsigned blocks_for(std::size_t n) {
  const std::size_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < kMaxBlocks ? b : kMaxBlocks);
}

__device__ std::size_t first_index() {
  return static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ std::size_t grid_stride() {
  return static_cast<std::size_t>(gridDim.x) * blockDim.x;
}

// Sum of v over the kThreads threads of the block, returned to every thread. A fixed tree
// (pairs at distance kThreads/2, kThreads/4, ...), so the order of the additions never varies.
template <class T> __device__ T block_sum(T v) {
  __shared__ T buf[kThreads];
  buf[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s /= 2) {
    if (static_cast<int>(threadIdx.x) < s)
      buf[threadIdx.x] += buf[threadIdx.x + s];
    __syncthreads();
  }
  const T total = buf[0];
  __syncthreads(); // buf is reused by the next call
  return total;
}

// ---- kernels ----

__global__ void swiglu_fwd_kernel(std::size_t n, const float* gate, const float* up, float* out) {
  for (std::size_t i = first_index(); i < n; i += grid_stride())
    out[i] = math::swiglu(gate[i], up[i]);
}

__global__ void swiglu_bwd_kernel(std::size_t n, const float* gate, const float* up,
                                  const float* dout, float* dgate, float* dup) {
  for (std::size_t i = first_index(); i < n; i += grid_stride()) {
    dgate[i] = dout[i] * math::swiglu_dgate(gate[i], up[i]);
    dup[i] = dout[i] * math::swiglu_dup(gate[i], up[i]);
  }
}

// One block per row. The sum of squares is accumulated in double, as in the CPU twin.
__global__ void rmsnorm_fwd_kernel(int dim, const float* x, const float* w, double eps, float* y,
                                   float* rstd) {
  const std::size_t row = blockIdx.x;
  const float* xr = x + row * dim;
  double ss = 0;
  for (int j = static_cast<int>(threadIdx.x); j < dim; j += kThreads)
    ss += static_cast<double>(xr[j]) * static_cast<double>(xr[j]);
  ss = block_sum(ss);
  const float rs = static_cast<float>(math::rmsnorm_rstd(ss, dim, eps));
  if (threadIdx.x == 0)
    rstd[row] = rs;
  float* yr = y + row * dim;
  for (int j = static_cast<int>(threadIdx.x); j < dim; j += kThreads)
    yr[j] = math::rmsnorm_y(xr[j], rs, w[j]);
}

// One block per row: dx from math.hpp's formula (derivation there), with the row sum in float
// as in the CPU twin.
__global__ void rmsnorm_bwd_dx_kernel(int dim, const float* x, const float* w, const float* rstd,
                                      const float* dy, float* dx) {
  const std::size_t row = blockIdx.x;
  const float* xr = x + row * dim;
  const float* dyr = dy + row * dim;
  const float rs = rstd[row];
  float s = 0;
  for (int j = static_cast<int>(threadIdx.x); j < dim; j += kThreads)
    s += dyr[j] * w[j] * xr[j];
  s = block_sum(s);
  const float c = math::rmsnorm_dx_coefficient(rs, s, dim);
  float* dxr = dx + row * dim;
  for (int j = static_cast<int>(threadIdx.x); j < dim; j += kThreads)
    dxr[j] = math::rmsnorm_dx(xr[j], dyr[j], w[j], rs, c);
}

// One thread per column: dw_j += sum over rows of dy_j x_j r, rows in increasing order as in the
// CPU twin, so no atomics and the same order of additions.
__global__ void rmsnorm_bwd_dw_kernel(int rows, int dim, const float* x, const float* rstd,
                                      const float* dy, float* dw) {
  for (std::size_t j = first_index(); j < static_cast<std::size_t>(dim); j += grid_stride()) {
    float acc = dw[j];
    for (int r = 0; r < rows; ++r) {
      const std::size_t e = static_cast<std::size_t>(r) * dim + j;
      acc += math::rmsnorm_dw(x[e], dy[e], rstd[r]);
    }
    dw[j] = acc;
  }
}

// One thread per (token, pair): the angle and its cosine and sine in double, rounded to float,
// then the rotation of that pair in every head, as in the CPU twin.
__global__ void rope_kernel(int tokens, int heads, int head_dim, const std::int64_t* positions,
                            double theta, float* x, bool inverse) {
  const int half = head_dim / 2;
  const std::size_t pairs = static_cast<std::size_t>(tokens) * half;
  for (std::size_t k = first_index(); k < pairs; k += grid_stride()) {
    const std::size_t t = k / half;
    const int i = static_cast<int>(k % half);
    const double angle =
        static_cast<double>(positions[t]) * math::rope_inv_freq(i, head_dim, theta);
    const float c = static_cast<float>(std::cos(angle)), s = static_cast<float>(std::sin(angle));
    for (int h = 0; h < heads; ++h) {
      float* xh = x + (t * heads + h) * head_dim;
      if (inverse)
        math::rope_rotate_inverse(xh[i], xh[i + half], c, s);
      else
        math::rope_rotate(xh[i], xh[i + half], c, s);
    }
  }
}

__global__ void adamw_kernel(std::size_t n, double lr, double beta1, double beta2, double eps,
                             double weight_decay, double bc1, double bc2, float* param,
                             const float* grad, float* m, float* v) {
  for (std::size_t i = first_index(); i < n; i += grid_stride())
    math::adamw_update(param[i], m[i], v[i], grad[i], lr, beta1, beta2, eps, weight_decay, bc1,
                       bc2);
}

// ---- host side ----

// A device array of floats or positions, freed when it goes out of scope.
template <class T> class DeviceArray {
public:
  explicit DeviceArray(std::size_t n) : n_(n) {
    if (n_ > 0)
      MOP_CUDA_CHECK(cudaMalloc(&p_, n_ * sizeof(T)));
  }
  explicit DeviceArray(const std::vector<T>& host) : DeviceArray(host.size()) {
    if (n_ > 0)
      MOP_CUDA_CHECK(cudaMemcpy(p_, host.data(), n_ * sizeof(T), cudaMemcpyHostToDevice));
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  ~DeviceArray() {
    if (p_)
      cudaFree(p_); // a destructor must not throw; a failure here leaks at worst
  }
  T* get() const { return p_; }
  // Copies the whole array into host (resized to fit). cudaMemcpy waits for the kernels before
  // it on the default stream and reports their errors.
  void copy_to(std::vector<T>& host) const {
    host.resize(n_);
    if (n_ > 0)
      MOP_CUDA_CHECK(cudaMemcpy(host.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost));
  }

private:
  std::size_t n_ = 0;
  T* p_ = nullptr;
};

void require(bool ok, const std::string& sentence) {
  if (!ok)
    throw std::invalid_argument(sentence);
}

std::size_t product(int a, int b) {
  return static_cast<std::size_t>(a) * static_cast<std::size_t>(b);
}

} // namespace

std::vector<float> swiglu_fwd(const std::vector<float>& gate, const std::vector<float>& up) {
  require(gate.size() == up.size(), "swiglu_fwd: gate and up differ in size");
  const std::size_t n = gate.size();
  std::vector<float> out(n);
  if (n == 0)
    return out;
  const DeviceArray<float> d_gate(gate), d_up(up), d_out(n);
  swiglu_fwd_kernel<<<blocks_for(n), kThreads>>>(n, d_gate.get(), d_up.get(), d_out.get());
  MOP_CUDA_CHECK(cudaGetLastError());
  d_out.copy_to(out);
  return out;
}

void swiglu_bwd(const std::vector<float>& gate, const std::vector<float>& up,
                const std::vector<float>& dout, std::vector<float>& dgate,
                std::vector<float>& dup) {
  require(gate.size() == up.size() && gate.size() == dout.size(),
          "swiglu_bwd: gate, up and dout differ in size");
  const std::size_t n = gate.size();
  dgate.assign(n, 0.0f);
  dup.assign(n, 0.0f);
  if (n == 0)
    return;
  const DeviceArray<float> d_gate(gate), d_up(up), d_dout(dout), d_dgate(n), d_dup(n);
  swiglu_bwd_kernel<<<blocks_for(n), kThreads>>>(n, d_gate.get(), d_up.get(), d_dout.get(),
                                                 d_dgate.get(), d_dup.get());
  MOP_CUDA_CHECK(cudaGetLastError());
  d_dgate.copy_to(dgate);
  d_dup.copy_to(dup);
}

void rmsnorm_fwd(int rows, int dim, const std::vector<float>& x, const std::vector<float>& w,
                 double eps, std::vector<float>& y, std::vector<float>& rstd) {
  require(rows >= 0 && dim > 0, "rmsnorm_fwd: rows must be >= 0 and dim > 0");
  require(x.size() == product(rows, dim) && w.size() == static_cast<std::size_t>(dim),
          "rmsnorm_fwd: x must have rows * dim elements and w dim");
  y.assign(x.size(), 0.0f);
  rstd.assign(static_cast<std::size_t>(rows), 0.0f);
  if (rows == 0)
    return;
  const DeviceArray<float> d_x(x), d_w(w), d_y(x.size()), d_rstd(rstd.size());
  rmsnorm_fwd_kernel<<<static_cast<unsigned>(rows), kThreads>>>(dim, d_x.get(), d_w.get(), eps,
                                                                d_y.get(), d_rstd.get());
  MOP_CUDA_CHECK(cudaGetLastError());
  d_y.copy_to(y);
  d_rstd.copy_to(rstd);
}

void rmsnorm_bwd(int rows, int dim, const std::vector<float>& x, const std::vector<float>& w,
                 const std::vector<float>& rstd, const std::vector<float>& dy,
                 std::vector<float>& dx, std::vector<float>& dw) {
  require(rows >= 0 && dim > 0, "rmsnorm_bwd: rows must be >= 0 and dim > 0");
  const std::size_t n = product(rows, dim);
  require(x.size() == n && dy.size() == n && rstd.size() == static_cast<std::size_t>(rows) &&
              w.size() == static_cast<std::size_t>(dim) &&
              dw.size() == static_cast<std::size_t>(dim),
          "rmsnorm_bwd: x and dy must have rows * dim elements, rstd rows, w and dw dim");
  dx.assign(n, 0.0f);
  if (rows == 0)
    return;
  const DeviceArray<float> d_x(x), d_w(w), d_rstd(rstd), d_dy(dy), d_dx(n), d_dw(dw);
  rmsnorm_bwd_dx_kernel<<<static_cast<unsigned>(rows), kThreads>>>(
      dim, d_x.get(), d_w.get(), d_rstd.get(), d_dy.get(), d_dx.get());
  MOP_CUDA_CHECK(cudaGetLastError());
  rmsnorm_bwd_dw_kernel<<<blocks_for(static_cast<std::size_t>(dim)), kThreads>>>(
      rows, dim, d_x.get(), d_rstd.get(), d_dy.get(), d_dw.get());
  MOP_CUDA_CHECK(cudaGetLastError());
  d_dx.copy_to(dx);
  d_dw.copy_to(dw);
}

void rope(int tokens, int heads, int head_dim, const std::vector<std::int64_t>& positions,
          double theta, std::vector<float>& x, bool inverse) {
  require(tokens >= 0 && heads >= 0 && head_dim >= 0 && head_dim % 2 == 0,
          "rope: tokens, heads and head_dim must be >= 0 and head_dim even");
  require(positions.size() == static_cast<std::size_t>(tokens) &&
              x.size() == product(tokens, heads) * static_cast<std::size_t>(head_dim),
          "rope: positions must have tokens elements and x tokens * heads * head_dim");
  const std::size_t pairs = product(tokens, head_dim / 2);
  if (pairs == 0 || heads == 0)
    return;
  const DeviceArray<std::int64_t> d_pos(positions);
  const DeviceArray<float> d_x(x);
  rope_kernel<<<blocks_for(pairs), kThreads>>>(tokens, heads, head_dim, d_pos.get(), theta,
                                               d_x.get(), inverse);
  MOP_CUDA_CHECK(cudaGetLastError());
  d_x.copy_to(x);
}

void adamw(const AdamWParams& p, std::int64_t step, std::vector<float>& param,
           const std::vector<float>& grad, std::vector<float>& m, std::vector<float>& v) {
  const std::size_t n = grad.size();
  require(param.size() == n && m.size() == n && v.size() == n,
          "adamw: param, grad, m and v differ in size");
  if (n == 0)
    return;
  // The bias corrections once per step on the host, as the CPU twin computes them.
  const double bc1 = math::adam_bias_correction(p.beta1, step);
  const double bc2 = math::adam_bias_correction(p.beta2, step);
  const DeviceArray<float> d_param(param), d_grad(grad), d_m(m), d_v(v);
  adamw_kernel<<<blocks_for(n), kThreads>>>(n, p.lr, p.beta1, p.beta2, p.eps, p.weight_decay, bc1,
                                            bc2, d_param.get(), d_grad.get(), d_m.get(), d_v.get());
  MOP_CUDA_CHECK(cudaGetLastError());
  d_param.copy_to(param);
  d_m.copy_to(m);
  d_v.copy_to(v);
}

} // namespace mop::real::cuda

// ---- on device pointers (device_kernels.hpp) ----
namespace mop::real::cuda::dev {

void swiglu_fwd(std::size_t n, const float* gate, const float* up, float* out) {
  if (n == 0)
    return;
  swiglu_fwd_kernel<<<blocks_for(n), kThreads>>>(n, gate, up, out);
  MOP_CUDA_CHECK(cudaGetLastError());
}

void swiglu_bwd(std::size_t n, const float* gate, const float* up, const float* dout, float* dgate,
                float* dup) {
  if (n == 0)
    return;
  swiglu_bwd_kernel<<<blocks_for(n), kThreads>>>(n, gate, up, dout, dgate, dup);
  MOP_CUDA_CHECK(cudaGetLastError());
}

void rmsnorm_fwd(int rows, int dim, const float* x, const float* w, double eps, float* y,
                 float* rstd) {
  if (rows <= 0)
    return;
  rmsnorm_fwd_kernel<<<static_cast<unsigned>(rows), kThreads>>>(dim, x, w, eps, y, rstd);
  MOP_CUDA_CHECK(cudaGetLastError());
}

void rmsnorm_bwd(int rows, int dim, const float* x, const float* w, const float* rstd,
                 const float* dy, float* dx, float* dw) {
  if (rows <= 0)
    return;
  rmsnorm_bwd_dx_kernel<<<static_cast<unsigned>(rows), kThreads>>>(dim, x, w, rstd, dy, dx);
  MOP_CUDA_CHECK(cudaGetLastError());
  rmsnorm_bwd_dw_kernel<<<blocks_for(static_cast<std::size_t>(dim)), kThreads>>>(rows, dim, x, rstd,
                                                                                 dy, dw);
  MOP_CUDA_CHECK(cudaGetLastError());
}

void rope(int tokens, int heads, int head_dim, const std::int64_t* positions, double theta,
          float* x, bool inverse) {
  const std::size_t pairs =
      static_cast<std::size_t>(tokens) * static_cast<std::size_t>(head_dim / 2);
  if (pairs == 0 || heads == 0)
    return;
  rope_kernel<<<blocks_for(pairs), kThreads>>>(tokens, heads, head_dim, positions, theta, x,
                                               inverse);
  MOP_CUDA_CHECK(cudaGetLastError());
}

void adamw(std::size_t n, const AdamWParams& p, std::int64_t step, float* param, const float* grad,
           float* m, float* v) {
  if (n == 0)
    return;
  const double bc1 = math::adam_bias_correction(p.beta1, step);
  const double bc2 = math::adam_bias_correction(p.beta2, step);
  adamw_kernel<<<blocks_for(n), kThreads>>>(n, p.lr, p.beta1, p.beta2, p.eps, p.weight_decay, bc1,
                                            bc2, param, grad, m, v);
  MOP_CUDA_CHECK(cudaGetLastError());
}

} // namespace mop::real::cuda::dev
