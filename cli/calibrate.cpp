// mop calibrate: measure this machine's GPU (device 0) and host with microbenchmarks and write the
// calibration file that `--calibration` reads (docs/CALIBRATION.md): launch costs, HBM and
// pinned PCIe bandwidths, BF16 GEMM and grouped-GEMM times over shapes, the host AdamW rate per
// core and the host's memory bandwidth, with the GPU and the library versions it measured.
#include "cli/commands.hpp"
#include "cli/output.hpp"
#include "common/error.hpp"
#include "common/file_io.hpp"
#include "hw_models/calibration.hpp"
#include "real_backend/cpu/host_measure.hpp"
#include "real_backend/cuda/api.hpp"

#include <algorithm>
#include <fmt/format.h>
#include <iostream>
#include <memory>
#include <thread>

namespace mop::cli {

namespace {

struct CalibrateArgs {
  std::string out = "calibration.json";
  bool quick = false, json = false;
};

hw::Calibration to_calibration(const real::cuda::DeviceMeasurements& m) {
  hw::Calibration c;
  for (const real::cuda::GemmTiming& g : m.gemm)
    c.gemm.push_back({hw::Dtype::bf16, g.groups, static_cast<double>(g.m), static_cast<double>(g.n),
                      static_cast<double>(g.k), g.time_s});
  c.hbm_bytes_per_s = m.hbm_bytes_per_s;
  c.h2d_bytes_per_s = m.h2d_bytes_per_s;
  c.d2h_bytes_per_s = m.d2h_bytes_per_s;
  c.pcie_duplex_factor = m.pcie_duplex_factor;
  c.kernel_launch_s = m.kernel_launch_s;
  c.host_launch_s = m.host_launch_s;
  const real::cuda::LibraryVersions& v = m.versions;
  c.device = {{"name", m.device.name},
              {"compute_capability", m.device.compute_capability},
              {"sms", m.device.sms},
              {"memory_bytes", m.device.memory_bytes},
              {"l2_bytes", m.device.l2_bytes},
              {"clock_hz", m.device.clock_hz},
              {"versions",
               {{"driver", v.driver},
                {"runtime", v.runtime},
                {"cublaslt", v.cublaslt},
                {"cudnn", v.cudnn},
                {"nccl", v.nccl},
                {"summary", v.describe()}}},
              {"grouped_gemm_path", m.grouped_gemm_path}};
  return c;
}

void calibrate(const CalibrateArgs& a) {
  std::string why;
  const real::cuda::Api* api = real::cuda::load_api(why);
  if (api == nullptr)
    throw InputError(fmt::format("mop calibrate measures a GPU, and {}", why));
  int gpus = 0;
  const std::string reason = api->probe(gpus);
  if (gpus == 0)
    throw InputError(fmt::format("mop calibrate measures a GPU: {}", reason));
  check_output_path(a.out); // before minutes of measuring, not after
  auto progress = [](const std::string& line) { std::cerr << "calibrate: " << line << "\n"; };
  real::cuda::CalibrateOptions o;
  o.quick = a.quick;
  o.progress = progress;
  real::cuda::DeviceMeasurements m;
  const std::string failed = api->calibrate(o, m);
  if (!failed.empty())
    throw InputError("the GPU measurements failed: " + failed);
  hw::Calibration c = to_calibration(m);
  // The host: AdamW on one core and on every core, and the memory bandwidth of every core.
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const std::size_t params = a.quick ? (std::size_t{16} << 20) : (std::size_t{64} << 20);
  const int reps = a.quick ? 3 : 7;
  c.host_adam.push_back({1, real::measure_host_adam_params_per_s(params, 1, reps)});
  if (cores > 1)
    c.host_adam.push_back({cores, real::measure_host_adam_params_per_s(params, cores, reps)});
  c.host_memory_bytes_per_s = real::measure_host_copy_bytes_per_s(
      a.quick ? (std::size_t{256} << 20) : (std::size_t{1} << 30), cores, reps);
  c.device["host_cores"] = cores;
  progress(fmt::format("host: AdamW {:.2e} params/s on 1 core, {:.2e} on {}; memory {:.0f} GB/s",
                       c.host_adam.front().params_per_s, c.host_adam.back().params_per_s, cores,
                       1e-9 * *c.host_memory_bytes_per_s));
  const std::string description =
      fmt::format("measured by mop calibrate{} on {} ({})", a.quick ? " --quick" : "",
                  m.device.name, m.versions.describe());
  const Json file = hw::calibration_to_json(c, description);
  // What is written must load back as it was measured.
  hw::calibration_from_json(file, a.out);
  write_output_file(a.out, file.dump(2) + "\n");
  if (a.json) {
    print_json({{"out", a.out}, {"calibration", file}});
    return;
  }
  double best = 0;
  for (const hw::GemmPoint& g : c.gemm)
    if (g.groups == 1)
      best = std::max(best, 2 * g.m * g.n * g.k / g.time_s);
  std::cout << fmt::format(
      "{} ({} SMs), {}\n"
      "  launch        {:.2f} us per kernel (GPU), {:.2f} us per call (host)\n"
      "  HBM           {:.0f} GB/s\n"
      "  PCIe pinned   {:.1f} / {:.1f} GB/s (to / from the GPU), both at once {:.2f}x\n"
      "  GEMM BF16     {} shapes, best {:.0f} TFLOP/s\n"
      "  host AdamW    {:.2e} params/s per core, {:.2e} on {} cores\n"
      "written to {}\n",
      m.device.name, m.device.sms, m.versions.describe(), 1e6 * m.kernel_launch_s,
      1e6 * m.host_launch_s, 1e-9 * m.hbm_bytes_per_s, 1e-9 * m.h2d_bytes_per_s,
      1e-9 * m.d2h_bytes_per_s, m.pcie_duplex_factor, c.gemm.size(), 1e-12 * best,
      c.host_adam.front().params_per_s, c.host_adam.back().params_per_s, cores, a.out);
}

} // namespace

void add_calibrate_command(CLI::App& app) {
  auto a = std::make_shared<CalibrateArgs>();
  CLI::App* cmd = app.add_subcommand(
      "calibrate", "Measure this machine's GPU and host and write a calibration file for "
                   "--calibration (needs a GPU)\n\nExample:\n  mop calibrate --quick --out "
                   "h200.json\n  mop plan --model kimi-k2 --cluster h200 --nodes 12 --seq 128K "
                   "--calibration h200.json");
  cmd->add_option("--out", a->out, "the calibration file to write")->capture_default_str();
  cmd->add_flag("--quick", a->quick, "fewer shapes and repetitions (about a minute)");
  add_output_options(cmd, a->json);
  cmd->callback([a] { calibrate(*a); });
}

} // namespace mop::cli
