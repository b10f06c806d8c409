#include "real_backend/cpu/host_measure.hpp"

#include "real_backend/cpu/kernels.hpp"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <stdexcept>
#include <thread>
#include <vector>

namespace mop::real {

namespace {

// The median over `reps` passes of fn(lo, hi) run by `threads` threads on [0, n) split evenly,
// after one untimed pass (first touch of the pages).
template <class F> double median_pass_s(std::size_t n, int threads, int reps, F fn) {
  if (threads < 1 || reps < 1 || n == 0)
    throw std::invalid_argument("a host measurement needs threads, passes and elements");
  auto pass = [&] {
    std::vector<std::thread> pool;
    const auto t = static_cast<std::size_t>(threads);
    for (std::size_t i = 0; i < t; ++i)
      pool.emplace_back([&, i] { fn(n * i / t, n * (i + 1) / t); });
    for (auto& th : pool)
      th.join();
  };
  pass();
  std::vector<double> s;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    pass();
    s.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(s.begin(), s.end());
  return s[s.size() / 2];
}

} // namespace

double measure_host_adam_params_per_s(std::size_t params, int threads, int reps) {
  std::vector<float> p(params, 0.5f), g(params, 1e-3f), m(params, 0.0f), v(params, 0.0f);
  AdamWParams a;
  std::int64_t step = 1;
  const double t = median_pass_s(params, threads, reps, [&](std::size_t lo, std::size_t hi) {
    adamw<float>(hi - lo, a, step, p.data() + lo, g.data() + lo, m.data() + lo, v.data() + lo);
  });
  return static_cast<double>(params) / t;
}

double measure_host_copy_bytes_per_s(std::size_t bytes, int threads, int reps) {
  std::vector<char> a(bytes, 1), b(bytes, 0);
  const double t = median_pass_s(bytes, threads, reps, [&](std::size_t lo, std::size_t hi) {
    std::memcpy(b.data() + lo, a.data() + lo, hi - lo);
  });
  return 2.0 * static_cast<double>(bytes) / t;
}

} // namespace mop::real
