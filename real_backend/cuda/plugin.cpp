// libmop_cuda.so's table of entry points (real_backend/cuda/api.hpp): each catches what the
// backend throws and returns it as a sentence.
#include "real_backend/cuda/api.hpp"

#include "real_backend/cuda/device_kernels.hpp"
#include "real_backend/cuda/device_probe.hpp"
#include "real_backend/cuda/nccl.hpp"

#include <cuda_runtime_api.h>

#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>

namespace mop::real::cuda {
namespace {

template <class F> std::string guarded(F&& f) {
  try {
    f();
    return "";
  } catch (const std::exception& e) {
    return e.what();
  } catch (...) {
    return "the CUDA backend failed with an unknown exception";
  }
}

std::string probe(int& device_count) {
  device_count = 0;
  std::string reason;
  const std::string err = guarded([&] {
    const DeviceProbe p = probe_devices();
    device_count = p.device_count;
    reason = p.reason;
  });
  return err.empty() ? reason : err;
}

std::string versions(LibraryVersions& out) {
  return guarded([&] { out = library_versions(); });
}

std::string calibrate(const CalibrateOptions& options, DeviceMeasurements& out) {
  return guarded([&] { out = measure_device(options); });
}

// A kernel entry point of the table: nullptr, or the failure kept for this thread.
template <class F> const char* status(F&& f) {
  thread_local std::string last;
  try {
    f();
    return nullptr;
  } catch (const std::exception& e) {
    last = e.what();
  } catch (...) {
    last = "a CUDA kernel failed with an unknown exception";
  }
  return last.c_str();
}

KernelTable kernel_table() {
  KernelTable t{};
  t.set_device = [](int device) {
    return status([&] {
      const cudaError_t e = cudaSetDevice(device);
      if (e != cudaSuccess)
        throw std::runtime_error(std::string("cudaSetDevice: ") + cudaGetErrorString(e));
    });
  };
  t.managed_alloc = [](std::size_t bytes, void** out) {
    return status([&] { *out = dev::managed_alloc(bytes); });
  };
  t.managed_free = [](void* p) { dev::managed_free(p); };
  t.sync = [] { return status([] { dev::sync(); }); };
  t.gemm = [](int m, int n, int k, const float* a, bool ta, const float* b, bool tb, float* c,
              bool acc) { return status([&] { dev::gemm(m, n, k, a, ta, b, tb, c, acc); }); };
  t.rmsnorm_fwd = [](int rows, int dim, const float* x, const float* w, double eps, float* y,
                     float* rstd) {
    return status([&] { dev::rmsnorm_fwd(rows, dim, x, w, eps, y, rstd); });
  };
  t.rmsnorm_bwd = [](int rows, int dim, const float* x, const float* w, const float* rstd,
                     const float* dy, float* dx, float* dw) {
    return status([&] { dev::rmsnorm_bwd(rows, dim, x, w, rstd, dy, dx, dw); });
  };
  t.rope = [](int tokens, int heads, int head_dim, const std::int64_t* pos, double theta, float* x,
              bool inverse) {
    return status([&] { dev::rope(tokens, heads, head_dim, pos, theta, x, inverse); });
  };
  t.swiglu_fwd = [](std::size_t n, const float* g, const float* u, float* o) {
    return status([&] { dev::swiglu_fwd(n, g, u, o); });
  };
  t.swiglu_bwd = [](std::size_t n, const float* g, const float* u, const float* d, float* dg,
                    float* du) { return status([&] { dev::swiglu_bwd(n, g, u, d, dg, du); }); };
  t.attention_fwd = [](const AttentionParams& p, int tq, int tk, const float* q, const float* k,
                       const float* v, const std::int64_t* qp, const std::int64_t* kp, float* o,
                       float* lse) {
    return status([&] { dev::attention_fwd(p, tq, tk, q, k, v, qp, kp, o, lse); });
  };
  t.attention_merge = [](int tq, int heads, int v_dim, float* oa, float* la, const float* ob,
                         const float* lb) {
    return status([&] { dev::attention_merge(tq, heads, v_dim, oa, la, ob, lb); });
  };
  t.attention_bwd = [](const AttentionParams& p, int tq, int tk, const float* q, const float* k,
                       const float* v, const std::int64_t* qp, const std::int64_t* kp,
                       const float* o, const float* lse, const float* d, float* dq, float* dk,
                       float* dv) {
    return status([&] { dev::attention_bwd(p, tq, tk, q, k, v, qp, kp, o, lse, d, dq, dk, dv); });
  };
  t.cross_entropy = [](int rows, int vocab, const float* logits, const std::int32_t* labels,
                       double scale, float* dl, double* total) {
    return status([&] { *total = dev::cross_entropy(rows, vocab, logits, labels, scale, dl); });
  };
  t.router_topk_fwd = [](int rows, int experts, int k, bool norm, const float* logits, float* probs,
                         std::int32_t* idx, float* w) {
    return status([&] { dev::router_topk_fwd(rows, experts, k, norm, logits, probs, idx, w); });
  };
  t.router_topk_bwd = [](int rows, int experts, int k, bool norm, const float* probs,
                         const std::int32_t* idx, const float* dw, float* dl) {
    return status([&] { dev::router_topk_bwd(rows, experts, k, norm, probs, idx, dw, dl); });
  };
  t.gather_rows = [](int n, int dim, const float* src, const std::int32_t* index, float* dst) {
    return status([&] { dev::gather_rows(n, dim, src, index, dst); });
  };
  t.scatter_add_rows = [](int n, int dim, const float* src, const std::int32_t* index, float* dst) {
    return status([&] { dev::scatter_add_rows(n, dim, src, index, dst); });
  };
  t.adamw = [](std::size_t n, const AdamWParams& p, std::int64_t step, float* param,
               const float* grad, float* m,
               float* v) { return status([&] { dev::adamw(n, p, step, param, grad, m, v); }); };
  return t;
}

// Elem (real_backend/cpu/comm.hpp: none, f32, f64, i32, i64) as NCCL's type.
NcclType nccl_type(int elem) {
  switch (elem) {
  case 1:
    return NcclType::f32;
  case 2:
    return NcclType::f64;
  case 3:
    return NcclType::i32;
  case 4:
    return NcclType::i64;
  default:
    break;
  }
  throw std::invalid_argument("a collective of no element type");
}

const NcclComm& comm_of(void* c) {
  if (c == nullptr)
    throw std::invalid_argument("a collective on a communicator this rank is not part of");
  return *static_cast<const NcclComm*>(c);
}

std::vector<std::size_t> counts(const std::size_t* c, std::size_t n) {
  return std::vector<std::size_t>(c, c + n);
}

NcclTable nccl_table() {
  NcclTable t{};
  t.new_id = [](unsigned char* out, std::size_t size) {
    return status([&] {
      const std::vector<unsigned char> id = nccl_unique_id("");
      if (id.size() != size)
        throw std::invalid_argument("the NCCL id's size is not the caller's");
      std::memcpy(out, id.data(), size);
    });
  };
  t.world = [](const unsigned char* id, std::size_t size, int ranks, int rank, void** comm) {
    return status([&] {
      *comm = new NcclComm(
          NcclComm::world_from_id(std::vector<unsigned char>(id, id + size), ranks, rank));
    });
  };
  t.split = [](void* comm, int color, int key, void** out) {
    return status([&] {
      NcclComm part = comm_of(comm).split(color, key);
      *out = part.valid() ? new NcclComm(std::move(part)) : nullptr;
    });
  };
  t.destroy = [](void* comm) { delete static_cast<NcclComm*>(comm); };
  t.all_reduce = [](void* c, void* data, std::size_t n, int elem, bool max) {
    return status([&] { sync_all_reduce(comm_of(c), data, n, nccl_type(elem), max); });
  };
  t.all_gather = [](void* c, const void* send, void* recv, std::size_t n, int elem) {
    return status([&] { sync_all_gather(comm_of(c), send, recv, n, nccl_type(elem)); });
  };
  t.reduce_scatter = [](void* c, const void* send, void* recv, std::size_t n, int elem) {
    return status([&] { sync_reduce_scatter(comm_of(c), send, recv, n, nccl_type(elem)); });
  };
  t.all_to_all_v = [](void* c, const void* send, const std::size_t* sc, void* recv,
                      const std::size_t* rc, int elem) {
    return status([&] {
      const auto n = static_cast<std::size_t>(comm_of(c).size());
      sync_all_to_all_v(comm_of(c), send, counts(sc, n), recv, counts(rc, n), nccl_type(elem));
    });
  };
  t.ring = [](void* c, const void* send, void* recv, std::size_t n, int shift, int elem) {
    return status(
        [&] { sync_send_recv_ring(comm_of(c), send, recv, n, shift, nccl_type(elem)); });
  };
  return t;
}

} // namespace
} // namespace mop::real::cuda

extern "C" const mop::real::cuda::Api* mop_cuda_api() {
  static const mop::real::cuda::Api api{mop::real::cuda::Api::kVersion, &mop::real::cuda::probe,
                                        &mop::real::cuda::versions, &mop::real::cuda::calibrate,
                                        mop::real::cuda::kernel_table(),
                                        mop::real::cuda::nccl_table()};
  return &api;
}
