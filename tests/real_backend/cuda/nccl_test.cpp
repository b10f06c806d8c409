// NCCL for the CUDA executor (real_backend/cuda/nccl.hpp). The bootstrap id needs no GPU and runs
// everywhere; the collectives run on a world of one process (one GPU can hold one rank of a
// communicator), where each has an exact answer: the data itself, or a copy.
#include "real_backend/cuda/nccl.hpp"

#include "real_backend/cuda/runtime.hpp"
#include "tests/real_backend/cuda/gpu.hpp"

#include <doctest/doctest.h>
#include <stdexcept>
#include <vector>

using namespace mop::real::cuda;

TEST_CASE("NCCL's bootstrap id encodes the meeting point, the same on every rank, without a GPU" *
          doctest::test_suite("plumbing")) {
  const auto a = nccl_unique_id("127.0.0.1:29555");
  const auto b = nccl_unique_id("127.0.0.1:29555");
  const auto c = nccl_unique_id("127.0.0.1:29556");
  CHECK(a.size() == 128);
  CHECK(a == b); // every rank derives the same id from the same address
  CHECK(a != c);
  CHECK_THROWS_AS(nccl_unique_id("not an address"), std::runtime_error);
}

TEST_CASE("NCCL collectives on a world of one: sums, gathers, exchanges and a split" *
          doctest::test_suite("plumbing")) {
  if (!mop::test::gpu_or_skip())
    return;
  NcclComm world = NcclComm::world("", 1, 0);
  CHECK(world.size() == 1);
  CHECK(world.rank() == 0);
  const NcclComm half = world.split(0, 0);
  CHECK(half.size() == 1);
  const std::vector<float> x{1, 2, 3, 4};
  DeviceBuffer a(16), b(16);
  a.upload(x.data(), 16);
  std::vector<float> got(4);
  world.all_reduce(a.data(), 4, NcclType::f32, false, nullptr);
  a.download(got.data(), 16);
  CHECK(got == x);
  world.all_gather(a.data(), b.data(), 4, NcclType::f32, nullptr);
  b.download(got.data(), 16);
  CHECK(got == x);
  b.zero();
  world.all_to_all_v(a.data(), {4}, b.data(), {4}, NcclType::f32, nullptr);
  b.download(got.data(), 16);
  CHECK(got == x);
  b.zero();
  half.send_recv_ring(a.data(), b.data(), 4, 1, NcclType::f32, nullptr);
  b.download(got.data(), 16);
  CHECK(got == x);
}
