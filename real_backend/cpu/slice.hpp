#pragma once
// Where a rank's share of a parameter sits inside the full tensor: a box in the tensor viewed as
// [d0, d1, d2] (shapes of rank < 3 are padded in front with 1s), and copies between the two.
#include <cstddef>
#include <cstdint>
#include <vector>

namespace mop::real {

struct Slice {
  std::int64_t dim[3] = {1, 1, 1};
  std::int64_t lo[3] = {0, 0, 0};
  std::int64_t hi[3] = {1, 1, 1};
  std::size_t numel() const {
    return static_cast<std::size_t>((hi[0] - lo[0]) * (hi[1] - lo[1]) * (hi[2] - lo[2]));
  }
};

inline Slice full_slice(const std::vector<std::int64_t>& shape) {
  Slice s;
  const int off = 3 - static_cast<int>(shape.size());
  for (int d = 0; d < static_cast<int>(shape.size()); ++d) {
    s.dim[off + d] = shape[static_cast<std::size_t>(d)];
    s.hi[off + d] = shape[static_cast<std::size_t>(d)];
  }
  return s;
}

// Restricts dimension d (of the padded 3-d view) to part `part` of `parts` equal parts.
inline void split(Slice& s, int d, int part, int parts) {
  const std::int64_t len = (s.hi[d] - s.lo[d]) / parts;
  s.lo[d] += len * part;
  s.hi[d] = s.lo[d] + len;
}

template <class T> std::vector<T> extract(const std::vector<T>& full, const Slice& s) {
  std::vector<T> out;
  out.reserve(s.numel());
  for (auto i = s.lo[0]; i < s.hi[0]; ++i)
    for (auto j = s.lo[1]; j < s.hi[1]; ++j) {
      const std::size_t base = static_cast<std::size_t>((i * s.dim[1] + j) * s.dim[2]);
      out.insert(
          out.end(),
          full.begin() + static_cast<std::ptrdiff_t>(base + static_cast<std::size_t>(s.lo[2])),
          full.begin() + static_cast<std::ptrdiff_t>(base + static_cast<std::size_t>(s.hi[2])));
    }
  return out;
}

// `part` may be any contiguous container of T (a backend's tensor storage).
template <class P, class T> void insert(const P& part, const Slice& s, std::vector<T>& full) {
  std::size_t k = 0;
  for (auto i = s.lo[0]; i < s.hi[0]; ++i)
    for (auto j = s.lo[1]; j < s.hi[1]; ++j)
      for (auto l = s.lo[2]; l < s.hi[2]; ++l)
        full[static_cast<std::size_t>((i * s.dim[1] + j) * s.dim[2] + l)] = part[k++];
}

// Flat index k of a slice's elements (row-major in the box) in the full tensor.
inline std::size_t full_index(const Slice& s, std::size_t k) {
  const auto w2 = static_cast<std::size_t>(s.hi[2] - s.lo[2]);
  const auto w1 = static_cast<std::size_t>(s.hi[1] - s.lo[1]);
  const std::size_t l = k % w2 + static_cast<std::size_t>(s.lo[2]);
  const std::size_t j = (k / w2) % w1 + static_cast<std::size_t>(s.lo[1]);
  const std::size_t i = k / (w1 * w2) + static_cast<std::size_t>(s.lo[0]);
  return (i * static_cast<std::size_t>(s.dim[1]) + j) * static_cast<std::size_t>(s.dim[2]) + l;
}

} // namespace mop::real
