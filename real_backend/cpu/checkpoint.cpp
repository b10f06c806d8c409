#include "real_backend/cpu/checkpoint.hpp"

#include "common/error.hpp"
#include "common/file_io.hpp"
#include "common/limits.hpp"
#include "real_backend/cpu/hash.hpp"

#include <bit>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <filesystem>
#include <fmt/format.h>
#include <memory>
#include <pthread.h>
#include <unistd.h>

namespace mop::real {

namespace {

static_assert(std::endian::native == std::endian::little,
              "checkpoints are written little-endian, as the CPU stores them");

constexpr char kMagicStem[7] = {'m', 'o', 'p', 'c', 'k', 'p', 't'};
constexpr int kFormat = 2;
constexpr std::size_t kPrefixBytes = 16;  // magic and header length
constexpr std::size_t kChecksumBytes = 8; // the trailing FNV-1a 64

namespace fs = std::filesystem;

std::string q(const std::string& path) {
  return "'" + quote_for_message(path, 80) + "'";
}

std::string hex(std::uint64_t v) {
  return fmt::format("{:016x}", v);
}

Json config_json(const TinyConfig& c) {
  Json layers = Json::array();
  for (const auto& l : c.layers)
    layers.push_back(Json{{"moe", l.moe}, {"window", l.window}});
  return Json{{"hidden", c.hidden},
              {"vocab", c.vocab},
              {"heads", c.heads},
              {"kv_heads", c.kv_heads},
              {"head_dim", c.head_dim},
              {"qk_norm", c.qk_norm},
              {"rope_theta", c.rope_theta},
              {"norm_eps", c.norm_eps},
              {"tied_embeddings", c.tied_embeddings},
              {"dense_ffn", c.dense_ffn},
              {"experts", c.experts},
              {"top_k", c.top_k},
              {"expert_ffn", c.expert_ffn},
              {"normalize_top_k", c.normalize_top_k},
              {"layers", layers}};
}

std::uint64_t payload_bytes(const std::vector<ParamInfo>& layout) {
  std::uint64_t elements = 0;
  for (const auto& p : layout)
    elements += static_cast<std::uint64_t>(p.numel());
  return 3 * elements * sizeof(float);
}

// Holds SIGINT, SIGTERM and SIGHUP back on this thread for its lifetime; one that arrives
// meanwhile is delivered when the mask is restored (the write is complete by then).
class SignalsHeld {
public:
  SignalsHeld() {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGHUP);
    held_ = pthread_sigmask(SIG_BLOCK, &set, &previous_) == 0;
  }
  ~SignalsHeld() {
    if (held_)
      pthread_sigmask(SIG_SETMASK, &previous_, nullptr);
  }
  SignalsHeld(const SignalsHeld&) = delete;
  SignalsHeld& operator=(const SignalsHeld&) = delete;

private:
  sigset_t previous_{};
  bool held_ = false;
};

struct FileCloser {
  void operator()(std::FILE* f) const { std::fclose(f); }
};
using File = std::unique_ptr<std::FILE, FileCloser>;

// Reads exactly n bytes; false on a short read (the file shrank or an I/O error).
bool read_exactly(std::FILE* f, void* dst, std::size_t n) {
  return std::fread(dst, 1, n, f) == n;
}

// Adds the next `n` bytes of the file to `h`, read in blocks; false on a short read.
bool hash_next(std::FILE* f, std::uint64_t n, Fnv1a64& h) {
  std::vector<char> block(std::size_t{1} << 20);
  while (n > 0) {
    const std::size_t want = static_cast<std::size_t>(std::min<std::uint64_t>(n, block.size()));
    if (!read_exactly(f, block.data(), want))
      return false;
    h.add(block.data(), want);
    n -= want;
  }
  return true;
}

std::uint64_t read_hash_field(const Json& section, const std::string& what) {
  if (!section.is_object() || !section.contains("hash") || !section["hash"].is_string())
    throw InputError(fmt::format("{} has no identity hash in its header", what));
  const std::string text = section["hash"].get<std::string>();
  std::uint64_t v = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v, 16);
  if (text.size() != 16 || ec != std::errc() || end != text.data() + text.size())
    throw InputError(fmt::format("{} has a malformed hash in its header", what));
  return v;
}

std::string string_field(const Json& section, const char* key) {
  if (section.is_object() && section.contains(key) && section[key].is_string())
    return section[key].get<std::string>();
  return "?";
}

// The first configuration field where `saved` and `now` differ, as "rope_theta 10000, not
// 500000".
std::string first_difference(const Json& saved, const Json& now) {
  if (!saved.is_object())
    return "its configuration is missing";
  for (const auto& [key, value] : now.items()) {
    const auto it = saved.find(key);
    if (it == saved.end())
      return fmt::format("it has no {}", key);
    if (*it != value)
      return fmt::format("{} {}, not {}", key, quote_for_message(it->dump(), 40),
                         quote_for_message(value.dump(), 40));
  }
  return "its configuration hash differs";
}

// The header: parsed and checked against the model and the data source of this run.
struct Header {
  CheckpointIdentity id;
  std::int64_t step = 0;
  Json tensors;
};

Header read_header(const std::string& text, const std::string& what) {
  Json j;
  try {
    j = Json::parse(text);
  } catch (const nlohmann::json::exception&) {
    throw InputError(fmt::format("{} has a header that is not valid JSON", what));
  }
  if (!j.is_object() || !j.contains("format") || j["format"] != kFormat)
    throw InputError(fmt::format("{} has a header without format {}", what, kFormat));
  Header h;
  const Json& model = j.contains("model") ? j["model"] : Json();
  const Json& plan = j.contains("plan") ? j["plan"] : Json();
  const Json& data = j.contains("data") ? j["data"] : Json();
  h.id.model = string_field(model, "name");
  h.id.model_config = model.is_object() && model.contains("config") ? model["config"] : Json();
  h.id.model_hash = read_hash_field(model, what);
  if (fnv1a64(h.id.model_config.dump()) != h.id.model_hash)
    throw InputError(fmt::format("{} has a model identity whose hash does not match its "
                                 "configuration",
                                 what));
  h.id.plan = string_field(plan, "summary");
  h.id.plan_hash = read_hash_field(plan, what);
  h.id.data = string_field(data, "description");
  h.id.data_hash = read_hash_field(data, what);
  const Json step = j.contains("step") ? j["step"] : Json();
  if (!step.is_number_integer())
    throw InputError(fmt::format("{} holds no step count", what));
  if (step.is_number_unsigned() &&
      step.get<std::uint64_t>() > static_cast<std::uint64_t>(limits::max_checkpoint_step))
    throw InputError(fmt::format("{} holds step {}; a step must be between 0 and {}", what,
                                 step.dump(), limits::max_checkpoint_step));
  h.step = step.get<std::int64_t>();
  h.tensors = j.contains("tensors") ? j["tensors"] : Json();
  return h;
}

void check_identity(const Header& h, const CheckpointIdentity& now, const std::string& what) {
  if (h.id.model != now.model)
    throw InputError(fmt::format("{} was saved for model '{}', not '{}'", what,
                                 quote_for_message(h.id.model, 60), now.model));
  if (h.id.model_hash != now.model_hash)
    throw InputError(fmt::format("{} was saved for a different configuration of model '{}' ({})",
                                 what, now.model,
                                 first_difference(h.id.model_config, now.model_config)));
  if (h.id.data_hash != now.data_hash)
    throw InputError(fmt::format("{} was saved training on {}, not on {}; a resumed run must read "
                                 "the same data",
                                 what, quote_for_message(h.id.data, 80), now.data));
}

void check_tensors(const Header& h, const std::vector<ParamInfo>& layout, const std::string& what,
                   const std::string& model) {
  if (!h.tensors.is_array() || h.tensors.size() != layout.size())
    throw InputError(
        fmt::format("{} does not hold the {} tensors of model '{}'", what, layout.size(), model));
  for (std::size_t i = 0; i < layout.size(); ++i) {
    const Json want{{"name", layout[i].name}, {"shape", layout[i].shape}};
    if (h.tensors[i] != want)
      throw InputError(fmt::format("{} holds tensor {} where model '{}' has {} of shape {}", what,
                                   quote_for_message(h.tensors[i].dump(), 60), model,
                                   layout[i].name, want["shape"].dump()));
  }
}

} // namespace

CheckpointIdentity checkpoint_identity(const TinyConfig& c, const PlanIdentity& plan,
                                       const DataSource& data) {
  CheckpointIdentity id;
  id.model = c.name;
  id.model_config = config_json(c);
  id.model_hash = fnv1a64(id.model_config.dump());
  id.plan = plan.summary;
  id.plan_hash = fnv1a64(plan.canonical);
  id.data = data.description();
  id.data_hash = data.fingerprint();
  return id;
}

void check_state_values(const TinyConfig& c, const TrainState<float>& s, const std::string& what) {
  if (s.step < 0 || s.step > limits::max_checkpoint_step)
    throw InputError(fmt::format("{} holds step {}; a step must be between 0 and {}", what, s.step,
                                 limits::max_checkpoint_step));
  const auto layout = param_layout(c);
  struct Group {
    const std::vector<std::vector<float>>* tensors;
    const char* name;
    bool non_negative;
  };
  for (const Group& g :
       {Group{&s.params, "parameters", false}, Group{&s.adam_m, "AdamW first moments", false},
        Group{&s.adam_v, "AdamW second moments", true}}) {
    if (g.tensors->size() != layout.size())
      throw InputError(fmt::format("{} holds {} tensors of {}; model '{}' has {}", what,
                                   g.tensors->size(), g.name, c.name, layout.size()));
    for (std::size_t i = 0; i < layout.size(); ++i) {
      const auto& v = (*g.tensors)[i];
      if (v.size() != static_cast<std::size_t>(layout[i].numel()))
        throw InputError(fmt::format("{} holds {} elements of {} for {}; the model has {}", what,
                                     v.size(), g.name, layout[i].name, layout[i].numel()));
      for (std::size_t e = 0; e < v.size(); ++e) {
        if (!std::isfinite(v[e]))
          throw InputError(fmt::format("{} holds a non-finite value ({}) in the {} of {}, "
                                       "element {}",
                                       what, v[e], g.name, layout[i].name, e));
        if (g.non_negative && v[e] < 0)
          throw InputError(fmt::format("{} holds a negative value ({}) in the {} of {}, element "
                                       "{}; they are averages of squares",
                                       what, v[e], g.name, layout[i].name, e));
      }
    }
  }
}

void check_checkpoint_target(const std::string& path) {
  if (path.empty())
    throw InputError("the checkpoint path is empty");
  // A checkpoint is a file that --resume reads back: unlike other outputs it is never written
  // through a FIFO or a device. The folder's checks are every output's (common/file_io.hpp).
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (fs::is_directory(st))
    throw InputError("cannot save the checkpoint to " + q(path) + ": it is a folder");
  if (fs::exists(st) && !fs::is_regular_file(st))
    throw InputError("cannot save the checkpoint to " + q(path) +
                     ": it exists and is not a regular file");
  try {
    check_output_path(path);
  } catch (const InputError& e) {
    throw InputError(std::string("cannot save the checkpoint to ") + e.what());
  }
}

void save_checkpoint(const std::string& path, const CheckpointIdentity& id, const TinyConfig& c,
                     const TrainState<float>& s) {
  check_state_values(c, s, fmt::format("the state after step {}", s.step));
  const auto layout = param_layout(c);
  Json tensors = Json::array();
  for (const auto& p : layout)
    tensors.push_back(Json{{"name", p.name}, {"shape", p.shape}});
  const Json header{
      {"format", kFormat},
      {"step", s.step},
      {"model", {{"name", id.model}, {"hash", hex(id.model_hash)}, {"config", id.model_config}}},
      {"plan", {{"summary", id.plan}, {"hash", hex(id.plan_hash)}}},
      {"data", {{"description", id.data}, {"hash", hex(id.data_hash)}}},
      {"tensors", tensors}};
  const std::string header_text = header.dump();
  std::string out;
  out.reserve(kPrefixBytes + header_text.size() + payload_bytes(layout) + kChecksumBytes);
  out.append(kMagicStem, sizeof kMagicStem);
  out.push_back(static_cast<char>('0' + kFormat));
  const std::uint64_t header_size = header_text.size();
  out.append(reinterpret_cast<const char*>(&header_size), sizeof header_size);
  out.append(header_text);
  for (const auto* group : {&s.params, &s.adam_m, &s.adam_v})
    for (const auto& v : *group)
      out.append(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
  const std::uint64_t checksum = fnv1a64(out);
  out.append(reinterpret_cast<const char*>(&checksum), sizeof checksum);
  const SignalsHeld held;
  write_file_atomically(path, out);
}

Checkpoint load_checkpoint(const std::string& path, const TinyConfig& c,
                           const CheckpointIdentity& now) {
  const std::string what = "the checkpoint " + q(path);
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (!fs::exists(st))
    throw InputError(what + " does not exist");
  if (fs::is_directory(st))
    throw InputError(what + " is a folder, not a file");
  if (!fs::is_regular_file(st))
    throw InputError(what + " is not a regular file");
  const std::uint64_t size = fs::file_size(path, ec);
  if (ec)
    throw InputError(fmt::format("{} cannot be read ({})", what, ec.message()));
  File f(std::fopen(path.c_str(), "rb"));
  if (!f)
    throw InputError(fmt::format("{} cannot be read ({})", what, std::strerror(errno)));

  char prefix[kPrefixBytes];
  if (size < kPrefixBytes + kChecksumBytes || !read_exactly(f.get(), prefix, sizeof prefix) ||
      std::memcmp(prefix, kMagicStem, sizeof kMagicStem) != 0)
    throw InputError(fmt::format("{} is not a mop checkpoint", what));
  if (prefix[7] != '0' + kFormat)
    throw InputError(fmt::format("{} is in checkpoint format '{}'; this mop reads format {} only "
                                 "(format 1 had no checksum or identity: train again to write "
                                 "one)",
                                 what, quote_for_message(std::string(1, prefix[7]), 4), kFormat));
  std::uint64_t header_size = 0;
  std::memcpy(&header_size, prefix + 8, sizeof header_size);
  if (header_size > static_cast<std::uint64_t>(limits::max_checkpoint_header_bytes) ||
      header_size > size - kPrefixBytes - kChecksumBytes)
    throw InputError(fmt::format("{} is corrupt or truncated (its header length {} does not fit)",
                                 what, header_size));

  // The checksum first: nothing unverified is trusted. A file of this model's size is read
  // whole (the state needs that memory anyway); any other size is only hashed, block by block,
  // to tell a damaged file from one of another model.
  const auto layout = param_layout(c);
  const std::uint64_t body = size - kChecksumBytes;
  const bool sized = size == kPrefixBytes + header_size + payload_bytes(layout) + kChecksumBytes;
  std::string bytes;
  std::uint64_t hash = 0;
  if (sized) {
    bytes.resize(static_cast<std::size_t>(body));
    std::memcpy(bytes.data(), prefix, sizeof prefix);
    if (!read_exactly(f.get(), bytes.data() + sizeof prefix, bytes.size() - sizeof prefix))
      throw InputError(fmt::format("{} is truncated (it shrank while it was read)", what));
    hash = fnv1a64(bytes);
  } else {
    Fnv1a64 h;
    h.add(prefix, sizeof prefix);
    if (!hash_next(f.get(), body - sizeof prefix, h))
      throw InputError(fmt::format("{} is truncated (it shrank while it was read)", what));
    hash = h.value();
  }
  std::uint64_t stored = 0;
  if (!read_exactly(f.get(), &stored, sizeof stored))
    throw InputError(fmt::format("{} is truncated (it shrank while it was read)", what));
  if (stored != hash)
    throw InputError(fmt::format("{} is corrupt or truncated: its checksum does not match its "
                                 "contents",
                                 what));

  std::string header_text(static_cast<std::size_t>(header_size), '\0');
  if (sized) {
    header_text.assign(bytes, kPrefixBytes, header_text.size());
  } else {
    std::fseek(f.get(), static_cast<long>(kPrefixBytes), SEEK_SET);
    if (!read_exactly(f.get(), header_text.data(), header_text.size()))
      throw InputError(fmt::format("{} is truncated (it shrank while it was read)", what));
  }
  const Header h = read_header(header_text, what);
  check_identity(h, now, what);
  check_tensors(h, layout, what, c.name);
  if (!sized) // same model and tensors, yet another size: not a checkpoint this mop wrote
    throw InputError(
        fmt::format("{} has {} bytes where a checkpoint of model '{}' has {}", what, size, c.name,
                    kPrefixBytes + header_size + payload_bytes(layout) + kChecksumBytes));

  Checkpoint out;
  out.saved = h.id;
  out.state.step = h.step;
  std::size_t at = kPrefixBytes + static_cast<std::size_t>(header_size);
  for (auto* group : {&out.state.params, &out.state.adam_m, &out.state.adam_v})
    for (const auto& p : layout) {
      group->emplace_back(static_cast<std::size_t>(p.numel()));
      const std::size_t n = group->back().size() * sizeof(float);
      std::memcpy(group->back().data(), bytes.data() + at, n);
      at += n;
    }
  check_state_values(c, out.state, what);
  return out;
}

} // namespace mop::real
