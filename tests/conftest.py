"""Shared fixtures: tiny random checkpoints and the official implementation (test-only dependency)."""

import importlib.machinery
import sys
import types

import pytest


def _stub_torchaudio() -> None:
    """The official package imports torchaudio.compliance.kaldi for its 25 Hz tokenizer only.

    The 12 Hz models never use it, and no torchaudio build matches a CPU-only torch here, so a bare
    module (with a spec, so importlib.util.find_spec works) stands in for that one import.
    """
    try:
        import torchaudio  # noqa: F401
        return
    except ImportError:
        pass
    for name in ("torchaudio", "torchaudio.compliance", "torchaudio.compliance.kaldi"):
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=not name.endswith("kaldi"))
        if not name.endswith("kaldi"):
            mod.__path__ = []
        sys.modules[name] = mod
    sys.modules["torchaudio"].compliance = sys.modules["torchaudio.compliance"]
    sys.modules["torchaudio.compliance"].kaldi = sys.modules["torchaudio.compliance.kaldi"]


@pytest.fixture(scope="session")
def qwen_tts():
    """The official qwen-tts package, or skip when it is not installed."""
    _stub_torchaudio()
    return pytest.importorskip("qwen_tts")
