"""vLLM-Omni's streaming TTS WebSocket protocol, served on /v1/audio/speech/stream beside ours.

A client configured for a vLLM-Omni deployment (its own examples, LiveKit's `baseten.TTS(model="qwen3-tts")`)
changes only the host. The two protocols share the path and are told apart by the socket's first message: a
`type` of `session.config`, `input.text`, `input.done`, `session.close`, `voice.list` or `voice.add` starts an
`OmniSession`, anything else our own session (app.WsSession).

    client -> server                                  server -> client
    {"type":"session.config", voice, language, ...}   (nothing; an error for a bad config)
    {"type":"input.text","text":"Hel"}  (repeated)    {"type":"audio.start","utterance_index":0,"sentence_index":0,
                                                        "sentence_text","format":"pcm","sample_rate","channels"}
                                                      binary: PCM16LE mono 24 kHz (stream_audio) ...
    {"type":"input.done"}                             {"type":"audio.done","utterance_index","sentence_index",
                                                        "total_bytes","error", ...}
                                                      {"type":"session.done","utterance_index","total_sentences"}
    {"type":"session.close"}                          the socket closes
    {"type":"voice.list"}                             {"type":"voice.list","voices","uploaded_voices","languages"}
    {"type":"voice.add","name","consent",             {"type":"voice.add","success":true,"voice":{...}} (Base models)
     "audio_data","ref_text"}

An utterance (the text between two `input.done`) is one engine stream of the same kind as one of our WebSocket
contexts: it opens at the first text, speaks from the first word while text still arrives, and its audio is
byte-for-byte what our protocol gives for the same text, voice and seed. `input.done` is a flush, not a close;
the session config is sticky and may be replaced between utterances. Errors are `{"type":"error","message"}`;
a bad first config closes the socket after its error (as vLLM-Omni does), a later one keeps the previous config.
docs/server.md lists the fields and what is refused.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from dataclasses import dataclass, field

from fastapi import WebSocket

from ..engine import EngineUnavailable, Synthesizer, pick_seed
from ..live import LiveUtterance
from ..prompt import PromptError
from ..voices import VoiceError, check_voice_name, library_for
from ..word_timing import WordTimeline
from .audio_formats import RESPONSE_FORMATS, AudioEncoder
from .metrics import ServerMetrics
from .output_format import OutputFormat, StreamOutput
from .stream_log import log_stream
from .protocol import BadRequest, ServerSettings, SpeechParams, StreamedText, Validator, parse_json, shown
from .voices_api import cloner_for
from .worker import EngineWorker, LiveJob, QueueFull
from .ws_limits import ClientStreams, SessionRegistry, client_address

OMNI_MESSAGE_TYPES = ("session.config", "input.text", "input.done", "session.close", "voice.list", "voice.add")
TASK_TYPES = {"custom_voice": "CustomVoice", "voice_design": "VoiceDesign", "base": "Base"}
# Fields taken as they are, with our validation (protocol.Validator).
SPEECH_FIELDS = ("model", "voice", "speaker", "language", "instructions", "seed", "max_new_tokens", "temperature",
                 "top_k", "top_p", "repetition_penalty")
# Fields that ask for what this server does not do: refused unless null or the value that changes nothing.
UNSUPPORTED = {
    "ref_audio": (None,), "ref_text": (None,), "speaker_embedding": (None,), "references": (None,),
    "x_vector_only_mode": (None, False), "non_streaming_mode": (None, False), "word_timestamps": (None, False),
    "initial_codec_chunk_frames": (None, 0, 1),
}
ACCEPTED_FIELDS = set(SPEECH_FIELDS) | set(UNSUPPORTED) | {
    "type", "task_type", "response_format", "speed", "stream_audio", "split_granularity", "timestamp_type",
    "timestamp_transport_strategy"}
WHY_UNSUPPORTED = {
    "ref_audio": "inline cloning is not supported: store the voice once (POST /v1/audio/voices on a Base model) "
                 "and pass its name as 'voice'",
    "non_streaming_mode": "text is streamed into the interleaved layout here (non_streaming_mode false)",
    "word_timestamps": "forced-aligner timestamps are not available; ask for timestamp_type 'word' to get "
                       "estimated word times in audio.done",
    "initial_codec_chunk_frames": "the first chunk is always one 80 ms frame here",
}
REFUSED_CONSENT = ("", "false", "0", "no", "off")
QUEUED_MESSAGES = 256  # messages read ahead while an utterance is spoken (then TCP backpressure)


def first_message_is_omni(message: dict, settings: ServerSettings) -> bool:
    """Whether the first ASGI message of a socket opens a vLLM-Omni session."""
    text = message.get("text")
    if message.get("type") != "websocket.receive" or not isinstance(text, str):
        return False
    if len(text) > settings.max_ws_message_bytes:
        return False
    try:
        msg = parse_json(text, settings)
    except BadRequest:
        return False
    return isinstance(msg, dict) and msg.get("type") in OMNI_MESSAGE_TYPES


class FirstMessageReplay:
    """The socket, with its already-read first message given again by the first receive()."""

    def __init__(self, websocket: WebSocket, first: dict):
        self._ws, self._first = websocket, first

    async def receive(self) -> dict:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return await self._ws.receive()

    def __getattr__(self, name):
        return getattr(self._ws, name)


@dataclass
class OmniConfig:
    params: SpeechParams
    response_format: str = "wav"
    stream_audio: bool = False
    word_times: bool = False  # Baseten's timestamp_type "word": estimated word times in audio.done


class OmniConfigParser:
    """A `session.config` message -> OmniConfig, or BadRequest naming the field (vLLM-Omni's field names)."""

    def __init__(self, synth: Synthesizer, validator: Validator):
        self.synth, self.validator = synth, validator

    def parse(self, msg: dict) -> OmniConfig:
        unknown = sorted(set(msg) - ACCEPTED_FIELDS)
        if unknown:
            raise BadRequest(unknown[0], f"unknown session.config field {shown(unknown[0])}; accepted: "
                                         f"{', '.join(sorted(ACCEPTED_FIELDS - {'type'}))}")
        for name, harmless in UNSUPPORTED.items():
            if msg.get(name) not in harmless:
                why = WHY_UNSUPPORTED.get(name, WHY_UNSUPPORTED["ref_audio"])
                raise BadRequest(name, f"'{name}' {shown(msg.get(name))} is not supported: {why}")
        self.task_type(msg.get("task_type"))
        response_format = self.validator.choice(msg, "response_format", RESPONSE_FORMATS, "wav")
        stream_audio = self.boolean(msg, "stream_audio")
        if stream_audio and response_format != "pcm":
            raise BadRequest("response_format", "stream_audio=true requires response_format 'pcm', got "
                                                f"{shown(response_format)}")
        self.validator.choice(msg, "split_granularity", ("none", "sentence", "clause"), "none")
        word_times = self.validator.choice(msg, "timestamp_type", ("word", "none"), "none") == "word"
        self.validator.choice(msg, "timestamp_transport_strategy", ("sync",), "sync")
        speed = self.validator.speed(msg)
        speech = {k: v for k, v in msg.items() if k in SPEECH_FIELDS}
        if "speaker" in speech and speech.get("voice") is None:
            speech["voice"] = speech.pop("speaker")
        self.validator.model(speech)
        params = self.validator.ws_config(speech)
        params.output = OutputFormat(speed=speed)  # the time stretch (output_format.py)
        return OmniConfig(params, response_format, stream_audio, word_times)

    def task_type(self, value) -> None:
        mine = TASK_TYPES.get(self.synth.config.model_type, self.synth.config.model_type)
        if value is not None and value != mine:
            raise BadRequest("task_type", f"'task_type' {shown(value)} does not match the served model: it is a "
                                          f"{mine} model")

    @staticmethod
    def boolean(msg: dict, name: str) -> bool:
        value = msg.get(name, False)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise BadRequest(name, f"'{name}' must be true or false, got {shown(value)}")
        return value


@dataclass
class OmniUtterance:
    """The text between two input.done: one engine stream, opened at its first non-blank text."""

    index: int
    config: OmniConfig
    text: StreamedText
    words: WordTimeline
    received: str = ""  # the text passed on so far
    job: LiveJob | None = None
    pump: asyncio.Task | None = None
    failed: bool = False  # it could not open (server full): the rest of its text is dropped
    cancelled: bool = False
    flushed_at: float | None = None
    last_word: float = field(default_factory=time.monotonic)  # the latest text with a word in it
    holds_client_slot: bool = False  # counted in its client's max_client_streams until its job ends
    total_bytes: int = 0
    done: dict | None = None  # the engine's JobInfo as a dict
    word_times: list = field(default_factory=list)


class OmniSession:
    """One socket of the vLLM-Omni protocol. A reader task takes messages off the socket (so a disconnect or a
    close is seen while audio goes out); the session handles them in order, one utterance at a time."""

    def __init__(self, ws: WebSocket, synth: Synthesizer, worker: EngineWorker, validator: Validator,
                 metrics: ServerMetrics, settings: ServerSettings, *, client_streams: ClientStreams | None = None,
                 sessions: SessionRegistry | None = None):
        self.ws, self.synth, self.worker, self.validator = ws, synth, worker, validator
        self.metrics, self.settings = metrics, settings
        # The same limits as our WebSocket (server/ws_limits.py): slots per client, and the shutdown drain.
        self.client_streams = client_streams or ClientStreams(settings.max_client_streams)
        self.sessions = sessions or SessionRegistry()
        self.client = client_address(ws)
        self.draining = False
        self.parser = OmniConfigParser(synth, validator)
        self.config: OmniConfig | None = None
        self.utterance: OmniUtterance | None = None
        self.utterance_index = 0
        self.inbox: asyncio.Queue = asyncio.Queue(QUEUED_MESSAGES)
        self.closed = False
        self.send_lock = asyncio.Lock()

    # Sending ----------------------------------------------------------------------------------------------------

    async def send_json(self, obj: dict) -> None:
        if not self.closed:
            async with self.send_lock:
                await self.ws.send_text(json.dumps(obj))

    async def send_bytes(self, data: bytes) -> None:
        if not self.closed:
            async with self.send_lock:
                await self.ws.send_bytes(data)

    async def error(self, message: str) -> None:
        self.metrics.errors_total.labels(kind="ws_protocol").inc()
        await self.send_json({"type": "error", "message": message})

    # The session ------------------------------------------------------------------------------------------------

    @property
    def contexts(self) -> list:
        """The utterance being spoken, if any (what a shutdown drain waits for)."""
        u = self.utterance
        return [u] if u is not None and u.job is not None and not u.job.finished else []

    async def cut_contexts(self, grace_s: float) -> None:
        """At shutdown, after the grace period: the utterance left gets an `error`; its audio.done follows."""
        for u in self.contexts:
            await self.error(f"the server is shutting down: utterance {u.index} did not finish within the "
                             f"{grace_s:g} s grace period and was cut")
            u.cancelled = True
            u.job.cancel()

    async def run(self, first: dict) -> None:
        reader = asyncio.create_task(self.read())
        self.sessions.add(self)
        try:
            message: dict | None = first
            while message is not None:
                if not await self.handle(message):
                    break
                message = await self.next_message()
        except Exception:  # noqa: BLE001 - the socket is gone
            pass
        finally:
            self.sessions.discard(self)
            self.closed = True
            reader.cancel()
            self.drop_utterance()
            try:
                await self.ws.close()
            except Exception:  # noqa: BLE001 - already closed
                pass

    async def read(self) -> None:
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                await self.inbox.put(message)
        except Exception:  # noqa: BLE001 - socket gone
            pass
        self.closed = True
        self.drop_utterance()
        await self.inbox.put(None)

    async def next_message(self) -> dict | None:
        """The next message, or None when the socket is gone or idle past ws_idle_flush_s (an error is sent). While
        an utterance is open the time counts from its latest word, so text trickled a character at a time cannot
        hold its stream slot for longer."""
        idle = self.settings.ws_idle_flush_s
        u = self.utterance
        wait = idle if u is None or u.job is None else max(0.0, u.last_word + idle - time.monotonic())
        try:
            return await asyncio.wait_for(self.inbox.get(), wait)
        except asyncio.TimeoutError:
            await self.error(f"Idle timeout: no new word in {idle:g} s")
            return None

    def drop_utterance(self) -> None:
        u = self.utterance
        if u is not None and u.job is not None and not u.job.finished:
            u.cancelled = True
            u.job.cancel()

    async def handle(self, message: dict) -> bool:
        """Handles one message; False ends the session."""
        text = message.get("text")
        if text is None:
            await self.error("binary messages are not accepted: send JSON text messages")
            return True
        try:
            msg = parse_json(text, self.settings)
        except BadRequest as exc:
            await self.error(exc.message)
            return self.config is not None
        if not isinstance(msg, dict):
            await self.error("WebSocket messages must be JSON objects")
            return self.config is not None
        kind = msg.get("type")
        if kind == "session.config":
            return await self.configure(msg)
        if kind == "voice.list":
            await self.send_json(self.voice_list())
            return True
        if kind == "voice.add":
            await self.add_voice(msg)
            return True
        if kind == "session.close":
            return False
        if self.config is None:
            await self.error(f"Expected session.config, got: {shown(kind)}")
            return False
        if kind == "input.text":
            await self.add_text(msg.get("text", ""))
        elif kind == "input.done":
            await self.finish_utterance()
        else:
            await self.error(f"Unknown message type: {shown(kind)}")
        return True

    async def configure(self, msg: dict) -> bool:
        if self.utterance is not None:
            await self.error("session.config cannot be applied while an utterance is in progress; send input.done "
                             "first")
            return True
        try:
            self.config = self.parser.parse(msg)
        except BadRequest as exc:
            await self.error(f"Invalid session config: {exc.message}")
            return self.config is not None
        return True

    def voice_list(self) -> dict:
        stored = []
        if self.synth.config.model_type == "base":
            library = library_for(self.synth)
            stored = [m["name"] for m in library.list() if m.get("speaker_encoder") == library.fingerprint]
        return {"type": "voice.list", "voices": sorted(self.synth.config.speakers), "uploaded_voices": stored,
                "languages": self.synth.languages}

    async def add_voice(self, msg: dict) -> None:
        """Baseten's voice.add: {name, consent, audio_data (base64 of a clip file), audio_format, ref_text} -> the
        same cloning as POST /v1/audio/voices (Base models), answered {"type": "voice.add", "success", "voice"}."""
        if self.synth.config.model_type != "base":
            await self.error(f"voice.add: this model ({self.synth.config.model_type}) cannot clone voices: serve a "
                             "Base model")
            return
        consent = msg.get("consent")
        if consent is not True and (not isinstance(consent, str) or consent.strip().lower() in REFUSED_CONSENT):
            await self.error("voice.add: 'consent' must be given (true, or the consent record's id): confirm that "
                             "the speaker agreed to have their voice cloned")
            return
        transcript = msg.get("ref_text")
        try:
            name = check_voice_name(msg.get("name"))
            if transcript is not None and not isinstance(transcript, str):
                raise VoiceError("ref_text", "'ref_text' must be text")
            if name in library_for(self.synth):
                raise VoiceError("name", f"a voice named {name!r} already exists")
            try:
                data = base64.b64decode(msg.get("audio_data") or "", validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise VoiceError("audio_data", "'audio_data' must be the clip file in base64") from None
            meta = await cloner_for(self.synth).add(name, data, transcript or None)
        except (VoiceError, PromptError) as exc:
            await self.error(f"voice.add: {exc}")
            return
        await self.send_json({"type": "voice.add", "success": True, "voice": meta})

    # Utterances -------------------------------------------------------------------------------------------------

    async def add_text(self, delta) -> None:
        if not isinstance(delta, str):
            await self.error("input.text requires a string value")
            return
        u = self.utterance
        if u is None:
            u = self.utterance = OmniUtterance(
                self.utterance_index, self.config,
                StreamedText(self.synth.tokenizer, self.settings.max_text_chars, self.settings.max_text_tokens),
                WordTimeline(self.synth.tokenizer.encode_user))
        if u.failed:
            return
        try:
            piece = u.text.add(delta)
        except BadRequest as exc:
            await self.error(exc.message)
            return
        u.received += piece
        if any(ch.isalnum() for ch in piece):
            u.last_word = time.monotonic()
        if u.job is None:
            if not u.received.strip():
                return  # blank so far: the stream opens with the first word
            if not await self.open(u):
                return
            piece = u.received
        if piece:
            u.job.add_text(piece)
            u.words.add_text(piece)

    async def open(self, u: OmniUtterance) -> bool:
        if self.draining:
            u.failed = True
            await self.error("the server is shutting down: no new utterance")
            return False
        if not self.client_streams.acquire(self.client):
            u.failed = True
            self.metrics.errors_total.labels(kind="queue_full").inc()
            await self.error(f"this client has {self.client_streams.limit} streams speaking or waiting for a slot, "
                             "the limit; let one finish before starting another")
            return False
        u.holds_client_slot = True
        if not await self._open_job(u):
            self.release_client_slot(u)
            return False
        return True

    def release_client_slot(self, u: OmniUtterance) -> None:
        if u.holds_client_slot:
            u.holds_client_slot = False
            self.client_streams.release(self.client)

    async def _open_job(self, u: OmniUtterance) -> bool:
        params = u.config.params
        try:
            utterance = LiveUtterance(self.synth, voice=params.voice, language=params.language,
                                      instruct=params.instruct, seed=pick_seed(params.seed),
                                      max_new_tokens=params.max_new_tokens, **params.sampling)
        except (PromptError, ValueError, TypeError) as exc:
            u.failed = True
            await self.error(str(exc))
            return False
        job = LiveJob(self.synth, asyncio.get_running_loop(), utterance=utterance, endpoint="omni_ws",
                      max_buffered_chunks=self.settings.max_buffered_chunks)
        try:
            self.worker.submit(job)
        except (QueueFull, EngineUnavailable):
            u.failed = True
            self.metrics.errors_total.labels(kind="queue_full").inc()
            await self.error("the server is at capacity; retry this utterance shortly")
            return False
        u.job = job
        u.pump = asyncio.create_task(self.pump(u))
        return True

    async def finish_utterance(self) -> None:
        """input.done: speak what is left, wait for the audio, close the utterance (session.done)."""
        u = self.utterance
        index = self.utterance_index
        self.utterance_index += 1
        sentences = 0
        if u is not None:
            try:
                u.text.finish()
            except BadRequest as exc:
                await self.error(exc.message)
            if u.job is not None:
                sentences = 1
                await self.speak_to_end(u)  # self.utterance stays set: a disconnect meanwhile cancels it
            elif u.failed:
                sentences = 1
                await self.send_json(self.start_message(u))
                await self.send_json(self.done_message(u))
            self.utterance = None
        await self.send_json({"type": "session.done", "utterance_index": index, "total_sentences": sentences})

    async def speak_to_end(self, u: OmniUtterance) -> None:
        u.flushed_at = time.monotonic()
        u.job.request_flush()
        u.words.flush()
        limit = self.settings.queue_timeout_s
        while not u.pump.done():
            await asyncio.wait({u.pump}, timeout=min(1.0, limit / 4))
            if not u.pump.done() and u.job.started is None and time.monotonic() - u.flushed_at > limit:
                await self.error(f"no stream slot came free within {limit:g} s of input.done; the utterance is "
                                 "cancelled, retry it")
                u.failed = True
                u.job.cancel()
        await u.pump

    def start_message(self, u: OmniUtterance) -> dict:
        msg = {"type": "audio.start", "utterance_index": u.index, "sentence_index": 0, "sentence_text": u.received,
               "format": u.config.response_format}
        if u.config.stream_audio:
            msg.update(sample_rate=self.synth.sample_rate, channels=1)
        return msg

    def done_message(self, u: OmniUtterance) -> dict:
        msg = {"type": "audio.done", "utterance_index": u.index, "sentence_index": 0, "total_bytes": u.total_bytes,
               "error": u.failed}
        speed = u.config.params.output.speed  # times in the stretched audio
        if u.done is not None:
            reason = "cancelled" if u.cancelled else u.done.stop_reason
            msg.update(stop_reason=reason, frames=u.done.frames,
                       audio_seconds=round(u.done.audio_seconds / speed, 4), seed=u.done.seed)
        if u.config.word_times:
            msg["timestamp_info"] = {"word_alignment": {
                "words": [w.word for w in u.word_times],
                "word_start_times_seconds": [round(w.start / speed, 3) for w in u.word_times],
                "word_end_times_seconds": [round(w.end / speed, 3) for w in u.word_times]}}
        return msg

    async def pump(self, u: OmniUtterance) -> None:
        """The utterance's engine events -> audio.start, audio (binary), audio.done."""
        encoder = AudioEncoder(u.config.response_format, self.synth.sample_rate)
        output = StreamOutput(u.config.params.output, self.synth.sample_rate)
        whole = bytearray()  # stream_audio false: one binary message at the end, as vLLM-Omni sends it
        started = False
        audio_seconds = 0.0
        try:
            if not u.config.stream_audio:
                started = True
                await self.send_json(self.start_message(u))
            while True:
                kind, payload = await u.job.next_event()
                if kind == "chunk":
                    if u.cancelled:
                        continue
                    audio_seconds += len(payload.pcm) / self.synth.sample_rate
                    u.word_times += u.words.due(audio_seconds)
                    data = encoder.encode(output.process(payload.pcm))
                    if u.config.stream_audio:
                        if not started:
                            started = True
                            await self.send_json(self.start_message(u))
                        if data:  # (a time stretch may hold a chunk's audio back)
                            u.total_bytes += len(data)
                            await self.send_bytes(data)
                    else:
                        whole += data
                elif kind == "error":
                    u.failed = True
                    await self.error(f"Generation failed for utterance {u.index}: {payload}")
                elif kind == "done":
                    u.done = payload
                    u.word_times += u.words.finish(audio_seconds, payload.stop_reason == "eos" and not u.cancelled)
                    log_stream(u.job, payload, reason="cancelled" if u.cancelled else None)
                    rest = encoder.encode(output.finish()) + encoder.finish()
                    if u.config.stream_audio and rest and not u.cancelled:  # the stretch's look-ahead
                        u.total_bytes += len(rest)
                        await self.send_bytes(rest)
                    elif not u.config.stream_audio:
                        whole += rest
                    if not started:
                        await self.send_json(self.start_message(u))
                    if not u.config.stream_audio and not u.cancelled:
                        u.total_bytes = len(whole)
                        await self.send_bytes(bytes(whole))
                    await self.send_json(self.done_message(u))
                    return
        except Exception:  # noqa: BLE001 - socket gone
            u.job.cancel()
        finally:
            self.release_client_slot(u)
            encoder.close()
