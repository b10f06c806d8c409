#include "workload/catalog.hpp"

#include "common/embedded.hpp"
#include "common/error.hpp"
#include "common/json_io.hpp"
#include "workload/hf_config.hpp"

#include <filesystem>
#include <fmt/format.h>
#include <fmt/ranges.h>

namespace mop::workload {

std::vector<std::string> catalog_ids() {
  return embedded_names("models");
}

ModelSpec load_model(const std::string& id_or_path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const bool looks_like_path = id_or_path.find('/') != std::string::npos ||
                               id_or_path.ends_with(".json") || fs::exists(id_or_path, ec);
  if (!looks_like_path) {
    if (auto text = embedded_text("models", id_or_path)) {
      const std::string origin = fmt::format("built-in model '{}'", id_or_path);
      return from_hf_config(parse_json(*text, origin), origin, id_or_path);
    }
    throw InputError(fmt::format("'{}' is neither a catalog model nor a config.json path; "
                                 "catalog models: {}.",
                                 id_or_path, fmt::join(catalog_ids(), ", ")));
  }
  // A Hugging Face snapshot folder (what `huggingface-cli download` leaves): its config.json.
  if (fs::is_directory(id_or_path, ec) &&
      fs::is_regular_file(fs::path(id_or_path) / "config.json", ec)) {
    fs::path folder = fs::path(id_or_path);
    if (folder.filename().empty())
      folder = folder.parent_path(); // "Kimi-K2/"
    const std::string file = (folder / "config.json").string();
    return from_hf_config(read_json_file(file), file, folder.filename().string());
  }
  const Json config = read_json_file(id_or_path);
  std::string name = fs::path(id_or_path).stem().string();
  if (name == "config") // .../Kimi-K2/config.json: name it after its folder
    name = fs::path(id_or_path).parent_path().filename().string();
  return from_hf_config(config, id_or_path, name.empty() ? id_or_path : name);
}

} // namespace mop::workload
