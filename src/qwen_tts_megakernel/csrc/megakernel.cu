// Qwen3-TTS decode megakernel: one persistent launch computes one whole 80 ms frame of one stream.
//
//   talker step (28 layers, bf16 weights, fp32 math) -> final norm -> codec_head logits [3072]
//   -> sample g0 (repetition penalty, suppress, min_new_tokens, temperature, top-k, inverse-CDF draw)
//   -> code predictor: 2-row prefill at positions 0,1 then 14 steps, lm_head[j-1] -> sample g_j
//   -> next talker input = C(g0) + sum_j cp_emb[j-1][g_j] + text row (or pad) -> 16 codes to device + pinned host.
//
// Structure (see docs/megakernel.md):
//   * grid = one block of 512 threads per SM (cooperative launch, so a misfit fails instead of hanging);
//   * every matrix-vector product is a "phase": its output rows are split evenly over the blocks, and each block
//     streams its rows' weights through a shared-memory ring of 32 KB tiles with cp.async, RING_TILES-1 tiles ahead.
//     The weight stream does not depend on activations, so it runs ahead across grid barriers;
//   * 5 grid barriers per layer: QKV | attention (split over positions) | combine + o_proj + residual |
//     norm + gate/up + SiLU | down + residual. RMSNorms are recomputed per block inside the consumer phase;
//   * grid barriers are monotonic counters (no reset inside the kernel), acquire after the spin, __nanosleep
//     backoff, and a timeout that turns a stuck launch into an error code;
//   * sampling runs redundantly in every block (bitwise identical), so tokens need no broadcast.
#include <stdio.h>

#include "mk_common.cuh"
#include "mk_sampling.cuh"

namespace mk {

// ------------------------------------------------------------------------------------------------------------
// Grid barrier (per instance, monotonic)

struct GridBarrier {
  unsigned long long* count;
  unsigned long long base;  // bar_count at launch start
  int* error;
  long long timeout_ns;
  int n;                    // barriers passed in this launch
  int* s_flag;              // shared: abort flag broadcast

  // All blocks arrive; returns false when the launch must abort (timeout or another block's error).
  bool no_grid;             // timing experiment: block-local sync only (results are garbage)

  __device__ bool sync(int nblocks) {
    trace(TR_BAR_BEGIN);
    __syncthreads();
    if (no_grid) return true;
    ++n;
    if (threadIdx.x == 0) {
      const unsigned long long target = base + (unsigned long long)n * (unsigned long long)nblocks;
      // release: this block's writes (ordered before by __syncthreads) before the arrival
      asm volatile("red.release.gpu.global.add.u64 [%0], 1;" ::"l"(count) : "memory");
      int abort = 0;
      unsigned int sleep_ns = 0;
      unsigned long long t0 = 0;
      for (unsigned int it = 0;; ++it) {
#if MK_BAR2
        // relaxed polls; the acquire load below (same counter, value >= target) orders the block's later reads
        if (ld_relaxed_u64(count) >= target) { (void)ld_acquire_u64(count); break; }
#else
        if (ld_acquire_u64(count) >= target) break;
#endif
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
#if !MK_BAR2
      __threadfence();  // acquire side: later reads see what other blocks wrote before arriving
#endif
      *s_flag = abort;
    }
    __syncthreads();
    trace(TR_BAR_END);
    return *s_flag == 0;
  }
};

// ------------------------------------------------------------------------------------------------------------
// Weight stream: the block's tiles of every phase of the frame, in consumption order, through a smem ring.

enum PhaseKind { PK_QKV = 0, PK_O = 1, PK_GU = 2, PK_D = 3, PK_HEAD = 4, PK_PROJ = 5 };

struct PhaseW {
  const bf16* w;   // first unit of the whole matrix
  int n_units;     // output units (rows; gate/up pairs for PK_GU)
  int unit_elems;  // bf16 elements per unit
  int kind;
};

// Phase idx of a frame -> its weights. Talker: 4 phases per layer then the codec head; then for each of the 15
// predictor steps: [projection] + 4 phases per layer + lm_head[step].
template <class M>
__device__ __forceinline__ PhaseW phase_weights(const MkParams& p, int idx) {
  using T = typename M::T;
  using C = typename M::C;
  if (idx < 4 * T::L) {
    const bf16* base = p.t_layers + (long long)(idx >> 2) * T::LAYER_ELEMS;
    switch (idx & 3) {
      case 0: return {base + T::OFF_QKV, T::QKV, T::H, PK_QKV};
      case 1: return {base + T::OFF_O, T::H, T::QD, PK_O};
      case 2: return {base + T::OFF_GU, T::F, 2 * T::H, PK_GU};
      default: return {base + T::OFF_D, T::H, T::F, PK_D};
    }
  }
  if (idx == 4 * T::L) return {p.t_head, T::V, T::H, PK_HEAD};
  constexpr int SP = 4 * C::L + 1 + (M::PROJ ? 1 : 0);
  const int rel = idx - (4 * T::L + 1);
  const int step = rel / SP;
  int r = rel % SP;
  if (M::PROJ) {
    if (r == 0) return {p.c_proj_w, C::H, T::H, PK_PROJ};
    r -= 1;
  }
  if (r < 4 * C::L) {
    const bf16* base = p.c_layers + (long long)(r >> 2) * C::LAYER_ELEMS;
    switch (r & 3) {
      case 0: return {base + C::OFF_QKV, C::QKV, C::H, PK_QKV};
      case 1: return {base + C::OFF_O, C::H, C::QD, PK_O};
      case 2: return {base + C::OFF_GU, C::F, 2 * C::H, PK_GU};
      default: return {base + C::OFF_D, C::H, C::F, PK_D};
    }
  }
  return {p.c_heads + (long long)step * C::V * C::H, C::V, C::H, PK_HEAD};
}

template <class M>
__host__ __device__ constexpr int num_phases() {
  return 4 * M::T::L + 1 + 15 * (4 * M::C::L + 1 + (M::PROJ ? 1 : 0));
}

// Units (rows, or gate/up row pairs) per weight tile: as many as fit, at most one per warp (tile_matvec).
__device__ __forceinline__ int units_per_tile(int unit_elems) {
  const int u = min(NWARPS, TILE_BYTES / (unit_elems * 2));
  return u > 0 ? u : 1;
}

template <class M>
struct WeightStream {
  uint8_t* ring;        // RING_TILES x TILE_BYTES in shared memory
  int issued;           // tiles issued (including empty ones past the end)
  int consumed;
  int prod_phase;       // producer cursor: phase index and tile within it
  int prod_tile;
  int nb, b;

#if MK_SCHED
  // Producer cursor of the current phase: next byte to copy, bytes left for this block, bytes per full tile.
  const uint8_t* cur_src;
  int cur_left;
  int cur_tile;
#if MK_TMA
  uint64_t* mbar;       // shared [RING_TILES], one per slot
#endif

  // Issue the next tile of the schedule (or an empty group past the end) into ring slot issued % RING_TILES.
  // The phase lookup runs only when the current phase's bytes are used up.
  __device__ void issue_next(const MkParams& p) {
    uint8_t* dst = ring + (issued % RING_TILES) * TILE_BYTES;
    while (cur_left == 0 && prod_phase < num_phases<M>()) {
      const PhaseW pw = phase_weights<M>(p, prod_phase++);
      int u0, u1;
      split_range(pw.n_units, nb, b, u0, u1);
      const int ub = pw.unit_elems * 2;
      cur_tile = units_per_tile(pw.unit_elems) * ub;
      cur_src = reinterpret_cast<const uint8_t*>(pw.w) + (long long)u0 * ub;
      cur_left = (u1 - u0) * ub;
    }
#if MK_TMA
    // Thread 0 issues the whole tile as one bulk copy (after the acquire barrier: every thread is done with the
    // slot); an empty tile just arrives, so every slot's mbarrier completes one phase per use.
    if (threadIdx.x == 0) {
      uint64_t* bar = mbar + (issued % RING_TILES);
      if (cur_left > 0) {
        const int bytes = min(cur_tile, cur_left);
        fence_proxy_async_smem();
        mbar_arrive_expect(bar, (uint32_t)bytes);
        bulk_copy_g2s(dst, cur_src, (uint32_t)bytes, bar);
      } else {
        mbar_arrive(bar);
      }
    }
    if (cur_left > 0) {
      const int bytes = min(cur_tile, cur_left);
      cur_src += bytes;
      cur_left -= bytes;
    }
    ++issued;
    return;
#endif
    if (cur_left > 0) {
      const int bytes = min(cur_tile, cur_left);
      const int chunks = bytes >> 4;
#pragma unroll 4
      for (int i = threadIdx.x; i < chunks; i += NTHREADS) cp_async16(dst + 16 * i, cur_src + 16 * i);
      cur_src += bytes;
      cur_left -= bytes;
    }
    cp_async_commit();
    ++issued;
  }
#else
  // Issue the next tile of the schedule (or an empty group past the end) into ring slot issued % RING_TILES.
  __device__ void issue_next(const MkParams& p) {
    uint8_t* dst = ring + (issued % RING_TILES) * TILE_BYTES;
    while (prod_phase < num_phases<M>()) {
      const PhaseW pw = phase_weights<M>(p, prod_phase);
      int u0, u1;
      split_range(pw.n_units, nb, b, u0, u1);
      const int upt = units_per_tile(pw.unit_elems);
      const int start = u0 + prod_tile * upt;
      if (start < u1) {
        const int n = min(upt, u1 - start);
        const uint4* src = reinterpret_cast<const uint4*>(pw.w + (long long)start * pw.unit_elems);
        const int chunks = n * pw.unit_elems / 8;
        for (int i = threadIdx.x - 32; i < chunks; i += NTHREADS - 32)
          if (i >= 0) cp_async16(dst + 16 * i, src + i);
        ++prod_tile;
        break;
      }
      ++prod_phase;
      prod_tile = 0;
    }
    cp_async_commit();
    ++issued;
  }
#endif

  __device__ void prime(const MkParams& p) {
    for (int i = 0; i < RING_TILES - 1; ++i) issue_next(p);
  }

  // Refill the slot freed by the previous tile, then wait for the next tile and return it. After the refill,
  // committed groups = consumed + RING_TILES, so waiting until RING_TILES - 1 are pending completes tile
  // `consumed`; RING_TILES - 1 tiles stay in flight while this one is used.
  __device__ const bf16* acquire(const MkParams& p) {
#if MK_TMA
    mbar_wait(mbar + (consumed % RING_TILES), (uint32_t)((consumed / RING_TILES) & 1));
    __syncthreads();
    issue_next(p);
#elif MK_ONESYNC
    // One barrier per tile: wait for tile `consumed` (committed groups = consumed + RING_TILES - 1), then the
    // barrier both publishes it and proves every thread is done with the previous tile, whose slot is refilled.
    cp_async_wait<RING_TILES - 2>();
    __syncthreads();
    issue_next(p);
#else
    issue_next(p);
    cp_async_wait<RING_TILES - 1>();
    __syncthreads();
#endif
    return reinterpret_cast<const bf16*>(ring + (consumed % RING_TILES) * TILE_BYTES);
  }

  // Done with the current tile (every thread): its slot is refilled by the next acquire.
  __device__ void release() {
#if !MK_ONESYNC
    __syncthreads();
#endif
    ++consumed;
  }

#if MK_TMA
  // Wait for every bulk copy still in flight (a block must not exit while one writes its shared memory).
  __device__ void drain() {
    for (int k = consumed; k < issued; ++k) mbar_wait(mbar + (k % RING_TILES), (uint32_t)((k / RING_TILES) & 1));
    consumed = issued;
  }
#else
  __device__ void drain() { cp_async_wait_all(); }
#endif
};

// ------------------------------------------------------------------------------------------------------------
// Matrix-vector products on one tile

// out[r][u] = dot(W[u], act[r]) for the n_units units of a tile in shared memory; HALVES = 2 for gate/up pairs
// (unit = gate row then up row, each K wide). Warps split the units; when there are fewer units than warps, G
// warps share a unit (columns interleaved) and are summed in fixed order. epi(unit, acc[NR][HALVES]) is called
// once per unit by one thread.
template <int NR, int HALVES, class Epi>
__device__ __forceinline__ void tile_matvec(const bf16* tile, int n_units, int K, const float* act, int act_stride,
                                            int unit0, float* red, Epi epi) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int G = 1;
  while (G * 2 * n_units <= NWARPS) G <<= 1;
  const int u = warp / G, part = warp % G;
  const int NV = K / 8;
  float acc[NR][HALVES];
#pragma unroll
  for (int r = 0; r < NR; ++r)
#pragma unroll
    for (int h = 0; h < HALVES; ++h) acc[r][h] = 0.f;
  if (u < n_units) {
    const uint4* row = reinterpret_cast<const uint4*>(tile) + (long long)u * NV * HALVES;
#pragma unroll
    for (int h = 0; h < HALVES; ++h) {
#pragma unroll 4
      for (int v = part * 32 + lane; v < NV; v += G * 32) {
        float w[8];
        unpack_bf16x8(row[h * NV + v], w);
#pragma unroll
        for (int r = 0; r < NR; ++r) {
          const float4* a = reinterpret_cast<const float4*>(act + r * act_stride + v * 8);
          const float4 a0 = a[0], a1 = a[1];
          acc[r][h] += w[0] * a0.x + w[1] * a0.y + w[2] * a0.z + w[3] * a0.w + w[4] * a1.x + w[5] * a1.y +
                       w[6] * a1.z + w[7] * a1.w;
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < NR; ++r)
#pragma unroll
    for (int h = 0; h < HALVES; ++h) acc[r][h] = warp_sum(acc[r][h]);
  if (G == 1) {
    if (u < n_units && lane == 0) epi(unit0 + u, acc);
    return;
  }
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < NR; ++r)
#pragma unroll
      for (int h = 0; h < HALVES; ++h) red[(warp * NR + r) * HALVES + h] = acc[r][h];
  }
  __syncthreads();
  if (threadIdx.x < n_units) {
    float tot[NR][HALVES];
#pragma unroll
    for (int r = 0; r < NR; ++r)
#pragma unroll
      for (int h = 0; h < HALVES; ++h) {
        float t = 0.f;
        for (int g = 0; g < G; ++g) t += red[((threadIdx.x * G + g) * NR + r) * HALVES + h];
        tot[r][h] = t;
      }
    epi(unit0 + threadIdx.x, tot);
  }
}

// ------------------------------------------------------------------------------------------------------------
// Per-block context

template <class M>
struct Ctx {
  const MkParams& p;
  const MkSlot& s;
  WeightStream<M> ws;
  GridBarrier bar;
  float* act;      // shared [ACT_FLOATS]
  float* red;      // shared [64] reduction scratch (inside MISC, after SampleScratch)
  // shared [2][XOWN_ROWS]: this block's rows of the residual stream (the rows it owns in o_proj and down, the same
  // split), kept so the residual adds need no read of x_res; every write of an owned row goes to both
  float* xown;
  SampleScratch* ss;
  int phase;       // next phase index of the consumer
  int nb, b;

  __device__ Ctx(const MkParams& p_, const MkSlot& s_) : p(p_), s(s_) {}

  // Stream every tile of the next phase through tile_matvec.
  template <int NR, int HALVES, class Epi>
  __device__ void run_phase(const float* a, int act_stride, Epi epi) {
    const PhaseW pw = phase_weights<M>(p, phase++);
    int u0, u1;
    split_range(pw.n_units, nb, b, u0, u1);
    const int upt = units_per_tile(pw.unit_elems);
    const int K = pw.unit_elems / HALVES;
    trace(TR_PHASE_BEGIN);
    for (int u = u0; u < u1; u += upt) {
      const bf16* tile = ws.acquire(p);
      trace(TR_TILE_READY);
      tile_matvec<NR, HALVES>(tile, min(upt, u1 - u), K, a, act_stride, u, red, epi);
      ws.release();
    }
#if MK_ONESYNC
    __syncthreads();  // the activations and `red` may be overwritten by the caller next
#endif
    trace(TR_PHASE_END);
  }
};

// Block-wide sums of NR values per thread (fixed order), results in every thread. Starts with __syncthreads, so
// `red` [NWARPS * NR] may still be in use by the caller's previous step.
template <int NR>
__device__ __forceinline__ void block_sum_rows(float (&v)[NR], float* red) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int r = 0; r < NR; ++r) v[r] = warp_sum(v[r]);
  __syncthreads();
  if (lane == 0)
#pragma unroll
    for (int r = 0; r < NR; ++r) red[warp * NR + r] = v[r];
  __syncthreads();
#pragma unroll
  for (int r = 0; r < NR; ++r) {
    float t = 0.f;
#pragma unroll
    for (int w = 0; w < NWARPS; ++w) t += red[w * NR + r];
    v[r] = t;
  }
}

// dst[r][0..N) = RMSNorm(src[r]) * weight for NR rows (src global or shared, may alias dst):
// x * rsqrt(mean(x^2) + eps) * weight, in fp32. Thread t holds elements t, t + NTHREADS, ... of every row in
// registers; the weight and all rows are loaded before the one block reduction, so the chain is one load latency
// and one reduction.
template <int N, int NR>
MK_COLD_NORM __device__ void rmsnorm_rows(float* dst, const float* src, int src_stride, int dst_stride,
                                          const bf16* weight, float eps, float* red) {
  static_assert(N % NTHREADS == 0, "RMSNorm width must be a multiple of the block size");
  constexpr int PER = N / NTHREADS;
  trace(TR_NORM_BEGIN);
  float w[PER], x[NR][PER], ss[NR];
#pragma unroll
  for (int j = 0; j < PER; ++j) w[j] = bf16_to_float(weight[threadIdx.x + j * NTHREADS]);
#pragma unroll
  for (int r = 0; r < NR; ++r)
#pragma unroll
    for (int j = 0; j < PER; ++j) x[r][j] = src[r * src_stride + threadIdx.x + j * NTHREADS];
#pragma unroll
  for (int r = 0; r < NR; ++r) {
    ss[r] = 0.f;
#pragma unroll
    for (int j = 0; j < PER; ++j) ss[r] += x[r][j] * x[r][j];
  }
  block_sum_rows<NR>(ss, red);
#pragma unroll
  for (int r = 0; r < NR; ++r) {
    const float inv = rsqrtf(ss[r] / (float)N + eps);
#pragma unroll
    for (int j = 0; j < PER; ++j) dst[r * dst_stride + threadIdx.x + j * NTHREADS] = x[r][j] * inv * w[j];
  }
  __syncthreads();
  trace(TR_NORM_END);
}

// ------------------------------------------------------------------------------------------------------------
// Attention

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

// Attention of nr new rows (positions p0..p0+nr-1) for one KV head and one chunk of cache positions.
// Unit = blockIdx.x < NKV * nc: kv head = unit % NKV, chunk = unit / NKV. Writes the new rows' K (normed, roped)
// and V into the cache when they fall in this chunk, then for both q heads of the group and every row the
// softmax partials over the chunk: part[r][qh][chunk] = (max score m, sum exp l, sum exp * v [128]).
// Latency: each warp's first four cached positions (< p0, final before this phase) are loaded before the queries
// are computed, and the new rows' K/V are read back from shared memory, so one global round trip is on the path.
template <class S>
MK_COLD_ATTN __device__ void attention_phase(const float* qkv, int nr, int p0, int nc, kv_t* kc, kv_t* vc, int cap,
                                const bf16* norms, const float* rope, float eps, float* part, float* sm) {
  const int unit = blockIdx.x;
  if (unit >= S::NKV * nc) return;
  const int kh = unit % S::NKV, chunk = unit / S::NKV;
  const int total = p0 + nr;
  const int cl = (total + nc - 1) / nc;
  const int c0 = chunk * cl, c1 = min(total, c0 + cl);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const bf16* qn = norms + 2 * S::H;
  const bf16* kn = qn + S::HD;
  float* qs = sm;                   // [nr][2][128] normed, roped, scaled queries
  float* wm = sm + 2 * 2 * 128;     // [NWARPS][2] per-warp max
  float* wl = wm + NWARPS * 2;      // [NWARPS][2] per-warp sum
  float* wa = wl + NWARPS * 2;      // [NWARPS][2][128] per-warp accumulators
  float* kvn = wa + NWARPS * 2 * 128;  // [nr][2][128] the new rows' K (normed, roped) and V
  kv_t* kcache = kc + (long long)kh * cap * S::HD;
  kv_t* vcache = vc + (long long)kh * cap * S::HD;
  const float scale = rsqrtf((float)S::HD);

  // This warp's first four positions of the chunk that are already cached.
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
      float* dst = part + ((long long)(r * S::NQ + kh * 2 + h) * NC_MAX + chunk) * (2 + S::HD);
      if (d == 0) { dst[0] = M; dst[1] = L; }
      dst[2 + d] = A;
    }
    __syncthreads();
  }
}

// act[r][i] = attention output of q dim i for row r: the chunk partials merged in one pass (running max). Chunks that
// saw no position (m = -inf) are skipped.
// Thread t owns the E outputs t, t + NTHREADS, ...; for each chunk all their (m, l, acc) loads are issued before any
// is used, so a chunk costs one load latency (the outputs' offsets are compile-time: every output of a thread has the
// same head dim, and its head advances by NTHREADS / HD per output).
template <class S, int NR>
MK_COLD_ATTN __device__ void attention_combine(float* act, const float* part, int nc) {
  constexpr int PER_ROW = S::QD / NTHREADS;   // outputs per row and thread
  constexpr int E = NR * PER_ROW;
  constexpr int HEAD_STEP = NTHREADS / S::HD;  // heads between consecutive outputs of a thread
  constexpr int CHUNK = 2 + S::HD;             // floats per (row, head, chunk) partial
  static_assert(S::QD % NTHREADS == 0 && NTHREADS % S::HD == 0, "combine layout");
  const int d = threadIdx.x % S::HD;
  const float* base = part + (long long)(threadIdx.x / S::HD) * NC_MAX * CHUNK;
  float M[E], L[E], A[E];
#pragma unroll
  for (int e = 0; e < E; ++e) { M[e] = -INFINITY; L[e] = 0.f; A[e] = 0.f; }
  for (int c = 0; c < nc; ++c) {
    float m[E], l[E], a[E];
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const float* pc = base + ((e / PER_ROW) * S::NQ + (e % PER_ROW) * HEAD_STEP) * NC_MAX * CHUNK + c * CHUNK;
      m[e] = pc[0]; l[e] = pc[1]; a[e] = pc[2 + d];
    }
#pragma unroll
    for (int e = 0; e < E; ++e) {  // selects, not branches, so no load is sunk into a branch
      const bool live = m[e] != -INFINITY;
      const float nm = live ? fmaxf(M[e], m[e]) : M[e];
      const float fo = live ? __expf(M[e] - nm) : 1.f;  // M = -inf -> 0
      const float fn = live ? __expf(m[e] - nm) : 0.f;
      L[e] = L[e] * fo + l[e] * fn;
      A[e] = A[e] * fo + a[e] * fn;
      M[e] = nm;
    }
  }
#pragma unroll
  for (int e = 0; e < E; ++e) act[threadIdx.x + e * NTHREADS] = A[e] / L[e];
  __syncthreads();
}

// ------------------------------------------------------------------------------------------------------------
// One decoder layer (5 phases, 5 grid barriers) on nr rows at positions p0..; x_src = layer input for the QKV
// norm (x_res, or the step input rows for layer 0), x_res holds the residual stream [nr][S::H].

#define MK_SYNC()                            \
  do {                                       \
    if (!c.bar.sync(c.nb)) {                 \
      c.ws.drain();                          \
      return false;                          \
    }                                        \
  } while (0)

template <class M, class S, int NR>
__device__ bool decoder_layer(Ctx<M>& c, const float* x_src, int x_src_stride, float* x_res, const bf16* norms,
                              kv_t* kc, kv_t* vc, int cap, const float* rope, float eps, int p0, int nc) {
  const MkParams& p = c.p;
  float* act = c.act;
  float* xown = c.xown;
  int o0, o1;
  split_range(S::H, c.nb, c.b, o0, o1);  // residual rows this block owns (o_proj and down units)
  // 1. input norm + fused QKV
  rmsnorm_rows<S::H, NR>(act, x_src, x_src_stride, S::H, norms, eps, c.red);
  float* qkv = p.qkv;
  c.template run_phase<NR, 1>(act, S::H, [&](int u, float (&a)[NR][1]) {
#pragma unroll
    for (int r = 0; r < NR; ++r) qkv[r * S::QKV + u] = a[r][0];
  });
  MK_SYNC();
  // 2. attention partials (QK-norm + RoPE + KV append inside)
  trace(TR_ATTN_BEGIN);
  attention_phase<S>(qkv, NR, p0, nc, kc, vc, cap, norms, rope, eps, p.attn_part, act);
#if MK_TRACE == 1
  __syncthreads();
  trace(TR_ATTN_END);
#endif
  MK_SYNC();
  // 3. combine + o_proj + residual
  attention_combine<S, NR>(act, p.attn_part, nc);
  trace(TR_COMBINE_END);
  c.template run_phase<NR, 1>(act, S::QD, [&](int u, float (&a)[NR][1]) {
#pragma unroll
    for (int r = 0; r < NR; ++r) {
      const float v = xown[r * XOWN_ROWS + u - o0] + a[r][0];
      xown[r * XOWN_ROWS + u - o0] = v;
      x_res[r * S::H + u] = v;
    }
  });
  MK_SYNC();
  // 4. post-attention norm + gate/up + SiLU
  rmsnorm_rows<S::H, NR>(act, x_res, S::H, S::H, norms + S::H, eps, c.red);
  float* mlp = p.act;
  c.template run_phase<NR, 2>(act, S::H, [&](int u, float (&a)[NR][2]) {
#pragma unroll
    for (int r = 0; r < NR; ++r) {
      const float g = a[r][0];
      mlp[r * S::F + u] = g / (1.f + __expf(-g)) * a[r][1];
    }
  });
  MK_SYNC();
  // 5. down + residual
  for (int i = threadIdx.x; i < NR * S::F; i += NTHREADS) act[i] = mlp[i];
  __syncthreads();
  trace(TR_COPY_END);
  c.template run_phase<NR, 1>(act, S::F, [&](int u, float (&a)[NR][1]) {
#pragma unroll
    for (int r = 0; r < NR; ++r) {
      const float v = xown[r * XOWN_ROWS + u - o0] + a[r][0];
      xown[r * XOWN_ROWS + u - o0] = v;
      x_res[r * S::H + u] = v;
    }
  });
  MK_SYNC();
  return true;
}

// Load row `code` of a bf16 table [*, n] into dst (fp32).
__device__ __forceinline__ void load_row(float* dst, const bf16* table, int code, int n) {
  for (int i = threadIdx.x; i < n; i += NTHREADS) dst[i] = bf16_to_float(table[(long long)code * n + i]);
}

// Record a frame's result: device ring, then pinned host mirror with the sequence word written last.
MK_COLD __device__ void write_record(const MkSlot& s, int frame, const int* codes, int eos, int error, int ncand) {
  int* d = s.out_dev + (frame % OUT_RING) * REC_INTS;
  for (int j = 0; j < NCODES; ++j) d[j] = codes[j];
  d[REC_FRAME] = frame; d[REC_EOS] = eos; d[REC_ERROR] = error; d[REC_NCAND] = ncand;
  d[REC_SEQ] = frame + 1;
  if (s.out_host) {
    volatile int* h = s.out_host + (frame % OUT_RING) * REC_INTS;
    for (int j = 0; j < NCODES; ++j) h[j] = codes[j];
    h[REC_FRAME] = frame; h[REC_EOS] = eos; h[REC_ERROR] = error; h[REC_NCAND] = ncand;
    __threadfence_system();
    h[REC_SEQ] = frame + 1;
    __threadfence_system();
  }
}

// Uniform for draw j of frame `frame`: from the table when given, else Philox. Returns -1 when the table is short.
__device__ __forceinline__ double draw_uniform(const MkSlot& s, int frame, int j) {
  if (s.uniforms) {
    if (frame >= s.n_uniform_frames) return -1.0;
    return s.uniforms[(long long)frame * NCODES + j];
  }
  return philox_uniform((unsigned long long)s.seed, (uint32_t)frame, (uint32_t)j);
}

// ------------------------------------------------------------------------------------------------------------
// The frame

// Launch flags (benchmarks): stop after codebook 0, to time the talker step alone.
constexpr int FLAG_TALKER_ONLY = 1;
constexpr int FLAG_NO_GRID_SYNC = 2;  // timing experiment only: skip grid barriers (results are garbage)
constexpr int FLAG_STREAM_ONLY = 4;   // timing experiment only: stream the weight tiles, no math, no barriers
constexpr int FLAG_BARRIERS_ONLY = 8; // timing experiment only: the launch's grid barriers, no math

// Grid barriers of one launch: 5 per decoder layer and one after each head; the projection adds one per
// predictor step. With FLAG_TALKER_ONLY the launch ends after codebook 0.
template <class M>
__host__ __device__ constexpr int barriers_per_launch(bool talker_only) {
  return 5 * M::T::L + 1 + (talker_only ? 0 : 15 * (5 * M::C::L + 1 + (M::PROJ ? 1 : 0)));
}

// Timing experiment: every weight tile of the frame (or of the talker step, with FLAG_TALKER_ONLY) through the
// shared-memory ring with no math and no grid barrier: the weight stream's own speed.
template <class M>
__device__ void stream_only(Ctx<M>& c, int flags) {
  const int n_phases = (flags & FLAG_TALKER_ONLY) ? 4 * M::T::L + 1 : num_phases<M>();
  float sink = 0.f;
  for (int ph = 0; ph < n_phases; ++ph) {
    const PhaseW pw = phase_weights<M>(c.p, ph);
    int u0, u1;
    split_range(pw.n_units, c.nb, c.b, u0, u1);
    const int upt = units_per_tile(pw.unit_elems);
    for (int u = u0; u < u1; u += upt) {
      const bf16* tile = c.ws.acquire(c.p);
      sink += bf16_to_float(tile[threadIdx.x]);
      c.ws.release();
    }
  }
  if (sink == 12345.f) c.p.dbg_hidden[0] = sink;  // keep the loads
}

// Timing experiment: the grid barriers of a launch with nothing between them, their cost without load imbalance.
template <class M>
__device__ bool barriers_only(Ctx<M>& c, int flags) {
  const int n = barriers_per_launch<M>((flags & FLAG_TALKER_ONLY) != 0);
  for (int k = 0; k < n; ++k)
    if (!c.bar.sync(c.nb)) return false;
  return true;
}

template <class M>
__device__ __forceinline__ bool frame_body(Ctx<M>& c, int frame, int pos, float perturb, int flags, int* codes, int* used) {
  using T = typename M::T;
  using C = typename M::C;
  const MkParams& p = c.p;
  const MkSlot& s = c.s;
  float* act = c.act;
  const int nb = c.nb, b = c.b;

  // ---- talker step ----
  {
    int o0, o1;
    split_range(T::H, nb, b, o0, o1);  // rows this block owns in o_proj (same split as the phase)
    for (int i = o0 + threadIdx.x; i < o1; i += NTHREADS) {
      const float v = s.x_in[i];
      p.x_res[i] = v;
      c.xown[i - o0] = v;
    }
  }
  const int total = pos + 1;
  const int nc_cap = min(NC_MAX, nb / T::NKV);
  const int nc = max(1, min(nc_cap, (total + 63) / 64));
  kv_t* t_kv = p.t_kv + (long long)s.slot * T::L * 2 * T::NKV * p.max_seq * T::HD;
  for (int l = 0; l < T::L; ++l) {
    kv_t* kc = t_kv + (long long)l * 2 * T::NKV * p.max_seq * T::HD;
    kv_t* vc = kc + (long long)T::NKV * p.max_seq * T::HD;
    const float* xs = l == 0 ? s.x_in : p.x_res;
    if (!decoder_layer<M, T, 1>(c, xs, T::H, p.x_res, p.t_norms + (long long)l * T::NORM_ELEMS, kc, vc,
                                (int)p.max_seq, p.t_rope, (float)p.t_eps, pos, nc))
      return false;
  }
  // final norm -> post-norm hidden h (kept in act[0..H) through the predictor's first step) -> codec head
  rmsnorm_rows<T::H, 1>(act, p.x_res, T::H, T::H, p.t_final_norm, (float)p.t_eps, c.red);
  if (perturb != 0.f) {
    for (int i = threadIdx.x; i < T::H; i += NTHREADS) act[i] += perturb;
    __syncthreads();
  }
  if (b == 0)
    for (int i = threadIdx.x; i < T::H; i += NTHREADS) p.dbg_hidden[i] = act[i];
  {
    float* logits = p.t_logits;
    c.template run_phase<1, 1>(act, T::H, [&](int u, float (&a)[1][1]) { logits[u] = a[0][0]; });
  }
  MK_SYNC();

  // ---- codebook 0 ----
  float* scores = act + 2048;  // after h (H <= 2048)
  {
    trace(TR_SAMPLE_BEGIN);
    const float pen = (float)s.rep_penalty;
    for (int i = threadIdx.x; i < T::V; i += NTHREADS) {
      float v = p.t_logits[i];
      if ((s.seen[i >> 5] >> (i & 31)) & 1u) v = v < 0.f ? v * pen : v / pen;
      if (i >= s.suppress_start && i != s.eos_id) v = -INFINITY;
      if (i == s.eos_id && frame < s.min_new_tokens) v = -INFINITY;
      scores[i] = v;
    }
    __syncthreads();
    const double u = draw_uniform(s, frame, 0);
    if (u < 0.0) { if (threadIdx.x == 0) atomicCAS(p.error, 0, ERR_TABLE); return false; }
    const int g0 = block_sample(scores, T::V, s.do_sample != 0, (float)s.temperature, (int)s.top_k, s.top_p, u,
                                c.ss);
    codes[0] = g0;
    used[0] = g0;
    trace(TR_SAMPLE_END);
    if (s.forced) {
      if (frame >= s.n_forced_frames) { if (threadIdx.x == 0) atomicCAS(p.error, 0, ERR_TABLE); return false; }
      used[0] = s.forced[(long long)frame * NCODES];
    }
  }
  if (used[0] == s.eos_id || (flags & FLAG_TALKER_ONLY)) return true;

  // ---- code predictor: 15 steps; step j = 1 is the 2-row prefill [h, C(g0)] at positions 0, 1 ----
  kv_t* c_kv = p.c_kv + (long long)s.slot * C::L * 2 * C::NKV * CP_POS * C::HD;
  float* xin = act;  // step input rows [nr][T::H] in shared memory (row 0 of step 1 = h, already there)
  for (int j = 1; j < NCODES; ++j) {
    const int nr = j == 1 ? 2 : 1;
    const int p0 = j == 1 ? 0 : j;
    if (j == 1) load_row(xin + T::H, p.t_codec_emb, used[0], T::H);
    else load_row(xin, p.c_emb + (long long)(j - 2) * C::V * T::H, used[j - 1], T::H);
    __syncthreads();
    const float* xsrc;
    if (M::PROJ) {
      float* xr = p.x_res;
      float* xo = c.xown;
      const bf16* bias = p.c_proj_b;
      int o0, o1;
      split_range(C::H, nb, b, o0, o1);  // projection units = the predictor's residual rows, same split
      if (nr == 2)
        c.template run_phase<2, 1>(xin, T::H, [&](int u, float (&a)[2][1]) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const float v = a[r][0] + bf16_to_float(bias[u]);
            xr[r * C::H + u] = v;
            xo[r * XOWN_ROWS + u - o0] = v;
          }
        });
      else
        c.template run_phase<1, 1>(xin, T::H, [&](int u, float (&a)[1][1]) {
          const float v = a[0][0] + bf16_to_float(bias[u]);
          xr[u] = v;
          xo[u - o0] = v;
        });
      MK_SYNC();
      xsrc = p.x_res;
    } else {
      int o0, o1;
      split_range(C::H, nb, b, o0, o1);
      for (int r = 0; r < nr; ++r)
        for (int i = o0 + threadIdx.x; i < o1; i += NTHREADS) {
          const float v = xin[r * T::H + i];
          p.x_res[r * C::H + i] = v;
          c.xown[r * XOWN_ROWS + i - o0] = v;
        }
      __syncthreads();
      xsrc = xin;  // every block has the rows in shared memory
    }
    for (int l = 0; l < C::L; ++l) {
      kv_t* kc = c_kv + (long long)l * 2 * C::NKV * CP_POS * C::HD;
      kv_t* vc = kc + (long long)C::NKV * CP_POS * C::HD;
      const float* xs = l == 0 ? xsrc : p.x_res;
      const int xstride = (l == 0 && !M::PROJ) ? T::H : C::H;
      const bf16* norms = p.c_norms + (long long)l * C::NORM_ELEMS;
      const bool ok = nr == 2 ? decoder_layer<M, C, 2>(c, xs, xstride, p.x_res, norms, kc, vc, CP_POS, p.c_rope,
                                                       (float)p.c_eps, p0, 1)
                              : decoder_layer<M, C, 1>(c, xs, xstride, p.x_res, norms, kc, vc, CP_POS, p.c_rope,
                                                       (float)p.c_eps, p0, 1);
      if (!ok) return false;
    }
    // final norm of the last row -> lm_head[j-1]
    rmsnorm_rows<C::H, 1>(act, p.x_res + (nr - 1) * C::H, C::H, C::H, p.c_final_norm, (float)p.c_eps,
                           c.red);
    {
      float* logits = p.c_logits;
      c.template run_phase<1, 1>(act, C::H, [&](int u, float (&a)[1][1]) { logits[u] = a[0][0]; });
    }
    MK_SYNC();
    trace(TR_SAMPLE_BEGIN);
    for (int i = threadIdx.x; i < C::V; i += NTHREADS) scores[i] = p.c_logits[i];
    __syncthreads();
    const double u = draw_uniform(s, frame, j);
    if (u < 0.0) { if (threadIdx.x == 0) atomicCAS(p.error, 0, ERR_TABLE); return false; }
    const int g = block_sample(scores, C::V, s.cp_do_sample != 0, (float)s.cp_temperature, (int)s.cp_top_k,
                               s.cp_top_p, u, c.ss);
    codes[j] = g;
    used[j] = s.forced ? s.forced[(long long)frame * NCODES + j] : g;
    trace(TR_SAMPLE_END);
  }

  // ---- next talker input: C(g0) + sum_j cp_emb[j-1][g_j] + text row (pad past the end) ----
  {
    int i0, i1;
    split_range(T::H, nb, b, i0, i1);
    const float* text = frame < s.n_text ? s.text_rows + (long long)frame * T::H : s.pad_row;
    for (int i = i0 + threadIdx.x; i < i1; i += NTHREADS) {
      float x = bf16_to_float(p.t_codec_emb[(long long)used[0] * T::H + i]);
      for (int j = 1; j < NCODES; ++j)
        x += bf16_to_float(p.c_emb[((long long)(j - 1) * C::V + used[j]) * T::H + i]);
      s.x_in[i] = x + text[i];
    }
  }
  return true;
}

template <class M>
__global__ void __launch_bounds__(NTHREADS, 1)
    frame_kernel(const __grid_constant__ MkParams p, const __grid_constant__ MkSlot s, int frame, int pos,
                 float perturb, int flags) {
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ int s_flag;
  __shared__ int s_codes[NCODES], s_used[NCODES];
  __shared__ float s_xown[2 * XOWN_ROWS];
  if (*(volatile int*)s.done) return;  // the stream already ended (a launch queued past EOS)
  if (*(volatile int*)p.error) return;  // the instance hit an error before: do nothing
  if (threadIdx.x < NCODES) { s_codes[threadIdx.x] = 0; s_used[threadIdx.x] = 0; }
  Ctx<M> c(p, s);
  c.nb = gridDim.x;
  c.b = blockIdx.x;
  c.phase = 0;
  c.act = reinterpret_cast<float*>(smem + RING_TILES * TILE_BYTES);
  c.xown = s_xown;
  uint8_t* misc = smem + RING_TILES * TILE_BYTES + ACT_FLOATS * 4;
  c.ss = reinterpret_cast<SampleScratch*>(misc);
  c.red = reinterpret_cast<float*>(misc + ((sizeof(SampleScratch) + 15) / 16) * 16);
  c.bar.count = p.bar_count;
  c.bar.base = *(volatile unsigned long long*)p.bar_base;
  c.bar.error = p.error;
  c.bar.timeout_ns = p.timeout_ns;
  c.bar.n = 0;
  c.bar.no_grid = (flags & FLAG_NO_GRID_SYNC) != 0;
  c.bar.s_flag = &s_flag;
  c.ws.ring = smem;
  c.ws.issued = c.ws.consumed = c.ws.prod_phase = c.ws.prod_tile = 0;
#if MK_SCHED
  c.ws.cur_src = nullptr;
  c.ws.cur_left = c.ws.cur_tile = 0;
#endif
#if MK_TMA
  __shared__ __align__(8) uint64_t s_mbar[RING_TILES];
  c.ws.mbar = s_mbar;
  if (threadIdx.x == 0) {
    for (int i = 0; i < RING_TILES; ++i) mbar_init(&s_mbar[i], 1);
    mbar_fence_init();
  }
  __syncthreads();
#endif
  c.ws.nb = gridDim.x;
  c.ws.b = blockIdx.x;
  if (pos >= p.max_seq) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
      atomicCAS(p.error, 0, ERR_POS);
      int z[NCODES] = {0};
      write_record(s, frame, z, 0, ERR_POS, 0);
    }
    return;  // every block returns before any barrier: the counters stay consistent
  }
  c.ws.prime(p);
  if (flags & FLAG_STREAM_ONLY) {
    stream_only<M>(c, flags);
    c.ws.drain();
    return;  // no barrier passed: the barrier base stays valid
  }
  trace(TR_FRAME_BEGIN);
  const bool ok = (flags & FLAG_BARRIERS_ONLY) ? barriers_only<M>(c, flags)
                                                : frame_body<M>(c, frame, pos, perturb, flags, s_codes, s_used);
  trace(TR_FRAME_END);
  c.ws.drain();
  if (!ok) {
    // Aborted (timeout / peer error / short table): report once per block; the instance is now unusable.
    if (threadIdx.x == 0) {
      const int err = ld_relaxed_i32(p.error);
      if (blockIdx.x == 0 || err == ERR_TIMEOUT) {
        int z[NCODES] = {0};
        write_record(s, frame, z, 0, err ? err : ERR_PEER, 0);
      }
    }
    return;
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    const int eos = s_used[0] == s.eos_id;
    if (eos) *s.done = 1;
    else s.seen[s_used[0] >> 5] |= 1u << (s_used[0] & 31);
    // Every block has passed its last barrier and read bar_base: publish the base of the next launch.
    if (!c.bar.no_grid)
      *(volatile unsigned long long*)p.bar_base = c.bar.base + (unsigned long long)c.bar.n * gridDim.x;
    __threadfence();
    write_record(s, frame, s_codes, eos, 0, c.ss->count);
  }
}

// ------------------------------------------------------------------------------------------------------------
// Test kernels (one block): the sampling and reduction building blocks on given logits.

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

// ------------------------------------------------------------------------------------------------------------
// Host API (C ABI, loaded with ctypes). Every function returns a cudaError_t value (0 = success).

using namespace mk;

template <class M>
static cudaError_t set_attrs() {
  static bool done = false;
  if (done) return cudaSuccess;
  cudaError_t e = cudaFuncSetAttribute(frame_kernel<M>, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM_BYTES);
  if (e == cudaSuccess) done = true;
  return e;
}

template <class M>
static void layout(long long* o) {
  using T = typename M::T;
  using C = typename M::C;
  const long long v[] = {T::H, T::F, T::L, T::V, T::NQ, T::NKV, T::HD, T::LAYER_ELEMS, T::NORM_ELEMS,
                         C::H, C::F, C::L, C::V, C::NQ, C::NKV, C::HD, C::LAYER_ELEMS, C::NORM_ELEMS,
                         M::PROJ ? 1 : 0, NTHREADS, SMEM_BYTES, NC_MAX, CAND_MAX, OUT_RING, REC_INTS, CP_POS,
                         (long long)sizeof(MkParams), (long long)sizeof(MkSlot), num_phases<M>(), XOWN_ROWS};
  for (unsigned i = 0; i < sizeof(v) / sizeof(v[0]); ++i) o[i] = v[i];
}

extern "C" {

// Layout constants of variant 0 (0.6B) or 1 (1.7B), in the order of backend.LAYOUT_FIELDS.
int mk_layout(int variant, long long* out) {
  if (variant == 0) layout<Shapes06>(out);
  else if (variant == 1) layout<Shapes17>(out);
  else return (int)cudaErrorInvalidValue;
  return 0;
}

// Blocks of the frame kernel that fit on one SM, and the SM count of the current device.
int mk_occupancy(int variant, int* blocks_per_sm, int* sm_count) {
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(sm_count, cudaDevAttrMultiProcessorCount, dev);
  if (e != cudaSuccess) return (int)e;
  if (variant == 0) {
    if ((e = set_attrs<Shapes06>()) != cudaSuccess) return (int)e;
    e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks_per_sm, frame_kernel<Shapes06>, NTHREADS, SMEM_BYTES);
  } else {
    if ((e = set_attrs<Shapes17>()) != cudaSuccess) return (int)e;
    e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks_per_sm, frame_kernel<Shapes17>, NTHREADS, SMEM_BYTES);
  }
  return (int)e;
}

// Launch one frame. cooperative = 1: cudaLaunchCooperativeKernel (fails when the grid cannot be co-resident);
// 0: a plain launch (tests use it to show that a misfit grid times out instead of hanging).
int mk_launch(int variant, const MkParams* params, const MkSlot* slot, int frame, int pos, float perturb,
              int flags, int nblocks, int cooperative, void* stream) {
  MkParams p = *params;
  MkSlot s = *slot;
  // every block owns at most XOWN_ROWS residual rows (its shared-memory mirror)
  const int max_h = variant == 0 ? Shapes06::T::H : Shapes17::T::H;
  if ((long long)nblocks * XOWN_ROWS < max_h) return (int)cudaErrorInvalidConfiguration;
  void* args[] = {&p, &s, &frame, &pos, &perturb, &flags};
  const void* fn;
  cudaError_t e;
  if (variant == 0) { e = set_attrs<Shapes06>(); fn = (const void*)frame_kernel<Shapes06>; }
  else if (variant == 1) { e = set_attrs<Shapes17>(); fn = (const void*)frame_kernel<Shapes17>; }
  else return (int)cudaErrorInvalidValue;
  if (e != cudaSuccess) return (int)e;
  if (cooperative)
    e = cudaLaunchCooperativeKernel(fn, dim3(nblocks), dim3(NTHREADS), args, SMEM_BYTES, (cudaStream_t)stream);
  else
    e = cudaLaunchKernel(fn, dim3(nblocks), dim3(NTHREADS), args, SMEM_BYTES, (cudaStream_t)stream);
  if (e != cudaSuccess) return (int)e;
  return (int)cudaGetLastError();
}

// Mapped pinned host memory (zeroed): host pointer and the device pointer that aliases it.
int mk_host_alloc(long long bytes, void** host, void** dev) {
  cudaError_t e = cudaHostAlloc(host, (size_t)bytes, cudaHostAllocMapped);
  if (e != cudaSuccess) return (int)e;
  memset(*host, 0, (size_t)bytes);
  return (int)cudaHostGetDevicePointer(dev, *host, 0);
}

int mk_host_free(void* host) { return (int)cudaFreeHost(host); }

// cudaSuccess when the stream's work is done, cudaErrorNotReady while it runs, else the error it hit.
int mk_stream_query(void* stream) { return (int)cudaStreamQuery((cudaStream_t)stream); }

const char* mk_error_string(int e) { return cudaGetErrorString((cudaError_t)e); }

// Section trace (MK_TRACE=1 builds): reset the record counts; read block `which` (0 or 1) records into out
// (at most max), returns the count through *n. Both return cudaErrorNotSupported in other builds.
int mk_trace_reset() {
#if MK_TRACE == 1
  const int zero[2] = {0, 0};
  return (int)cudaMemcpyToSymbol(g_trace_n, zero, sizeof(zero));
#else
  return (int)cudaErrorNotSupported;
#endif
}

int mk_trace_read(int which, unsigned long long* out, int max, int* n) {
#if MK_TRACE == 1
  int counts[2];
  cudaError_t e = cudaMemcpyFromSymbol(counts, g_trace_n, sizeof(counts));
  if (e != cudaSuccess) return (int)e;
  *n = counts[which] < max ? counts[which] : max;
  return (int)cudaMemcpyFromSymbol(out, g_trace, sizeof(unsigned long long) * (size_t)*n,
                                   sizeof(unsigned long long) * TRACE_MAX * (size_t)which);
#else
  (void)which; (void)out; (void)max; (void)n;
  return (int)cudaErrorNotSupported;
#endif
}

// Test entry: mode 0 argmax, 1 sample, 2 k-th largest value (as float bits) of `trials` rows of n logits.
int mk_test_sample(const float* logits, int n, int mode, int do_sample, float temperature, int top_k, double top_p,
                   const double* u, int trials, int* out, void* stream) {
  const int smem = ((n * 4 + 15) / 16) * 16 + (int)sizeof(SampleScratch);
  cudaError_t e = cudaFuncSetAttribute(sample_test_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e != cudaSuccess) return (int)e;
  sample_test_kernel<<<1, NTHREADS, smem, (cudaStream_t)stream>>>(logits, n, mode, do_sample, temperature, top_k,
                                                                  top_p, u, trials, out);
  return (int)cudaGetLastError();
}

int mk_test_philox(unsigned long long seed, int frames, double* out, void* stream) {
  const int n = frames * NCODES;
  philox_test_kernel<<<(n + 255) / 256, 256, 0, (cudaStream_t)stream>>>(seed, frames, out);
  return (int)cudaGetLastError();
}

}  // extern "C"
