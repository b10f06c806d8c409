#pragma once
// The CUDA backend's runtime pieces behind a plain C++ interface (no CUDA header: CPU code and
// tests include it): the versions of the libraries this process loaded, what the GPU is, device
// memory, streams and events, and GEMM through cuBLASLt with its algorithm chosen once per shape.
// Every call that needs a GPU throws std::runtime_error naming the failed call without one.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace mop::real::cuda {

// The versions of the libraries as loaded at run time (a GPU machine may carry others than the
// build machine): the driver's CUDA version (0 without a driver), the runtime's, cuBLASLt's,
// cuDNN's and NCCL's, each as the library encodes it (12080 = 12.8, 130100 = 13.1.0,
// 91900 = 9.19.0, 22809 = 2.28.9). Needs no GPU.
struct LibraryVersions {
  int driver = 0;
  int runtime = 0;
  std::size_t cublaslt = 0;
  std::size_t cudnn = 0;
  int nccl = 0;
  std::string describe() const; // "driver 13.0, runtime 13.0, cuBLASLt 13.1.0, ..."
};
LibraryVersions library_versions();

struct DeviceInfo {
  std::string name;
  int compute_capability = 0; // 90 for Hopper
  int sms = 0;
  double memory_bytes = 0;
  double l2_bytes = 0;
  double clock_hz = 0; // the SMs' peak clock
};
DeviceInfo device_info(int device = 0);

// Device memory that frees itself.
class DeviceBuffer {
public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::size_t bytes);
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& o) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void* data() const { return p_; }
  std::size_t bytes() const { return bytes_; }
  void fill_random_bf16(std::uint64_t seed, float scale); // for benchmarks: N(0, scale²)-like
  void zero();
  // Copies `bytes` (at most bytes()) from host memory, or to it; synchronous.
  void upload(const void* src, std::size_t bytes);
  void download(void* dst, std::size_t bytes) const;

private:
  void* p_ = nullptr;
  std::size_t bytes_ = 0;
};

// Page-locked host memory (what DMA copies at full PCIe rate need).
class PinnedBuffer {
public:
  explicit PinnedBuffer(std::size_t bytes);
  ~PinnedBuffer();
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  void* data() const { return p_; }
  std::size_t bytes() const { return bytes_; }

private:
  void* p_ = nullptr;
  std::size_t bytes_ = 0;
};

// A stream that is destroyed with it; handle() is a cudaStream_t.
class Stream {
public:
  Stream();
  ~Stream();
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  void* handle() const { return s_; }
  void synchronize() const;

private:
  void* s_ = nullptr;
};

// Times what is issued on `stream` between start() and stop() with CUDA events.
class EventTimer {
public:
  EventTimer();
  ~EventTimer();
  EventTimer(const EventTimer&) = delete;
  EventTimer& operator=(const EventTimer&) = delete;
  void start(void* stream);
  void stop(void* stream);
  double seconds() const; // waits for stop's event

private:
  void* begin_ = nullptr;
  void* end_ = nullptr;
};

enum class GemmType { f32, bf16 };

// C[m,n] (+)= op(A)·op(B), row-major as the CPU twin real::gemm: A is [m,k] ([k,m] when
// trans_a), B [k,n] ([n,k] when trans_b). Inputs and output of type `type`, FP32 accumulation.
struct GemmShape {
  int m = 0, n = 0, k = 0;
  bool trans_a = false, trans_b = false;
  GemmType type = GemmType::bf16;
  bool accumulate = false;
  bool operator==(const GemmShape&) const = default;
};

// cuBLASLt matmuls on one stream, with a workspace of its own (one runner per stream) and the
// library's first heuristic choice of algorithm cached per shape, so a shape is planned once.
class GemmRunner {
public:
  explicit GemmRunner(void* stream, std::size_t workspace_bytes = std::size_t{32} << 20);
  ~GemmRunner();
  GemmRunner(const GemmRunner&) = delete;
  GemmRunner& operator=(const GemmRunner&) = delete;
  void run(const GemmShape& shape, const void* a, const void* b, void* c);
  std::size_t planned_shapes() const;

private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

} // namespace mop::real::cuda
