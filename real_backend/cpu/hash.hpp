#pragma once
// FNV-1a, 64-bit (Fowler, Noll, Vo; http://www.isthe.com/chongo/tech/comp/fnv/): the checksum of
// checkpoints and the fingerprint of what they belong to. Every step h = (h xor byte) * prime is
// a bijection of h, so changing any one byte of the input always changes the result.
#include <cstddef>
#include <cstdint>
#include <string_view>

namespace mop::real {

class Fnv1a64 {
public:
  static constexpr std::uint64_t offset_basis = 14695981039346656037ULL;
  static constexpr std::uint64_t prime = 1099511628211ULL;

  void add(const void* data, std::size_t n) {
    const auto* p = static_cast<const unsigned char*>(data);
    std::uint64_t h = h_;
    for (std::size_t i = 0; i < n; ++i)
      h = (h ^ p[i]) * prime;
    h_ = h;
  }
  void add(std::string_view text) { add(text.data(), text.size()); }
  std::uint64_t value() const { return h_; }

private:
  std::uint64_t h_ = offset_basis;
};

inline std::uint64_t fnv1a64(std::string_view bytes) {
  Fnv1a64 h;
  h.add(bytes);
  return h.value();
}

} // namespace mop::real
