// What the program lowering charges for context parallelism: the attention calls' shapes and
// model FLOPs per ring step, and the bytes of the CP collectives, from a hand calculation and
// against the cost-only lowering (strategies/lower.cpp, a second method), which prices CP so.
#include "lowering/program.hpp"

#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"
#include "sim/engine.hpp"
#include "strategies/lower.hpp"
#include "strategies/plan.hpp"
#include "tests/support/approx.hpp"
#include "tests/support/errors.hpp"
#include "workload/catalog.hpp"

#include <doctest/doctest.h>
#include <string>

namespace lowering_program_cp_test {

using namespace mop;
using strategy::CpKind;
using strategy::Plan;
using test::rel;

namespace {

// tiny-dense (hidden 64, 4 query heads, 2 key/value heads of 16, 2 layers) on 2 ranks, CP 2,
// one 64-token sequence per micro-batch, 2 micro-batches per step.
Plan cp_plan(CpKind kind) {
  Plan p;
  p.world = 2;
  p.global_batch = 2;
  p.micro_batch = 1;
  p.attention.cp = 2;
  p.attention.cp_kind = kind;
  strategy::complete_plan(p);
  return p;
}

struct Totals {
  double cp_bytes = 0, cp_ops = 0;
  double attention_flops = 0, attention_ops = 0;
};

Totals totals(const sim::Schedule& s) {
  Totals t;
  for (const sim::Op& op : s.classes[0].ops) {
    if (op.category == sim::Category::cp_comm) {
      t.cp_bytes += op.bytes;
      t.cp_ops += 1;
    }
    if (op.kind == sim::OpKind::attention_fwd || op.kind == sim::OpKind::attention_bwd) {
      t.attention_flops += op.model_flops;
      t.attention_ops += 1;
    }
  }
  return t;
}

const strategy::MemoryHardware kHw{.hbm_bytes = 150.1e9,
                                   .host_bytes = 2e12,
                                   .gpus_per_node = 8,
                                   .cuda_context_bytes = 0.5e9,
                                   .nccl_bytes_per_communicator = 0.75e9,
                                   .alltoall_buffer_bytes = 3e9,
                                   .fragmentation = 0.1,
                                   .host_reserved_bytes = 2e11};

} // namespace

TEST_CASE("program lowering: ring CP prices each step as the cost-only lowering does" *
          doctest::test_suite("independent")) {
  const workload::ModelSpec m = workload::load_model("tiny-dense");
  const Plan p = cp_plan(CpKind::ring);
  const sim::Schedule s = lowering::lower_program(p, {&m, 64, 8});
  // Hand calculation. A rank holds 64 / 2 = 32 tokens (chunks 0 and 3, or 1 and 2, of 4).
  // A ring step attends its 32 queries to half a block of keys on average (16), unmasked:
  // batch 1, 4 heads, 2 kv heads, q 32, kv 16, head dims 16.
  // Model FLOPs: the whole sequence's causal attention is 64·65/2 = 2080 pairs, 2·2080·4·(16+16)
  // = 532480 FLOPs; a rank's share is half (266240), each of its 2 steps half of that: 133120
  // forward, twice that (266240) backward.
  // A hop carries K and V of 32 tokens x 2 heads x 16 in BF16: 2·(32·2·16)·2 = 4096 bytes. Per
  // layer and micro-batch: 1 hop forward, 1 K/V hop and 2 dK/dV hops backward.
  const double step_fwd = 133120, hop = 4096;
  int fwd = 0, bwd = 0, hops = 0;
  for (const sim::Op& op : s.classes[0].ops) {
    if (op.kind == sim::OpKind::attention_fwd || op.kind == sim::OpKind::attention_bwd) {
      CAPTURE(op.name);
      CHECK(op.attention.batch == 1);
      CHECK(op.attention.heads == 4);
      CHECK(op.attention.kv_heads == 2);
      CHECK(op.attention.q_len == 32);
      CHECK(op.attention.kv_len == 16);
      CHECK(op.attention.qk_head_dim == 16);
      CHECK_FALSE(op.attention.causal);
      const bool backward = op.kind == sim::OpKind::attention_bwd;
      CHECK(op.model_flops == rel(backward ? 2 * step_fwd : step_fwd));
      (backward ? bwd : fwd) += 1;
    }
    if (op.kind == sim::OpKind::send_recv) {
      CAPTURE(op.name);
      CHECK(op.category == sim::Category::cp_comm);
      CHECK(op.bytes == hop);
      CHECK(s.groups[static_cast<std::size_t>(op.group)].name == "attention.cp.ring");
      ++hops;
    }
  }
  // 2 layers x 2 micro-batches x 2 steps; hops 2 x 2 x (1 + 1 + 2).
  CHECK(fwd == 8);
  CHECK(bwd == 8);
  CHECK(hops == 16);
  // The cost-only lowering charges the same bytes and model FLOPs.
  const sim::Schedule old = strategy::lower(p, strategy::LoweringContext{&m, 64, 8, kHw, {}});
  const Totals a = totals(s), b = totals(old);
  CHECK(a.cp_bytes == rel(16 * hop));
  CHECK(b.cp_bytes == rel(a.cp_bytes));
  CHECK(a.cp_ops == b.cp_ops);
  CHECK(a.attention_flops == rel(8 * 3 * step_fwd));
  CHECK(b.attention_flops == rel(a.attention_flops));
  CHECK(a.attention_ops == b.attention_ops);
}

TEST_CASE("program lowering: Ulysses CP prices whole sequences and four all-to-alls each way" *
          doctest::test_suite("independent")) {
  const workload::ModelSpec m = workload::load_model("tiny-dense");
  const Plan p = cp_plan(CpKind::ulysses);
  const sim::Schedule s = lowering::lower_program(p, {&m, 64, 8});
  // After the all-to-all a rank attends the whole 64-token sequence with 4 / 2 = 2 query heads
  // and 1 kv head, causal: 2080 pairs, 2·2080·2·32 = 266240 FLOPs forward.
  // All-to-all sizes (the input per rank, BF16, 32 tokens): q 32·4·16·2 = 4096, k and v
  // 32·2·16·2 = 2048 each, o 4096; backward the same four (dO 4096, dq 4096, dk, dv 2048).
  const double fwd_flops = 266240;
  for (const sim::Op& op : s.classes[0].ops)
    if (op.kind == sim::OpKind::attention_fwd || op.kind == sim::OpKind::attention_bwd) {
      CAPTURE(op.name);
      CHECK(op.attention.batch == 1);
      CHECK(op.attention.heads == 2);
      CHECK(op.attention.kv_heads == 1);
      CHECK(op.attention.q_len == 64);
      CHECK(op.attention.kv_len == 64);
      CHECK(op.attention.causal);
      CHECK(op.model_flops ==
            rel(op.kind == sim::OpKind::attention_bwd ? 2 * fwd_flops : fwd_flops));
    }
  const Totals a = totals(s);
  // 2 layers x 2 micro-batches x 2 · (4096 + 2048 + 2048 + 4096).
  CHECK(a.cp_bytes == rel(4 * 2 * 12288));
  CHECK(a.cp_ops == 4 * 8);
  const sim::Schedule old = strategy::lower(p, strategy::LoweringContext{&m, 64, 8, kHw, {}});
  const Totals b = totals(old);
  CHECK(b.cp_bytes == rel(a.cp_bytes));
  CHECK(b.cp_ops == a.cp_ops);
  CHECK(b.attention_flops == rel(a.attention_flops));
}

TEST_CASE(
    "program lowering: an uneven CP split is priced only, Ulysses over too few heads refused" *
    doctest::test_suite("plumbing")) {
  const workload::ModelSpec m = workload::load_model("tiny-dense");
  // Ring CP 2 needs the sequence in 4 chunks: 6 tokens are priced as 8 (two chunks of 2 on each
  // rank), and no executor runs that token layout.
  const sim::Schedule uneven = lowering::lower_program(cp_plan(CpKind::ring), {&m, 6, 8});
  for (const sim::Op& op : uneven.classes[0].ops)
    if (op.name == "tokens.mb0") {
      CHECK(op.kernel == sim::Kernel::none);
      CHECK(op.outputs.size() == 2);
      CHECK(uneven.classes[0].tensors[static_cast<std::size_t>(op.outputs[0])].shape ==
            std::vector<std::int64_t>{4 * cp_plan(CpKind::ring).micro_batch});
    }
  // Ulysses 4 over 2 key/value heads: each repeated to one per rank, priced only.
  Plan p;
  p.world = 4;
  p.global_batch = 4;
  p.attention.cp = 4;
  p.attention.cp_kind = CpKind::ulysses;
  strategy::complete_plan(p);
  const sim::Schedule rep = lowering::lower_program(p, {&m, 64, 8});
  int replicas = 0;
  for (const sim::Op& op : rep.classes[0].ops)
    if (op.name == "L0.k heads.mb0.replicate") {
      ++replicas;
      CHECK(op.kernel == sim::Kernel::none);
      // [16 rows, 4 heads, 16] in BF16, from [16, 2, 16].
      CHECK(op.bytes == 2 * 16 * (4 + 2) * 16);
    }
  CHECK(replicas == 1);
  // Ulysses 3 splits neither the 4 query heads nor the 2 key/value heads.
  p.world = 3;
  p.global_batch = 3;
  p.attention.cp = 3;
  p.attention.dp = 0;
  strategy::complete_plan(p);
  CHECK(test::input_error_of([&] {
          lowering::lower_program(p, {&m, 63, 8});
        }) == "Ulysses cp 3 must divide the heads left on a tp rank (4 query, 2 key/value)");
}

TEST_CASE("program lowering: the simulator plays ring, Ulysses and hybrid CP" *
          doctest::test_suite("plumbing")) {
  const workload::ModelSpec m = workload::load_model("tiny-dense");
  const hw::ClusterSpec cluster = hw::load_cluster("h100");
  for (CpKind kind : {CpKind::ring, CpKind::ulysses, CpKind::hybrid}) {
    CAPTURE(static_cast<int>(kind));
    Plan p;
    p.world = 8;
    p.global_batch = 4;
    p.attention.cp = kind == CpKind::ulysses ? 2 : 4; // Ulysses splits the 2 kv heads
    p.attention.cp_kind = kind;
    strategy::complete_plan(p);
    // Two GPUs per node: hybrid splits CP 4 into Ulysses 2 x ring 2.
    const sim::Schedule s = lowering::lower_program(p, {&m, 64, 2});
    sim::check_schedule(s);
    const sim::SimResult r = sim::simulate(s, cluster, hw::Calibration{});
    CHECK(r.step_time_s > 0);
    CHECK(r.classes[0].memory.peak_hbm_bytes > 0);
  }
}

} // namespace lowering_program_cp_test
