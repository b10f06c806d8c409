#include "common/embedded.hpp"

#include <algorithm>

namespace mop {

std::vector<std::string> embedded_names(std::string_view folder) {
  std::vector<std::string> names;
  const std::string prefix = std::string(folder) + "/";
  for (const EmbeddedFile& f : embedded_files()) {
    if (f.path.starts_with(prefix) && f.path.ends_with(".json")) {
      std::string_view stem = f.path.substr(prefix.size());
      stem.remove_suffix(5);
      if (stem.find('/') == std::string_view::npos)
        names.emplace_back(stem);
    }
  }
  std::sort(names.begin(), names.end());
  return names;
}

std::optional<std::string_view> embedded_text(std::string_view folder, std::string_view name) {
  const std::string path = std::string(folder) + "/" + std::string(name) + ".json";
  for (const EmbeddedFile& f : embedded_files())
    if (f.path == path)
      return f.text;
  return std::nullopt;
}

} // namespace mop
