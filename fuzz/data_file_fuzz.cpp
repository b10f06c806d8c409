// Token file bytes -> training batches, as `mop run --data FILE` reads them (one token per
// byte, vocabulary 256). An InputError is the accepted answer to a bad file; anything else is
// a finding.
#include "common/error.hpp"
#include "fuzz/fuzz_support.hpp"
#include "real_backend/cpu/tiny_model.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace mop;
  static fuzz::ScratchFile file(".txt");
  constexpr int kVocab = 256;
  try {
    const real::DataSource d = real::DataSource::text_file(file.write(data, size), kVocab, 7);
    for (std::int64_t step : {std::int64_t{0}, std::int64_t{1}, std::int64_t{1} << 40})
      for (int seq_len : {2, 16, 300}) {
        const real::Batch b = d.batch(step, 3, seq_len);
        MOP_FUZZ_CHECK(b.tokens.size() == static_cast<std::size_t>(3 * seq_len));
        MOP_FUZZ_CHECK(b.labels.size() == b.tokens.size());
        for (std::size_t i = 0; i < b.tokens.size(); ++i) {
          MOP_FUZZ_CHECK(b.tokens[i] >= 0 && b.tokens[i] < kVocab);
          MOP_FUZZ_CHECK(b.labels[i] >= -1 && b.labels[i] < kVocab);
        }
      }
  } catch (const InputError&) {
  }
  return 0;
}
