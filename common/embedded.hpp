#pragma once
// The configs/ folder compiled into the program (cmake/embed_configs.cmake writes the table).
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace mop {

struct EmbeddedFile {
  std::string_view path; // relative to configs/, e.g. "models/kimi-k2.json"
  std::string_view text;
};

std::span<const EmbeddedFile> embedded_files();

// Names (file stems) of the embedded files in one folder ("models", "clusters"), sorted.
std::vector<std::string> embedded_names(std::string_view folder);
// The text of configs/<folder>/<name>.json, if built in.
std::optional<std::string_view> embedded_text(std::string_view folder, std::string_view name);

} // namespace mop
