// Section trace of the decode megakernel (a dev build, never the production kernel). dev/mk_trace.py builds the
// library with this header force-included (QWEN_TTS_MK_INCLUDE), which turns every MK_SECTION(id) of the kernel into
// a stamp: the block syncs, then its thread 0 appends (section id, clock64, globaltimer) to the block's own list.
// The stamp between two marks is the time of the section named by the later mark, as seen by that block.
#pragma once

#include <cuda_runtime.h>

#define MK_TRACE_BLOCKS 192   // blocks traced (one per SM; an H200 has 132)
#define MK_TRACE_MARKS 4096   // marks per block and launch (a 0.6B frame makes about 1,500)

struct MkTraceMark {
  unsigned int section;
  unsigned int ns_lo;       // %globaltimer (ns), low 32 bits: a clock shared by all SMs
  long long cycles;         // clock64 of the block's SM
};

__device__ MkTraceMark g_mk_trace[MK_TRACE_BLOCKS][MK_TRACE_MARKS];
__device__ int g_mk_trace_count[MK_TRACE_BLOCKS];

// Stamp the end of section `section` for this block (every thread of the block must call it).
__device__ __forceinline__ void mk_trace_mark(int section) {
  __syncthreads();
  if (threadIdx.x == 0 && blockIdx.x < MK_TRACE_BLOCKS) {
    const int n = g_mk_trace_count[blockIdx.x];
    if (n < MK_TRACE_MARKS) {
      unsigned int ns;
      asm volatile("mov.u32 %0, %%globaltimer_lo;" : "=r"(ns));
      g_mk_trace[blockIdx.x][n] = MkTraceMark{(unsigned int)section, ns, (long long)clock64()};
      g_mk_trace_count[blockIdx.x] = n + 1;
    }
  }
}

#define MK_SECTION(id) mk_trace_mark(id)

extern "C" {
// Clear every block's list (call before the launch to trace).
int mk_trace_reset() {
  static int zeros[MK_TRACE_BLOCKS];
  return (int)cudaMemcpyToSymbol(g_mk_trace_count, zeros, sizeof(zeros));
}
// Copy the lists to host memory: marks [MK_TRACE_BLOCKS][MK_TRACE_MARKS] (16 bytes each), counts [MK_TRACE_BLOCKS].
int mk_trace_fetch(void* marks, int* counts) {
  cudaError_t e = cudaDeviceSynchronize();
  if (e == cudaSuccess) e = cudaMemcpyFromSymbol(marks, g_mk_trace, sizeof(g_mk_trace));
  if (e == cudaSuccess) e = cudaMemcpyFromSymbol(counts, g_mk_trace_count, sizeof(g_mk_trace_count));
  return (int)e;
}
int mk_trace_dims(int* blocks, int* marks) {
  *blocks = MK_TRACE_BLOCKS;
  *marks = MK_TRACE_MARKS;
  return 0;
}
}
