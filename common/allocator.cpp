#include "common/allocator.hpp"

#include <cstdlib> // defines __GLIBC__ where the C library is glibc

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace mop {

void keep_freed_memory() {
#if defined(__GLIBC__)
  // Blocks up to glibc's largest mmap threshold (32 MiB on 64-bit) come from the heap, so their
  // pages are reused after a free instead of being unmapped; the heap keeps up to 1 GiB free at
  // its top and grows 64 MiB at a time. The settings only change when memory goes back to the
  // system, never how much a process can use. At most four arenas: each thread's own arena
  // reserves 64 MiB of address space, which a search on many threads under a limit on address
  // space (`ulimit -v`) would otherwise spend on arenas instead of data.
  mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024);
  mallopt(M_TRIM_THRESHOLD, 1024 * 1024 * 1024);
  mallopt(M_TOP_PAD, 64 * 1024 * 1024);
  mallopt(M_ARENA_MAX, 4);
#endif
}

} // namespace mop
