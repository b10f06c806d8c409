// torchtitan's eager PyTorch layer against torch.compile's fused kernels (docs/HARDWARE.md
// "Eager elementwise ops"): the traffic of its RMSNorm, RoPE and SwiGLU.
#include "hw_models/cluster.hpp"
#include "strategies/hardware.hpp"
#include "strategies/lower.hpp"
#include "workload/catalog.hpp"

#include <doctest/doctest.h>
#include <string>

using namespace mop;
using namespace mop::strategy;

namespace {

const sim::Op& op_named(const sim::Schedule& s, const std::string& name) {
  for (const sim::Op& op : s.classes.front().ops)
    if (op.name == name)
      return op;
  FAIL("no op named " << name);
  return s.classes.front().ops.front();
}

Plan fsdp(const std::string& family) {
  Plan p;
  p.family = family;
  p.world = 8;
  p.global_batch = 16;
  complete_plan(p);
  return p;
}

} // namespace

TEST_CASE("eager RMSNorm, RoPE and SwiGLU move what their PyTorch ops move, and "
          "compiled they fuse but RoPE" *
          doctest::test_suite("independent")) {
  const workload::ModelSpec m = workload::load_model("llama3-8b");
  const hw::ClusterSpec c = hw::load_cluster("h100");
  LoweringContext ctx{&m, 4096, 8, memory_hardware(c), {}};
  const double t = 4096, h = 4096, inter = 14336, qk = (32 + 8) * 128;
  // Eager (torchtitan's default): per BF16 element, the norm moves x.float() 2+4, pow 4+4,
  // mean 4, x * rsqrt 4+4, type_as 4+2, * weight 2+2 = 36 B; RoPE float() 2+4, the complex
  // product 4+4, type_as 4+2 = 20 B; SwiGLU silu 2+2 and the product 2+2+2 = 10 B.
  const sim::Schedule eager = lower(fsdp("fsdp2"), ctx);
  CHECK(op_named(eager, "L0.attn_norm.mb0").bytes == doctest::Approx(36 * t * h));
  CHECK(op_named(eager, "L0.rope_qk_norm.mb0").bytes == doctest::Approx(20 * t * qk));
  CHECK(op_named(eager, "L0.mlp_act.mb0").bytes == doctest::Approx(10 * t * inter));
  CHECK(op_named(eager, "L0.attn_norm.mb0").kernels == 8);
  // Compiled: read the input, write the output (SwiGLU reads two); RoPE's complex product is
  // not code Inductor generates, so it stays eager.
  ctx.compiled = true;
  const sim::Schedule compiled = lower(fsdp("fsdp2"), ctx);
  CHECK(op_named(compiled, "L0.attn_norm.mb0").bytes == doctest::Approx(4 * t * h));
  CHECK(op_named(compiled, "L0.rope_qk_norm.mb0").bytes == doctest::Approx(20 * t * qk));
  CHECK(op_named(compiled, "L0.mlp_act.mb0").bytes == doctest::Approx(6 * t * inter));
  CHECK(op_named(compiled, "L0.attn_norm.mb0").kernels == 1);
  // Transformer Engine's fused kernels whatever the flag says.
  ctx.compiled = false;
  CHECK(op_named(lower(fsdp("megatron"), ctx), "L0.attn_norm.mb0").bytes ==
        doctest::Approx(4 * t * h));
}
