// Grid barrier of the decode megakernel: a per-instance monotonic 64-bit counter, no reset inside the kernel.
//
// Arrival is one red.release.gpu; the spin uses relaxed loads with __nanosleep backoff, then one ld.acquire.gpu of
// the counter orders the block's later reads. The base for a launch is published by block 0 at the end of the
// previous launch, after every block has passed its last barrier. A globaltimer timeout turns a stuck launch into
// an error code that the other blocks see and abort on.
#pragma once

#include "mk_common.cuh"

namespace mk {

struct GridBarrier {
  unsigned long long* count;
  unsigned long long base;  // bar_count at launch start
  int* error;
  long long timeout_ns;
  int n;                    // barriers passed in this launch
  int* s_flag;              // shared: abort flag broadcast

  // All blocks arrive; returns false when the launch must abort (timeout or another block's error).
  __device__ bool sync(int nblocks) {
    __syncthreads();
    ++n;
    if (threadIdx.x == 0) {
      const unsigned long long target = base + (unsigned long long)n * (unsigned long long)nblocks;
      // release: this block's writes (ordered before by __syncthreads) before the arrival
      asm volatile("red.release.gpu.global.add.u64 [%0], 1;" ::"l"(count) : "memory");
      int abort = 0;
      unsigned int sleep_ns = 0;
      unsigned long long t0 = 0;
      for (unsigned int it = 0;; ++it) {
        // relaxed polls; the acquire load below (same counter, value >= target) orders the block's later reads
        if (ld_relaxed_u64(count) >= target) { (void)ld_acquire_u64(count); break; }
        if (it >= 32) {
          __nanosleep(sleep_ns);
          sleep_ns = sleep_ns < 256 ? sleep_ns + 32 : 256;
        }
        if ((it & 255) == 255) {
          const unsigned long long now = globaltimer_ns();
          if (t0 == 0) t0 = now;
          if (ld_relaxed_i32(error) != 0) { abort = ERR_PEER; break; }
          if ((long long)(now - t0) > timeout_ns) {
            atomicCAS(error, 0, ERR_TIMEOUT);
            abort = ERR_TIMEOUT;
            break;
          }
        }
      }
      *s_flag = abort;
    }
    __syncthreads();
    return *s_flag == 0;
  }
};

}  // namespace mk
