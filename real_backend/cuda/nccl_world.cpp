#include "real_backend/cuda/nccl_world.hpp"

#include "real_backend/cuda/api.hpp"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace mop::real::cuda {

namespace {

constexpr std::size_t kIdBytes = 128; // sizeof(ncclUniqueId)

const NcclTable& table() {
  std::string why;
  const Api* api = load_api(why);
  if (api == nullptr)
    throw CommError("NCCL is used before the CUDA backend was loaded: " + why);
  return api->nccl;
}

void check(const char* failure) {
  if (failure != nullptr)
    throw CommError(failure);
}

// One communicator handle of the backend, destroyed with the last Link that uses it.
struct Handle {
  void* comm = nullptr;
  explicit Handle(void* c) : comm(c) {}
  ~Handle() {
    if (comm != nullptr)
      table().destroy(comm);
  }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
};

class NcclLink : public Link {
public:
  explicit NcclLink(std::shared_ptr<Handle> h) : h_(std::move(h)) {}
  void all_reduce(void* data, std::size_t n, Elem e, bool max) override {
    check(table().all_reduce(h_->comm, data, n, static_cast<int>(e), max));
  }
  void all_gather(const void* send, std::size_t n, Elem e, void* recv) override {
    check(table().all_gather(h_->comm, send, recv, n, static_cast<int>(e)));
  }
  void reduce_scatter(const void* send, std::size_t n, Elem e, void* recv) override {
    check(table().reduce_scatter(h_->comm, send, recv, n, static_cast<int>(e)));
  }
  void all_to_all_v(const void* send, const std::vector<std::size_t>& send_counts, void* recv,
                    const std::vector<std::size_t>& recv_counts, Elem e) override {
    check(table().all_to_all_v(h_->comm, send, send_counts.data(), recv, recv_counts.data(),
                               static_cast<int>(e)));
  }
  void send_recv_ring(const void* send, void* recv, std::size_t n, int shift, Elem e) override {
    check(table().ring(h_->comm, send, recv, n, shift, static_cast<int>(e)));
  }
  void barrier() override {
    float x = 0;
    check(table().all_reduce(h_->comm, &x, 1, static_cast<int>(Elem::f32), false));
  }

private:
  std::shared_ptr<Handle> h_;
};

class NcclWorld : public ProcessWorld {
public:
  explicit NcclWorld(std::unique_ptr<ProcessWorld> tcp) : tcp_(std::move(tcp)) {
    const int n = tcp_->size();
    std::vector<int> all(static_cast<std::size_t>(n));
    for (int r = 0; r < n; ++r)
      all[static_cast<std::size_t>(r)] = r;
    // Rank 0's id, handed to every rank: a sum where the others add zeroes.
    std::vector<std::int64_t> words(kIdBytes / 8, 0);
    if (tcp_->rank() == 0) {
      std::vector<unsigned char> id(kIdBytes);
      check(table().new_id(id.data(), id.size()));
      std::memcpy(words.data(), id.data(), kIdBytes);
    }
    tcp_->group(all)->all_reduce(words.data(), words.size(), Elem::i64, false);
    std::vector<unsigned char> id(kIdBytes);
    std::memcpy(id.data(), words.data(), kIdBytes);
    void* comm = nullptr;
    check(table().world(id.data(), id.size(), n, tcp_->rank(), &comm));
    world_ = std::make_shared<Handle>(comm);
    links_[all] = std::make_shared<NcclLink>(world_);
  }

  int size() const override { return tcp_->size(); }
  int rank() const override { return tcp_->rank(); }

  void prepare(const std::vector<std::vector<int>>& groups) override {
    for (const std::vector<int>& members : groups) {
      const auto it = std::find(members.begin(), members.end(), rank());
      const bool in = it != members.end();
      void* part = nullptr;
      check(table().split(world_->comm, in ? members.front() : -1,
                          in ? static_cast<int>(it - members.begin()) : 0, &part));
      auto h = std::make_shared<Handle>(part);
      if (in && part != nullptr && links_.find(members) == links_.end())
        links_[members] = std::make_shared<NcclLink>(h);
    }
  }

  std::shared_ptr<Link> group(const std::vector<int>& members) override {
    const auto it = links_.find(members);
    if (it == links_.end())
      throw CommError(fmt::format("group [{}] has no NCCL communicator: it is not one of the "
                                  "Schedule's groups",
                                  fmt::join(members, ", ")));
    return it->second;
  }

  void send(int to, const void* data, std::size_t n, Elem e) override {
    tcp_->send(to, data, n, e);
  }
  void recv(int from, void* data, std::size_t n, Elem e) override {
    tcp_->recv(from, data, n, e);
  }
  void abort(const std::string& why) override { tcp_->abort(why); }

private:
  std::unique_ptr<ProcessWorld> tcp_;
  std::shared_ptr<Handle> world_;
  std::map<std::vector<int>, std::shared_ptr<Link>> links_;
};

} // namespace

std::unique_ptr<ProcessWorld> nccl_world(std::unique_ptr<ProcessWorld> tcp) {
  return std::make_unique<NcclWorld>(std::move(tcp));
}

} // namespace mop::real::cuda
