// Hugging Face config.json text -> ModelSpec, then the figures `mop model show` prints.
// An InputError is the accepted answer to a bad config; anything else is a finding.
#include "common/error.hpp"
#include "common/json_io.hpp"
#include "fuzz/fuzz_support.hpp"
#include "workload/flops.hpp"
#include "workload/hf_config.hpp"
#include "workload/params.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace mop;
  try {
    const Json config = parse_json(fuzz::as_text(data, size), "config.json");
    const workload::ModelSpec m = workload::from_hf_config(config, "config.json", "fuzz");
    MOP_FUZZ_CHECK(m.num_layers() > 0);
    MOP_FUZZ_CHECK(m.hidden_size > 0 && m.vocab_size > 0);

    const workload::ParamReport p = workload::count_params(m);
    MOP_FUZZ_CHECK(p.total.total() > 0);
    MOP_FUZZ_CHECK(p.active.total() > 0 && p.active.total() <= p.total.total());
    for (const auto* c : {&p.total, &p.active})
      for (std::int64_t part : {c->embedding, c->attention, c->dense_mlp, c->shared_experts,
                                c->routed_experts, c->router, c->norms, c->lm_head})
        MOP_FUZZ_CHECK(part >= 0);
    MOP_FUZZ_CHECK(p.mtp >= 0 && p.mtp_active >= 0 && p.mtp_stored >= 0);

    const workload::FlopReport f = workload::count_flops(m, 4096);
    MOP_FUZZ_CHECK(fuzz::sane(f.model_flops_fwd) && f.model_flops_fwd > 0);
    MOP_FUZZ_CHECK(fuzz::sane(f.model_flops_fwd_per_token));
    MOP_FUZZ_CHECK(fuzz::sane(f.model_flops_train_per_token));
    MOP_FUZZ_CHECK(fuzz::sane(f.elementwise_flops_fwd) && fuzz::sane(f.bytes_fwd));
    for (const auto& c : f.by_component)
      MOP_FUZZ_CHECK(fuzz::sane(c.fwd_flops) && fuzz::sane(c.bwd_flops) &&
                     fuzz::sane(c.fwd_bytes) && fuzz::sane(c.bwd_bytes));
  } catch (const InputError&) {
  }
  return 0;
}
