"""The codec side of the engine until the batched StreamingCodec lands: the codec contract (docs/DESIGN.md) over
one StreamingCodecDecoder per stream, pushed one after another."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..codec import CodecDecoder, StreamingCodecDecoder


class PerStreamCodec:
    """open(prime_codes) -> handle, push(handles, codes_list) -> float32 PCM per stream, close(handle)."""

    def __init__(self, decoder: CodecDecoder):
        self.decoder = decoder
        self.device = next(decoder.parameters()).device

    def open(self, prime_codes: torch.Tensor | None = None) -> StreamingCodecDecoder:
        stream = StreamingCodecDecoder(self.decoder)
        if prime_codes is not None and len(prime_codes):
            stream.push(torch.as_tensor(prime_codes, device=self.device))
        return stream

    @torch.inference_mode()
    def push(self, streams: Sequence[StreamingCodecDecoder], codes: Sequence[np.ndarray | torch.Tensor]
             ) -> list[np.ndarray]:
        return [s.push(torch.as_tensor(np.asarray(c), device=self.device)).float().cpu().numpy()
                for s, c in zip(streams, codes)]

    def close(self, stream: StreamingCodecDecoder) -> None:
        pass
