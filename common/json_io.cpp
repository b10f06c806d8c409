#include "common/json_io.hpp"

#include "common/error.hpp"
#include "common/file_io.hpp"
#include "common/limits.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fmt/format.h>
#include <fstream>
#include <limits>
#include <optional>
#include <sstream>
#include <unistd.h>

namespace mop {

namespace {

// Line of the byte at `offset` (1-based), for error sentences.
std::size_t line_of(std::string_view text, std::size_t offset) {
  std::size_t line = 1;
  for (std::size_t i = 0; i < offset && i < text.size(); ++i)
    line += text[i] == '\n' ? 1 : 0;
  return line;
}

// The offset where nesting first exceeds limits::max_json_depth, or npos. nlohmann's parser
// and the copies and dumps of its values recurse once per level, so an input of 100,000 '['
// would overflow the stack; a linear scan that skips strings refuses it before parsing.
std::size_t too_deep_at(std::string_view text) {
  int depth = 0;
  bool in_string = false;
  for (std::size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\')
        ++i; // the escaped character cannot end the string
      else if (c == '"')
        in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > limits::max_json_depth)
        return i;
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return std::string_view::npos;
}

} // namespace

Json parse_json(std::string_view text, const std::string& origin) {
  if (const std::size_t at = too_deep_at(text); at != std::string_view::npos)
    throw InputError(fmt::format("{} nests JSON deeper than {} levels (line {}).", origin,
                                 limits::max_json_depth, line_of(text, at)));
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
  } catch (const nlohmann::json::out_of_range& e) {
    // 406: a number beyond a double ("1e309"); nlohmann quotes it as "... parsing '1e309'".
    const std::string what = e.what();
    const auto open = what.find('\'');
    const auto close = what.rfind('\'');
    if (e.id == 406 && open != std::string::npos && close > open) {
      const std::string number = what.substr(open + 1, close - open - 1);
      const std::size_t at = text.find(number);
      throw InputError(fmt::format("{}: the number {}{} is out of the range of a double.", origin,
                                   quote_for_message(number, limits::max_quoted_chars),
                                   at == std::string_view::npos
                                       ? std::string()
                                       : fmt::format(" (line {})", line_of(text, at))));
    }
    throw InputError(fmt::format("{} holds a value JSON cannot represent here.", origin));
  } catch (const nlohmann::json::exception&) {
    // Every other error of the parser (an invalid UTF-8 sequence is a parse_error already).
    throw InputError(fmt::format("{} is not valid JSON.", origin));
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

namespace {

// Appends the compact JSON text of `v` to `out`, giving up (false) as soon as it passes `budget`
// characters: a list of 10^7 numbers costs a few steps, not a 100 MB string.
bool dump_within(const Json& v, std::string& out, std::size_t budget) {
  if (v.is_array() || v.is_object()) {
    out += v.is_array() ? '[' : '{';
    bool first = true;
    for (auto it = v.begin(); it != v.end(); ++it) {
      if (!first)
        out += ',';
      first = false;
      if (v.is_object())
        out += Json(it.key()).dump() + ':';
      if (out.size() > budget || !dump_within(*it, out, budget))
        return false;
    }
    out += v.is_array() ? ']' : '}';
  } else if (v.is_string() && v.get_ref<const std::string&>().size() > budget) {
    return false;
  } else {
    out += v.dump();
  }
  return out.size() <= budget;
}

} // namespace

std::string JsonFields::quote_value(const Json& v) {
  // Bounded whatever the input holds: a short value is quoted as JSON, a megabyte string is cut
  // and a long list or object is described by its size.
  std::string text;
  if (dump_within(v, text, limits::max_quoted_chars))
    return text;
  if (v.is_string())
    return "\"" + quote_for_message(v.get_ref<const std::string&>(), limits::max_quoted_chars) +
           "\"";
  if (v.is_array())
    return fmt::format("a list of {} values", v.size());
  return fmt::format("an object with {} fields", v.size());
}

void JsonFields::fail(const std::string& key, const std::string& requirement) const {
  auto it = object_.find(key);
  if (it == object_.end() || it->is_null())
    throw InputError(
        fmt::format("{}: field '{}' is missing; it must be {}.", origin_, key, requirement));
  throw InputError(fmt::format("{}: field '{}' must be {} (got {}).", origin_, key, requirement,
                               quote_value(*it)));
}

namespace {

// The value as an int64 when it is a whole number that fits one (3 and 3.0 alike).
std::optional<std::int64_t> whole_number(const Json& v) {
  if (v.is_number_unsigned()) {
    const auto u = v.get<std::uint64_t>();
    if (u <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
      return static_cast<std::int64_t>(u);
    return std::nullopt;
  }
  if (v.is_number_integer())
    return v.get<std::int64_t>();
  if (v.is_number_float()) {
    // 2^63 is exactly representable; below it every integral double converts exactly.
    const double d = v.get<double>();
    if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9.2e18)
      return static_cast<std::int64_t>(d);
  }
  return std::nullopt;
}

} // namespace

namespace {

template <class List> void refuse_unknown(const Json& object, const List& known,
                                          const std::string& origin) {
  for (const auto& [key, value] : object.items()) {
    if (std::find(known.begin(), known.end(), std::string_view(key)) == known.end()) {
      std::string allowed;
      for (std::string_view k : known)
        allowed += fmt::format("{}{}", allowed.empty() ? "" : ", ", k);
      throw InputError(fmt::format("{}: field '{}' is not known; allowed: {}.", origin,
                                   quote_for_message(key, limits::max_quoted_chars), allowed));
    }
  }
}

} // namespace

void JsonFields::allow_only(std::initializer_list<std::string_view> known) const {
  refuse_unknown(object_, known, origin_);
}

void reject_unknown_keys(const Json& object, std::initializer_list<const char*> known,
                         const std::string& origin) {
  refuse_unknown(object, known, origin);
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
  const auto v = whole_number(object_.at(key));
  if (v && *v > 0)
    return *v;
  fail(key, "a positive integer");
}

std::int64_t JsonFields::positive_int_or(const std::string& key, std::int64_t fallback) const {
  return has(key) ? positive_int(key) : fallback;
}

std::int64_t JsonFields::non_negative_int_or(const std::string& key, std::int64_t fallback) const {
  if (!has(key))
    return fallback;
  const Json& v = object_.at(key);
  if (v.is_number_integer()) {
    const auto n = whole_number(v);
    if (n && *n >= 0)
      return *n;
  }
  fail(key, "a non-negative integer");
}

std::int64_t JsonFields::int_in(const std::string& key, std::int64_t min, std::int64_t max) const {
  const std::string requirement = fmt::format("an integer from {} to {}", min, max);
  if (!has(key))
    fail(key, requirement);
  const auto v = whole_number(object_.at(key));
  if (v && *v >= min && *v <= max)
    return *v;
  fail(key, requirement);
}

std::int64_t JsonFields::int_in_or(const std::string& key, std::int64_t min, std::int64_t max,
                                   std::int64_t fallback) const {
  return has(key) ? int_in(key, min, max) : fallback;
}

double JsonFields::figure(const std::string& key, double v) const {
  // Every figure of a real input (seconds, bytes, FLOP/s, ratios) lies far inside this range;
  // past it, the products and quotients of the cost model reach infinity or zero.
  const double magnitude = std::abs(v);
  if (v != 0 && (magnitude < limits::min_figure || magnitude > limits::max_figure))
    throw InputError(fmt::format("{}: field '{}' ({}) is outside the range mop accepts for a "
                                 "figure, {:g} to {:g} in magnitude (or 0 where 0 is allowed).",
                                 origin_, key, v, limits::min_figure, limits::max_figure));
  return v;
}

double JsonFields::positive_number(const std::string& key) const {
  if (!has(key))
    fail(key, "a positive number");
  const Json& v = object_.at(key);
  if (v.is_number() && v.get<double>() > 0 && std::isfinite(v.get<double>()))
    return figure(key, v.get<double>());
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
    return figure(key, v.get<double>());
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
