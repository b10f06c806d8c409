#pragma once
// Asks the CUDA runtime how many GPUs this process can use. The header includes no CUDA header:
// CPU code calls it through this plain interface.
#include <string>

namespace mop::real {

struct DeviceProbe {
  int device_count = 0; // 0 when no GPU or no driver
  std::string reason;   // why there is no GPU, in one sentence, when device_count == 0
};

DeviceProbe probe_devices();

// Runs a one-element kernel on device 0 and returns its result (x + 1); only with a GPU.
float add_one_on_device(float x);

} // namespace mop::real
