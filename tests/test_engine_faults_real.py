"""A stream whose sampling fails for real (its prompt rows are NaN, so its scores are) ends with an error, while the
stream beside it gets exactly its solo audio and the engine keeps serving: on the CPU reference (CI) and, on a GPU,
on the reference and the megakernel backends (issue 12's GPU acceptance)."""

from __future__ import annotations

import pytest
import torch

from qwen_tts_megakernel.engine import PromptSource, Synthesizer
from qwen_tts_megakernel.synthetic import write_tiny_model


class PoisonedSource(PromptSource):
    """A whole-text source whose prompt rows are NaN: every score of its first frame is NaN."""

    def spec(self, embedder, config):
        spec = super().spec(embedder, config)
        spec.prefill = torch.full_like(spec.prefill, float("nan"))
        return spec


def pcm(events) -> tuple[bytes, str | None]:
    out, error = b"", None
    while True:
        kind, payload = events.next()
        if kind == "chunk":
            out += payload.pcm.tobytes()
        elif kind == "error":
            error = payload
        elif kind == "done":
            return out, error


def check_isolation(synth: Synthesizer) -> None:
    text = "The healthy stream keeps talking."
    solo = b"".join(c.pcm.tobytes() for c in synth.stream(text, seed=3, max_new_tokens=6))
    request = synth.prepare(text, max_new_tokens=6)
    poisoned = synth.submit(PoisonedSource(synth.prepare("Poisoned.", max_new_tokens=6), 4), audio=True, frames=False)
    healthy = synth.submit(PromptSource(request, 3), audio=True, frames=False)
    bad_pcm, bad_error = pcm(poisoned)
    good_pcm, good_error = pcm(healthy)
    assert bad_error is not None and bad_pcm == b""
    assert good_error is None and good_pcm == solo
    assert synth.engine.health() == (True, "ok")
    again = b"".join(c.pcm.tobytes() for c in synth.stream(text, seed=3, max_new_tokens=6))
    assert again == solo


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_faults")
    write_tiny_model(path, "0.6b", "custom_voice", seed=0)
    return path


def test_nan_stream_fails_alone_on_the_cpu_reference(tiny_dir):
    synth = Synthesizer.from_pretrained(str(tiny_dir), device="cpu")
    try:
        check_isolation(synth)
        with pytest.raises(ValueError, match="temperature"):  # refused before the stream starts
            synth.stream("x", seed=1, max_new_tokens=3, temperature=float("nan"))
    finally:
        synth.close()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["reference", "megakernel"])
def test_nan_stream_fails_alone_on_the_gpu(backend):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    synth = Synthesizer.from_pretrained("random:0.6b", backend=backend, device="cuda", max_streams=4)
    try:
        check_isolation(synth)
    finally:
        synth.close()
