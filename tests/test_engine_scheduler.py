"""The engine's scheduler: faults stay inside their stream, admission control, timeouts, backpressure, batching.

Faults are injected into one stream among several, at a chosen frame: in the backend's per-stream math (as the
sampler failing on non-finite scores would), in the codec, and in the backend as a whole. The streams beside the
faulty one must finish with exactly the audio they get alone.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from qwen_tts_megakernel.backends.base import BackendError
from qwen_tts_megakernel.backends.reference import ReferenceBackend
from qwen_tts_megakernel.engine import (EngineFull, EngineSettings, EngineUnavailable, Job, PromptSource,
                                        StreamError, Synthesizer)
from qwen_tts_megakernel.codec import StreamingCodec
from qwen_tts_megakernel.engine.scheduler import Engine
from qwen_tts_megakernel.engine.synthesizer import JobEvents
from qwen_tts_megakernel.sampling import SamplingError
from qwen_tts_megakernel.synthetic import write_tiny_model

TEXTS = ["The first stream speaks.", "A second one, a bit longer than the first.", "Third.", "Number four here."]
FRAMES = 7


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_engine")
    write_tiny_model(path, "0.6b", "custom_voice", seed=0)
    return Synthesizer.from_pretrained(str(path), device="cpu")


@pytest.fixture(scope="module")
def solo(synth):
    """Each text's PCM alone (seed 10 + i), the expectation for every concurrent run."""
    return [pcm_of(synth.stream(t, seed=10 + i, max_new_tokens=FRAMES)) for i, t in enumerate(TEXTS)]


def pcm_of(stream) -> bytes:
    return b"".join(chunk.pcm.tobytes() for chunk in stream)


class FaultyBackend(ReferenceBackend):
    """The reference backend, failing one stream's frame `at_frame` (the stream whose seed is `seed`)."""

    def __init__(self, talker, seed: int, at_frame: int, error: Exception):
        super().__init__(talker)
        self.seed, self.at_frame, self.error = seed, at_frame, error

    def frame(self, stream):
        if stream.spec.rng.seed == self.seed and stream.frame_index == self.at_frame:
            raise self.error
        return super().frame(stream)


class FaultyCodec(StreamingCodec):
    """Fails every push that includes the stream opened `victim`-th (0-based) once it has pushed `after` times."""

    def __init__(self, decoder, victim: int, after: int):
        super().__init__(decoder)
        self.victim, self.after, self.opened, self.pushes = victim, after, [], {}

    def open(self, prime_codes=None):
        handle = super().open(prime_codes)
        self.opened.append(handle)
        return handle

    def push(self, streams, codes):
        for s in streams:
            if len(self.opened) > self.victim and s is self.opened[self.victim]:
                self.pushes[id(s)] = self.pushes.get(id(s), 0) + 1
                if self.pushes[id(s)] > self.after:
                    raise RuntimeError("injected codec fault")
        return super().push(streams, codes)


def engine_with(synth, backend=None, codec=None, **settings) -> Engine:
    engine = Engine(backend or ReferenceBackend(synth.talker), codec or StreamingCodec(synth.codec), synth.embedder,
                    synth.config, sample_rate=synth.sample_rate,
                    settings=EngineSettings(realtime_admission=False, **settings))
    engine.start()
    return engine


def run_jobs(synth, engine, texts, seeds, frames=FRAMES, cancel_after=None):
    """Submit all jobs at once; collect each one's PCM, error and stop reason."""
    results = [{"pcm": b"", "error": None, "stop": None} for _ in texts]
    events = []
    for text, seed in zip(texts, seeds):
        ev = JobEvents(engine)
        job = Job(PromptSource(synth.prepare(text, max_new_tokens=frames), seed), ev.emit)
        ev.job = job
        engine.submit(job)
        events.append(ev)

    def consume(i):
        r, ev = results[i], events[i]
        while True:
            kind, payload = ev.next()
            if kind == "chunk":
                r["pcm"] += payload.pcm.tobytes()
                if cancel_after is not None and cancel_after[0] == i and len(r["pcm"]) >= cancel_after[1]:
                    ev.job.cancel()
            elif kind == "error":
                r["error"] = payload
            elif kind == "done":
                r["stop"] = payload.stop_reason
                return

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def assert_others_exact(results, solo, victim):
    for i, r in enumerate(results):
        if i != victim:
            assert r["error"] is None, r["error"]
            assert r["pcm"] == solo[i], f"stream {i} changed because stream {victim} failed"


@pytest.mark.parametrize("error", [SamplingError("no finite score"), RuntimeError("injected backend fault")])
def test_backend_fault_in_one_stream_ends_only_that_stream(synth, solo, error):
    engine = engine_with(synth, backend=FaultyBackend(synth.talker, seed=11, at_frame=3, error=error))
    try:
        results = run_jobs(synth, engine, TEXTS, [10 + i for i in range(len(TEXTS))])
    finally:
        engine.stop()
    assert results[1]["stop"] == "error" and str(error) in results[1]["error"]
    assert_others_exact(results, solo, victim=1)
    assert engine.active_count == 0


def test_codec_fault_in_one_stream_ends_only_that_stream(synth, solo):
    engine = engine_with(synth, codec=FaultyCodec(synth.codec, victim=2, after=1))
    try:
        results = run_jobs(synth, engine, TEXTS, [10 + i for i in range(len(TEXTS))])
    finally:
        engine.stop()
    victim = [i for i, r in enumerate(results) if r["error"]]
    assert len(victim) == 1 and "injected codec fault" in results[victim[0]]["error"]
    assert_others_exact(results, solo, victim=victim[0])


class BrokenBackend(ReferenceBackend):
    """Breaks as a whole (a CUDA error, a kernel timeout) at its `fail_at`-th step."""

    def __init__(self, talker, fail_at: int):
        super().__init__(talker)
        self.fail_at, self.steps = fail_at, 0

    def step(self, streams):
        self.steps += 1
        if self.steps == self.fail_at:
            raise BackendError("injected: the device is gone")
        return super().step(streams)


def test_backend_breaking_fails_open_streams_then_is_rebuilt(synth, solo):
    engine = engine_with(synth, backend=BrokenBackend(synth.talker, fail_at=3))
    engine.backend_factory = lambda: ReferenceBackend(synth.talker)
    try:
        results = run_jobs(synth, engine, TEXTS[:2], [10, 11])
        assert all(r["stop"] == "error" and "device is gone" in r["error"] for r in results)
        assert engine.health() == (True, "ok")
        again = run_jobs(synth, engine, TEXTS[:2], [10, 11])
    finally:
        engine.stop()
    assert [r["pcm"] for r in again] == solo[:2]


def test_backend_breaking_without_rebuild_makes_the_engine_unhealthy(synth):
    engine = engine_with(synth, backend=BrokenBackend(synth.talker, fail_at=1))
    try:
        results = run_jobs(synth, engine, TEXTS[:1], [10])
        assert results[0]["stop"] == "error"
        ok, why = engine.health()
        assert not ok and "device is gone" in why
        with pytest.raises(EngineUnavailable):
            engine.submit(Job(PromptSource(synth.prepare("Hi.", max_new_tokens=2), 1), lambda e: None))
    finally:
        engine.stop()


def test_streams_at_different_positions_are_batched_and_exact(synth, solo):
    """Streams join while others run (continuous batching): each still gets its solo audio, and steps did carry
    several streams at once."""
    engine = engine_with(synth)
    try:
        first = threading.Thread(target=lambda: first_result.append(run_jobs(synth, engine, TEXTS[:1], [10])[0]))
        first_result: list = []
        first.start()
        time.sleep(0.3)
        rest = run_jobs(synth, engine, TEXTS[1:], [11, 12, 13])
        first.join(60)
        time.sleep(1.0)  # the frame rate counts whole seconds before the current one
        assert engine.frames_per_second() > 0  # what the server's /metrics reports
    finally:
        engine.stop()
    assert [first_result[0]["pcm"]] + [r["pcm"] for r in rest] == solo
    assert max(engine.step_times.by_bucket) >= 2  # some engine steps carried 2+ streams


def test_cancel_ends_one_stream_and_frees_its_slot(synth, solo):
    engine = engine_with(synth)
    try:
        results = run_jobs(synth, engine, TEXTS, [10 + i for i in range(len(TEXTS))], frames=40,
                           cancel_after=(0, 1920 * 2))
    finally:
        engine.stop()
    assert results[0]["stop"] == "cancelled"
    assert engine.active_count == 0


def test_full_engine_refuses_and_queue_timeout_fails(synth):
    engine = engine_with(synth, max_active=1, max_queue=1, queue_timeout_s=0.5)
    try:
        jobs = [Job(PromptSource(synth.prepare("Hold the slot.", max_new_tokens=400), i), lambda e: None,
                    max_buffered=1) for i in range(2)]
        for job in jobs:
            engine.submit(job)
        with pytest.raises(EngineFull):
            engine.submit(Job(PromptSource(synth.prepare("Hi.", max_new_tokens=2), 9), lambda e: None))
        time.sleep(1.5)  # the queued job waits past its timeout
        assert jobs[1].finished and jobs[1].end_reason == "error"
    finally:
        engine.stop()


def test_stalled_consumer_is_ended_and_its_slot_freed(synth):
    engine = engine_with(synth, consumer_stall_s=0.5)
    got = []
    try:
        job = Job(PromptSource(synth.prepare("Nobody reads this.", max_new_tokens=400), 1), got.append,
                  max_buffered=2)
        engine.submit(job)
        deadline = time.time() + 20
        while not job.finished and time.time() < deadline:
            time.sleep(0.1)
    finally:
        engine.stop()
    assert job.finished and job.end_reason == "error"
    assert any(kind == "error" and "took no audio" in payload for kind, payload in got)
    assert engine.active_count == 0


def test_realtime_admission_holds_new_streams_when_steps_are_too_slow(synth):
    engine = engine_with(synth, max_active=8)
    engine.settings.realtime_admission = True
    engine.step_times.record(1, 0.07)  # one stream alone already takes 70 ms of every 80 ms frame
    try:
        first = Job(PromptSource(synth.prepare("First.", max_new_tokens=400), 1), lambda e: None, max_buffered=1000)
        second = Job(PromptSource(synth.prepare("Second.", max_new_tokens=2), 2), lambda e: None)
        engine.submit(first)
        time.sleep(0.3)
        engine.step_times.by_bucket = {1: 0.07}
        engine.submit(second)
        time.sleep(0.5)
        assert engine.waiting_count == 1 and not second.finished  # held back, not degrading the first
        first.cancel()
        deadline = time.time() + 20
        while not second.finished and time.time() < deadline:
            time.sleep(0.05)
        assert second.finished and second.end_reason in ("max_new_tokens", "length_guard")
    finally:
        engine.stop()


def test_stream_error_surfaces_in_the_python_api(synth):
    """Synthesizer.stream raises StreamError when its stream fails (here: an absurd temperature floor)."""
    bad = Synthesizer(synth.checkpoint, FaultyBackend(synth.talker, seed=5, at_frame=1,
                                                      error=SamplingError("no finite score")),
                      synth.codec, synth.embedder, synth.talker, EngineSettings(realtime_admission=False))
    try:
        with pytest.raises(StreamError, match="no finite score"):
            list(bad.stream("Hello there.", seed=5, max_new_tokens=4))
        assert np.asarray(list(bad.stream("Hello there.", seed=6, max_new_tokens=2))[0].pcm).size == 1920
    finally:
        bad.close()
