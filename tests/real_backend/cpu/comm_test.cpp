#include "real_backend/cpu/comm.hpp"

#include <doctest/doctest.h>

#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace real_backend_cpu_comm_test {

using namespace mop::real;
using namespace std::chrono_literals;

namespace {

// The whole world as one group, for world rank `me`.
Comm everyone(World& w, int me) {
  std::vector<int> all;
  for (int r = 0; r < w.size(); ++r)
    all.push_back(r);
  return w.group(all, me);
}

std::size_t at(int i) {
  return static_cast<std::size_t>(i);
}

// Thrown by a test rank, to tell the original failure from the CommErrors it causes.
struct Boom : std::runtime_error {
  Boom() : std::runtime_error("boom on rank 1") {}
};

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

} // namespace

TEST_CASE("comm: all_reduce sums in place on 1 to 4 ranks" * doctest::test_suite("independent")) {
  for (int n = 1; n <= 4; ++n) {
    CAPTURE(n);
    std::vector<std::vector<double>> got(at(n));
    std::vector<std::vector<std::int64_t>> got_int(at(n));
    World::run(n, [&](World& w, int r) {
      const Comm c = everyone(w, r);
      std::vector<double> x{r + 1.0, -1.0 * r * r, 0.5 * r};
      c.all_reduce(x.data(), x.size());
      got[at(r)] = x;
      std::vector<std::int64_t> i{std::int64_t{1} << (40 + r), 1};
      c.all_reduce(i.data(), i.size());
      got_int[at(r)] = i;
    });
    // 1 + ... + n = n(n+1)/2; -(0² + ... + (n-1)²) = -(n-1)n(2n-1)/6; 0.5(0 + ... + n-1).
    const double m = n;
    const std::vector<double> expected{m * (m + 1) / 2, -(m - 1) * m * (2 * m - 1) / 6,
                                       0.5 * m * (m - 1) / 2};
    // 2^40 + ... + 2^(40+n-1) = 2^40 (2^n - 1), beyond 32 bits.
    const std::vector<std::int64_t> expected_int{(std::int64_t{1} << 40) * ((1 << n) - 1), n};
    for (int r = 0; r < n; ++r) {
      CHECK(got[at(r)] == expected);
      CHECK(got_int[at(r)] == expected_int);
    }
  }
}

TEST_CASE("comm: all_reduce_max takes the elementwise maximum on 1 to 4 ranks" *
          doctest::test_suite("independent")) {
  for (int n = 1; n <= 4; ++n) {
    CAPTURE(n);
    std::vector<std::vector<float>> got(at(n));
    World::run(n, [&](World& w, int r) {
      std::vector<float> x{static_cast<float>(r), static_cast<float>(-r), r == 1 ? 7.0f : -3.0f};
      everyone(w, r).all_reduce_max(x.data(), x.size());
      got[at(r)] = x;
    });
    // max r = n - 1; max -r = 0 (rank 0); 7 once rank 1 exists, else rank 0's -3.
    const std::vector<float> expected{n - 1.0f, 0.0f, n >= 2 ? 7.0f : -3.0f};
    for (int r = 0; r < n; ++r)
      CHECK(got[at(r)] == expected);
  }
}

TEST_CASE("comm: all_gather puts member r's block at offset r times n on 1 to 4 ranks" *
          doctest::test_suite("independent")) {
  for (int n = 1; n <= 4; ++n) {
    CAPTURE(n);
    std::vector<std::vector<std::int32_t>> got(at(n));
    World::run(n, [&](World& w, int r) {
      const std::vector<std::int32_t> send{r, 10 * r};
      std::vector<std::int32_t> recv(2 * at(n), -1);
      everyone(w, r).all_gather(send.data(), 2, recv.data());
      got[at(r)] = recv;
    });
    const std::vector<std::vector<std::int32_t>> expected{
        {0, 0}, {0, 0, 1, 10}, {0, 0, 1, 10, 2, 20}, {0, 0, 1, 10, 2, 20, 3, 30}};
    for (int r = 0; r < n; ++r)
      CHECK(got[at(r)] == expected[at(n - 1)]);
  }
}

TEST_CASE("comm: reduce_scatter gives member m the sum of every member's block m on 1 to 4 ranks" *
          doctest::test_suite("independent")) {
  for (int n = 1; n <= 4; ++n) {
    CAPTURE(n);
    std::vector<std::vector<double>> got(at(n));
    World::run(n, [&](World& w, int r) {
      // Block b of rank r: {r + 10 b, 1}.
      std::vector<double> send;
      for (int b = 0; b < n; ++b)
        send.insert(send.end(), {r + 10.0 * b, 1.0});
      std::vector<double> recv(2);
      everyone(w, r).reduce_scatter(send.data(), 2, recv.data());
      got[at(r)] = recv;
    });
    // Member m: sum over r of (r + 10 m) = n(n-1)/2 + 10 m n, and n ones.
    for (int m = 0; m < n; ++m)
      CHECK(got[at(m)] == std::vector<double>{n * (n - 1) / 2.0 + 10.0 * m * n, 1.0 * n});
  }
}

TEST_CASE("comm: all_to_all_v with uneven counts and zeros delivers blocks in member order" *
          doctest::test_suite("independent")) {
  // counts[from][to] on three ranks; element k of the block from f to t is 100 f + 10 t + k.
  const std::vector<std::vector<std::size_t>> counts{{1, 0, 2}, {3, 1, 0}, {0, 2, 1}};
  std::vector<std::vector<float>> got(3);
  World::run(3, [&](World& w, int f) {
    std::vector<float> send;
    std::vector<std::size_t> recv_counts;
    for (int t = 0; t < 3; ++t) {
      for (std::size_t k = 0; k < counts[at(f)][at(t)]; ++k)
        send.push_back(static_cast<float>(100 * f + 10 * t) + static_cast<float>(k));
      recv_counts.push_back(counts[at(t)][at(f)]);
    }
    std::vector<float> recv(recv_counts[0] + recv_counts[1] + recv_counts[2], -1.0f);
    everyone(w, f).all_to_all_v(send.data(), counts[at(f)], recv.data(), recv_counts);
    got[at(f)] = recv;
  });
  // Member 0 gets 1 from rank 0 and 3 from rank 1; member 1 gets 1 from 1 and 2 from 2;
  // member 2 gets 2 from 0 and 1 from 2.
  CHECK(got[0] == std::vector<float>{0, 100, 101, 102});
  CHECK(got[1] == std::vector<float>{110, 210, 211});
  CHECK(got[2] == std::vector<float>{20, 21, 220});
}

TEST_CASE("comm: all_to_all_v on 1 to 4 ranks sends every pair its own count" *
          doctest::test_suite("independent")) {
  for (int n = 1; n <= 4; ++n) {
    CAPTURE(n);
    // count(f, t) = (f + 2 t) mod 3: zeros, ones and twos.
    const auto count = [](int f, int t) { return static_cast<std::size_t>((f + 2 * t) % 3); };
    std::vector<std::vector<std::int64_t>> got(at(n));
    World::run(n, [&](World& w, int f) {
      std::vector<std::int64_t> send;
      std::vector<std::size_t> send_counts, recv_counts;
      for (int t = 0; t < n; ++t) {
        send_counts.push_back(count(f, t));
        recv_counts.push_back(count(t, f));
        for (std::size_t k = 0; k < count(f, t); ++k)
          send.push_back(100 * f + 10 * t + static_cast<std::int64_t>(k));
      }
      std::size_t total = 0;
      for (auto c : recv_counts)
        total += c;
      std::vector<std::int64_t> recv(total);
      everyone(w, f).all_to_all_v(send.data(), send_counts, recv.data(), recv_counts);
      got[at(f)] = recv;
    });
    for (int t = 0; t < n; ++t) {
      std::vector<std::int64_t> expected;
      for (int f = 0; f < n; ++f)
        for (std::size_t k = 0; k < count(f, t); ++k)
          expected.push_back(100 * f + 10 * t + static_cast<std::int64_t>(k));
      CHECK(got[at(t)] == expected);
    }
  }
}

TEST_CASE("comm: send_recv_ring receives from the member shift places before on 1 to 4 ranks" *
          doctest::test_suite("independent")) {
  for (int n = 1; n <= 4; ++n) {
    for (int shift : {1, -1, 2, 5}) {
      CAPTURE(n);
      CAPTURE(shift);
      std::vector<std::vector<double>> got(at(n));
      World::run(n, [&](World& w, int r) {
        const std::vector<double> send{100.0 * r, 1.0};
        std::vector<double> recv(2, -1.0);
        everyone(w, r).send_recv_ring(send.data(), recv.data(), 2, shift);
        got[at(r)] = recv;
      });
      for (int r = 0; r < n; ++r) {
        const int from = ((r - shift) % n + n) % n;
        CHECK(got[at(r)] == std::vector<double>{100.0 * from, 1.0});
      }
    }
  }
}

TEST_CASE("comm: in-place all_gather and reduce_scatter give the out-of-place results" *
          doctest::test_suite("independent")) {
  std::vector<std::vector<float>> gathered(3), scattered(3);
  World::run(3, [&](World& w, int r) {
    const Comm c = everyone(w, r);
    std::vector<float> buf(6, -1.0f);
    buf[2 * at(r)] = static_cast<float>(r);
    buf[2 * at(r) + 1] = 10.0f * static_cast<float>(r);
    c.all_gather(buf.data() + 2 * at(r), 2, buf.data());
    gathered[at(r)] = buf;
    // Block b of rank r is {b, r}; member m gets {3 m, 0 + 1 + 2}, written over its own block.
    std::vector<float> blocks;
    for (int b = 0; b < 3; ++b)
      blocks.insert(blocks.end(), {float(b), float(r)});
    c.reduce_scatter(blocks.data(), 2, blocks.data() + 2 * at(r));
    scattered[at(r)] = {blocks[2 * at(r)], blocks[2 * at(r) + 1]};
  });
  for (int r = 0; r < 3; ++r) {
    CHECK(gathered[at(r)] == std::vector<float>{0, 0, 1, 10, 2, 20});
    CHECK(scattered[at(r)] == std::vector<float>{3.0f * float(r), 3.0f});
  }
}

TEST_CASE("comm: float sums are bit-identical across runs whatever the arrival order" *
          doctest::test_suite("plumbing")) {
  constexpr int n = 4;
  constexpr std::size_t len = 512;
  // Magnitudes from 1e-3 to 1e6 with both signs, so the order of the additions changes the
  // rounded result.
  std::mt19937 gen(12345);
  std::uniform_real_distribution<float> mantissa(-1.0f, 1.0f);
  std::uniform_int_distribution<int> exponent(-3, 6);
  std::vector<std::vector<float>> data(n, std::vector<float>(len));
  for (auto& d : data)
    for (auto& x : d)
      x = mantissa(gen) * std::pow(10.0f, static_cast<float>(exponent(gen)));
  // The sum in rank order 0, 1, 2, 3, computed here one rank at a time.
  std::vector<float> expected = data[0], reversed = data[3];
  for (int r = 1; r < n; ++r)
    for (std::size_t i = 0; i < len; ++i)
      expected[i] += data[at(r)][i];
  for (int r = n - 2; r >= 0; --r)
    for (std::size_t i = 0; i < len; ++i)
      reversed[i] += data[at(r)][i];
  REQUIRE(expected != reversed); // otherwise the test could not see an order dependence

  const auto bits = [](const std::vector<float>& v) {
    std::vector<std::uint32_t> b;
    for (float x : v)
      b.push_back(std::bit_cast<std::uint32_t>(x));
    return b;
  };
  for (int run = 0; run < 8; ++run) {
    CAPTURE(run);
    std::vector<std::vector<float>> reduced(n), scattered(n);
    World::run(n, [&](World& w, int r) {
      std::mt19937 delay(static_cast<unsigned>(run * n + r));
      const auto nap = [&] {
        std::this_thread::sleep_for(std::chrono::microseconds(delay() % 1500));
      };
      const Comm c = everyone(w, r);
      std::vector<float> x = data[at(r)];
      nap();
      c.all_reduce(x.data(), len);
      reduced[at(r)] = x;
      // Every member sends the whole vector split into n blocks; block m is summed on member m.
      std::vector<float> part(len / n);
      nap();
      c.reduce_scatter(data[at(r)].data(), len / n, part.data());
      scattered[at(r)] = part;
    });
    for (int r = 0; r < n; ++r) {
      CHECK(bits(reduced[at(r)]) == bits(expected));
      const std::vector<float> block(expected.begin() + static_cast<std::ptrdiff_t>(r * len / n),
                                     expected.begin() +
                                         static_cast<std::ptrdiff_t>((r + 1) * len / n));
      CHECK(bits(scattered[at(r)]) == bits(block));
    }
  }
}

TEST_CASE("comm: two disjoint subgroups run concurrently without mixing their calls" *
          doctest::test_suite("plumbing")) {
  std::vector<std::vector<double>> got(4);
  World::run(4, [&](World& w, int r) {
    // Listed out of order: in group [3, 2] world rank 3 is group rank 0.
    const Comm c = r < 2 ? w.group({0, 1}, r) : w.group({3, 2}, r);
    std::vector<double> sums;
    for (int i = 0; i < 50; ++i) {
      double x = r + 1.0 + i;
      c.all_reduce(&x, 1);
      sums.push_back(x);
    }
    std::vector<double> ranks(2);
    const double mine = c.rank();
    c.all_gather(&mine, 1, ranks.data());
    sums.insert(sums.end(), ranks.begin(), ranks.end());
    got[at(r)] = sums;
  });
  // Call i: (1 + i) + (2 + i) = 3 + 2i on [0, 1]; (3 + i) + (4 + i) = 7 + 2i on [3, 2].
  for (int r = 0; r < 4; ++r) {
    CAPTURE(r);
    REQUIRE(got[at(r)].size() == 52);
    for (int i = 0; i < 50; ++i)
      CHECK(got[at(r)][at(i)] == (r < 2 ? 3 : 7) + 2.0 * i);
    CHECK(got[at(r)][50] == 0.0);
    CHECK(got[at(r)][51] == 1.0);
  }
}

TEST_CASE("comm: each rank of a 2x2 grid uses its row group and its column group" *
          doctest::test_suite("plumbing")) {
  // World rank r sits at row r / 2, column r % 2.
  std::vector<std::vector<std::int32_t>> got(4);
  World::run(4, [&](World& w, int r) {
    const int row = r / 2, col = r % 2;
    const Comm rows = w.group({2 * row, 2 * row + 1}, r);
    const Comm cols = w.group({col, col + 2}, r);
    std::vector<std::int32_t> out{rows.rank(), cols.rank()};
    for (int i = 0; i < 20; ++i) {
      std::int32_t x = r + 1;
      rows.all_reduce(&x, 1);
      cols.all_reduce(&x, 1);
      out.push_back(x);
    }
    std::int32_t gathered[2];
    const std::int32_t mine = 10 * r;
    cols.all_gather(&mine, 1, gathered);
    out.insert(out.end(), {gathered[0], gathered[1]});
    got[at(r)] = out;
  });
  // Group ranks are the column in a row and the row in a column. Rows: 1 + 2 = 3 and
  // 3 + 4 = 7; then columns: 3 + 7 = 10 everywhere.
  for (int r = 0; r < 4; ++r) {
    std::vector<std::int32_t> expected{r % 2, r / 2};
    expected.insert(expected.end(), 20, 10);
    expected.insert(expected.end(), {10 * (r % 2), 10 * (r % 2 + 2)});
    CHECK(got[at(r)] == expected);
  }
}

TEST_CASE("comm: pipeline send and recv deliver messages in FIFO order" *
          doctest::test_suite("plumbing")) {
  // Stage 0 sends five messages of growing length to stage 1, which adds 100 and forwards them
  // to stage 2.
  std::vector<std::vector<double>> received;
  World::run(3, [&](World& w, int r) {
    for (int i = 0; i < 5; ++i) {
      const auto len = at(i + 1);
      std::vector<double> msg(len, static_cast<double>(i));
      if (r == 0) {
        w.send(0, 1, msg.data(), len);
      } else if (r == 1) {
        w.recv(1, 0, msg.data(), len);
        for (auto& x : msg)
          x += 100;
        w.send(1, 2, msg.data(), len);
      } else {
        w.recv(2, 1, msg.data(), len);
        received.push_back(msg);
      }
    }
  });
  REQUIRE(received.size() == 5);
  for (int i = 0; i < 5; ++i)
    CHECK(received[at(i)] == std::vector<double>(at(i + 1), 100.0 + i));
}

TEST_CASE("comm: recv checks the size and element type of the message" *
          doctest::test_suite("plumbing")) {
  World w(2);
  const float three[3] = {1, 2, 3};
  float two[2];
  w.send(0, 1, three, 3);
  CHECK_THROWS_WITH_AS(w.recv(1, 0, two, 2),
                       "rank 1 expected 2 float from rank 0 but the next message holds 3 float",
                       CommError);
  const double one = 1;
  w.send(0, 1, &one, 1);
  CHECK_THROWS_AS(w.recv(1, 0, two, 1), CommError);
}

TEST_CASE("comm: a rank that throws makes run rethrow its exception and the others stop" *
          doctest::test_suite("plumbing")) {
  std::vector<std::string> others(3);
  const auto t0 = std::chrono::steady_clock::now();
  CHECK_THROWS_AS(World::run(3,
                             [&](World& w, int r) {
                               const Comm c = everyone(w, r);
                               if (r == 1) {
                                 std::this_thread::sleep_for(20ms); // let the others start waiting
                                 throw Boom();
                               }
                               try {
                                 double x = 1;
                                 c.all_reduce(&x, 1);
                               } catch (const CommError& e) {
                                 others[at(r)] = e.what();
                                 throw;
                               }
                             }),
                  Boom);
  // The abort woke them.
  CHECK(seconds_since(t0) < 2.0);
  CHECK(others[0] == "rank 1 failed: boom on rank 1");
  CHECK(others[2] == "rank 1 failed: boom on rank 1");
}

TEST_CASE("comm: a rank that skips a collective is reported as a deadlock at once" *
          doctest::test_suite("plumbing")) {
  const auto t0 = std::chrono::steady_clock::now();
  CHECK_THROWS_WITH_AS(World::run(2,
                                  [](World& w, int r) {
                                    const Comm c = everyone(w, r);
                                    float x = 1, both[2];
                                    c.all_reduce(&x, 1);
                                    if (r == 0)
                                      c.all_gather(&x, 1, both); // rank 1 never calls it
                                  }),
                       "deadlock: every rank still running waits for a call that no other rank "
                       "will make (world rank 0 waits in all_gather (call 2) on group [0, 1]; "
                       "world rank 1 has finished)",
                       CommError);
  // No clock decides: the deadlock is known the moment rank 1 finishes.
  CHECK(seconds_since(t0) < 1.0);
}

TEST_CASE("comm: a recv with no matching send is reported as a deadlock" *
          doctest::test_suite("plumbing")) {
  CHECK_THROWS_WITH_AS(World::run(2,
                                  [](World& w, int r) {
                                    float x = 0;
                                    if (r == 1)
                                      w.recv(1, 0, &x, 1);
                                  }),
                       "deadlock: every rank still running waits for a call that no other rank "
                       "will make (world rank 0 has finished; world rank 1 waits in recv from "
                       "rank 0)",
                       CommError);
}

TEST_CASE("comm: ranks waiting on each other in different groups are a deadlock" *
          doctest::test_suite("plumbing")) {
  // Rank 0 waits for rank 1 in group [0, 1]; rank 1 waits for rank 2 in [1, 2]; rank 2 waits
  // for rank 0 in [0, 2]: a cycle, with nobody finished.
  const auto t0 = std::chrono::steady_clock::now();
  std::string what;
  try {
    World::run(3, [](World& w, int r) {
      const std::vector<int> mine = r == 0   ? std::vector<int>{0, 1}
                                    : r == 1 ? std::vector<int>{1, 2}
                                             : std::vector<int>{0, 2};
      w.group(mine, r).barrier();
    });
  } catch (const CommError& e) {
    what = e.what();
  }
  CHECK(what == "deadlock: every rank still running waits for a call that no other rank will "
                "make (world rank 0 waits in barrier (call 1) on group [0, 1]; world rank 1 "
                "waits in barrier (call 1) on group [1, 2]; world rank 2 waits in barrier (call "
                "1) on group [0, 2])");
  CHECK(seconds_since(t0) < 1.0);
}

TEST_CASE("comm: a rank that computes for long while the others wait is not a deadlock" *
          doctest::test_suite("plumbing")) {
  // The collectives used to give up after a fixed wait; a slow rank is never a deadlock however
  // long it computes. Three ranks wait in all_reduce and in a pipeline recv while rank 3 sleeps.
  std::vector<double> sums(4);
  float received = 0;
  World::run(4, [&](World& w, int r) {
    if (r == 3) {
      std::this_thread::sleep_for(400ms);
      const float x = 42;
      w.send(3, 2, &x, 1);
    }
    if (r == 2)
      w.recv(2, 3, &received, 1);
    double x = r + 1;
    everyone(w, r).all_reduce(&x, 1);
    sums[at(r)] = x;
  });
  for (double s : sums)
    CHECK(s == 10); // 1 + 2 + 3 + 4
  CHECK(received == 42);
}

TEST_CASE("comm: a size mismatch throws the same sentence on every member" *
          doctest::test_suite("plumbing")) {
  std::vector<std::string> errors(3);
  World::run(3, [&](World& w, int r) {
    std::vector<float> x(r == 2 ? 3 : 2, 1.0f);
    try {
      everyone(w, r).all_reduce(x.data(), x.size());
    } catch (const CommError& e) {
      errors[at(r)] = e.what();
    }
  });
  for (const auto& e : errors)
    CHECK(e == "mismatched collectives at call 1 on group [0, 1, 2]: group rank 0 called "
               "all_reduce of 2 float but group rank 2 called all_reduce of 3 float");
}

TEST_CASE("comm: different collectives or counts at the same call throw on every member" *
          doctest::test_suite("plumbing")) {
  std::vector<std::string> kinds(2), counts(2);
  World::run(2, [&](World& w, int r) {
    const Comm c = w.group({0, 1}, r);
    double x[2] = {1, 2}, y[2] = {0, 0};
    try {
      if (r == 0)
        c.all_reduce(x, 1);
      else
        c.all_gather(x, 1, y);
    } catch (const CommError& e) {
      kinds[at(r)] = e.what();
    }
    // Rank 0 expects 2 elements from rank 1, which sends it 1.
    const std::vector<std::size_t> send_counts =
        r == 0 ? std::vector<std::size_t>{0, 1} : std::vector<std::size_t>{1, 0};
    const std::vector<std::size_t> recv_counts =
        r == 0 ? std::vector<std::size_t>{0, 2} : std::vector<std::size_t>{1, 0};
    try {
      c.all_to_all_v(x, send_counts, y, recv_counts);
    } catch (const CommError& e) {
      counts[at(r)] = e.what();
    }
    c.barrier(); // the group still works after a mismatch
  });
  for (int r = 0; r < 2; ++r) {
    CHECK(kinds[at(r)] == "mismatched collectives at call 1 on group [0, 1]: group rank 0 called "
                          "all_reduce of 1 double but group rank 1 called all_gather of 1 double");
    CHECK(counts[at(r)] == "all_to_all_v at call 2 on group [0, 1]: group rank 0 expects 2 "
                           "elements from group rank 1, which sends it 1");
  }
}

TEST_CASE("comm: abort makes a waiting call and every later call throw its reason" *
          doctest::test_suite("plumbing")) {
  World w(2);
  std::string waiting;
  std::thread t([&] {
    float x = 0;
    try {
      w.recv(1, 0, &x, 1);
    } catch (const CommError& e) {
      waiting = e.what();
    }
  });
  std::this_thread::sleep_for(10ms);
  w.abort("stopped by the test");
  t.join();
  CHECK(waiting == "stopped by the test");
  float x = 0;
  CHECK_THROWS_WITH_AS(w.send(0, 1, &x, 1), "stopped by the test", CommError);
  CHECK_THROWS_WITH_AS(w.group({0}, 0), "stopped by the test", CommError);
}

TEST_CASE("comm: group checks its members and numbers them in list order" *
          doctest::test_suite("plumbing")) {
  World w(3);
  CHECK_THROWS_WITH_AS(w.group({}, 0), "a group needs at least one member", std::invalid_argument);
  CHECK_THROWS_WITH_AS(w.group({0, 3}, 0),
                       "group [0, 3] names rank 3, but the world has ranks 0 to 2",
                       std::invalid_argument);
  CHECK_THROWS_WITH_AS(w.group({1, 0, 1}, 0), "group [1, 0, 1] names rank 1 twice",
                       std::invalid_argument);
  CHECK_THROWS_WITH_AS(w.group({0, 1}, 2),
                       "world rank 2 asked for group [0, 1], which it is not a member of",
                       std::invalid_argument);
  const Comm c = w.group({2, 0}, 0);
  CHECK(c.rank() == 1);
  CHECK(c.size() == 2);
  CHECK(c.members() == std::vector<int>{2, 0});
  // A group of one: every collective returns its own input.
  const Comm solo = w.group({1}, 1);
  double x = 4;
  solo.all_reduce(&x, 1);
  double y = 0;
  solo.all_gather(&x, 1, &y);
  solo.barrier();
  CHECK(x == 4);
  CHECK(y == 4);
  CHECK_THROWS_AS(Comm{}.barrier(), CommError);
}

} // namespace real_backend_cpu_comm_test
