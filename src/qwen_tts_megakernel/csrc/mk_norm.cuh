// RMSNorm pieces of the decode megakernel: per-row 1 / rms for the A rows of a product, from whole rows or from
// the per-block partial sums of squares written by the phases that produce the residual stream.
//
// Every sum has a fixed order that depends on the grid size only, never on the batch: a warp per row, lanes
// striding over the terms, then the butterfly.
#pragma once

#include "mk_common.cuh"

namespace mk {

// inv[i] = 1 / sqrt(mean(x_row(i)^2) + eps) for whole rows x + row(i) * stride of width N (row(i) = map[i] or i).
__device__ __forceinline__ void inv_rms_rows(float* inv, const float* x, const int* map, int stride, int M, int N,
                                             float eps) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int i = warp; i < M; i += NWARPS) {
    const float* r = x + (long long)(map ? map[i] : i) * stride;
    float s = 0.f;
    for (int k = lane * 4; k < N; k += 128) {
      const float4 v = *reinterpret_cast<const float4*>(r + k);
      s += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
    s = warp_sum(s);
    if (lane == 0) inv[i] = rsqrtf(s / (float)N + eps);
  }
  __syncthreads();
}

// inv[i] from the partial sums of squares of x_res row (row0 + i * row_step): ssq_part[row][0..nb).
__device__ __forceinline__ void inv_rms_parts(float* inv, const float* ssq_part, int nb, int M, int row0,
                                              int row_step, int N, float eps) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int i = warp; i < M; i += NWARPS) {
    const float* r = ssq_part + (long long)(row0 + i * row_step) * nb;
    float s = 0.f;
    for (int b = lane; b < nb; b += 32) s += r[b];
    s = warp_sum(s);
    if (lane == 0) inv[i] = rsqrtf(s / (float)N + eps);
  }
  __syncthreads();
}

// inv[i] from whole-row sums of squares given per row (ssq[row0 + i * row_step]).
__device__ __forceinline__ void inv_rms_given(float* inv, const float* ssq, int M, int row0, int row_step, int N,
                                              float eps) {
  for (int i = threadIdx.x; i < M; i += NTHREADS) inv[i] = rsqrtf(ssq[row0 + i * row_step] / (float)N + eps);
  __syncthreads();
}

// This block's partial sums of squares of x_res rows 0..M-1 over the dims [o0, o1) it owns -> ssq_part[row][b].
// Called after the phase that wrote those dims (same block, so its own writes are visible after __syncthreads).
__device__ __forceinline__ void write_ssq_part(float* ssq_part, const float* x_res, int stride, int M, int o0,
                                               int o1, int nb, int b) {
  for (int i = threadIdx.x; i < M; i += NTHREADS) {
    const float* r = x_res + (long long)i * stride;
    float s = 0.f;
    for (int u = o0; u < o1; ++u) s += r[u] * r[u];
    ssq_part[(long long)i * nb + b] = s;
  }
}

// Whole-row sum of squares of n floats in shared or global memory, by the whole block (fixed order); all threads
// get it. `red` is shared [NWARPS].
__device__ __forceinline__ float block_ssq(const float* x, int n, float* red) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float s = 0.f;
  for (int k = threadIdx.x; k < n; k += NTHREADS) s += x[k] * x[k];
  s = warp_sum(s);
  __syncthreads();
  if (lane == 0) red[warp] = s;
  __syncthreads();
  float t = 0.f;
#pragma unroll
  for (int w = 0; w < NWARPS; ++w) t += red[w];
  return t;
}

}  // namespace mk
