"""PyTorch's fp32 matmul/convolution precision switches (TF32 on or off) are process-wide, not per thread. Code that
sets them for a block does it here, under one lock, so that a block in another thread never runs under its setting:
the engine thread's codec push (TF32) and a voice upload's speaker encoder (exact fp32) in a server thread, say."""

from __future__ import annotations

import contextlib
import threading

import torch

_LOCK = threading.RLock()


@contextlib.contextmanager
def fp32_precision(tf32: bool):
    """TF32 on or off for CUDA matmuls and cuDNN convolutions inside the block, then as before; the block excludes
    every other thread's fp32_precision block. Speaks PyTorch's newer `fp32_precision` API when the process already
    uses it (PyTorch refuses a mix of the two)."""
    with _LOCK:
        matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
        try:
            switches = [(matmul, "allow_tf32", tf32), (cudnn, "allow_tf32", tf32)]
            saved = [getattr(obj, name) for obj, name, _ in switches]
        except RuntimeError:  # the new API is in use
            value = "tf32" if tf32 else "ieee"
            switches = [(matmul, "fp32_precision", value), (cudnn.conv, "fp32_precision", value)]
            saved = [getattr(obj, name) for obj, name, _ in switches]
        for obj, name, value in switches:
            setattr(obj, name, value)
        try:
            yield
        finally:
            for (obj, name, _), value in zip(switches, saved):
                setattr(obj, name, value)
