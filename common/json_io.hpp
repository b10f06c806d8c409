#pragma once
// Reading JSON inputs with errors that name the file and the field, and writing outputs
// (common/file_io.hpp: which files are read, and how each kind of output target is written).
#include <cstdint>
#include <initializer_list>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

namespace mop {

using Json = nlohmann::ordered_json;

// Parses `text`; `origin` names it in error sentences (a path, or "built-in model 'kimi-k2'").
// Broken JSON, nesting deeper than limits::max_json_depth and numbers beyond a double
// ("1e309") are InputErrors naming `origin` and, where known, the line.
Json parse_json(std::string_view text, const std::string& origin);
// Reads (read_input_file) and parses a file; a file that cannot be read or broken JSON is an
// InputError.
Json read_json_file(const std::string& path);
// write_output_file: a regular file is replaced through a temporary file in the same folder and
// a rename (never half-written); a FIFO or character device is written through.
void write_file_atomically(const std::string& path, std::string_view text);

// Refuses a key of `object` outside `known`, naming it and what is allowed (what
// JsonFields::allow_only does, for a list of names kept apart from the reader).
void reject_unknown_keys(const Json& object, std::initializer_list<const char*> known,
                         const std::string& origin);

// Typed field access with one-sentence errors: "config.json: field 'hidden_size' must be a
// positive integer (got -3)." `origin` names the file.
class JsonFields {
public:
  JsonFields(const Json& object, std::string origin);

  bool has(const std::string& key) const; // present and not null
  std::int64_t positive_int(const std::string& key) const;
  std::int64_t positive_int_or(const std::string& key, std::int64_t fallback) const;
  std::int64_t non_negative_int_or(const std::string& key, std::int64_t fallback) const;
  // A whole number in [min, max] (a ceiling from common/limits.hpp, or what an int holds).
  std::int64_t int_in(const std::string& key, std::int64_t min, std::int64_t max) const;
  std::int64_t int_in_or(const std::string& key, std::int64_t min, std::int64_t max,
                         std::int64_t fallback) const;
  double positive_number(const std::string& key) const;
  double positive_number_or(const std::string& key, double fallback) const;
  double number_or(const std::string& key, double fallback) const;
  double non_negative_number(const std::string& key) const;
  double non_negative_number_or(const std::string& key, double fallback) const;
  bool required_bool(const std::string& key) const;
  // A positive count of things (GPUs, cores, ranks) below 1,000,000.
  int count(const std::string& key) const;
  bool bool_or(const std::string& key, bool fallback) const;
  std::string string(const std::string& key) const;
  std::string string_or(const std::string& key, const std::string& fallback) const;
  const Json& at(const std::string& key) const; // required, any type
  const std::string& origin() const { return origin_; }
  // Refuses a key outside `known`, naming it: a misspelt field must not be silently ignored.
  void allow_only(std::initializer_list<std::string_view> known) const;
  // `v` itself when its magnitude is 0 or within [limits::min_figure, limits::max_figure].
  double figure(const std::string& key, double v) const;
  [[noreturn]] void fail(const std::string& key, const std::string& requirement) const;
  // A user's value as an error sentence may quote it, bounded: a string truncated, a list or an
  // object by its size.
  static std::string quote_value(const Json& value);

private:
  const Json& object_;
  std::string origin_;
};

} // namespace mop
