"""The megakernel backend: one CUDA launch per 80 ms frame (talker step, code predictor, sampling, next input).

    backend = MegakernelBackend(config, weights, device, max_seq_len=4096)
    stream = backend.open_stream(prefill [L,H], text_rows [T,H], pad_row [H], params, rng)
    codes = stream.next_frame()      # np.int64 [16]; codes[0] == EOS ends the stream
    stream.close()

Weights are repacked once into the kernel's layout (csrc/mk_common.cuh: per-layer blob [qkv | o | gate/up pairs |
down], bf16). The talker prefill (rows 0..L-2) runs here in PyTorch (fp32 GEMMs on the same bf16 weights) and fills
the same KV-cache layout the kernel reads; the last prefill row is launch 0's input. Launches are queued one frame
ahead; codes are read from mapped pinned memory, so the host loop never waits on a device-wide sync.
"""

from __future__ import annotations

import ctypes
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..sampling import NUM_DRAWS_PER_FRAME, RandomStream, SamplingParams
from .build import load_library

LAYOUT_FIELDS = ("t_H", "t_F", "t_L", "t_V", "t_NQ", "t_NKV", "t_HD", "t_LAYER_ELEMS", "t_NORM_ELEMS",
                 "c_H", "c_F", "c_L", "c_V", "c_NQ", "c_NKV", "c_HD", "c_LAYER_ELEMS", "c_NORM_ELEMS",
                 "PROJ", "NTHREADS", "SMEM_BYTES", "NC_MAX", "CAND_MAX", "OUT_RING", "REC_INTS", "CP_POS",
                 "sizeof_params", "sizeof_slot", "num_phases")
REC_FRAME, REC_EOS, REC_ERROR, REC_NCAND, REC_SEQ = 16, 17, 18, 19, 31
ERRORS = {1: "grid barrier timeout (a block never arrived: grid larger than the GPU can hold, or a hang)",
          2: "another block reported an error", 3: "random-number or forced-code table too short",
          4: "position beyond the KV cache (max_seq_len)"}
CUDA_NOT_READY = 600


class MegakernelError(RuntimeError):
    """A launch failed, timed out or reported an error; the backend instance is unusable afterwards."""


_P = ctypes.c_uint64
_I = ctypes.c_int64
_D = ctypes.c_double


class MkParams(ctypes.Structure):
    _fields_ = [(n, _P) for n in (
        "t_layers", "t_norms", "t_final_norm", "t_codec_emb", "t_head", "c_layers", "c_norms", "c_final_norm",
        "c_emb", "c_heads", "c_proj_w", "c_proj_b", "t_rope", "c_rope", "t_kv", "c_kv", "x_res", "qkv",
        "attn_part", "act", "t_logits", "c_logits", "dbg_hidden", "bar_count", "bar_base", "error")] + [
        ("max_seq", _I), ("slots", _I), ("timeout_ns", _I), ("t_eps", _D), ("c_eps", _D)]


class MkSlot(ctypes.Structure):
    _fields_ = [("slot", _I)] + [(n, _P) for n in (
        "x_in", "text_rows", "pad_row", "uniforms", "forced", "seen", "done", "out_dev", "out_host")] + [
        ("n_text", _I), ("n_uniform_frames", _I), ("n_forced_frames", _I), ("seed", ctypes.c_uint64),
        ("do_sample", _I), ("top_k", _I), ("cp_do_sample", _I), ("cp_top_k", _I), ("eos_id", _I),
        ("suppress_start", _I), ("min_new_tokens", _I), ("temperature", _D), ("top_p", _D), ("rep_penalty", _D),
        ("cp_temperature", _D), ("cp_top_p", _D)]


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
    """Views into one packed stack for the PyTorch prefill: per layer (wq, wk, wv, wo, gate, up, down, norms)."""

    blob: torch.Tensor
    norm_blob: torch.Tensor
    cfg: object

    def layer(self, i: int):
        c = self.cfg
        H, F_, QD, KVD = c.hidden_size, c.intermediate_size, c.q_dim, c.kv_dim
        b = self.blob[i]
        o = 0
        wq = b[o:o + QD * H].view(QD, H); o += QD * H
        wk = b[o:o + KVD * H].view(KVD, H); o += KVD * H
        wv = b[o:o + KVD * H].view(KVD, H); o += KVD * H
        wo = b[o:o + H * QD].view(H, QD); o += H * QD
        gu = b[o:o + 2 * F_ * H].view(F_, 2, H); o += 2 * F_ * H
        wd = b[o:o + H * F_].view(H, F_)
        n = self.norm_blob[i]
        ln1, ln2 = n[:H], n[H:2 * H]
        qn, kn = n[2 * H:2 * H + c.head_dim], n[2 * H + c.head_dim:]
        return wq, wk, wv, wo, gu[:, 0], gu[:, 1], wd, ln1, ln2, qn, kn


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.float()


class MegakernelBackend:
    """Frames of one or more streams on the decode megakernel (launches serialized on one CUDA stream)."""

    name = "megakernel"

    def __init__(self, config, weights: dict[str, torch.Tensor], device: torch.device | str = "cuda",
                 max_seq_len: int = 4096, slots: int = 2, num_blocks: int | None = None,
                 timeout_s: float = 2.0, cooperative: bool = True):
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
        if self.lay["sizeof_params"] != ctypes.sizeof(MkParams) or self.lay["sizeof_slot"] != ctypes.sizeof(MkSlot):
            raise MegakernelError("ctypes structs do not match the compiled library (rebuild the cache)")
        t, c = config.talker, config.code_predictor
        self._check_layout(t, c)
        self.max_seq = int(max_seq_len)
        self.n_slots = int(slots)
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
        self.t_views = _StackViews(self.t_blob, self.t_norms, t)
        self.t_rope = rope_table(self.max_seq, t.head_dim, t.rope_theta, dev)
        self.c_rope = rope_table(16, c.head_dim, c.rope_theta, dev)

        # Caches and scratch.
        f32 = torch.float32
        # KV caches in fp32 (kv_t in mk_common.cuh): bf16 storage cost ~4e-3 relative error on the logits.
        self.t_kv = torch.zeros(self.n_slots, t.num_hidden_layers, 2, t.num_key_value_heads, self.max_seq,
                                t.head_dim, device=dev, dtype=torch.float32)
        self.c_kv = torch.zeros(self.n_slots, c.num_hidden_layers, 2, c.num_key_value_heads, 16, c.head_dim,
                                device=dev, dtype=torch.float32)
        hmax = max(t.hidden_size, c.hidden_size)
        fmax = max(t.intermediate_size, c.intermediate_size)
        qkv = t.q_dim + 2 * t.kv_dim
        self.x_res = torch.zeros(2, hmax, device=dev, dtype=f32)
        self.qkv = torch.zeros(2, qkv, device=dev, dtype=f32)
        self.attn_part = torch.zeros(2, t.num_attention_heads, self.lay["NC_MAX"], 2 + t.head_dim, device=dev,
                                     dtype=f32)
        self.act = torch.zeros(2, fmax, device=dev, dtype=f32)
        self.t_logits = torch.zeros(t.vocab_size, device=dev, dtype=f32)
        self.c_logits = torch.zeros(c.vocab_size, device=dev, dtype=f32)
        self.dbg_hidden = torch.zeros(t.hidden_size, device=dev, dtype=f32)
        self.sync_words = torch.zeros(4, device=dev, dtype=torch.int64)  # bar_count, bar_base, error
        self.stream = torch.cuda.Stream(device=dev)

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

        sw = self.sync_words.data_ptr()
        self.params = MkParams(
            t_layers=_ptr(self.t_blob), t_norms=_ptr(self.t_norms), t_final_norm=_ptr(self.t_final_norm),
            t_codec_emb=_ptr(self.t_codec_emb), t_head=_ptr(self.t_head), c_layers=_ptr(self.c_blob),
            c_norms=_ptr(self.c_norms), c_final_norm=_ptr(self.c_final_norm), c_emb=_ptr(self.c_emb),
            c_heads=_ptr(self.c_heads), c_proj_w=_ptr(self.c_proj_w), c_proj_b=_ptr(self.c_proj_b),
            t_rope=_ptr(self.t_rope), c_rope=_ptr(self.c_rope), t_kv=_ptr(self.t_kv), c_kv=_ptr(self.c_kv),
            x_res=_ptr(self.x_res), qkv=_ptr(self.qkv), attn_part=_ptr(self.attn_part), act=_ptr(self.act),
            t_logits=_ptr(self.t_logits), c_logits=_ptr(self.c_logits), dbg_hidden=_ptr(self.dbg_hidden),
            bar_count=sw, bar_base=sw + 8, error=sw + 16, max_seq=self.max_seq, slots=self.n_slots,
            timeout_ns=int(timeout_s * 1e9), t_eps=t.rms_norm_eps, c_eps=c.rms_norm_eps)
        self.free_slots = list(range(self.n_slots))
        self.broken: str | None = None
        torch.cuda.synchronize(dev)

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

    def open_stream(self, prefill: torch.Tensor, text_rows: torch.Tensor, pad_row: torch.Tensor,
                    params: SamplingParams, rng: RandomStream, max_frames: int | None = None, *,
                    forced: np.ndarray | None = None, perturb: float = 0.0, lookahead: int = 1) -> "MegakernelStream":
        if self.broken:
            raise MegakernelError(f"backend unusable after an earlier error: {self.broken}")
        if not self.free_slots:
            raise MegakernelError(f"all {self.n_slots} stream slots are in use")
        slot = self.free_slots.pop(0)
        try:
            return MegakernelStream(self, slot, prefill, text_rows, pad_row, params, rng, max_frames, forced,
                                    perturb, lookahead)
        except Exception:
            self.free_slots.append(slot)
            raise

    # ---- batched talker prefill (PyTorch): rows at positions 0..n-1 -> K/V of every layer in slot's cache ----
    @torch.inference_mode()
    def prefill_kv(self, slot: int, rows: torch.Tensor) -> None:
        n = rows.shape[0]
        if n == 0:
            return
        t = self.config.talker
        nq, nkv, hd, eps = t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.rms_norm_eps
        rope = self.t_rope[:n]
        cos = torch.cat([rope[:, :hd // 2]] * 2, dim=-1)
        sin = torch.cat([rope[:, hd // 2:]] * 2, dim=-1)

        def rot(x):  # [heads, n, hd]
            x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
            return x * cos + torch.cat([-x2, x1], dim=-1) * sin

        x = rows.to(self.device, torch.float32)
        mask = torch.ones(n, n, dtype=torch.bool, device=self.device).tril()
        for i in range(t.num_hidden_layers):
            wq, wk, wv, wo, wg, wu, wd, ln1, ln2, qn, kn = self.t_views.layer(i)
            h = _rms(x, ln1, eps)
            q = _rms((h @ wq.float().T).view(n, nq, hd), qn, eps).transpose(0, 1)
            k = _rms((h @ wk.float().T).view(n, nkv, hd), kn, eps).transpose(0, 1)
            v = (h @ wv.float().T).view(n, nkv, hd).transpose(0, 1)
            k = rot(k)
            self.t_kv[slot, i, 0, :, :n] = k
            self.t_kv[slot, i, 1, :, :n] = v
            keys = k.repeat_interleave(nq // nkv, dim=0)
            vals = v.repeat_interleave(nq // nkv, dim=0)
            att = F.scaled_dot_product_attention(rot(q), keys, vals, attn_mask=mask, scale=1.0 / math.sqrt(hd))
            x = x + att.transpose(0, 1).reshape(n, nq * hd) @ wo.float().T
            h = _rms(x, ln2, eps)
            x = x + (F.silu(h @ wg.float().T) * (h @ wu.float().T)) @ wd.float().T

    def launch(self, slot_struct: MkSlot, frame: int, pos: int, perturb: float = 0.0, flags: int = 0) -> None:
        """Queue one frame on self.stream (flags: 1 = talker step only, for benchmarks)."""
        err = self.lib.mk_launch(self.variant, ctypes.addressof(self.params), ctypes.addressof(slot_struct),
                                 frame, pos, ctypes.c_float(perturb), flags, self.num_blocks, int(self.cooperative),
                                 ctypes.c_void_p(self.stream.cuda_stream))
        if err:
            msg = f"launch of frame {frame}: CUDA error {err} ({self.lib.mk_error_string(err).decode()})"
            raise MegakernelError(msg)

    def error_code(self) -> int:
        return int(self.sync_words[2].item() & 0xFFFFFFFF)

    def reset_sync(self) -> None:
        """Stream-ordered reset of the barrier words (after an error; never needed in normal operation)."""
        torch.cuda.synchronize(self.device)
        self.sync_words.zero_()
        torch.cuda.synchronize(self.device)
        self.broken = None


class MegakernelStream:
    """One utterance in one slot of a MegakernelBackend."""

    def __init__(self, be: MegakernelBackend, slot: int, prefill, text_rows, pad_row, params: SamplingParams,
                 rng: RandomStream, max_frames, forced, perturb: float, lookahead: int):
        cfg = be.config
        t = cfg.talker
        if params.do_sample and not (0 < params.top_k <= be.lay["CAND_MAX"]):
            raise NotImplementedError(f"megakernel sampling needs 1 <= top_k <= {be.lay['CAND_MAX']}")
        if params.subtalker_dosample and not (0 < params.subtalker_top_k <= be.lay["CAND_MAX"]):
            raise NotImplementedError(f"megakernel sampling needs 1 <= subtalker_top_k <= {be.lay['CAND_MAX']}")
        L = prefill.shape[0]
        if L < 1:
            raise ValueError("prefill needs at least one row")
        self.be, self.slot, self.L = be, slot, L
        dev = be.device
        self.eos = cfg.ids.codec_eos
        self.frame = 0          # next frame to return
        self.launched = 0       # frames launched
        self.ended = False
        self.closed = False
        self.perturb = float(perturb)
        self.lookahead = max(0, int(lookahead))
        limit = be.max_seq - (L - 1)
        if max_frames is not None:
            limit = min(limit, int(max_frames))
        if rng.table is not None:
            limit = min(limit, len(rng.table))
        if forced is not None:
            limit = min(limit, len(forced))
        self.limit = limit
        f32 = torch.float32
        with torch.cuda.stream(be.stream):
            be.stream.wait_stream(torch.cuda.current_stream(dev))
            self.x_in = prefill[L - 1].to(dev, f32).contiguous().clone()
            self.text_rows = text_rows.to(dev, f32).contiguous() if len(text_rows) else torch.zeros(1, t.hidden_size,
                                                                                                   device=dev)
            self.pad_row = pad_row.to(dev, f32).contiguous()
            self.uniforms = None if rng.table is None else torch.as_tensor(
                np.ascontiguousarray(rng.table, dtype=np.float64), device=dev)
            self.forced = None if forced is None else torch.as_tensor(
                np.ascontiguousarray(forced, dtype=np.int32).reshape(-1, NUM_DRAWS_PER_FRAME), device=dev)
            self.seen = torch.zeros((t.vocab_size + 31) // 32, device=dev, dtype=torch.int32)
            self.done = torch.zeros(1, device=dev, dtype=torch.int32)
            self.out_dev = torch.zeros(be.lay["OUT_RING"], be.lay["REC_INTS"], device=dev, dtype=torch.int32)
            be.c_kv[slot].zero_()
            be.prefill_kv(slot, prefill[: L - 1])
        host, devp = ctypes.c_void_p(), ctypes.c_void_p()
        _check(be.lib, be.lib.mk_host_alloc(be.lay["OUT_RING"] * be.lay["REC_INTS"] * 4, ctypes.byref(host),
                                            ctypes.byref(devp)), "mk_host_alloc")
        self._host = host
        self.out_host = np.ctypeslib.as_array(ctypes.cast(host, ctypes.POINTER(ctypes.c_int32)),
                                              shape=(be.lay["OUT_RING"], be.lay["REC_INTS"]))
        self.struct = MkSlot(
            slot=slot, x_in=_ptr(self.x_in), text_rows=_ptr(self.text_rows), pad_row=_ptr(self.pad_row),
            uniforms=_ptr(self.uniforms), forced=_ptr(self.forced), seen=_ptr(self.seen), done=_ptr(self.done),
            out_dev=_ptr(self.out_dev), out_host=devp.value or 0, n_text=len(text_rows),
            n_uniform_frames=0 if rng.table is None else len(rng.table),
            n_forced_frames=0 if forced is None else len(self.forced), seed=rng.seed & ((1 << 64) - 1),
            do_sample=int(params.do_sample), top_k=params.top_k, cp_do_sample=int(params.subtalker_dosample),
            cp_top_k=params.subtalker_top_k, eos_id=self.eos, suppress_start=t.vocab_size - 1024,
            min_new_tokens=2, temperature=params.temperature, top_p=params.top_p,
            rep_penalty=params.repetition_penalty, cp_temperature=params.subtalker_temperature,
            cp_top_p=params.subtalker_top_p)

    def _launch_upto(self, n: int) -> None:
        n = min(n, self.limit)
        while self.launched < n:
            k = self.launched
            self.be.launch(self.struct, k, self.L - 1 + k, self.perturb)
            self.launched += 1

    def next_frame(self, timeout_s: float = 30.0) -> np.ndarray:
        if self.closed:
            raise RuntimeError("stream is closed")
        if self.ended:
            raise RuntimeError("stream already ended with EOS")
        be = self.be
        if be.broken:
            raise MegakernelError(f"backend unusable after an earlier error: {be.broken}")
        k = self.frame
        if k >= self.limit:
            raise MegakernelError(f"frame {k} is past this stream's limit of {self.limit} frames (KV cache / tables)")
        self._launch_upto(k + 1 + self.lookahead)
        rec = self.out_host[k % be.lay["OUT_RING"]]
        t0 = time.perf_counter()
        spins = 0
        while int(rec[REC_SEQ]) != k + 1:
            spins += 1
            if spins % 64 == 0:
                q = be.lib.mk_stream_query(ctypes.c_void_p(be.stream.cuda_stream))
                if q not in (0, CUDA_NOT_READY):
                    be.broken = f"CUDA error {q} ({be.lib.mk_error_string(q).decode()})"
                    raise MegakernelError(f"frame {k}: {be.broken}")
                if q == 0 and int(rec[REC_SEQ]) != k + 1:
                    be.broken = f"frame {k} finished without writing its record (error {be.error_code()})"
                    raise MegakernelError(be.broken)
                if time.perf_counter() - t0 > timeout_s:
                    be.broken = f"frame {k}: no result after {timeout_s} s"
                    raise MegakernelError(be.broken)
                time.sleep(0)
        if int(rec[REC_ERROR]):
            code = int(rec[REC_ERROR])
            be.broken = f"frame {k}: kernel error {code}: {ERRORS.get(code, 'unknown')}"
            raise MegakernelError(be.broken)
        codes = np.array(rec[:NUM_DRAWS_PER_FRAME], dtype=np.int64)
        self.frame += 1
        if codes[0] == self.eos:
            self.ended = True
        return codes

    def sync(self) -> None:
        self.be.stream.synchronize()

    def last_hidden(self) -> torch.Tensor:
        """Post-norm talker hidden of the latest launch (use lookahead=0 so that is the latest returned frame)."""
        self.sync()
        return self.be.dbg_hidden.clone()

    def last_logits(self) -> torch.Tensor:
        self.sync()
        return self.be.t_logits.clone()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.be.stream.synchronize()
        finally:
            if self._host:
                self.be.lib.mk_host_free(self._host)
                self._host = None
            self.be.free_slots.append(self.slot)
