#pragma once
// Checkpoints of the CPU executors: the full (unsharded) parameters and AdamW moments, the step,
// and the identity of what they belong to, with a checksum over every byte. Format 2:
//
//   offset    bytes  content
//   0         8      "mopckpt2": "mopckpt" and the format version as one ASCII digit
//   8         8      H, the length of the header (uint64, little-endian)
//   16        H      header, JSON: format, step, model (name, config, hash), plan (summary,
//                    hash), data (description, hash), tensors (name and shape of each)
//   16+H      P      parameters, then AdamW first moments, then second moments, each in the
//                    order of param_layout, float32 little-endian
//   16+H+P    8      FNV-1a 64 of bytes [0, 16+H+P) (uint64, little-endian)
//
// Loading checks, in order, and refuses with one sentence naming the failed check: a regular
// file of a plausible size, the magic and the version, the checksum, the header, the model
// (name and configuration), the tensors' shapes, the data source, the step (0 to
// limits::max_checkpoint_step), and every value (finite parameters and moments, second moments
// >= 0). A different plan is allowed: the state is stored unsharded and every plan shards it on
// load (docs/EXECUTOR.md).
#include "common/json_io.hpp"
#include "real_backend/cpu/training.hpp"

#include <cstdint>
#include <string>

namespace mop::real {

// What a checkpoint belongs to. The hashes are FNV-1a 64 of a canonical text (hash.hpp).
struct CheckpointIdentity {
  std::string model;            // the model's name
  Json model_config;            // every TinyConfig field that shapes or computes with parameters
  std::uint64_t model_hash = 0; // of model_config
  std::string plan;             // the plan's one-line summary
  std::uint64_t plan_hash = 0;  // of the resolved plan's JSON
  std::string data;             // DataSource::description
  std::uint64_t data_hash = 0;  // DataSource::fingerprint
};
// The plan a state was trained under, as whoever resolved it writes it: a one-line summary
// and a canonical text (the resolved plan's JSON), whose hash tells plans apart.
struct PlanIdentity {
  std::string summary;
  std::string canonical;
};
CheckpointIdentity checkpoint_identity(const TinyConfig& c, const PlanIdentity& plan,
                                       const DataSource& data);

// Every value a training state may hold: finite parameters and moments, second moments >= 0,
// a step in [0, limits::max_checkpoint_step]. Throws InputError naming `what` ("the checkpoint
// 'a.ckpt'"), the tensor and the element.
void check_state_values(const TinyConfig& c, const TrainState<float>& s, const std::string& what);

// Refuses, before any work, a path that cannot take a checkpoint: an empty path, a folder, an
// existing file that is not a regular file, a missing or read-only folder.
void check_checkpoint_target(const std::string& path);

// Writes a checkpoint atomically (write_file_atomically) with SIGINT, SIGTERM and SIGHUP held
// back while it is written, so an interrupt lands after the rename, never mid-write. Refuses a
// state that check_state_values refuses (a diverged run), before writing anything.
void save_checkpoint(const std::string& path, const CheckpointIdentity& id, const TinyConfig& c,
                     const TrainState<float>& s);

struct Checkpoint {
  TrainState<float> state;
  CheckpointIdentity saved; // as recorded in the file
};
// Reads and verifies a checkpoint for model `c` and data source `now` (see the top of the file);
// `now.plan` may differ.
Checkpoint load_checkpoint(const std::string& path, const TinyConfig& c,
                           const CheckpointIdentity& now);

} // namespace mop::real
