"""precision.fp32_precision: PyTorch's TF32 switches are process-wide, so a block that sets them excludes other
threads' blocks (the engine's TF32 codec push and a voice upload's exact fp32 encoder must not overlap), and puts
the switches back after."""

import threading
import time

import torch

from qwen_tts_megakernel.precision import fp32_precision


def test_blocks_in_two_threads_never_overlap_and_each_sees_its_own_setting():
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    inside_a, release_a, seen = threading.Event(), threading.Event(), {}

    def a():
        with fp32_precision(tf32=True):
            inside_a.set()
            release_a.wait(5)
            seen["a"] = matmul.allow_tf32

    def b():
        inside_a.wait(5)
        started = time.perf_counter()
        with fp32_precision(tf32=False):
            seen["b_waited_s"] = time.perf_counter() - started
            seen["b"] = matmul.allow_tf32

    ta, tb = threading.Thread(target=a), threading.Thread(target=b)
    ta.start()
    tb.start()
    time.sleep(0.3)
    assert "b" not in seen  # b waits while a holds the switches
    release_a.set()
    ta.join(5)
    tb.join(5)
    assert seen["a"] is True and seen["b"] is False and seen["b_waited_s"] >= 0.25
    assert matmul.allow_tf32 == before
