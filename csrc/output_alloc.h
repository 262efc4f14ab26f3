// Where the ops' large CPU outputs live: 2 MiB-aligned memory advised for transparent huge pages.
//
// A kernel's output is fresh memory written once. On Linux each first touch of a 4 KiB page is a page
// fault, and for a large output the faults cost more than the kernel: filling a fresh 1 GiB fp32
// tensor took 525 ms on a 2-core AMD EPYC VM against 80 ms for memory already mapped, and 108 ms with
// huge pages (the kernel then maps and zeroes 2 MiB at a time). torch does the same when the user sets
// THP_MEM_ALLOC_ENABLE=1 before the first large allocation; the ops do it for their own outputs
// whatever that switch says. Where THP is "never", madvise is a no-op and this is a plain aligned
// allocation. Other devices, small outputs and non-Linux systems use at::empty unchanged.
//
// Only from 32 MiB: below that, glibc's malloc (torch's CPU allocator) reuses freed memory without a
// fault once its dynamic mmap threshold has grown to the size, and that threshold stops at 32 MiB on
// 64-bit. 2 MiB-aligned memory of the same sizes was faulted in afresh on every call. Allocating,
// writing and freeing one fp32 output, 60 times (Sapphire Rapids Xeon VM, 2 cores, THP "madvise"):
//   2-31 MiB:  at::empty 19.6-37.4 GiB/s, 10-13 faults a MiB; huge-page memory 3.6-11.9 GiB/s.
//   33-64 MiB: at::empty 3.6-3.8 GiB/s, 256 faults a MiB;     huge-page memory 7.6-8.9 GiB/s.
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>

#include <cstdlib>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace fastrlhf {

// The x86-64 and aarch64 (4 KiB base page) huge-page size: the allocation's alignment.
constexpr size_t kHugePageBytes = size_t{2} << 20;
// The smallest output that comes from huge pages: glibc's largest dynamic mmap threshold on 64-bit.
constexpr size_t kHugePageOutputBytes = size_t{32} << 20;

#ifdef __linux__
class HugePageAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    void* ptr = nullptr;
    if (nbytes > 0) {
      const int rc = posix_memalign(&ptr, kHugePageBytes, nbytes);
      TORCH_CHECK_WITH(OutOfMemoryError, rc == 0, "fastrlhf: could not allocate ", nbytes, " bytes on the CPU");
      madvise(ptr, nbytes, MADV_HUGEPAGE);  // advice only: an error leaves ordinary pages
    }
    return {ptr, ptr, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  static void release(void* ptr) { std::free(ptr); }
};
#endif

// at::empty(sizes, options), from huge-page memory when it is a CPU tensor of at least 32 MiB.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
#ifdef __linux__
  const auto dtype = options.dtype().toScalarType();
  if (options.device().is_cpu() && options.layout() == at::kStrided && !options.pinned_memory() &&
      c10::multiply_integers(sizes) * static_cast<int64_t>(c10::elementSize(dtype)) >=
          static_cast<int64_t>(kHugePageOutputBytes)) {
    static HugePageAllocator allocator;
    return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                     std::nullopt);
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace fastrlhf
