#include "lowering/program.hpp"

#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"
#include "sim/engine.hpp"
#include "sim/memory_tracker.hpp"
#include "strategies/plan.hpp"
#include "tests/support/errors.hpp"
#include "workload/catalog.hpp"

#include <doctest/doctest.h>

namespace lowering_program_test {

using namespace mop;
using strategy::Plan;

namespace {
Plan plan(int world, int global_batch, int tp, int micro_batch = 1) {
  Plan p;
  p.micro_batch = micro_batch;
  p.world = world;
  p.global_batch = global_batch;
  p.attention.tp = tp;
  p.dense.tp = tp;
  p.embed.tp = tp;
  strategy::complete_plan(p);
  return p;
}
} // namespace

TEST_CASE("program lowering: the simulator plays the executable program" *
          doctest::test_suite("plumbing")) {
  const workload::ModelSpec m = workload::load_model("tiny-dense");
  const sim::Schedule s = lowering::lower_program(plan(8, 8, 2), {&m, 64, 8});
  sim::check_schedule(s);
  const hw::ClusterSpec cluster = hw::load_cluster("h100");
  const sim::SimResult r = sim::simulate(s, cluster, hw::Calibration{});
  CHECK(r.step_time_s > 0);
  CHECK(r.classes[0].memory.peak_hbm_bytes > 0);
}

TEST_CASE("program lowering: every op is sized from its operands" *
          doctest::test_suite("independent")) {
  // tiny-dense at TP 2: the fused q|k|v projection of one micro-batch of 2 sequences of 64
  // tokens multiplies [128 x hidden] by [hidden x (heads + 2 kv_heads) / 2 · head_dim].
  const workload::ModelSpec m = workload::load_model("tiny-dense");
  const sim::Schedule s = lowering::lower_program(plan(2, 4, 2, 2), {&m, 64, 8});
  const double rows = 2 * 64, h = static_cast<double>(m.hidden_size);
  const double cols = static_cast<double>((m.attention.num_heads + 2 * m.attention.num_kv_heads) /
                                          2 * m.attention.head_dim);
  bool found = false;
  for (const sim::Op& op : s.classes[0].ops)
    if (op.name == "L0.qkv_proj.mb0") {
      found = true;
      CHECK(op.gemm.m == rows);
      CHECK(op.gemm.n == cols);
      CHECK(op.gemm.k == h);
      CHECK(op.model_flops == 2 * rows * cols * h);
    } else if (op.name == "L0.attn_sp_gather.mb0") {
      // The gathered buffer: all 128 rows of the hidden size in BF16.
      CHECK(op.bytes == 2 * rows * h);
    }
  CHECK(found);
}

TEST_CASE("program lowering: prices what no executor runs as priced-only ops, named" *
          doctest::test_suite("plumbing")) {
  // Token dropping is priced as dropless routing; the permutation is not in the executable
  // layer (Kernel::none), and an executor refuses the program by that op's name.
  const workload::ModelSpec moe = workload::load_model("tiny-moe");
  Plan dropping = plan(1, 2, 1);
  dropping.moe.capacity_factor = 1.25;
  const sim::Schedule s = lowering::lower_program(dropping, {&moe, 64, 8});
  sim::check_schedule(s);
  std::vector<std::string> priced_only;
  for (const sim::Op& op : s.classes[0].ops)
    if (op.kernel == sim::Kernel::none)
      priced_only.push_back(op.name);
  CHECK(priced_only == std::vector<std::string>{"L1.permute.mb0", "L1.permute.mb1"});
  // Without sequence parallelism TP is executable: all-reduces instead of reduce-scatters.
  const workload::ModelSpec m = workload::load_model("tiny-dense");
  Plan p = plan(2, 4, 2);
  p.attention.sp = false;
  strategy::complete_plan(p);
  const sim::Schedule t = lowering::lower_program(p, {&m, 64, 8});
  int all_reduces = 0, scatters = 0;
  for (const sim::Op& op : t.classes[0].ops) {
    CHECK(op.kernel != sim::Kernel::none);
    all_reduces += op.kind == sim::OpKind::all_reduce && op.category == sim::Category::tp_comm;
    scatters += op.kind == sim::OpKind::reduce_scatter && op.category == sim::Category::tp_comm;
  }
  CHECK(scatters == 0);
  CHECK(all_reduces > 0);
}

TEST_CASE("program lowering: recompute lowers the activation peak, full more than selective" *
          doctest::test_suite("independent")) {
  // Four layers: what each layer keeps between its forward and backward decides the peak.
  // Selective keeps everything but the attention output and the MLP activation; full keeps only
  // each block's input.
  workload::ModelSpec m = workload::load_model("tiny-dense");
  while (m.layers.size() < 4)
    m.layers.push_back(m.layers[0]);
  auto peak = [&](strategy::Recompute r) {
    Plan p = plan(1, 2, 1);
    for (auto& k : p.recompute)
      k = r;
    const sim::Schedule s = lowering::lower_program(p, {&m, 64, 8});
    sim::MemoryTracker t(s.classes[0], false);
    double time = 0;
    for (const sim::Op& op : s.classes[0].ops) {
      t.allocate(op.allocs, time);
      t.free(op.frees, time + 0.5);
      time += 1;
    }
    return t.finish().peak_hbm_bytes;
  };
  const double none = peak(strategy::Recompute::none);
  const double selective = peak(strategy::Recompute::selective);
  const double full = peak(strategy::Recompute::full);
  CHECK(selective < none);
  CHECK(full < selective);
}

TEST_CASE("program lowering: activation offload moves the saved activations off the GPU" *
          doctest::test_suite("independent")) {
  workload::ModelSpec m = workload::load_model("tiny-dense");
  while (m.layers.size() < 4)
    m.layers.push_back(m.layers[0]);
  auto run = [&](double fraction) {
    Plan p = plan(1, 2, 1);
    p.activation_offload = fraction;
    strategy::complete_plan(p);
    return lowering::lower_program(p, {&m, 64, 8});
  };
  auto peak = [](const sim::Schedule& s) {
    sim::MemoryTracker t(s.classes[0], false);
    double time = 0;
    for (const sim::Op& op : s.classes[0].ops) {
      t.allocate(op.allocs, time);
      t.free(op.frees, time + 0.5);
      time += 1;
    }
    return t.finish();
  };
  const sim::Schedule none = run(0), half = run(0.5);
  // Half of four layers: two offload copies and two reloads per micro-batch, each moving the
  // same bytes out and back.
  int d2h = 0, h2d = 0;
  double out = 0, back = 0;
  for (const sim::Op& op : half.classes[0].ops) {
    if (op.kind == sim::OpKind::copy_d2h) {
      ++d2h;
      out += op.bytes;
    } else if (op.kind == sim::OpKind::copy_h2d) {
      ++h2d;
      back += op.bytes;
    }
  }
  const int micro = 2;
  CHECK(d2h == 2 * micro);
  CHECK(h2d == 2 * micro);
  CHECK(out == back);
  const sim::ClassMemory a = peak(none), b = peak(half);
  CHECK(b.peak_hbm_bytes < a.peak_hbm_bytes);
  CHECK(b.peak_host_bytes > 0);
}

TEST_CASE("program lowering: FSDP2 under a pipeline reduces its gradients once per step" *
          doctest::test_suite("independent")) {
  // tiny-dense (2 layers, tied embeddings) under ZeRO-3 over 4 micro-batches. Without a pipeline
  // each layer bucket (attention and dense of each layer: 4) reduce-scatters after every
  // micro-batch's backward (FSDP2's post-backward hook), the embedding and the final norm's
  // buckets once: 4·4 + 2 = 18. Under two stages torch's pipelining turns gradient sync off but
  // for the last backward: every bucket once (the 4 layer buckets, the first stage's embedding,
  // the last stage's final norm and its copy of the tied table: 7), and each stage holds its
  // layers' unsharded FP32 gradients for the step.
  const workload::ModelSpec m = workload::load_model("tiny-dense");
  auto zero3 = [](Plan p) {
    for (strategy::StatePolicy& st : p.state)
      st.zero = 3;
    strategy::complete_plan(p);
    return p;
  };
  auto reduce_scatters = [](const sim::Schedule& s) {
    int n = 0;
    for (const sim::RankClass& rc : s.classes)
      for (const sim::Op& op : rc.ops)
        n += op.kind == sim::OpKind::reduce_scatter && op.category == sim::Category::dp_comm;
    return n;
  };
  Plan flat = plan(4, 16, 1);
  const sim::Schedule s1 = lowering::lower_program(zero3(flat), {&m, 64, 8});
  CHECK(reduce_scatters(s1) == 18);

  Plan piped = plan(4, 8, 1);
  piped.pp = 2;
  piped = zero3(piped);
  REQUIRE(piped.micro_batches() == 4);
  const sim::Schedule s2 = lowering::lower_program(piped, {&m, 64, 8});
  sim::check_schedule(s2);
  CHECK(reduce_scatters(s2) == 7);
  // The first stage's layer-0 query-key-value weight: its gradient is the whole slice in FP32,
  // resident (hidden 64 x (4 + 2·2) heads · 16 = 8192 elements: 32 KiB).
  bool found = false;
  for (const sim::Tensor& t : s2.classes[0].tensors)
    if (t.role == sim::TensorRole::grad && t.param >= 0 &&
        s2.params[static_cast<std::size_t>(t.param)].name.find("L0.") == 0 && t.resident &&
        t.bytes == 4.0 * 64 * 8 * 16)
      found = true;
  CHECK(found);
}

} // namespace lowering_program_test
