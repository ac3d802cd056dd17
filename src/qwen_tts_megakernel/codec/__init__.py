"""The codec decoder (Qwen3-TTS-Tokenizer-12Hz codes -> 24 kHz audio): layers (modules), the whole decode (decoder),
official weights (weights), and the batched exact streaming decode (streaming)."""

from ..config import CodecDecoderConfig
from .decoder import CodecDecoder, check_codes
from .modules import BatchState, DecoderState, StateLayout
from .streaming import STEP_FRAMES, CodecStream, StreamingCodec, batch_buckets, frame_steps
from .weights import load_official_state_dict, official_parameter_names, official_shapes

__all__ = [
    "BatchState",
    "CodecDecoder",
    "CodecDecoderConfig",
    "CodecStream",
    "DecoderState",
    "STEP_FRAMES",
    "StateLayout",
    "StreamingCodec",
    "batch_buckets",
    "check_codes",
    "frame_steps",
    "load_official_state_dict",
    "official_parameter_names",
    "official_shapes",
]
