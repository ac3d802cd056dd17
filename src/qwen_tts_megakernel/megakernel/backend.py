"""The megakernel backend: one CUDA launch generates one 80 ms frame for every given stream (up to 64).

    backend = MegakernelBackend(config, weights, device, max_streams=16, max_seq_len=2048)
    handles = backend.open([StreamSpec(...), ...])      # prefill into free KV-cache slots
    out = backend.step(handles)                         # ONE launch: out.codes [B, 16], out.failed {i: reason}
    backend.close(handles[0])

It implements the backend contract of backends/base.py. Weights are repacked once into the kernel's layout
(csrc/mk_common.cuh: per-layer blob [qkv | o | gate/up pairs | down], bf16). Per-stream state lives in device
arrays indexed by slot (KV cache, next talker input, text rows, pad row, penalty bitmap, MkSlot with the sampling
rules and tables); a launch gets the list of its streams (slot, frame, position, text rows available), so streams
join and leave between launches without any recompilation.

The talker prefill (rows 0..L-2) runs here in PyTorch (fp32 GEMMs on the same bf16 weights) as a CUDA-graph
replay per row bucket (powers of two and their 1.5x midpoints from 16 to 1024 rows, captured at construction into
one memory pool; `prefill_graph_stats` holds the capture time and memory), into the same KV-cache layout the kernel
reads; the last prefill row is frame 0's input. Codes come back through mapped pinned memory (one record per
stream, sequence word last), so a step never waits on a device-wide sync.

Live text (`append_text`, `end_text`): launch k builds launch k+1's input as F(frame k) + text row k, reading the
row one frame earlier than the reference does; TextTrack keeps that from ever reading a row that has not arrived.
"""

from __future__ import annotations

import ctypes
import logging
import math
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..backends.base import BackendError, StepOutput, StreamSpec
from ..precision import fp32_precision
from ..sampling import NUM_DRAWS_PER_FRAME
from .build import load_library

log = logging.getLogger(__name__)

LAYOUT_FIELDS = ("t_H", "t_F", "t_L", "t_V", "t_NQ", "t_NKV", "t_HD", "t_LAYER_ELEMS", "t_NORM_ELEMS",
                 "c_H", "c_F", "c_L", "c_V", "c_NQ", "c_NKV", "c_HD", "c_LAYER_ELEMS", "c_NORM_ELEMS",
                 "PROJ", "NTHREADS", "SMEM_BYTES", "ATTN_CHUNK", "CAND_MAX", "OUT_RING", "REC_INTS", "CP_POS",
                 "sizeof_params", "sizeof_slot", "num_phases", "MAX_BATCH", "sizeof_launch", "CODES_STRIDE",
                 "KV_BYTES")
REC_FRAME, REC_EOS, REC_ERROR, REC_NCAND, REC_SEQ = 16, 17, 18, 19, 31
MAX_ROWS_PER_STREAM = 2  # activation rows of one stream in the predictor's first step
INSTANCE_ERRORS = {1: "grid barrier timeout (a block never arrived: grid larger than the GPU can hold, or a hang)",
                   2: "another block reported an error", 4: "a stream position beyond the KV cache (max_seq_len)"}
STREAM_ERRORS = {3: "random-number or forced-code table too short", 5: "non-finite logits"}
FLAG_TALKER_ONLY, FLAG_STREAM_ONLY = 1, 4
CUDA_NOT_READY = 600


class MegakernelError(BackendError):
    """A launch failed, timed out or reported an error; the backend instance is unusable afterwards."""


_P = ctypes.c_uint64
_I = ctypes.c_int64
_D = ctypes.c_double
_i = ctypes.c_int32


class MkParams(ctypes.Structure):
    _fields_ = [(n, _P) for n in (
        "t_layers", "t_norms", "t_final_norm", "t_codec_emb", "t_head", "c_layers", "c_norms", "c_final_norm",
        "c_emb", "c_heads", "c_proj_w", "c_proj_b", "t_rope", "c_rope", "t_kv", "c_kv", "slots", "x_in", "x_res",
        "ssq_part", "qkv", "attn_out", "attn_part", "attn_count", "act", "cp_in", "cp_in_ssq", "codes", "t_logits",
        "c_logits", "dbg_hidden", "out_dev", "out_host", "bar_count", "bar_base", "error")] + [
        ("max_seq", _I), ("n_slots", _I), ("timeout_ns", _I), ("t_eps", _D), ("c_eps", _D)]


class MkSlot(ctypes.Structure):
    _fields_ = [(n, _P) for n in ("text_rows", "pad_row", "uniforms", "forced", "seen")] + [
        ("n_uniform_frames", _I), ("n_forced_frames", _I), ("seed", ctypes.c_uint64),
        ("do_sample", _I), ("top_k", _I), ("cp_do_sample", _I), ("cp_top_k", _I), ("eos_id", _I),
        ("suppress_start", _I), ("min_new_tokens", _I), ("temperature", _D), ("top_p", _D), ("rep_penalty", _D),
        ("cp_temperature", _D), ("cp_top_p", _D)]


class MkEntry(ctypes.Structure):
    _fields_ = [("slot", _i), ("frame", _i), ("pos", _i), ("n_text", _i), ("zero_text", _i), ("pad_", _i * 3)]


MAX_BATCH = 64


class MkLaunch(ctypes.Structure):
    _fields_ = [("n", _i), ("seq", _i), ("flags", _i), ("perturb", ctypes.c_float), ("e", MkEntry * MAX_BATCH)]


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def variant_for(config) -> int:
    """0 = 12Hz-0.6B shapes, 1 = 12Hz-1.7B shapes (the two compiled instantiations); else NotImplementedError."""
    t, c = config.talker, config.code_predictor
    common = (t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.vocab_size,
              c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
              c.num_key_value_heads, c.head_dim, c.vocab_size)
    if common == (28, 16, 8, 128, 3072, 1024, 3072, 5, 16, 8, 128, 2048):
        if (t.hidden_size, t.intermediate_size) == (1024, 3072):
            return 0
        if (t.hidden_size, t.intermediate_size) == (2048, 6144):
            return 1
    raise NotImplementedError(
        f"the megakernel is compiled for the 12Hz-0.6B and 12Hz-1.7B shapes; got talker hidden {t.hidden_size}, "
        f"ffn {t.intermediate_size}, layers {t.num_hidden_layers}")


def layout(lib, variant: int) -> dict[str, int]:
    out = (ctypes.c_longlong * 64)()
    _check(lib, lib.mk_layout(variant, out), "mk_layout")
    return dict(zip(LAYOUT_FIELDS, out[: len(LAYOUT_FIELDS)]))


def _check(lib, err: int, what: str) -> None:
    if err:
        raise MegakernelError(f"{what}: CUDA error {err} ({lib.mk_error_string(err).decode()})")


def rope_table(positions: int, head_dim: int, theta: float, device) -> torch.Tensor:
    """[positions, head_dim] fp32: cos of the head_dim/2 frequencies, then their sin (model.rope_cos_sin's math)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponent)
    freqs = torch.arange(positions, device=device).float()[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).contiguous()


def _pack_stack(weights: dict, prefix: str, cfg, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Official per-layer tensors -> (layer blob [L, LAYER_ELEMS], norm blob [L, NORM_ELEMS]), bf16 on device."""
    layers, norms = [], []
    for i in range(cfg.num_hidden_layers):
        p = f"{prefix}.layers.{i}."

        def w(name):
            return weights[p + name].to(device=device, dtype=torch.bfloat16)

        gate, up = w("mlp.gate_proj.weight"), w("mlp.up_proj.weight")
        layers.append(torch.cat([
            w("self_attn.q_proj.weight").reshape(-1), w("self_attn.k_proj.weight").reshape(-1),
            w("self_attn.v_proj.weight").reshape(-1), w("self_attn.o_proj.weight").reshape(-1),
            torch.stack([gate, up], dim=1).reshape(-1), w("mlp.down_proj.weight").reshape(-1)]))
        norms.append(torch.cat([w("input_layernorm.weight"), w("post_attention_layernorm.weight"),
                                w("self_attn.q_norm.weight"), w("self_attn.k_norm.weight")]))
    return torch.stack(layers).contiguous(), torch.stack(norms).contiguous()


@dataclass
class _StackViews:
    """Views into one packed stack for the PyTorch prefill, per layer: the fused [q; k; v] rows, o, the interleaved
    (gate_i, up_i) row pairs, down, and the four norms."""

    blob: torch.Tensor
    norm_blob: torch.Tensor
    cfg: object

    def fused(self, i: int):
        c = self.cfg
        H, F_, QD, KVD, HD = c.hidden_size, c.intermediate_size, c.q_dim, c.kv_dim, c.head_dim
        b = self.blob[i]
        o = (QD + 2 * KVD) * H
        wqkv = b[:o].view(QD + 2 * KVD, H)
        wo = b[o:o + H * QD].view(H, QD); o += H * QD
        wgu = b[o:o + 2 * F_ * H].view(2 * F_, H); o += 2 * F_ * H  # rows 2i = gate_i, 2i + 1 = up_i
        wd = b[o:o + H * F_].view(H, F_)
        n = self.norm_blob[i]
        return wqkv, wo, wgu, wd, n[:H], n[H:2 * H], n[2 * H:2 * H + HD], n[2 * H + HD:2 * H + 2 * HD]


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * w over the last dimension (fp32 x and w)."""
    return F.rms_norm(x, (x.shape[-1],), w, eps)


def prefill_rope(rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rope_table [P, HD] -> the prefill's NeoX rotation tables (cos, signed sin), each [P, HD]:
    rot(v) = v * cos + cat(v2, v1) * sin_signed == v * cos + cat(-v2, v1) * sin (IEEE: -a * b == a * -b)."""
    half = rope.shape[-1] // 2
    cos, sin = rope[:, :half], rope[:, half:]
    return torch.cat([cos, cos], dim=-1).contiguous(), torch.cat([-sin, sin], dim=-1).contiguous()


def _keep_until_used(t: torch.Tensor, stream: torch.cuda.Stream) -> None:
    """`t` (made on the caller's stream) is read on `stream`: keep its memory from being reused before that."""
    if t.is_cuda:
        t.record_stream(stream)


# ---- prefill row buckets (pure Python) ----

PREFILL_BUCKET_SMALLEST, PREFILL_BUCKET_LARGEST = 16, 1024


def default_prefill_buckets(max_rows: int, smallest: int = PREFILL_BUCKET_SMALLEST,
                            largest: int = PREFILL_BUCKET_LARGEST) -> list[int]:
    """Row counts to capture prefill graphs for: powers of two from `smallest` and the midpoints 1.5x between
    them (a prompt pads to at most 1.5x its rows), then min(max_rows, largest)."""
    top = min(int(max_rows), int(largest))
    out, b = [], int(smallest)
    while b < top:
        out += [n for n in (b, b * 3 // 2) if n < top]
        b *= 2
    return out + [top] if top >= 1 else []


def pick_bucket(n: int, buckets) -> int | None:
    """The smallest bucket holding n rows, or None (then the prefill runs eagerly)."""
    fits = [b for b in buckets if b >= n]
    return min(fits) if fits else None


# ---- text rows of a running stream (pure Python) ----

PAD = -1  # LaunchPlan.add_row: the pad row


@dataclass(frozen=True)
class LaunchPlan:
    add_row: int | None  # add this text row (PAD: the pad row) to x_in before the launch; the previous one left it out
    zero_text: bool      # the launch ends with a zero text row instead of row k (not appended yet)


class TextTrack:
    """Which text row each launch of a stream adds, when text arrives while the stream runs.

    Launch k ends by writing launch k+1's input, F(frame k) + text row k (the pad row past the end of the text), and
    reads that row when it runs; the reference stream reads it one frame later, when frame k+1 starts. With the text
    still open, row k may not have arrived when launch k is queued (with lookahead, even before frame k is needed).
    Then launch k adds a zero row (pad_row points at zeros for that launch: MkSlot is passed by value) and, before
    launch k+1 is queued, row k - or the pad row, if the text ended before row k - is added to x_in in-stream. In
    fp32, (F + 0) + r == F + r, so the input is bit-identical to a stream that had the row from the start. Launch
    k+1 is only queued once row k is known, which is what the reference needs for frame k+1 too: frame k needs
    rows < k only.
    """

    def __init__(self, n_rows: int = 0, final: bool = True):
        self.n_rows = int(n_rows)
        self.final = bool(final)
        self.missing: int | None = None  # the text row the latest launch left out of x_in

    def append(self, n: int) -> None:
        if self.final:
            raise RuntimeError("text rows after the end of the text (end_text)")
        self.n_rows += int(n)

    def end(self) -> None:
        self.final = True

    def plan(self, k: int) -> LaunchPlan | None:
        """How to queue launch k, or None while its input still lacks text row k-1."""
        add = None
        if self.missing is not None:
            if self.missing != k - 1:
                raise AssertionError(f"launch {k} planned after a launch that left out row {self.missing}")
            if self.missing < self.n_rows:
                add = self.missing
            elif self.final:
                add = PAD
            else:
                return None
        return LaunchPlan(add_row=add, zero_text=not self.final and k >= self.n_rows)

    def launched(self, k: int, plan: LaunchPlan) -> None:
        self.missing = k if plan.zero_text else None


@dataclass(eq=False)
class MegakernelStream:
    """Handle of one open stream: its slot and where it is."""

    slot: int
    prompt_rows: int            # L: frame k's talker position is L - 1 + k
    limit: int                  # frames it may generate (max_frames, KV cache, tables)
    eos: int
    track: TextTrack
    frame: int = 0              # next frame
    ended: bool = False
    closed: bool = False
    tables: tuple = ()          # device tensors the kernel reads (uniform / forced-code tables), kept alive


class MegakernelBackend:
    """Frames of up to `max_streams` streams per launch on the decode megakernel (launches serialized on one CUDA
    stream). `num_blocks`: grid size (default one block per SM). `prefill_graphs`: capture the talker prefill as
    CUDA graphs at construction (`prefill_buckets`: their row counts). `prefill_fp32_weights`: an fp32 copy of
    the talker weights for the prefill GEMMs (same results, more memory, no per-call bf16 -> fp32 conversion)."""

    name = "megakernel"

    def __init__(self, config, weights: dict[str, torch.Tensor], device: torch.device | str = "cuda",
                 max_streams: int = 16, max_seq_len: int = 2048, num_blocks: int | None = None,
                 timeout_s: float = 2.0, cooperative: bool = True, prefill_graphs: bool = True,
                 prefill_buckets: Sequence[int] | None = None, prefill_fp32_weights: bool = False):
        self.config = config
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError("the megakernel backend needs a CUDA device")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(self.device)
        self.variant = variant_for(config)
        self.lib = load_library()
        self.lay = layout(self.lib, self.variant)
        if (self.lay["sizeof_params"], self.lay["sizeof_slot"], self.lay["sizeof_launch"]) != (
                ctypes.sizeof(MkParams), ctypes.sizeof(MkSlot), ctypes.sizeof(MkLaunch)):
            raise MegakernelError("ctypes structs do not match the compiled library (rebuild the cache)")
        if not 1 <= int(max_streams) <= self.lay["MAX_BATCH"]:
            raise ValueError(f"max_streams must be 1..{self.lay['MAX_BATCH']}, got {max_streams}")
        t, c = config.talker, config.code_predictor
        self._check_layout(t, c)
        self.max_streams = int(max_streams)
        self.max_seq_len = self.max_seq = int(max_seq_len)
        self.cooperative = cooperative
        dev = self.device
        bf = torch.bfloat16

        # Weights, repacked.
        self.t_blob, self.t_norms = _pack_stack(weights, "talker.model", t, dev)
        self.c_blob, self.c_norms = _pack_stack(weights, "talker.code_predictor.model", c, dev)
        self.t_final_norm = weights["talker.model.norm.weight"].to(dev, bf).contiguous()
        self.t_codec_emb = weights["talker.model.codec_embedding.weight"].to(dev, bf).contiguous()
        self.t_head = weights["talker.codec_head.weight"].to(dev, bf).contiguous()
        self.c_final_norm = weights["talker.code_predictor.model.norm.weight"].to(dev, bf).contiguous()
        n_heads = c.num_code_groups - 1
        self.c_emb = torch.stack([weights[f"talker.code_predictor.model.codec_embedding.{j}.weight"]
                                  for j in range(n_heads)]).to(dev, bf).contiguous()
        self.c_heads = torch.stack([weights[f"talker.code_predictor.lm_head.{j}.weight"]
                                    for j in range(n_heads)]).to(dev, bf).contiguous()
        if config.has_mtp_projection:
            self.c_proj_w = weights["talker.code_predictor.small_to_mtp_projection.weight"].to(dev, bf).contiguous()
            self.c_proj_b = weights["talker.code_predictor.small_to_mtp_projection.bias"].to(dev, bf).contiguous()
        else:
            self.c_proj_w = self.c_proj_b = None
        # The prefill's weights: fp32 ones make `w.float()` a no-op (same values: bf16 -> fp32 is exact).
        self.t_views = _StackViews(self.t_blob.float() if prefill_fp32_weights else self.t_blob,
                                   self.t_norms.float(), t)
        self.t_rope = rope_table(self.max_seq, t.head_dim, t.rope_theta, dev)
        self.c_rope = rope_table(16, c.head_dim, c.rope_theta, dev)
        self._rope_cos, self._rope_sin = prefill_rope(self.t_rope)

        # Caches (per slot). KV in fp16 (kv_t in mk_common.cuh; fp32 in a MK_KV_BITS=32 build): bf16 storage cost
        # ~4e-3 relative error on the logits and 90.6 % teacher-forced agreement (docs/megakernel.md).
        f32, i32 = torch.float32, torch.int32
        kv_dtype = {2: torch.float16, 4: torch.float32}[self.lay["KV_BYTES"]]
        S, H = self.max_streams, t.hidden_size
        self.t_kv = torch.zeros(S, t.num_hidden_layers, 2, t.num_key_value_heads, self.max_seq, t.head_dim,
                                device=dev, dtype=kv_dtype)
        self.c_kv = torch.zeros(S, c.num_hidden_layers, 2, c.num_key_value_heads, 16, c.head_dim, device=dev,
                                dtype=kv_dtype)
        self.text_capacity = self.max_seq  # text row k is read by launch k < max_seq
        self.slot_x_in = torch.zeros(S, H, device=dev, dtype=f32)
        self.slot_text = torch.zeros(S, self.text_capacity, H, device=dev, dtype=f32)
        self.slot_pad = torch.zeros(S, H, device=dev, dtype=f32)
        self.slot_seen = torch.zeros(S, (t.vocab_size + 31) // 32, device=dev, dtype=i32)
        self.slot_structs = torch.zeros(S, ctypes.sizeof(MkSlot), device=dev, dtype=torch.uint8)

        bps, sms = ctypes.c_int(0), ctypes.c_int(0)
        _check(self.lib, self.lib.mk_occupancy(self.variant, ctypes.byref(bps), ctypes.byref(sms)), "occupancy")
        self.sm_count, self.blocks_per_sm = sms.value, bps.value
        if self.blocks_per_sm < 1:
            raise MegakernelError(f"the frame kernel does not fit on one SM ({self.lay['SMEM_BYTES']} B of shared "
                                  f"memory, {self.lay['NTHREADS']} threads)")
        self.num_blocks = int(num_blocks) if num_blocks is not None else self.sm_count
        if cooperative and self.num_blocks > self.sm_count * self.blocks_per_sm:
            raise MegakernelError(f"{self.num_blocks} blocks cannot be co-resident "
                                  f"({self.sm_count} SMs x {self.blocks_per_sm})")

        # Scratch of one launch, by activation row (two rows per stream in the predictor's first step).
        B, R = self.lay["MAX_BATCH"], MAX_ROWS_PER_STREAM * self.lay["MAX_BATCH"]
        hmax, fmax = max(t.hidden_size, c.hidden_size), max(t.intermediate_size, c.intermediate_size)
        self.x_res = torch.zeros(R, hmax, device=dev, dtype=f32)
        self.ssq_part = torch.zeros(R, self.num_blocks, device=dev, dtype=f32)
        self.qkv = torch.zeros(R, t.q_dim + 2 * t.kv_dim, device=dev, dtype=f32)
        self.attn_out = torch.zeros(R, t.q_dim, device=dev, dtype=f32)
        max_chunks = -(-self.max_seq // self.lay["ATTN_CHUNK"])  # attention units per stream and KV head
        self.attn_part = torch.zeros(B, t.num_attention_heads, max_chunks, 4 + t.head_dim, device=dev, dtype=f32)
        self.attn_count = torch.zeros(B, t.num_key_value_heads, device=dev, dtype=i32)
        self.act = torch.zeros(R, fmax, device=dev, dtype=f32)
        self.cp_in = torch.zeros(R, H, device=dev, dtype=f32)
        self.cp_in_ssq = torch.zeros(R, device=dev, dtype=f32)
        self.codes = torch.zeros(B, self.lay["CODES_STRIDE"], device=dev, dtype=i32)
        self.t_logits = torch.zeros(B, t.vocab_size, device=dev, dtype=f32)
        self.c_logits = torch.zeros(B, c.vocab_size, device=dev, dtype=f32)
        self.dbg_hidden = torch.zeros(B, H, device=dev, dtype=f32)
        ring = self.lay["OUT_RING"] * B * self.lay["REC_INTS"]
        self.out_dev = torch.zeros(ring, device=dev, dtype=i32)
        self.sync_words = torch.zeros(4, device=dev, dtype=torch.int64)  # bar_count, bar_base, error
        self.stream = torch.cuda.Stream(device=dev)
        # Pinned mapped host records (one allocation, zeroed by mk_host_alloc, freed with the backend).
        host, devp = ctypes.c_void_p(), ctypes.c_void_p()
        _check(self.lib, self.lib.mk_host_alloc(ring * 4, ctypes.byref(host), ctypes.byref(devp)), "mk_host_alloc")
        self._host_finalizer = weakref.finalize(self, self.lib.mk_host_free, ctypes.c_void_p(host.value))
        self.out_host = np.ctypeslib.as_array(ctypes.cast(host, ctypes.POINTER(ctypes.c_int32)),
                                              shape=(self.lay["OUT_RING"], B, self.lay["REC_INTS"]))

        sw = self.sync_words.data_ptr()
        self.params = MkParams(
            t_layers=_ptr(self.t_blob), t_norms=_ptr(self.t_norms), t_final_norm=_ptr(self.t_final_norm),
            t_codec_emb=_ptr(self.t_codec_emb), t_head=_ptr(self.t_head), c_layers=_ptr(self.c_blob),
            c_norms=_ptr(self.c_norms), c_final_norm=_ptr(self.c_final_norm), c_emb=_ptr(self.c_emb),
            c_heads=_ptr(self.c_heads), c_proj_w=_ptr(self.c_proj_w), c_proj_b=_ptr(self.c_proj_b),
            t_rope=_ptr(self.t_rope), c_rope=_ptr(self.c_rope), t_kv=_ptr(self.t_kv), c_kv=_ptr(self.c_kv),
            slots=_ptr(self.slot_structs), x_in=_ptr(self.slot_x_in), x_res=_ptr(self.x_res),
            ssq_part=_ptr(self.ssq_part), qkv=_ptr(self.qkv), attn_out=_ptr(self.attn_out),
            attn_part=_ptr(self.attn_part), attn_count=_ptr(self.attn_count), act=_ptr(self.act),
            cp_in=_ptr(self.cp_in), cp_in_ssq=_ptr(self.cp_in_ssq), codes=_ptr(self.codes),
            t_logits=_ptr(self.t_logits), c_logits=_ptr(self.c_logits), dbg_hidden=_ptr(self.dbg_hidden),
            out_dev=_ptr(self.out_dev), out_host=devp.value or 0, bar_count=sw, bar_base=sw + 8, error=sw + 16,
            max_seq=self.max_seq, n_slots=S, timeout_ns=int(timeout_s * 1e9), t_eps=t.rms_norm_eps,
            c_eps=c.rms_norm_eps)
        self._launch = MkLaunch()
        self._seq = 0
        self.free_slots = list(range(S))
        self.broken: str | None = None
        self._prefill_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.prefill_graph_stats: dict = {"buckets": []}
        torch.cuda.synchronize(dev)
        if prefill_graphs:
            self.capture_prefill_graphs(prefill_buckets)

    def memory_per_stream(self) -> int:
        """Device bytes one stream slot holds (KV caches, next input, text rows, pad row, penalty bitmap)."""
        per = [self.t_kv[0], self.c_kv[0], self.slot_x_in[0], self.slot_text[0], self.slot_pad[0], self.slot_seen[0]]
        return sum(x.numel() * x.element_size() for x in per) + ctypes.sizeof(MkSlot)

    def _check_layout(self, t, c) -> None:
        lay = self.lay
        want = {"t_H": t.hidden_size, "t_F": t.intermediate_size, "t_L": t.num_hidden_layers, "t_V": t.vocab_size,
                "c_H": c.hidden_size, "c_F": c.intermediate_size, "c_L": c.num_hidden_layers, "c_V": c.vocab_size}
        bad = {k: (v, lay[k]) for k, v in want.items() if lay[k] != v}
        if bad:
            raise MegakernelError(f"config and compiled shapes differ: {bad}")

    # Bytes of weights one frame reads (for GB/s figures).
    def weight_bytes(self) -> dict[str, int]:
        t = 2 * (self.t_blob.numel() + self.t_norms.numel() + self.t_head.numel() + self.t_final_norm.numel())
        c_step = 2 * (self.c_blob.numel() + self.c_norms.numel() + self.c_heads[0].numel())
        if self.c_proj_w is not None:
            c_step += 2 * self.c_proj_w.numel()
        return {"talker": t, "code_predictor_step": c_step, "frame": t + 15 * c_step}

    # ---- the backend contract ----

    def _check_usable(self) -> None:
        if self.broken:
            raise MegakernelError(f"backend unusable after an earlier error: {self.broken}")

    def _check_spec(self, i: int, spec: StreamSpec) -> int:
        """Validates spec i; returns its prompt rows."""
        H, cand = self.config.talker.hidden_size, self.lay["CAND_MAX"]
        if spec.prefill.ndim != 2 or spec.prefill.shape[1] != H or spec.prefill.shape[0] < 1:
            raise ValueError(f"specs[{i}].prefill must be [L >= 1, {H}], got {tuple(spec.prefill.shape)}")
        L = int(spec.prefill.shape[0])
        if spec.max_frames < 1 or L - 1 + spec.max_frames > self.max_seq:
            raise ValueError(f"specs[{i}]: prompt rows ({L}) + max_frames ({spec.max_frames}) exceed max_seq_len "
                             f"({self.max_seq}) + 1")
        p = spec.params
        if p.do_sample and not 0 < p.top_k <= cand:
            raise ValueError(f"specs[{i}].params.top_k must be 1..{cand} with do_sample (megakernel candidates)")
        if p.subtalker_dosample and not 0 < p.subtalker_top_k <= cand:
            raise ValueError(f"specs[{i}].params.subtalker_top_k must be 1..{cand} with subtalker_dosample")
        return L

    @torch.inference_mode()
    def open(self, specs: Sequence[StreamSpec], *, forced: Sequence[np.ndarray | None] | None = None
             ) -> list[MegakernelStream]:
        """Prefill the given streams into free slots (queued on the backend's CUDA stream). `forced` (validation):
        per spec, teacher-forced codes [frames, 16] fed back instead of the sampled ones."""
        self._check_usable()
        specs = list(specs)
        if len(specs) > len(self.free_slots):
            raise ValueError(f"{len(specs)} streams requested, {len(self.free_slots)} of {self.max_streams} "
                             "slots free")
        rows = [self._check_spec(i, s) for i, s in enumerate(specs)]
        forced = list(forced) if forced is not None else [None] * len(specs)
        t = self.config.talker
        dev = self.device
        handles = []
        caller = torch.cuda.current_stream(dev)
        self.stream.wait_stream(caller)
        for spec, L, fc in zip(specs, rows, forced):
            slot = self.free_slots.pop(0)
            limit = spec.max_frames
            rng = spec.rng
            with torch.cuda.stream(self.stream):
                self.slot_x_in[slot].copy_(spec.prefill[L - 1])
                n_text = min(len(spec.text_rows), self.text_capacity)
                if n_text:
                    self.slot_text[slot, :n_text].copy_(spec.text_rows[:n_text])
                self.slot_pad[slot].copy_(spec.pad_row)
                self.slot_seen[slot].zero_()
                uniforms = None if rng.table is None else torch.as_tensor(
                    np.ascontiguousarray(rng.table, dtype=np.float64), device=dev)
                fct = None if fc is None else torch.as_tensor(
                    np.ascontiguousarray(fc, dtype=np.int32).reshape(-1, NUM_DRAWS_PER_FRAME), device=dev)
            for x in (spec.prefill, spec.text_rows, spec.pad_row):
                _keep_until_used(x, self.stream)
            if rng.table is not None:
                limit = min(limit, len(rng.table))
            if fc is not None:
                limit = min(limit, len(fct))
            self.prefill_kv(slot, spec.prefill[: L - 1])
            p = spec.params
            st = MkSlot(
                text_rows=_ptr(self.slot_text[slot]), pad_row=_ptr(self.slot_pad[slot]), uniforms=_ptr(uniforms),
                forced=_ptr(fct), seen=_ptr(self.slot_seen[slot]),
                n_uniform_frames=0 if uniforms is None else len(uniforms),
                n_forced_frames=0 if fct is None else len(fct), seed=rng.seed & ((1 << 64) - 1),
                do_sample=int(p.do_sample), top_k=p.top_k, cp_do_sample=int(p.subtalker_dosample),
                cp_top_k=p.subtalker_top_k, eos_id=self.config.ids.codec_eos, suppress_start=t.vocab_size - 1024,
                min_new_tokens=2, temperature=p.temperature, top_p=p.top_p, rep_penalty=p.repetition_penalty,
                cp_temperature=p.subtalker_temperature, cp_top_p=p.subtalker_top_p)
            host = torch.frombuffer(bytearray(bytes(st)), dtype=torch.uint8)
            with torch.cuda.stream(self.stream):
                self.slot_structs[slot].copy_(host)  # pageable source: the copy completes before returning
            handles.append(MegakernelStream(slot=slot, prompt_rows=L, limit=limit, eos=self.config.ids.codec_eos,
                                            track=TextTrack(len(spec.text_rows), final=spec.text_final),
                                            tables=(uniforms, fct)))
        return handles

    def _entries(self, streams: Sequence[MegakernelStream]) -> MkLaunch:
        """The launch struct for the streams' next frames; adds text rows that arrived late to x_in first."""
        n = len(streams)
        if not 1 <= n <= self.max_streams:
            raise ValueError(f"a step takes 1..{self.max_streams} streams, got {n}")
        if len({id(h) for h in streams}) != n:
            raise ValueError("a stream appears twice in one step")
        L = self._launch
        L.n = n
        for i, h in enumerate(streams):
            if not isinstance(h, MegakernelStream) or h.closed:
                raise ValueError(f"streams[{i}] is not an open stream of this backend")
            if h.ended:
                raise ValueError(f"streams[{i}] already ended with EOS")
            k = h.frame
            if k >= h.limit:
                raise ValueError(f"streams[{i}]: frame {k} is past its limit of {h.limit} frames")
            plan = h.track.plan(k)
            if plan is None:
                raise ValueError(f"streams[{i}]: frame {k} needs text row {k - 1}: append it or end the text first")
            if plan.add_row is not None:
                row = self.slot_pad[h.slot] if plan.add_row == PAD else self.slot_text[h.slot, plan.add_row]
                with torch.cuda.stream(self.stream):
                    self.slot_x_in[h.slot].add_(row)
            e = L.e[i]
            e.slot, e.frame, e.pos = h.slot, k, h.prompt_rows - 1 + k
            e.n_text = min(h.track.n_rows, self.text_capacity)
            e.zero_text = int(plan.zero_text)
            h.track.launched(k, plan)
        return L

    def launch(self, L: MkLaunch) -> None:
        """Queue one launch on self.stream (benchmarks call this directly; step() is the contract's way)."""
        err = self.lib.mk_launch(self.variant, ctypes.addressof(self.params), ctypes.addressof(L), self.num_blocks,
                                 int(self.cooperative), ctypes.c_void_p(self.stream.cuda_stream))
        if err:
            self.broken = f"launch: CUDA error {err} ({self.lib.mk_error_string(err).decode()})"
            raise MegakernelError(self.broken)

    def step(self, streams: Sequence[MegakernelStream], *, perturb: float = 0.0, flags: int = 0,
             timeout_s: float = 30.0) -> StepOutput:
        """One frame for each given stream, in one launch. `perturb` (validation) is added to the talker hidden
        state; `flags` = FLAG_TALKER_ONLY stops after codebook 0 (benchmarks)."""
        return self.finish_step(self.begin_step(streams, perturb=perturb, flags=flags), timeout_s=timeout_s)

    def begin_step(self, streams: Sequence[MegakernelStream], *, perturb: float = 0.0, flags: int = 0
                   ) -> tuple[list[MegakernelStream], MkLaunch]:
        """Queue step()'s launch and return at once; finish_step() waits for its records. Between the two the
        caller may queue other work (the engine decodes the previous frame's chunks on the codec's stream)."""
        self._check_usable()
        streams = list(streams)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        L = self._entries(streams)
        L.seq, L.flags, L.perturb = self._seq, int(flags), float(perturb)
        self._seq = (self._seq + 1) & 0x3FFFFFFF
        self.launch(L)
        return streams, L

    def finish_step(self, launched: tuple[list[MegakernelStream], MkLaunch], *, timeout_s: float = 30.0
                    ) -> StepOutput:
        """The frames of a begin_step(): polls its records in host memory (no device-wide synchronisation)."""
        streams, L = launched
        recs = self.out_host[L.seq % self.lay["OUT_RING"], : L.n]
        want = L.seq + 1
        t0 = time.perf_counter()
        spins = 0
        while not np.all(recs[:, REC_SEQ] == want):
            spins += 1
            if spins % 64 == 0:
                q = self.lib.mk_stream_query(ctypes.c_void_p(self.stream.cuda_stream))
                if q not in (0, CUDA_NOT_READY):
                    self.broken = f"CUDA error {q} ({self.lib.mk_error_string(q).decode()})"
                    raise MegakernelError(self.broken)
                if q == 0 and not np.all(recs[:, REC_SEQ] == want):
                    self.broken = f"a launch finished without writing its records (error {self.error_code()})"
                    raise MegakernelError(self.broken)
                if time.perf_counter() - t0 > timeout_s:
                    self.broken = f"no result after {timeout_s} s"
                    raise MegakernelError(self.broken)
                time.sleep(0)
        recs = np.array(recs)  # one consistent copy
        errs = recs[:, REC_ERROR]
        for code in errs:
            if int(code) in INSTANCE_ERRORS:
                self.broken = f"kernel error {int(code)}: {INSTANCE_ERRORS[int(code)]}"
                raise MegakernelError(self.broken)
        codes = recs[:, :NUM_DRAWS_PER_FRAME].astype(np.int64)
        failed = {i: f"kernel error {int(e)}: {STREAM_ERRORS.get(int(e), 'unknown')}" for i, e in enumerate(errs)
                  if e}
        for i, h in enumerate(streams):
            h.frame += 1
            if codes[i, 0] == h.eos:
                h.ended = True
        return StepOutput(codes=codes, failed=failed)

    def append_text(self, stream: MegakernelStream, rows: torch.Tensor) -> None:
        if stream.closed:
            raise ValueError("stream is closed")
        rows = rows.reshape(-1, self.config.talker.hidden_size)
        if rows.shape[0] == 0:
            return
        a = stream.track.n_rows
        stream.track.append(rows.shape[0])
        b = min(a + rows.shape[0], self.text_capacity)  # rows past the capacity are never read (launch k < max_seq)
        if b > a:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                self.slot_text[stream.slot, a:b].copy_(rows[: b - a])
            _keep_until_used(rows, self.stream)

    def end_text(self, stream: MegakernelStream) -> None:
        stream.track.end()

    def close(self, stream: MegakernelStream) -> None:
        """Give the slot back (the next stream's prefill is queued after this one's last launch)."""
        if stream.closed:
            return
        stream.closed = True
        self.free_slots.append(stream.slot)

    # ---- debugging views of the latest launch (validation) ----

    def last_hidden(self, i: int) -> torch.Tensor:
        """Post-norm talker hidden (with the perturbation) of row i of the latest launch."""
        self.stream.synchronize()
        return self.dbg_hidden[i].clone()

    def last_logits(self, i: int) -> torch.Tensor:
        self.stream.synchronize()
        return self.t_logits[i].clone()

    def error_code(self) -> int:
        return int(self.sync_words[2].item() & 0xFFFFFFFF)

    def reset_sync(self) -> None:
        """Stream-ordered reset of the barrier words and attention counters (after an error)."""
        torch.cuda.synchronize(self.device)
        self.sync_words.zero_()
        self.attn_count.zero_()
        torch.cuda.synchronize(self.device)
        self.broken = None

    # ---- batched talker prefill (PyTorch): rows at positions 0..n-1 -> K/V of every layer in slot's cache ----

    def _prefill_layers(self, x: torch.Tensor, kv: torch.Tensor) -> None:
        """K/V of every talker layer for rows x [n, H] (fp32) at positions 0..n-1 -> kv[l, 0 / 1, :, :n] (kv:
        [L, 2, NKV, >= n, HD]). fp32 activations, the bf16 weights upcast, QK RMSNorm, NeoX RoPE, causal attention.
        The eager prefill and the captured graphs run this same function."""
        t = self.config.talker
        n = x.shape[0]
        nq, nkv, hd, eps = t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.rms_norm_eps
        qd, kvd, ffn, group = nq * hd, nkv * hd, t.intermediate_size, nq // nkv
        cos, sin = self._rope_cos[:n], self._rope_sin[:n]  # sin: signed (prefill_rope)
        half = hd // 2

        def rot(v):  # [heads, n, hd]
            return v * cos + torch.cat([v[..., half:], v[..., :half]], dim=-1) * sin

        for i in range(t.num_hidden_layers):
            wqkv, wo, wgu, wd, ln1, ln2, qn, kn = self.t_views.fused(i)
            h = _rms(x, ln1, eps)
            qkv = h @ wqkv.float().T  # [n, QD + 2 KVD]
            k = rot(_rms(qkv[:, qd:qd + kvd].view(n, nkv, hd), kn, eps).transpose(0, 1))
            v = qkv[:, qd + kvd:].view(n, nkv, hd).transpose(0, 1)
            kv[i, 0, :, :n] = k
            kv[i, 1, :, :n] = v
            if i == t.num_hidden_layers - 1:
                break  # the last layer's output is never used, only its K/V
            q = rot(_rms(qkv[:, :qd].view(n, nq, hd), qn, eps).transpose(0, 1))
            keys = k[:, None].expand(nkv, group, n, hd).reshape(nq, n, hd)  # query head j uses kv head j // group
            vals = v[:, None].expand(nkv, group, n, hd).reshape(nq, n, hd)
            att = F.scaled_dot_product_attention(q, keys, vals, is_causal=True, scale=1.0 / math.sqrt(hd))
            x = torch.addmm(x, att.transpose(0, 1).reshape(n, qd), wo.float().T)  # x + att @ wo^T
            h = _rms(x, ln2, eps)
            gu = (h @ wgu.float().T).view(n, ffn, 2)  # (gate_i, up_i) pairs
            x = torch.addmm(x, F.silu(gu[..., 0]) * gu[..., 1], wd.float().T)

    @torch.inference_mode()
    def capture_prefill_graphs(self, buckets: Sequence[int] | None = None) -> dict:
        """Capture the prefill once per row bucket (largest first, one shared memory pool: the graphs only ever
        replay one at a time, on self.stream). Sets and returns prefill_graph_stats; on a capture failure the
        prefill stays eager and the stats hold the error."""
        t = self.config.talker
        dev = self.device
        if buckets is None:
            buckets = default_prefill_buckets(self.max_seq - 1)
        buckets = sorted({int(b) for b in buckets if 1 <= int(b) <= self.max_seq})
        self._prefill_graphs = {}
        if not buckets:
            self.prefill_graph_stats = {"buckets": []}
            return self.prefill_graph_stats
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        reserved0 = torch.cuda.memory_reserved(dev)
        t0 = time.perf_counter()
        top = buckets[-1]
        self._x_stage = torch.zeros(top, t.hidden_size, device=dev, dtype=torch.float32)
        self._kv_stage = torch.zeros(t.num_hidden_layers, 2, t.num_key_value_heads, top, t.head_dim, device=dev,
                                     dtype=torch.float32)
        self._graph_pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        graphs = {}
        try:
            with fp32_precision(tf32=False):  # exact fp32 GEMMs, as the reference
                for b in reversed(buckets):  # largest first: the smaller captures reuse its blocks of the pool
                    x, kv = self._x_stage[:b], self._kv_stage[:, :, :, :b]
                    with torch.cuda.stream(side):  # warm-up (cuBLAS handles, workspaces) on the capture stream
                        for _ in range(2):
                            self._prefill_layers(x, kv)
                    side.synchronize()
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, pool=self._graph_pool, stream=side):
                        self._prefill_layers(x, kv)
                    graphs[b] = g
            torch.cuda.synchronize(dev)
        except Exception as exc:  # noqa: BLE001 - keep the backend usable: the eager prefill computes the same thing
            torch.cuda.synchronize(dev)
            log.warning("prefill graph capture failed (%s: %s); the prefill runs eagerly", type(exc).__name__, exc)
            self.prefill_graph_stats = {"buckets": [], "error": f"{type(exc).__name__}: {exc}"}
            return self.prefill_graph_stats
        self._prefill_graphs = graphs
        staging = (self._x_stage.numel() + self._kv_stage.numel()) * 4
        self.prefill_graph_stats = {
            "buckets": buckets, "capture_s": time.perf_counter() - t0, "staging_bytes": staging,
            "memory_bytes": torch.cuda.memory_reserved(dev) - reserved0}  # staging + the graphs' pool
        log.info("prefill graphs for %s rows captured in %.2f s, %.0f MB (staging %.0f MB)", buckets,
                 self.prefill_graph_stats["capture_s"], self.prefill_graph_stats["memory_bytes"] / 2**20,
                 staging / 2**20)
        return self.prefill_graph_stats

    @torch.inference_mode()
    def prefill_kv(self, slot: int, rows: torch.Tensor, *, graphs: bool = True) -> None:
        """Talker K/V of prefill rows [n, H] at positions 0..n-1 into slot's cache, queued on self.stream after the
        caller's stream: a graph replay when n fits a captured bucket (rows zero-padded at the end; positions
        >= n are not copied), else the same math eagerly. Positions >= n of the cache keep stale values: launch k
        appends position pos = n + k and reads positions <= pos only."""
        n = int(rows.shape[0])
        if n == 0:
            return
        if n > self.max_seq:
            raise ValueError(f"{n} prefill rows exceed max_seq_len {self.max_seq}")
        dev = self.device
        bucket = pick_bucket(n, self._prefill_graphs) if graphs else None
        caller = torch.cuda.current_stream(dev)
        if caller != self.stream:
            self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            if bucket is None:
                with fp32_precision(tf32=False):  # exact fp32 GEMMs, as the reference
                    self._prefill_layers(rows.to(dev, torch.float32), self.t_kv[slot])
            else:
                self._x_stage[:n].copy_(rows)
                if bucket > n:
                    self._x_stage[n:bucket].zero_()
                self._prefill_graphs[bucket].replay()
                self.t_kv[slot, :, :, :, :n].copy_(self._kv_stage[:, :, :, :n])
        _keep_until_used(rows, self.stream)

