#pragma once
// The CUDA backend's policy for the program interpreter (real_backend/cpu/interpreter_impl.hpp):
// every tensor and every temporary a kernel reads in managed memory (cudaMallocManaged), so the
// interpreter's host-side bookkeeping (token tables, routing counts, copies between tensors, the
// in-process collectives of ranks that are threads) reads and writes the same buffers the GPU
// kernels do; the kernels of libmop_cuda.so through its table (api.hpp); sync() after each op.
// float only. Plain C++: the program's side of the library boundary, which no exception crosses.
#include "real_backend/cpu/interpreter.hpp"
#include "real_backend/cuda/api.hpp"

#include <cstddef>
#include <new>
#include <stdexcept>
#include <string>

namespace mop::real::cuda {

// The loaded table (load_api must have succeeded first); throws std::logic_error otherwise.
const KernelTable& kernel_table();

inline void check(const char* failure) {
  if (failure != nullptr)
    throw std::runtime_error(std::string("CUDA executor: ") + failure);
}

template <class X> struct ManagedAllocator {
  using value_type = X;
  ManagedAllocator() = default;
  template <class Y> ManagedAllocator(const ManagedAllocator<Y>&) noexcept {}
  X* allocate(std::size_t n) {
    void* p = nullptr;
    if (kernel_table().managed_alloc(n * sizeof(X), &p) != nullptr)
      throw std::bad_alloc();
    return static_cast<X*>(p);
  }
  void deallocate(X* p, std::size_t) noexcept { kernel_table().managed_free(p); }
  template <class Y> bool operator==(const ManagedAllocator<Y>&) const noexcept { return true; }
};

template <class T> struct CudaKernels;

template <> struct CudaKernels<float> {
  using T = float;
  template <class X> using Alloc = ManagedAllocator<X>;
  static void sync() { check(kernel_table().sync()); }
  static void gemm(int m, int n, int k, const T* a, bool ta, const T* b, bool tb, T* c, bool acc) {
    check(kernel_table().gemm(m, n, k, a, ta, b, tb, c, acc));
  }
  static void rmsnorm_fwd(int rows, int dim, const T* x, const T* w, double eps, T* y, T* rstd) {
    check(kernel_table().rmsnorm_fwd(rows, dim, x, w, eps, y, rstd));
  }
  static void rmsnorm_bwd(int rows, int dim, const T* x, const T* w, const T* rstd, const T* dy,
                          T* dx, T* dw) {
    check(kernel_table().rmsnorm_bwd(rows, dim, x, w, rstd, dy, dx, dw));
  }
  static void rope(int tokens, int heads, int head_dim, const std::int64_t* positions, double theta,
                   T* x, bool inverse) {
    check(kernel_table().rope(tokens, heads, head_dim, positions, theta, x, inverse));
  }
  static void swiglu_fwd(std::size_t n, const T* gate, const T* up, T* out) {
    check(kernel_table().swiglu_fwd(n, gate, up, out));
  }
  static void swiglu_bwd(std::size_t n, const T* gate, const T* up, const T* dout, T* dgate,
                         T* dup) {
    check(kernel_table().swiglu_bwd(n, gate, up, dout, dgate, dup));
  }
  static void attention_fwd(const AttentionParams& p, int tq, int tk, const T* q, const T* k,
                            const T* v, const std::int64_t* q_pos, const std::int64_t* k_pos,
                            T* out, T* lse) {
    check(kernel_table().attention_fwd(p, tq, tk, q, k, v, q_pos, k_pos, out, lse));
  }
  static void attention_merge(int tq, int heads, int v_dim, T* out_a, T* lse_a, const T* out_b,
                              const T* lse_b) {
    check(kernel_table().attention_merge(tq, heads, v_dim, out_a, lse_a, out_b, lse_b));
  }
  static void attention_bwd(const AttentionParams& p, int tq, int tk, const T* q, const T* k,
                            const T* v, const std::int64_t* q_pos, const std::int64_t* k_pos,
                            const T* out, const T* lse, const T* dout, T* dq, T* dk, T* dv) {
    check(
        kernel_table().attention_bwd(p, tq, tk, q, k, v, q_pos, k_pos, out, lse, dout, dq, dk, dv));
  }
  static double cross_entropy(int rows, int vocab, const T* logits, const std::int32_t* labels,
                              double scale, T* dlogits) {
    double total = 0;
    check(kernel_table().cross_entropy(rows, vocab, logits, labels, scale, dlogits, &total));
    return total;
  }
  static void router_topk_fwd(int rows, int experts, int k, bool normalize, const T* logits,
                              T* probs, std::int32_t* idx, T* weights) {
    check(kernel_table().router_topk_fwd(rows, experts, k, normalize, logits, probs, idx, weights));
  }
  static void router_topk_bwd(int rows, int experts, int k, bool normalize, const T* probs,
                              const std::int32_t* idx, const T* dweights, T* dlogits) {
    check(
        kernel_table().router_topk_bwd(rows, experts, k, normalize, probs, idx, dweights, dlogits));
  }
  static void gather_rows(int n, int dim, const T* src, const std::int32_t* index, T* dst) {
    check(kernel_table().gather_rows(n, dim, src, index, dst));
  }
  static void scatter_add_rows(int n, int dim, const T* src, const std::int32_t* index, T* dst) {
    check(kernel_table().scatter_add_rows(n, dim, src, index, dst));
  }
  static void adamw(std::size_t n, const AdamWParams& p, std::int64_t step, T* param, const T* grad,
                    T* m, T* v) {
    check(kernel_table().adamw(n, p, step, param, grad, m, v));
  }
};

// The program interpreter on the GPU this process selected (select_device): ranks as threads
// sharing it, or this process's rank of a world of processes (`process`, whose collectives read
// the managed buffers from the host after each op's sync); the same contract as real::interpret
// (real_backend/cpu/interpreter.hpp).
void select_device(int device);
RunResult<float> interpret(const sim::Schedule& s, const TinyConfig& c, const DataSource& data,
                           const TrainState<float>& start, const RunOptions& options,
                           World* process = nullptr);

} // namespace mop::real::cuda
