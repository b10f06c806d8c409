// The CUDA backend's runtime pieces: library versions, device facts, memory, streams, events and
// cuBLASLt GEMM (real_backend/cuda/runtime.hpp).
#include "real_backend/cuda/runtime.hpp"

#include "real_backend/cuda/check.hpp"

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cudnn.h>
#include <map>
#include <nccl.h>
#include <stdexcept>
#include <string>
#include <tuple>

namespace mop::real::cuda {

namespace {

void check_blas(cublasStatus_t status, const char* call) {
  if (status != CUBLAS_STATUS_SUCCESS)
    throw std::runtime_error(strf("%s failed: cuBLAS status %d", call, static_cast<int>(status)));
}

__global__ void fill_bf16(__nv_bfloat16* p, std::size_t n, std::uint64_t seed, float scale) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    // splitmix64 of (seed, i), two uniforms summed: a bounded, zero-mean value of spread `scale`
    std::uint64_t z = seed + 0x9e3779b97f4a7c15ULL * (i + 1);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    z ^= z >> 31;
    const float u1 = static_cast<float>(z & 0xffffffu) / 16777216.0f;
    const float u2 = static_cast<float>((z >> 24) & 0xffffffu) / 16777216.0f;
    p[i] = __float2bfloat16((u1 + u2 - 1.0f) * 2.449f * scale); // variance of u1+u2-1 is 1/6
  }
}

} // namespace

LibraryVersions library_versions() {
  LibraryVersions v;
  if (cudaDriverGetVersion(&v.driver) != cudaSuccess)
    v.driver = 0;
  if (cudaRuntimeGetVersion(&v.runtime) != cudaSuccess)
    v.runtime = 0;
  cudaGetLastError();
  v.cublaslt = cublasLtGetVersion();
  v.cudnn = cudnnGetVersion();
  if (ncclGetVersion(&v.nccl) != ncclSuccess)
    v.nccl = 0;
  return v;
}

DeviceInfo device_info(int device) {
  cudaDeviceProp p{};
  MOP_CUDA_CHECK(cudaGetDeviceProperties(&p, device));
  DeviceInfo d;
  d.name = p.name;
  d.compute_capability = p.major * 10 + p.minor;
  d.sms = p.multiProcessorCount;
  d.memory_bytes = static_cast<double>(p.totalGlobalMem);
  d.l2_bytes = static_cast<double>(p.l2CacheSize);
  int khz = 0;
  if (cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, device) == cudaSuccess)
    d.clock_hz = 1e3 * khz;
  cudaGetLastError();
  return d;
}

DeviceBuffer::DeviceBuffer(std::size_t bytes) : bytes_(bytes) {
  if (bytes > 0)
    MOP_CUDA_CHECK(cudaMalloc(&p_, bytes));
}
DeviceBuffer::~DeviceBuffer() {
  if (p_)
    cudaFree(p_);
}
DeviceBuffer::DeviceBuffer(DeviceBuffer&& o) noexcept : p_(o.p_), bytes_(o.bytes_) {
  o.p_ = nullptr;
  o.bytes_ = 0;
}
DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    if (p_)
      cudaFree(p_);
    p_ = o.p_;
    bytes_ = o.bytes_;
    o.p_ = nullptr;
    o.bytes_ = 0;
  }
  return *this;
}
void DeviceBuffer::fill_random_bf16(std::uint64_t seed, float scale) {
  const std::size_t n = bytes_ / sizeof(__nv_bfloat16);
  if (n == 0)
    return;
  fill_bf16<<<1024, 256>>>(static_cast<__nv_bfloat16*>(p_), n, seed, scale);
  MOP_CUDA_CHECK(cudaGetLastError());
  MOP_CUDA_CHECK(cudaDeviceSynchronize());
}
void DeviceBuffer::upload(const void* src, std::size_t bytes) {
  if (bytes > bytes_)
    throw std::invalid_argument(strf("an upload of %zu bytes into a buffer of %zu", bytes, bytes_));
  MOP_CUDA_CHECK(cudaMemcpy(p_, src, bytes, cudaMemcpyHostToDevice));
}
void DeviceBuffer::download(void* dst, std::size_t bytes) const {
  if (bytes > bytes_)
    throw std::invalid_argument(
        strf("a download of %zu bytes from a buffer of %zu", bytes, bytes_));
  MOP_CUDA_CHECK(cudaMemcpy(dst, p_, bytes, cudaMemcpyDeviceToHost));
}
void DeviceBuffer::zero() {
  if (p_)
    MOP_CUDA_CHECK(cudaMemset(p_, 0, bytes_));
}

PinnedBuffer::PinnedBuffer(std::size_t bytes) : bytes_(bytes) {
  MOP_CUDA_CHECK(cudaHostAlloc(&p_, bytes, cudaHostAllocDefault));
}
PinnedBuffer::~PinnedBuffer() {
  if (p_)
    cudaFreeHost(p_);
}

Stream::Stream() {
  cudaStream_t s = nullptr;
  MOP_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  s_ = s;
}
Stream::~Stream() {
  if (s_)
    cudaStreamDestroy(static_cast<cudaStream_t>(s_));
}
void Stream::synchronize() const {
  MOP_CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(s_)));
}

EventTimer::EventTimer() {
  cudaEvent_t a = nullptr, b = nullptr;
  MOP_CUDA_CHECK(cudaEventCreate(&a));
  MOP_CUDA_CHECK(cudaEventCreate(&b));
  begin_ = a;
  end_ = b;
}
EventTimer::~EventTimer() {
  if (begin_)
    cudaEventDestroy(static_cast<cudaEvent_t>(begin_));
  if (end_)
    cudaEventDestroy(static_cast<cudaEvent_t>(end_));
}
void EventTimer::start(void* stream) {
  MOP_CUDA_CHECK(
      cudaEventRecord(static_cast<cudaEvent_t>(begin_), static_cast<cudaStream_t>(stream)));
}
void EventTimer::stop(void* stream) {
  MOP_CUDA_CHECK(
      cudaEventRecord(static_cast<cudaEvent_t>(end_), static_cast<cudaStream_t>(stream)));
}
double EventTimer::seconds() const {
  MOP_CUDA_CHECK(cudaEventSynchronize(static_cast<cudaEvent_t>(end_)));
  float ms = 0;
  MOP_CUDA_CHECK(
      cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(begin_), static_cast<cudaEvent_t>(end_)));
  return 1e-3 * ms;
}

// ---- GEMM ---------------------------------------------------------------------------------------
// Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: cuBLASLt gets B as its first
// operand and A as its second, each with its own transpose flag, and n × m as the output's shape.

struct GemmRunner::Impl {
  struct Plan {
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo{};
  };
  cudaStream_t stream = nullptr;
  cublasLtHandle_t handle = nullptr;
  DeviceBuffer workspace;
  std::map<std::tuple<int, int, int, bool, bool, int, bool>, Plan> plans;

  ~Impl() {
    for (auto& [key, p] : plans) {
      cublasLtMatrixLayoutDestroy(p.a);
      cublasLtMatrixLayoutDestroy(p.b);
      cublasLtMatrixLayoutDestroy(p.c);
      cublasLtMatmulDescDestroy(p.desc);
    }
    if (handle)
      cublasLtDestroy(handle);
  }

  Plan& plan(const GemmShape& s) {
    const auto key =
        std::tuple(s.m, s.n, s.k, s.trans_a, s.trans_b, static_cast<int>(s.type), s.accumulate);
    const auto it = plans.find(key);
    if (it != plans.end())
      return it->second;
    const cudaDataType_t t = s.type == GemmType::bf16 ? CUDA_R_16BF : CUDA_R_32F;
    Plan p;
    check_blas(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F),
               "cublasLtMatmulDescCreate");
    // First operand: row-major B, column-major view [n, k] (or its transpose).
    const cublasOperation_t op1 = s.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t op2 = s.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    check_blas(
        cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &op1, sizeof(op1)),
        "cublasLtMatmulDescSetAttribute(TRANSA)");
    check_blas(
        cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &op2, sizeof(op2)),
        "cublasLtMatmulDescSetAttribute(TRANSB)");
    // Column-major layouts: B as stored is [n, k] col-major with ld n (not transposed) or
    // [k, n] with ld k (transposed); likewise A.
    const std::uint64_t m = static_cast<std::uint64_t>(s.m), n = static_cast<std::uint64_t>(s.n),
                        k = static_cast<std::uint64_t>(s.k);
    check_blas(s.trans_b ? cublasLtMatrixLayoutCreate(&p.a, t, k, n, static_cast<std::int64_t>(k))
                         : cublasLtMatrixLayoutCreate(&p.a, t, n, k, static_cast<std::int64_t>(n)),
               "cublasLtMatrixLayoutCreate(B)");
    check_blas(s.trans_a ? cublasLtMatrixLayoutCreate(&p.b, t, m, k, static_cast<std::int64_t>(m))
                         : cublasLtMatrixLayoutCreate(&p.b, t, k, m, static_cast<std::int64_t>(k)),
               "cublasLtMatrixLayoutCreate(A)");
    check_blas(cublasLtMatrixLayoutCreate(&p.c, t, n, m, static_cast<std::int64_t>(n)),
               "cublasLtMatrixLayoutCreate(C)");
    cublasLtMatmulPreference_t pref = nullptr;
    check_blas(cublasLtMatmulPreferenceCreate(&pref), "cublasLtMatmulPreferenceCreate");
    const std::size_t ws = workspace.bytes();
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                                         sizeof(ws));
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(handle, p.desc, p.a, p.b, p.c, p.c,
                                                             pref, 1, &result, &found);
    cublasLtMatmulPreferenceDestroy(pref);
    if (st != CUBLAS_STATUS_SUCCESS || found == 0) {
      cublasLtMatrixLayoutDestroy(p.a);
      cublasLtMatrixLayoutDestroy(p.b);
      cublasLtMatrixLayoutDestroy(p.c);
      cublasLtMatmulDescDestroy(p.desc);
      throw std::runtime_error(
          strf("cuBLASLt has no algorithm for a %dx%dx%d GEMM", s.m, s.n, s.k));
    }
    p.algo = result.algo;
    return plans.emplace(key, p).first->second;
  }
};

GemmRunner::GemmRunner(void* stream, std::size_t workspace_bytes)
    : impl_(std::make_unique<Impl>()) {
  impl_->stream = static_cast<cudaStream_t>(stream);
  check_blas(cublasLtCreate(&impl_->handle), "cublasLtCreate");
  impl_->workspace = DeviceBuffer(workspace_bytes);
}

GemmRunner::~GemmRunner() = default;

void GemmRunner::run(const GemmShape& s, const void* a, const void* b, void* c) {
  if (s.m <= 0 || s.n <= 0 || s.k <= 0)
    throw std::invalid_argument("a GEMM needs positive m, n and k");
  Impl::Plan& p = impl_->plan(s);
  const float alpha = 1.0f, beta = s.accumulate ? 1.0f : 0.0f;
  check_blas(cublasLtMatmul(impl_->handle, p.desc, &alpha, b, p.a, a, p.b, &beta, c, p.c, c, p.c,
                            &p.algo, impl_->workspace.data(), impl_->workspace.bytes(),
                            impl_->stream),
             "cublasLtMatmul");
}

std::size_t GemmRunner::planned_shapes() const {
  return impl_->plans.size();
}

} // namespace mop::real::cuda
