"""Shared fixtures: tiny random checkpoints, the official implementation (test-only dependency), exact fp32."""

import pytest
import torch

from qwen_tts_megakernel.tools.official_baseline import stub_torchaudio_if_missing


@pytest.fixture(scope="session")
def qwen_tts():
    """The official qwen-tts package, or skip when it is not installed."""
    stub_torchaudio_if_missing()
    return pytest.importorskip("qwen_tts")


@pytest.fixture
def no_tf32():
    """Full fp32 matmuls and convolutions while the test runs. Set directly, not through precision.fp32_precision:
    its lock, held for the whole test, would stop the engine thread's codec pushes."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
