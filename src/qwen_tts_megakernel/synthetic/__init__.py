"""Synthetic checkpoints in the official Hugging Face layout: tiny random ones (tests, `qwen-tts-mk tiny-model`)
and full-size random ones of the real shapes (`random:0.6b`, `random:1.7b`: GPU benchmarks and validation)."""

from .checkpoints import random_checkpoint, write_random_model, write_tiny_model

__all__ = ["random_checkpoint", "write_random_model", "write_tiny_model"]
