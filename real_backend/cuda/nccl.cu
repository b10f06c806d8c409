// NCCL communicators and collectives for the CUDA executor (real_backend/cuda/nccl.hpp).
#include "real_backend/cuda/nccl.hpp"

#include "real_backend/cuda/check.hpp"

#include <cstdlib>
#include <cstring>
#include <memory>
#include <cuda_runtime.h>
#include <mutex>
#include <nccl.h>
#include <stdexcept>

namespace mop::real::cuda {

namespace {

void check_nccl(ncclResult_t r, const char* call) {
  if (r != ncclSuccess)
    throw std::runtime_error(strf("%s failed: %s", call, ncclGetErrorString(r)));
}

ncclDataType_t type_of(NcclType t) {
  switch (t) {
  case NcclType::f32:
    return ncclFloat32;
  case NcclType::f64:
    return ncclFloat64;
  case NcclType::i32:
    return ncclInt32;
  case NcclType::i64:
    return ncclInt64;
  }
  return ncclFloat32;
}

std::size_t size_of(NcclType t) {
  return t == NcclType::f64 || t == NcclType::i64 ? 8 : 4;
}

ncclComm_t as_comm(void* c) {
  return static_cast<ncclComm_t>(c);
}
cudaStream_t as_stream(void* s) {
  return static_cast<cudaStream_t>(s);
}

// NCCL reads NCCL_COMM_ID from the environment when it makes an id: set it for that call only.
std::mutex env_mutex;

} // namespace

std::vector<unsigned char> nccl_unique_id(const std::string& rendezvous) {
  ncclUniqueId id;
  std::memset(&id, 0, sizeof(id));
  {
    std::lock_guard<std::mutex> lock(env_mutex);
    const char* before = std::getenv("NCCL_COMM_ID");
    const std::string saved = before ? before : "";
    if (!rendezvous.empty())
      ::setenv("NCCL_COMM_ID", rendezvous.c_str(), 1);
    const ncclResult_t r = ncclGetUniqueId(&id);
    if (before)
      ::setenv("NCCL_COMM_ID", saved.c_str(), 1);
    else
      ::unsetenv("NCCL_COMM_ID");
    check_nccl(r, "ncclGetUniqueId");
  }
  const auto* b = reinterpret_cast<const unsigned char*>(&id);
  return std::vector<unsigned char>(b, b + sizeof(id));
}

NcclComm::~NcclComm() {
  if (comm_)
    ncclCommDestroy(as_comm(comm_));
}
NcclComm::NcclComm(NcclComm&& o) noexcept : comm_(o.comm_) {
  o.comm_ = nullptr;
}
NcclComm& NcclComm::operator=(NcclComm&& o) noexcept {
  if (this != &o) {
    if (comm_)
      ncclCommDestroy(as_comm(comm_));
    comm_ = o.comm_;
    o.comm_ = nullptr;
  }
  return *this;
}

NcclComm NcclComm::world(const std::string& rendezvous, int world_size, int rank) {
  if (world_size > 1 && rendezvous.empty())
    throw std::invalid_argument("a world of several processes needs a meeting point");
  // With NCCL_COMM_ID the id only encodes the address; rank 0's init starts the bootstrap root
  // there. A world of one makes its own id.
  const std::vector<unsigned char> bytes = nccl_unique_id(world_size > 1 ? rendezvous : "");
  ncclUniqueId id;
  std::memcpy(&id, bytes.data(), sizeof(id));
  NcclComm c;
  ncclComm_t comm = nullptr;
  {
    std::lock_guard<std::mutex> lock(env_mutex);
    const char* before = std::getenv("NCCL_COMM_ID");
    const std::string saved = before ? before : "";
    if (world_size > 1)
      ::setenv("NCCL_COMM_ID", rendezvous.c_str(), 1);
    const ncclResult_t r = ncclCommInitRank(&comm, world_size, id, rank);
    if (before)
      ::setenv("NCCL_COMM_ID", saved.c_str(), 1);
    else
      ::unsetenv("NCCL_COMM_ID");
    check_nccl(r, "ncclCommInitRank");
  }
  c.comm_ = comm;
  return c;
}

NcclComm NcclComm::world_from_id(const std::vector<unsigned char>& bytes, int world_size,
                                 int rank) {
  ncclUniqueId id;
  if (bytes.size() != sizeof(id))
    throw std::invalid_argument(strf("an NCCL id is %zu bytes, not %zu", sizeof(id), bytes.size()));
  std::memcpy(&id, bytes.data(), sizeof(id));
  ncclComm_t comm = nullptr;
  check_nccl(ncclCommInitRank(&comm, world_size, id, rank), "ncclCommInitRank");
  NcclComm c;
  c.comm_ = comm;
  return c;
}

NcclComm NcclComm::split(int color, int key) const {
  ncclComm_t out = nullptr;
  check_nccl(
      ncclCommSplit(as_comm(comm_), color < 0 ? NCCL_SPLIT_NOCOLOR : color, key, &out, nullptr),
      "ncclCommSplit");
  NcclComm c;
  c.comm_ = out;
  return c;
}

int NcclComm::rank() const {
  int r = 0;
  check_nccl(ncclCommUserRank(as_comm(comm_), &r), "ncclCommUserRank");
  return r;
}

int NcclComm::size() const {
  int n = 0;
  check_nccl(ncclCommCount(as_comm(comm_), &n), "ncclCommCount");
  return n;
}

void NcclComm::all_reduce(void* data, std::size_t n, NcclType t, bool max, void* stream) const {
  check_nccl(ncclAllReduce(data, data, n, type_of(t), max ? ncclMax : ncclSum, as_comm(comm_),
                           as_stream(stream)),
             "ncclAllReduce");
}

void NcclComm::all_gather(const void* send, void* recv, std::size_t n, NcclType t,
                          void* stream) const {
  check_nccl(ncclAllGather(send, recv, n, type_of(t), as_comm(comm_), as_stream(stream)),
             "ncclAllGather");
}

void NcclComm::reduce_scatter(const void* send, void* recv, std::size_t n, NcclType t,
                              void* stream) const {
  check_nccl(
      ncclReduceScatter(send, recv, n, type_of(t), ncclSum, as_comm(comm_), as_stream(stream)),
      "ncclReduceScatter");
}

void NcclComm::all_to_all_v(const void* send, const std::vector<std::size_t>& send_counts,
                            void* recv, const std::vector<std::size_t>& recv_counts, NcclType t,
                            void* stream) const {
  const int n = size();
  if (static_cast<int>(send_counts.size()) != n || static_cast<int>(recv_counts.size()) != n)
    throw std::invalid_argument("all_to_all_v needs one count per member");
  const std::size_t el = size_of(t);
  check_nccl(ncclGroupStart(), "ncclGroupStart");
  std::size_t so = 0, ro = 0;
  for (int r = 0; r < n; ++r) {
    const auto i = static_cast<std::size_t>(r);
    if (send_counts[i] > 0)
      check_nccl(ncclSend(static_cast<const char*>(send) + so * el, send_counts[i], type_of(t), r,
                          as_comm(comm_), as_stream(stream)),
                 "ncclSend");
    if (recv_counts[i] > 0)
      check_nccl(ncclRecv(static_cast<char*>(recv) + ro * el, recv_counts[i], type_of(t), r,
                          as_comm(comm_), as_stream(stream)),
                 "ncclRecv");
    so += send_counts[i];
    ro += recv_counts[i];
  }
  check_nccl(ncclGroupEnd(), "ncclGroupEnd");
}

void NcclComm::send_recv_ring(const void* send, void* recv, std::size_t n, int shift, NcclType t,
                              void* stream) const {
  const int size_ = size(), me = rank();
  const int to = ((me + shift) % size_ + size_) % size_;
  const int from = ((me - shift) % size_ + size_) % size_;
  send_recv(send, n, to, recv, n, from, t, stream);
}

void NcclComm::send_recv(const void* send, std::size_t send_n, int to, void* recv,
                         std::size_t recv_n, int from, NcclType t, void* stream) const {
  check_nccl(ncclGroupStart(), "ncclGroupStart");
  if (to >= 0 && send_n > 0)
    check_nccl(ncclSend(send, send_n, type_of(t), to, as_comm(comm_), as_stream(stream)),
               "ncclSend");
  if (from >= 0 && recv_n > 0)
    check_nccl(ncclRecv(recv, recv_n, type_of(t), from, as_comm(comm_), as_stream(stream)),
               "ncclRecv");
  check_nccl(ncclGroupEnd(), "ncclGroupEnd");
}

// ---- synchronous calls with host staging ----------------------------------------------------

namespace {

void check_cuda(cudaError_t e, const char* call) {
  if (e != cudaSuccess)
    throw std::runtime_error(strf("%s failed: %s", call, cudaGetErrorString(e)));
}

// The stream the synchronous calls run on, made once per process.
cudaStream_t collective_stream() {
  static cudaStream_t s = [] {
    cudaStream_t made = nullptr;
    check_cuda(cudaStreamCreateWithFlags(&made, cudaStreamNonBlocking), "cudaStreamCreate");
    return made;
  }();
  return s;
}

bool device_reachable(const void* p) {
  if (p == nullptr)
    return true;
  cudaPointerAttributes a{};
  if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
    (void)cudaGetLastError(); // an unregistered host pointer on older runtimes
    return false;
  }
  return a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged;
}

// A buffer NCCL can use: `p` itself, or a device copy of its `bytes` (copied in when `in`,
// back out by finish() when `out`).
class Staged {
public:
  Staged(const void* p, std::size_t bytes, bool in, bool out)
      : host_(const_cast<void*>(p)), bytes_(bytes), out_(out) {
    if (device_reachable(p) || bytes == 0) {
      dev_ = host_;
      return;
    }
    check_cuda(cudaMalloc(&dev_, bytes), "cudaMalloc");
    owned_ = true;
    if (in)
      check_cuda(cudaMemcpyAsync(dev_, host_, bytes, cudaMemcpyHostToDevice, collective_stream()),
                 "cudaMemcpyAsync");
  }
  ~Staged() {
    if (owned_)
      cudaFree(dev_);
  }
  Staged(const Staged&) = delete;
  Staged& operator=(const Staged&) = delete;
  void* get() const { return dev_; }
  void finish() {
    if (owned_ && out_)
      check_cuda(cudaMemcpyAsync(host_, dev_, bytes_, cudaMemcpyDeviceToHost, collective_stream()),
                 "cudaMemcpyAsync");
  }

private:
  void* host_;
  void* dev_ = nullptr;
  std::size_t bytes_;
  bool out_;
  bool owned_ = false;
};

void wait() {
  check_cuda(cudaStreamSynchronize(collective_stream()), "cudaStreamSynchronize");
}

std::size_t sum(const std::vector<std::size_t>& v) {
  std::size_t s = 0;
  for (std::size_t x : v)
    s += x;
  return s;
}

} // namespace

void sync_all_reduce(const NcclComm& c, void* data, std::size_t n, NcclType t, bool max) {
  Staged d(data, n * size_of(t), true, true);
  c.all_reduce(d.get(), n, t, max, collective_stream());
  d.finish();
  wait();
}

void sync_all_gather(const NcclComm& c, const void* send, void* recv, std::size_t n, NcclType t) {
  const std::size_t bytes = n * size_of(t);
  Staged r(recv, bytes * static_cast<std::size_t>(c.size()), true, true);
  // In place (send inside recv) stays in place in the staged copy.
  const auto* s = static_cast<const char*>(send);
  const auto* base = static_cast<const char*>(recv);
  const bool inside = s >= base && s < base + bytes * static_cast<std::size_t>(c.size());
  std::unique_ptr<Staged> own;
  const void* sp = nullptr;
  if (inside) {
    sp = static_cast<char*>(r.get()) + (s - base);
  } else {
    own = std::make_unique<Staged>(send, bytes, true, false);
    sp = own->get();
  }
  c.all_gather(sp, r.get(), n, t, collective_stream());
  r.finish();
  wait();
}

void sync_reduce_scatter(const NcclComm& c, const void* send, void* recv, std::size_t n,
                         NcclType t) {
  const std::size_t bytes = n * size_of(t);
  Staged s(send, bytes * static_cast<std::size_t>(c.size()), true, true);
  const auto* sb = static_cast<const char*>(send);
  const auto* rb = static_cast<const char*>(recv);
  const bool inside = rb >= sb && rb < sb + bytes * static_cast<std::size_t>(c.size());
  if (inside) { // in place: the result lands inside the staged send buffer, copied back whole
    c.reduce_scatter(s.get(), static_cast<char*>(s.get()) + (rb - sb), n, t, collective_stream());
    s.finish();
    wait();
    return;
  }
  Staged r(recv, bytes, false, true);
  c.reduce_scatter(s.get(), r.get(), n, t, collective_stream());
  r.finish();
  wait();
}

void sync_all_to_all_v(const NcclComm& c, const void* send,
                       const std::vector<std::size_t>& send_counts, void* recv,
                       const std::vector<std::size_t>& recv_counts, NcclType t) {
  Staged s(send, sum(send_counts) * size_of(t), true, false);
  Staged r(recv, sum(recv_counts) * size_of(t), false, true);
  c.all_to_all_v(s.get(), send_counts, r.get(), recv_counts, t, collective_stream());
  r.finish();
  wait();
}

void sync_send_recv_ring(const NcclComm& c, const void* send, void* recv, std::size_t n, int shift,
                         NcclType t) {
  Staged s(send, n * size_of(t), true, false);
  Staged r(recv, n * size_of(t), false, true);
  c.send_recv_ring(s.get(), r.get(), n, shift, t, collective_stream());
  r.finish();
  wait();
}

} // namespace mop::real::cuda
