// The world of processes over TCP (real_backend/cpu/socket_world.hpp). Each "process" here is a
// thread with its own socket world, meeting on a loopback port: the transport, its failure
// sentences and the interpreter over it are checked against the in-process world's results,
// bit for bit.
#include "real_backend/cpu/socket_world.hpp"

#include "common/error.hpp"
#include "real_backend/launch/launch.hpp"
#include "tests/support/program_case.hpp"

#include <doctest/doctest.h>

#include <chrono>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace real_backend_cpu_socket_world_test {

using namespace mop::real;
using mop::strategy::Plan;
using mop::test::make_case;

namespace {

std::size_t at(int i) {
  return static_cast<std::size_t>(i);
}

SocketWorldOptions quick() {
  SocketWorldOptions o;
  o.connect_timeout_s = 30;
  o.call_timeout_s = 30;
  return o;
}

// Runs fn(world, rank) for `n` ranks, each a thread with its own socket world meeting at one
// free loopback port. Returns each rank's exception message ("" when it returned).
std::vector<std::string> run_processes(int n, const std::function<void(World&, int)>& fn,
                                       SocketWorldOptions o = quick()) {
  const std::string rv = "127.0.0.1:" + std::to_string(free_local_port());
  std::vector<std::string> errors(at(n));
  std::vector<std::thread> ts;
  for (int r = 0; r < n; ++r)
    ts.emplace_back([&, r] {
      try {
        World w(socket_world(rv, n, r, o));
        fn(w, r);
      } catch (const std::exception& e) {
        errors[at(r)] = e.what();
      }
    });
  for (auto& t : ts)
    t.join();
  return errors;
}

std::vector<int> everyone(int n) {
  std::vector<int> v;
  for (int r = 0; r < n; ++r)
    v.push_back(r);
  return v;
}

// Every collective on one rank's data, through whichever world it is given.
std::vector<double> exercise(World& w, int r) {
  const int n = w.size();
  const Comm all = w.group(everyone(n), r);
  std::vector<double> out;
  std::vector<double> x{0.1 * (r + 1), 1e-17 * r, -3.0 / (r + 1)};
  all.all_reduce(x.data(), x.size());
  out.insert(out.end(), x.begin(), x.end());
  std::vector<float> m{static_cast<float>(r), -static_cast<float>(r)};
  all.all_reduce_max(m.data(), m.size());
  out.insert(out.end(), m.begin(), m.end());
  std::vector<std::int64_t> g(at(2 * n), 0);
  g[at(2 * r)] = r * 10;
  g[at(2 * r + 1)] = r * 10 + 1;
  all.all_gather(g.data() + 2 * r, 2, g.data()); // in place
  out.insert(out.end(), g.begin(), g.end());
  std::vector<double> rs(at(n), 0.25 * r);
  for (int k = 0; k < n; ++k)
    rs[at(k)] += k;
  double mine = 0;
  all.reduce_scatter(rs.data(), 1, &mine);
  out.push_back(mine);
  // all_to_all_v: rank r sends k + r elements to rank k (values 100 r + k).
  std::vector<std::size_t> sc, rc;
  std::vector<std::int32_t> send, recv;
  for (int k = 0; k < n; ++k) {
    sc.push_back(at(k + r));
    rc.push_back(at(r + k));
    for (int i = 0; i < k + r; ++i)
      send.push_back(100 * r + k);
  }
  std::size_t total = 0;
  for (auto c : rc)
    total += c;
  recv.assign(total, -1);
  all.all_to_all_v(send.data(), sc, recv.data(), rc);
  out.insert(out.end(), recv.begin(), recv.end());
  double ring = -1;
  const double me = r;
  all.send_recv_ring(&me, &ring, 1, 1);
  out.push_back(ring);
  // A pair group and a pipeline exchange where both sides send first.
  if (n >= 2 && r < 2) {
    const Comm pair = w.group({1, 0}, r);
    double v = 1.5 + r;
    pair.all_reduce(&v, 1);
    out.push_back(v);
    const double mine_p = 7.0 + r;
    double theirs = 0;
    w.send(r, 1 - r, &mine_p, 1);
    w.send(r, 1 - r, &mine_p, 1);
    w.recv(r, 1 - r, &theirs, 1);
    w.recv(r, 1 - r, &theirs, 1);
    out.push_back(theirs);
  }
  all.barrier();
  return out;
}

} // namespace

TEST_CASE("socket world: every collective gives the in-process world's bits on 1 to 4 ranks" *
          doctest::test_suite("independent")) {
  for (int n = 1; n <= 4; ++n) {
    CAPTURE(n);
    std::vector<std::vector<double>> threads(at(n)), processes(at(n));
    World::run(n, [&](World& w, int r) { threads[at(r)] = exercise(w, r); });
    const auto errors =
        run_processes(n, [&](World& w, int r) { processes[at(r)] = exercise(w, r); });
    for (int r = 0; r < n; ++r) {
      CAPTURE(r);
      CHECK(errors[at(r)] == "");
      CHECK(processes[at(r)] == threads[at(r)]);
    }
  }
}

TEST_CASE("socket world: mismatched calls fail on both sides with one sentence" *
          doctest::test_suite("independent")) {
  const auto errors = run_processes(2, [](World& w, int r) {
    const Comm all = w.group({0, 1}, r);
    std::vector<double> x(at(4 + r), 1.0);
    all.all_reduce(x.data(), x.size());
  });
  CHECK(errors[0].find("mismatched calls on group [0, 1]") != std::string::npos);
  CHECK(errors[1].find("mismatched calls on group [0, 1]") != std::string::npos);
}

TEST_CASE("socket world: a failing rank ends its peers' waits with its reason, not a timeout" *
          doctest::test_suite("independent")) {
  // The peers' sentence is the failing rank's, not the timeout's ("waited ... sent nothing").
  const auto errors = run_processes(3, [](World& w, int r) {
    const Comm all = w.group({0, 1, 2}, r);
    if (r == 1) {
      w.abort("rank 1 failed: out of memory");
      return;
    }
    all.barrier();
  });
  CHECK(errors[0] == "rank 1 failed: out of memory");
  CHECK(errors[2] == "rank 1 failed: out of memory");
}

TEST_CASE("socket world: a wait for a rank that finished fails at once, one for a silent rank at "
          "the timeout" *
          doctest::test_suite("independent")) {
  auto errors = run_processes(2, [](World& w, int r) {
    if (r == 0)
      w.group({0, 1}, r).barrier();
  });
  CHECK(errors[0] == "rank 0 waits in barrier on group [0, 1] for rank 1, which has finished: "
                     "were the ranks started with different arguments?");
  CHECK(errors[1] == "");
  // Rank 1 lives on without calling: rank 0's barrier ends at its timeout.
  SocketWorldOptions o = quick();
  o.call_timeout_s = 0.3;
  errors = run_processes(
      2,
      [](World& w, int r) {
        if (r == 0)
          w.group({0, 1}, r).barrier();
        else
          std::this_thread::sleep_for(std::chrono::milliseconds(1500));
      },
      o);
  CHECK(errors[0] == "rank 0 waited 0.3 s in barrier on group [0, 1] for rank 1, which sent "
                     "nothing: a deadlock or a stalled rank");
  CHECK(errors[1] == "");
}

TEST_CASE("socket world: bad meeting points are refused in one sentence" *
          doctest::test_suite("independent")) {
  CHECK_THROWS_AS(socket_world("localhost", 2, 0), mop::InputError);
  CHECK_THROWS_AS(socket_world("localhost:99999", 2, 0), mop::InputError);
  CHECK_THROWS_AS(socket_world("localhost:x1", 2, 1), mop::InputError);
  CHECK_THROWS_AS(socket_world("127.0.0.1:1000", 2, 2), mop::InputError);
  // A world of one needs no meeting point at all.
  World w(socket_world("", 1, 0));
  double x = 2;
  w.group({0}, 0).all_reduce(&x, 1);
  CHECK(x == 2);
  // Nobody at the meeting point: rank 1 gives up at the connect timeout.
  SocketWorldOptions o;
  o.connect_timeout_s = 0.3;
  const std::string rv = "127.0.0.1:" + std::to_string(free_local_port());
  CHECK_THROWS_WITH_AS(socket_world(rv, 2, 1, o), doctest::Contains("cannot reach rank 0"),
                       CommError);
}

TEST_CASE("socket world: the interpreter in one process per rank trains bit for bit as with "
          "ranks as threads" *
          doctest::test_suite("independent")) {
  using mop::test::deeper;
  const std::vector<mop::test::Case> cases = {
      make_case("tiny-dense", 4, 4, 16,
                [](Plan& p) {
                  p.attention.tp = 2;
                  for (auto& s : p.state)
                    s.zero = 3;
                }),
      make_case(deeper("tiny-dense", 4), 2, 4, 16,
                [](Plan& p) {
                  p.pp = 2;
                  p.schedule = mop::strategy::PipelineSchedule::one_f_one_b;
                }),
      make_case("tiny-moe", 4, 4, 16, [](Plan& p) { p.moe.ep = 4; }),
      make_case("tiny-dense", 2, 2, 16, [](Plan& p) { p.attention.cp = 2; }),
  };
  for (std::size_t i = 0; i < cases.size(); ++i) {
    CAPTURE(i);
    const auto& k = cases[i];
    RunOptions o;
    o.steps = 2;
    o.check = true;
    o.timeline = true;
    const auto data = DataSource::synthetic(k.config.vocab, 7);
    const TrainState<double> start = initial_state<double>(k.config, 11);
    const RunResult<double> want = interpret<double>(k.schedule, k.config, data, start, o);
    const int n = k.schedule.world;
    std::vector<RunResult<double>> got(at(n));
    const auto errors = run_processes(n, [&](World& w, int r) {
      got[at(r)] = interpret<double>(k.schedule, k.config, data, start, o, &w);
    });
    for (int r = 0; r < n; ++r) {
      CAPTURE(r);
      REQUIRE(errors[at(r)] == "");
      CHECK(got[at(r)].losses == want.losses);
      CHECK(got[at(r)].state.params == want.state.params);
      CHECK(got[at(r)].state.adam_m == want.state.adam_m);
      CHECK(got[at(r)].state.adam_v == want.state.adam_v);
      CHECK(got[at(r)].state.step == want.state.step);
      CHECK(got[at(r)].last_grads == want.last_grads);
      CHECK(got[at(r)].peak_bytes == want.peak_bytes);
      CHECK(got[at(r)].timeline.size() == want.timeline.size());
      CHECK(got[at(r)].memory_timeline.size() == want.memory_timeline.size());
      CHECK(got[at(r)].ops.size() == want.ops.size());
    }
    // The check against the reference runs on rank 0 alone.
    CHECK(got[0].max_param_rel_diff == want.max_param_rel_diff);
    CHECK(want.max_param_rel_diff < 1e-9);
  }
}

TEST_CASE("socket world: the interpreter refuses a world of the wrong size and the op trace" *
          doctest::test_suite("independent")) {
  const auto k = make_case("tiny-dense", 2, 2, 16, [](Plan&) {});
  const auto data = DataSource::synthetic(k.config.vocab, 7);
  const TrainState<double> start = initial_state<double>(k.config, 11);
  World one(socket_world("", 1, 0));
  CHECK_THROWS_WITH_AS(interpret<double>(k.schedule, k.config, data, start, RunOptions{}, &one),
                       "the plan runs on 2 ranks but 1 process was started", mop::InputError);
  const auto k1 = make_case("tiny-dense", 1, 2, 16, [](Plan&) {});
  RunOptions traced;
  traced.trace = true;
  CHECK_THROWS_WITH_AS(interpret<double>(k1.schedule, k1.config, data, start, traced, &one),
                       doctest::Contains("only when the ranks are threads"), mop::InputError);
}

} // namespace real_backend_cpu_socket_world_test
