// Qwen3-TTS decode megakernel: one persistent launch computes one 80 ms frame for each of up to 64 streams.
//
//   talker step (28 layers) for every stream at its own position -> final norm -> codec_head logits
//   -> sample g0 per stream (repetition penalty, suppress, min_new_tokens, temperature, top-k, top-p, inverse CDF)
//   -> code predictor: 2-row prefill [h, C(g0)] at positions 0,1, then 14 steps, lm_head[j-1] -> sample g_j
//   -> next talker input = C(g0) + sum_j cp_emb[j-1][g_j] + text row (or pad) -> 16 codes to device + pinned host.
//
// Structure (docs/megakernel.md):
//   * grid = one block of 512 threads per SM (cooperative launch, so a misfit fails instead of hanging);
//   * the launch's streams are a list (MkLaunch): activation row i belongs to stream e[i] (two rows per stream in
//     the predictor's first step); per-stream state (KV cache, penalty bitmap, tables, next input) lives in
//     device arrays indexed by the stream's slot, so streams join and leave between launches without recompiling;
//   * every matrix product is a "phase" whose output units are split evenly over the blocks; each block streams
//     its units' weights once per launch through a shared-memory ring (mk_stream.cuh) and multiplies every tile
//     with all the launch's rows on tensor cores (mk_mma.cuh);
//   * 5 grid barriers per layer: QKV | attention work list | o_proj + residual | gate/up + SiLU | down + residual;
//     one after each head and one after each sampling. RMSNorms are applied while loading a product's rows, from
//     per-block partial sums of squares written by the phase that produced the residual (mk_norm.cuh);
//   * each stream is sampled by one block (stream i by block i % blocks), which also writes its next inputs.
//   * batch invariance: no reduction order depends on the number of streams or on the other streams.
#include <stdio.h>

#include "mk_common.cuh"
#include "mk_sync.cuh"
#include "mk_stream.cuh"
#include "mk_mma.cuh"
#include "mk_norm.cuh"
#include "mk_attention.cuh"
#include "mk_sampling.cuh"
#include "mk_test_kernels.cuh"

// dev/mk_breakdown.py builds with MK_DEV_TIMING=1 for launch flags that skip one stage (timing only, results are
// garbage); the production build has none of it.
#ifndef MK_DEV_TIMING
#define MK_DEV_TIMING 0
#endif

namespace mk {

constexpr int FLAG_DEV_NO_ATTENTION = 16, FLAG_DEV_NO_MATH = 32, FLAG_DEV_NO_GRID_SYNC = 64;
__device__ __forceinline__ bool dev_flag(int flags, int f) { return MK_DEV_TIMING && (flags & f); }

constexpr int CODES_STRIDE = 64;  // p.codes per stream: own[16], used[16], error, candidates
constexpr int CODE_USED = 16, CODE_ERR = 32, CODE_NCAND = 33;

// ------------------------------------------------------------------------------------------------------------
// Per-block context

template <class Model>
struct Ctx {
  const MkParams& p;
  const MkLaunch& L;
  WeightStream<Model> ws;
  GridBarrier bar;
  float* stage;       // shared [STAGE_FLOATS]: staged rows, sampling scores
  float* red;         // shared [RED_FLOATS]
  SampleScratch* ss;
  float* s_inv;       // shared [MAX_ROWS] 1 / rms of the current product's rows
  int* s_slot;        // shared [MAX_BATCH] slot of each stream
  int* s_p0;          // shared [MAX_BATCH] first new position of each stream in the current stack
  int phase;          // next phase index of the consumer
  int nb, b, B;

  __device__ Ctx(const MkParams& p_, const MkLaunch& L_) : p(p_), L(L_) {}

  // Stream every tile of the next phase through tile_mma with rows 0..M-1 of `a`. The rows that fit are staged in
  // shared memory first (same values, one L2 trip per phase instead of one per tile).
  template <int HALVES, class Epi>
  __device__ void run_phase(ASrc a, int M, Epi epi) {
    const PhaseW pw = phase_weights<Model>(p, phase++);
    int u0, u1;
    split_range(pw.n_units, nb, b, u0, u1);
    const int upt = units_per_tile(pw.unit_elems, HALVES);
    const int K = pw.unit_elems / HALVES;
    a = stage_rows(a, M, K, stage);
    for (int u = u0; u < u1; u += upt) {
      const bf16* tile = ws.acquire(p);
      if (!dev_flag(L.flags, FLAG_DEV_NO_MATH)) tile_mma<HALVES>(tile, min(upt, u1 - u), K, a, M, u, red, epi);
      ws.release();
    }
    __syncthreads();  // the staged rows may be overwritten by the caller next
  }
};

#define MK_SYNC()                                                                   \
  do {                                                                              \
    if (dev_flag(c.L.flags, FLAG_DEV_NO_GRID_SYNC)) __syncthreads();                \
    else if (!c.bar.sync(c.nb)) {                                                   \
      c.ws.drain();                                                                 \
      return false;                                                                 \
    }                                                                               \
  } while (0)

// Block-wide sum of one value per thread (fixed order), returned to every thread. `red` is shared [NWARPS].
__device__ __forceinline__ float block_sum(float v, float* red) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = 0.f;
#pragma unroll
  for (int w = 0; w < NWARPS; ++w) t += red[w];
  __syncthreads();
  return t;
}

// ------------------------------------------------------------------------------------------------------------
// One decoder layer on M rows (nr per stream). `x` = the layer input rows with their 1 / rms (x.inv) set; x_res
// holds the residual stream [M][S::H], of which this block owns dims [o0, o1) (the o_proj and down units).

template <class Model, class S>
__device__ bool decoder_layer(Ctx<Model>& c, ASrc x, int M, int nr, const bf16* norms, kv_t* kv_base,
                              long long kv_slot_stride, long long kv_layer_off, int cap, const float* rope,
                              float eps) {
  const MkParams& p = c.p;
  float* x_res = p.x_res;
  // section ids of this stack (used by trace builds only: MK_SECTION is empty in production)
  [[maybe_unused]] constexpr int sec0 = S::L == Model::T::L && S::V == Model::T::V ? 0 : SEC_CP;
  int o0, o1;
  split_range(S::H, c.nb, c.b, o0, o1);
  // 1. input norm + fused QKV
  x.w = norms;
  float* qkv = p.qkv;
  c.template run_phase<1>(x, M, [&](int i, int u, float (&v)[1]) { qkv[(long long)i * S::QKV + u] = v[0]; });
  MK_SECTION(sec0 + SEC_QKV);
  MK_SYNC();
  MK_SECTION(sec0 + SEC_QKV_BAR);
  // 2. attention work list (QK-norm + RoPE + KV append inside)
  if (!dev_flag(c.L.flags, FLAG_DEV_NO_ATTENTION))
    attention_phase<S>(qkv, M / nr, nr, c.s_p0, c.s_slot, kv_base, kv_slot_stride, kv_layer_off, cap, norms, rope,
                       eps, p.attn_out, p.attn_part, p.attn_count, c.nb, c.b);
  MK_SECTION(sec0 + SEC_ATTN);
  MK_SYNC();
  MK_SECTION(sec0 + SEC_ATTN_BAR);
  // 3. o_proj + residual
  c.template run_phase<1>(ASrc{p.attn_out, nullptr, S::QD, nullptr, nullptr, 0.f}, M,
                          [&](int i, int u, float (&v)[1]) {
                            float* r = x_res + (long long)i * S::H + u;
                            *r = *r + v[0];
                          });
  write_ssq_part(p.ssq_part, x_res, S::H, M, o0, o1, c.nb, c.b);
  MK_SECTION(sec0 + SEC_O);
  MK_SYNC();
  MK_SECTION(sec0 + SEC_O_BAR);
  // 4. post-attention norm + gate/up + SiLU
  inv_rms_parts(c.s_inv, p.ssq_part, c.nb, M, 0, 1, S::H, eps);
  float* mlp = p.act;
  c.template run_phase<2>(ASrc{x_res, nullptr, S::H, c.s_inv, norms + S::H, 0.f}, M,
                          [&](int i, int u, float (&v)[2]) {
                            const float g = v[0];
                            mlp[(long long)i * S::F + u] = g / (1.f + __expf(-g)) * v[1];
                          });
  MK_SECTION(sec0 + SEC_GU);
  MK_SYNC();
  MK_SECTION(sec0 + SEC_GU_BAR);
  // 5. down + residual
  c.template run_phase<1>(ASrc{mlp, nullptr, S::F, nullptr, nullptr, 0.f}, M, [&](int i, int u, float (&v)[1]) {
    float* r = x_res + (long long)i * S::H + u;
    *r = *r + v[0];
  });
  write_ssq_part(p.ssq_part, x_res, S::H, M, o0, o1, c.nb, c.b);
  MK_SECTION(sec0 + SEC_DOWN);
  MK_SYNC();
  MK_SECTION(sec0 + SEC_DOWN_BAR);
  return true;
}

// ------------------------------------------------------------------------------------------------------------
// Sampling and per-stream outputs (one block per stream)

// Uniform for draw j of frame `frame`: from the table when given, else Philox. Returns -1 when the table is short.
__device__ __forceinline__ double draw_uniform(const MkSlot& s, int frame, int j) {
  if (s.uniforms) {
    if (frame >= s.n_uniform_frames) return -1.0;
    return s.uniforms[(long long)frame * NCODES + j];
  }
  return philox_uniform((unsigned long long)s.seed, (uint32_t)frame, (uint32_t)j);
}

// dst[0..n) = bf16 row `code` of `table` [*, n] (fp32); returns the row's sum of squares (fixed order).
__device__ __forceinline__ float emb_row(float* dst, const bf16* table, int code, int n, float* red) {
  float s = 0.f;
  for (int k = threadIdx.x; k < n; k += NTHREADS) {
    const float v = bf16_to_float(table[(long long)code * n + k]);
    dst[k] = v;
    s += v * v;
  }
  return block_sum(s, red);
}

// Sample codebook j (0 = talker head, else predictor head j-1) of stream i; returns the code fed back (forced or
// sampled) and records the own code, the used code and any stream error in p.codes.
template <class Model>
__device__ int sample_stream(Ctx<Model>& c, int i, int j) {
  using T = typename Model::T;
  using C = typename Model::C;
  const MkParams& p = c.p;
  const MkEntry& e = c.L.e[i];
  const MkSlot& s = p.slots[e.slot];
  const int n = j == 0 ? T::V : C::V;
  const float* lg = j == 0 ? p.t_logits + (long long)i * T::V : p.c_logits + (long long)i * C::V;
  float* scores = c.stage;
  int bad = 0;
  if (j == 0) {
    const float pen = (float)s.rep_penalty;
    for (int v = threadIdx.x; v < n; v += NTHREADS) {
      float x = lg[v];
      bad |= !isfinite(x);
      if ((s.seen[v >> 5] >> (v & 31)) & 1u) x = x < 0.f ? x * pen : x / pen;
      if (v >= s.suppress_start && v != s.eos_id) x = -INFINITY;
      if (v == s.eos_id && e.frame < s.min_new_tokens) x = -INFINITY;
      scores[v] = x;
    }
  } else {
    for (int v = threadIdx.x; v < n; v += NTHREADS) {
      const float x = lg[v];
      bad |= !isfinite(x);
      scores[v] = x;
    }
  }
  bad = __syncthreads_or(bad);
  int* codes = p.codes + (long long)i * CODES_STRIDE;
  int err = bad ? ERR_NONFINITE : 0;
  double u = draw_uniform(s, e.frame, j);
  if (u < 0.0) { err = ERR_TABLE; u = 0.0; }
  const int g = j == 0 ? block_sample(scores, n, s.do_sample != 0, (float)s.temperature, (int)s.top_k, s.top_p, u,
                                      c.ss)
                       : block_sample(scores, n, s.cp_do_sample != 0, (float)s.cp_temperature, (int)s.cp_top_k,
                                      s.cp_top_p, u, c.ss);
  int used = g;
  if (s.forced) {
    if (e.frame >= s.n_forced_frames) err = ERR_TABLE;
    else used = s.forced[(long long)e.frame * NCODES + j];
  }
  if (threadIdx.x == 0) {
    codes[j] = g;
    codes[CODE_USED + j] = used;
    if (j == 0) { codes[CODE_ERR] = err; codes[CODE_NCAND] = c.ss->count; }
    else if (err && !codes[CODE_ERR]) codes[CODE_ERR] = err;
    if (j == 0 && used != s.eos_id) s.seen[used >> 5] |= 1u << (used & 31);
  }
  return used;
}

// Record stream i's frame: device ring, then the pinned host mirror with the sequence word written last.
__device__ void write_record(const MkParams& p, const MkLaunch& L, int i, const int* codes, int eos, int err,
                             int ncand) {
  const long long at = ((long long)(L.seq % OUT_RING) * MAX_BATCH + i) * REC_INTS;
  int* d = p.out_dev + at;
  for (int j = 0; j < NCODES; ++j) d[j] = codes ? codes[j] : 0;
  d[REC_FRAME] = L.e[i].frame; d[REC_EOS] = eos; d[REC_ERROR] = err; d[REC_NCAND] = ncand;
  d[REC_SEQ] = L.seq + 1;
  if (p.out_host) {
    volatile int* h = p.out_host + at;
    for (int j = 0; j < NCODES; ++j) h[j] = codes ? codes[j] : 0;
    h[REC_FRAME] = L.e[i].frame; h[REC_EOS] = eos; h[REC_ERROR] = err; h[REC_NCAND] = ncand;
    __threadfence_system();
    h[REC_SEQ] = L.seq + 1;
    __threadfence_system();
  }
}

template <class Model>
__device__ void finish_stream(Ctx<Model>& c, int i) {
  __syncthreads();  // thread 0 wrote the codes
  if (threadIdx.x == 0) {
    const int* codes = c.p.codes + (long long)i * CODES_STRIDE;
    const MkSlot& s = c.p.slots[c.L.e[i].slot];
    write_record(c.p, c.L, i, codes, codes[CODE_USED] == s.eos_id, codes[CODE_ERR], codes[CODE_NCAND]);
  }
}

// After codebook 0 of stream i: the predictor's first-step rows [h, C(g0)] (activation rows 2i, 2i+1) and their
// sums of squares; h (post-norm hidden + perturbation) also to dbg_hidden.
template <class Model>
__device__ void talker_outputs(Ctx<Model>& c, int i, int used0) {
  using T = typename Model::T;
  const MkParams& p = c.p;
  inv_rms_parts(c.s_inv, p.ssq_part, c.nb, 1, i, 1, T::H, (float)p.t_eps);
  const float inv = c.s_inv[0];
  float* h = p.cp_in + (long long)(2 * i) * T::H;
  float s = 0.f;
  for (int k = threadIdx.x; k < T::H; k += NTHREADS) {
    const float v = p.x_res[(long long)i * T::H + k] * inv * bf16_to_float(p.t_final_norm[k]) + c.L.perturb;
    h[k] = v;
    p.dbg_hidden[(long long)i * T::H + k] = v;
    s += v * v;
  }
  s = block_sum(s, c.red);
  const float s1 = emb_row(p.cp_in + (long long)(2 * i + 1) * T::H, p.t_codec_emb, used0, T::H, c.red);
  if (threadIdx.x == 0) { p.cp_in_ssq[2 * i] = s; p.cp_in_ssq[2 * i + 1] = s1; }
}

// After codebook 15 of stream i: the slot's next talker input C(g0) + sum_j cp_emb[j-1][g_j] + text row.
template <class Model>
__device__ void next_input(Ctx<Model>& c, int i) {
  using T = typename Model::T;
  using C = typename Model::C;
  const MkParams& p = c.p;
  const MkEntry& e = c.L.e[i];
  const MkSlot& s = p.slots[e.slot];
  __syncthreads();
  const int* used = p.codes + (long long)i * CODES_STRIDE + CODE_USED;
  if (used[0] == s.eos_id) return;
  const float* text = e.frame < e.n_text ? s.text_rows + (long long)e.frame * T::H : (e.zero_text ? nullptr : s.pad_row);
  float* xin = p.x_in + (long long)e.slot * T::H;
  for (int k = threadIdx.x; k < T::H; k += NTHREADS) {
    float x = bf16_to_float(p.t_codec_emb[(long long)used[0] * T::H + k]);
    for (int j = 1; j < NCODES; ++j) x += bf16_to_float(p.c_emb[((long long)(j - 1) * C::V + used[j]) * T::H + k]);
    xin[k] = x + (text ? text[k] : 0.f);
  }
}

// ------------------------------------------------------------------------------------------------------------
// The frame

template <class Model>
__device__ __forceinline__ bool frame_body(Ctx<Model>& c) {
  using T = typename Model::T;
  using C = typename Model::C;
  const MkParams& p = c.p;
  const int B = c.B, nb = c.nb, b = c.b;

  // ---- talker step: row i = stream i ----
  {
    int o0, o1;
    split_range(T::H, nb, b, o0, o1);  // residual dims this block owns (o_proj and down units)
    for (int i = 0; i < B; ++i)
      for (int u = o0 + threadIdx.x; u < o1; u += NTHREADS)
        p.x_res[(long long)i * T::H + u] = p.x_in[(long long)c.s_slot[i] * T::H + u];
  }
  inv_rms_rows(c.s_inv, p.x_in, c.s_slot, T::H, B, T::H, (float)p.t_eps);
  MK_SECTION(SEC_INPUT);
  ASrc x{p.x_in, c.s_slot, T::H, c.s_inv, nullptr, 0.f};
  const long long t_slot_stride = (long long)T::L * 2 * T::NKV * p.max_seq * T::HD;
  for (int l = 0; l < T::L; ++l) {
    if (l > 0) {
      inv_rms_parts(c.s_inv, p.ssq_part, nb, B, 0, 1, T::H, (float)p.t_eps);
      MK_SECTION(SEC_NORM);
      x = ASrc{p.x_res, nullptr, T::H, c.s_inv, nullptr, 0.f};
    }
    if (!decoder_layer<Model, T>(c, x, B, 1, p.t_norms + (long long)l * T::NORM_ELEMS, p.t_kv, t_slot_stride,
                                 (long long)l * 2 * T::NKV * p.max_seq * T::HD, (int)p.max_seq, p.t_rope,
                                 (float)p.t_eps))
      return false;
  }
  // final norm (+ perturbation) -> codec head
  inv_rms_parts(c.s_inv, p.ssq_part, nb, B, 0, 1, T::H, (float)p.t_eps);
  {
    float* logits = p.t_logits;
    c.template run_phase<1>(ASrc{p.x_res, nullptr, T::H, c.s_inv, p.t_final_norm, c.L.perturb}, B,
                            [&](int i, int u, float (&v)[1]) { logits[(long long)i * T::V + u] = v[0]; });
  }
  MK_SECTION(SEC_HEAD);
  MK_SYNC();
  MK_SECTION(SEC_HEAD_BAR);

  // ---- codebook 0 ----
  const bool talker_only = (c.L.flags & FLAG_TALKER_ONLY) != 0;
  for (int i = b; i < B; i += nb) {
    const int used0 = sample_stream(c, i, 0);
    if (talker_only) finish_stream(c, i);
    else talker_outputs(c, i, used0);
  }
  if (talker_only) return true;
  MK_SECTION(SEC_SAMPLE0);
  MK_SYNC();
  MK_SECTION(SEC_SAMPLE0_BAR);

  // ---- code predictor: 15 steps; step j = 1 is the 2-row prefill [h, C(g0)] at positions 0, 1 ----
  const long long c_slot_stride = (long long)C::L * 2 * C::NKV * CP_POS * C::HD;
  int q0, q1;
  split_range(C::H, nb, b, q0, q1);
  for (int j = 1; j < NCODES; ++j) {
    const int nr = j == 1 ? 2 : 1;
    const int M = B * nr;
    for (int i = threadIdx.x; i < B; i += NTHREADS) c.s_p0[i] = j == 1 ? 0 : j;
    __syncthreads();
    ASrc xc;
    if (Model::PROJ) {
      const bf16* bias = p.c_proj_b;
      float* xr = p.x_res;
      c.template run_phase<1>(ASrc{p.cp_in, nullptr, T::H, nullptr, nullptr, 0.f}, M,
                              [&](int i, int u, float (&v)[1]) {
                                xr[(long long)i * C::H + u] = v[0] + bf16_to_float(bias[u]);
                              });
      write_ssq_part(p.ssq_part, p.x_res, C::H, M, q0, q1, nb, b);
      MK_SECTION(SEC_CP_INPUT);
      MK_SYNC();
      MK_SECTION(SEC_CP_INPUT_BAR);
      inv_rms_parts(c.s_inv, p.ssq_part, nb, M, 0, 1, C::H, (float)p.c_eps);
      xc = ASrc{p.x_res, nullptr, C::H, c.s_inv, nullptr, 0.f};
    } else {
      for (int i = 0; i < M; ++i)
        for (int u = q0 + threadIdx.x; u < q1; u += NTHREADS)
          p.x_res[(long long)i * C::H + u] = p.cp_in[(long long)i * T::H + u];
      inv_rms_given(c.s_inv, p.cp_in_ssq, M, 0, 1, C::H, (float)p.c_eps);
      MK_SECTION(SEC_CP_INPUT);
      xc = ASrc{p.cp_in, nullptr, T::H, c.s_inv, nullptr, 0.f};
    }
    for (int l = 0; l < C::L; ++l) {
      if (l > 0) {
        inv_rms_parts(c.s_inv, p.ssq_part, nb, M, 0, 1, C::H, (float)p.c_eps);
        MK_SECTION(SEC_CP + SEC_NORM);
        xc = ASrc{p.x_res, nullptr, C::H, c.s_inv, nullptr, 0.f};
      }
      if (!decoder_layer<Model, C>(c, xc, M, nr, p.c_norms + (long long)l * C::NORM_ELEMS, p.c_kv, c_slot_stride,
                                   (long long)l * 2 * C::NKV * CP_POS * C::HD, CP_POS, p.c_rope, (float)p.c_eps))
        return false;
    }
    // final norm of each stream's last row -> lm_head[j-1]
    inv_rms_parts(c.s_inv, p.ssq_part, nb, B, nr - 1, nr, C::H, (float)p.c_eps);
    {
      float* logits = p.c_logits;
      c.template run_phase<1>(ASrc{p.x_res + (nr - 1) * C::H, nullptr, nr * C::H, c.s_inv, p.c_final_norm, 0.f}, B,
                              [&](int i, int u, float (&v)[1]) { logits[(long long)i * C::V + u] = v[0]; });
    }
    MK_SECTION(SEC_CP_HEAD);
    MK_SYNC();
    MK_SECTION(SEC_CP_HEAD_BAR);
    for (int i = b; i < B; i += nb) {
      const int used = sample_stream(c, i, j);
      if (j < NCODES - 1) {
        const float s = emb_row(p.cp_in + (long long)i * T::H, p.c_emb + (long long)(j - 1) * C::V * T::H, used,
                                T::H, c.red);
        if (threadIdx.x == 0) p.cp_in_ssq[i] = s;
      } else {
        next_input(c, i);
        finish_stream(c, i);
      }
    }
    MK_SECTION(SEC_CP_SAMPLE);
    if (j < NCODES - 1) {
      MK_SYNC();
      MK_SECTION(SEC_CP_SAMPLE_BAR);
    }
  }
  MK_SECTION(SEC_END);
  return true;
}

// Benchmark floor: every weight tile of the frame (or of the talker step, with FLAG_TALKER_ONLY) through the
// shared-memory ring with no math and no grid barrier: the weight stream's own speed.
template <class Model>
__device__ void stream_only(Ctx<Model>& c) {
  const int n_phases = (c.L.flags & FLAG_TALKER_ONLY) ? 4 * Model::T::L + 1 : num_phases<Model>();
  float sink = 0.f;
  for (int ph = 0; ph < n_phases; ++ph) {
    const PhaseW pw = phase_weights<Model>(c.p, ph);
    int u0, u1;
    split_range(pw.n_units, c.nb, c.b, u0, u1);
    const int upt = units_per_tile(pw.unit_elems, halves_of(pw.kind));
    for (int u = u0; u < u1; u += upt) {
      const bf16* tile = c.ws.acquire(c.p);
      sink += bf16_to_float(tile[threadIdx.x]);
      c.ws.release();
    }
  }
  if (sink == 12345.f) c.p.dbg_hidden[0] = sink;  // keep the loads
}

template <class Model>
__global__ void __launch_bounds__(NTHREADS, 1)
    frame_kernel(const __grid_constant__ MkParams p, const __grid_constant__ MkLaunch L) {
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ int s_flag, s_bad;
  __shared__ float s_inv[MAX_ROWS];
  __shared__ int s_slot[MAX_BATCH], s_p0[MAX_BATCH];
  __shared__ __align__(8) uint64_t s_mbar[RING_TILES];
  if (*(volatile int*)p.error) return;  // the instance hit an error before: do nothing
  Ctx<Model> c(p, L);
  c.nb = gridDim.x;
  c.b = blockIdx.x;
  c.B = L.n;
  c.phase = 0;
  c.stage = reinterpret_cast<float*>(smem + RING_TILES * TILE_BYTES);
  c.red = c.stage + STAGE_FLOATS;
  c.ss = reinterpret_cast<SampleScratch*>(c.red + RED_FLOATS);
  c.s_inv = s_inv;
  c.s_slot = s_slot;
  c.s_p0 = s_p0;
  c.bar.count = p.bar_count;
  c.bar.base = *(volatile unsigned long long*)p.bar_base;
  c.bar.error = p.error;
  c.bar.timeout_ns = p.timeout_ns;
  c.bar.n = 0;
  c.bar.s_flag = &s_flag;
  // The stream list: a launch with a bad entry does nothing but report (every block returns before any barrier,
  // so the barrier counters stay consistent).
  if (threadIdx.x == 0) s_bad = L.n < 1 || L.n > MAX_BATCH;
  __syncthreads();
  if (!s_bad && threadIdx.x < L.n) {
    const MkEntry& e = L.e[threadIdx.x];
    s_slot[threadIdx.x] = e.slot;
    s_p0[threadIdx.x] = e.pos;
    if (e.slot < 0 || e.slot >= p.n_slots || e.pos < 0 || e.pos >= p.max_seq) s_bad = 1;
  }
  __syncthreads();
  if (s_bad) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
      atomicCAS(p.error, 0, ERR_POS);
      for (int i = 0; i < min(max(L.n, 0), MAX_BATCH); ++i) write_record(p, L, i, nullptr, 0, ERR_POS, 0);
    }
    return;
  }
  c.ws.init(smem, s_mbar, gridDim.x, blockIdx.x);
  c.ws.prime(p);
  if (L.flags & FLAG_STREAM_ONLY) {
    stream_only<Model>(c);
    c.ws.drain();
    return;  // no barrier passed: the barrier base stays valid
  }
  MK_SECTION(SEC_START);
  const bool ok = frame_body<Model>(c);
  c.ws.drain();
  if (!ok) {
    // Aborted (timeout / peer error): block 0 reports it for every stream; the instance is now unusable.
    if (blockIdx.x == 0 && threadIdx.x == 0) {
      const int err = ld_relaxed_i32(p.error);
      for (int i = 0; i < L.n; ++i) write_record(p, L, i, nullptr, 0, err ? err : ERR_PEER, 0);
    }
    return;
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    // Every block has passed its last barrier and read bar_base: publish the base of the next launch.
    *(volatile unsigned long long*)p.bar_base = c.bar.base + (unsigned long long)c.bar.n * gridDim.x;
    __threadfence();
  }
}

}  // namespace mk

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
                         M::PROJ ? 1 : 0, NTHREADS, SMEM_BYTES, ATTN_CHUNK, CAND_MAX, OUT_RING, REC_INTS, CP_POS,
                         (long long)sizeof(MkParams), (long long)sizeof(MkSlot), num_phases<M>(), MAX_BATCH,
                         (long long)sizeof(MkLaunch), CODES_STRIDE, (long long)sizeof(kv_t)};
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

// Launch one frame for the streams of *launch. cooperative = 1: cudaLaunchCooperativeKernel (fails when the grid
// cannot be co-resident); 0: a plain launch (tests use it to show that a misfit grid times out instead of hanging).
int mk_launch(int variant, const MkParams* params, const MkLaunch* launch, int nblocks, int cooperative,
              void* stream) {
  MkParams p = *params;
  MkLaunch l = *launch;
  if (l.n < 1 || l.n > MAX_BATCH) return (int)cudaErrorInvalidValue;
  void* args[] = {&p, &l};
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
