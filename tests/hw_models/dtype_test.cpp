#include "common/error.hpp"
#include "hw_models/dtype.hpp"

#include <doctest/doctest.h>
#include <string>

namespace hw_models_dtype_test {

using namespace mop::hw;

TEST_CASE("dtypes parse from their names and have their storage sizes" *
          doctest::test_suite("plumbing")) {
  for (Dtype d : {Dtype::bf16, Dtype::fp8, Dtype::fp32})
    CHECK(parse_dtype(dtype_name(d)) == d);
  // IEEE/OCP formats: bfloat16 2 bytes, FP8 e4m3/e5m2 1 byte, float32 4 bytes.
  CHECK(dtype_bytes(Dtype::bf16) == 2);
  CHECK(dtype_bytes(Dtype::fp8) == 1);
  CHECK(dtype_bytes(Dtype::fp32) == 4);
}

TEST_CASE("an unknown dtype is one sentence that lists the allowed names" *
          doctest::test_suite("plumbing")) {
  try {
    parse_dtype("fp16");
    FAIL("accepted");
  } catch (const mop::InputError& e) {
    CHECK(std::string(e.what()) == "unknown dtype 'fp16'; allowed: bf16, fp8, fp32.");
  }
}

} // namespace hw_models_dtype_test
