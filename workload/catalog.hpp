#pragma once
// The built-in model catalog (configs/models/*.json, compiled into the program) and loading a
// model by catalog id or by the path of a Hugging Face config.json.
#include "workload/model_spec.hpp"

#include <string>
#include <vector>

namespace mop::workload {

std::vector<std::string> catalog_ids();

// A catalog id ("kimi-k2") or a path to a config.json. A path is anything that names an
// existing file or contains '/' or ends in ".json"; an unknown id lists the known ones.
ModelSpec load_model(const std::string& id_or_path);

} // namespace mop::workload
