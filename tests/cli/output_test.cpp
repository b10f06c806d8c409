// The output layer: -o FILE and --format table|json|csv on every command, CSV quoting, and a
// failed command leaving the -o file as it was.
#include "common/json_io.hpp"
#include "tests/cli/run_mop.hpp"

#include <doctest/doctest.h>
#include <filesystem>
#include <fstream>

namespace cli_output_test {

using mop::Json;
using mop::test::run_mop;
using mop::test::slurp;

namespace {

// RFC 4180 fields of one CSV line (quoted fields may hold commas and doubled quotes).
std::vector<std::string> csv_fields(const std::string& line) {
  std::vector<std::string> out(1);
  bool quoted = false;
  for (std::size_t i = 0; i < line.size(); ++i) {
    const char c = line[i];
    if (quoted) {
      if (c == '"' && i + 1 < line.size() && line[i + 1] == '"') {
        out.back() += '"';
        ++i;
      } else if (c == '"')
        quoted = false;
      else
        out.back() += c;
    } else if (c == '"')
      quoted = true;
    else if (c == ',')
      out.emplace_back();
    else
      out.back() += c;
  }
  return out;
}

std::vector<std::string> lines(const std::string& text) {
  std::vector<std::string> v;
  std::string l;
  for (char c : text) {
    if (c == '\n') {
      v.push_back(l);
      l.clear();
    } else
      l += c;
  }
  return v;
}

struct Scratch {
  std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("mop-output-" + std::to_string(::getpid()));
  Scratch() { std::filesystem::create_directories(dir); }
  ~Scratch() { std::filesystem::remove_all(dir); }
};

} // namespace

TEST_CASE("every command takes -o FILE and --format" * doctest::test_suite("plumbing")) {
  const Scratch s;
  const std::string planning = " --model tiny-moe --cluster h100 --nodes 1 --seq 1K";
  const char* commands[] = {"model list",
                            "model show llama3-8b",
                            "hw list",
                            "hw show h200",
                            "hw collective --cluster h200 --op all_reduce --bytes 1M --ranks 16"};
  std::vector<std::string> all(std::begin(commands), std::end(commands));
  // validate on one published row (the whole dataset takes seconds).
  const auto dataset = s.dir / "one.jsonl";
  {
    std::ifstream in(std::string(MOP_SOURCE_DIR) + "/validation/data/published.jsonl");
    std::string first;
    std::getline(in, first);
    std::ofstream(dataset) << first << "\n";
  }
  all.push_back("validate --dataset " + dataset.string());
  for (const char* c : {"memory", "simulate", "plan", "sweep --family fsdp2"})
    all.push_back(std::string(c) + planning);
  all.push_back("fit --model tiny-moe --cluster h100 --seq 1K --family fsdp2 --max-nodes 2");
  all.push_back("run --executor cpu --model tiny-moe --steps 1 --seq 16");
  for (const std::string& c : all) {
    CAPTURE(c);
    const auto table = run_mop(c + " --format table");
    REQUIRE(table.status == 0);
    CHECK_FALSE(table.out.empty());
    const auto csv = run_mop(c + " --format csv");
    REQUIRE(csv.status == 0);
    const auto rows = lines(csv.out);
    REQUIRE(rows.size() >= 2);
    const std::size_t columns = csv_fields(rows[0]).size();
    for (const std::string& r : rows)
      CHECK(csv_fields(r).size() == columns);
    const auto file = s.dir / "out";
    const auto written = run_mop(c + " --format json -o " + file.string());
    CHECK(written.status == 0);
    CHECK(written.out.empty());
    CHECK(Json::parse(slurp(file)).is_object());
    std::filesystem::remove(file);
  }
  // claims runs a dozen searches (a minute under the sanitizers): one run, as a CSV file.
  const auto file = s.dir / "claims.csv";
  const auto claims = run_mop("claims --model tiny-moe --format csv -o " + file.string());
  CHECK(claims.status == 0);
  CHECK(claims.out.empty());
  const auto rows = lines(slurp(file));
  REQUIRE(rows.size() >= 2);
  for (const std::string& r : rows)
    CHECK(csv_fields(r).size() == csv_fields(rows[0]).size());
}

TEST_CASE("CSV cells with commas and quotes are quoted" * doctest::test_suite("plumbing")) {
  // Plan summaries hold commas ("off=grad,opt", "layers=17,15").
  const auto r = run_mop("plan --model llama3-8b --cluster h100 --nodes 1 --seq 4K --top 2 "
                         "--format csv");
  REQUIRE(r.status == 0);
  const auto rows = lines(r.out);
  REQUIRE(rows.size() == 3);
  const auto header = csv_fields(rows[0]);
  const auto summary = std::find(header.begin(), header.end(), "summary");
  REQUIRE(summary != header.end());
  const auto first = csv_fields(rows[1]);
  const std::string cell = first[static_cast<std::size_t>(summary - header.begin())];
  CHECK(cell.find("attn[") == 0);
}

TEST_CASE("-o: a failed command leaves the file as it was, and --json beside --format is a usage "
          "error" *
          doctest::test_suite("plumbing")) {
  const Scratch s;
  const auto file = s.dir / "keep.json";
  std::ofstream(file) << "before\n";
  const auto r =
      run_mop("memory --model nosuch --cluster h100 --nodes 1 --seq 4K --json -o " + file.string());
  CHECK(r.status == 1);
  CHECK(slurp(file) == "before\n");
  const auto both = run_mop("model list --json --format csv");
  CHECK(both.status == 2);
  const auto folder = run_mop("model list -o " + (s.dir / "missing" / "x").string());
  CHECK(folder.status == 1);
}

} // namespace cli_output_test
