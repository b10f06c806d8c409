// Routing models: expert loads against hand calculations, determinism per seed, and the
// histogram reader's refusals.
#include "tests/support/approx.hpp"
#include "tests/support/errors.hpp"
#include "workload/catalog.hpp"
#include "workload/routing.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <doctest/doctest.h>
#include <fstream>
#include <numeric>
#include <string>

namespace workload_routing_test {

using namespace mop::workload;
using mop::test::input_error_of;
using mop::test::rel;

namespace {

double mean_of(const std::vector<double>& v) {
  return std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
}

std::string write_temp(const std::string& name, const std::string& text) {
  const std::string path = "routing_test_" + name;
  std::ofstream(path) << text;
  return path;
}

} // namespace

TEST_CASE("routing: Zipf loads of tiny-moe's 8 experts, by hand" *
          doctest::test_suite("independent")) {
  // zipf:1 over 8 experts: load_i = 8 · (1/i) / H_8, H_8 = 761/280 = 2.717857...; the hottest
  // takes 8 · 280/761 = 2.94349 times the mean, the coldest a eighth of that.
  const ModelSpec m = load_model("tiny-moe");
  const auto loads = expert_loads(parse_routing("zipf:1", 7), m);
  REQUIRE(loads.size() == 2);
  CHECK(loads[0].empty()); // the dense first layer
  REQUIRE(loads[1].size() == 8);
  std::vector<double> sorted = loads[1];
  std::sort(sorted.rbegin(), sorted.rend());
  CHECK(sorted[0] == rel(8 * 280.0 / 761, 1e-12));
  CHECK(sorted[7] == rel(280.0 / 761, 1e-12));
  CHECK(mean_of(loads[1]) == rel(1, 1e-12));
}

TEST_CASE("routing: an imbalance ratio is the max/mean of every MoE layer" *
          doctest::test_suite("independent")) {
  const ModelSpec m = load_model("qwen3-30b-a3b");
  const auto loads = expert_loads(parse_routing("imbalance:1.5", 1), m);
  int moe = 0;
  for (const auto& row : loads) {
    if (row.empty())
      continue;
    ++moe;
    CHECK(*std::max_element(row.begin(), row.end()) == rel(1.5, 1e-9));
    CHECK(mean_of(row) == rel(1, 1e-12));
  }
  CHECK(moe == 48);
  // The exponent's defining sum, evaluated apart: 128 / sum_i i^-s = 1.5.
  const double s = zipf_exponent_for(1.5, 128);
  double sum = 0;
  for (int i = 1; i <= 128; ++i)
    sum += std::pow(i, -s);
  CHECK(128 / sum == rel(1.5, 1e-9));
  CHECK(input_error_of([&] { (void)expert_loads(parse_routing("imbalance:9"), load_model("tiny-moe")); })
            .find("at most 8 times") != std::string::npos);
}

TEST_CASE("routing: a seed gives the same loads, another seed other hot experts" *
          doctest::test_suite("plumbing")) {
  const ModelSpec m = load_model("tiny-moe");
  for (const char* spec : {"imbalance:2", "zipf:1.2", "dirichlet:0.5"}) {
    CAPTURE(spec);
    const auto a = expert_loads(parse_routing(spec, 3), m);
    const auto b = expert_loads(parse_routing(spec, 3), m);
    const auto c = expert_loads(parse_routing(spec, 4), m);
    CHECK(a == b);
    CHECK(a != c);
    CHECK(mean_of(a[1]) == rel(1, 1e-12));
    CHECK(std::all_of(a[1].begin(), a[1].end(), [](double x) { return x >= 0; }));
  }
  CHECK(expert_loads(parse_routing("balanced"), m)[1] == std::vector<double>(8, 1.0));
  CHECK(parse_routing("imbalance:1").is_balanced());
}

TEST_CASE("routing: a measured histogram, JSON or CSV, becomes loads of mean 1" *
          doctest::test_suite("independent")) {
  const ModelSpec m = load_model("tiny-moe"); // one MoE layer of 8 experts
  // Counts 6 2 1 1 1 1 2 2: 16 pairs, mean 2, loads 3 1 .5 .5 .5 .5 1 1.
  const std::vector<double> expected = {3, 1, 0.5, 0.5, 0.5, 0.5, 1, 1};
  const std::string json = write_temp("a.json", R"({"layers": [[6, 2, 1, 1, 1, 1, 2, 2]]})");
  const std::string csv = write_temp("a.csv", "e0,e1,e2,e3,e4,e5,e6,e7\n6,2,1,1,1,1,2,2\n");
  const std::string all = write_temp("b.json", R"({"experts": [6, 2, 1, 1, 1, 1, 2, 2]})");
  for (const std::string& path : {json, csv, all}) {
    CAPTURE(path);
    CHECK(expert_loads(parse_routing(path), m)[1] == expected);
  }
  const std::string short_row = write_temp("c.csv", "1,2,3\n");
  CHECK(input_error_of([&] { (void)expert_loads(parse_routing(short_row), m); })
            .find("has 3 counts; tiny-moe has 8 routed experts") != std::string::npos);
  const std::string two_rows = write_temp("d.json", R"({"layers": [[1,1,1,1,1,1,1,1], [1,1,1,1,1,1,1,1]]})");
  CHECK(input_error_of([&] { (void)expert_loads(parse_routing(two_rows), m); })
            .find("2 rows; tiny-moe has 1 MoE layers") != std::string::npos);
  const std::string zeros = write_temp("e.csv", "0,0,0,0,0,0,0,0\n");
  CHECK(input_error_of([&] { (void)expert_loads(parse_routing(zeros), m); })
            .find("no expert received a token") != std::string::npos);
  const std::string broken = write_temp("f.csv", "1,2\n3,x\n");
  CHECK(input_error_of([&] { (void)parse_routing(broken); }).find(":2: 'x' is not a count") !=
        std::string::npos);
  for (const std::string& p : {json, csv, all, short_row, two_rows, zeros, broken})
    std::remove(p.c_str());
}

TEST_CASE("routing: malformed options are one sentence each" * doctest::test_suite("plumbing")) {
  CHECK(input_error_of([] { (void)parse_routing("imbalance"); }).find("needs its parameter") !=
        std::string::npos);
  CHECK(input_error_of([] { (void)parse_routing("imbalance:0.5"); }).find("between 1 and") !=
        std::string::npos);
  CHECK(input_error_of([] { (void)parse_routing("zipf:-1"); }).find("between 0 and 100") !=
        std::string::npos);
  CHECK(input_error_of([] { (void)parse_routing("dirichlet:abc"); }).find("is not a number") !=
        std::string::npos);
  CHECK(input_error_of([] { (void)parse_routing("balanced:2"); }).find("takes no parameter") !=
        std::string::npos);
  CHECK(input_error_of([] { (void)parse_routing("/nonexistent/loads.csv"); }) != "");
}

} // namespace workload_routing_test
