"""Streaming Qwen3-TTS (12 Hz) inference: a readable reference backend and a CUDA decode megakernel."""

__version__ = "0.1.0"

from .engine import AudioChunk, GenerationResult, SpeechStream, Synthesizer  # noqa: E402

__all__ = ["AudioChunk", "GenerationResult", "SpeechStream", "Synthesizer", "__version__"]
