// The program interpreter on the CUDA backend (real_backend/cuda/backend.hpp) against the same
// interpreter on the CPU backend: the same Schedule, start and data; ranks as threads sharing
// the GPU. Without a GPU each test is skipped.
//
// Tolerance. Both run float32 with the same op order; they differ by cuBLASLt's and OpenBLAS's
// summation orders inside GEMMs and the kernels' fused multiply-adds (kernels_test.cpp), a few
// units of float roundoff per op that grow over a two-step run through AdamW: losses within
// 1e-5 relative and parameters within 1e-4 (norm-wise per tensor) leave a wide margin, while a
// wrong routing, mask or reduction moves them by 1e-2 and more.
#include "real_backend/cuda/backend.hpp"

#include "real_backend/cpu/interpreter.hpp"
#include "real_backend/cpu/socket_world.hpp"
#include "real_backend/cuda/nccl_world.hpp"
#include "tests/real_backend/cuda/gpu.hpp"
#include "tests/support/program_case.hpp"

#include <cstdlib>
#include <doctest/doctest.h>

using mop::strategy::Plan;
using mop::test::make_case;
using namespace mop::real;

namespace {

bool backend_loaded() {
  ::setenv("MOP_CUDA_LIBRARY", MOP_CUDA_LIBRARY_PATH, 0);
  std::string why;
  const bool ok = cuda::load_api(why) != nullptr;
  if (!ok)
    FAIL_CHECK("the CUDA backend did not load: " << why);
  return ok;
}

void expect_same_on_gpu(const mop::test::Case& k) {
  const DataSource data = DataSource::synthetic(k.config.vocab, 3);
  RunOptions o;
  o.steps = 2;
  const TrainState<float> start = initial_state<float>(k.config, 7);
  const RunResult<float> cpu = interpret<float>(k.schedule, k.config, data, start, o);
  const RunResult<float> gpu = cuda::interpret(k.schedule, k.config, data, start, o);
  REQUIRE(gpu.losses.size() == cpu.losses.size());
  for (std::size_t s = 0; s < cpu.losses.size(); ++s)
    CHECK(std::abs(gpu.losses[s] - cpu.losses[s]) <= 1e-5 * std::abs(cpu.losses[s]));
  CHECK(max_rel_diff(gpu.state.params, cpu.state.params) <= 1e-4);
  CHECK(gpu.ops.size() == cpu.ops.size());
}

} // namespace

TEST_CASE("the CUDA interpreter trains as the CPU interpreter: one rank, data and tensor "
          "parallelism, experts and a ring" *
          doctest::test_suite("independent")) {
  if (!mop::test::gpu_or_skip() || !backend_loaded())
    return;
  cuda::select_device(0);
  expect_same_on_gpu(make_case("tiny-dense", 1, 2, 16, [](Plan&) {}));
  expect_same_on_gpu(make_case("tiny-dense", 2, 4, 16, [](Plan& p) {
    for (auto& s : p.state)
      s.zero = 3;
  }));
  expect_same_on_gpu(make_case("tiny-dense", 2, 2, 16, [](Plan& p) {
    p.attention.tp = 2;
    p.dense.tp = 2;
    p.embed.tp = 2;
  }));
  expect_same_on_gpu(make_case("tiny-moe", 2, 4, 16, [](Plan& p) { p.moe.ep = 2; }));
  expect_same_on_gpu(make_case("tiny-dense", 2, 2, 16, [](Plan& p) { p.attention.cp = 2; }));
}

TEST_CASE("the CUDA interpreter in a world of processes over NCCL: a world of one trains as "
          "ranks as threads, and its collectives take host and managed buffers" *
          doctest::test_suite("independent")) {
  if (!mop::test::gpu_or_skip() || !backend_loaded())
    return;
  cuda::select_device(0);
  // The collectives on a host vector (staged through the device) and on managed memory.
  World w(cuda::nccl_world(socket_world("", 1, 0)));
  w.prepare({{0}, {0}});
  const Comm c = w.group({0}, 0);
  std::vector<double> host{1.5, -2, 3};
  c.all_reduce(host.data(), host.size());
  CHECK(host == std::vector<double>{1.5, -2, 3});
  std::vector<std::int64_t> gathered(2, 0);
  gathered[0] = 41;
  c.all_gather(gathered.data(), 1, gathered.data());
  CHECK(gathered[0] == 41);
  c.barrier();
  // The interpreter over that world: the same run as its rank as a thread.
  const auto k = make_case("tiny-moe", 1, 2, 16, [](Plan&) {});
  const DataSource data = DataSource::synthetic(k.config.vocab, 3);
  RunOptions o;
  o.steps = 2;
  const TrainState<float> start = initial_state<float>(k.config, 7);
  const RunResult<float> threads = cuda::interpret(k.schedule, k.config, data, start, o);
  World one(cuda::nccl_world(socket_world("", 1, 0)));
  const RunResult<float> process = cuda::interpret(k.schedule, k.config, data, start, o, &one);
  // The same kernels on the same GPU; only atomics' order may differ between the two runs.
  REQUIRE(process.losses.size() == threads.losses.size());
  for (std::size_t s = 0; s < threads.losses.size(); ++s)
    CHECK(std::abs(process.losses[s] - threads.losses[s]) <= 1e-6 * std::abs(threads.losses[s]));
  CHECK(max_rel_diff(process.state.params, threads.state.params) <= 1e-5);
}
