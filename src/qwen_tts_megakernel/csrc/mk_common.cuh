// Shared building blocks of the decode megakernel: model shapes, parameter structs, small math helpers.
//
// Everything the kernel needs to know about a model is a compile-time Shapes<> instantiation below; the Python
// side derives the same numbers from the checkpoint config and checks them against mk_layout() at load time.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace mk {

typedef __nv_bfloat16 bf16;
// KV-cache element: fp16 by default (K follows the QK-norm, so its range is bounded; a V beyond fp16's range becomes
// inf, and the stream's logits then fail as non-finite), or fp32 with MK_KV_BITS=32. bf16 storage cost ~4e-3
// relative error on the logits (docs/megakernel.md); fp16 has 8x the mantissa.
#ifndef MK_KV_BITS
#define MK_KV_BITS 16
#endif
#if MK_KV_BITS == 16
typedef __half kv_t;
#elif MK_KV_BITS == 32
typedef float kv_t;
#else
#error "MK_KV_BITS must be 16 or 32"
#endif

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
// Hopper bulk copy (cp.async.bulk, one instruction per tile, mbarrier per ring slot); per-thread cp.async elsewhere.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define MK_TMA 1
#else
#define MK_TMA 0
#endif
// Tiles in the ring; RING_TILES - 1 are in flight while one is used. 3 (64 KB in flight per SM) beat 4, 2 and 16 KB
// tiles on an H200: weight traffic beyond what the bandwidth needs only delays the latency-bound loads and polls.
constexpr int RING_TILES = 3;
constexpr int MAX_BATCH = 64;               // streams per launch
constexpr int MAX_ROWS = 2 * MAX_BATCH;     // activation rows of a launch (the predictor's 2-row first step)
// Shared scratch for staged activation rows and sampling scores: build.py passes MK_STAGE_KB for the target
// (H100/B200: 104 KB, the rest of the 227 KB per block; 32 KB elsewhere).
#ifndef MK_STAGE_KB
#define MK_STAGE_KB 32
#endif
constexpr int STAGE_FLOATS = MK_STAGE_KB * 256;
constexpr int RED_FLOATS = NWARPS * 16 * 16;  // per-warp 16 x 16 partial products of one m16 tile
constexpr int MISC_BYTES = 8192;            // sampling scratch
constexpr int ATTN_CHUNK = 32;              // cached positions per attention unit (one warp's work)
constexpr int CAND_MAX = 256;               // max sampling candidates after top-k (ties at the k-th: lowest ids)
constexpr int OUT_RING = 4;                 // launch records kept (launch % OUT_RING)
constexpr int REC_INTS = 32;                // one stream's record: codes[16], frame, eos, error, ..., seq
constexpr int REC_FRAME = 16, REC_EOS = 17, REC_ERROR = 18, REC_NCAND = 19, REC_SEQ = 31;
constexpr int NCODES = 16;                  // codebooks per frame
constexpr int CP_POS = 16;                  // code predictor positions per frame (0..15)
constexpr int SMEM_BYTES = RING_TILES * TILE_BYTES + (STAGE_FLOATS + RED_FLOATS) * 4 + MISC_BYTES;

// Error codes. Instance errors (the launch aborted; every stream of the instance is lost):
constexpr int ERR_TIMEOUT = 1;              // a grid barrier waited longer than the timeout
constexpr int ERR_PEER = 2;                 // another block reported an error first
constexpr int ERR_POS = 4;                  // a position beyond the KV cache
// Stream errors (recorded for that stream only; the others are unaffected):
constexpr int ERR_TABLE = 3;                // random-number or forced-code table too short
constexpr int ERR_NONFINITE = 5;            // a NaN or infinite logit

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
// Parameters. MkParams and MkSlot hold only 8-byte fields, so their ctypes mirrors (megakernel/backend.py) are flat.

struct MkSlot;

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
  // per-slot state
  kv_t* t_kv;                // [slots][L][2][NKV][max_seq][HD]
  kv_t* c_kv;                // [slots][L][2][NKV][CP_POS][HD]
  const MkSlot* slots;       // [slots] sampling parameters and buffers of each slot (written by the host at open)
  float* x_in;               // [slots][H] talker input of each slot's next frame (written by each launch)
  // scratch of one launch, indexed by activation row (launches of one instance are serialized on one CUDA stream)
  float* x_res;              // [MAX_ROWS][max(H, CH)] residual stream
  float* ssq_part;           // [MAX_ROWS][blocks] sum of squares of x_res over the dims each block owns
  float* qkv;                // [MAX_ROWS][QKV]
  float* attn_out;           // [MAX_ROWS][QD]
  float* attn_part;          // [MAX_BATCH][NQ][max_seq / ATTN_CHUNK][4 + HD] attention partials (m, l, -, -, acc)
  int* attn_count;           // [MAX_BATCH][NKV] chunks finished (the last one combines, then resets it to 0)
  float* act;                // [MAX_ROWS][max(F, CF)] MLP activations
  float* cp_in;              // [MAX_ROWS][H] code-predictor step inputs (hidden, then code embeddings)
  float* cp_in_ssq;          // [MAX_ROWS] their sums of squares
  int* codes;                // [MAX_BATCH][2][16] own and used (forced) codes of the launch
  float* t_logits;           // [MAX_BATCH][V] raw talker logits of the latest launch
  float* c_logits;           // [MAX_BATCH][CV]
  float* dbg_hidden;         // [MAX_BATCH][H] talker post-norm hidden of the latest launch (after the perturbation)
  int* out_dev;              // [OUT_RING][MAX_BATCH][REC_INTS] records
  int* out_host;             // same, mapped pinned host memory (may be null)
  // synchronization (per instance)
  unsigned long long* bar_count;  // monotonic arrival counter
  unsigned long long* bar_base;   // value of bar_count when the next launch starts (written at launch end)
  int* error;                     // first instance error code (0 = none)
  long long max_seq;
  long long n_slots;
  long long timeout_ns;
  double t_eps, c_eps;
};

// One stream slot: its text, tables and sampling rules (device memory, one per slot).
struct MkSlot {
  const float* text_rows;    // [n_text][H]
  const float* pad_row;      // [H]
  const double* uniforms;    // [n_uniform_frames][16] or null (then Philox)
  const int* forced;         // [n_forced_frames][16] teacher-forced codes or null
  unsigned int* seen;        // [V / 32] bitmap of past codebook-0 tokens (repetition penalty)
  long long n_uniform_frames;
  long long n_forced_frames;
  long long seed;
  long long do_sample, top_k, cp_do_sample, cp_top_k;
  long long eos_id, suppress_start, min_new_tokens;
  double temperature, top_p, rep_penalty;
  double cp_temperature, cp_top_p;
};

// One stream of a launch.
struct MkEntry {
  int slot;       // KV-cache slot and MkSlot index
  int frame;      // frame index of this stream (random numbers, min_new_tokens, text row)
  int pos;        // talker position of this frame's input (prefill rows - 1 + frame)
  int n_text;     // text rows available; frame k writes frame k+1's input with text row k (pad past the end)
  int zero_text;  // 1: that row has not arrived; add a zero row (the host adds the row before the next launch)
  int pad_[3];
};

// The launch: its streams, in activation-row order.
struct MkLaunch {
  int n;          // streams, 1..MAX_BATCH
  int seq;        // launch counter: records go to ring entry seq % OUT_RING with sequence word seq + 1
  int flags;      // FLAG_* below
  float perturb;  // added to the talker hidden state (validation A/B), 0 in production
  MkEntry e[MAX_BATCH];
};

constexpr int FLAG_TALKER_ONLY = 1;  // stop after codebook 0 (benchmark of the talker step)
constexpr int FLAG_STREAM_ONLY = 4;  // benchmark floor: stream every weight tile, no math, no grid barrier

// ------------------------------------------------------------------------------------------------------------
// Section markers: MK_SECTION(id) marks the end of a named section of the frame (ids below). The production build
// compiles them to nothing; dev/mk_trace.cuh (built in with -include by dev/mk_trace.py) defines them to record a
// per-block clock stamp, which is how the section table of docs/megakernel.md is measured.
#ifndef MK_SECTION
#define MK_SECTION(id) ((void)0)
#endif
enum Section {
  // per decoder layer, talker (+0) and code predictor (+SEC_CP): the section that just ended
  SEC_QKV = 1, SEC_QKV_BAR, SEC_ATTN, SEC_ATTN_BAR, SEC_O, SEC_O_BAR, SEC_GU, SEC_GU_BAR, SEC_DOWN, SEC_DOWN_BAR,
  SEC_NORM,  // inv_rms_parts of a layer's input (and the post-attention norm inside SEC_GU's count: see trace)
  SEC_CP = 16,
  SEC_START = 40,   // kernel entry, after the stream list checks and the ring prime
  SEC_INPUT,        // talker input rows: residual copy and their 1 / rms
  SEC_HEAD,         // talker final norm + codec head product
  SEC_HEAD_BAR,
  SEC_SAMPLE0,      // codebook 0 sampling + the predictor's first rows
  SEC_SAMPLE0_BAR,
  SEC_CP_INPUT,     // predictor step input (projection or copy, and its norm)
  SEC_CP_INPUT_BAR,
  SEC_CP_HEAD,      // predictor final norm + lm_head product
  SEC_CP_HEAD_BAR,
  SEC_CP_SAMPLE,    // codebook j sampling + next step's input row
  SEC_CP_SAMPLE_BAR,
  SEC_END,
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

// 4 consecutive KV-cache elements (this lane's dims of a head): loaded raw (one 8- or 16-byte access, 4-element
// aligned), unpacked to floats where used; stored from floats.
#if MK_KV_BITS == 16
typedef uint2 kv4_raw;
#else
typedef float4 kv4_raw;
#endif
__device__ __forceinline__ kv4_raw load_kv4(const kv_t* src) { return *reinterpret_cast<const kv4_raw*>(src); }
__device__ __forceinline__ void unpack_kv4(const uint2& u, float (&f)[4]) {
  const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&u.x));
  const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&u.y));
  f[0] = a.x; f[1] = a.y; f[2] = b.x; f[3] = b.y;
}
__device__ __forceinline__ void unpack_kv4(const float4& v, float (&f)[4]) {
  f[0] = v.x; f[1] = v.y; f[2] = v.z; f[3] = v.w;
}
__device__ __forceinline__ void store_kv4(__half* dst, const float (&f)[4]) {
  const __half2 a = __floats2half2_rn(f[0], f[1]), b = __floats2half2_rn(f[2], f[3]);
  *reinterpret_cast<uint2*>(dst) = make_uint2(*reinterpret_cast<const uint32_t*>(&a),
                                              *reinterpret_cast<const uint32_t*>(&b));
}
__device__ __forceinline__ void store_kv4(float* dst, const float (&f)[4]) {
  *reinterpret_cast<float4*>(dst) = make_float4(f[0], f[1], f[2], f[3]);
}

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

}  // namespace mk
