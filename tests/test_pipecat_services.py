"""Pipecat services against the real server (tiny checkpoint, CPU, loopback): frames, audio, metrics, interruptions,
errors, streaming."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

pytest.importorskip("pipecat")
aiohttp = pytest.importorskip("aiohttp")
websockets = pytest.importorskip("websockets")

from pipecat.frames.frames import (ErrorFrame, Frame, InterruptionFrame, LLMFullResponseEndFrame,  # noqa: E402
                                   LLMFullResponseStartFrame, LLMTextFrame, MetricsFrame, OutputAudioRawFrame,
                                   StartFrame, TTSAudioRawFrame, TTSSpeakFrame, TTSStartedFrame, TTSStoppedFrame,
                                   TTSUpdateSettingsFrame)
from pipecat.metrics.metrics import TTFBMetricsData  # noqa: E402
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.processors.aggregators.llm_context import LLMContext  # noqa: E402
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair  # noqa: E402
from pipecat.pipeline.worker import PipelineParams  # noqa: E402
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor  # noqa: E402
from pipecat.services.tts_service import TextAggregationMode  # noqa: E402
from pipecat.tests.utils import SleepFrame, run_test  # noqa: E402
from pipecat.transports.base_output import BaseOutputTransport  # noqa: E402
from pipecat.transports.base_transport import TransportParams  # noqa: E402

from qwen_tts_megakernel.pipecat import QwenHttpTTSService, QwenTTSService  # noqa: E402
from qwen_tts_megakernel.testing.server import TTSServerProcess, prometheus_sum  # noqa: E402
from qwen_tts_megakernel.pipecat.websocket import parse_audio_message, websocket_url  # noqa: E402
from qwen_tts_megakernel.synthetic import write_tiny_model  # noqa: E402

VOICE = "ryan"
LANGUAGE = "english"
TEXT = "Hello there, how are you today?"
SHORT = 12  # frames (0.96 s of audio)
LONG = 250  # frames (20 s of audio; a few seconds of synthesis on CPU); TEXT's length guard is 290 frames
# Interrupted utterances: long enough that no CPU finishes them before the interruption (guard 830 frames).
VERY_LONG_TEXT, VERY_LONG = " ".join([TEXT] * 3), 800


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = write_tiny_model(tmp_path_factory.mktemp("tiny"), "0.6b", "custom_voice", seed=0)
    with TTSServerProcess(model) as srv:
        yield srv


def cancelled_streams(server) -> float:
    return prometheus_sum(server.metrics_text(), "qwen_tts_streams_total", stop_reason="cancelled")


def settings(cls, **kw):
    return cls.Settings(**({"voice": VOICE, "language": LANGUAGE, "seed": 7, "max_new_tokens": SHORT} | kw))


def metrics_params(**kw) -> PipelineParams:
    return PipelineParams(enable_metrics=True, enable_usage_metrics=True, **kw)


def audio_of(frames) -> bytes:
    return b"".join(f.audio for f in frames if isinstance(f, TTSAudioRawFrame))


def ttfb_values(frames, service) -> list[float]:
    return [d.value for f in frames if isinstance(f, MetricsFrame) for d in f.data
            if isinstance(d, TTFBMetricsData) and d.processor == service.name and d.value > 0]


def assert_started_audio_stopped(frames) -> list[str]:
    """TTSStartedFrame, then audio, then TTSStoppedFrame, per context; returns the context ids in order."""
    kinds = [(type(f), getattr(f, "context_id", None)) for f in frames
             if isinstance(f, (TTSStartedFrame, TTSAudioRawFrame, TTSStoppedFrame))]
    assert kinds, "no TTS frames"
    contexts = []
    state = None
    for kind, ctx in kinds:
        if kind is TTSStartedFrame:
            assert state is None, kinds
            state, current = "started", ctx
            contexts.append(ctx)
        elif kind is TTSAudioRawFrame:
            assert state in ("started", "audio") and ctx == current, "audio outside its started/stopped pair"
            state = "audio"
        else:
            assert state == "audio" and ctx == current, "stopped without audio"
            state = None
    assert state is None, "no TTSStoppedFrame at the end"
    return contexts


async def http_reference_audio(server, text, **body) -> bytes:
    """What the server produces for this request, read with a plain client."""
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{server.base_url}/tts/stream", json={"text": text, **body}) as r:
            assert r.status == 200, await r.text()
            assert r.headers.get("X-Sample-Rate") == "24000"
            return await r.read()


async def ws_reference_audio(server, deltas: list[str], **config) -> tuple[bytes, dict]:
    """What the server produces for this text over a plain WebSocket client: (audio, audio_done)."""
    ctx = "ref"
    async with websockets.connect(websocket_url(server.base_url), max_size=None) as ws:
        await ws.send(json.dumps({"type": "config", "context_id": ctx, **config}))
        for d in deltas:
            await ws.send(json.dumps({"type": "text", "context_id": ctx, "text": d}))
        await ws.send(json.dumps({"type": "flush", "context_id": ctx}))
        audio = bytearray()
        async for message in ws:
            if isinstance(message, bytes):
                got_ctx, pcm = parse_audio_message(message)
                assert got_ctx == ctx
                audio += pcm
            else:
                msg = json.loads(message)
                assert msg["type"] != "error", msg
                if msg["type"] == "audio_done":
                    return bytes(audio), msg
    raise AssertionError("the server closed the WebSocket before audio_done")


class Timestamps(FrameProcessor):
    """Records when each downstream TTSAudioRawFrame passes (the end of the pipeline under test)."""

    def __init__(self):
        super().__init__()
        self.audio_times: list[float] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame) and direction == FrameDirection.DOWNSTREAM:
            self.audio_times.append(time.monotonic())
        await self.push_frame(frame, direction)


async def wait_for_cancellation(server, before: float, timeout_s: float = 10.0) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = await asyncio.to_thread(cancelled_streams, server)
        if now > before:
            return now
        await asyncio.sleep(0.1)
    return await asyncio.to_thread(cancelled_streams, server)


# ---------------------------------------------------------------------------------------------------------------
# HTTP service


@pytest.mark.asyncio
async def test_http_speaks_in_order_with_server_audio_and_ttfb(server):
    tts = QwenHttpTTSService(base_url=server.base_url, settings=settings(QwenHttpTTSService))
    down, up = await run_test(tts, frames_to_send=[TTSSpeakFrame(TEXT)], pipeline_params=metrics_params())
    assert not [f for f in up if isinstance(f, ErrorFrame)]
    assert len(assert_started_audio_stopped(down)) == 1
    audio = [f for f in down if isinstance(f, TTSAudioRawFrame)]
    assert all(f.sample_rate == 24000 and f.num_channels == 1 for f in audio)
    expected = await http_reference_audio(server, TEXT, speaker=VOICE, language=LANGUAGE, seed=7,
                                          max_new_tokens=SHORT)
    assert len(expected) == SHORT * 1920 * 2
    assert audio_of(down) == expected
    assert ttfb_values(down, tts), "no TTFB metric > 0"


@pytest.mark.asyncio
async def test_http_resamples_to_the_pipeline_rate(server):
    tts = QwenHttpTTSService(base_url=server.base_url, settings=settings(QwenHttpTTSService))
    down, _ = await run_test(tts, frames_to_send=[TTSSpeakFrame(TEXT)],
                             pipeline_params=PipelineParams(audio_out_sample_rate=16000))
    audio = [f for f in down if isinstance(f, TTSAudioRawFrame)]
    assert audio and all(f.sample_rate == 16000 for f in audio)
    samples = len(audio_of(down)) // 2
    assert abs(samples - SHORT * 1920 * 2 // 3) <= 2  # 24 kHz -> 16 kHz, the tail flushed


@pytest.mark.asyncio
async def test_http_server_error_goes_upstream(server):
    tts = QwenHttpTTSService(base_url=server.base_url, settings=settings(QwenHttpTTSService, voice="nobody"))
    down, up = await run_test(tts, frames_to_send=[TTSSpeakFrame(TEXT)])
    errors = [f for f in up if isinstance(f, ErrorFrame)]
    assert errors and "nobody" in errors[0].error and "400" in errors[0].error, [e.error for e in errors]
    assert not [f for f in down if isinstance(f, TTSAudioRawFrame)]


@pytest.mark.asyncio
async def test_http_interruption_cancels_the_server_stream(server):
    before = await asyncio.to_thread(cancelled_streams, server)
    tts = QwenHttpTTSService(base_url=server.base_url,
                             settings=settings(QwenHttpTTSService, max_new_tokens=VERY_LONG))
    stamps = Timestamps()
    down, _ = await run_test(Pipeline([tts, stamps]),
                             frames_to_send=[TTSSpeakFrame(VERY_LONG_TEXT), SleepFrame(sleep=1.5), InterruptionFrame(),
                                             SleepFrame(sleep=0.3)])
    assert stamps.audio_times, "no audio before the interruption"
    received = len(audio_of(down)) // 2
    assert received < VERY_LONG * 1920, "the whole utterance arrived: nothing was left to cancel"
    assert await wait_for_cancellation(server, before) > before, "the server recorded no cancelled stream"


@pytest.mark.asyncio
async def test_http_first_audio_reaches_the_sink_while_the_server_is_synthesizing(server):
    tts = QwenHttpTTSService(base_url=server.base_url, settings=settings(QwenHttpTTSService, max_new_tokens=LONG))
    stamps = Timestamps()
    down, _ = await run_test(Pipeline([tts, stamps]), frames_to_send=[TTSSpeakFrame(TEXT)])
    assert len(audio_of(down)) == LONG * 1920 * 2
    first, last = stamps.audio_times[0], stamps.audio_times[-1]
    # The server sends each chunk as soon as its frames are decoded, so its last chunk leaves right after it
    # finishes synthesizing: the first chunk reached the sink seconds before synthesis ended.
    assert last - first > 1.0, f"audio arrived within {last - first:.2f} s: not streamed"


# ---------------------------------------------------------------------------------------------------------------
# WebSocket service


def ws_service(server, **kw) -> QwenTTSService:
    mode = kw.pop("text_aggregation_mode", TextAggregationMode.TOKEN)
    return QwenTTSService(base_url=server.base_url, settings=settings(QwenTTSService, **kw),
                          text_aggregation_mode=mode)


@pytest.mark.asyncio
async def test_ws_speaks_in_order_with_server_audio_and_ttfb(server):
    tts = ws_service(server)
    down, up = await run_test(tts, frames_to_send=[TTSSpeakFrame(TEXT), SleepFrame(sleep=0.2)],
                              pipeline_params=metrics_params())
    assert not [f for f in up if isinstance(f, ErrorFrame)], [f.error for f in up if isinstance(f, ErrorFrame)]
    assert len(assert_started_audio_stopped(down)) == 1
    expected, done = await ws_reference_audio(server, [TEXT], voice=VOICE, language=LANGUAGE, seed=7,
                                              max_new_tokens=SHORT)
    assert done["stop_reason"] == "max_new_tokens"
    assert len(expected) == SHORT * 1920 * 2
    assert audio_of(down) == expected
    assert ttfb_values(down, tts), "no TTFB metric > 0"


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", [TextAggregationMode.TOKEN, TextAggregationMode.SENTENCE])
async def test_ws_llm_turn_streams_text_into_one_context(server, mode):
    tokens = ["Hel", "lo ", "there", ", how", " are", " you", " today?", " I am", " fine."]
    frames_limit = 40  # past the text's 29 tokens: the audio depends on all of it
    tts = ws_service(server, text_aggregation_mode=mode, max_new_tokens=frames_limit)
    sent: list[str] = []

    @tts.event_handler("on_tts_request")
    async def _(service, context_id, text):
        sent.append(text)

    frames = [LLMFullResponseStartFrame(), *[LLMTextFrame(t) for t in tokens], LLMFullResponseEndFrame(),
              SleepFrame(sleep=0.2)]
    down, up = await run_test(tts, frames_to_send=frames, pipeline_params=metrics_params())
    assert not [f for f in up if isinstance(f, ErrorFrame)], [f.error for f in up if isinstance(f, ErrorFrame)]
    assert len(assert_started_audio_stopped(down)) == 1  # one context for the whole turn
    if mode == TextAggregationMode.TOKEN:
        assert sent == tokens  # every token went out as it came
        # Text that arrived token by token speaks exactly like the same text sent at once.
        expected, _ = await ws_reference_audio(server, ["".join(tokens)], voice=VOICE, language=LANGUAGE, seed=7,
                                               max_new_tokens=frames_limit)
        assert audio_of(down) == expected
    else:
        assert len(sent) == 2 and sent[0].startswith("Hello there")  # two sentences
        # Sent with their separator: the audio is the server's for the sentences joined with a space.
        expected, _ = await ws_reference_audio(server, [" ".join(s.strip() for s in sent)], voice=VOICE,
                                               language=LANGUAGE, seed=7, max_new_tokens=frames_limit)
        assert audio_of(down) == expected
    assert ttfb_values(down, tts)


@pytest.mark.asyncio
async def test_ws_interruption_cancels_on_the_server_and_drops_late_audio(server):
    before = await asyncio.to_thread(cancelled_streams, server)
    tts = ws_service(server, max_new_tokens=VERY_LONG)
    messages: list[dict] = []
    original = tts._on_event

    async def spy(msg):
        messages.append(msg)
        await original(msg)

    tts._on_event = spy
    down, _ = await run_test(tts, frames_to_send=[TTSSpeakFrame(VERY_LONG_TEXT), SleepFrame(sleep=1.5),
                                                  InterruptionFrame(),
                                                  SleepFrame(sleep=1.0), TTSSpeakFrame("Second."),
                                                  SleepFrame(sleep=0.5)])
    contexts = [f.context_id for f in down if isinstance(f, TTSStartedFrame)]
    assert len(contexts) == 2
    first, second = contexts
    i_interrupt = next(i for i, f in enumerate(down) if isinstance(f, InterruptionFrame))
    first_audio = [i for i, f in enumerate(down) if isinstance(f, TTSAudioRawFrame) and f.context_id == first]
    assert first_audio and max(first_audio) < i_interrupt, "audio of the cancelled context after the interruption"
    assert sum(len(down[i].audio) for i in first_audio) < VERY_LONG * 1920 * 2  # it was cut short
    assert [f for f in down if isinstance(f, TTSAudioRawFrame) and f.context_id == second]
    done = [m for m in messages if m.get("type") == "audio_done" and m.get("context_id") == first]
    assert done and done[0]["stop_reason"] == "cancelled", messages
    assert await wait_for_cancellation(server, before) > before, "the server recorded no cancelled stream"


@pytest.mark.asyncio
async def test_ws_server_error_goes_upstream(server):
    tts = ws_service(server, voice="nobody")
    down, up = await run_test(tts, frames_to_send=[TTSSpeakFrame(TEXT), SleepFrame(sleep=0.5)])
    errors = [f for f in up if isinstance(f, ErrorFrame)]
    assert errors and any("nobody" in e.error for e in errors), [e.error for e in errors]
    assert not [f for f in down if isinstance(f, TTSAudioRawFrame)]


@pytest.mark.asyncio
async def test_ws_first_audio_reaches_the_sink_while_the_server_is_synthesizing(server):
    tts = ws_service(server, max_new_tokens=LONG)
    stamps = Timestamps()
    done: list[tuple[float, dict]] = []
    sent_at: list[float] = []
    original_event, original_send = tts._on_event, tts._send

    async def on_event(msg):
        if msg.get("type") == "audio_done":
            done.append((time.monotonic(), msg))
        await original_event(msg)

    async def send(msg):
        if msg["type"] == "config":
            sent_at.append(time.monotonic())
        await original_send(msg)

    tts._on_event, tts._send = on_event, send
    down, _ = await run_test(Pipeline([tts, stamps]), frames_to_send=[TTSSpeakFrame(TEXT), SleepFrame(sleep=0.2)])
    assert len(audio_of(down)) == LONG * 1920 * 2
    assert done and done[0][1]["stop_reason"] == "max_new_tokens"
    first_audio = stamps.audio_times[0]
    # The server started no earlier than the config went out and synthesized for elapsed_ms, so it finished no
    # earlier than sent_at + elapsed_ms; the first audio passed the end of the pipeline well before that.
    server_done_no_earlier_than = sent_at[0] + done[0][1]["elapsed_ms"] / 1000
    assert first_audio < server_done_no_earlier_than - 0.5, (
        f"first audio {first_audio - sent_at[0]:.2f} s after the request; synthesis took "
        f"{done[0][1]['elapsed_ms'] / 1000:.2f} s")
    assert stamps.audio_times[-1] - first_audio > 1.0


# ---------------------------------------------------------------------------------------------------------------
# WebSocket service: word timings, settings changes mid-reply, LLM stalls


class Speaker(BaseOutputTransport):
    """An output transport that plays audio in real time into nothing (a sound card's pace), so that Pipecat times
    word frames and interruptions as it does with a real speaker."""

    def __init__(self):
        super().__init__(TransportParams(audio_out_enabled=True))
        self.first_audio: float | None = None

    async def start(self, frame: StartFrame):
        await super().start(frame)
        await self.set_transport_ready(frame)

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        if self.first_audio is None:
            self.first_audio = time.monotonic()
        await asyncio.sleep(len(frame.audio) / 2 / frame.sample_rate)
        return True


class MarkInterruption(FrameProcessor):
    """Notes when an InterruptionFrame enters the pipeline."""

    def __init__(self):
        super().__init__()
        self.at: float | None = None

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, InterruptionFrame) and self.at is None:
            self.at = time.monotonic()
        await self.push_frame(frame, direction)


def spy_server_events(tts: QwenTTSService) -> list[dict]:
    events: list[dict] = []
    original = tts._on_event

    async def spy(msg):
        events.append(msg)
        await original(msg)

    tts._on_event = spy
    return events


def spy_sent(tts: QwenTTSService) -> list[dict]:
    sent: list[dict] = []
    original = tts._send

    async def spy(msg):
        sent.append(msg)
        await original(msg)

    tts._send = spy
    return sent


@pytest.mark.asyncio
async def test_ws_interruption_leaves_only_the_heard_words_in_the_context(server):
    words = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen".split()
    tts = ws_service(server, max_new_tokens=VERY_LONG)
    events = spy_server_events(tts)
    context = LLMContext()
    pair = LLMContextAggregatorPair(context)
    mark, speaker = MarkInterruption(), Speaker()
    frames = [LLMFullResponseStartFrame(), *[LLMTextFrame(w + " ") for w in words[:-1]], LLMTextFrame(words[-1]),
              LLMFullResponseEndFrame(), SleepFrame(sleep=2.5), InterruptionFrame(), SleepFrame(sleep=0.5)]
    await run_test(Pipeline([mark, tts, speaker, pair.assistant()]), frames_to_send=frames)
    timed = [(w, s) for e in events if e.get("type") == "timestamps" for w, s in zip(e["words"], e["start"])]
    assert [w for w, _ in timed] == words[:len(timed)] and len(timed) >= 2, timed
    heard_s = mark.at - speaker.first_audio
    expected = [w for w, s in timed if s < heard_s]
    assistant = " ".join(m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]
                         for m in context.get_messages() if m["role"] == "assistant").split()
    assert assistant == words[:len(assistant)], assistant  # a prefix of the reply, in order
    # The words whose estimated start came before the interruption (give or take one: the clocks differ by
    # a few milliseconds), and not the whole reply that had been sent.
    assert abs(len(assistant) - len(expected)) <= 1, (assistant, heard_s, timed)
    assert 0 < len(assistant) < len(words)


@pytest.mark.asyncio
async def test_ws_voice_change_mid_reply_switches_at_the_next_sentence(server):
    tts = ws_service(server, text_aggregation_mode=TextAggregationMode.SENTENCE)
    sent = spy_sent(tts)
    frames = [LLMFullResponseStartFrame(), LLMTextFrame("Hello there. "), LLMTextFrame("How are"),
              SleepFrame(sleep=0.3), TTSUpdateSettingsFrame(delta=QwenTTSService.Settings(voice="vivian")),
              LLMTextFrame(" you today?"), LLMFullResponseEndFrame(), SleepFrame(sleep=0.5)]
    down, up = await run_test(tts, frames_to_send=frames)
    assert not [f for f in up if isinstance(f, ErrorFrame)], [f.error for f in up if isinstance(f, ErrorFrame)]
    configs = [m for m in sent if m["type"] == "config"]
    assert [c["voice"] for c in configs] == ["ryan", "vivian"]
    texts = {c["context_id"]: "".join(m["text"] for m in sent if m["type"] == "text"
                                      and m["context_id"] == c["context_id"]) for c in configs}
    assert list(texts.values()) == ["Hello there.", "How are you today?"]
    assert len(assert_started_audio_stopped(down)) == 1  # still one reply for Pipecat
    first, _ = await ws_reference_audio(server, ["Hello there."], voice="ryan", language=LANGUAGE, seed=7,
                                        max_new_tokens=SHORT)
    second, _ = await ws_reference_audio(server, ["How are you today?"], voice="vivian", language=LANGUAGE, seed=7,
                                         max_new_tokens=SHORT)
    assert audio_of(down) == first + second  # in order, each in its voice


async def active_streams(server) -> int:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{server.base_url}/health") as r:
            return (await r.json())["active_streams"]


@pytest.mark.asyncio
async def test_ws_llm_stall_longer_than_the_audio_timeout_still_speaks_the_end_and_frees_the_slot(server):
    tokens = ["Hello", " there,", " how", " are", " you", " today?"]
    tts = ws_service(server, max_new_tokens=60)
    events = spy_server_events(tts)
    frames = [LLMFullResponseStartFrame(), *[LLMTextFrame(t) for t in tokens[:3]], SleepFrame(sleep=4.0),
              *[LLMTextFrame(t) for t in tokens[3:]], SleepFrame(sleep=4.0), LLMFullResponseEndFrame(),
              SleepFrame(sleep=3.0)]  # the rest of the reply: generated after the flush
    down, up = await run_test(tts, frames_to_send=frames)
    assert not [f for f in up if isinstance(f, ErrorFrame)], [f.error for f in up if isinstance(f, ErrorFrame)]
    done = [e for e in events if e.get("type") == "audio_done"]
    assert len(done) == 1 and done[0]["stop_reason"] in ("eos", "max_new_tokens"), events
    expected, _ = await ws_reference_audio(server, ["".join(tokens)], voice=VOICE, language=LANGUAGE, seed=7,
                                           max_new_tokens=60)
    assert audio_of(down) == expected  # the last word (only committed by the flush) was spoken
    assert_started_audio_stopped(down)  # every started pair stopped, across Pipecat's timeout
    assert await active_streams(server) == 0


@pytest.mark.asyncio
async def test_ws_context_cut_by_a_reconnect_still_ends_with_tts_stopped(server):
    tts = ws_service(server, max_new_tokens=VERY_LONG)

    async def drop_connection():
        await asyncio.sleep(1.5)
        await tts._websocket.close()  # as a network failure would: the server cancels the connection's contexts

    async def run():
        dropper = asyncio.create_task(drop_connection())
        result = await run_test(tts, frames_to_send=[TTSSpeakFrame(VERY_LONG_TEXT), SleepFrame(sleep=3.0),
                                                     TTSSpeakFrame("Second."), SleepFrame(sleep=1.0)])
        await dropper
        return result

    down, _ = await run()
    contexts = assert_started_audio_stopped(down)  # the cut context ended with its TTSStoppedFrame
    assert len(contexts) == 2  # and the service spoke the next one on the new connection
    assert len(audio_of([f for f in down if getattr(f, "context_id", None) == contexts[0]])) < VERY_LONG * 1920 * 2


@pytest.mark.asyncio
async def test_http_forwards_sampling_and_instruction_settings(server):
    tts = QwenHttpTTSService(base_url=server.base_url,
                             settings=settings(QwenHttpTTSService, temperature=0.5, top_k=3, top_p=0.8,
                                               repetition_penalty=1.2))
    down, _ = await run_test(tts, frames_to_send=[TTSSpeakFrame(TEXT)])
    expected = await http_reference_audio(server, TEXT, speaker=VOICE, language=LANGUAGE, seed=7,
                                          max_new_tokens=SHORT, temperature=0.5, top_k=3, top_p=0.8,
                                          repetition_penalty=1.2)
    default = await http_reference_audio(server, TEXT, speaker=VOICE, language=LANGUAGE, seed=7, max_new_tokens=SHORT)
    assert audio_of(down) == expected != default
    # The tiny 0.6B CustomVoice model takes no instructions: the server's 400 names the field it was sent.
    tts = QwenHttpTTSService(base_url=server.base_url, settings=settings(QwenHttpTTSService, instructions="softly"))
    _, up = await run_test(tts, frames_to_send=[TTSSpeakFrame(TEXT)])
    errors = [f.error for f in up if isinstance(f, ErrorFrame)]
    assert len(errors) == 1 and "instructions" in errors[0], errors


@pytest.mark.asyncio
async def test_ws_server_error_is_one_error_frame_per_reply(server):
    tts = ws_service(server, voice="nobody", text_aggregation_mode=TextAggregationMode.SENTENCE)
    frames = [LLMFullResponseStartFrame(), LLMTextFrame("Hello there. "), LLMTextFrame("How are you? "),
              LLMTextFrame("Fine."), LLMFullResponseEndFrame(), SleepFrame(sleep=1.0)]
    down, up = await run_test(tts, frames_to_send=frames)
    errors = [f.error for f in up if isinstance(f, ErrorFrame)]
    assert len(errors) == 1 and "nobody" in errors[0], errors
    assert not [f for f in down if isinstance(f, TTSAudioRawFrame)]
