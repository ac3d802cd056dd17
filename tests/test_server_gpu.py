"""On a GPU, for the reference and megakernel backends: sampling at the edges of the allowed ranges stays finite and
in range, values past the edges are refused, and the server keeps serving correct audio. (A stream whose sampling
fails for real ending alone: tests/test_engine_faults_real.py.)
Skipped without CUDA. Run: PYTHONPATH=src python -m pytest -q tests/test_server_gpu.py"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from qwen_tts_megakernel.engine import Synthesizer  # noqa: E402
from qwen_tts_megakernel.sampling import SAMPLING_RANGES  # noqa: E402
from qwen_tts_megakernel.server.protocol import ServerSettings  # noqa: E402
from qwen_tts_megakernel.testing.server import running_server  # noqa: E402

TEXT = "A GPU check of the sampling bounds."
FRAMES = 12


@pytest.fixture(scope="module", params=["reference", "megakernel"])
def served(request):
    synth = Synthesizer.from_pretrained("random:0.6b", backend=request.param, device="cuda", max_streams=4)
    with running_server(synth, settings=ServerSettings(max_active=4)) as (url, app):
        yield synth, url


def expected_pcm(synth, seed, **sampling) -> bytes:
    stream = synth.stream(TEXT, voice="ryan", seed=seed, max_new_tokens=FRAMES, **sampling)
    return b"".join(chunk.pcm.astype("<i2").tobytes() for chunk in stream)


def assert_serving(synth, url):
    r = httpx.post(f"{url}/tts/stream", json={"text": TEXT, "speaker": "ryan", "max_new_tokens": FRAMES, "seed": 1},
                   timeout=120)
    assert r.status_code == 200 and r.content == expected_pcm(synth, 1)
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


EDGES = [{"temperature": SAMPLING_RANGES["temperature"].low}, {"temperature": SAMPLING_RANGES["temperature"].high},
         {"top_k": 1}, {"top_k": SAMPLING_RANGES["top_k"].high}, {"top_p": 1e-9},
         {"repetition_penalty": SAMPLING_RANGES["repetition_penalty"].low},
         {"repetition_penalty": SAMPLING_RANGES["repetition_penalty"].high},
         {"temperature": 0.01, "top_k": 1, "top_p": 1e-9, "repetition_penalty": 2.0}]


@pytest.mark.parametrize("sampling", EDGES, ids=[",".join(f"{k}={v:g}" for k, v in e.items()) for e in EDGES])
def test_edges_of_the_allowed_ranges_run(served, sampling):
    synth, url = served
    r = httpx.post(f"{url}/tts/stream", json={"text": TEXT, "speaker": "ryan", "max_new_tokens": FRAMES, "seed": 2,
                                              **sampling}, timeout=120)
    assert r.status_code == 200, r.text
    assert len(r.content) % (1920 * 2) == 0 and 0 < len(r.content) <= FRAMES * 1920 * 2
    assert_serving(synth, url)


def test_values_past_the_edges_are_refused(served):
    synth, url = served
    for field, value in (("temperature", 1e-6), ("top_k", 0), ("top_k", 1000), ("repetition_penalty", 50)):
        r = httpx.post(f"{url}/tts/stream", json={"text": TEXT, field: value}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == field
    assert_serving(synth, url)
