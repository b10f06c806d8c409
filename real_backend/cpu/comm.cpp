#include "real_backend/cpu/comm.hpp"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <exception>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <map>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>

// How a collective call runs (the rendezvous). Each group has one slot per member and a reusable
// barrier (a count and a generation number, under the group's mutex and condition variable).
//
//   1. arrive: the member writes its arguments (call kind, element type, sizes, buffer pointers)
//      into its slot and waits at the barrier. The last member to arrive checks that all slots
//      agree; a mismatch is recorded and every member throws the same sentence.
//   2. Every member reads what it needs straight from the other members' buffers, outside the
//      lock. Reductions go into a fresh accumulator in group-rank order 0, 1, 2, ..., so the result
//      does not depend on which thread arrived first.
//   3. sync: a barrier that nobody leaves before every member has finished reading, so the
//      buffers named in the slots stay valid; only then does a member write its in-place results or
//      return.
//
// Only the wait in step 1 can be interrupted (by an abort or a deadlock): before every member
// has arrived nobody reads anybody's buffers, so leaving is safe. A member that leaves marks the
// group broken, so the barrier can never complete without it. After step 1 completes, every
// member is guaranteed to reach the later barriers (steps 2 and 3 only copy and add memory that
// was allocated before step 1), so those waits are not interruptible: letting one member return
// while another still reads its buffers would be a use after free.

namespace mop::real {

namespace {

// A CommError that a rank gets because the world was aborted elsewhere; World::run rethrows the
// original failure in preference to these.
class Aborted : public CommError {
public:
  using CommError::CommError;
};

enum class Op {
  all_reduce,
  all_reduce_max,
  all_gather,
  reduce_scatter,
  all_to_all_v,
  ring,
  barrier
};
const char* op_name(Op op) {
  switch (op) {
  case Op::all_reduce:
    return "all_reduce";
  case Op::all_reduce_max:
    return "all_reduce_max";
  case Op::all_gather:
    return "all_gather";
  case Op::reduce_scatter:
    return "reduce_scatter";
  case Op::all_to_all_v:
    return "all_to_all_v";
  case Op::ring:
    return "send_recv_ring";
  case Op::barrier:
    return "barrier";
  }
  return "?";
}

std::string list(const std::vector<int>& v) {
  return fmt::format("[{}]", fmt::join(v, ", "));
}

// One member's arguments to the call in progress.
struct Slot {
  Op op = Op::barrier;
  Elem elem = Elem::none;
  std::size_t n = 0;
  int shift = 0;
  const void* send = nullptr;
  const void* scratch = nullptr; // all_reduce: this member's reduced slice
  const std::vector<std::size_t>* send_counts = nullptr;
  const std::vector<std::size_t>* recv_counts = nullptr;
};

std::string describe(const Slot& s) {
  switch (s.op) {
  case Op::barrier:
    return "barrier";
  case Op::all_to_all_v:
    return fmt::format("all_to_all_v of {}", elem_name(s.elem));
  case Op::ring:
    return fmt::format("send_recv_ring of {} {} with shift {}", s.n, elem_name(s.elem), s.shift);
  default:
    return fmt::format("{} of {} {}", op_name(s.op), s.n, elem_name(s.elem));
  }
}

struct Message {
  Elem elem;
  std::size_t n;
  std::vector<std::byte> bytes;
};

struct Mailbox {
  std::mutex m;
  std::condition_variable cv;
  std::deque<Message> queue;
};

} // namespace

struct GroupState {
  explicit GroupState(std::vector<int> ranks)
      : members(std::move(ranks)), name(list(members)), slots(members.size()),
        calls(members.size()) {}
  int size() const { return static_cast<int>(members.size()); }

  const std::vector<int> members;
  const std::string name;
  std::mutex m;
  std::condition_variable cv;
  int count = 0;         // members at the barrier
  std::uint64_t gen = 0; // completed barriers
  std::vector<Slot> slots;
  std::vector<std::uint64_t> calls; // collectives started, per member
  std::string mismatch;             // of the call whose arrival just completed; empty if none
  std::string broken;               // why the group can no longer complete a call
};

// What a world rank is doing, for deadlock detection. A rank is `waiting` only while the
// condition it waits for (its group's arrival completing, a message in its mailbox) does not
// hold; whoever makes the condition true (the last member to arrive, the sender) sets it back to
// `running` under the same mutex as the condition, so a waiting rank can only be woken by another
// rank's action.
struct RankActivity {
  enum class State { running, waiting, finished };
  State state = State::running;
  // What it waits for (state == waiting): a group's call, or a message from `from`.
  const GroupState* group = nullptr;
  Op op = Op::barrier;
  std::uint64_t call = 0;
  const Mailbox* box = nullptr;
  int from = -1;
};

struct WorldState {
  explicit WorldState(int n) : size(n), live(n), activity(static_cast<std::size_t>(n)) {}

  const int size;
  // Deadlock detection (see wait_begins): guarded by progress_m, which is taken inside a group's
  // or a mailbox's mutex, never the other way round.
  std::mutex progress_m;
  int live;        // ranks not finished
  int waiting = 0; // ranks whose wait no action of theirs can end
  std::vector<RankActivity> activity;
  std::mutex m; // guards the two maps
  std::map<std::vector<int>, std::shared_ptr<GroupState>> groups;
  std::map<std::pair<int, int>, std::unique_ptr<Mailbox>> mailboxes;
  std::mutex abort_m;
  std::string why; // written once, before `aborted` becomes true
  std::atomic<bool> aborted{false};
};

namespace {

void abort_world(WorldState& w, const std::string& why) {
  {
    std::lock_guard lock(w.abort_m);
    if (w.aborted.load())
      return;
    w.why = why;
    w.aborted.store(true);
  }
  // Taking each waiter's mutex before notifying closes the window between a waiter's check of
  // `aborted` and its wait.
  std::lock_guard lock(w.m);
  for (auto& [members, g] : w.groups) {
    { std::lock_guard glock(g->m); }
    g->cv.notify_all();
  }
  for (auto& [key, box] : w.mailboxes) {
    { std::lock_guard block(box->m); }
    box->cv.notify_all();
  }
}

void throw_if_aborted(const WorldState& w) {
  if (w.aborted.load())
    throw Aborted(w.why);
}

// The deadlock sentence: what every rank waits for. Called under progress_m when every rank
// that has not finished is waiting.
std::string deadlock(const WorldState& w) {
  constexpr int shown = 8; // a sentence, not a dump: the first ranks tell the story
  std::string ranks;
  for (int r = 0; r < w.size && r < shown; ++r) {
    const RankActivity& a = w.activity[static_cast<std::size_t>(r)];
    if (!ranks.empty())
      ranks += "; ";
    if (a.state == RankActivity::State::finished)
      ranks += fmt::format("world rank {} has finished", r);
    else if (a.group)
      ranks += fmt::format("world rank {} waits in {} (call {}) on group {}", r, op_name(a.op),
                           a.call, a.group->name);
    else
      ranks += fmt::format("world rank {} waits in recv from rank {}", r, a.from);
  }
  if (w.size > shown)
    ranks += fmt::format("; and {} more ranks", w.size - shown);
  return fmt::format("deadlock: every rank still running waits for a call that no other rank "
                     "will make ({})",
                     ranks);
}

// Marks world rank `rank` as waiting for `what`; returns the deadlock sentence when that leaves
// no rank able to act (every rank not finished is waiting), else an empty string. The caller
// holds the mutex of the condition it waits for.
std::string wait_begins(WorldState& w, int rank, const RankActivity& what) {
  std::lock_guard lock(w.progress_m);
  RankActivity& a = w.activity[static_cast<std::size_t>(rank)];
  if (a.state != RankActivity::State::waiting)
    ++w.waiting;
  a = what;
  a.state = RankActivity::State::waiting;
  return w.waiting == w.live ? deadlock(w) : std::string();
}

// Marks world rank `rank` as running again if it waits for `group` (or `box`): called by the rank
// that makes its condition true, and by the waiter itself when it leaves on an abort.
void wait_ends(WorldState& w, int rank, const GroupState* group, const Mailbox* box) {
  std::lock_guard lock(w.progress_m);
  RankActivity& a = w.activity[static_cast<std::size_t>(rank)];
  if (a.state == RankActivity::State::waiting && a.group == group && a.box == box) {
    a.state = RankActivity::State::running;
    --w.waiting;
  }
}

// Marks world rank `rank` as finished; returns the deadlock sentence when every rank still
// running is waiting (for a rank that will now never call).
std::string rank_finishes(WorldState& w, int rank) {
  std::lock_guard lock(w.progress_m);
  RankActivity& a = w.activity[static_cast<std::size_t>(rank)];
  if (a.state == RankActivity::State::waiting)
    --w.waiting;
  a = RankActivity{};
  a.state = RankActivity::State::finished;
  --w.live;
  return w.live > 0 && w.waiting == w.live ? deadlock(w) : std::string();
}

struct Member {
  GroupState& g;
  WorldState& w;
  int me;
  int size() const { return g.size(); }
  const Slot& slot(int r) const { return g.slots[static_cast<std::size_t>(r)]; }
};

Member member(const std::shared_ptr<GroupState>& g, WorldState* w, int me) {
  if (!g || !w)
    throw CommError("a collective was called on a Comm that did not come from World::group");
  return {*g, *w, me};
}

// Every member's arguments, checked against each other; empty when they agree.
std::string check(const GroupState& g, std::uint64_t call) {
  const auto where = [&] { return fmt::format("call {} on group {}", call, g.name); };
  const Slot& s0 = g.slots[0];
  for (int r = 1; r < g.size(); ++r) {
    const Slot& s = g.slots[static_cast<std::size_t>(r)];
    const bool sized = s0.op != Op::barrier && s0.op != Op::all_to_all_v;
    if (s.op != s0.op || s.elem != s0.elem || (sized && s.n != s0.n) ||
        (s0.op == Op::ring && s.shift != s0.shift))
      return fmt::format("mismatched collectives at {}: group rank 0 called {} but group rank {} "
                         "called {}",
                         where(), describe(s0), r, describe(s));
  }
  if (s0.op != Op::all_to_all_v)
    return {};
  const auto size = static_cast<std::size_t>(g.size());
  for (std::size_t r = 0; r < size; ++r) {
    const Slot& s = g.slots[r];
    if (s.send_counts->size() != size || s.recv_counts->size() != size)
      return fmt::format("all_to_all_v at {}: group rank {} passed {} send counts and {} receive "
                         "counts for a group of {}",
                         where(), r, s.send_counts->size(), s.recv_counts->size(), size);
  }
  for (std::size_t to = 0; to < size; ++to)
    for (std::size_t from = 0; from < size; ++from) {
      const std::size_t expected = (*g.slots[to].recv_counts)[from];
      const std::size_t sent = (*g.slots[from].send_counts)[to];
      if (expected != sent)
        return fmt::format("all_to_all_v at {}: group rank {} expects {} elements from group "
                           "rank {}, which sends it {}",
                           where(), to, expected, from, sent);
    }
  return {};
}

// Step 1: publish this member's arguments and wait until every member has. Throws on every
// member if the arguments disagree, and on this member if the world is aborted, or if waiting
// leaves no rank of the world able to act (deadlock), before everyone arrived.
void arrive(const Member& m, const Slot& s) {
  GroupState& g = m.g;
  throw_if_aborted(m.w);
  std::unique_lock lock(g.m);
  if (!g.broken.empty())
    throw Aborted(g.broken);
  const auto me = static_cast<std::size_t>(m.me);
  const std::uint64_t call = ++g.calls[me];
  g.slots[me] = s;
  const std::uint64_t gen = g.gen;
  if (++g.count == g.size()) {
    g.mismatch = check(g, call);
    g.count = 0;
    ++g.gen;
    for (std::size_t r = 0; r < g.members.size(); ++r)
      if (r != me)
        wait_ends(m.w, g.members[r], &g, nullptr);
    g.cv.notify_all();
  } else {
    const int world_rank = g.members[me];
    RankActivity what;
    what.group = &g;
    what.op = s.op;
    what.call = call;
    const std::string why = wait_begins(m.w, world_rank, what);
    if (!why.empty()) {
      g.broken = why;
      lock.unlock();
      abort_world(m.w, why);
      throw CommError(why);
    }
    while (g.gen == gen) {
      if (m.w.aborted.load()) {
        g.broken = m.w.why;
        wait_ends(m.w, world_rank, &g, nullptr);
        throw Aborted(m.w.why);
      }
      g.cv.wait(lock);
    }
  }
  if (!g.mismatch.empty())
    throw CommError(g.mismatch);
}

// Step 3: wait until every member got here. Not interruptible (see the top of the file).
void sync(const Member& m) {
  GroupState& g = m.g;
  std::unique_lock lock(g.m);
  const std::uint64_t gen = g.gen;
  if (++g.count == g.size()) {
    g.count = 0;
    ++g.gen;
    g.cv.notify_all();
  } else {
    g.cv.wait(lock, [&] { return g.gen != gen; });
  }
}

struct Range {
  std::size_t lo, hi;
};

// Member r's share of n elements when they are split as evenly as possible.
Range slice(std::size_t n, int size, int r) {
  const auto s = static_cast<std::size_t>(size), i = static_cast<std::size_t>(r);
  const std::size_t base = n / s, rem = n % s;
  const std::size_t lo = i * base + std::min(i, rem);
  return {lo, lo + base + (i < rem ? 1 : 0)};
}

template <class T> const T* send_of(const Member& m, int r) {
  return static_cast<const T*>(m.slot(r).send);
}

template <class T, class Combine>
void reduce_all(const Member& m, Op op, T* data, std::size_t n, Combine combine) {
  // Each member reduces one slice (in group-rank order) and then copies every slice: the same
  // result on every member with n additions each instead of size() * n.
  const Range mine = slice(n, m.size(), m.me);
  std::vector<T> acc(mine.hi - mine.lo);
  Slot s;
  s.op = op;
  s.elem = elem_of<T>();
  s.n = n;
  s.send = data;
  s.scratch = acc.data();
  arrive(m, s);
  if (!acc.empty()) {
    const T* first = send_of<T>(m, 0);
    std::copy(first + mine.lo, first + mine.hi, acc.begin());
    for (int r = 1; r < m.size(); ++r) {
      const T* src = send_of<T>(m, r) + mine.lo;
      for (std::size_t i = 0; i < acc.size(); ++i)
        acc[i] = combine(acc[i], src[i]);
    }
  }
  sync(m); // nobody reads `data` any more
  for (int r = 0; r < m.size(); ++r) {
    const Range part = slice(n, m.size(), r);
    const T* src = static_cast<const T*>(m.slot(r).scratch);
    std::copy(src, src + (part.hi - part.lo), data + part.lo);
  }
  sync(m); // nobody reads `acc` any more
}

template <class T> T add(T a, T b) {
  return a + b;
}

// NaN-propagating, so a NaN on one rank is not silently dropped.
template <class T> T larger(T a, T b) {
  if constexpr (std::is_floating_point_v<T>) {
    if (b != b)
      return b;
  }
  return b > a ? b : a;
}

void check_rank(const WorldState& w, int rank, const char* role) {
  if (rank < 0 || rank >= w.size)
    throw std::invalid_argument(
        fmt::format("{} rank {} is not a rank of a world of {} ranks", role, rank, w.size));
}

Mailbox& mailbox(WorldState& w, int from, int to) {
  std::lock_guard lock(w.m);
  auto& box = w.mailboxes[{from, to}];
  if (!box)
    box = std::make_unique<Mailbox>();
  return *box;
}

} // namespace

// ---- Comm ----------------------------------------------------------------------------------

const char* elem_name(Elem e) {
  switch (e) {
  case Elem::none:
    return "no";
  case Elem::f32:
    return "float";
  case Elem::f64:
    return "double";
  case Elem::i32:
    return "int32";
  case Elem::i64:
    return "int64";
  }
  return "?";
}

namespace {
template <class T> void combine_as(T* acc, const T* src, std::size_t n, bool max) {
  for (std::size_t i = 0; i < n; ++i)
    acc[i] = max ? larger(acc[i], src[i]) : add(acc[i], src[i]);
}
} // namespace

void combine(Elem e, void* acc, const void* src, std::size_t n, bool max) {
  switch (e) {
  case Elem::f32:
    return combine_as(static_cast<float*>(acc), static_cast<const float*>(src), n, max);
  case Elem::f64:
    return combine_as(static_cast<double*>(acc), static_cast<const double*>(src), n, max);
  case Elem::i32:
    return combine_as(static_cast<std::int32_t*>(acc), static_cast<const std::int32_t*>(src), n,
                      max);
  case Elem::i64:
    return combine_as(static_cast<std::int64_t*>(acc), static_cast<const std::int64_t*>(src), n,
                      max);
  case Elem::none:
    break;
  }
  throw std::logic_error("a reduction of no element type");
}

std::size_t elem_size(Elem e) {
  switch (e) {
  case Elem::f32:
  case Elem::i32:
    return 4;
  case Elem::f64:
  case Elem::i64:
    return 8;
  case Elem::none:
    break;
  }
  return 0;
}

const std::vector<int>& Comm::members() const {
  static const std::vector<int> none;
  if (link_members_)
    return *link_members_;
  return group_ ? group_->members : none;
}

template <class T> void Comm::all_reduce(T* data, std::size_t n) const {
  if (link_)
    return link_->all_reduce(data, n, elem_of<T>(), false);
  reduce_all(member(group_, world_, rank_), Op::all_reduce, data, n, add<T>);
}

template <class T> void Comm::all_reduce_max(T* data, std::size_t n) const {
  if (link_)
    return link_->all_reduce(data, n, elem_of<T>(), true);
  reduce_all(member(group_, world_, rank_), Op::all_reduce_max, data, n, larger<T>);
}

template <class T> void Comm::all_gather(const T* send, std::size_t n, T* recv) const {
  if (link_)
    return link_->all_gather(send, n, elem_of<T>(), recv);
  const Member m = member(group_, world_, rank_);
  Slot s;
  s.op = Op::all_gather;
  s.elem = elem_of<T>();
  s.n = n;
  s.send = send;
  arrive(m, s);
  for (int r = 0; r < m.size(); ++r) {
    T* dst = recv + static_cast<std::size_t>(r) * n;
    const T* src = send_of<T>(m, r);
    if (dst != src)
      std::copy(src, src + n, dst); // in place: my block is already there
  }
  sync(m);
}

template <class T> void Comm::reduce_scatter(const T* send, std::size_t n, T* recv) const {
  if (link_)
    return link_->reduce_scatter(send, n, elem_of<T>(), recv);
  const Member m = member(group_, world_, rank_);
  std::vector<T> acc(n);
  Slot s;
  s.op = Op::reduce_scatter;
  s.elem = elem_of<T>();
  s.n = n;
  s.send = send;
  arrive(m, s);
  const std::size_t offset = static_cast<std::size_t>(m.me) * n;
  if (n > 0) {
    const T* first = send_of<T>(m, 0) + offset;
    std::copy(first, first + n, acc.begin());
    for (int r = 1; r < m.size(); ++r) {
      const T* src = send_of<T>(m, r) + offset;
      for (std::size_t i = 0; i < n; ++i)
        acc[i] += src[i];
    }
  }
  sync(m); // recv may be my own send block (in place): write it only now
  std::copy(acc.begin(), acc.end(), recv);
}

template <class T>
void Comm::all_to_all_v(const T* send, const std::vector<std::size_t>& send_counts, T* recv,
                        const std::vector<std::size_t>& recv_counts) const {
  if (link_)
    return link_->all_to_all_v(send, send_counts, recv, recv_counts, elem_of<T>());
  const Member m = member(group_, world_, rank_);
  Slot s;
  s.op = Op::all_to_all_v;
  s.elem = elem_of<T>();
  s.send = send;
  s.send_counts = &send_counts;
  s.recv_counts = &recv_counts;
  arrive(m, s);
  const auto me = static_cast<std::size_t>(m.me);
  std::size_t at = 0;
  for (int r = 0; r < m.size(); ++r) {
    const Slot& from = m.slot(r);
    const std::vector<std::size_t>& counts = *from.send_counts;
    std::size_t offset = 0;
    for (std::size_t k = 0; k < me; ++k)
      offset += counts[k];
    const T* src = static_cast<const T*>(from.send) + offset;
    std::copy(src, src + counts[me], recv + at);
    at += counts[me];
  }
  sync(m);
}

template <class T>
void Comm::send_recv_ring(const T* send, T* recv, std::size_t n, int shift) const {
  if (link_)
    return link_->send_recv_ring(send, recv, n, shift, elem_of<T>());
  const Member m = member(group_, world_, rank_);
  Slot s;
  s.op = Op::ring;
  s.elem = elem_of<T>();
  s.n = n;
  s.shift = ((shift % m.size()) + m.size()) % m.size();
  s.send = send;
  arrive(m, s);
  const T* src = send_of<T>(m, ((m.me - s.shift) % m.size() + m.size()) % m.size());
  std::copy(src, src + n, recv);
  sync(m);
}

void Comm::barrier() const {
  if (link_)
    return link_->barrier();
  arrive(member(group_, world_, rank_), Slot{});
}

// ---- World ---------------------------------------------------------------------------------

World::World(int ranks) {
  if (ranks < 1)
    throw std::invalid_argument(fmt::format("a world needs at least one rank, not {}", ranks));
  state_ = std::make_unique<WorldState>(ranks);
}

World::World(std::unique_ptr<ProcessWorld> process) {
  if (!process)
    throw std::invalid_argument("a world of processes needs its transport");
  state_ = std::make_unique<WorldState>(process->size());
  process_ = std::move(process);
}

World::~World() = default;

int World::size() const {
  return state_->size;
}

void World::prepare(const std::vector<std::vector<int>>& groups) {
  if (process_)
    process_->prepare(groups);
}

int World::process_rank() const {
  return process_ ? process_->rank() : -1;
}

Comm World::group(const std::vector<int>& members, int me) {
  WorldState& w = *state_;
  if (members.empty())
    throw std::invalid_argument("a group needs at least one member");
  for (std::size_t i = 0; i < members.size(); ++i) {
    if (members[i] < 0 || members[i] >= w.size)
      throw std::invalid_argument(fmt::format("group {} names rank {}, but the world has ranks 0 "
                                              "to {}",
                                              list(members), members[i], w.size - 1));
    if (std::find(members.begin(), members.begin() + static_cast<std::ptrdiff_t>(i), members[i]) !=
        members.begin() + static_cast<std::ptrdiff_t>(i))
      throw std::invalid_argument(
          fmt::format("group {} names rank {} twice", list(members), members[i]));
  }
  const auto it = std::find(members.begin(), members.end(), me);
  if (it == members.end())
    throw std::invalid_argument(fmt::format(
        "world rank {} asked for group {}, which it is not a member of", me, list(members)));
  throw_if_aborted(w);
  Comm c;
  if (process_) {
    if (me != process_->rank())
      throw std::invalid_argument(fmt::format("world rank {} asked for a group in the process of "
                                              "rank {}",
                                              me, process_->rank()));
    c.link_ = process_->group(members);
    c.link_members_ = std::make_shared<const std::vector<int>>(members);
    c.rank_ = static_cast<int>(it - members.begin());
    c.size_ = static_cast<int>(members.size());
    return c;
  }
  {
    std::lock_guard lock(w.m);
    auto& g = w.groups[members];
    if (!g)
      g = std::make_shared<GroupState>(members);
    c.group_ = g;
  }
  c.world_ = &w;
  c.rank_ = static_cast<int>(it - members.begin());
  c.size_ = static_cast<int>(members.size());
  return c;
}

template <class T> void World::send(int from, int to, const T* data, std::size_t n) {
  WorldState& w = *state_;
  check_rank(w, from, "sending");
  check_rank(w, to, "receiving");
  throw_if_aborted(w);
  if (process_) {
    if (from != process_->rank())
      throw std::invalid_argument(
          fmt::format("rank {} sends from the process of rank {}", from, process_->rank()));
    return process_->send(to, data, n, elem_of<T>());
  }
  Message msg{elem_of<T>(), n, std::vector<std::byte>(n * sizeof(T))};
  if (n > 0)
    std::memcpy(msg.bytes.data(), data, n * sizeof(T));
  Mailbox& box = mailbox(w, from, to);
  {
    std::lock_guard lock(box.m);
    box.queue.push_back(std::move(msg));
    wait_ends(w, to, nullptr, &box);
  }
  box.cv.notify_all();
}

template <class T> void World::recv(int to, int from, T* data, std::size_t n) {
  WorldState& w = *state_;
  check_rank(w, to, "receiving");
  check_rank(w, from, "sending");
  throw_if_aborted(w);
  if (process_) {
    if (to != process_->rank())
      throw std::invalid_argument(
          fmt::format("rank {} receives in the process of rank {}", to, process_->rank()));
    return process_->recv(from, data, n, elem_of<T>());
  }
  Mailbox& box = mailbox(w, from, to);
  std::unique_lock lock(box.m);
  if (box.queue.empty()) {
    RankActivity what;
    what.box = &box;
    what.from = from;
    const std::string why = wait_begins(w, to, what);
    if (!why.empty()) {
      lock.unlock();
      abort_world(w, why);
      throw CommError(why);
    }
  }
  while (box.queue.empty()) {
    if (w.aborted.load()) {
      wait_ends(w, to, nullptr, &box);
      throw Aborted(w.why);
    }
    box.cv.wait(lock);
  }
  Message msg = std::move(box.queue.front());
  box.queue.pop_front();
  lock.unlock();
  if (msg.elem != elem_of<T>() || msg.n != n)
    throw CommError(fmt::format("rank {} expected {} {} from rank {} but the next message holds "
                                "{} {}",
                                to, n, elem_name(elem_of<T>()), from, msg.n, elem_name(msg.elem)));
  if (n > 0)
    std::memcpy(data, msg.bytes.data(), n * sizeof(T));
}

void World::abort(const std::string& why) {
  if (process_)
    process_->abort(why);
  abort_world(*state_, why);
}

void World::run(int ranks, const std::function<void(World&, int)>& fn) {
  World world(ranks);
  struct Failure {
    std::exception_ptr error;
    bool from_abort; // a consequence of another rank's failure
  };
  std::mutex failures_m;
  std::vector<Failure> failures; // in the order they were caught
  const auto fail = [&](int rank, std::exception_ptr error, bool from_abort,
                        const std::string& what) {
    {
      std::lock_guard lock(failures_m);
      failures.push_back({std::move(error), from_abort});
    }
    world.abort(fmt::format("rank {} failed: {}", rank, what));
  };
  const auto body = [&](int rank) {
    try {
      fn(world, rank);
      // The others may be waiting for this rank, which will never call again.
      const std::string why = rank_finishes(*world.state_, rank);
      if (!why.empty())
        world.abort(why);
    } catch (const Aborted& e) {
      fail(rank, std::current_exception(), true, e.what());
    } catch (const std::exception& e) {
      fail(rank, std::current_exception(), false, e.what());
    } catch (...) {
      fail(rank, std::current_exception(), false, "an exception that is not a std::exception");
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(static_cast<std::size_t>(ranks));
  try {
    for (int r = 0; r < ranks; ++r)
      threads.emplace_back(body, r);
  } catch (...) {
    world.abort("the ranks' threads could not all be started");
    for (auto& t : threads)
      t.join();
    throw;
  }
  for (auto& t : threads)
    t.join();
  if (failures.empty())
    return;
  const auto original = std::find_if(failures.begin(), failures.end(),
                                     [](const Failure& f) { return !f.from_abort; });
  std::rethrow_exception(original != failures.end() ? original->error : failures.front().error);
}

// ---- Instantiations ------------------------------------------------------------------------

#define MOP_COMM_INSTANTIATE(T)                                                                    \
  template void Comm::all_reduce<T>(T*, std::size_t) const;                                        \
  template void Comm::all_reduce_max<T>(T*, std::size_t) const;                                    \
  template void Comm::all_gather<T>(const T*, std::size_t, T*) const;                              \
  template void Comm::reduce_scatter<T>(const T*, std::size_t, T*) const;                          \
  template void Comm::all_to_all_v<T>(const T*, const std::vector<std::size_t>&, T*,               \
                                      const std::vector<std::size_t>&) const;                      \
  template void Comm::send_recv_ring<T>(const T*, T*, std::size_t, int) const;                     \
  template void World::send<T>(int, int, const T*, std::size_t);                                   \
  template void World::recv<T>(int, int, T*, std::size_t);

MOP_COMM_INSTANTIATE(float)
MOP_COMM_INSTANTIATE(double)
MOP_COMM_INSTANTIATE(std::int32_t)
MOP_COMM_INSTANTIATE(std::int64_t)

#undef MOP_COMM_INSTANTIATE

} // namespace mop::real
