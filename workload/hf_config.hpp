#pragma once
// Import of a Hugging Face `config.json` into a ModelSpec.
#include "common/json_io.hpp"
#include "workload/model_spec.hpp"

#include <string>
#include <vector>

namespace mop::workload {

// The model_type values the importer understands.
const std::vector<std::string>& supported_model_types();

// Builds a ModelSpec from a parsed config; `origin` names the file in error sentences and
// `name` becomes ModelSpec::name. Throws InputError for an unknown model_type, a missing or
// non-positive field, or a structure that does not hold (e.g. heads not dividing hidden size).
ModelSpec from_hf_config(const Json& config, const std::string& origin, const std::string& name);

} // namespace mop::workload
