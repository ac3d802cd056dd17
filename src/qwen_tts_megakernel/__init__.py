"""Streaming Qwen3-TTS (12 Hz) inference: a readable reference backend and a CUDA decode megakernel."""

__version__ = "0.1.0"

# The model `qwen-tts-mk` and `Synthesizer.from_pretrained` users get when they name none.
DEFAULT_MODEL = "Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice"

__all__ = ["AudioChunk", "GenerationResult", "SpeechStream", "Synthesizer", "DEFAULT_MODEL", "__version__"]


def __getattr__(name: str):
    """The engine's classes, imported on first use: importing the package (the CLI does, for --help) stays free of
    PyTorch."""
    if name in ("AudioChunk", "GenerationResult", "SpeechStream", "Synthesizer"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
