"""Cloned voices on the megakernel (GPU; marker `gpu`, skipped without CUDA). A clone prompt is just a different
prefill, so the kernel needs nothing new; these tests check it on random Base weights of the real 0.6B shapes:

  * teacher-forced agreement and hidden/logit error of the megakernel against the fp32 reference on the clone
    prefill (x-vector only and in-context, both text layouts), with the bounds of `qwen-tts-mk validate`;
  * time to first audio with a stored x-vector voice within 2 ms of a built-in speaker (same shapes, same text).
    The in-context voice's time is printed, not bounded: its prefill is longer by the reference frames and
    transcript, and opening its codec stream decodes the reference frames (priming).

Run on the GPU machine: pytest -q -s -m gpu tests/test_clone_gpu.py
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from qwen_tts_megakernel.engine import Synthesizer  # noqa: E402
from qwen_tts_megakernel.engine.jobs import prompt_rows  # noqa: E402
from qwen_tts_megakernel.model import Talker  # noqa: E402
from qwen_tts_megakernel.sampling import SamplingParams  # noqa: E402
from qwen_tts_megakernel.synthetic import random_checkpoint  # noqa: E402
from qwen_tts_megakernel.tools.validate import (AGREE_BOUND, HIDDEN_BOUND, kernel_run, reference_run,  # noqa: E402
                                                rel_err, uniform_table)
from qwen_tts_megakernel.voices import VoiceEncoder, VoiceLibrary, speaker_encoder_fingerprint  # noqa: E402

TEXT = "Hello there, this voice was cloned from a short reference clip."
REF_TEXT = "This is the reference clip."
FRAMES = 48


def clip(seconds: float) -> np.ndarray:
    t = np.arange(int(24000 * seconds)) / 24000
    rng = np.random.default_rng(0)
    return (0.3 * np.sin(2 * np.pi * 160 * t) + 0.02 * rng.standard_normal(len(t))).astype(np.float32)


@pytest.fixture(scope="module")
def base():
    dev = torch.device("cuda")
    checkpoint = random_checkpoint("0.6b", "base", seed=0, device=dev)
    synth = Synthesizer.from_checkpoint(checkpoint, backend="megakernel", device=dev, dtype=torch.bfloat16)
    encoder = VoiceEncoder.from_checkpoint(checkpoint, device=dev)
    voices = {"xvec": encoder.clone(clip(3.0), name="xvec"),
              "icl": encoder.clone(clip(3.0), ref_text=REF_TEXT, name="icl")}
    return synth, voices


@pytest.mark.parametrize("kind", ["xvec", "icl"])
@pytest.mark.parametrize("layout", ["prefill", "interleaved"])
def test_megakernel_agrees_with_the_reference_on_clone_prefills(base, kind, layout):
    synth, voices = base
    config, dev = synth.config, torch.device("cuda")
    prompt = synth.prompt(TEXT, voice=voices[kind], language="english", text_layout=layout)
    talker = Talker.from_state_dict(config, {k: v.float() for k, v in synth.checkpoint.weights.items()},
                                    device=dev, dtype=torch.float32)
    rows = prompt_rows(talker.embedder(), config, prompt)
    # What the engine feeds the kernel: the synthesizer's own embedder rows, the fp32 reference's to the bit.
    kin = prompt_rows(synth.embedder, config, prompt)
    assert all(a.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(kin, rows))
    params, table = SamplingParams(), uniform_table(1234, FRAMES)
    ref_codes, ref_hid, ref_log = reference_run(talker, *rows, params, table, FRAMES)
    n = len(ref_codes)
    kernel = getattr(synth.backend, "inner", synth.backend)  # the MegakernelBackend under the per-stream adapter
    tf_codes, tf_hid, tf_log = kernel_run(kernel, *kin, params, table, n, forced=ref_codes)
    m = min(len(tf_codes), n)
    print(f"\n{kind}/{layout}: {len(rows[0])} prefill rows, hidden rel err "
          f"{max(rel_err(tf_hid[k], ref_hid[k]) for k in range(m)):.2e}, g0 agreement "
          f"{np.mean(tf_codes[:m, 0] == ref_codes[:m, 0]):.3f}")
    assert max(rel_err(tf_hid[k], ref_hid[k]) for k in range(m)) <= HIDDEN_BOUND
    assert max(rel_err(tf_log[k], ref_log[k]) for k in range(m)) <= HIDDEN_BOUND
    assert np.mean(tf_codes[:m, 0] == ref_codes[:m, 0]) >= AGREE_BOUND
    assert np.mean(tf_codes[:m, 1:] == ref_codes[:m, 1:]) >= AGREE_BOUND


def first_audio_ms(synth, voice, runs=20) -> float:
    times = []
    for seed in range(runs):
        start = time.perf_counter()
        stream = synth.stream(TEXT, voice=voice, language="english", seed=seed, max_new_tokens=8)
        next(stream)
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
        stream.close()
    return statistics.median(times[2:])


def test_stored_voice_first_audio_within_2ms_of_a_builtin_speaker(base, tmp_path):
    synth, voices = base
    synth.voice_library = VoiceLibrary(tmp_path, speaker_encoder_fingerprint(synth.checkpoint))
    for name, voice in voices.items():
        synth.voice_library.add(name, voice)
    dev = torch.device("cuda")
    builtin = Synthesizer.from_checkpoint(random_checkpoint("0.6b", "custom_voice", seed=0, device=dev),
                                          backend="megakernel", device=dev, dtype=torch.bfloat16)
    t_builtin = first_audio_ms(builtin, "ryan")
    t_xvec = first_audio_ms(synth, "xvec")
    t_icl = first_audio_ms(synth, "icl")
    print(f"\nfirst audio (median ms): built-in speaker {t_builtin:.2f}, stored x-vector voice {t_xvec:.2f}, "
          f"stored in-context voice {t_icl:.2f} ({len(voices['icl'].ref_codes)} reference frames)")
    assert t_xvec <= t_builtin + 2.0


def test_uploading_a_10s_reference_takes_at_most_300ms(base):
    synth, _ = base
    encoder = VoiceEncoder.from_checkpoint(synth.checkpoint, device=torch.device("cuda"))
    audio = clip(10.0)
    encoder.clone(audio, ref_text=REF_TEXT)  # warm-up
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        encoder.clone(audio, ref_text=REF_TEXT)
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    print(f"\nclone of a 10 s reference (x-vector + reference codes): median {statistics.median(times):.1f} ms")
    assert statistics.median(times) <= 300
