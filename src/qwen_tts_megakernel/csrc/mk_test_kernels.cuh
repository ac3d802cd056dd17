// Test kernels (one block each): the sampling, reduction and random-number building blocks on given inputs, for
// tests/test_megakernel.py. Not used by the frame kernel.
#pragma once

#include "mk_common.cuh"
#include "mk_sampling.cuh"

namespace mk {

__global__ void __launch_bounds__(NTHREADS, 1)
    sample_test_kernel(const float* logits, int n, int mode, int do_sample, float temperature, int top_k,
                       double top_p, const double* u, int trials, int* out) {
  extern __shared__ __align__(16) uint8_t smem[];
  float* s = reinterpret_cast<float*>(smem);
  SampleScratch* ss = reinterpret_cast<SampleScratch*>(smem + ((n * 4 + 15) / 16) * 16);
  for (int t = 0; t < trials; ++t) {
    for (int i = threadIdx.x; i < n; i += NTHREADS) s[i] = logits[(long long)t * n + i];
    __syncthreads();
    int r;
    if (mode == 0) r = block_argmax(s, n, ss);
    else if (mode == 1) r = block_sample(s, n, do_sample != 0, temperature, top_k, top_p, u[t], ss);
    else r = (int)(block_kth_largest_key(s, n, top_k, ss) ^ 0x80000000u);
    if (threadIdx.x == 0) out[t] = r;
    __syncthreads();
  }
}

__global__ void philox_test_kernel(unsigned long long seed, int frames, double* out) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t < frames * NCODES) out[t] = philox_uniform(seed, (uint32_t)(t / NCODES), (uint32_t)(t % NCODES));
}

}  // namespace mk
