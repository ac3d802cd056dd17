// Attention of the decode megakernel: a work list of warp-sized units (stream, KV head, chunk of ATTN_CHUNK cached
// positions) spread over every warp of the grid. A unit computes flash-decoding partials (max m, sum l, sum exp * v)
// for the two query heads of its KV head over its chunk; the chunk holding the new rows first appends their K/V
// (QK-norm + NeoX RoPE inside). A stream with one chunk writes its output directly; with several, the last unit to
// finish (a counter per stream and KV head) merges the partials in chunk order. Chunks are fixed spans of positions,
// so a stream's split, and every sum in it, depends on its own position only, never on the other streams of the
// launch or on the grid (batch invariance).
#pragma once

#include "mk_common.cuh"

namespace mk {

// Chunks of a stream with `total` positions.
__device__ __forceinline__ int attention_chunks(int total) { return (total + ATTN_CHUNK - 1) / ATTN_CHUNK; }

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

constexpr int ATTN_PART = 4 + 128;  // floats of one chunk's partial of one query head: m, l, 2 pad, acc[128]
constexpr int ATTN_STEP = 8;  // positions per step of a unit (their K/V loads are issued together)

// Online-softmax state of one query head in one lane: running max m, sum l, and the lane's 4 dims of sum exp * v.
struct SoftmaxAcc {
  float m = -INFINITY, l = 0.f, a[4] = {0.f, 0.f, 0.f, 0.f};

  // Add ATTN_STEP positions with scores s[] (summed over the head; -inf = masked) and values v[] (this lane's dims).
  __device__ __forceinline__ void add(const float (&s)[ATTN_STEP], const kv4_raw (&v)[ATTN_STEP]) {
    float n = m;
#pragma unroll
    for (int j = 0; j < ATTN_STEP; ++j) n = fmaxf(n, s[j]);
    const float f = __expf(m - n);  // m = -inf -> 0 (n is finite: the step's first position is never masked)
    l *= f;
#pragma unroll
    for (int i = 0; i < 4; ++i) a[i] *= f;
#pragma unroll
    for (int j = 0; j < ATTN_STEP; ++j) {
      const float e = __expf(s[j] - n);  // s = -inf -> 0
      float vj[4];
      unpack_kv4(v[j], vj);
      l += e;
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] += e * vj[i];
    }
    m = n;
  }
};

// One unit, run by one warp: nr new rows (positions p0..p0+nr-1) of one stream, KV head kh, chunk `chunk` of nc.
// qkv: the stream's first row [nr][QKV]; kc / vc: the slot's K and V cache of this layer and KV head [cap][128];
// out: the stream's first attention-output row [nr][QD]; part: the stream's partials [NQ][max_chunks][ATTN_PART] and
// count its counters [NKV] (used when nc > 1, which needs nr == 1). The new rows lie in the last chunk (the talker
// has one new row; the predictor's two rows sit at positions 0 and 1).
template <class S>
__device__ void attention_unit(const float* qkv, int nr, int p0, int nc, int chunk, int kh, kv_t* kc, kv_t* vc,
                               const bf16* norms, const float* rope, float eps, float* out, float* part,
                               int max_chunks, int* count) {
  static_assert(S::HD == 128, "one warp holds a head as 4 dims per lane");
  const int lane = threadIdx.x & 31;
  const bf16* qn = norms + 2 * S::H;
  const bf16* kn = qn + S::HD;
  const int total = p0 + nr;
  const int c0 = chunk * ATTN_CHUNK, c1 = min(total, c0 + ATTN_CHUNK);
  const float scale = rsqrtf((float)S::HD);

  // The new rows' K/V into the cache (this lane's dims: read back below by the same lane, so no sync is needed).
  if (chunk == nc - 1) {
    for (int r = 0; r < nr; ++r) {
      const float* row = qkv + r * S::QKV;
      float k[4], v[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        k[i] = row[S::QD + kh * S::HD + 4 * lane + i];
        v[i] = row[S::QD + S::KVD + kh * S::HD + 4 * lane + i];
      }
      head_norm_rope(k, kn, rope + (long long)(p0 + r) * S::HD, eps, lane);
      store_kv4(kc + (long long)(p0 + r) * S::HD + 4 * lane, k);  // the same lane reads it back below
      store_kv4(vc + (long long)(p0 + r) * S::HD + 4 * lane, v);
    }
  }

  for (int r = 0; r < nr; ++r) {
    const int end = min(c1, p0 + r + 1);  // causal: row r sees positions <= p0 + r
    float q[2][4];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int i = 0; i < 4; ++i) q[h][i] = qkv[r * S::QKV + (kh * 2 + h) * S::HD + 4 * lane + i];
      head_norm_rope(q[h], qn, rope + (long long)(p0 + r) * S::HD, eps, lane);
#pragma unroll
      for (int i = 0; i < 4; ++i) q[h][i] *= scale;
    }
    SoftmaxAcc acc[2];
    for (int base = c0; base < end; base += ATTN_STEP) {
      kv4_raw k[ATTN_STEP], v[ATTN_STEP];
#pragma unroll
      for (int j = 0; j < ATTN_STEP; ++j) {
        const int pos = min(base + j, end - 1);  // past the end: a valid row, masked below
        k[j] = load_kv4(kc + (long long)pos * S::HD + 4 * lane);
        v[j] = load_kv4(vc + (long long)pos * S::HD + 4 * lane);
      }
      float s0[ATTN_STEP], s1[ATTN_STEP];
#pragma unroll
      for (int j = 0; j < ATTN_STEP; ++j) {
        float kj[4];
        unpack_kv4(k[j], kj);
        s0[j] = q[0][0] * kj[0] + q[0][1] * kj[1] + q[0][2] * kj[2] + q[0][3] * kj[3];
        s1[j] = q[1][0] * kj[0] + q[1][1] * kj[1] + q[1][2] * kj[2] + q[1][3] * kj[3];
      }
#pragma unroll
      for (int j = 0; j < ATTN_STEP; ++j) {
        s0[j] = base + j < end ? warp_sum(s0[j]) : -INFINITY;
        s1[j] = base + j < end ? warp_sum(s1[j]) : -INFINITY;
      }
      acc[0].add(s0, v);
      acc[1].add(s1, v);
    }
    if (nc == 1) {
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int i = 0; i < 4; ++i) out[r * S::QD + (kh * 2 + h) * S::HD + 4 * lane + i] = acc[h].a[i] / acc[h].l;
    } else {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float* dst = part + ((long long)(kh * 2 + h) * max_chunks + chunk) * ATTN_PART;
        if (lane == 0) { dst[0] = acc[h].m; dst[1] = acc[h].l; }
#pragma unroll
        for (int i = 0; i < 4; ++i) dst[4 + 4 * lane + i] = acc[h].a[i];
      }
    }
  }
  if (nc == 1) return;

  // Several chunks: the last unit of (stream, kh) to finish merges them, in chunk order.
  __threadfence();  // this lane's partials before the count
  __syncwarp();
  int last = 0;
  if (lane == 0) {
    last = atomicAdd(count + kh, 1) == nc - 1;
    if (last) atomicExch(count + kh, 0);  // ready for the next layer (read again only after a grid barrier)
  }
  last = __shfl_sync(0xffffffffu, last, 0);
  if (!last) return;
  __threadfence();  // the other units' partials after their counts
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float* src = part + (long long)(kh * 2 + h) * max_chunks * ATTN_PART;
    float M = -INFINITY;
    for (int c = 0; c < nc; ++c) M = fmaxf(M, __ldcg(src + c * ATTN_PART));
    float L = 0.f, A[4] = {0.f, 0.f, 0.f, 0.f};
    for (int c = 0; c < nc; ++c) {
      const float* pc = src + c * ATTN_PART;
      const float mc = __ldcg(pc);
      if (mc == -INFINITY) continue;
      const float f = __expf(mc - M);
      L += f * __ldcg(pc + 1);
      const float4 a = __ldcg(reinterpret_cast<const float4*>(pc + 4 + 4 * lane));
      A[0] += f * a.x; A[1] += f * a.y; A[2] += f * a.z; A[3] += f * a.w;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) out[(kh * 2 + h) * S::HD + 4 * lane + i] = A[i] / L;
  }
}

// The attention phase of a launch: units (stream i, kh, chunk) numbered stream by stream, chunk-major within a
// stream, dealt round robin to the nb * NWARPS warps of the grid. Stream i has nr rows starting at activation row
// i * nr, at positions s_p0[i]...; its K/V live in its slot's cache. Which warp runs a unit never changes its result.
template <class S>
__device__ void attention_phase(const float* qkv, int B, int nr, const int* s_p0, const int* s_slot, kv_t* kv_base,
                                long long kv_slot_stride, long long kv_layer_off, int cap, const bf16* norms,
                                const float* rope, float eps, float* attn_out, float* attn_part, int* attn_count,
                                int nb, int b) {
  const int nw = nb * NWARPS, w = b * NWARPS + (threadIdx.x >> 5);
  const int max_chunks = (cap + ATTN_CHUNK - 1) / ATTN_CHUNK;
  int unit0 = 0;  // first unit of stream i
  for (int i = 0; i < B; ++i) {
    const int p0 = s_p0[i];
    const int nc = attention_chunks(p0 + nr);
    const int n_units = S::NKV * nc;
    for (int j = (w - unit0 % nw + nw) % nw; j < n_units; j += nw) {
      const int chunk = j / S::NKV, kh = j % S::NKV;
      kv_t* kc = kv_base + (long long)s_slot[i] * kv_slot_stride + kv_layer_off + (long long)kh * cap * S::HD;
      kv_t* vc = kc + (long long)S::NKV * cap * S::HD;
      attention_unit<S>(qkv + (long long)i * nr * S::QKV, nr, p0, nc, chunk, kh, kc, vc, norms, rope, eps,
                        attn_out + (long long)i * nr * S::QD,
                        attn_part + (long long)i * S::NQ * max_chunks * ATTN_PART, max_chunks,
                        attn_count + i * S::NKV);
    }
    unit0 += n_units;
  }
}

}  // namespace mk
