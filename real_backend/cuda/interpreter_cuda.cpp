// The program interpreter instantiated on the CUDA backend's policy (backend.hpp). Host code:
// built into the program, calling the kernels of libmop_cuda.so through its table.
#include "real_backend/cuda/backend.hpp"

#include "real_backend/cpu/interpreter_impl.hpp"

namespace mop::real::cuda {

const KernelTable& kernel_table() {
  std::string why;
  const Api* api = load_api(why);
  if (api == nullptr)
    throw std::logic_error("the CUDA backend's kernels are used before it was loaded: " + why);
  return api->kernels;
}

void select_device(int device) {
  check(kernel_table().set_device(device));
}

RunResult<float> interpret(const sim::Schedule& s, const TinyConfig& c, const DataSource& data,
                           const TrainState<float>& start, const RunOptions& options,
                           World* process) {
  return interpret_with<float, CudaKernels>(s, c, data, start, options, process);
}

} // namespace mop::real::cuda
