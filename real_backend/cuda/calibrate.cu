// The microbenchmarks of `mop calibrate` (real_backend/cuda/calibrate.hpp).
#include "real_backend/cuda/calibrate.hpp"

#include "real_backend/cuda/check.hpp"

#include <algorithm>
#include <chrono>
#include <cuda_runtime.h>
#include <memory>
#include <vector>

namespace mop::real::cuda {

namespace {

__global__ void empty_kernel() {}

// Reads and writes 16 bytes per thread per step: the copy that STREAM's "copy" measures.
__global__ void copy_kernel(const uint4* __restrict__ src, uint4* __restrict__ dst, std::size_t n) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x)
    dst[i] = src[i];
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// The median over `reps` timed repetitions of `body` issued on `stream`, each repetition running
// it `inner` times, after `warmup` untimed runs; per run.
template <class F> double time_on_stream(void* stream, int warmup, int reps, int inner, F&& body) {
  for (int i = 0; i < warmup; ++i)
    body();
  MOP_CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)));
  EventTimer timer;
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    timer.start(stream);
    for (int i = 0; i < inner; ++i)
      body();
    timer.stop(stream);
    t.push_back(timer.seconds() / inner);
  }
  return median(t);
}

struct Shape {
  int m, n, k;
};

} // namespace

DeviceMeasurements measure_device(const CalibrateOptions& o) {
  auto say = [&](const std::string& line) {
    if (o.progress)
      o.progress(line);
  };
  DeviceMeasurements r;
  r.versions = library_versions();
  MOP_CUDA_CHECK(cudaSetDevice(0));
  r.device = device_info(0);
  Stream stream;
  const auto s = static_cast<cudaStream_t>(stream.handle());
  const int reps = o.quick ? 5 : 11;

  // Launch: back-to-back empty kernels; the GPU's time per kernel from events, the host's from
  // its clock around the launch calls alone.
  {
    const int n = 2000;
    r.kernel_launch_s =
        time_on_stream(stream.handle(), 100, reps, n, [&] { empty_kernel<<<1, 32, 0, s>>>(); });
    std::vector<double> host;
    for (int rep = 0; rep < reps; ++rep) {
      const auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < n; ++i)
        empty_kernel<<<1, 32, 0, s>>>();
      host.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() /
                     n);
      stream.synchronize();
    }
    MOP_CUDA_CHECK(cudaGetLastError());
    r.host_launch_s = median(host);
    say(strf("launch: %.2f us per kernel on the GPU, %.2f us per call on the host",
             1e6 * r.kernel_launch_s, 1e6 * r.host_launch_s));
  }

  // HBM: a copy over buffers 16 times the L2 (1 GiB each at least).
  {
    const std::size_t bytes = std::max<std::size_t>(
        std::size_t{1} << 30, static_cast<std::size_t>(16 * r.device.l2_bytes));
    DeviceBuffer a(bytes), b(bytes);
    a.zero();
    const std::size_t n = bytes / sizeof(uint4);
    const int blocks = 4 * r.device.sms;
    const double t = time_on_stream(stream.handle(), 2, reps, 1, [&] {
      copy_kernel<<<blocks, 512, 0, s>>>(static_cast<const uint4*>(a.data()),
                                         static_cast<uint4*>(b.data()), n);
    });
    MOP_CUDA_CHECK(cudaGetLastError());
    r.hbm_bytes_per_s = 2.0 * static_cast<double>(bytes) / t;
    say(strf("HBM: %.0f GB/s (copy, read + written)", 1e-9 * r.hbm_bytes_per_s));
  }

  // PCIe: pinned copies of 256 MiB, each direction alone, then both at once on two streams.
  {
    const std::size_t bytes = std::size_t{256} << 20;
    PinnedBuffer host_a(bytes), host_b(bytes);
    DeviceBuffer dev_a(bytes), dev_b(bytes);
    r.h2d_bytes_per_s =
        static_cast<double>(bytes) / time_on_stream(stream.handle(), 1, reps, 1, [&] {
          MOP_CUDA_CHECK(
              cudaMemcpyAsync(dev_a.data(), host_a.data(), bytes, cudaMemcpyHostToDevice, s));
        });
    r.d2h_bytes_per_s =
        static_cast<double>(bytes) / time_on_stream(stream.handle(), 1, reps, 1, [&] {
          MOP_CUDA_CHECK(
              cudaMemcpyAsync(host_b.data(), dev_b.data(), bytes, cudaMemcpyDeviceToHost, s));
        });
    Stream other;
    const auto s2 = static_cast<cudaStream_t>(other.handle());
    std::vector<double> both;
    for (int rep = 0; rep < reps; ++rep) {
      MOP_CUDA_CHECK(cudaDeviceSynchronize());
      const auto t0 = std::chrono::steady_clock::now();
      MOP_CUDA_CHECK(
          cudaMemcpyAsync(dev_a.data(), host_a.data(), bytes, cudaMemcpyHostToDevice, s));
      MOP_CUDA_CHECK(
          cudaMemcpyAsync(host_b.data(), dev_b.data(), bytes, cudaMemcpyDeviceToHost, s2));
      MOP_CUDA_CHECK(cudaDeviceSynchronize());
      both.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    const double one_way = 0.5 * (r.h2d_bytes_per_s + r.d2h_bytes_per_s);
    r.pcie_duplex_factor =
        std::clamp(2.0 * static_cast<double>(bytes) / median(both) / one_way, 1.0, 2.0);
    say(strf("PCIe (pinned): %.1f GB/s host to device, %.1f GB/s device to host, both at once "
             "%.2fx one direction",
             1e-9 * r.h2d_bytes_per_s, 1e-9 * r.d2h_bytes_per_s, r.pcie_duplex_factor));
  }

  // GEMM (BF16, FP32 accumulation). Rows m along fixed (n, k) — the shapes of projections in
  // transformer layers (hidden 4096 to 8192, FFN 14336 to 28672); weight gradients, k along fixed
  // (m, n); and skinny experts' shapes (DeepSeek-V3: hidden 7168, expert FFN 2048; Qwen3-30B:
  // 2048 and 768).
  {
    std::vector<Shape> shapes;
    const std::vector<int> rows = o.quick ? std::vector<int>{1024, 4096, 16384}
                                          : std::vector<int>{256, 1024, 2048, 4096, 8192, 16384};
    const std::vector<std::pair<int, int>> nk =
        o.quick ? std::vector<std::pair<int, int>>{{4096, 4096}, {14336, 4096}, {4096, 14336}}
                : std::vector<std::pair<int, int>>{{4096, 4096},  {6144, 4096}, {14336, 4096},
                                                   {4096, 14336}, {8192, 8192}, {28672, 8192},
                                                   {8192, 28672}, {4096, 7168}, {7168, 2048}};
    for (auto [n, k] : nk)
      for (int m : rows)
        shapes.push_back({m, n, k});
    const std::vector<int> tokens =
        o.quick ? std::vector<int>{4096, 16384} : std::vector<int>{2048, 4096, 8192, 16384, 32768};
    for (auto [m, n] : std::vector<std::pair<int, int>>{{4096, 4096}, {14336, 4096}, {8192, 8192}})
      for (int k : tokens)
        shapes.push_back({m, n, k});
    for (auto [n, k] : std::vector<std::pair<int, int>>{{2048, 7168}, {7168, 2048}, {768, 2048}})
      for (int m :
           o.quick ? std::vector<int>{128, 1024} : std::vector<int>{32, 128, 512, 1024, 4096})
        shapes.push_back({m, n, k});
    std::size_t a_max = 0, b_max = 0, c_max = 0;
    for (const Shape& sh : shapes) {
      a_max = std::max(a_max, std::size_t(sh.m) * std::size_t(sh.k));
      b_max = std::max(b_max, std::size_t(sh.k) * std::size_t(sh.n));
      c_max = std::max(c_max, std::size_t(sh.m) * std::size_t(sh.n));
    }
    DeviceBuffer a(2 * a_max), b(2 * b_max), c(2 * c_max);
    a.fill_random_bf16(1, 1.0f);
    b.fill_random_bf16(2, 0.02f);
    GemmRunner gemm(stream.handle());
    double best = 0;
    for (const Shape& sh : shapes) {
      const GemmShape g{sh.m, sh.n, sh.k, false, false, GemmType::bf16, false};
      const double flops = 2.0 * sh.m * sh.n * sh.k;
      const int inner = std::clamp(static_cast<int>(2e11 / flops), 1, 200);
      const double t = time_on_stream(stream.handle(), 3, reps, inner,
                                      [&] { gemm.run(g, a.data(), b.data(), c.data()); });
      r.gemm.push_back({1, sh.m, sh.n, sh.k, t});
      best = std::max(best, flops / t);
    }
    say(strf("GEMM (BF16): %zu shapes, best %.0f TFLOP/s", r.gemm.size(), 1e-12 * best));

    // Grouped: `experts` GEMMs of m rows each, one cuBLASLt call per expert spread over four
    // streams (TransformerEngine's default on Hopper), the whole set timed from the first stream.
    r.grouped_gemm_path = "cublaslt-per-expert-4-streams";
    std::vector<std::unique_ptr<Stream>> side;
    std::vector<std::unique_ptr<GemmRunner>> runners;
    for (int i = 0; i < 4; ++i) {
      side.push_back(std::make_unique<Stream>());
      runners.push_back(std::make_unique<GemmRunner>(side.back()->handle()));
    }
    cudaEvent_t fork = nullptr;
    std::vector<cudaEvent_t> joins(4, nullptr);
    MOP_CUDA_CHECK(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
    for (auto& e : joins)
      MOP_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    const std::vector<int> experts = o.quick ? std::vector<int>{8} : std::vector<int>{8, 32};
    const std::vector<int> per_expert =
        o.quick ? std::vector<int>{256, 1024} : std::vector<int>{64, 256, 1024, 4096};
    for (auto [n, k] : std::vector<std::pair<int, int>>{{2048, 7168}, {7168, 2048}}) {
      for (int e : experts)
        for (int m : per_expert) {
          const std::size_t a_bytes = 2 * std::size_t(e) * std::size_t(m) * std::size_t(k);
          const std::size_t b_bytes = 2 * std::size_t(e) * std::size_t(k) * std::size_t(n);
          const std::size_t c_bytes = 2 * std::size_t(e) * std::size_t(m) * std::size_t(n);
          DeviceBuffer ga(a_bytes), gb(b_bytes), gc(c_bytes);
          ga.fill_random_bf16(3, 1.0f);
          gb.fill_random_bf16(4, 0.02f);
          const GemmShape g{m, n, k, false, false, GemmType::bf16, false};
          auto body = [&] {
            MOP_CUDA_CHECK(cudaEventRecord(fork, s));
            for (int i = 0; i < 4; ++i)
              MOP_CUDA_CHECK(
                  cudaStreamWaitEvent(static_cast<cudaStream_t>(side[i]->handle()), fork));
            for (int x = 0; x < e; ++x) {
              const auto i = static_cast<std::size_t>(x % 4);
              runners[i]->run(g, static_cast<char*>(ga.data()) + 2 * std::size_t(x) * m * k,
                              static_cast<char*>(gb.data()) + 2 * std::size_t(x) * k * n,
                              static_cast<char*>(gc.data()) + 2 * std::size_t(x) * m * n);
            }
            for (int i = 0; i < 4; ++i) {
              MOP_CUDA_CHECK(
                  cudaEventRecord(joins[i], static_cast<cudaStream_t>(side[i]->handle())));
              MOP_CUDA_CHECK(cudaStreamWaitEvent(s, joins[i]));
            }
          };
          const double t = time_on_stream(stream.handle(), 3, reps, 5, body);
          r.gemm.push_back({e, m, n, k, t});
        }
    }
    cudaEventDestroy(fork);
    for (auto& ev : joins)
      cudaEventDestroy(ev);
    say(strf("grouped GEMM (BF16, %s): %zu shapes", r.grouped_gemm_path.c_str(),
             experts.size() * per_expert.size() * 2));
  }
  return r;
}

} // namespace mop::real::cuda
