#include "real_backend/cpu/interpreter.hpp"

#include "real_backend/cpu/interpreter_impl.hpp"

namespace mop::real {

using sim::Kernel;

std::string op_count_key(const sim::Op& op) {
  if (op.kernel == Kernel::collective || sim::is_collective(op.kind))
    return sim::op_kind_name(op.kind);
  return sim::kernel_name(op.kernel);
}

void check_interpretable(const sim::Schedule& s, const TinyConfig& c) {
  for (const sim::RankClass& rc : s.classes)
    for (const sim::Op& op : rc.ops)
      if (op.kernel == Kernel::none)
        throw InputError(fmt::format("the CPU interpreter cannot run op '{}' of {}: it is priced "
                                     "only (no kernel)",
                                     op.name, rc.name));
  const auto layout = param_layout(c);
  for (const sim::ParamSpec& ps : s.params) {
    const bool known = std::any_of(layout.begin(), layout.end(), [&](const ParamInfo& p) {
      return p.name == ps.name && p.shape == ps.shape;
    });
    if (!known)
      throw InputError(
          fmt::format("the Schedule's parameter '{}' is not one of model '{}'", ps.name, c.name));
  }
  if (s.tokens.seq_len <= 0 || s.tokens.global_batch <= 0)
    throw InputError("the Schedule has no token layout to run");
}

template <class T>
RunResult<T> interpret(const sim::Schedule& s, const TinyConfig& c, const DataSource& data,
                       const TrainState<T>& start, const RunOptions& o, World* process) {
  return interpret_with<T, CpuKernels>(s, c, data, start, o, process);
}

template RunResult<float> interpret<float>(const sim::Schedule&, const TinyConfig&,
                                           const DataSource&, const TrainState<float>&,
                                           const RunOptions&, World*);
template RunResult<double> interpret<double>(const sim::Schedule&, const TinyConfig&,
                                             const DataSource&, const TrainState<double>&,
                                             const RunOptions&, World*);

} // namespace mop::real
