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

from qwen_tts_megakernel.backends.base import BackendError, StepOutput
from qwen_tts_megakernel.backends.reference import ReferenceBackend
from qwen_tts_megakernel.engine import (EngineFull, EngineSettings, EngineUnavailable, Job, PromptSource,
                                        StreamError, Synthesizer)
from qwen_tts_megakernel.codec import StreamingCodec
from qwen_tts_megakernel.engine.scheduler import Engine
from qwen_tts_megakernel.engine.step_model import HOLD, PROBE, StepModel
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
    assert max(engine.step_times.table()) >= 2  # some engine steps carried 2+ streams


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


class FakeClock:
    """Seconds that pass only when told: the engine's step times and the step model's ages read it."""

    def __init__(self, now: float = 1000.0):
        self.now = now
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds

    def advance_to(self, t: float) -> None:
        with self._lock:
            self.now = max(self.now, t)


class TimedBackend(ReferenceBackend):
    """The reference backend whose steps take planted times on a fake clock: `cost(batch, n)` seconds for the
    n-th step (0-based) at that batch size. `machine_delay_s` adds real sleep to each step (a slower machine).
    Records the fake time each stream (by seed) was opened, and the batch of every step."""

    def __init__(self, talker, clock: FakeClock, cost, machine_delay_s: float = 0.0, max_streams: int = 16):
        super().__init__(talker, max_streams=max_streams)
        self.clock, self.cost, self.machine_delay_s = clock, cost, machine_delay_s
        self.steps_at: dict[int, int] = {}
        self.batches: list[int] = []
        self.opened: dict[int, float] = {}

    def open(self, specs):
        for spec in specs:
            self.opened[spec.rng.seed] = self.clock()
        return super().open(specs)

    def step(self, streams):
        out = super().step(streams)
        n = len(streams)
        self.clock.advance(self.cost(n, self.steps_at.get(n, 0)))
        self.steps_at[n] = self.steps_at.get(n, 0) + 1
        self.batches.append(n)
        if self.machine_delay_s:
            time.sleep(self.machine_delay_s)
        return out


class PlantedBackend:
    """A backend without a model (the Backend contract, backends/base.py) whose steps cost planted times on the
    fake clock: `base(n)` at n streams, + `cold_s` on the first step ever in each power-of-two bucket (lazy kernel
    loading), + `prefill_s` for each stream opened since the previous step (its prefill lands in that step, as on
    the megakernel). Its codes are never EOS. For load shapes too large to compute on a CPU."""

    max_seq_len = 4096

    def __init__(self, clock: FakeClock, base, cold_s: float, prefill_s: float, max_streams: int = 64,
                 after_step=lambda now: None):
        self.clock, self.base, self.cold_s, self.prefill_s = clock, base, cold_s, prefill_s
        self.max_streams, self.after_step = max_streams, after_step
        self.batches: list[int] = []
        self.opened: dict[int, float] = {}
        self._just_opened = 0

    def open(self, specs):
        for spec in specs:
            self.opened[spec.rng.seed] = self.clock()
        self._just_opened += len(specs)
        return [object() for _ in specs]

    def step(self, streams):
        n = len(streams)
        bucket = 1 << (n - 1).bit_length()
        cold = all(1 << (b - 1).bit_length() != bucket for b in self.batches)
        self.clock.advance(self.base(n) + self.cold_s * cold + self.prefill_s * self._just_opened)
        self._just_opened = 0
        self.batches.append(n)
        self.after_step(self.clock())
        return StepOutput(codes=np.zeros((n, 16), dtype=np.int64))

    def append_text(self, stream, rows):
        pass

    def end_text(self, stream):
        pass

    def close(self, stream):
        pass


def timed_engine(synth, backend, step_model: StepModel | None = None, **settings) -> Engine:
    engine = Engine(backend, StreamingCodec(synth.codec), synth.embedder, synth.config, sample_rate=synth.sample_rate,
                    step_model=step_model or StepModel(clock=backend.clock),
                    settings=EngineSettings(realtime_admission=True, **settings))
    engine.start()
    return engine


def frames_job(synth, text: str, seed: int, frames: int) -> Job:
    """A job that only counts frames (no codec, no consumer to wait for)."""
    return Job(PromptSource(synth.prepare(text, max_new_tokens=frames), seed), lambda e: None, audio=False,
               max_buffered=1000)


def wait_until(condition, what: str, timeout_s: float = 60.0) -> None:
    """Poll until `condition()` (a bound on a hang, not a timing: the conditions count engine steps)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("machine_delay_s", [0.0, 0.03], ids=["fast-machine", "slow-machine"])
def test_realtime_admission_holds_new_streams_when_steps_are_too_slow(synth, machine_delay_s):
    """One stream alone takes 70 ms of every 80 ms frame (planted on the fake clock, whatever this machine's
    speed): a second stream waits until the first ends. The recorded step times are the planted ones on a fast
    machine and on one 30 ms slower per step alike, and the waits count engine steps, not seconds."""
    clock = FakeClock()
    backend = TimedBackend(synth.talker, clock, lambda n, k: 0.07 * n, machine_delay_s)
    engine = timed_engine(synth, backend, max_active=8)
    try:
        first, second = frames_job(synth, "First.", 1, 400), frames_job(synth, "Second.", 2, 2)
        engine.submit(first)
        wait_until(lambda: backend.steps_at.get(1, 0) >= 5, "five steps of the first stream")
        engine.submit(second)
        held_from = backend.steps_at[1]
        wait_until(lambda: backend.steps_at[1] >= held_from + 20, "twenty more steps of the first stream")
        assert engine.waiting_count == 1 and not second.finished  # held back, not degrading the first
        assert 2 not in backend.steps_at
        first.cancel()
        wait_until(lambda: second.finished, "the second stream")
        assert second.end_reason in ("max_new_tokens", "length_guard")
    finally:
        engine.stop()


def test_a_slow_first_step_at_batch_two_does_not_lock_batch_two_out(synth):
    """The lock-out of issue 24: the first step at batch 2 takes 100 ms (lazy loading, a prefill landing in the
    step), later ones 30 ms. A second stream runs beside the first; a later second stream, submitted while the
    first still runs, is admitted within one second of (fake) time."""
    clock = FakeClock()
    backend = TimedBackend(synth.talker, clock, lambda n, k: 0.1 if (n, k) == (2, 0) else 0.015 * (n + 1))
    engine = timed_engine(synth, backend, max_active=8)
    try:
        first = frames_job(synth, "The first stream runs all along.", 1, 400)
        engine.submit(first)
        wait_until(lambda: backend.steps_at.get(1, 0) >= 5, "five steps of the first stream")
        early = frames_job(synth, "Second.", 2, 2)
        engine.submit(early)
        wait_until(lambda: early.finished, "the early second stream")
        assert backend.steps_at[2] >= 1  # the slow first step at batch 2 happened
        later = frames_job(synth, "Second again.", 3, 6)
        submitted = clock()
        engine.submit(later)
        wait_until(lambda: 3 in backend.opened, "the later second stream to open")
        assert backend.opened[3] - submitted <= 1.0
        assert not first.finished  # it was admitted while the first ran
        wait_until(lambda: later.finished, "the later second stream")
        assert later.end_reason == "max_new_tokens"
    finally:
        first.cancel()
        engine.stop()


class PacedTraffic:
    """Listeners on the fake clock: job i arrives at times[i] and takes one frame per 80 ms from its arrival on
    (a real-time player: the engine's backpressure holds a job whose 4-frame buffer is full). `release(now)` runs
    after every backend step (the engine thread: the clock, arrivals and listening move in lockstep); when every
    job is waiting on its listener, `advance()` moves the clock to the next arrival or take."""

    def __init__(self, times, make_job, clock: FakeClock):
        self.due = list(enumerate(times))
        self.make_job, self.clock = make_job, clock
        self.engine: Engine | None = None
        self.jobs: list[tuple[float, Job]] = []
        self.received: list[int] = []
        self.taken: list[int] = []
        self.seq = 0  # changes whenever a job arrives, a listener takes a frame or the clock is moved
        self.last_verdict: tuple[int, str] | None = None  # (seq, verdict) of admission's latest question
        self._lock = threading.RLock()

    def release(self, now: float) -> None:
        with self._lock:
            while self.due and self.due[0][1] <= now:
                i, t = self.due.pop(0)
                self.received.append(0)
                self.taken.append(0)
                job = self.make_job(i, lambda event, i=i: self._emit(i, event))
                self.jobs.append((t, job))
                self.seq += 1
                self.engine.submit(job)
            for i, (t, job) in enumerate(self.jobs):
                while self.taken[i] < self.received[i] and t + FRAME_S * self.taken[i] <= now:
                    self.taken[i] += 1
                    self.seq += 1
                    job.taken()

    def _emit(self, i: int, event) -> None:
        if event[0] == "frame":
            self.received[i] += 1

    def done(self) -> bool:
        return not self.due and all(job.finished for _, job in self.jobs)

    def stalled(self) -> bool:
        """Only the clock can move things: every opened job waits for its listener, and the jobs not opened are
        all queued, held by an admission verdict given since the last change."""
        with self._lock:
            unopened = [job for _, job in self.jobs if job.started is None and not job.finished]
            if len(unopened) != self.engine.waiting_count:
                return False  # admitted, not opened yet
            if unopened and self.last_verdict != (self.seq, HOLD):
                return False  # admission has not looked at them since the last change
            return all(job.finished or job.started is None or job.outstanding >= job.max_buffered
                       for _, job in self.jobs)

    def advance(self) -> None:
        with self._lock:
            takes = [t + FRAME_S * self.taken[i] for i, (t, job) in enumerate(self.jobs)
                     if self.taken[i] < self.received[i]]
            arrivals = [self.due[0][1]] if self.due else []
            self.clock.advance_to(min(takes + arrivals))
            self.seq += 1
        self.release(self.clock())


class WatchedModel(StepModel):
    """The step model, telling the traffic each verdict admission asked for."""

    def __init__(self, clock, traffic: PacedTraffic):
        super().__init__(clock=clock)
        self.traffic = traffic

    def verdict(self, batch: int, budget_s: float) -> str:
        with self.traffic._lock:
            verdict = super().verdict(batch, budget_s)
            self.traffic.last_verdict = (self.traffic.seq, verdict)
            return verdict


FRAME_S = 0.08


def test_poisson_arrivals_through_the_engine_are_admitted_promptly(synth):
    """Seeded Poisson arrivals (10 per second of fake time) of 30-frame streams played in real time (about 24 at
    once) on a cold backend: the first step in each power-of-two bucket costs 50 ms more (lazy loading), each new
    stream's prefill adds 20 ms to the next step. Every stream is served, the batch grows to what the load needs,
    and none waits more than a second for admission. (The old running average kept the cold steps and held the
    batch at 16: the queue grew.)"""
    clock = FakeClock()
    rng = np.random.default_rng(24)
    traffic = PacedTraffic(clock() + np.cumsum(rng.exponential(1 / 10.0, size=60)),
                           lambda i, emit: Job(PromptSource(synth.prepare(TEXTS[i % len(TEXTS)], max_new_tokens=30),
                                                            100 + i), emit, audio=False, frames=True, max_buffered=4),
                           clock)
    backend = PlantedBackend(clock, lambda n: 0.004 + 0.002 * n, cold_s=0.05, prefill_s=0.02,
                             after_step=traffic.release)
    engine = traffic.engine = timed_engine(synth, backend, WatchedModel(clock, traffic), max_active=64,
                                           max_queue=64, queue_timeout_s=600, consumer_stall_s=600)
    try:
        while not traffic.done():
            wait_until(lambda: traffic.done() or traffic.stalled(), "the engine to wait on the clock")
            if not traffic.done():
                traffic.advance()
    finally:
        engine.stop()
    assert [job.end_reason for _, job in traffic.jobs] == ["max_new_tokens"] * 60
    delays = [backend.opened[100 + i] - t for i, (t, _) in enumerate(traffic.jobs)]
    assert max(delays) <= 1.0, delays
    assert max(backend.batches) > 16  # streams overlapped and were batched past the cold bucket of 32


def test_warm_up_steps_every_batch_bucket_and_measures_it(synth):
    """Engine.warm_up (start-up) opens and steps throw-away streams at 1, 2 and max_active (3), closes them, and
    leaves a measured step time at every bucket (planted times on the fake clock)."""
    clock = FakeClock()
    backend = TimedBackend(synth.talker, clock, lambda n, k: 0.01 * n, max_streams=4)
    engine = Engine(backend, StreamingCodec(synth.codec), synth.embedder, synth.config,
                    sample_rate=synth.sample_rate, step_model=StepModel(clock=clock),
                    settings=EngineSettings(max_active=3))
    report = engine.warm_up(synth.warm_up_spec)
    assert report["batches"] == [1, 2, 3]
    assert {n: backend.steps_at[n] for n in report["batches"]} == {n: 4 for n in report["batches"]}
    assert report["seconds"] == pytest.approx(4 * 0.01 * (1 + 2 + 3))
    for handle in backend.open([synth.warm_up_spec(i) for i in range(backend.max_streams)]):
        backend.close(handle)  # every slot is free again: the warm-up closed its streams
    table = engine.step_times.table()
    assert {b: table[b]["how"] for b in (1, 2, 3)} == {b: "measured" for b in (1, 2, 3)}
    assert table[3]["predicted_ms"] == pytest.approx(30.0)


class ProbesOnly(StepModel):
    def verdict(self, batch, budget_s):
        return PROBE


def test_where_only_a_probe_can_tell_one_stream_joins_per_step(synth):
    clock = FakeClock()
    submitted = threading.Event()
    backend = PlantedBackend(clock, lambda n: 0.01, cold_s=0.0, prefill_s=0.0,
                             after_step=lambda now: submitted.wait(60))  # the first stream runs until all wait
    engine = timed_engine(synth, backend, ProbesOnly(clock=clock))
    first = frames_job(synth, "Already running.", 1, 400)
    others = [frames_job(synth, "Probe me.", 2 + i, 40) for i in range(5)]
    try:
        engine.submit(first)
        wait_until(lambda: len(backend.batches) >= 1, "the first stream to step")
        for job in others:
            engine.submit(job)
        submitted.set()
        wait_until(lambda: max(backend.batches) == 6, "every stream to join")
    finally:
        first.cancel()
        engine.stop()
    assert all(b - a <= 1 for a, b in zip(backend.batches, backend.batches[1:])), backend.batches


def test_step_log_shows_the_step_table_and_stream_counts_every_n_steps(synth, caplog):
    clock = FakeClock()
    backend = PlantedBackend(clock, lambda n: 0.01 * n, cold_s=0.0, prefill_s=0.0)
    engine = timed_engine(synth, backend, step_log_every=2)
    job = frames_job(synth, "Logged.", 1, 6)
    with caplog.at_level("INFO", logger="qwen_tts_megakernel.engine"):
        try:
            engine.submit(job)
            wait_until(lambda: job.finished, "the stream")
        finally:
            engine.stop()
    lines = [r.getMessage() for r in caplog.records if "step model" in r.getMessage()]
    assert len(lines) == 3  # steps 2, 4 and 6
    assert lines[-1].startswith("step 6: batch 1, active 1, waiting 0, step model {1: {'predicted_ms': 10.0")


def test_step_log_setting_reads_its_environment_variable(monkeypatch):
    monkeypatch.setenv("QWEN_TTS_MK_STEP_LOG", "50")
    assert EngineSettings().step_log_every == 50
    monkeypatch.setenv("QWEN_TTS_MK_STEP_LOG", "often")
    with pytest.raises(ValueError, match="QWEN_TTS_MK_STEP_LOG must be a non-negative integer"):
        EngineSettings()


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
