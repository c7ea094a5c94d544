// YAML documents (recipes, reward configs, declarative reward rules) read as JSON values.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace r1lab::data {

// YAML text -> JSON (scalars typed as YAML 1.2 core: null, bools, ints, floats, else strings; quoted
// scalars stay strings). INVALID_ARGUMENT with the parser's message (line and column) on bad YAML.
absl::StatusOr<nlohmann::json> yaml_to_json(const std::string& yaml_text);

// A file that is JSON or YAML (JSON is YAML, but JSON's own parser gives better messages), by content.
absl::StatusOr<nlohmann::json> read_json_or_yaml(const std::string& path);

}  // namespace r1lab::data
