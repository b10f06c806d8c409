#include "common/error.hpp"
#include "workload/catalog.hpp"

#include <algorithm>
#include <doctest/doctest.h>
#include <filesystem>
#include <fstream>

namespace workload_catalog_test {

using namespace mop::workload;

TEST_CASE("the catalog holds the models the project promises, and each one loads" *
          doctest::test_suite("plumbing")) {
  const std::vector<std::string> ids = catalog_ids();
  for (const char* id : {"kimi-k2", "deepseek-v3", "qwen3-235b-a22b", "qwen3-30b-a3b",
                         "mixtral-8x7b", "mixtral-8x22b", "gpt-oss-120b", "gpt-oss-20b",
                         "llama3-8b", "llama3-70b", "llama3-405b", "tiny-moe", "tiny-dense"}) {
    CAPTURE(id);
    CHECK(std::find(ids.begin(), ids.end(), std::string(id)) != ids.end());
    CHECK(load_model(id).name == id);
  }
}

TEST_CASE("an unknown id lists the catalog in one sentence" * doctest::test_suite("plumbing")) {
  try {
    load_model("no-such-model");
    FAIL("accepted");
  } catch (const mop::InputError& e) {
    const std::string msg = e.what();
    CHECK(msg.starts_with("'no-such-model' is neither a catalog model nor a config.json path"));
    CHECK(msg.find("kimi-k2") != std::string::npos);
  }
}

TEST_CASE("a config.json path loads and is named after its folder" *
          doctest::test_suite("plumbing")) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / "mop-catalog-test" / "My-Model";
  fs::create_directories(dir);
  std::ofstream(dir / "config.json") << R"({"model_type": "llama", "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "vocab_size": 256})";
  const ModelSpec m = load_model((dir / "config.json").string());
  CHECK(m.name == "My-Model");
  CHECK(m.attention.num_kv_heads == 4); // MHA when num_key_value_heads is absent
  CHECK_THROWS_AS(load_model((dir / "absent.json").string()), mop::InputError);
  // A Hugging Face snapshot folder reads its config.json, with or without the last slash.
  CHECK(load_model(dir.string()).name == "My-Model");
  CHECK(load_model(dir.string() + "/").num_layers() == 2);
  fs::remove_all(dir.parent_path());
}

} // namespace workload_catalog_test
