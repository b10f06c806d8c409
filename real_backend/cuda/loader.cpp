// Loads libmop_cuda.so from the program's folder (real_backend/cuda/api.hpp). Built into every
// program, with or without the CUDA toolkit: it needs only the dynamic loader.
#include "real_backend/cuda/api.hpp"

#include <cstdlib>
#include <dlfcn.h>
#include <mutex>
#include <string>
#include <unistd.h>

namespace mop::real::cuda {

const Api* load_api(std::string& why) {
  static std::once_flag once;
  static const Api* api = nullptr;
  static std::string reason;
  std::call_once(once, [] {
    char exe[4096];
    const ssize_t n = ::readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    std::string dir = n > 0 ? std::string(exe, static_cast<std::size_t>(n)) : std::string(".");
    dir = dir.substr(0, dir.find_last_of('/') == std::string::npos ? 0 : dir.find_last_of('/'));
    std::string path = (dir.empty() ? std::string(".") : dir) + "/libmop_cuda.so";
    // MOP_CUDA_LIBRARY names another copy (the GPU tests, an installation elsewhere).
    if (const char* other = std::getenv("MOP_CUDA_LIBRARY"); other != nullptr && *other != '\0')
      path = other;
    if (::access(path.c_str(), F_OK) != 0) {
      reason = "this build has no CUDA backend (" + path +
               " does not exist: nvcc was not found when it was configured)";
      return;
    }
    void* lib = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) {
      const char* e = ::dlerror();
      reason = std::string("the CUDA backend cannot be loaded (") + (e ? e : "unknown error") +
               "); put cuBLASLt, cuDNN and NCCL on LD_LIBRARY_PATH";
      return;
    }
    using Entry = const Api* (*)();
    const auto entry = reinterpret_cast<Entry>(::dlsym(lib, "mop_cuda_api"));
    const Api* table = entry ? entry() : nullptr;
    if (table == nullptr || table->version != Api::kVersion) {
      reason = "libmop_cuda.so beside the program belongs to another build of mop";
      return;
    }
    api = table;
  });
  why = reason;
  return api;
}

} // namespace mop::real::cuda
