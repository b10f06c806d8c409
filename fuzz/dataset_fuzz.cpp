// Validation dataset (JSON Lines) text -> rows, each translated into its fixed plan as
// `mop validate --dataset FILE` does before simulating, and the plan's memory estimated. An
// InputError is the accepted answer to a bad file; anything else is a finding.
#include "common/error.hpp"
#include "fuzz/fuzz_support.hpp"
#include "hw_models/cluster.hpp"
#include "strategies/hardware.hpp"
#include "strategies/memory.hpp"
#include "validation/dataset.hpp"

namespace {

// Whether the row's `key`, when the file gives it as an integer, is the value read.
template <class T> bool same_integer(const mop::Json& raw, const char* key, const T& read) {
  const auto it = raw.find(key);
  if (it == raw.end() || !it->is_number_integer())
    return true;
  if constexpr (requires { read.has_value(); }) {
    return read.has_value() && it->template get<std::int64_t>() == *read;
  } else {
    return it->template get<std::int64_t>() == read;
  }
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace mop;
  static fuzz::ScratchFile file(".jsonl");
  try {
    const std::vector<validation::Row> rows = validation::read_dataset(file.write(data, size));
    for (const validation::Row& row : rows) {
      MOP_FUZZ_CHECK(row.num_gpus > 0 && row.seq_len > 0);
      // A figure is read as published, never truncated to a different number.
      MOP_FUZZ_CHECK(same_integer(row.raw, "num_gpus", row.num_gpus));
      MOP_FUZZ_CHECK(same_integer(row.raw, "seq_len", row.seq_len));
      MOP_FUZZ_CHECK(same_integer(row.raw, "global_batch_size", row.global_batch_size));
      MOP_FUZZ_CHECK(same_integer(row.raw, "micro_batch_size", row.micro_batch_size));
      const validation::Translation t = validation::translate(row);
      if (!t.reason.empty() || !t.model || !t.plan)
        continue;
      MOP_FUZZ_CHECK(t.nodes > 0);
      MOP_FUZZ_CHECK(t.plan->world > 0);
      const strategy::MemoryReport m =
          strategy::analyze_memory(*t.model, *t.plan, row.seq_len,
                                   strategy::memory_hardware(hw::load_cluster(t.cluster_id)));
      MOP_FUZZ_CHECK(fuzz::sane(m.peak_hbm_bytes) && fuzz::sane(m.peak_host_bytes));
    }
  } catch (const InputError&) {
  }
  return 0;
}
