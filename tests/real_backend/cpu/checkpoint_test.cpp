// Checkpoints: a round trip keeps every bit; a damaged, foreign or out-of-range checkpoint is
// refused with one sentence naming the failed check; a path that cannot take one is refused
// before any work; a failed write leaves nothing behind.
#include "real_backend/cpu/checkpoint.hpp"

#include "common/error.hpp"
#include "real_backend/cpu/hash.hpp"
#include "strategies/plan.hpp"
#include "workload/catalog.hpp"

#include <cmath>
#include <cstring>
#include <doctest/doctest.h>
#include <filesystem>
#include <fmt/format.h>
#include <fstream>
#include <functional>
#include <limits>
#include <sstream>
#include <sys/stat.h>
#include <unistd.h>

namespace real_backend_cpu_checkpoint_test {

using namespace mop;
using namespace mop::real;
namespace fs = std::filesystem;

namespace {

TinyConfig dense() {
  return tiny_config(workload::load_model("tiny-dense"));
}

PlanIdentity plan(int world) {
  strategy::Plan p;
  p.world = world;
  p.global_batch = 2 * world;
  strategy::complete_plan(p);
  return {strategy::summary(p), strategy::to_json(p).dump()};
}

// A state with distinct, recognisable values (not the initial zeros of the moments).
TrainState<float> some_state(const TinyConfig& c, std::int64_t step) {
  TrainState<float> s = initial_state<float>(c, 5);
  for (std::size_t i = 0; i < s.params.size(); ++i)
    for (std::size_t e = 0; e < s.params[i].size(); ++e) {
      s.adam_m[i][e] = 0.001f * static_cast<float>(e % 7) - 0.003f;
      s.adam_v[i][e] = 1e-6f * static_cast<float>(e % 5);
    }
  s.step = step;
  return s;
}

// A scratch folder, removed with everything in it.
struct Scratch {
  fs::path dir;
  Scratch() {
    dir = fs::temp_directory_path() / ("mop-ckpt-test-" + std::to_string(::getpid()));
    fs::remove_all(dir);
    fs::create_directories(dir);
  }
  ~Scratch() {
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
  std::string path(const std::string& name) const { return (dir / name).string(); }
};

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

void spit(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

// The file's parts as the format describes them (checkpoint.hpp), edited and put back together
// with a fresh checksum: a checkpoint whose checksum holds but whose contents are bad.
void rewrite(const std::string& path,
             const std::function<void(Json& header, std::string& payload)>& edit) {
  const std::string bytes = slurp(path);
  std::uint64_t header_size = 0;
  std::memcpy(&header_size, bytes.data() + 8, 8);
  Json header = Json::parse(bytes.substr(16, header_size));
  std::string payload = bytes.substr(16 + header_size, bytes.size() - 16 - header_size - 8);
  edit(header, payload);
  const std::string text = header.dump();
  std::string out = bytes.substr(0, 8);
  const std::uint64_t n = text.size();
  out.append(reinterpret_cast<const char*>(&n), 8);
  out += text;
  out += payload;
  const std::uint64_t sum = fnv1a64(out);
  out.append(reinterpret_cast<const char*>(&sum), 8);
  spit(path, out);
}

// Overwrites float number `index` of the payload (parameters, then first, then second moments).
void set_float(std::string& payload, std::size_t index, float v) {
  std::memcpy(payload.data() + index * sizeof(float), &v, sizeof v);
}

std::size_t elements(const TinyConfig& c) {
  std::size_t n = 0;
  for (const auto& p : param_layout(c))
    n += static_cast<std::size_t>(p.numel());
  return n;
}

std::string refusal(const std::function<void()>& f) {
  try {
    f();
  } catch (const InputError& e) {
    return e.what();
  }
  return "(accepted)";
}

} // namespace

TEST_CASE("checkpoint: FNV-1a 64 gives the published test vectors" *
          doctest::test_suite("independent")) {
  // http://www.isthe.com/chongo/src/fnv/test_fnv.c: FNV1A_64 of "", "a", "foobar".
  CHECK(fnv1a64("") == 0xcbf29ce484222325ULL);
  CHECK(fnv1a64("a") == 0xaf63dc4c8601ec8cULL);
  CHECK(fnv1a64("foobar") == 0x85944171f73967e8ULL);
}

TEST_CASE("checkpoint: a round trip keeps every bit and records the identity" *
          doctest::test_suite("plumbing")) {
  const Scratch s;
  const auto c = dense();
  const auto data = DataSource::synthetic(c.vocab, 3);
  const auto id = checkpoint_identity(c, plan(2), data);
  const auto state = some_state(c, 7);
  save_checkpoint(s.path("a.ckpt"), id, c, state);
  const Checkpoint back = load_checkpoint(s.path("a.ckpt"), c, id);
  CHECK(back.state.step == 7);
  CHECK(back.state.params == state.params);
  CHECK(back.state.adam_m == state.adam_m);
  CHECK(back.state.adam_v == state.adam_v);
  CHECK(back.saved.model == "tiny-dense");
  CHECK(back.saved.model_hash == id.model_hash);
  CHECK(back.saved.plan_hash == id.plan_hash);
  CHECK(back.saved.plan == plan(2).summary);
  CHECK(back.saved.data == "the synthetic stream with seed 3");
  // The size is the format's: 16 bytes of prefix, the header, three float32 copies of every
  // element, 8 bytes of checksum.
  std::uint64_t header_size = 0;
  const std::string bytes = slurp(s.path("a.ckpt"));
  std::memcpy(&header_size, bytes.data() + 8, 8);
  CHECK(bytes.size() == 16 + header_size + 3 * elements(c) * 4 + 8);
  CHECK(bytes.substr(0, 8) == "mopckpt2");
}

TEST_CASE("checkpoint: one flipped bit anywhere or a cut is refused by the checksum" *
          doctest::test_suite("plumbing")) {
  const Scratch s;
  const auto c = dense();
  const auto id = checkpoint_identity(c, plan(1), DataSource::synthetic(c.vocab, 1));
  save_checkpoint(s.path("good.ckpt"), id, c, some_state(c, 3));
  const std::string good = slurp(s.path("good.ckpt"));
  const std::string corrupt = "the checkpoint '" + s.path("bad.ckpt") +
                              "' is corrupt or truncated: its checksum does not match its contents";
  // In the header (the step's digit), in the first parameter, in the last second moment, in the
  // checksum itself.
  const std::size_t step_at = good.find("\"step\":3") + 7;
  for (std::size_t at : {step_at, good.find("\"tensors\"") + 2, good.size() - 200, good.size() - 9,
                         good.size() - 1}) {
    CAPTURE(at);
    std::string bad = good;
    bad[at] = static_cast<char>(bad[at] ^ 0x01);
    spit(s.path("bad.ckpt"), bad);
    CHECK(refusal([&] { load_checkpoint(s.path("bad.ckpt"), c, id); }) == corrupt);
  }
  // A payload bit deep inside a parameter (the lowest mantissa bit of a float: the value stays
  // finite and plausible, only the checksum can tell).
  std::string bad = good;
  bad[good.size() / 2] = static_cast<char>(bad[good.size() / 2] ^ 0x01);
  spit(s.path("bad.ckpt"), bad);
  CHECK(refusal([&] { load_checkpoint(s.path("bad.ckpt"), c, id); }) == corrupt);
  // Cut short by one byte, and to half.
  for (std::size_t keep : {good.size() - 1, good.size() / 2}) {
    CAPTURE(keep);
    spit(s.path("bad.ckpt"), good.substr(0, keep));
    CHECK(refusal([&] { load_checkpoint(s.path("bad.ckpt"), c, id); }) == corrupt);
  }
}

TEST_CASE("checkpoint: NaN, infinite or negative optimizer state and a negative step are "
          "refused" *
          doctest::test_suite("plumbing")) {
  const Scratch s;
  const auto c = dense();
  const auto id = checkpoint_identity(c, plan(1), DataSource::synthetic(c.vocab, 1));
  const std::string path = s.path("x.ckpt");
  const std::string what = "the checkpoint '" + path + "' holds ";
  const std::size_t n = elements(c);
  const auto layout = param_layout(c);
  const std::string first = layout[0].name; // the embedding
  struct Case {
    std::size_t index; // into the payload's floats
    float value;
    std::string sentence;
  };
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  for (const Case& k :
       {Case{5, nan, "a non-finite value (nan) in the parameters of " + first + ", element 5"},
        Case{n + 2, inf,
             "a non-finite value (inf) in the AdamW first moments of " + first + ", element 2"},
        Case{2 * n + 1, nan,
             "a non-finite value (nan) in the AdamW second moments of " + first + ", element 1"},
        Case{2 * n + 3, -1e-8f,
             "a negative value (-1e-08) in the AdamW second moments of " + first +
                 ", element 3; they are averages of squares"}}) {
    CAPTURE(k.index);
    save_checkpoint(path, id, c, some_state(c, 3));
    rewrite(path, [&](Json&, std::string& payload) { set_float(payload, k.index, k.value); });
    CHECK(refusal([&] { load_checkpoint(path, c, id); }) == what + k.sentence);
  }
  save_checkpoint(path, id, c, some_state(c, 3));
  rewrite(path, [](Json& h, std::string&) { h["step"] = -1; });
  CHECK(refusal([&] { load_checkpoint(path, c, id); }) ==
        what + "step -1; a step must be between 0 and 1099511627776");
  rewrite(path, [](Json& h, std::string&) { h["step"] = std::uint64_t{1} << 63; });
  CHECK(refusal([&] { load_checkpoint(path, c, id); }) ==
        what + "step 9223372036854775808; a step must be between 0 and 1099511627776");
  rewrite(path, [](Json& h, std::string&) { h["model"]["config"]["rope_theta"] = 1.0; });
  CHECK(refusal([&] { load_checkpoint(path, c, id); }) ==
        "the checkpoint '" + path +
            "' has a model identity whose hash does not match its configuration");
  save_checkpoint(path, id, c, some_state(c, 3));
  rewrite(path, [](Json& h, std::string&) { h["step"] = "3"; });
  CHECK(refusal([&] { load_checkpoint(path, c, id); }) ==
        "the checkpoint '" + path + "' holds no step count");
}

TEST_CASE("checkpoint: saving a diverged state is refused and writes nothing" *
          doctest::test_suite("plumbing")) {
  const Scratch s;
  const auto c = dense();
  const auto id = checkpoint_identity(c, plan(1), DataSource::synthetic(c.vocab, 1));
  auto state = some_state(c, 4);
  state.params[1][0] = std::numeric_limits<float>::quiet_NaN();
  CHECK(refusal([&] { save_checkpoint(s.path("d.ckpt"), id, c, state); }) ==
        "the state after step 4 holds a non-finite value (nan) in the parameters of " +
            param_layout(c)[1].name + ", element 0");
  CHECK(fs::is_empty(s.dir));
}

TEST_CASE("checkpoint: one of another model, even with the same shapes, is refused" *
          doctest::test_suite("plumbing")) {
  const Scratch s;
  const auto c = dense();
  const auto data = DataSource::synthetic(c.vocab, 1);
  const std::string path = s.path("m.ckpt");
  save_checkpoint(path, checkpoint_identity(c, plan(1), data), c, some_state(c, 2));
  // The same shapes, another RoPE base: every tensor fits, the model is not the same.
  TinyConfig rope = c;
  rope.rope_theta = 2 * c.rope_theta;
  CHECK(refusal([&] { load_checkpoint(path, rope, checkpoint_identity(rope, plan(1), data)); }) ==
        fmt::format("the checkpoint '{}' was saved for a different configuration of model "
                    "'tiny-dense' (rope_theta {}, not {})",
                    path, Json(c.rope_theta).dump(), Json(rope.rope_theta).dump()));
  TinyConfig eps = c;
  eps.norm_eps = 1e-3;
  CHECK(refusal([&] {
          load_checkpoint(path, eps, checkpoint_identity(eps, plan(1), data));
        }).find("(norm_eps ") != std::string::npos);
  TinyConfig renamed = c;
  renamed.name = "tiny-dense-copy";
  CHECK(refusal(
            [&] { load_checkpoint(path, renamed, checkpoint_identity(renamed, plan(1), data)); }) ==
        "the checkpoint '" + path + "' was saved for model 'tiny-dense', not 'tiny-dense-copy'");
  // Another model altogether (other shapes, other size): the identity, not a size, is named.
  const auto moe = tiny_config(workload::load_model("tiny-moe"));
  CHECK(refusal([&] { load_checkpoint(path, moe, checkpoint_identity(moe, plan(1), data)); }) ==
        "the checkpoint '" + path + "' was saved for model 'tiny-dense', not 'tiny-moe'");
}

TEST_CASE("checkpoint: other data is refused, another plan is allowed" *
          doctest::test_suite("plumbing")) {
  const Scratch s;
  const auto c = dense();
  const std::string path = s.path("p.ckpt");
  const auto data = DataSource::synthetic(c.vocab, 1);
  save_checkpoint(path, checkpoint_identity(c, plan(2), data), c, some_state(c, 2));
  const auto other_seed = checkpoint_identity(c, plan(2), DataSource::synthetic(c.vocab, 2));
  CHECK(refusal([&] { load_checkpoint(path, c, other_seed); }) ==
        "the checkpoint '" + path +
            "' was saved training on the synthetic stream with seed 1, not on the synthetic "
            "stream with seed 2; a resumed run must read the same data");
  // The state is stored unsharded: any plan of the same model reads it.
  const auto one_rank = checkpoint_identity(c, plan(1), data);
  const Checkpoint back = load_checkpoint(path, c, one_rank);
  CHECK(back.saved.plan_hash != one_rank.plan_hash);
  CHECK(back.state.params == some_state(c, 2).params);
}

TEST_CASE("checkpoint: files that are not checkpoints are refused with what they are" *
          doctest::test_suite("plumbing")) {
  const Scratch s;
  const auto c = dense();
  const auto id = checkpoint_identity(c, plan(1), DataSource::synthetic(c.vocab, 1));
  const auto load = [&](const std::string& p) {
    return refusal([&] { load_checkpoint(p, c, id); });
  };
  CHECK(load(s.path("none.ckpt")) == "the checkpoint '" + s.path("none.ckpt") + "' does not exist");
  CHECK(load(s.dir.string()) == "the checkpoint '" + s.dir.string() + "' is a folder, not a file");
  CHECK(load("/dev/null") == "the checkpoint '/dev/null' is not a regular file");
  spit(s.path("text.ckpt"), "hello, this is not a checkpoint at all\n");
  CHECK(load(s.path("text.ckpt")) ==
        "the checkpoint '" + s.path("text.ckpt") + "' is not a mop checkpoint");
  spit(s.path("empty.ckpt"), "");
  CHECK(load(s.path("empty.ckpt")) ==
        "the checkpoint '" + s.path("empty.ckpt") + "' is not a mop checkpoint");
  // Format 1: the magic, the tensor count and sizes, the step, the floats, no checksum.
  spit(s.path("v1.ckpt"), std::string("mopckpt1") + std::string(64, '\0'));
  CHECK(load(s.path("v1.ckpt")) ==
        "the checkpoint '" + s.path("v1.ckpt") +
            "' is in checkpoint format '1'; this mop reads format 2 only (format 1 had no "
            "checksum or identity: train again to write one)");
  // A header length past the file's end.
  std::string big = "mopckpt2";
  const std::uint64_t huge = std::uint64_t{1} << 62;
  big.append(reinterpret_cast<const char*>(&huge), 8);
  big += std::string(32, 'x');
  spit(s.path("big.ckpt"), big);
  CHECK(load(s.path("big.ckpt")) == "the checkpoint '" + s.path("big.ckpt") +
                                        "' is corrupt or truncated (its header length "
                                        "4611686018427387904 does not fit)");
}

TEST_CASE("checkpoint: a target that cannot take a checkpoint is refused before any work" *
          doctest::test_suite("plumbing")) {
  const Scratch s;
  CHECK(refusal([&] { check_checkpoint_target(s.path("ok.ckpt")); }) == "(accepted)");
  CHECK(fs::is_empty(s.dir)); // nothing is created by the check
  CHECK(refusal([&] { check_checkpoint_target(""); }) == "the checkpoint path is empty");
  CHECK(refusal([&] { check_checkpoint_target(s.dir.string()); }) ==
        "cannot save the checkpoint to '" + s.dir.string() + "': it is a folder");
  CHECK(refusal([&] {
          check_checkpoint_target(s.path("no/such/x.ckpt"));
        }).ends_with("does not exist."));
  spit(s.path("file"), "x");
  CHECK(refusal([&] {
          check_checkpoint_target(s.path("file/x.ckpt"));
        }).find("cannot be written") != std::string::npos);
  REQUIRE(::mkfifo(s.path("fifo").c_str(), 0600) == 0);
  CHECK(refusal([&] { check_checkpoint_target(s.path("fifo")); }) ==
        "cannot save the checkpoint to '" + s.path("fifo") +
            "': it exists and is not a regular "
            "file");
  CHECK(refusal([&] { check_checkpoint_target("/dev/null"); }) ==
        "cannot save the checkpoint to '/dev/null': it exists and is not a regular file");
}

TEST_CASE("checkpoint: a write that fails leaves no temporary file behind" *
          doctest::test_suite("plumbing")) {
  const Scratch s;
  const auto c = dense();
  const auto id = checkpoint_identity(c, plan(1), DataSource::synthetic(c.vocab, 1));
  // The target is a folder that is not empty: the rename at the end of the atomic write fails.
  fs::create_directories(s.dir / "taken" / "inside");
  CHECK_THROWS_AS(save_checkpoint(s.path("taken"), id, c, some_state(c, 1)), InputError);
  std::vector<std::string> left;
  for (const auto& e : fs::directory_iterator(s.dir))
    left.push_back(e.path().filename().string());
  CHECK(left == std::vector<std::string>{"taken"});
}

} // namespace real_backend_cpu_checkpoint_test
