"""The codec side of the engine until the batched StreamingCodec lands: the codec contract (docs/DESIGN.md) over
one StreamingCodecDecoder per stream, pushed one after another. Primed states (an in-context cloned voice's
reference frames) are decoded once per voice and copied into each new stream."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch

from ..codec import CodecDecoder, StreamingCodecDecoder


class PerStreamCodec:
    """open(prime_codes) -> handle, push(handles, codes_list) -> float32 PCM per stream, close(handle)."""

    def __init__(self, decoder: CodecDecoder, primed_states: int = 32):
        self.decoder = decoder
        self.device = next(decoder.parameters()).device
        self.primed_states = primed_states
        self._primed: OrderedDict[bytes, StreamingCodecDecoder] = OrderedDict()  # LRU by reference codes

    def open(self, prime_codes: torch.Tensor | np.ndarray | None = None) -> StreamingCodecDecoder:
        stream = StreamingCodecDecoder(self.decoder)
        if prime_codes is not None and len(prime_codes):
            primed = self._primed_stream(np.ascontiguousarray(np.asarray(prime_codes, dtype=np.int64)))
            if stream.graphs is not None:
                stream.state.copy_(primed.state)
            else:
                for key, value in primed.state.items():  # DecoderState copies tensors on write
                    stream.state[key] = value
            stream.frames_pushed = primed.frames_pushed
        return stream

    @torch.inference_mode()
    def _primed_stream(self, codes: np.ndarray) -> StreamingCodecDecoder:
        key = hashlib.sha1(codes.tobytes()).digest() + bytes(str(codes.shape), "ascii")
        primed = self._primed.get(key)
        if primed is None:
            primed = StreamingCodecDecoder(self.decoder)
            primed.push(torch.as_tensor(codes, device=self.device))
            self._primed[key] = primed
            while len(self._primed) > self.primed_states:
                self._primed.popitem(last=False)
        self._primed.move_to_end(key)
        return primed

    @torch.inference_mode()
    def push(self, streams: Sequence[StreamingCodecDecoder], codes: Sequence[np.ndarray | torch.Tensor]
             ) -> list[np.ndarray]:
        return [s.push(torch.as_tensor(np.asarray(c), device=self.device)).float().cpu().numpy()
                for s, c in zip(streams, codes)]

    def close(self, stream: StreamingCodecDecoder) -> None:
        pass
