#include "common/json_io.hpp"

#include "common/error.hpp"
#include "common/file_io.hpp"

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fmt/format.h>
#include <fstream>
#include <sstream>
#include <unistd.h>

namespace mop {

Json parse_json(std::string_view text, const std::string& origin) {
  try {
    return Json::parse(text.begin(), text.end());
  } catch (const nlohmann::json::parse_error& e) {
    // e.byte is the position of the error; report it as line:column for the reader.
    std::size_t line = 1, column = 1;
    for (std::size_t i = 0; i + 1 < e.byte && i < text.size(); ++i) {
      if (text[i] == '\n') {
        ++line;
        column = 1;
      } else {
        ++column;
      }
    }
    throw InputError(
        fmt::format("{} is not valid JSON (line {}, column {}).", origin, line, column));
  }
}

Json read_json_file(const std::string& path) {
  return parse_json(read_input_file(path), path);
}

void write_file_atomically(const std::string& path, std::string_view text) {
  write_output_file(path, text);
}

JsonFields::JsonFields(const Json& object, std::string origin)
    : object_(object), origin_(std::move(origin)) {
  if (!object_.is_object())
    throw InputError(fmt::format("{}: expected a JSON object at the top level.", origin_));
}

void JsonFields::fail(const std::string& key, const std::string& requirement) const {
  auto it = object_.find(key);
  if (it == object_.end() || it->is_null())
    throw InputError(
        fmt::format("{}: field '{}' is missing; it must be {}.", origin_, key, requirement));
  throw InputError(
      fmt::format("{}: field '{}' must be {} (got {}).", origin_, key, requirement, it->dump()));
}

bool JsonFields::has(const std::string& key) const {
  auto it = object_.find(key);
  return it != object_.end() && !it->is_null();
}

const Json& JsonFields::at(const std::string& key) const {
  if (!has(key))
    fail(key, "present");
  return object_.at(key);
}

std::int64_t JsonFields::positive_int(const std::string& key) const {
  if (!has(key))
    fail(key, "a positive integer");
  const Json& v = object_.at(key);
  if (v.is_number_integer() && v.get<std::int64_t>() > 0)
    return v.get<std::int64_t>();
  if (v.is_number_float()) {
    const double d = v.get<double>();
    if (d > 0 && d == std::floor(d) && d < 9e18)
      return static_cast<std::int64_t>(d);
  }
  fail(key, "a positive integer");
}

std::int64_t JsonFields::positive_int_or(const std::string& key, std::int64_t fallback) const {
  return has(key) ? positive_int(key) : fallback;
}

std::int64_t JsonFields::non_negative_int_or(const std::string& key, std::int64_t fallback) const {
  if (!has(key))
    return fallback;
  const Json& v = object_.at(key);
  if (v.is_number_integer() && v.get<std::int64_t>() >= 0)
    return v.get<std::int64_t>();
  fail(key, "a non-negative integer");
}

double JsonFields::positive_number(const std::string& key) const {
  if (!has(key))
    fail(key, "a positive number");
  const Json& v = object_.at(key);
  if (v.is_number() && v.get<double>() > 0 && std::isfinite(v.get<double>()))
    return v.get<double>();
  fail(key, "a positive number");
}

double JsonFields::positive_number_or(const std::string& key, double fallback) const {
  return has(key) ? positive_number(key) : fallback;
}

double JsonFields::number_or(const std::string& key, double fallback) const {
  if (!has(key))
    return fallback;
  const Json& v = object_.at(key);
  if (v.is_number() && std::isfinite(v.get<double>()))
    return v.get<double>();
  fail(key, "a number");
}

double JsonFields::non_negative_number(const std::string& key) const {
  if (!has(key))
    fail(key, "a non-negative number");
  return non_negative_number_or(key, 0);
}

double JsonFields::non_negative_number_or(const std::string& key, double fallback) const {
  if (!has(key))
    return fallback;
  const double v = number_or(key, -1);
  if (v < 0)
    fail(key, "a non-negative number");
  return v;
}

bool JsonFields::required_bool(const std::string& key) const {
  if (!has(key))
    fail(key, "true or false");
  return bool_or(key, false);
}

int JsonFields::count(const std::string& key) const {
  const std::int64_t v = positive_int(key);
  if (v > 1'000'000)
    fail(key, "a positive integer below 1,000,000");
  return static_cast<int>(v);
}

bool JsonFields::bool_or(const std::string& key, bool fallback) const {
  if (!has(key))
    return fallback;
  const Json& v = object_.at(key);
  if (v.is_boolean())
    return v.get<bool>();
  fail(key, "true or false");
}

std::string JsonFields::string(const std::string& key) const {
  if (!has(key))
    fail(key, "a string");
  const Json& v = object_.at(key);
  if (v.is_string())
    return v.get<std::string>();
  fail(key, "a string");
}

std::string JsonFields::string_or(const std::string& key, const std::string& fallback) const {
  return has(key) ? string(key) : fallback;
}

} // namespace mop
