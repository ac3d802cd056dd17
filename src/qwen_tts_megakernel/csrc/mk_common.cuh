// Shared building blocks of the decode megakernel: model shapes, parameter structs, small math helpers.
//
// Everything the kernel needs to know about a model is a compile-time Shapes<> instantiation below; the Python
// side derives the same numbers from the checkpoint config and checks them against mk_layout() at load time.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace mk {

typedef __nv_bfloat16 bf16;
typedef float kv_t;  // KV-cache element: fp32 (bf16 storage cost ~4e-3 relative error on the logits)

// ------------------------------------------------------------------------------------------------------------
// Launch geometry and streaming constants

constexpr int NTHREADS = 512;               // threads per block (16 warps), one block per SM
constexpr int NWARPS = NTHREADS / 32;
// Shared memory per block differs by GPU: build.py passes MK_TILE_KB for the target (H100/B200: 32 KB tiles,
// A100: 24, consumer parts with 99 KB per block: 12). A tile must hold one unit (12 KB for the 1.7B down rows).
#ifndef MK_TILE_KB
#define MK_TILE_KB 32
#endif
constexpr int TILE_BYTES = MK_TILE_KB * 1024;  // one weight tile in the shared-memory ring
// Variant switches (compile-time; defaults = v4, the fastest measured; build.py passes QWEN_TTS_MK_DEFINES to
// override): MK_RING ring depth, MK_SCHED cached
// producer cursor (no phase lookup per tile), MK_ONESYNC one __syncthreads per tile, MK_BAR2 relaxed spin + one
// acquire load (no SC fence) in the grid barrier.
#ifndef MK_RING  // 3 (64 KB in flight per SM) beats 4, 2 and 16 KB tiles on an H200: weight traffic beyond what
#define MK_RING 3  // the bandwidth needs only delays the latency-bound activation loads and barrier polls
#endif
#ifndef MK_SCHED
#define MK_SCHED 1
#endif
#ifndef MK_ONESYNC
#define MK_ONESYNC 1
#endif
#ifndef MK_BAR2
#define MK_BAR2 1
#endif
// Out-of-line switches (register allocation of the hot matvec loops): MK_NOINLINE bit 1 = sampling and the
// output record, bit 2 = attention and its combine, bit 4 = RMSNorm.
#ifndef MK_NOINLINE
#define MK_NOINLINE 0
#endif
#if MK_NOINLINE & 1
#define MK_COLD __noinline__
#else
#define MK_COLD
#endif
#if MK_NOINLINE & 2
#define MK_COLD_ATTN __noinline__
#else
#define MK_COLD_ATTN
#endif
#if MK_NOINLINE & 4
#define MK_COLD_NORM __noinline__
#else
#define MK_COLD_NORM
#endif
// Timing experiment: MK_TRACE=1 stamps clock64 at section boundaries in two blocks (megakernel/trace.py).
#ifndef MK_TRACE
#define MK_TRACE 0
#endif
#ifndef MK_TMA  // Hopper bulk copy (cp.async.bulk, one instruction per tile) + mbarrier per ring slot; needs
#define MK_TMA 1  // MK_SCHED and MK_ONESYNC
#endif
#if MK_TMA && (!MK_SCHED || !MK_ONESYNC || __CUDA_ARCH__ < 900)
#undef MK_TMA
#define MK_TMA 0
#endif
constexpr int RING_TILES = MK_RING;         // tiles in the ring; RING_TILES - 1 are in flight while one is used
constexpr int ACT_FLOATS = 6144;            // activation scratch: max over phases of rows x input width
constexpr int MISC_BYTES = 8192;            // reductions, sampling candidates
constexpr int NC_MAX = 16;                  // max attention chunks (split-K over positions) per KV head
constexpr int CAND_MAX = 256;               // max sampling candidates after top-k (ties at the k-th included)
constexpr int OUT_RING = 8;                 // output records kept per slot (frame % OUT_RING)
constexpr int REC_INTS = 32;                // one output record: codes[16], frame, eos, error, ..., seq
constexpr int REC_FRAME = 16, REC_EOS = 17, REC_ERROR = 18, REC_NCAND = 19, REC_SEQ = 31;
constexpr int NCODES = 16;                  // codebooks per frame
constexpr int CP_POS = 16;                  // code predictor positions per frame (0..15)
constexpr int XOWN_ROWS = 128;              // residual rows one block owns (H / blocks rounded up), at most
constexpr int SMEM_BYTES = RING_TILES * TILE_BYTES + ACT_FLOATS * 4 + MISC_BYTES;

// Error codes written to the error word / output record.
constexpr int ERR_TIMEOUT = 1;              // a grid barrier waited longer than the timeout
constexpr int ERR_PEER = 2;                 // another block reported an error first
constexpr int ERR_TABLE = 3;                // random-number table or forced-code table too short
constexpr int ERR_POS = 4;                  // position beyond the KV cache

// ------------------------------------------------------------------------------------------------------------
// Model shapes

// One Qwen3 decoder stack: hidden H, FFN F, L layers, head vocabulary V; 16 q heads / 8 kv heads of 128.
// Per-layer weight blob (bf16, repacked at load time): [qkv rows QKV x H | o rows H x QD | gate/up pairs F x 2H |
// down rows H x F]. Per-layer norm blob: [input_layernorm H | post_attention_layernorm H | q_norm HD | k_norm HD].
template <int H_, int F_, int L_, int V_>
struct Stack {
  static constexpr int H = H_, F = F_, L = L_, V = V_;
  static constexpr int NQ = 16, NKV = 8, HD = 128;
  static constexpr int QD = NQ * HD, KVD = NKV * HD, QKV = QD + 2 * KVD;
  static constexpr long long OFF_QKV = 0;
  static constexpr long long OFF_O = OFF_QKV + (long long)QKV * H;
  static constexpr long long OFF_GU = OFF_O + (long long)H * QD;
  static constexpr long long OFF_D = OFF_GU + 2LL * F * H;
  static constexpr long long LAYER_ELEMS = OFF_D + (long long)H * F;
  static constexpr int NORM_ELEMS = 2 * H + 2 * HD;
};

// A whole model: talker stack, code-predictor stack, and whether code-predictor inputs go through
// small_to_mtp_projection (talker width -> predictor width, with bias).
template <class TalkerStack, class CPStack, bool PROJ_>
struct Shapes {
  using T = TalkerStack;
  using C = CPStack;
  static constexpr bool PROJ = PROJ_;
  static_assert(!PROJ_ == (TalkerStack::H == CPStack::H), "projection exactly when widths differ");
};

using Shapes06 = Shapes<Stack<1024, 3072, 28, 3072>, Stack<1024, 3072, 5, 2048>, false>;  // 12Hz-0.6B
using Shapes17 = Shapes<Stack<2048, 6144, 28, 3072>, Stack<1024, 3072, 5, 2048>, true>;   // 12Hz-1.7B

// ------------------------------------------------------------------------------------------------------------
// Parameters. Only 8-byte fields, so the ctypes mirror in megakernel/backend.py is a flat list.

struct MkParams {
  // weights (bf16)
  const bf16* t_layers;      // [L][LAYER_ELEMS]
  const bf16* t_norms;       // [L][NORM_ELEMS]
  const bf16* t_final_norm;  // [H]
  const bf16* t_codec_emb;   // [V][H]
  const bf16* t_head;        // [V][H]
  const bf16* c_layers;      // [L][LAYER_ELEMS] (predictor dims)
  const bf16* c_norms;       // [L][NORM_ELEMS]
  const bf16* c_final_norm;  // [CH]
  const bf16* c_emb;         // [15][CV][H_talker]
  const bf16* c_heads;       // [15][CV][CH]
  const bf16* c_proj_w;      // [CH][H_talker] (projection models only)
  const bf16* c_proj_b;      // [CH]
  const float* t_rope;       // [max_seq][HD]: cos of the 64 frequencies, then sin
  const float* c_rope;       // [CP_POS][HD]
  // caches (all slots)
  kv_t* t_kv;                // [slots][L][2][NKV][max_seq][HD]
  kv_t* c_kv;                // [slots][L][2][NKV][CP_POS][HD]
  // scratch shared by every slot (launches of one instance are serialized on one CUDA stream)
  float* x_res;              // [2][max(H, CH)] residual stream
  float* qkv;                // [2][QKV]
  float* attn_part;          // [2][NQ][NC_MAX][2 + HD] attention partials (m, l, acc)
  float* act;                // [2][max(F, CF)] MLP activations
  float* t_logits;           // [V] raw talker logits of the latest launch
  float* c_logits;           // [CV]
  float* dbg_hidden;         // [H] talker post-norm hidden of the latest launch (after the perturbation)
  // synchronization (per instance)
  unsigned long long* bar_count;  // monotonic arrival counter
  unsigned long long* bar_base;   // value of bar_count when the next launch starts (written at launch end)
  int* error;                     // first error code of the instance (0 = none)
  long long max_seq;
  long long slots;
  long long timeout_ns;
  double t_eps, c_eps;
};

// One stream slot: where its state lives and how it samples.
struct MkSlot {
  long long slot;            // index into the caches
  float* x_in;               // [H] talker input of the next launch (written by each launch for the next)
  const float* text_rows;    // [n_text][H]
  const float* pad_row;      // [H]
  const double* uniforms;    // [n_uniform_frames][16] or null (then Philox)
  const int* forced;         // [n_forced_frames][16] teacher-forced codes or null
  unsigned int* seen;        // [V / 32] bitmap of past codebook-0 tokens (repetition penalty)
  int* done;                 // set to 1 when EOS was emitted
  int* out_dev;              // [OUT_RING][REC_INTS]
  int* out_host;             // same, in mapped pinned host memory (may be null)
  long long n_text;
  long long n_uniform_frames;
  long long n_forced_frames;
  long long seed;
  long long do_sample, top_k, cp_do_sample, cp_top_k;
  long long eos_id, suppress_start, min_new_tokens;
  double temperature, top_p, rep_penalty;
  double cp_temperature, cp_top_p;
};

// ------------------------------------------------------------------------------------------------------------
// Small helpers

// 8 bf16 packed in a uint4 -> 8 floats.
__device__ __forceinline__ void unpack_bf16x8(const uint4& v, float* f) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
  }
}

__device__ __forceinline__ float bf16_to_float(bf16 x) { return __bfloat162float(x); }

// Sum over the 32 lanes of a warp (butterfly: every lane gets the total, same order in every lane).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Rows [begin, end) of n rows owned by block b of nb (balanced split, deterministic).
__device__ __forceinline__ void split_range(int n, int nb, int b, int& begin, int& end) {
  // 32-bit unsigned arithmetic (n * nb < 2^32 for every phase): same result as 64-bit, far fewer instructions.
  begin = (int)(((unsigned)n * (unsigned)b) / (unsigned)nb);
  end = (int)(((unsigned)n * (unsigned)(b + 1)) / (unsigned)nb);
}

// Coherent loads/stores of data written by other blocks in the same launch (never the non-coherent path).
__device__ __forceinline__ unsigned long long ld_acquire_u64(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ unsigned long long ld_relaxed_u64(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ int ld_relaxed_i32(const int* p) {
  int v;
  asm volatile("ld.relaxed.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ unsigned long long globaltimer_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// cp.async 16-byte global -> shared copy (L2 only), commit and wait.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  uint32_t s = (uint32_t)__cvta_generic_to_shared(smem);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

#if MK_TMA
// mbarrier + 1-D bulk copy (sm_90): completion counted in bytes on the slot's mbarrier.
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"((uint32_t)__cvta_generic_to_shared(bar)), "r"(count)
               : "memory");
}
__device__ __forceinline__ void mbar_fence_init() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }
__device__ __forceinline__ void mbar_arrive_expect(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"((uint32_t)__cvta_generic_to_shared(bar)),
               "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"((uint32_t)__cvta_generic_to_shared(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  const uint32_t a = (uint32_t)__cvta_generic_to_shared(bar);
  asm volatile(
      "{\n .reg .pred P;\n WAIT_%=:\n"
      " mbarrier.try_wait.parity.shared::cta.b64 P, [%0], %1;\n"
      " @!P bra WAIT_%=;\n}" ::"r"(a), "r"(parity) : "memory");
}
__device__ __forceinline__ void bulk_copy_g2s(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               ::"r"((uint32_t)__cvta_generic_to_shared(dst)), "l"(src), "r"(bytes),
               "r"((uint32_t)__cvta_generic_to_shared(bar)) : "memory");
}
__device__ __forceinline__ void fence_proxy_async_smem() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
#endif

// ------------------------------------------------------------------------------------------------------------
// Section trace (MK_TRACE=1 builds only): thread 0 of block 0 and of block gridDim.x / 2 append (tag, clock64)
// records; the host resets and reads them with mk_trace_reset / mk_trace_read.

constexpr int TRACE_MAX = 16384;  // records per traced block
enum TraceTag {
  TR_FRAME_BEGIN = 1, TR_FRAME_END, TR_BAR_BEGIN, TR_BAR_END, TR_PHASE_BEGIN, TR_TILE_READY, TR_PHASE_END,
  TR_NORM_BEGIN, TR_NORM_END, TR_ATTN_BEGIN, TR_ATTN_END, TR_COMBINE_END, TR_SAMPLE_BEGIN, TR_SAMPLE_END,
  TR_COPY_END
};
#if MK_TRACE == 1
__device__ unsigned long long g_trace[2][TRACE_MAX];
__device__ int g_trace_n[2];
#endif
__device__ __forceinline__ void trace(int tag) {
#if MK_TRACE == 1
  if (threadIdx.x != 0) return;
  const int which = blockIdx.x == 0 ? 0 : (blockIdx.x == gridDim.x / 2 ? 1 : -1);
  if (which < 0) return;
  const int n = g_trace_n[which];
  if (n < TRACE_MAX) {
    g_trace[which][n] = ((unsigned long long)tag << 56) | ((unsigned long long)clock64() & ((1ULL << 56) - 1));
    g_trace_n[which] = n + 1;
  }
#else
  (void)tag;
#endif
}

}  // namespace mk
