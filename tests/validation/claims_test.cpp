// The paper's first two claims on Kimi-K2, 12 nodes of 8xH200: a mop-family plan trains at 1M
// tokens of context within HBM and host memory; a plain FSDP2 baseline (no CP) does not.
#include "hw_models/cluster.hpp"
#include "validation/claims.hpp"
#include "workload/catalog.hpp"

#include <doctest/doctest.h>

namespace validation_claims_test {

using namespace mop;

TEST_CASE("Kimi-K2 at 1M on 12x8 H200: mop fits, FSDP2 without TP or CP runs out of HBM" *
          doctest::test_suite("independent")) {
  const workload::ModelSpec m = workload::load_model("kimi-k2");
  const hw::ClusterSpec c = hw::load_cluster("h200");
  validation::ClaimsOptions o;
  o.seqs = {std::int64_t{1} << 20};
  o.scale_nodes = {};
  o.max_simulations = 16;
  const validation::ClaimsReport r = validation::check_claims(m, c, 12, o);
  REQUIRE(r.by_seq.size() == 1);
  const validation::ClaimPoint& p = r.by_seq[0];
  REQUIRE(p.mop.has_value());
  CHECK(p.mop->fits);
  CHECK(p.mop->peak_hbm_bytes <= c.gpu.hbm_bytes);
  CHECK(p.mop->peak_host_bytes <= c.node.host_memory_bytes);
  CHECK_FALSE(p.fsdp2_no_cp.has_value());
  CHECK(p.fsdp2_no_cp_why.starts_with("HBM runs out first"));
}

} // namespace validation_claims_test
