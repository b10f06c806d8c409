// The host AdamW variants against the plain loop (real_backend/cpu/host_adam.hpp): every
// instruction set this processor runs gives the scalar loop's bits exactly, over lengths with
// vector tails and several steps, and the float real::adamw is the host AdamW.
#include "real_backend/cpu/host_adam.hpp"

#include "real_backend/cpu/kernels.hpp"
#include "real_backend/cpu/tiny_model.hpp"

#include <cstring>
#include <doctest/doctest.h>
#include <vector>

namespace real_backend_cpu_host_adam_test {

using namespace mop::real;

namespace {

struct State {
  std::vector<float> p, g, m, v;
};

State random_state(std::size_t n, std::uint64_t seed) {
  State s{std::vector<float>(n), std::vector<float>(n), std::vector<float>(n, 0.0f),
          std::vector<float>(n, 0.0f)};
  for (std::size_t i = 0; i < n; ++i) {
    s.p[i] = static_cast<float>(standard_normal(mix64(seed) + i));
    s.g[i] = static_cast<float>(1e-2 * standard_normal(mix64(seed + 1) + i));
  }
  return s;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

} // namespace

TEST_CASE("host AdamW: every instruction set gives the scalar loop's bits" *
          doctest::test_suite("independent")) {
  AdamWParams a;
  a.lr = 3e-3;
  for (const HostIsa isa : {HostIsa::avx2, HostIsa::avx512}) {
    if (!host_runs(isa))
      continue;
    CAPTURE(host_isa_name(isa));
    for (const std::size_t n : {0u, 1u, 7u, 15u, 17u, 1000u, 4099u})
      for (const std::size_t off : {0u, 3u}) { // the aligned head varies with the start
        CAPTURE(n);
        CAPTURE(off);
        State want = random_state(n + off, 11), got = want;
        for (std::int64_t step = 1; step <= 3; ++step) {
          host_adamw_with(HostIsa::scalar, n, a, step, want.p.data() + off, want.g.data() + off,
                          want.m.data() + off, want.v.data() + off);
          host_adamw_with(isa, n, a, step, got.p.data() + off, got.g.data() + off,
                          got.m.data() + off, got.v.data() + off);
        }
        CHECK(same_bits(got.p, want.p));
        CHECK(same_bits(got.m, want.m));
        CHECK(same_bits(got.v, want.v));
      }
  }
  // The float instance of real::adamw is the host AdamW.
  State x = random_state(333, 5), y = x;
  adamw<float>(333, a, 4, x.p.data(), x.g.data(), x.m.data(), x.v.data());
  host_adamw(333, a, 4, y.p.data(), y.g.data(), y.m.data(), y.v.data());
  CHECK(same_bits(x.p, y.p));
  CHECK(host_runs(HostIsa::scalar));
  CHECK(host_runs(host_adamw_isa()));
}

} // namespace real_backend_cpu_host_adam_test
