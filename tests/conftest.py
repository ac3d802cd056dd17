"""Shared fixtures: tiny random checkpoints and the official implementation (test-only dependency)."""

import pytest

from qwen_tts_megakernel.tools.official_baseline import stub_torchaudio_if_missing


@pytest.fixture(scope="session")
def qwen_tts():
    """The official qwen-tts package, or skip when it is not installed."""
    stub_torchaudio_if_missing()
    return pytest.importorskip("qwen_tts")
