"""The engine step as a pipeline: the order of its halves, the int16 conversion, event delivery, the step profile.

On the CPU every stream and event is a no-op, so these check the ordering and the bookkeeping; the exact audio of
streams run together is tests/test_engine_scheduler.py's (unchanged by the pipeline).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from qwen_tts_megakernel.backends.reference import ReferenceBackend
from qwen_tts_megakernel.codec import StreamingCodec
from qwen_tts_megakernel.codec.streaming import to_pcm16
from qwen_tts_megakernel.engine import EngineSettings, Job, PromptSource, Synthesizer
from qwen_tts_megakernel.engine.delivery import Courier
from qwen_tts_megakernel.engine.jobs import float_to_pcm16
from qwen_tts_megakernel.engine.scheduler import Engine
from qwen_tts_megakernel.engine.step_profile import StepProfile
from qwen_tts_megakernel.engine.synthesizer import JobEvents
from qwen_tts_megakernel.synthetic import write_tiny_model


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_pipeline")
    write_tiny_model(path, "0.6b", "custom_voice", seed=0)
    s = Synthesizer.from_pretrained(str(path), device="cpu")
    yield s
    s.close()


def test_pcm16_on_the_device_rounds_like_the_host_conversion():
    rng = np.random.default_rng(0)
    edges = np.array([-2.0, -1.0, -0.99999, 0.0, 0.5 / 32767, 1.5 / 32767, 2.5 / 32767, 0.99999, 1.0, 3.0])
    audio = np.concatenate([rng.uniform(-1.2, 1.2, 10000), edges]).astype(np.float32)
    assert np.array_equal(to_pcm16(torch.from_numpy(audio)).numpy(), float_to_pcm16(audio))


def test_push_pcm16_gives_the_int16_of_push(synth):
    codes = [np.random.default_rng(i).integers(0, 2048, (n, 16)) for i, n in enumerate((1, 3))]
    plain, queued = StreamingCodec(synth.codec, max_streams=2), StreamingCodec(synth.codec, max_streams=2)
    a = [plain.open(), plain.open()]
    b = [queued.open(), queued.open()]
    for _ in range(2):  # twice: the carried state moves on the same in both
        want = [float_to_pcm16(p) for p in plain.push(a, codes)]
        pending = queued.push_pcm16(b, codes)
        assert pending.ready()
        got = pending.wait()
        assert all(np.array_equal(w, g) for w, g in zip(want, got))
    assert [s.frames for s in b] == [2, 6]


def test_courier_keeps_each_consumers_order_and_survives_a_broken_callback():
    courier = Courier()
    courier.start()
    got: list = []

    def broken(event):
        raise RuntimeError("consumer bug")

    for i in range(100):
        courier.post(got.append, ("chunk", i))
        courier.post(broken, ("chunk", i))
    courier.stop()
    assert got == [("chunk", i) for i in range(100)]


def test_step_profile_splits_wall_time_by_bucket():
    profile = StepProfile()
    profile.record(64, wall_s=0.030, gpu_wait_s=0.029)
    profile.record(40, wall_s=0.020, gpu_wait_s=0.018, prefill_s=0.001)
    profile.record(1, wall_s=0.005, gpu_wait_s=0.006)  # a wait is never more than the step
    s = profile.summary()
    assert list(s) == ["1", "64"]
    assert s["64"]["steps"] == 2 and s["64"]["step_ms"] == pytest.approx(25.0)
    assert s["64"]["host_ms"] == pytest.approx(1.0) and s["64"]["prefill_ms"] == pytest.approx(0.5)
    assert s["1"]["host_ms"] == pytest.approx(0.0)


class SplitBackend(ReferenceBackend):
    """The reference backend with the megakernel's begin_step/finish_step, logging the order of calls."""

    def __init__(self, talker, log: list):
        super().__init__(talker)
        self.log = log

    def begin_step(self, streams):
        self.log.append(("begin", len(streams)))
        return list(streams)

    def finish_step(self, streams):
        self.log.append(("finish", len(streams)))
        return self.step(streams)


class LoggingCodec(StreamingCodec):
    def __init__(self, decoder, log: list):
        super().__init__(decoder)
        self.log = log

    def push(self, streams, codes):
        self.log.append(("decode", [len(c) for c in codes]))
        return super().push(streams, codes)


def run(engine: Engine, synth, text: str, seed: int, frames: int) -> tuple[bytes, list]:
    ev = JobEvents(engine)
    job = Job(PromptSource(synth.prepare(text, max_new_tokens=frames), seed), ev.emit)
    ev.job = job
    engine.submit(job)
    pcm, chunks = b"", []
    while True:
        kind, payload = ev.next()
        if kind == "chunk":
            pcm += payload.pcm.tobytes()
            chunks.append((payload.first_frame, payload.num_frames))
        elif kind == "done":
            return pcm, chunks


def test_the_next_step_is_launched_before_the_previous_frames_are_decoded_and_the_audio_is_unchanged(synth):
    log: list = []
    engine = Engine(SplitBackend(synth.talker, log), LoggingCodec(synth.codec, log), synth.embedder, synth.config,
                    sample_rate=synth.sample_rate, settings=EngineSettings(realtime_admission=False, pipelined=True))
    engine.start()
    try:
        pcm, chunks = run(engine, synth, "The pipeline speaks.", seed=3, frames=7)
    finally:
        engine.stop()
    alone = b"".join(c.pcm.tobytes() for c in synth.stream("The pipeline speaks.", seed=3, max_new_tokens=7))
    assert pcm == alone
    assert chunks == [(0, 1), (1, 2), (3, 4)]  # the chunk schedule 1, 2, 4
    kinds = [k for k, _ in log]
    # The first chunk is decoded right after frame 0 came back (not one step later) ...
    assert kinds[:3] == ["begin", "finish", "decode"]
    # ... and every later chunk is decoded between the next step's launch and its result.
    later = [i for i, k in enumerate(kinds) if k == "decode"][1:]
    assert later and all(kinds[i - 1] == "begin" and kinds[i + 1] == "finish" for i in later[:-1])
    summary = engine.step_profile.summary()
    assert summary["1"]["steps"] == 7 and summary["1"]["host_ms"] >= 0


def test_a_stream_that_stops_at_eos_still_gets_its_last_chunk(synth):
    """A stream's last frames are decoded one step after their frame: the stream ends only after that chunk."""
    engine = Engine(ReferenceBackend(synth.talker), StreamingCodec(synth.codec), synth.embedder, synth.config,
                    sample_rate=synth.sample_rate, settings=EngineSettings(realtime_admission=False, pipelined=True))
    engine.start()
    try:
        results = {}

        def one(i):
            results[i] = run(engine, synth, f"Stream number {i}.", seed=20 + i, frames=5 + i)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        engine.stop()
    for i in range(3):
        pcm, chunks = results[i]
        assert sum(n for _, n in chunks) == 5 + i
        assert len(pcm) == (5 + i) * synth.samples_per_frame * 2


def test_host_share_tool_reports_the_step_split_and_the_first_chunk_stages(tmp_path):
    from qwen_tts_megakernel.tools import host_share

    model = tmp_path / "tiny"
    write_tiny_model(model, "0.6b", "custom_voice", seed=0)
    out = tmp_path / "out"
    assert host_share.main(["--model", str(model), "--backend", "reference", "--device", "cpu",
                            "--streams", "1", "2", "--frames", "5", "--output-dir", str(out)]) == 0
    report = __import__("json").loads((out / "cpu-tiny-host-share.json").read_text())
    one, two = report["results"]
    assert one["step"]["steps"] == 5
    # Two streams submitted one after the other may start a step apart: 5 steps together, or 4 and one each alone.
    assert two["step"]["steps"] >= 4 and sum(b["steps"] for b in two["by_bucket"].values()) in (5, 6)
    for r in (one, two):
        s = r["step"]
        assert s["host_ms"] == pytest.approx(s["step_ms"] - s["gpu_wait_ms"] - s["prefill_ms"])
        assert list(r["first_chunk_ms"]) == report["stages"]
        assert r["time_to_first_chunk_ms"] == pytest.approx(sum(r["first_chunk_ms"].values()), rel=0.5)
    assert f"| 2 | {two['step']['steps']} |" in (out / "cpu-tiny-host-share.md").read_text()


class OpenLoggingBackend(SplitBackend):
    def open(self, specs):
        self.log.append(("open", len(specs)))
        return super().open(specs)


def test_a_burst_joining_running_streams_is_prefilled_together_first_chunks_at_once_and_exact(synth):
    """Two streams run; four more arrive at once: one backend.open for the four, each one's first chunk decoded in
    the step that made its first frame, and every stream's audio what it is alone."""
    texts = [f"Stream {i} of the burst test speaks here." for i in range(6)]
    frames = [30, 30, 4, 5, 6, 7]
    solo = [b"".join(c.pcm.tobytes() for c in synth.stream(t, seed=40 + i, max_new_tokens=n))
            for i, (t, n) in enumerate(zip(texts, frames))]
    log: list = []
    engine = Engine(OpenLoggingBackend(synth.talker, log), LoggingCodec(synth.codec, log), synth.embedder,
                    synth.config, sample_rate=synth.sample_rate, settings=EngineSettings(realtime_admission=False, pipelined=True))
    engine.start()
    jobs, events = [], []

    def submit(i):
        ev = JobEvents(engine)
        ev.job = Job(PromptSource(synth.prepare(texts[i], max_new_tokens=frames[i]), 40 + i), ev.emit)
        engine.submit(ev.job)
        jobs.append(ev.job)
        events.append(ev)

    try:
        with engine._cond:  # the scheduler admits at a step boundary, under this lock: both arrive together
            submit(0)
            submit(1)
        kind, first = events[0].next()
        assert kind == "chunk"  # the first two are running
        with engine._cond:
            for i in range(2, 6):
                submit(i)
        pcm = []
        for i, ev in enumerate(events):
            got = first.pcm.tobytes() if i == 0 else b""
            while (event := ev.next())[0] != "done":
                got += event[1].pcm.tobytes()
            pcm.append(got)
    finally:
        engine.stop()
    assert pcm == solo
    assert [n for kind, n in log if kind == "open"] == [2, 4]
    burst = log.index(("open", 4))
    # After the burst's open: its step (the four and the running ones), then at once the four first chunks, one
    # frame each, before anything else.
    kind, stepped = log[burst + 1]
    assert kind == "begin" and stepped >= 4
    nxt = log.index(("finish", stepped), burst)
    assert log[nxt + 1] == ("decode", [1, 1, 1, 1])
    for job in jobs:
        stages = job.first_chunk_stages_ms()
        assert list(stages) == [name for name, _ in Job.FIRST_CHUNK_STAGES] and min(stages.values()) >= 0


def test_step_profile_between_two_snapshots_is_what_happened_in_between():
    profile = StepProfile()
    profile.record(16, wall_s=0.010, gpu_wait_s=0.009)
    before = profile.totals()
    profile.record(16, wall_s=0.020, gpu_wait_s=0.018, prefill_s=0.001)
    profile.record(64, wall_s=0.030, gpu_wait_s=0.029)
    got = StepProfile.between(before, profile.totals())
    assert got["16"]["steps"] == 1 and got["16"]["host_ms"] == pytest.approx(1.0)
    assert got["64"]["steps"] == 1 and got["64"]["host_ms"] == pytest.approx(1.0)
    assert StepProfile.between(profile.totals(), profile.totals()) == {}


def test_the_pipelined_step_is_off_by_default_and_the_environment_turns_it_on(monkeypatch):
    monkeypatch.delenv("QWEN_TTS_MK_PIPELINE", raising=False)
    assert not EngineSettings().pipelined
    monkeypatch.setenv("QWEN_TTS_MK_PIPELINE", "1")
    assert EngineSettings().pipelined
    monkeypatch.setenv("QWEN_TTS_MK_PIPELINE", "yes")
    with pytest.raises(ValueError, match="QWEN_TTS_MK_PIPELINE"):
        EngineSettings()
