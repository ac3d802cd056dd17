// In-kernel sampling: the official rules of sampling.py, computed by one whole block on scores in shared memory.
//
// Each stream of a launch is sampled by one block. Every step is deterministic (histogram counts do not depend on
// atomic order, sorts are total orders, more ties at the top-k cut than CAND_MAX keep the lowest ids), so a
// token depends only on the scores and the uniform.
#pragma once

#include "mk_common.cuh"

namespace mk {

// Scratch for one block's sampling, carved from the MISC shared-memory region.
struct SampleScratch {
  unsigned int hist[2][256];    // radix-select histograms (one filled while the other is cleared)
  float cand_val[CAND_MAX];     // candidate scores (unsorted)
  int cand_idx[CAND_MAX];       // candidate token ids (unsorted)
  short order[CAND_MAX];        // order[rank] = candidate slot, sorted by (score desc, id asc)
  double cum[CAND_MAX];         // running sum of exp(score - max) in sorted order
  float red_v[NWARPS];          // block reduction scratch
  int red_i[NWARPS];
  unsigned int sel_prefix, sel_remaining;
  int count, result, overflow;
};
static_assert(sizeof(SampleScratch) <= MISC_BYTES, "sampling scratch must fit the MISC region");

// Philox4x32-10 with key (k0, k1) on counter (c0..c3): word 0 of the output, exactly as sampling.philox4x32.
__device__ __forceinline__ uint32_t philox4x32_10_word0(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                                        uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    if (round) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const unsigned long long p0 = (unsigned long long)0xD2511F53u * c0;
    const unsigned long long p1 = (unsigned long long)0xCD9E8D57u * c2;
    const uint32_t hi0 = (uint32_t)(p0 >> 32), lo0 = (uint32_t)p0;
    const uint32_t hi1 = (uint32_t)(p1 >> 32), lo1 = (uint32_t)p1;
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return c0;
}

// Uniform in [0, 1) for draw j of frame `frame` of a stream seeded with `seed`: top 24 bits of word 0 * 2^-24.
__device__ __forceinline__ double philox_uniform(unsigned long long seed, uint32_t frame, uint32_t j) {
  const uint32_t w = philox4x32_10_word0(frame, j, 0u, 0u, (uint32_t)seed, (uint32_t)(seed >> 32));
  return (double)(w >> 8) * (1.0 / 16777216.0);
}

// Order-preserving map float -> uint32 (larger float, larger key; -inf smallest of the finite-or-inf values).
__device__ __forceinline__ uint32_t float_key(float f) {
  const uint32_t b = __float_as_uint(f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Block-wide argmax of s[0..n): the largest value, the lowest index among equals. All threads get the index.
// Power-of-two reduction: warp butterfly, then the 16 warp winners by warp 0.
__device__ int block_argmax(const float* s, int n, SampleScratch* ss) {
  float bv = -INFINITY;
  int bi = 0x7fffffff;
  for (int i = threadIdx.x; i < n; i += NTHREADS) {
    const float v = s[i];
    if (v > bv || (v == bv && i < bi)) { bv = v; bi = i; }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) { ss->red_v[warp] = bv; ss->red_i[warp] = bi; }
  __syncthreads();
  if (warp == 0) {
    bv = lane < NWARPS ? ss->red_v[lane] : -INFINITY;
    bi = lane < NWARPS ? ss->red_i[lane] : 0x7fffffff;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
    }
    if (lane == 0) ss->result = (bi == 0x7fffffff) ? 0 : bi;
  }
  __syncthreads();
  const int r = ss->result;
  __syncthreads();
  return r;
}

// Key of the k-th largest of s[0..n) (1 <= k <= n): 4 radix passes of 8 bits from the most significant digit.
// Logits share few exponents, so most keys fall in one or two bins of the top digits: the lanes of a warp with the
// same bin (__match_any_sync) add their count with one shared-memory atomic instead of one each. Histograms are
// double-buffered: the next pass's is cleared while warp 0 scans this one, so a pass costs two __syncthreads.
__device__ uint32_t block_kth_largest_key(const float* s, int n, int k, SampleScratch* ss) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  uint32_t prefix = 0, mask = 0, remaining = (uint32_t)k;
  ss->hist[threadIdx.x >> 8][threadIdx.x & 255] = 0;  // NTHREADS = 2 x 256: both buffers
  static_assert(NTHREADS == 512, "one histogram entry per thread when clearing");
  __syncthreads();
  for (int pass = 0, shift = 24; shift >= 0; ++pass, shift -= 8) {
    unsigned int* hist = ss->hist[pass & 1];
    for (int i0 = 0; i0 < n; i0 += NTHREADS) {  // bounds uniform per warp: every lane takes part in the match
      const int i = i0 + threadIdx.x;
      const uint32_t key = i < n ? float_key(s[i]) : 0u;
      const int bin = (i < n && (key & mask) == prefix) ? (int)((key >> shift) & 255u) : -1;
      const unsigned int peers = __match_any_sync(0xffffffffu, bin);
      if (bin >= 0 && lane == __ffs(peers) - 1) atomicAdd(&hist[bin], (unsigned int)__popc(peers));
    }
    __syncthreads();
    if (warp == 0) {
      // lane L owns digits 255-8L down to 248-8L; counts are summed from the top digit down.
      uint32_t local = 0;
#pragma unroll
      for (int d = 0; d < 8; ++d) local += hist[255 - 8 * lane - d];
      uint32_t incl = local;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const uint32_t t = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += t;
      }
      const uint32_t excl = incl - local;
      const unsigned int ballot = __ballot_sync(0xffffffffu, incl >= remaining);
      const int owner = __ffs(ballot) - 1;  // always found: the total count >= remaining
      if (lane == owner) {
        uint32_t above = excl;
        int digit = 255 - 8 * lane;
        for (int d = 0; d < 8; ++d) {
          const uint32_t c = hist[255 - 8 * lane - d];
          if (above + c >= remaining) { digit = 255 - 8 * lane - d; break; }
          above += c;
        }
        ss->sel_prefix = prefix | ((uint32_t)digit << shift);
        ss->sel_remaining = remaining - above;
      }
    } else if (threadIdx.x >= 256) {
      ss->hist[(pass + 1) & 1][threadIdx.x - 256] = 0;
    }
    __syncthreads();
    prefix = ss->sel_prefix;
    remaining = ss->sel_remaining;
    mask |= 255u << shift;
  }
  return prefix;
}

// One token from scores s[0..n) (already penalized/suppressed logits), following sampling.choose():
// greedy -> argmax; else divide by temperature, keep scores >= the k-th largest (ties kept), top-p, and draw
// by inverse CDF with uniform u over candidates ordered by (score desc, index asc). s is modified.
__device__ int block_sample(float* s, int n, bool do_sample, float temperature, int top_k, double top_p, double u,
                            SampleScratch* ss) {
  if (!do_sample) return block_argmax(s, n, ss);
  for (int i = threadIdx.x; i < n; i += NTHREADS) s[i] = s[i] / temperature;
  if (threadIdx.x == 0) { ss->count = 0; ss->overflow = 0; }
  __syncthreads();
  uint32_t kth = 0;  // key 0: keep everything
  if (top_k > 0 && top_k < n) kth = block_kth_largest_key(s, n, top_k, ss);
  // Collect finite candidates with key >= kth (one atomic per warp; slot order does not matter, the rank sort
  // below orders them).
  const int lane = threadIdx.x & 31;
  for (int i0 = 0; i0 < n; i0 += NTHREADS) {
    const int i = i0 + threadIdx.x;
    const float v = i < n ? s[i] : -INFINITY;
    const bool take = v > -INFINITY && float_key(v) >= kth;
    const unsigned int ballot = __ballot_sync(0xffffffffu, take);
    int first = 0;
    if (lane == 0 && ballot) first = atomicAdd(&ss->count, __popc(ballot));
    first = __shfl_sync(0xffffffffu, first, 0);
    if (take) {
      const int slot = first + __popc(ballot & ((1u << lane) - 1u));
      if (slot < CAND_MAX) { ss->cand_val[slot] = v; ss->cand_idx[slot] = i; }
      else ss->overflow = 1;
    }
  }
  __syncthreads();
  if (ss->count > CAND_MAX) {
    // More candidates than fit: only ties at the cut can overflow (fewer than top_k <= CAND_MAX are above it).
    // Collect again deterministically: those above the cut (any order), then the ties in id order until full.
    __syncthreads();
    if (threadIdx.x == 0) ss->count = 0;
    __syncthreads();
    for (int i0 = 0; i0 < n; i0 += NTHREADS) {
      const int i = i0 + threadIdx.x;
      const float v = i < n ? s[i] : -INFINITY;
      const bool take = v > -INFINITY && float_key(v) > kth;
      const unsigned int ballot = __ballot_sync(0xffffffffu, take);
      int first = 0;
      if (lane == 0 && ballot) first = atomicAdd(&ss->count, __popc(ballot));
      first = __shfl_sync(0xffffffffu, first, 0);
      if (take) {
        const int slot = first + __popc(ballot & ((1u << lane) - 1u));
        ss->cand_val[slot] = v;
        ss->cand_idx[slot] = i;
      }
    }
    __syncthreads();
    const int warp_id = threadIdx.x >> 5;
    for (int i0 = 0; i0 < n && ss->count < CAND_MAX; i0 += NTHREADS) {
      const int i = i0 + threadIdx.x;
      const float v = i < n ? s[i] : -INFINITY;
      const bool take = v > -INFINITY && float_key(v) == kth;
      const unsigned int ballot = __ballot_sync(0xffffffffu, take);
      if (lane == 0) ss->red_i[warp_id] = __popc(ballot);
      __syncthreads();
      int before = ss->count, total = 0;
      for (int w = 0; w < NWARPS; ++w) {
        if (w < warp_id) before += ss->red_i[w];
        total += ss->red_i[w];
      }
      const int slot = before + __popc(ballot & ((1u << lane) - 1u));
      if (take && slot < CAND_MAX) { ss->cand_val[slot] = v; ss->cand_idx[slot] = i; }
      __syncthreads();
      if (threadIdx.x == 0) ss->count = min(ss->count + total, CAND_MAX);
      __syncthreads();
    }
  }
  const int count = min(ss->count, CAND_MAX);
  if (count == 0) return 0;  // no finite score (only from corrupted logits): a valid token, never a wild index
  // Rank sort: rank = number of candidates before this one in (score desc, index asc) order.
  for (int c = threadIdx.x; c < count; c += NTHREADS) {
    const float v = ss->cand_val[c];
    const int idx = ss->cand_idx[c];
    int rank = 0;
    for (int o = 0; o < count; ++o) {
      const float ov = ss->cand_val[o];
      rank += (ov > v || (ov == v && ss->cand_idx[o] < idx)) ? 1 : 0;
    }
    ss->order[rank] = (short)c;
  }
  __syncthreads();
  const int warp = threadIdx.x >> 5;
  if (warp == 0) {
    const double top = (double)ss->cand_val[ss->order[0]];
    // Inclusive running sum of exp(score - top) in sorted order, 32 candidates at a time.
    double carry = 0.0;
    for (int base = 0; base < count; base += 32) {
      const int r = base + lane;
      double w = r < count ? exp((double)ss->cand_val[ss->order[r]] - top) : 0.0;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const double t = __shfl_up_sync(0xffffffffu, w, o);
        if (lane >= o) w += t;
      }
      w += carry;
      if (r < count) ss->cum[r] = w;
      carry = __shfl_sync(0xffffffffu, w, 31);
    }
    __syncwarp();
    int keep = count;
    if (top_p < 1.0) {
      // HF top-p: drop a candidate when the probability mass at or below it (ascending) is <= 1 - top_p;
      // the most likely one always stays. Mass at or below rank r = 1 - cum[r-1] / total.
      const double total = ss->cum[count - 1];
      int drop = 0;
      for (int base = 1; base < count; base += 32) {
        const int r = base + lane;
        const bool d = r < count && (1.0 - ss->cum[r - 1] / total) <= 1.0 - top_p;
        drop += __popc(__ballot_sync(0xffffffffu, d));
      }
      keep = count - drop;
    }
    const double target = u * ss->cum[keep - 1];
    int pos = 0;  // number of kept candidates whose running sum is <= target
    for (int base = 0; base < keep; base += 32) {
      const int r = base + lane;
      pos += __popc(__ballot_sync(0xffffffffu, r < keep && ss->cum[r] <= target));
    }
    pos = min(pos, keep - 1);
    if (lane == 0) ss->result = ss->cand_idx[ss->order[pos]];
  }
  __syncthreads();
  const int r = ss->result;
  __syncthreads();
  return r;
}

}  // namespace mk
