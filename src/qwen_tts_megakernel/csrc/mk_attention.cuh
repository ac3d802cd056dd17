// Attention of the decode megakernel: a work list of (stream, KV head, chunk of positions) units spread over the
// blocks. A unit appends the new rows' K/V (QK-norm + NeoX RoPE inside) when they fall in its chunk and computes
// flash-decoding partials (max m, sum l, sum exp * v) for the two query heads of its KV head. A stream with one
// chunk writes its output directly; with several, the last unit to finish (a counter per stream and KV head)
// merges the partials in chunk order. The number of chunks of a stream depends on its position and the grid
// only, so its result never depends on the other streams of the launch.
#pragma once

#include "mk_common.cuh"

namespace mk {

// Chunks of a stream with `total` positions (grid of nb blocks).
__device__ __forceinline__ int attention_chunks(int total, int nkv, int nb) {
  const int cap = max(1, min(NC_MAX, nb / nkv));
  return max(1, min(cap, (total + CHUNK_POS - 1) / CHUNK_POS));
}

// One warp: RMSNorm over a head (128 values, 4 per lane) times weight, then NeoX RoPE at `rope_row`
// (cos[64] | sin[64]); lane l holds dims 4l..4l+3, its RoPE partner dims are in lane l ^ 16.
__device__ __forceinline__ void head_norm_rope(float x[4], const bf16* w, const float* rope_row, float eps, int lane) {
  float ss = x[0] * x[0] + x[1] * x[1] + x[2] * x[2] + x[3] * x[3];
  ss = warp_sum(ss);
  const float inv = rsqrtf(ss / 128.f + eps);
#pragma unroll
  for (int i = 0; i < 4; ++i) x[i] = x[i] * inv * bf16_to_float(w[4 * lane + i]);
  float partner[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) partner[i] = __shfl_xor_sync(0xffffffffu, x[i], 16);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int f = (4 * lane + i) & 63;
    const float c = rope_row[f], sn = rope_row[64 + f];
    x[i] = lane < 16 ? x[i] * c - partner[i] * sn : x[i] * c + partner[i] * sn;
  }
}

// Shared scratch of one unit (floats): queries [2 rows][2 heads][128], per-warp m and l [NWARPS][2], per-warp
// accumulators [NWARPS][2][128], the new rows' K and V [2 rows][2][128].
constexpr int ATTN_SMEM_FLOATS = 2 * 2 * 128 + 4 * NWARPS + NWARPS * 2 * 128 + 2 * 2 * 128;
static_assert(ATTN_SMEM_FLOATS <= STAGE_FLOATS, "attention scratch must fit the stage region");

// One unit: nr new rows (positions p0..p0+nr-1) of one stream, KV head kh, chunk `chunk` of nc.
// qkv: the stream's first row [nr][QKV]; out: its first attention-output row [nr][QD]; part/count: the stream's
// partials [NQ][NC_MAX][2 + HD] and counters [NKV] (used when nc > 1, which needs nr == 1).
template <class S>
__device__ void attention_unit(const float* qkv, int nr, int p0, int nc, int chunk, int kh, kv_t* kc, kv_t* vc,
                               int cap, const bf16* norms, const float* rope, float eps, float* out, float* part,
                               int* count, float* sm, int* s_last) {
  const int total = p0 + nr;
  const int cl = (total + nc - 1) / nc;
  const int c0 = chunk * cl, c1 = min(total, c0 + cl);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const bf16* qn = norms + 2 * S::H;
  const bf16* kn = qn + S::HD;
  float* qs = sm;                      // [nr][2][128] normed, roped, scaled queries
  float* wm = qs + 2 * 2 * 128;        // [NWARPS][2] per-warp max
  float* wl = wm + NWARPS * 2;         // [NWARPS][2] per-warp sum
  float* wa = wl + NWARPS * 2;         // [NWARPS][2][128] per-warp accumulators
  float* kvn = wa + NWARPS * 2 * 128;  // [nr][2][128] the new rows' K (normed, roped) and V
  kv_t* kcache = kc + (long long)kh * cap * S::HD;
  kv_t* vcache = vc + (long long)kh * cap * S::HD;
  const float scale = rsqrtf((float)S::HD);

  // This warp's first four positions of the chunk that are already cached, loaded before the queries.
  float4 pk[4], pv[4];
  const int cached_end = min(c1, p0);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int pos = c0 + warp + j * NWARPS;
    if (pos < cached_end) {
      pk[j] = *reinterpret_cast<const float4*>(kcache + (long long)pos * S::HD + 4 * lane);
      pv[j] = *reinterpret_cast<const float4*>(vcache + (long long)pos * S::HD + 4 * lane);
    } else {
      pk[j] = make_float4(0.f, 0.f, 0.f, 0.f);
      pv[j] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }

  // New K/V (warps 0..nr-1) and queries (warps 4.. : row r, head h).
  if (warp < nr) {
    const int pos = p0 + warp;
    if (pos >= c0 && pos < c1) {
      const float* row = qkv + warp * S::QKV;
      float k[4], v[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        k[i] = row[S::QD + kh * S::HD + 4 * lane + i];
        v[i] = row[S::QD + S::KVD + kh * S::HD + 4 * lane + i];
      }
      head_norm_rope(k, kn, rope + (long long)pos * S::HD, eps, lane);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        kcache[(long long)pos * S::HD + 4 * lane + i] = k[i];
        vcache[(long long)pos * S::HD + 4 * lane + i] = v[i];
        kvn[(warp * 2 + 0) * 128 + 4 * lane + i] = k[i];
        kvn[(warp * 2 + 1) * 128 + 4 * lane + i] = v[i];
      }
    }
  } else if (warp >= 4 && warp < 4 + 2 * nr) {
    const int r = (warp - 4) >> 1, h = (warp - 4) & 1;
    const int qh = kh * 2 + h;
    float q[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) q[i] = qkv[r * S::QKV + qh * S::HD + 4 * lane + i];
    head_norm_rope(q, qn, rope + (long long)(p0 + r) * S::HD, eps, lane);
#pragma unroll
    for (int i = 0; i < 4; ++i) qs[(r * 2 + h) * 128 + 4 * lane + i] = q[i] * scale;
  }
  __syncthreads();

  for (int r = 0; r < nr; ++r) {
    const int end = min(c1, p0 + r + 1);  // causal: row r sees positions <= p0 + r
    float q0[4], q1[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      q0[i] = qs[(r * 2 + 0) * 128 + 4 * lane + i];
      q1[i] = qs[(r * 2 + 1) * 128 + 4 * lane + i];
    }
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
    float a0[4] = {0.f, 0.f, 0.f, 0.f}, a1[4] = {0.f, 0.f, 0.f, 0.f};
    for (int base = c0 + warp; base < end; base += 4 * NWARPS) {
      // Four positions per warp per iteration, loads issued before use.
      float4 kv[4], vv[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int pos = base + j * NWARPS;
        if (pos < end && pos >= p0) {  // a new row: from shared memory
          kv[j] = *reinterpret_cast<const float4*>(kvn + ((pos - p0) * 2 + 0) * 128 + 4 * lane);
          vv[j] = *reinterpret_cast<const float4*>(kvn + ((pos - p0) * 2 + 1) * 128 + 4 * lane);
        } else if (pos < end && base == c0 + warp) {  // first four: prefetched
          kv[j] = pk[j];
          vv[j] = pv[j];
        } else if (pos < end) {
          kv[j] = *reinterpret_cast<const float4*>(kcache + (long long)pos * S::HD + 4 * lane);
          vv[j] = *reinterpret_cast<const float4*>(vcache + (long long)pos * S::HD + 4 * lane);
        } else {
          kv[j] = make_float4(0.f, 0.f, 0.f, 0.f);
          vv[j] = make_float4(0.f, 0.f, 0.f, 0.f);
        }
      }
      float s0[4], s1[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        s0[j] = q0[0] * kv[j].x + q0[1] * kv[j].y + q0[2] * kv[j].z + q0[3] * kv[j].w;
        s1[j] = q1[0] * kv[j].x + q1[1] * kv[j].y + q1[2] * kv[j].z + q1[3] * kv[j].w;
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        s0[j] = warp_sum(s0[j]);
        s1[j] = warp_sum(s1[j]);
        if (base + j * NWARPS >= end) { s0[j] = -INFINITY; s1[j] = -INFINITY; }
      }
      float n0 = m0, n1 = m1;
#pragma unroll
      for (int j = 0; j < 4; ++j) { n0 = fmaxf(n0, s0[j]); n1 = fmaxf(n1, s1[j]); }
      const float c0f = __expf(m0 - n0), c1f = __expf(m1 - n1);  // m = -inf -> 0 (n finite: base < end)
      l0 *= c0f; l1 *= c1f;
#pragma unroll
      for (int i = 0; i < 4; ++i) { a0[i] *= c0f; a1[i] *= c1f; }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float e0 = __expf(s0[j] - n0), e1 = __expf(s1[j] - n1);
        l0 += e0; l1 += e1;
        const float v0 = vv[j].x, v1 = vv[j].y, v2 = vv[j].z, v3 = vv[j].w;
        a0[0] += e0 * v0; a0[1] += e0 * v1; a0[2] += e0 * v2; a0[3] += e0 * v3;
        a1[0] += e1 * v0; a1[1] += e1 * v1; a1[2] += e1 * v2; a1[3] += e1 * v3;
      }
      m0 = n0; m1 = n1;
    }
    if (lane == 0) {
      wm[warp * 2 + 0] = m0; wm[warp * 2 + 1] = m1;
      wl[warp * 2 + 0] = l0; wl[warp * 2 + 1] = l1;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      wa[(warp * 2 + 0) * 128 + 4 * lane + i] = a0[i];
      wa[(warp * 2 + 1) * 128 + 4 * lane + i] = a1[i];
    }
    __syncthreads();
    // Merge the warps: thread t < 256 -> head t / 128, dim t % 128.
    if (threadIdx.x < 256) {
      const int h = threadIdx.x >> 7, d = threadIdx.x & 127;
      float M = -INFINITY;
      for (int w = 0; w < NWARPS; ++w) M = fmaxf(M, wm[w * 2 + h]);
      float L = 0.f, A = 0.f;
      for (int w = 0; w < NWARPS; ++w) {
        const float mw = wm[w * 2 + h];
        if (mw == -INFINITY) continue;
        const float f = __expf(mw - M);
        L += f * wl[w * 2 + h];
        A += f * wa[(w * 2 + h) * 128 + d];
      }
      if (nc == 1) {
        out[r * S::QD + (kh * 2 + h) * S::HD + d] = A / L;
      } else {
        float* dst = part + ((long long)(kh * 2 + h) * NC_MAX + chunk) * (2 + S::HD);
        if (d == 0) { dst[0] = M; dst[1] = L; }
        dst[2 + d] = A;
      }
    }
    __syncthreads();
  }
  if (nc == 1) return;

  // Several chunks: the last unit of (stream, kh) to finish merges them, in chunk order.
  if (threadIdx.x == 0) {
    __threadfence();  // this unit's partials before its count
    const int done = atomicAdd(count + kh, 1);
    *s_last = done == nc - 1;
    if (*s_last) {
      atomicExch(count + kh, 0);  // ready for the next layer (read again only after a grid barrier)
      __threadfence();            // the other units' partials after their counts
    }
  }
  __syncthreads();
  if (*s_last && threadIdx.x < 256) {
    const int h = threadIdx.x >> 7, d = threadIdx.x & 127;
    const float* src = part + (long long)(kh * 2 + h) * NC_MAX * (2 + S::HD);
    float M = -INFINITY;
    for (int c = 0; c < nc; ++c) M = fmaxf(M, __ldcg(src + c * (2 + S::HD)));
    float L = 0.f, A = 0.f;
    for (int c = 0; c < nc; ++c) {
      const float* pc = src + c * (2 + S::HD);
      const float mc = __ldcg(pc);
      if (mc == -INFINITY) continue;
      const float f = __expf(mc - M);
      L += f * __ldcg(pc + 1);
      A += f * __ldcg(pc + 2 + d);
    }
    out[(kh * 2 + h) * S::HD + d] = A / L;
  }
  __syncthreads();
}

// The attention phase of a launch: units (stream i, kh, chunk) enumerated stream by stream, kh fastest, spread
// over the blocks round robin. Stream i has nr rows starting at activation row i * nr, at positions p0(i)...
// Positions of the talker differ per stream (pos[i]); the predictor's are shared (p0_shared >= 0).
template <class S>
__device__ void attention_phase(const float* qkv, int B, int nr, const int* s_p0, const int* s_slot, kv_t* kv_base,
                                long long kv_slot_stride, long long kv_layer_off, int cap, const bf16* norms,
                                const float* rope, float eps, float* attn_out, float* attn_part, int* attn_count,
                                int nb, int b, float* sm, int* s_last) {
  int unit0 = 0;  // first unit of stream i
  for (int i = 0; i < B; ++i) {
    const int p0 = s_p0[i];
    const int nc = nr == 1 ? attention_chunks(p0 + 1, S::NKV, nb) : 1;
    const int n_units = S::NKV * nc;
    // this block's units of stream i: u = unit0 + j with u % nb == b
    int j = (b - unit0 % nb + nb) % nb;
    for (; j < n_units; j += nb) {
      const int kh = j % S::NKV, chunk = j / S::NKV;
      kv_t* kc = kv_base + (long long)s_slot[i] * kv_slot_stride + kv_layer_off;
      kv_t* vc = kc + (long long)S::NKV * cap * S::HD;
      attention_unit<S>(qkv + (long long)i * nr * S::QKV, nr, p0, nc, chunk, kh, kc, vc, cap, norms, rope, eps,
                        attn_out + (long long)i * nr * S::QD, attn_part + (long long)i * S::NQ * NC_MAX * (2 + S::HD),
                        attn_count + i * S::NKV, sm, s_last);
    }
    unit0 += n_units;
  }
}

}  // namespace mk
