"""The reference backend: the spec of every frame, in plain PyTorch (CPU or CUDA, fp32 or bf16).

It implements the backend contract (base.py) with the talker and code predictor of model.py and the sampling rules
of sampling.py. Each stream keeps its own KV cache and codebook-0 history; `step` runs the streams it is given one
after another. That is on purpose: the reference is the spec, and a stream computed alone is batch invariant by
construction (CPU matrix kernels change their summation order with the row count, so stacking streams into one
matrix product would make a stream's codes depend on its neighbours). The batched-math baseline is graphed.py.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..model import KVCache, Talker
from ..sampling import SamplingError, TalkerRules, sample_code_predictor, sample_talker
from .base import StepOutput, StreamSpec


class ReferenceStream:
    """One stream's state: its KV cache, the codebook-0 history and the latest frame (the next frame's input)."""

    def __init__(self, spec: StreamSpec, cache: KVCache):
        self.spec = spec
        self.cache: KVCache | None = cache
        self.text_rows = spec.text_rows
        self.frame_index = 0
        self.past_g0: list[int] = []
        self.last_codes: list[int] | None = None
        self.last_logits: torch.Tensor | None = None  # fp32 codec logits of the latest talker step
        self.last_hidden: torch.Tensor | None = None  # post-norm hidden of the latest talker step

    @property
    def closed(self) -> bool:
        return self.cache is None


class ReferenceBackend:
    """The spec: plain PyTorch talker and code predictor, one KV cache per stream."""

    def __init__(self, talker: Talker, max_streams: int = 64, max_seq_len: int = 8192):
        self.talker = talker
        self.max_streams = max_streams
        self.max_seq_len = max_seq_len
        cfg = talker.config
        self.rules = TalkerRules(vocab_size=cfg.talker.vocab_size, eos_id=cfg.ids.codec_eos)
        self._open: set[int] = set()

    @torch.inference_mode()
    def open(self, specs: Sequence[StreamSpec]) -> list[ReferenceStream]:
        if len(self._open) + len(specs) > self.max_streams:
            raise ValueError(f"{len(self._open)} streams open, {len(specs)} more exceed max_streams "
                             f"{self.max_streams}")
        streams = []
        for spec in specs:
            if len(spec.prefill) >= self.max_seq_len:
                raise ValueError(f"prompt of {len(spec.prefill)} rows exceeds the KV cache ({self.max_seq_len} "
                                 "positions)")
            capacity = min(self.max_seq_len, len(spec.prefill) + spec.max_frames)
            stream = ReferenceStream(spec, self.talker.new_cache(capacity))
            # Rows 0..L-2 fill the cache now; row L-1 is frame 0's input.
            if len(spec.prefill) > 1:
                self.talker.model(spec.prefill[:-1], stream.cache)
            streams.append(stream)
        self._open.update(id(s) for s in streams)
        return streams

    @torch.inference_mode()
    def step(self, streams: Sequence[ReferenceStream]) -> StepOutput:
        codes = np.zeros((len(streams), self.talker.config.talker.num_code_groups), dtype=np.int64)
        failed: dict[int, str] = {}
        for i, stream in enumerate(streams):
            if stream.closed:
                failed[i] = "stream is closed"
                continue
            try:
                codes[i] = self.frame(stream)
            except SamplingError as exc:
                failed[i] = str(exc)
            except Exception as exc:  # noqa: BLE001 - whatever breaks one stream ends that stream only
                failed[i] = f"{type(exc).__name__}: {exc}"
        return StepOutput(codes=codes, failed=failed)

    def talker_input(self, stream: ReferenceStream) -> torch.Tensor:
        """Rows for the stream's next talker pass: the last prefill row first, then F(previous frame) + text."""
        if stream.frame_index == 0:
            return stream.spec.prefill[-1:]
        k = stream.frame_index - 1
        text = stream.text_rows[k] if k < len(stream.text_rows) else stream.spec.pad_row
        return (self.talker.frame_embedding(stream.last_codes) + text).unsqueeze(0)

    def frame(self, stream: ReferenceStream) -> np.ndarray:
        """One frame of one stream: talker step, codebook 0, the code predictor's 15 codebooks."""
        talker, spec = self.talker, stream.spec
        hidden, logits = talker.forward_rows(self.talker_input(stream), stream.cache)
        stream.last_hidden, stream.last_logits = hidden, logits
        u = spec.rng.frame(stream.frame_index)
        past = torch.tensor(stream.past_g0, dtype=torch.long)
        g0 = sample_talker(logits.cpu(), past, stream.frame_index, spec.params, self.rules, float(u[0]))
        codes = np.zeros(talker.config.talker.num_code_groups, dtype=np.int64)
        codes[0] = g0
        if g0 == self.rules.eos_id:
            return codes
        cp = talker.code_predictor
        cp_cache = cp.new_cache(hidden.device, hidden.dtype)
        rows = torch.stack([hidden, talker.model.codec_embedding.weight[g0]])
        for j in range(1, len(codes)):
            codes[j] = sample_code_predictor(cp.logits(rows, cp_cache, head=j - 1).cpu(), spec.params, float(u[j]))
            if j + 1 < len(codes):
                rows = cp.input_row(j + 1, int(codes[j]))
        stream.past_g0.append(g0)
        stream.last_codes = codes.tolist()
        stream.frame_index += 1
        return codes

    def append_text(self, stream: ReferenceStream, rows: torch.Tensor) -> None:
        pad = stream.spec.pad_row
        rows = rows.to(device=pad.device, dtype=pad.dtype).reshape(-1, pad.shape[-1])
        stream.text_rows = torch.cat([stream.text_rows, rows]) if len(stream.text_rows) else rows

    def end_text(self, stream: ReferenceStream) -> None:
        pass  # the reference reads each text row when the frame that needs it runs: nothing to prepare

    def close(self, stream: ReferenceStream) -> None:
        stream.cache = None
        self._open.discard(id(stream))
