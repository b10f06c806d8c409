// Generated invocations of every command with absurd flag values: numbers at and past every
// integer and floating ceiling, empty and overlong strings, newlines, unknown names, and paths
// to a folder, a missing file, an empty file, a FIFO, broken and wrong-kind JSON. Each
// invocation starts from sane values (tiny models, one or two nodes) and replaces one or two
// flags, so the absurd value reaches the code behind the parser. The contract (CLI.md): exit
// 0, 1 or 2; on 1 or 2 one line on stderr starting "mop: "; never an internal error or a
// sanitizer report; with --json, stdout is one JSON object with no negative or missing count,
// time or byte figure. The seed is fixed, so a failure names an invocation that reproduces.
#include "tests/cli/run_mop.hpp"

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <string>
#include <sys/stat.h>
#include <vector>

namespace cli_generated_inputs_test {

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// A hang is a finding; 20 s is far above what any of these tiny invocations needs.
constexpr int kTimeoutS = 20;

// Sanitizer builds run mop tens of times slower (a tiny sweep: 1.7 s in the release build, 56 s
// under ASan in Debug); their test preset sets MOP_TEST_TIME_SCALE so that a slow answer is not
// taken for a hang.
int time_scale() {
  const char* v = std::getenv("MOP_TEST_TIME_SCALE");
  const int scale = v ? std::atoi(v) : 1;
  return scale >= 1 ? scale : 1;
}
// Opening a FIFO blocks until a writer comes: a reader that does not refuse it first hangs, and
// 5 s tells that apart from any real answer.
constexpr int kFifoTimeoutS = 5;

// splitmix64: the same invocations on every platform and standard library.
struct Rng {
  std::uint64_t state;
  std::uint64_t next() {
    std::uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  std::size_t below(std::size_t n) { return static_cast<std::size_t>(next() % n); }
  template <class T> const T& pick(const std::vector<T>& v) { return v[below(v.size())]; }
};

std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (char c : s)
    q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

// The shell's view of an argument for a failure message: control characters escaped and
// very long values shortened, so that the printed line can be pasted back into a shell.
std::string printable(const std::string& s, std::size_t max_chars = 80) {
  std::string out;
  for (char c : s.size() > max_chars ? s.substr(0, max_chars / 2) : s) {
    if (c == '\n')
      out += "\\n";
    else if (static_cast<unsigned char>(c) < 0x20)
      out += "\\x" + std::to_string(static_cast<int>(c));
    else
      out += c;
  }
  if (s.size() > max_chars)
    out += "...(" + std::to_string(s.size()) + " chars)";
  return out;
}

// Files and folders the invocations point at, in a fresh temporary folder.
struct Scratch {
  fs::path dir;
  std::string folder, missing, empty, fifo, broken_json, deep_json, wrong_kind, huge_model,
      nan_model, text, dataset, checkpoint, out_file, out_in_missing_dir, cwd;

  Scratch() {
    dir = fs::temp_directory_path() / ("mop-generated-" + std::to_string(::getpid()));
    fs::remove_all(dir);
    fs::create_directories(dir / "a-folder");
    fs::create_directories(dir / "cwd");
    folder = (dir / "a-folder").string();
    missing = (dir / "no-such-file.json").string();
    empty = write("empty.json", "");
    fifo = (dir / "fifo.json").string();
    broken_json = write("broken.json", "{\"model_type\": \"llama\", \"hidden_size\": ");
    deep_json = write("deep.json", std::string(100000, '[') + std::string(100000, ']'));
    // A cluster JSON where a model config is expected (and the other way round).
    wrong_kind = write("wrong-kind.json",
                       mop::test::slurp(fs::path(MOP_SOURCE_DIR) / "configs/clusters/h200.json"));
    std::string tiny = mop::test::slurp(fs::path(MOP_SOURCE_DIR) / "configs/models/tiny-moe.json");
    huge_model = write("huge-model.json", replace(tiny, "\"num_hidden_layers\": 2",
                                                  "\"num_hidden_layers\": 2147483648"));
    nan_model =
        write("nan-model.json", replace(tiny, "\"hidden_size\": 64", "\"hidden_size\": 1e309"));
    text =
        write("text.txt", mop::test::slurp(fs::path(MOP_SOURCE_DIR) / "README.md").substr(0, 4000));
    // Two rows of the project's dataset: validate's sane input, fast to simulate.
    std::string rows, line;
    std::ifstream in(fs::path(MOP_SOURCE_DIR) / "validation/data/published.jsonl");
    for (int i = 0; i < 2 && std::getline(in, line); ++i)
      rows += line + "\n";
    dataset = write("two-rows.jsonl", rows);
    checkpoint = (dir / "tiny-moe.ckpt").string();
    out_file = (dir / "out.json").string();
    out_in_missing_dir = (dir / "no-such-folder" / "out.json").string();
    cwd = (dir / "cwd").string();
  }
  ~Scratch() {
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
  // An output written over the FIFO replaces it; each invocation gets a FIFO again.
  void reset_fifo() const {
    std::error_code ec;
    if (!fs::is_fifo(fifo, ec)) {
      fs::remove(fifo, ec);
      ::mkfifo(fifo.c_str(), 0600);
    }
  }

private:
  std::string write(const std::string& name, const std::string& content) {
    std::ofstream(dir / name, std::ios::binary) << content;
    return (dir / name).string();
  }
  static std::string replace(std::string s, const std::string& from, const std::string& to) {
    const auto at = s.find(from);
    REQUIRE(at != std::string::npos);
    return s.replace(at, from.size(), to);
  }
};

struct Invocation {
  std::vector<std::string> args;
  bool json = false;
  int timeout_s = kTimeoutS;
  std::string line() const {
    std::string s = "mop";
    for (const auto& a : args)
      s += " " + shell_quote(printable(a));
    return s;
  }
};

struct Outcome {
  int status = -1; // the shell's: 124 for a timeout, 128 + n for signal n
  std::string out, err;
  double seconds = 0;
};

Outcome run(const Scratch& s, const Invocation& inv) {
  s.reset_fifo();
  std::string cmd = "cd " + shell_quote(s.cwd) + " && timeout -k 5 " +
                    std::to_string(inv.timeout_s * time_scale()) + " " + shell_quote(MOP_BINARY);
  for (const auto& a : inv.args)
    cmd += " " + shell_quote(a);
  const fs::path out = s.dir / "stdout", err = s.dir / "stderr";
  cmd += " </dev/null >" + shell_quote(out.string()) + " 2>" + shell_quote(err.string());
  const auto start = std::chrono::steady_clock::now();
  const int raw = std::system(cmd.c_str());
  Outcome o;
  o.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  o.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;
  o.out = mop::test::slurp(out);
  o.err = mop::test::slurp(err);
  return o;
}

// Keys whose value is a count, a time, a size or a rate: never negative, never null (a NaN
// prints as null).
bool is_figure_key(const std::string& k) {
  static const char* suffixes[] = {"_s",
                                   "_bytes",
                                   "bytes",
                                   "_params",
                                   "_per_s",
                                   "_per_gpu",
                                   "flops",
                                   "busbw",
                                   "algbw",
                                   "mfu",
                                   "nodes",
                                   "ranks",
                                   "candidates_evaluated",
                                   "count",
                                   "steps",
                                   "world"};
  for (const char* suf : suffixes)
    if (k.size() >= std::string_view(suf).size() && k.ends_with(suf))
      return true;
  return false;
}

// Walks a JSON answer; an entry per figure that is negative, NaN-as-null or not finite.
void check_figures(const json& j, const std::string& path, const std::string& key,
                   std::vector<std::string>& problems) {
  if (j.is_object()) {
    for (const auto& [k, v] : j.items())
      check_figures(v, path + "." + k, k, problems);
  } else if (j.is_array()) {
    for (std::size_t i = 0; i < j.size(); ++i)
      check_figures(j[i], path + "[" + std::to_string(i) + "]", key, problems);
  } else if (j.is_number()) {
    const double v = j.get<double>();
    // Signed by nature: relative errors and differences, and the loss's change.
    const bool signed_ok =
        key.find("error") != std::string::npos || key.find("diff") != std::string::npos;
    if (!std::isfinite(v) || (v < 0 && !signed_ok))
      problems.push_back(path + " = " + j.dump());
  } else if (j.is_null() && is_figure_key(key) && !key.starts_with("predicted")) {
    // (a prediction mop cannot make yet is null by contract: validate's and run's predicted)
    problems.push_back(path + " is null (NaN?)");
  }
}

// Everything the contract forbids in one outcome; empty when it holds.
std::string contract_violation(const Invocation& inv, const Outcome& o) {
  for (const char* bad : {"internal error", "runtime error:", "AddressSanitizer", "LeakSanitizer",
                          "ThreadSanitizer", "UndefinedBehaviorSanitizer"})
    if (o.err.find(bad) != std::string::npos)
      return std::string("stderr holds \"") + bad + "\"";
  if (o.status == 124 || o.status == 137)
    return "no answer within " + std::to_string(inv.timeout_s * time_scale()) + " s";
  if (o.status != 0 && o.status != 1 && o.status != 2)
    return "exit status " + std::to_string(o.status);
  if (o.status != 0) {
    if (!o.err.starts_with("mop: ") || mop::test::count_lines(o.err) != 1 || !o.err.ends_with("\n"))
      return "stderr is not one line starting \"mop: \"";
    return "";
  }
  if (inv.json) {
    json j;
    try {
      j = json::parse(o.out);
    } catch (const json::exception&) {
      return "--json output is not JSON";
    }
    std::vector<std::string> problems;
    check_figures(j, "", "", problems);
    if (!problems.empty())
      return "--json output has " + problems.front() +
             (problems.size() > 1 ? " (and " + std::to_string(problems.size() - 1) + " more)" : "");
  }
  return "";
}

// ---------------------------------------------------------------------------------------------
// The commands, each with sane values and the flags a generator may replace.

using Flags = std::vector<std::pair<std::string, std::string>>; // flag -> value, in order

struct Command {
  std::vector<std::string> words; // "hw", "collective"
  std::string positional;         // a value after the words ("model show MODEL"), "" if none
  Flags flags;
  bool json_capable = true;
};

std::vector<Command> sane_commands(const Scratch& s, Rng& rng) {
  const std::vector<std::string> tiny = {"tiny-moe", "tiny-dense"};
  const std::vector<std::string> presets = {"fsdp2", "megatron", "ulysses-zero3", "mop"};
  const std::string model = rng.pick(tiny);
  auto planning = [&](Flags extra) {
    Flags f = {{"--model", model},
               {"--cluster", "h200"},
               {"--nodes", rng.pick(std::vector<std::string>{"1", "2"})},
               {"--seq", rng.pick(std::vector<std::string>{"256", "1K", "4K"})},
               {"--global-batch", rng.pick(std::vector<std::string>{"16", "64"})}};
    f.insert(f.end(), extra.begin(), extra.end());
    return f;
  };
  return {
      {{"model", "show"}, rng.pick(tiny), {{"--seq", "4K"}}},
      {{"hw", "show"}, rng.pick(std::vector<std::string>{"h200", "h100", "b200"}), {}},
      {{"hw", "collective"},
       "",
       {{"--cluster", "h200"},
        {"--op", rng.pick(std::vector<std::string>{"all_reduce", "all_gather", "reduce_scatter",
                                                   "all_to_all", "send_recv"})},
        {"--bytes", "1M"},
        {"--ranks", "16"},
        {"--ranks-per-node", "8"}}},
      {{"memory"},
       "",
       planning({{"--plan", rng.pick(presets)},
                 {"--tp", rng.pick(std::vector<std::string>{"1", "2"})},
                 {"--zero", rng.pick(std::vector<std::string>{"1", "3"})}})},
      {{"simulate"},
       "",
       planning({{"--plan", rng.pick(presets)},
                 {"--trace", s.out_file},
                 {"--micro-batch", rng.pick(std::vector<std::string>{"1", "2"})}})},
      {{"plan"},
       "",
       planning({{"--family", "fsdp2"}, {"--top", "3"}, {"--threads", "2"}, {"--pp", "1"}})},
      {{"fit"},
       "",
       {{"--model", model},
        {"--cluster", "h200"},
        {"--seq", "4K"},
        {"--family", "fsdp2"},
        {"--max-nodes", "4"},
        {"--threads", "1"}}},
      {{"sweep"},
       "",
       {{"--model", model},
        {"--cluster", "h200"},
        {"--nodes", "1"},
        {"--seq", "1K,4K"},
        {"--family", "fsdp2,mop"},
        {"--threads", "1"}}},
      {{"validate"}, "", {{"--dataset", s.dataset}}},
      {{"run"},
       "",
       {{"--executor", "cpu"},
        {"--model", model},
        {"--ranks", rng.pick(std::vector<std::string>{"1", "2"})},
        {"--steps", "2"},
        {"--seq", "16"},
        {"--batch", "4"},
        {"--plan", "fsdp2"},
        {"--save-checkpoint", s.out_file}}},
  };
}

// The absurd values, by class.
std::vector<std::string> absurd_numbers() {
  return {"0",
          "-1",
          "-0",
          "2147483647",
          "2147483648",
          "4294967296",
          "9223372036854775807",
          "9223372036854775808",
          "-9223372036854775809",
          "99999999999999999999999999",
          "1e309",
          "-1e309",
          "1e-400",
          "NaN",
          "nan",
          "inf",
          "-inf",
          "0x10",
          "1.5",
          " 8",
          "8 ",
          "",
          "8\n9",
          "4K\n",
          "1M",
          "1024G",
          "8589934592K",
          std::string(5000, '9')};
}

std::vector<std::string> absurd_names() {
  return {"",
          "nosuch-preset",
          "h200\n",
          "tiny-moe\nrm -rf /",
          std::string(5000, 'x'),
          "-",
          ".",
          "..",
          "tiny-moe ",
          "TINY-MOE",
          "\x01\x02",
          "fsdp2,mop"};
}

std::vector<std::string> absurd_paths(const Scratch& s) {
  return {s.folder,     s.missing,    s.empty,     s.broken_json, s.deep_json,
          s.wrong_kind, s.huge_model, s.nan_model, s.text,        s.dir.string() + "/"};
}

std::vector<std::string> absurd_outputs(const Scratch& s) {
  return {s.folder,
          s.out_in_missing_dir,
          "",
          s.dir.string() + "/" + std::string(300, 'n'),
          s.dir.string() + "/new\nline.json",
          s.fifo};
}

bool is_numeric_flag(const std::string& f) {
  for (const char* n :
       {"--nodes", "--seq", "--global-batch", "--threads", "--top", "--ranks", "--steps", "--bytes",
        "--ranks-per-node", "--max-nodes", "--batch", "--tp", "--zero", "--micro-batch", "--pp"})
    if (f == n)
      return true;
  return false;
}
bool is_input_path_flag(const std::string& f) {
  for (const char* n :
       {"--model", "--cluster", "--plan", "--calibration", "--dataset", "--data", "--resume"})
    if (f == n)
      return true;
  return false;
}
bool is_output_flag(const std::string& f) {
  return f == "--trace" || f == "--save-checkpoint" || f == "-o";
}

Invocation assemble(const Command& c, const Flags& flags, bool json_flag) {
  Invocation inv;
  inv.args = c.words;
  if (!c.positional.empty())
    inv.args.push_back(c.positional);
  for (const auto& [f, v] : flags) {
    inv.args.push_back(f);
    inv.args.push_back(v);
  }
  inv.json = json_flag && c.json_capable;
  if (inv.json)
    inv.args.push_back("--json");
  return inv;
}

// One class of generated invocations: `mutate` replaces one or more of a command's flags; the
// rest keep their sane values.
using Mutator = std::function<bool(const Scratch&, Rng&, Command&, Flags&)>;

void run_class(const Scratch& s, const std::string& name, std::uint64_t seed, int count,
               const Mutator& mutate) {
  Rng rng{seed};
  std::vector<std::string> failures;
  std::map<std::string, int> exits;
  double slowest = 0;
  std::string slowest_line;
  int ran = 0;
  for (int attempt = 0; ran < count && attempt < count * 20; ++attempt) {
    std::vector<Command> commands = sane_commands(s, rng);
    Command c = commands[rng.below(commands.size())];
    Flags flags = c.flags;
    if (!mutate(s, rng, c, flags))
      continue; // this command has no flag of the class
    const Invocation inv = assemble(c, flags, rng.below(3) != 0);
    const Outcome o = run(s, inv);
    ++ran;
    ++exits[std::to_string(o.status)];
    if (o.seconds > slowest) {
      slowest = o.seconds;
      slowest_line = inv.line();
    }
    const std::string why = contract_violation(inv, o);
    if (!why.empty()) {
      failures.push_back(why + "\n    " + inv.line() + "\n    exit " + std::to_string(o.status) +
                         ", stderr: " + printable(o.err, 240));
    }
  }
  std::string summary;
  for (const auto& [status, n] : exits)
    summary += " exit " + status + ": " + std::to_string(n) + ";";
  MESSAGE(name << ": " << ran << " invocations;" << summary << " slowest " << slowest << " s ("
               << slowest_line << ")");
  CHECK(ran == count);
  for (const std::string& f : failures)
    FAIL_CHECK(std::string(name + ": " + f));
  CHECK(failures.empty());
}

// Replace `k` random flags for which `eligible` holds with values drawn from `pool`.
bool replace_some(Rng& rng, Flags& flags, const std::function<bool(const std::string&)>& eligible,
                  const std::vector<std::string>& pool, int k) {
  std::vector<std::size_t> idx;
  for (std::size_t i = 0; i < flags.size(); ++i)
    if (eligible(flags[i].first))
      idx.push_back(i);
  if (idx.empty())
    return false;
  for (int n = 0; n < k; ++n)
    flags[idx[rng.below(idx.size())]].second = rng.pick(pool);
  return true;
}

} // namespace

TEST_CASE("generated invocations: absurd numbers in numeric flags keep the exit contract" *
          doctest::timeout(300) * doctest::test_suite("plumbing")) {
  const Scratch s;
  run_class(s, "numbers", 0x6e756d62657273ULL, 110,
            [](const Scratch&, Rng& rng, Command&, Flags& flags) {
              return replace_some(rng, flags, is_numeric_flag, absurd_numbers(),
                                  1 + static_cast<int>(rng.below(2)));
            });
}

TEST_CASE("generated invocations: absurd names and strings keep the exit contract" *
          doctest::timeout(300) * doctest::test_suite("plumbing")) {
  const Scratch s;
  run_class(
      s, "names", 0x6e616d6573ULL, 60, [](const Scratch&, Rng& rng, Command& c, Flags& flags) {
        if (!c.positional.empty() && rng.below(2) == 0) {
          c.positional = rng.pick(absurd_names());
          return true;
        }
        return replace_some(
            rng, flags,
            [](const std::string& f) {
              return is_input_path_flag(f) || f == "--op" || f == "--family" || f == "--executor";
            },
            absurd_names(), 1);
      });
}

TEST_CASE("generated invocations: folders, missing, empty and broken files keep the exit "
          "contract" *
          doctest::timeout(300) * doctest::test_suite("plumbing")) {
  Scratch scratch;
  // A checkpoint of the other tiny model: well-formed, but not this model's layout.
  const mop::test::MopResult saved =
      mop::test::run_mop("run --executor cpu --model tiny-dense --steps 1 --seq 16 "
                         "--save-checkpoint " +
                         shell_quote(scratch.checkpoint));
  REQUIRE(saved.status == 0);
  run_class(
      scratch, "paths", 0x7061746873ULL, 80,
      [](const Scratch& s, Rng& rng, Command& c, Flags& flags) {
        // Input files the command does not take by default join as extra flags.
        if (c.words[0] == "memory" || c.words[0] == "simulate" || c.words[0] == "plan")
          flags.push_back(
              {"--calibration",
               (fs::path(MOP_SOURCE_DIR) / "configs/calibration/example-h200.json").string()});
        if (c.words[0] == "run" && rng.below(2) == 0)
          flags.push_back({"--data", s.text});
        if (c.words[0] == "run" && rng.below(2) == 0)
          flags.push_back(
              {"--resume", rng.below(3) == 0 ? s.checkpoint : rng.pick(absurd_paths(s))});
        if (!c.positional.empty() && rng.below(3) == 0) {
          c.positional = rng.pick(absurd_paths(s));
          return true;
        }
        const bool out = rng.below(4) == 0;
        return out ? replace_some(rng, flags, is_output_flag, absurd_outputs(s), 1)
                   : replace_some(rng, flags, is_input_path_flag, absurd_paths(s), 1);
      });
}

// A FIFO as an input blocks a reader that opens it; as an output, it must not be written
// through. One invocation per flag that takes a file.
TEST_CASE("generated invocations: a FIFO in place of any file keeps the exit contract" *
          doctest::timeout(300) * doctest::test_suite("plumbing")) {
  Scratch s;
  const std::string calibration =
      (fs::path(MOP_SOURCE_DIR) / "configs/calibration/example-h200.json").string();
  const std::string memory = "memory --model tiny-moe --cluster h200 --nodes 1 --seq 1K";
  const std::vector<std::string> cases = {
      "model show FIFO --json",
      "hw show FIFO --json",
      "hw collective --cluster FIFO --op all_reduce --bytes 1M --ranks 8",
      "memory --model FIFO --cluster h200 --nodes 1 --seq 1K",
      memory + " --plan FIFO",
      memory + " --calibration FIFO",
      "simulate --model tiny-moe --cluster h200 --nodes 1 --seq 1K --trace FIFO",
      "validate --dataset FIFO --json",
      "run --executor cpu --model tiny-moe --steps 1 --seq 16 --data FIFO",
      "run --executor cpu --model tiny-moe --steps 1 --seq 16 --resume FIFO",
      "run --executor cpu --model tiny-moe --steps 1 --seq 16 --save-checkpoint FIFO"};
  std::vector<std::string> failures;
  for (const std::string& c : cases) {
    Invocation inv;
    std::string word;
    std::istringstream words(c);
    while (words >> word)
      inv.args.push_back(word == "FIFO" ? s.fifo : word);
    inv.json = c.find("--json") != std::string::npos;
    inv.timeout_s = kFifoTimeoutS;
    const Outcome o = run(s, inv);
    const std::string why = contract_violation(inv, o);
    if (!why.empty())
      failures.push_back(why + "\n    " + inv.line() + "\n    exit " + std::to_string(o.status) +
                         ", stderr: " + printable(o.err, 240));
  }
  for (const std::string& f : failures)
    FAIL_CHECK(std::string("fifo: " + f));
  CHECK(failures.empty());
}

} // namespace cli_generated_inputs_test
