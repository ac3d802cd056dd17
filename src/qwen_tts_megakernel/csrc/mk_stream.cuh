// Weight stream of the decode megakernel: every block walks the frame's fixed phase schedule and copies the
// weight tiles of the output units it owns through a shared-memory ring, RING_TILES - 1 tiles ahead.
//
// The schedule depends only on the weights, never on activations or on the batch, so the stream runs ahead across
// grid barriers. Units (rows, or gate/up row pairs) are split evenly over the blocks; weights are repacked at load
// time so each block's units are contiguous: per layer [q;k;v rows | o rows | (gate_i, up_i) pairs | down rows].
#pragma once

#include "mk_common.cuh"

namespace mk {

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

// Units per weight tile: as many as fit, at most 16 rows (two n8 tiles of the mma; a gate/up unit is 2 rows).
__device__ __forceinline__ int units_per_tile(int unit_elems, int halves) {
  const int u = min(16 / halves, TILE_BYTES / (unit_elems * 2));
  return u > 0 ? u : 1;
}

__device__ __forceinline__ int halves_of(int kind) { return kind == PK_GU ? 2 : 1; }

template <class M>
struct WeightStream {
  uint8_t* ring;        // RING_TILES x TILE_BYTES in shared memory
  int issued;           // tiles issued (including empty ones past the end)
  int consumed;
  int prod_phase;       // producer cursor: next phase to look up
  int nb, b;
  // Producer cursor of the current phase: next byte to copy, bytes left for this block, bytes per full tile.
  const uint8_t* cur_src;
  int cur_left;
  int cur_tile;
#if MK_TMA
  uint64_t* mbar;       // shared [RING_TILES], one per slot
#endif

  __device__ void init(uint8_t* ring_, uint64_t* mbar_, int nb_, int b_) {
    ring = ring_;
    issued = consumed = prod_phase = 0;
    nb = nb_;
    b = b_;
    cur_src = nullptr;
    cur_left = cur_tile = 0;
#if MK_TMA
    mbar = mbar_;
    if (threadIdx.x == 0) {
      for (int i = 0; i < RING_TILES; ++i) mbar_init(&mbar[i], 1);
      mbar_fence_init();
    }
    __syncthreads();
#else
    (void)mbar_;
#endif
  }

  // Issue the next tile of the schedule (or an empty group past the end) into ring slot issued % RING_TILES.
  // The phase lookup runs only when the current phase's bytes are used up.
  __device__ void issue_next(const MkParams& p) {
    uint8_t* dst = ring + (issued % RING_TILES) * TILE_BYTES;
    while (cur_left == 0 && prod_phase < num_phases<M>()) {
      const PhaseW pw = phase_weights<M>(p, prod_phase++);
      int u0, u1;
      split_range(pw.n_units, nb, b, u0, u1);
      const int ub = pw.unit_elems * 2;
      cur_tile = units_per_tile(pw.unit_elems, halves_of(pw.kind)) * ub;
      cur_src = reinterpret_cast<const uint8_t*>(pw.w) + (long long)u0 * ub;
      cur_left = (u1 - u0) * ub;
    }
#if MK_TMA
    // Thread 0 issues the whole tile as one bulk copy (after the block barrier in acquire(): every thread is done
    // with the slot); an empty tile just arrives, so every slot's mbarrier completes one phase per use.
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
#else
    if (cur_left > 0) {
      const int bytes = min(cur_tile, cur_left);
      const int chunks = bytes >> 4;
#pragma unroll 4
      for (int i = threadIdx.x; i < chunks; i += NTHREADS) cp_async16(dst + 16 * i, cur_src + 16 * i);
      cur_src += bytes;
      cur_left -= bytes;
    }
    cp_async_commit();
#endif
    ++issued;
  }

  __device__ void prime(const MkParams& p) {
    for (int i = 0; i < RING_TILES - 1; ++i) issue_next(p);
  }

  // Wait for tile `consumed`, then refill the slot the previous tile used (one __syncthreads per tile: it both
  // publishes the new tile and proves every thread is done with the previous one).
  __device__ const bf16* acquire(const MkParams& p) {
#if MK_TMA
    mbar_wait(mbar + (consumed % RING_TILES), (uint32_t)((consumed / RING_TILES) & 1));
#else
    cp_async_wait<RING_TILES - 2>();
#endif
    __syncthreads();
    issue_next(p);
    return reinterpret_cast<const bf16*>(ring + (consumed % RING_TILES) * TILE_BYTES);
  }

  __device__ void release() { ++consumed; }

  // Wait for every copy still in flight (a block must not exit while one writes its shared memory).
  __device__ void drain() {
#if MK_TMA
    for (int k = consumed; k < issued; ++k) mbar_wait(mbar + (k % RING_TILES), (uint32_t)((k / RING_TILES) & 1));
    consumed = issued;
#else
    cp_async_wait_all();
#endif
  }
};

}  // namespace mk
