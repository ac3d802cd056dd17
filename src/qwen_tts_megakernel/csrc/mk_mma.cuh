// Matrix products of the decode megakernel on tensor cores: one weight tile (up to 16 rows in shared memory) times
// the launch's activation rows (one per stream, or two per stream in the predictor's first step).
//
// mma.sync m16n8k16 (bf16 in, fp32 accumulate; sm_80, sm_90 and sm_120): A = 16 activation rows, B = 8 weight
// rows. Activations are fp32; each is split into bf16 hi + lo (x = hi + lo to ~2^-16), and both halves go through
// the tensor core, so the product keeps fp32-level accuracy. Each warp owns a fixed K slice (K / 16): the warps'
// partial sums are added in warp order, so a row's result never depends on how many rows share the launch
// (batch invariance). Within a k32 chunk lane (g, c) holds the 8 consecutive k at 8c (16 bytes of one weight row:
// one shared-memory load); the mma's k slots are permuted consistently for A and B, which the sum does not see.
#pragma once

#include "mk_common.cuh"

namespace mk {

__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                               uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Two floats -> bf16x2 (first in the low half): the hi parts, and the lo parts (x - hi, rounded).
__device__ __forceinline__ void split2(float x0, float x1, uint32_t& hi, uint32_t& lo) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(x0, x1);
  const float2 hf = __bfloat1622float2(h);
  const __nv_bfloat162 l = __floats2bfloat162_rn(x0 - hf.x, x1 - hf.y);
  hi = *reinterpret_cast<const uint32_t*>(&h);
  lo = *reinterpret_cast<const uint32_t*>(&l);
}

// Where the A rows (activations) of a product come from: row i is x + row(i) * stride (fp32), optionally
// RMSNorm-scaled: x * inv[i] * w[k] + add. Rows i < n_staged were copied (norm applied) to shared memory
// staged[i][K] by stage_rows and are read from there.
struct ASrc {
  const float* x;
  const int* map;     // row(i) = map[i] (shared memory), or i when null
  int stride;
  const float* inv;   // per-row 1 / rms (shared memory), or null: no norm
  const bf16* w;      // norm weight [K]
  float add;          // added after the norm (the validation perturbation), else 0
  const float* staged = nullptr;  // shared [n_staged][staged_k]
  int n_staged = 0, staged_k = 0;
};

// Row i, elements k..k+7 of `a` (the norm with explicitly rounded operations, so every call site gives the same
// bits and a staged row equals the row read from global memory).
__device__ __forceinline__ void load_a8(const ASrc& a, int i, int k, float (&v)[8]) {
  const bool staged = i < a.n_staged;
  const float* src = staged ? a.staged + (long long)i * a.staged_k + k
                            : a.x + (long long)(a.map ? a.map[i] : i) * a.stride + k;
  const float4 p = *reinterpret_cast<const float4*>(src);
  const float4 q = *reinterpret_cast<const float4*>(src + 4);
  v[0] = p.x; v[1] = p.y; v[2] = p.z; v[3] = p.w; v[4] = q.x; v[5] = q.y; v[6] = q.z; v[7] = q.w;
  if (a.inv && !staged) {
    const float inv = a.inv[i];
    float w[8];
    unpack_bf16x8(*reinterpret_cast<const uint4*>(a.w + k), w);
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = __fmaf_rn(__fmul_rn(v[j], inv), w[j], a.add);
  }
}

// Copy the first rows of `a` that fit in `stage` (STAGE_FLOATS, rows of K) into shared memory with the norm
// applied; returns the ASrc that reads those rows from there and the others as before. Same values either way, so
// staging never changes a result (and which rows are staged depends on K only, never on the batch).
__device__ __forceinline__ ASrc stage_rows(const ASrc& a, int M, int K, float* stage) {
  const int n = min(M, STAGE_FLOATS / K);
  const int per_row = K / 8;
  for (int t = threadIdx.x; t < n * per_row; t += NTHREADS) {
    const int i = t / per_row, k = (t % per_row) * 8;
    float v[8];
    load_a8(a, i, k, v);
    float4* d = reinterpret_cast<float4*>(stage + (long long)i * K + k);
    d[0] = make_float4(v[0], v[1], v[2], v[3]);
    d[1] = make_float4(v[4], v[5], v[6], v[7]);
  }
  __syncthreads();
  ASrc s = a;
  s.staged = stage;
  s.n_staged = n;
  s.staged_k = K;
  return s;
}

// out(i, unit) for the n_units units of a tile (unit = HALVES consecutive weight rows of K) and the A rows
// 0..M-1. epi(i, unit, v[HALVES]) is called once per (row, unit) by one thread. `red` is shared [RED_FLOATS].
template <int HALVES, class Epi>
__device__ __forceinline__ void tile_mma(const bf16* tile, int n_units, int K, const ASrc& a, int M, int unit0,
                                         float* red, Epi epi) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, c = lane & 3;
  const int R = n_units * HALVES;  // weight rows in the tile (<= 16)
  const int KW = K / NWARPS;       // this warp's K slice
  const int k_begin = warp * KW;
  const uint8_t* wbase = reinterpret_cast<const uint8_t*>(tile);
  for (int m0 = 0; m0 < M; m0 += 16) {
    float acc[2][4];
#pragma unroll
    for (int t = 0; t < 2; ++t)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[t][j] = 0.f;
    const bool r0 = m0 + g < M, r1 = m0 + g + 8 < M;
#pragma unroll 2
    for (int k = k_begin; k < k_begin + KW; k += 32) {
      float xa[8], xb[8];
      if (r0) load_a8(a, m0 + g, k + 8 * c, xa);
      else
#pragma unroll
        for (int j = 0; j < 8; ++j) xa[j] = 0.f;
      if (r1) load_a8(a, m0 + g + 8, k + 8 * c, xb);
      else
#pragma unroll
        for (int j = 0; j < 8; ++j) xb[j] = 0.f;
      uint4 wv[2];
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        const int n = t * 8 + g;
        wv[t] = n < R ? *reinterpret_cast<const uint4*>(wbase + ((long long)n * K + k + 8 * c) * 2)
                      : make_uint4(0u, 0u, 0u, 0u);
      }
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        uint32_t ah[4], al[4];
        split2(xa[4 * s], xa[4 * s + 1], ah[0], al[0]);
        split2(xb[4 * s], xb[4 * s + 1], ah[1], al[1]);
        split2(xa[4 * s + 2], xa[4 * s + 3], ah[2], al[2]);
        split2(xb[4 * s + 2], xb[4 * s + 3], ah[3], al[3]);
#pragma unroll
        for (int t = 0; t < 2; ++t) {
          if (t * 8 >= R) break;
          const uint32_t b0 = s ? wv[t].z : wv[t].x, b1 = s ? wv[t].w : wv[t].y;
          mma_bf16_16816(acc[t], ah[0], ah[1], ah[2], ah[3], b0, b1);
          mma_bf16_16816(acc[t], al[0], al[1], al[2], al[3], b0, b1);
        }
      }
    }
    // Partial sums of this warp's K slice -> shared; then one thread per (row, unit) adds the 16 in warp order.
    float* rw = red + warp * 256;
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      rw[g * 16 + t * 8 + 2 * c] = acc[t][0];
      rw[g * 16 + t * 8 + 2 * c + 1] = acc[t][1];
      rw[(g + 8) * 16 + t * 8 + 2 * c] = acc[t][2];
      rw[(g + 8) * 16 + t * 8 + 2 * c + 1] = acc[t][3];
    }
    __syncthreads();
    constexpr int UPR = 16 / HALVES;  // units per row of the partial block
    if (threadIdx.x < 16 * UPR) {
      const int i = threadIdx.x / UPR, u = threadIdx.x % UPR;
      if (m0 + i < M && u < n_units) {
        float v[HALVES];
#pragma unroll
        for (int h = 0; h < HALVES; ++h) {
          float s = 0.f;
#pragma unroll
          for (int w = 0; w < NWARPS; ++w) s += red[w * 256 + i * 16 + u * HALVES + h];
          v[h] = s;
        }
        epi(m0 + i, unit0 + u, v);
      }
    }
    __syncthreads();
  }
}

}  // namespace mk
