#include "cli/output.hpp"

#include "common/error.hpp"
#include "common/file_io.hpp"

#include <algorithm>
#include <cstdio>
#include <fmt/format.h>
#include <iostream>
#include <unistd.h>

namespace mop::cli {

namespace {

bool g_csv = false;

// -o FILE: stdout goes to an unnamed temporary file until the command is done.
struct Redirect {
  std::string path;
  std::FILE* buffer = nullptr;
  int saved_stdout = -1;
} g_out;

void begin_output_file(const std::string& path) {
  if (g_out.buffer != nullptr)
    return;
  check_output_path(path); // refused before the work, not after
  std::cout.flush();
  std::fflush(stdout);
  g_out.buffer = std::tmpfile();
  if (g_out.buffer == nullptr)
    throw InputError("-o: no temporary file could be made for the output.");
  g_out.saved_stdout = ::dup(1);
  ::dup2(::fileno(g_out.buffer), 1);
  g_out.path = path;
}

// Puts stdout back; returns what was printed meanwhile.
std::string end_redirect() {
  std::cout.flush();
  std::fflush(stdout);
  std::string text;
  std::rewind(g_out.buffer);
  char chunk[65536];
  for (std::size_t n; (n = std::fread(chunk, 1, sizeof chunk, g_out.buffer)) > 0;)
    text.append(chunk, n);
  ::dup2(g_out.saved_stdout, 1);
  ::close(g_out.saved_stdout);
  std::fclose(g_out.buffer);
  g_out.buffer = nullptr;
  return text;
}

std::string csv_cell(const std::string& s) {
  if (s.find_first_of(",\"\r\n") == std::string::npos)
    return s;
  std::string out = "\"";
  for (char c : s)
    out += c == '"' ? std::string("\"\"") : std::string(1, c);
  return out + "\"";
}

void flatten(const Json& v, const std::string& key,
             std::vector<std::pair<std::string, std::string>>& out) {
  if (v.is_object()) {
    for (const auto& [k, x] : v.items())
      flatten(x, key.empty() ? k : key + "." + k, out);
    return;
  }
  std::string text;
  if (v.is_string())
    text = v.get<std::string>();
  else if (!v.is_null())
    text = v.dump(-1, ' ', false, Json::error_handler_t::replace);
  out.emplace_back(key, text);
}

} // namespace

void add_output_options(CLI::App* cmd, bool& json) {
  CLI::Option* json_flag =
      cmd->add_flag("--json", json, std::string("print one JSON object (= --format json)"));
  cmd->add_option("--format", "table (default), json, or csv (the JSON's rows as a table)")
      ->check(CLI::IsMember({"table", "json", "csv"}))
      ->excludes(json_flag)
      ->each([&json](const std::string& f) {
        json = f != "table";
        g_csv = f == "csv";
      });
  cmd->add_option("-o,--output",
                  "write the output to FILE (whole, or not at all) instead of stdout")
      ->type_name("FILE")
      ->each([](const std::string& path) { begin_output_file(path); });
}

void use_csv() {
  g_csv = true;
}

void commit_output() {
  if (g_out.buffer == nullptr)
    return;
  const std::string path = g_out.path;
  write_output_file(path, end_redirect());
}

void discard_output() {
  if (g_out.buffer != nullptr)
    end_redirect();
}

std::string csv_of(const Json& j) {
  std::vector<const Json*> rows;
  const Json* table = nullptr;
  if (j.is_object()) {
    auto objects = [](const Json& v) {
      return v.is_array() && !v.empty() &&
             std::all_of(v.begin(), v.end(), [](const Json& e) { return e.is_object(); });
    };
    for (const char* k : {"results", "rows", "points", "rank_classes", "models", "clusters"})
      if (j.contains(k) && objects(j[k])) {
        table = &j[k];
        break;
      }
    if (table == nullptr)
      for (const auto& [k, v] : j.items())
        if (objects(v)) {
          table = &v;
          break;
        }
  }
  if (table != nullptr)
    for (const Json& r : *table)
      rows.push_back(&r);
  else
    rows.push_back(&j);
  std::vector<std::vector<std::pair<std::string, std::string>>> cells(rows.size());
  std::vector<std::string> header;
  for (std::size_t i = 0; i < rows.size(); ++i) {
    flatten(*rows[i], "", cells[i]);
    for (const auto& [k, v] : cells[i])
      if (std::find(header.begin(), header.end(), k) == header.end())
        header.push_back(k);
  }
  std::string out;
  for (std::size_t c = 0; c < header.size(); ++c)
    out += (c ? "," : "") + csv_cell(header[c]);
  out += "\n";
  for (const auto& row : cells) {
    for (std::size_t c = 0; c < header.size(); ++c) {
      const auto it = std::find_if(row.begin(), row.end(),
                                   [&](const auto& kv) { return kv.first == header[c]; });
      out += (c ? "," : "") + (it == row.end() ? std::string() : csv_cell(it->second));
    }
    out += "\n";
  }
  return out;
}

void print_json(const Json& j) {
  if (g_csv) {
    const std::string text = csv_of(j);
    std::fwrite(text.data(), 1, text.size(), stdout);
    return;
  }
  // A name taken from a path need not be UTF-8; JSON must be: such bytes print as U+FFFD.
  const std::string text = j.dump(2, ' ', false, Json::error_handler_t::replace);
  std::fwrite(text.data(), 1, text.size(), stdout);
  std::fputc('\n', stdout);
}

std::string TextTable::render() const {
  std::vector<std::size_t> width(header.size(), 0);
  for (std::size_t c = 0; c < header.size(); ++c)
    width[c] = header[c].size();
  for (const auto& row : rows)
    for (std::size_t c = 0; c < row.size() && c < width.size(); ++c)
      width[c] = std::max(width[c], row[c].size());
  auto line = [&](const std::vector<std::string>& cells) {
    std::string out;
    for (std::size_t c = 0; c < width.size(); ++c) {
      const std::string cell = c < cells.size() ? cells[c] : "";
      const bool right = c < right_align.size() && right_align[c];
      out += right ? fmt::format("{:>{}}", cell, width[c]) : fmt::format("{:<{}}", cell, width[c]);
      if (c + 1 < width.size())
        out += "  ";
    }
    while (!out.empty() && out.back() == ' ')
      out.pop_back();
    return out + "\n";
  };
  std::string out = line(header);
  std::size_t total = 0;
  for (std::size_t w : width)
    total += w;
  out += std::string(total + 2 * (width.empty() ? 0 : width.size() - 1), '-') + "\n";
  for (const auto& row : rows)
    out += line(row);
  return out;
}

} // namespace mop::cli
