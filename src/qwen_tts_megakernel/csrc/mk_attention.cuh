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
constexpr int ATTN_SUB = 8;         // positions of a sub-chunk: its K/V loads are issued together
constexpr int ATTN_NSUB = ATTN_CHUNK / ATTN_SUB;
constexpr int ATTN_GROUP = ATTN_NSUB;  // warps per unit when the grid has warps to spare (one per sub-chunk)
static_assert(ATTN_CHUNK % ATTN_SUB == 0 && NWARPS % ATTN_GROUP == 0, "sub-chunks tile a chunk, groups a block");
static_assert(NWARPS * 2 * (2 + 128) <= STAGE_FLOATS, "the groups' partials fit the stage");
static_assert(NWARPS / ATTN_GROUP < 16, "named barriers 1.. per group");

// (Explicitly rounded operations below: every call site gives the same bits, whichever warps run a unit.)
// Flash-decoding partial of one query head in one lane: max m, sum l of exp(s - m), and the lane's 4 dims of
// sum exp(s - m) * v. Empty: m = -inf.
struct Partial {
  float m = -INFINITY, l = 0.f, a[4] = {0.f, 0.f, 0.f, 0.f};

  // this = merge(this, y) (fixed formula: the same bits whichever warp runs it).
  __device__ __forceinline__ void merge(const Partial& y) {
    if (y.m == -INFINITY) return;
    const float M = fmaxf(m, y.m);
    const float fx = __expf(m - M), fy = __expf(y.m - M);  // m = -inf -> 0
    l = __fmaf_rn(l, fx, __fmul_rn(y.l, fy));
#pragma unroll
    for (int i = 0; i < 4; ++i) a[i] = __fmaf_rn(a[i], fx, __fmul_rn(y.a[i], fy));
    m = M;
  }
};

// The partials of both query heads (q[2][4], this lane's dims) over the sub-chunk of positions [base, end)
// (at most ATTN_SUB; empty when base >= end) of one (slot, layer, KV head) cache. The arithmetic depends only on
// the positions and the values, so a chunk's partial is the same whether one warp runs its sub-chunks in turn or
// ATTN_GROUP warps run one each.
__device__ __forceinline__ void sub_partials(const float (&q)[2][4], const kv_t* kc, const kv_t* vc, int base,
                                             int end, int lane, Partial (&out)[2]) {
  out[0] = Partial();
  out[1] = Partial();
  if (base >= end) return;
  kv4_raw k[ATTN_SUB], v[ATTN_SUB];
#pragma unroll
  for (int j = 0; j < ATTN_SUB; ++j) {
    const int pos = min(base + j, end - 1);  // past the end: a valid row, masked below
    k[j] = load_kv4(kc + (long long)pos * 128 + 4 * lane);
    v[j] = load_kv4(vc + (long long)pos * 128 + 4 * lane);
  }
  float s[2][ATTN_SUB];
#pragma unroll
  for (int j = 0; j < ATTN_SUB; ++j) {
    float kj[4];
    unpack_kv4(k[j], kj);
#pragma unroll
    for (int h = 0; h < 2; ++h)
      s[h][j] = __fmaf_rn(q[h][3], kj[3], __fmaf_rn(q[h][2], kj[2], __fmaf_rn(q[h][1], kj[1], __fmul_rn(q[h][0], kj[0]))));
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float n = -INFINITY;
#pragma unroll
    for (int j = 0; j < ATTN_SUB; ++j) {
      s[h][j] = base + j < end ? warp_sum(s[h][j]) : -INFINITY;
      n = fmaxf(n, s[h][j]);
    }
    out[h].m = n;
  }
#pragma unroll
  for (int j = 0; j < ATTN_SUB; ++j) {
    float vj[4];
    unpack_kv4(v[j], vj);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float e = __expf(s[h][j] - out[h].m);  // masked: 0
      out[h].l = __fadd_rn(out[h].l, e);
#pragma unroll
      for (int i = 0; i < 4; ++i) out[h].a[i] = __fmaf_rn(e, vj[i], out[h].a[i]);
    }
  }
}

// One unit: nr new rows (positions p0..p0+nr-1) of one stream, KV head kh, chunk `chunk` of nc, run by `gsize`
// warps of one block (1, or ATTN_GROUP: warp `gw` of the group runs sub-chunk gw and warp 0 merges them through
// `sm`, shared [ATTN_GROUP][2][2 + 128] floats of this group; `bar_id` is the group's named barrier).
// qkv: the stream's first row [nr][QKV]; kc / vc: the slot's K and V cache of this layer and KV head [cap][128];
// out: the stream's first attention-output row [nr][QD]; part: the stream's partials [NQ][max_chunks][ATTN_PART]
// and count its counters [NKV] (used when nc > 1, which needs nr == 1). The new rows lie in the sub-chunk of p0 (the
// talker has one new row; the predictor's two rows sit at positions 0 and 1), whose warp appends them first.
template <class S>
__device__ void attention_unit(const float* qkv, int nr, int p0, int nc, int chunk, int kh, kv_t* kc, kv_t* vc,
                               const bf16* norms, const float* rope, float eps, float* out, float* part,
                               int max_chunks, int* count, int gsize, int gw, float* sm, int bar_id) {
  static_assert(S::HD == 128, "one warp holds a head as 4 dims per lane");
  const int lane = threadIdx.x & 31;
  const bf16* qn = norms + 2 * S::H;
  const bf16* kn = qn + S::HD;
  const int total = p0 + nr;
  const int c0 = chunk * ATTN_CHUNK, c1 = min(total, c0 + ATTN_CHUNK);
  const float scale = rsqrtf((float)S::HD);

  // The new rows' K/V into the cache, by the warp whose sub-chunks include p0 (the same lane reads its own dims
  // back below, so no sync is needed).
  const int new_sub = (p0 - c0) / ATTN_SUB;  // in this chunk when chunk == nc - 1
  if (chunk == nc - 1 && (gsize == 1 || gw == new_sub)) {
    for (int r = 0; r < nr; ++r) {
      const float* row = qkv + r * S::QKV;
      float k[4], v[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        k[i] = row[S::QD + kh * S::HD + 4 * lane + i];
        v[i] = row[S::QD + S::KVD + kh * S::HD + 4 * lane + i];
      }
      head_norm_rope(k, kn, rope + (long long)(p0 + r) * S::HD, eps, lane);
      store_kv4(kc + (long long)(p0 + r) * S::HD + 4 * lane, k);
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
    Partial acc[2];
    if (gsize == 1) {
      for (int sb = 0; sb < ATTN_NSUB; ++sb) {
        Partial p[2];
        sub_partials(q, kc, vc, c0 + sb * ATTN_SUB, end, lane, p);
        acc[0].merge(p[0]);
        acc[1].merge(p[1]);
      }
    } else {
      Partial p[2];
      sub_partials(q, kc, vc, c0 + gw * ATTN_SUB, end, lane, p);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float* d = sm + (gw * 2 + h) * (2 + 128);
        if (lane == 0) { d[0] = p[h].m; d[1] = p[h].l; }
#pragma unroll
        for (int i = 0; i < 4; ++i) d[2 + 4 * lane + i] = p[h].a[i];
      }
      named_barrier(bar_id, ATTN_GROUP * 32);
      if (gw == 0) {
        for (int w = 0; w < ATTN_GROUP; ++w)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float* d = sm + (w * 2 + h) * (2 + 128);
            Partial y;
            y.m = d[0];
            y.l = d[1];
#pragma unroll
            for (int i = 0; i < 4; ++i) y.a[i] = d[2 + 4 * lane + i];
            acc[h].merge(y);
          }
      }
      named_barrier(bar_id, ATTN_GROUP * 32);  // the slots may be reused by the next row or unit
      if (gw != 0) continue;
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
  if (nc == 1 || gw != 0) return;

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
    Partial acc;
    for (int c = 0; c < nc; ++c) {
      const float* pc = src + c * ATTN_PART;
      Partial y;
      y.m = __ldcg(pc);
      y.l = __ldcg(pc + 1);
      const float4 a = __ldcg(reinterpret_cast<const float4*>(pc + 4 + 4 * lane));
      y.a[0] = a.x; y.a[1] = a.y; y.a[2] = a.z; y.a[3] = a.w;
      acc.merge(y);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) out[(kh * 2 + h) * S::HD + 4 * lane + i] = acc.a[i] / acc.l;
  }
}

// The attention phase of a launch: units (stream i, kh, chunk) numbered stream by stream, chunk-major within a
// stream. When the grid has ATTN_GROUP warps per unit to spare, each unit goes to a group of ATTN_GROUP warps of
// one block (group slots dealt round robin over the blocks first); otherwise units are dealt round robin to single
// warps. Stream i has nr rows starting at activation row i * nr, at positions s_p0[i]...; its K/V live in its slot's
// cache. Which warps run a unit never changes its result. `sm`: shared scratch [NWARPS][2][2 + 128] floats.
template <class S>
__device__ void attention_phase(const float* qkv, int B, int nr, const int* s_p0, const int* s_slot, kv_t* kv_base,
                                long long kv_slot_stride, long long kv_layer_off, int cap, const bf16* norms,
                                const float* rope, float eps, float* attn_out, float* attn_part, int* attn_count,
                                int nb, int b, float* sm) {
  const int warp = threadIdx.x >> 5;
  const int max_chunks = (cap + ATTN_CHUNK - 1) / ATTN_CHUNK;
  int units = 0;
  for (int i = 0; i < B; ++i) units += S::NKV * attention_chunks(s_p0[i] + nr);
  const bool grouped = units <= nb * (NWARPS / ATTN_GROUP);
  const int gsize = grouped ? ATTN_GROUP : 1;
  const int n_slots = grouped ? nb * (NWARPS / ATTN_GROUP) : nb * NWARPS;
  const int group = warp / gsize, gw = warp % gsize;
  const int slot = grouped ? group * nb + b : b * NWARPS + warp;  // this warp's (group's) slot in the deal
  float* gsm = sm + group * ATTN_GROUP * 2 * (2 + 128);
  int unit0 = 0;  // first unit of stream i
  for (int i = 0; i < B; ++i) {
    const int p0 = s_p0[i];
    const int nc = attention_chunks(p0 + nr);
    const int n_units = S::NKV * nc;
    for (int j = (slot - unit0 % n_slots + n_slots) % n_slots; j < n_units; j += n_slots) {
      const int chunk = j / S::NKV, kh = j % S::NKV;
      kv_t* kc = kv_base + (long long)s_slot[i] * kv_slot_stride + kv_layer_off + (long long)kh * cap * S::HD;
      kv_t* vc = kc + (long long)S::NKV * cap * S::HD;
      attention_unit<S>(qkv + (long long)i * nr * S::QKV, nr, p0, nc, chunk, kh, kc, vc, norms, rope, eps,
                        attn_out + (long long)i * nr * S::QD,
                        attn_part + (long long)i * S::NQ * max_chunks * ATTN_PART, max_chunks,
                        attn_count + i * S::NKV, gsize, gw, gsm, 1 + group);
    }
    unit0 += n_units;
  }
}

}  // namespace mk
