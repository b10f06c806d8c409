#pragma once
// The CUDA backend as the `mop` program sees it: a table of entry points in libmop_cuda.so, a
// library built beside the program and loaded on first use. `mop plan` and every command that
// needs no GPU never load cuBLASLt, cuDNN or NCCL (together over 700 MB of mappings), and a
// program built with the backend still runs on a machine without those libraries. No exception
// crosses the library's boundary: each entry point returns the empty string on success and the
// one-sentence reason otherwise. Plain C++: no CUDA header.
#include "real_backend/cpu/kernels.hpp" // AttentionParams, AdamWParams
#include "real_backend/cuda/calibrate.hpp"
#include "real_backend/cuda/runtime.hpp"

#include <cstddef>
#include <cstdint>
#include <string>

namespace mop::real::cuda {

// The executor's kernels (device_kernels.hpp) on memory both sides reach. Each returns nullptr on
// success, else what failed (valid until the next call on the same thread).
struct KernelTable {
  const char* (*set_device)(int device);
  const char* (*managed_alloc)(std::size_t bytes, void** out);
  void (*managed_free)(void* p);
  const char* (*sync)();
  const char* (*gemm)(int m, int n, int k, const float* a, bool trans_a, const float* b,
                      bool trans_b, float* c, bool accumulate);
  const char* (*rmsnorm_fwd)(int rows, int dim, const float* x, const float* w, double eps,
                             float* y, float* rstd);
  const char* (*rmsnorm_bwd)(int rows, int dim, const float* x, const float* w, const float* rstd,
                             const float* dy, float* dx, float* dw);
  const char* (*rope)(int tokens, int heads, int head_dim, const std::int64_t* positions,
                      double theta, float* x, bool inverse);
  const char* (*swiglu_fwd)(std::size_t n, const float* gate, const float* up, float* out);
  const char* (*swiglu_bwd)(std::size_t n, const float* gate, const float* up, const float* dout,
                            float* dgate, float* dup);
  const char* (*attention_fwd)(const AttentionParams& p, int tq, int tk, const float* q,
                               const float* k, const float* v, const std::int64_t* q_pos,
                               const std::int64_t* k_pos, float* out, float* lse);
  const char* (*attention_merge)(int tq, int heads, int v_dim, float* out_a, float* lse_a,
                                 const float* out_b, const float* lse_b);
  const char* (*attention_bwd)(const AttentionParams& p, int tq, int tk, const float* q,
                               const float* k, const float* v, const std::int64_t* q_pos,
                               const std::int64_t* k_pos, const float* out, const float* lse,
                               const float* dout, float* dq, float* dk, float* dv);
  const char* (*cross_entropy)(int rows, int vocab, const float* logits, const std::int32_t* labels,
                               double scale, float* dlogits, double* total);
  const char* (*router_topk_fwd)(int rows, int experts, int k, bool normalize, const float* logits,
                                 float* probs, std::int32_t* idx, float* weights);
  const char* (*router_topk_bwd)(int rows, int experts, int k, bool normalize, const float* probs,
                                 const std::int32_t* idx, const float* dweights, float* dlogits);
  const char* (*gather_rows)(int n, int dim, const float* src, const std::int32_t* index,
                             float* dst);
  const char* (*scatter_add_rows)(int n, int dim, const float* src, const std::int32_t* index,
                                  float* dst);
  const char* (*adamw)(std::size_t n, const AdamWParams& p, std::int64_t step, float* param,
                       const float* grad, float* m, float* v);
};

// NCCL for ranks in separate processes (nccl.hpp): communicators as opaque handles, the
// interpreter's collectives each waiting for its result (host buffers staged through the device).
// Element types are Elem's (real_backend/cpu/comm.hpp) as an int. Each returns nullptr on success,
// else what failed (valid until the next call on the same thread).
struct NcclTable {
  const char* (*new_id)(unsigned char* out, std::size_t size); // rank 0's bootstrap id
  const char* (*world)(const unsigned char* id, std::size_t size, int ranks, int rank,
                       void** comm);
  const char* (*split)(void* comm, int color, int key, void** out); // color < 0: *out = nullptr
  void (*destroy)(void* comm);
  const char* (*all_reduce)(void* comm, void* data, std::size_t n, int elem, bool max);
  const char* (*all_gather)(void* comm, const void* send, void* recv, std::size_t n, int elem);
  const char* (*reduce_scatter)(void* comm, const void* send, void* recv, std::size_t n,
                                int elem);
  const char* (*all_to_all_v)(void* comm, const void* send, const std::size_t* send_counts,
                              void* recv, const std::size_t* recv_counts, int elem);
  const char* (*ring)(void* comm, const void* send, void* recv, std::size_t n, int shift,
                      int elem);
};

struct Api {
  static constexpr int kVersion = 3; // the table's layout; the loader refuses another
  int version = kVersion;
  // GPUs this process can use (0 with the reason when none).
  std::string (*probe)(int& device_count) = nullptr;
  std::string (*versions)(LibraryVersions& out) = nullptr;
  std::string (*calibrate)(const CalibrateOptions& options, DeviceMeasurements& out) = nullptr;
  KernelTable kernels{};
  NcclTable nccl{};
};

// The backend's table, loaded once from libmop_cuda.so in the program's own folder (or the file
// the environment variable MOP_CUDA_LIBRARY names); nullptr
// with `why` set (one sentence) when this build has no CUDA backend or the library (or one it
// needs: cuBLASLt, cuDNN, NCCL) cannot be loaded.
const Api* load_api(std::string& why);

} // namespace mop::real::cuda

// The symbol libmop_cuda.so exports: its table.
extern "C" const mop::real::cuda::Api* mop_cuda_api();
