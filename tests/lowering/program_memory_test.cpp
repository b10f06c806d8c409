// The program lowering's memory: what the simulator's tracker finds live at the peak of a
// lowered program, held to the analytic memory model (strategies/memory.cpp, a second method
// that counts the same states and saved activations from the plan alone), and the pieces the
// program adds besides its executable tensors (resident cost tensors, the chunked loss).
#include "lowering/program.hpp"

#include "hw_models/calibration.hpp"
#include "hw_models/cluster.hpp"
#include "sim/engine.hpp"
#include "strategies/hardware.hpp"
#include "strategies/memory.hpp"
#include "strategies/plan.hpp"
#include "tests/support/approx.hpp"
#include "tests/support/program_case.hpp"
#include "workload/catalog.hpp"
#include "workload/params.hpp"

#include <algorithm>
#include <doctest/doctest.h>
#include <functional>
#include <string>

namespace lowering_program_memory_test {

using namespace mop;
using strategy::Plan;
using strategy::Recompute;

namespace {

Plan plan(int world, int global_batch, const std::function<void(Plan&)>& edit) {
  Plan p;
  p.world = world;
  p.global_batch = global_batch;
  p.micro_batch = 1;
  edit(p);
  strategy::complete_plan(p);
  return p;
}

void recompute(Plan& p, Recompute r) {
  for (auto& x : p.recompute)
    x = r;
}

// The H100 cluster's memory figures without the allocator allowance (validation adds it on top
// of both; the tracker counts tensors only).
strategy::MemoryHardware h100_memory() {
  strategy::MemoryHardware hw = strategy::memory_hardware(hw::load_cluster("h100"));
  hw.fragmentation = 0;
  return hw;
}

// The simulated HBM peak of the worst rank class.
double simulated_peak(const workload::ModelSpec& m, const Plan& p, std::int64_t seq) {
  lowering::ProgramContext c{&m, seq, 8};
  c.hw = h100_memory();
  const sim::Schedule s = lowering::lower_program(p, c);
  const sim::SimResult r = sim::simulate(s, hw::load_cluster("h100"), hw::Calibration{});
  double peak = 0;
  for (const sim::ClassResult& cr : r.classes)
    peak = std::max(peak, cr.memory.peak_hbm_bytes);
  return peak;
}

} // namespace

// The memory model counts the states exactly as the program holds them (BF16 weights, FP32
// gradients, FP32 master weights and moments, the CUDA context and NCCL buffers), the saved
// activations per layer and micro-batch in flight, one layer's recompute working set and the
// logits. The program holds, besides, the transient tensors of the op running at the peak (the
// backward's input gradients, a layer's gathered input under SP, the head's dx) and keeps a
// few tensors the model leaves out (the norms' FP32 rstd, the ids and labels), and its saved
// set differs from the model's formula in detail (under selective recompute it recomputes the
// attention output the model counts as saved). Those differences are a fraction of the
// activations, themselves a fraction of the peak; the largest part of the rest is the model's
// allowance for a whole layer's activations while it is recomputed, larger than the program's
// working set of that layer (by about 5 % of the peak with TP and 32K sequences): 6 % of the peak
// holds all. The loss' logits kept whole under chunked loss (a quarter of the third peak), every
// offloaded layer reloaded at once (an eighth of it), or the resident buffers left out (the first's
// FP32 master weights alone are 6 % of it) move these peaks by more; the tests below hold the
// pieces one by one. (ZeRO-3 plans are left out: their gathered parameters' prefetch and their
// gradients' reduce-scatter per micro-batch are the program's scheduling, not its tensors.)
TEST_CASE("program: the simulated peak agrees with the analytic memory model" *
          doctest::test_suite("independent")) {
  const workload::ModelSpec m = workload::load_model("llama3-8b");
  struct Row {
    const char* what;
    std::int64_t seq;
    Plan plan;
  };
  const Row rows[] = {
      {"dp8 ZeRO-1, full recompute", 8192,
       plan(8, 8,
            [](Plan& p) {
              p.state[0].zero = p.state[1].zero = p.state[2].zero = p.state[3].zero = 1;
              recompute(p, Recompute::full);
            })},
      {"dp8 ZeRO-1, selective recompute", 8192,
       plan(8, 8,
            [](Plan& p) {
              p.state[0].zero = p.state[1].zero = p.state[2].zero = p.state[3].zero = 1;
              recompute(p, Recompute::selective);
            })},
      {"tp2 sp, pp4 1F1B, 8 micro-batches, full recompute", 32768,
       plan(8, 8,
            [](Plan& p) {
              p.attention.tp = p.dense.tp = p.embed.tp = 2;
              p.attention.sp = true;
              p.pp = 4;
              recompute(p, Recompute::full);
            })},
      {"dp8, full recompute, activations offloaded, chunked loss", 32768,
       plan(8, 8,
            [](Plan& p) {
              recompute(p, Recompute::full);
              p.activation_offload = 1.0;
              p.chunked_loss = true;
            })},
  };
  const strategy::MemoryHardware hw = h100_memory();
  for (const Row& r : rows) {
    CAPTURE(r.what);
    const double model = strategy::analyze_memory(m, r.plan, r.seq, hw).peak_hbm_bytes;
    const double program = simulated_peak(m, r.plan, r.seq);
    CAPTURE(model);
    CAPTURE(program);
    CHECK(program == mop::test::rel(model, 0.06));
  }
}

// Full recompute of a layer keeps its input alone from its forward to its backward (the
// attention block's input; the MLP block's input is recomputed from it). Hand calculation on
// one rank, one micro-batch of one sequence: after the last layer's forward, the live
// non-resident tensors are the L layers' inputs and the last layer's output, [seq, hidden]
// BF16 each, and the ids and labels, [seq] i32 each.
TEST_CASE("program: full recompute keeps one checkpoint per layer" *
          doctest::test_suite("independent")) {
  const int seq = 16;
  const mop::test::Case k =
      mop::test::make_case("tiny-dense", 1, 1, seq, [](Plan& p) { recompute(p, Recompute::full); });
  const sim::RankClass& rc = k.schedule.classes[0];
  const double h = static_cast<double>(k.spec.hidden_size);
  const double layers = static_cast<double>(k.spec.num_layers());
  const double expected = (layers + 1) * seq * h * 2 + 2 * seq * 4;
  double live = 0;
  bool found = false;
  for (const sim::Op& op : rc.ops) {
    if (op.name == "final_norm.mb0") {
      found = true;
      break;
    }
    for (int t : op.allocs)
      live += rc.tensors[static_cast<std::size_t>(t)].bytes;
    for (int t : op.frees)
      live -= rc.tensors[static_cast<std::size_t>(t)].bytes;
  }
  REQUIRE(found);
  CHECK(live == mop::test::rel(expected));
}

// The resident cost tensors, by hand: on one node of 8 H100s the memory model counts one NCCL
// communicator per parallel degree above 1: dp 8, and the expert data-parallel degree, 8 too
// (complete_plan gives it to a dense model as well; the cost-only lowering counts it alike), so
// NCCL holds 2 x 768 MiB (configs/clusters/h100.json) and the CUDA context 512 MiB; under ZeRO-1
// each rank owns an eighth of the model's parameters (each bucket's flat shard, padded to a
// multiple of 8 elements) and keeps their FP32 master copy.
TEST_CASE("program: CUDA context, NCCL buffers and master weights are resident cost tensors" *
          doctest::test_suite("independent")) {
  const workload::ModelSpec m = workload::load_model("llama3-8b");
  const Plan p = plan(8, 8, [](Plan& q) {
    for (auto& st : q.state)
      st.zero = 1;
  });
  lowering::ProgramContext c{&m, 4096, 8};
  c.hw = h100_memory();
  const sim::Schedule s = lowering::lower_program(p, c);
  const sim::RankClass& rc = s.classes[0];
  auto bytes_of = [&](const std::string& name) {
    for (const sim::Tensor& t : rc.tensors)
      if (t.name == name) {
        CHECK(t.resident);
        CHECK(t.shape.empty()); // no executor binds it
        return t.bytes;
      }
    FAIL("no tensor " << name);
    return 0.0;
  };
  CHECK(bytes_of("CUDA context") == mop::test::rel(512.0 * 1024 * 1024));
  CHECK(bytes_of("NCCL and all-to-all buffers") == mop::test::rel(2 * 768.0 * 1024 * 1024));
  const double params = static_cast<double>(workload::count_params(m).total.total());
  // Padding adds fewer than 8 elements per bucket: a relative 1e-6 of 8e9 parameters.
  CHECK(bytes_of("FP32 master weights") == mop::test::rel(4 * params / 8, 1e-6));
}

// Chunked loss: the head's rows in chunks, one chunk's logits (BF16) and their gradient (FP32)
// live at a time; the program still trains as the reference does (check a), runs as scheduled
// (b) and peaks where the tracker says (c) with resident cost tensors counted by both.
TEST_CASE("program: chunked loss forms one chunk's logits at a time" *
          doctest::test_suite("independent")) {
  mop::test::Case k;
  k.spec = workload::load_model("tiny-dense");
  k.config = real::tiny_config(k.spec);
  const int seq = 16;
  k.plan = plan(2, 4, [](Plan& p) {
    p.micro_batch = 2;
    p.chunked_loss = true;
    p.attention.tp = p.dense.tp = p.embed.tp = 2;
    p.attention.sp = true;
  });
  lowering::ProgramContext c{&k.spec, seq, 8};
  c.hw = h100_memory();
  c.loss_chunk_tokens = 4; // 2 sequences of 16 tokens: 32 rows in 4 chunks of 8
  k.schedule = lowering::lower_program(k.plan, c);
  sim::check_schedule(k.schedule);
  const double vocab_shard = static_cast<double>(k.spec.vocab_size) / 2;
  int logits = 0;
  for (const sim::Tensor& t : k.schedule.classes[0].tensors)
    if (t.name.rfind("logits chunk", 0) == 0) {
      ++logits;
      CHECK(t.bytes == mop::test::rel(8 * vocab_shard * 2));
    } else if (t.name.rfind("dlogits chunk", 0) == 0) {
      CHECK(t.bytes == mop::test::rel(8 * vocab_shard * 4));
    }
  CHECK(logits == 4 * 2); // 4 chunks of each of 2 micro-batches
  mop::test::expect_held_together(k);
}

TEST_CASE("program memory: with gradients on the host, every micro-batch's reduced gradients are "
          "downloaded and summed on the host" *
          doctest::test_suite("independent")) {
  // DeepSpeed's ZeRO-Offload reduces each backward's gradients and accumulates the reduced
  // partition on the CPU; the memory model keeps no FP32 gradients on the GPU. tiny-moe on 2
  // ranks, 4 sequences of micro-batch 1 over DP 2: 2 micro-batches, so each bucket reduce-scatters
  // twice into a transient shard and downloads it twice, the first download overwriting the host
  // gradients and the second adding to them; the host optimizer reads them where they are.
  for (auto mode :
       {strategy::OptimizerOverlap::after_backward, strategy::OptimizerOverlap::stream_backward,
        strategy::OptimizerOverlap::stream_forward}) {
    CAPTURE(static_cast<int>(mode));
    const auto k = test::make_case("tiny-moe", 2, 4, 16, [&](Plan& p) {
      p.optimizer_on_host = true;
      p.optimizer = strategy::Placement::host;
      p.grads = strategy::Placement::host;
      p.overlap = mode;
      for (auto& s : p.state)
        s.zero = 2;
    });
    const sim::Schedule& s = k.schedule;
    const sim::RankClass& rc = s.classes[0];
    for (const sim::Tensor& t : rc.tensors) {
      CAPTURE(t.name);
      if (t.resident && t.device == sim::Device::hbm)
        CHECK(t.kind != sim::MemoryKind::grads); // no FP32 gradient stays on the GPU
      if (t.role == sim::TensorRole::grad)
        CHECK(t.device == sim::Device::hbm);
    }
    for (std::size_t b = 0; b < s.buckets.size(); ++b) {
      const std::string& name = s.buckets[b].name;
      CAPTURE(name);
      // The host gradients: what the rank owns, half of the bucket (rounded up).
      std::int64_t numel = 0;
      for (int p : s.buckets[b].params) {
        std::int64_t n = 1;
        for (std::int64_t d : s.params[static_cast<std::size_t>(p)].shape)
          n *= d;
        numel += n;
      }
      int host = -1;
      for (std::size_t t = 0; t < rc.tensors.size(); ++t)
        if (rc.tensors[t].bucket == static_cast<int>(b) &&
            rc.tensors[t].role == sim::TensorRole::host_copy) {
          CHECK(host < 0);
          host = static_cast<int>(t);
        }
      REQUIRE(host >= 0);
      const sim::Tensor& h = rc.tensors[static_cast<std::size_t>(host)];
      CHECK(h.resident);
      CHECK(h.device == sim::Device::host);
      CHECK(h.kind == sim::MemoryKind::grads);
      CHECK(h.shape == std::vector<std::int64_t>{(numel + 1) / 2});
      std::vector<bool> accumulates;
      int scatters = 0, readers = 0;
      for (const sim::Op& op : rc.ops) {
        if (op.name.rfind(name + ".grad_reduce_scatter.mb", 0) == 0)
          ++scatters;
        if (op.name.rfind(name + ".grad_download", 0) == 0) {
          CHECK(op.kind == sim::OpKind::copy_d2h);
          CHECK(op.kernel == sim::Kernel::copy);
          CHECK(op.outputs == std::vector<int>{host});
          accumulates.push_back(rc.attrs_of(op).accumulate);
        }
        if (std::find(op.inputs.begin(), op.inputs.end(), host) != op.inputs.end()) {
          CHECK(op.kind == sim::OpKind::host_adam);
          ++readers;
        }
      }
      CHECK(scatters == 2);
      CHECK(accumulates == std::vector<bool>{false, true});
      CHECK(readers == 1);
    }
    test::expect_held_together(k, 3);
  }
}

// The FP32 gradients leave the GPU: tiny-dense, micro-batches of one sequence of 256 tokens,
// the optimizer on the host, gradients in HBM or on the host. The peak of both programs (replayed
// in program order, as the interpreter allocates) is the first micro-batch's loss in the forward
// (the logits, 256 x 256 BF16, and their FP32 gradient), where no micro-batch's gradients are
// made yet; the gradients on the host take off exactly the resident FP32 gradients:
//   embedding (tied with the head) 256 x 64 = 16384
//   per layer: attention  norm 64 + wq 64 x 64 + wk, wv 64 x 32 each + wo 64 x 64 = 12352
//              MLP        norm 64 + gate, up, down 64 x 128 each              = 24640
//   final norm 64
//   P = 16384 + 2 x (12352 + 24640) + 64 = 90432 parameters, 4 P = 361728 bytes;
// on one rank (a data-parallel group of one: nothing is reduced, each micro-batch's gradients
// are downloaded as they are). Under ZeRO-1 over DP 2 each rank also keeps, with gradients in
// HBM, the reduced FP32 shard, half of each bucket (every bucket has an even size): 4 P / 2 more.
TEST_CASE("program memory: gradients on the host take the FP32 gradients off the GPU peak" *
          doctest::test_suite("independent")) {
  const double params = 16384 + 2 * (12352 + 24640) + 64;
  struct Row {
    int world, zero;
    double fewer; // bytes
  };
  for (const Row& r : {Row{1, 0, 4 * params}, Row{2, 1, 4 * params * 1.5}}) {
    CAPTURE(r.world);
    double peak[2] = {0, 0};
    for (int host = 0; host < 2; ++host) {
      const auto k = test::make_case("tiny-dense", r.world, 2 * r.world, 256, [&](Plan& p) {
        p.micro_batch = 1;
        p.optimizer_on_host = true;
        p.optimizer = strategy::Placement::host;
        p.grads = host != 0 ? strategy::Placement::host : strategy::Placement::hbm;
        for (auto& s : p.state)
          s.zero = r.zero;
      });
      const sim::RankClass& rc = k.schedule.classes[0];
      const sim::ClassMemory m = test::program_order_memory(rc);
      CHECK(rc.ops[static_cast<std::size_t>(m.peak_time_s)].name == "loss.mb0");
      peak[host] = m.peak_hbm_bytes;
    }
    CHECK(peak[0] - peak[1] == mop::test::rel(r.fewer));
  }
}

// Under GPipe every forward runs before any backward: with a chunked loss each micro-batch's
// forward forms the LM head's weight gradient, so per-micro-batch head gradients would all live
// until the backwards; the head keeps its resident gradients there (and downloads them at the
// step), while under 1F1B the head downloads every micro-batch like the layers.
TEST_CASE("program memory: with gradients on the host and a chunked loss, the head under GPipe "
          "keeps its gradients until the step" *
          doctest::test_suite("plumbing")) {
  for (auto schedule :
       {strategy::PipelineSchedule::gpipe, strategy::PipelineSchedule::one_f_one_b}) {
    const bool gpipe = schedule == strategy::PipelineSchedule::gpipe;
    CAPTURE(gpipe);
    mop::test::Case k;
    k.spec = mop::test::deeper("tiny-moe", 4);
    k.config = real::tiny_config(k.spec);
    k.plan = plan(2, 4, [&](Plan& p) {
      p.pp = 2;
      p.schedule = schedule;
      p.chunked_loss = true;
      p.optimizer_on_host = true;
      p.optimizer = strategy::Placement::host;
      p.grads = strategy::Placement::host;
    });
    lowering::ProgramContext c{&k.spec, 16, 8};
    c.loss_chunk_tokens = 4; // 16 rows in 4 chunks
    k.schedule = lowering::lower_program(k.plan, c);
    sim::check_schedule(k.schedule);
    const sim::RankClass& last = k.schedule.classes[1];
    int resident = 0, head_downloads = 0, layer_downloads = 0;
    for (const sim::Tensor& t : last.tensors)
      resident += t.resident && t.role == sim::TensorRole::grad ? 1 : 0;
    for (const sim::Op& op : last.ops) {
      head_downloads += op.name.rfind("head.grad_download", 0) == 0 ? 1 : 0;
      layer_downloads += op.name.rfind("L2.dense.grad_download.mb", 0) == 0 ? 1 : 0;
    }
    CHECK(resident == (gpipe ? 2 : 0)); // the final norm's and the LM head's
    CHECK(head_downloads == (gpipe ? 1 : 4));
    CHECK(layer_downloads == 4); // layer 2's MLP on the last stage, every micro-batch
    mop::test::expect_held_together(k);
  }
}

} // namespace lowering_program_memory_test
