"""Pipecat TTS over the server's WebSocket (WS /v1/audio/speech/stream): streamed text in, audio by context id out.

Protocol (client -> server, JSON):
    {"type": "config", "context_id", "voice", "language", "instructions", "seed", "max_new_tokens", "speed",
     "sample_rate" (the pipeline's, when the server offers it), sampling...}
    {"type": "text", "context_id", "text"}      text delta, appended verbatim
    {"type": "flush", "context_id"}             no more text: finish speaking
    {"type": "cancel", "context_id"}            stop now
server -> client: {"type": "audio_start", ...}, binary [1 byte N][N bytes context id][PCM16LE mono],
    {"type": "timestamps", "context_id", "words", "start", "end"} (estimated, seconds of that context's audio),
    {"type": "audio_done", "context_id", "stop_reason", ...}, {"type": "error", "context_id" or null, "message"}

One Pipecat audio context (an LLM reply, a TTSSpeakFrame) is spoken by one server context, or by several in turn
when a setting changes mid-reply: the change takes effect at the next sentence, which opens a new server context
(its audio is held until the previous one's has played). The service keeps its own record of the server contexts
it opened, and flushes and cancels from that record, so a context Pipecat closed early (its 3 s audio timeout
during an LLM stall) is still flushed at the end of the turn, its last words are still played and its server
slot is freed; an interruption cancels it too.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field
from typing import AsyncGenerator
from urllib.parse import urlsplit, urlunsplit

from loguru import logger
from pipecat.frames.frames import (CancelFrame, EndFrame, ErrorFrame, Frame, InterruptionFrame, TTSAudioRawFrame,
                                   TTSStartedFrame, TTSStoppedFrame)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessorSetup
from pipecat.services.settings import TTSSettings
from pipecat.services.tts_service import TextAggregationMode, WebsocketTTSService
from pipecat.transcriptions.language import Language
from pipecat.utils.tracing.service_decorators import traced_tts
from websockets.protocol import State

from ._common import (PCMStream, QwenTTSSettings, ReportsErrorsOnce, auth_headers,
                      default_settings, given, qwen_language, request_fields, wire_rate)

WS_PATH = "/v1/audio/speech/stream"

# The end of a sentence: terminal punctuation, maybe closing quotes or brackets, maybe whitespace.
_SENTENCE_END = re.compile(r"[.!?。！？…]['\"”’)\]]*\s*$")


def websocket_url(base_url: str) -> str:
    """http://host:port -> ws://host:port/v1/audio/speech/stream (a ws:// URL with a path is kept as it is)."""
    parts = urlsplit(base_url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/")
    if not path:
        path = WS_PATH
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def parse_audio_message(message: bytes) -> tuple[str, bytes]:
    """[1 byte N][N bytes context id, UTF-8][PCM16LE] -> (context id, pcm)."""
    if not message:
        raise ValueError("empty binary message")
    n = message[0]
    if len(message) < 1 + n:
        raise ValueError("binary message shorter than its context id")
    return message[1:1 + n].decode("utf-8"), bytes(message[1 + n:])


@dataclass
class _ServerContext:
    """A context this service opened on the server."""

    id: str
    reply: "_Reply"
    settings_version: int
    pcm: PCMStream
    last_text: str = ""
    flushed: bool = False
    done: bool = False
    audio_seconds: float = 0.0  # of this context's audio played into Pipecat
    held: list = field(default_factory=list)  # ("audio", pcm) / ("words", message) while an earlier one plays


@dataclass
class _Reply:
    """One Pipecat audio context and the server contexts that speak it, in order (the first one plays)."""

    id: str
    segments: list[_ServerContext] = field(default_factory=list)
    ended: bool = False  # the turn is over: no more text will come
    closed_early: bool = False  # Pipecat closed its audio context (3 s without audio) before the reply ended
    audio_seconds: float = 0.0  # played into the current Pipecat audio context (restarts if it is reopened)


class QwenTTSService(ReportsErrorsOnce, WebsocketTTSService):
    """Streams text to a ``qwen-tts-mk serve`` server over one WebSocket and plays the audio it streams back.

    Text streams as the LLM produces it: in TOKEN mode (the default here) every LLM token goes to the server at
    once, and the server starts speaking after the first word while the rest of the reply is still being
    generated; SENTENCE mode sends whole sentences (joined with a space). Several contexts can be open on the one
    connection. The server's estimated word timings feed Pipecat's word timestamps, so after an interruption the
    assistant's context holds about what was heard.

    Example::

        tts = QwenTTSService(base_url="http://127.0.0.1:8001",
                             settings=QwenTTSService.Settings(voice="ryan", language=Language.EN))
    """

    Settings = QwenTTSSettings
    _settings: QwenTTSSettings

    def __init__(self, *, base_url: str = "http://127.0.0.1:8001", api_key: str | None = None,
                 settings: QwenTTSSettings | None = None,
                 text_aggregation_mode: TextAggregationMode | None = TextAggregationMode.TOKEN, **kwargs):
        """Args:
            base_url: the server's root URL (http://, https://, ws:// or wss://); the WebSocket path is added.
            api_key: the server's ``--api-key`` (sent as ``Authorization: Bearer`` on the handshake).
            settings: voice, language, instructions, seed, max_new_tokens, sampling.
            text_aggregation_mode: TOKEN (default: the server buffers text itself) or SENTENCE.
            **kwargs: passed to Pipecat's ``WebsocketTTSService`` (``sample_rate``, ``reconnect_on_error``, ...).
        """
        super().__init__(push_start_frame=True, push_stop_frames=False, push_text_frames=False,
                         pause_frame_processing=False, text_aggregation_mode=text_aggregation_mode,
                         settings=default_settings(self.Settings, settings, voice=None), **kwargs)
        self._url = websocket_url(base_url)
        self._api_key = api_key
        self._token_mode = text_aggregation_mode == TextAggregationMode.TOKEN
        self._receive_task: asyncio.Task | None = None
        self._replies: dict[str, _Reply] = {}  # by Pipecat context id
        self._server_contexts: dict[str, _ServerContext] = {}  # by server context id: the open ones
        self._settings_version = 0  # bumped by every settings change; a server context keeps the one it opened with
        self._failed: set[str] = set()  # Pipecat contexts of this turn that a server error ended: no more text

    def can_generate_metrics(self) -> bool:
        return True

    def language_to_service_language(self, language: Language) -> str | None:
        return qwen_language(language)

    async def _update_settings(self, delta: TTSSettings):
        changed = await super()._update_settings(delta)
        if changed:
            self._settings_version += 1  # takes effect at the next sentence (run_tts)
        return changed

    # Connection -------------------------------------------------------------------------------------------

    async def setup(self, setup: FrameProcessorSetup):
        await super().setup(setup)  # the output sample rate is known from here on
        await self._connect()

    async def stop(self, frame: EndFrame):
        await super().stop(frame)
        await self._disconnect()

    async def cancel(self, frame: CancelFrame):
        await super().cancel(frame)
        await self._disconnect()

    async def _connect(self):
        await super()._connect()
        if self._websocket is None or self._websocket.state is not State.OPEN:
            if self._receive_task:
                await self.cancel_task(self._receive_task)
                self._receive_task = None
        await self._connect_websocket()
        if self._websocket and not self._receive_task:
            self._receive_task = self.create_task(self._receive_task_handler(self._report_error))

    async def _disconnect(self):
        await super()._disconnect()  # first: closes open contexts and stops the reconnect loop
        if self._receive_task:
            await self.cancel_task(self._receive_task)
            self._receive_task = None
        await self._disconnect_websocket()

    async def _connect_websocket(self):
        try:
            if self._websocket and self._websocket.state is State.OPEN:
                return
            self._websocket = await self._websocket_connect(
                self._url, additional_headers=auth_headers(self._api_key), max_size=None)
            await self._call_event_handler("on_connected")
        except Exception as e:
            self._websocket = None
            await self.push_error(error_msg=f"Qwen TTS: cannot connect to {self._url}: {e}", exception=e)
            await self._call_event_handler("on_connection_error", f"{e}")

    async def _disconnect_websocket(self):
        try:
            await self.stop_all_metrics()
            if self._websocket:
                await self._websocket.close()
        except Exception as e:
            logger.warning(f"{self}: error closing the websocket: {e}")
        finally:
            self._websocket = None
            await self._drop_server_contexts()
            await self._call_event_handler("on_disconnected")

    async def _close_connection_contexts(self):
        # Pipecat ends every audio context of a connection that is going away (reconnect, disconnect); end the
        # replies first, so that each one's TTSStoppedFrame goes out before its context closes.
        for reply in list(self._replies.values()):
            await self._end_reply(reply)
        await super()._close_connection_contexts()

    async def _drop_server_contexts(self) -> None:
        """The connection is gone and the server cancelled its contexts: nothing more comes from them."""
        for seg in list(self._server_contexts.values()):
            seg.done = True
            await self._play(seg, ("done", None))
        self._server_contexts.clear()
        for reply in list(self._replies.values()):
            await self._advance(reply)

    async def _send(self, message: dict) -> None:
        if self._websocket is None:
            raise ConnectionError("Qwen TTS websocket is not connected")
        await self._websocket.send(json.dumps(message))

    # Text out ------------------------------------------------------------------------------------------------

    def _config_message(self, context_id: str) -> dict:
        s = self._settings
        return {"type": "config", "context_id": context_id, "voice": given(s.voice),
                "language": given(s.language) or "auto", "sample_rate": wire_rate(self.sample_rate),
                **request_fields(s)}

    def _segment_for(self, reply: _Reply) -> _ServerContext | None:
        """The server context that takes the reply's next text, or None when a new one must be opened: none is
        open, or the settings changed and the text so far ends a sentence."""
        current = reply.segments[-1] if reply.segments else None
        if current is None or current.flushed or current.done:
            return None
        if current.settings_version != self._settings_version and (
                not self._token_mode or _SENTENCE_END.search(current.last_text)):
            return None
        return current

    async def _open_segment(self, reply: _Reply) -> _ServerContext:
        for earlier in reply.segments:
            await self._flush_segment(earlier)
        n = len(reply.segments)
        seg = _ServerContext(id=reply.id if n == 0 else f"{reply.id}#{n}", reply=reply,
                             settings_version=self._settings_version,
                             pcm=PCMStream(wire_rate(self.sample_rate), self.sample_rate))
        reply.segments.append(seg)
        self._server_contexts[seg.id] = seg
        await self._send(self._config_message(seg.id))
        return seg

    @traced_tts
    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame | None, None]:
        if context_id in self._failed:  # its error was reported once; the rest of its text is dropped
            yield None
            return
        reply = self._replies.setdefault(context_id, _Reply(context_id))
        if self.audio_context_available(context_id):
            reply.closed_early = False  # Pipecat (re)opened it, with a TTSStartedFrame, for this text
        try:
            if self._websocket is None or self._websocket.state is not State.OPEN:
                await self._drop_server_contexts()
                await self._connect()
            seg = self._segment_for(reply)
            if seg is None or not seg.last_text:
                text = text.lstrip()  # a server context starts at its first word
            elif not self._token_mode and not seg.last_text[-1].isspace() and text[:1] and not text[0].isspace():
                text = " " + text  # sentences keep their separator
            if text:
                if seg is None:
                    seg = await self._open_segment(reply)
                await self._send({"type": "text", "context_id": seg.id, "text": text})
                seg.last_text = text
                await self.start_tts_usage_metrics(text)
        except Exception as e:
            yield ErrorFrame(error=f"Qwen TTS: cannot send text: {e}", exception=e)
            await self.stop_all_metrics()
            self._failed.add(context_id)
            self.error_reported(context_id)
            await self._end_reply(reply)
            return
        yield None

    async def _flush_segment(self, seg: _ServerContext) -> None:
        if seg.flushed or seg.done or self._websocket is None:
            return
        seg.flushed = True
        try:
            await self._send({"type": "flush", "context_id": seg.id})
        except Exception as e:
            logger.warning(f"{self}: flush of {seg.id} failed: {e}")

    async def flush_audio(self, context_id: str | None = None):
        context_id = context_id or self.get_active_audio_context_id()
        reply = self._replies.get(context_id) if context_id else None
        if reply is None:
            return
        reply.ended = True
        for seg in reply.segments:
            await self._flush_segment(seg)
        await self._advance(reply)

    async def on_turn_context_completed(self):
        # Pipecat flushes only a context it still holds; this service flushes from its own record, so a reply
        # whose audio context timed out during an LLM stall still gets its last words spoken and its slot freed.
        turn = self._turn_context_id
        await super().on_turn_context_completed()
        if turn in self._replies and not self._replies[turn].ended:
            await self.flush_audio(turn)
        self._failed.discard(turn)

    async def on_audio_context_completed(self, context_id: str):
        await super().on_audio_context_completed(context_id)
        reply = self._replies.get(context_id)
        if reply is not None and not reply.closed_early:
            # Pipecat gave up waiting (an LLM stall): close the started/stopped pair now; the reply's later audio
            # opens a new one.
            reply.closed_early = True
            await self.push_frame(TTSStoppedFrame(context_id=context_id))

    async def _cancel_reply(self, reply: _Reply) -> None:
        for seg in reply.segments:
            self._server_contexts.pop(seg.id, None)
            if not seg.done and self._websocket is not None:
                try:
                    await self._send({"type": "cancel", "context_id": seg.id})
                except Exception as e:
                    logger.warning(f"{self}: cancel of {seg.id} failed: {e}")
        self._replies.pop(reply.id, None)

    async def on_audio_context_interrupted(self, context_id: str):
        await self.stop_all_metrics()
        if context_id in self._replies:
            await self._cancel_reply(self._replies[context_id])
        await super().on_audio_context_interrupted(context_id)

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, InterruptionFrame):
            # Replies Pipecat no longer holds (timed out in an LLM stall) are cut too.
            for reply in list(self._replies.values()):
                if not self.audio_context_available(reply.id):
                    await self._cancel_reply(reply)

    # Audio in ------------------------------------------------------------------------------------------------

    async def _receive_messages(self):
        async for message in self._websocket:
            if isinstance(message, (bytes, bytearray, memoryview)):
                await self._on_audio(bytes(message))
            else:
                await self._on_event(json.loads(message))

    async def _on_audio(self, message: bytes):
        try:
            context_id, pcm = parse_audio_message(message)
        except (ValueError, UnicodeDecodeError) as e:
            logger.warning(f"{self}: malformed audio message: {e}")
            return
        seg = self._server_contexts.get(context_id)
        if seg is None:
            return  # a cancelled or finished context: late audio is dropped
        await self._play(seg, ("audio", pcm))

    async def _play(self, seg: _ServerContext, item: tuple) -> None:
        """Play an item of a server context into its Pipecat audio context, or hold it while an earlier server
        context of the same reply is still playing."""
        reply = seg.reply
        if reply.segments[0] is not seg:
            seg.held.append(item)
            return
        kind, payload = item
        if kind == "audio":
            pcm = await seg.pcm.push(payload)
            seconds = len(payload) / 2 / seg.pcm.in_rate
            await self._append_audio(reply, pcm)
            seg.audio_seconds += seconds
            reply.audio_seconds += seconds
        elif kind == "words":
            await self._reopen_if_closed(reply)
            # Server times count from this server context's first audio; Pipecat's from its audio context's.
            offset = reply.audio_seconds - seg.audio_seconds
            words = [(w, max(0.0, offset + t)) for w, t in zip(payload["words"], payload["start"])]
            await self.add_word_timestamps(words, reply.id)
        elif kind == "done":
            await self._append_audio(reply, await seg.pcm.finish())

    async def _reopen_if_closed(self, reply: _Reply) -> None:
        """A reply whose Pipecat audio context was closed early still owes its audio: open a new one for it."""
        if not self.audio_context_available(reply.id):
            await self.create_audio_context(reply.id)
            await self.append_to_audio_context(reply.id, TTSStartedFrame(context_id=reply.id))
            reply.closed_early = False
            reply.audio_seconds = 0.0

    async def _append_audio(self, reply: _Reply, pcm: bytes):
        if pcm:
            await self._reopen_if_closed(reply)
            await self.append_to_audio_context(
                reply.id, TTSAudioRawFrame(audio=pcm, sample_rate=self.sample_rate, num_channels=1,
                                           context_id=reply.id))

    async def _advance(self, reply: _Reply) -> None:
        """Drop finished server contexts from the front, play what the next one holds, and end the reply when its
        turn is over and all its audio has played."""
        while reply.segments and reply.segments[0].done:
            reply.segments.pop(0)
            if reply.segments:
                nxt = reply.segments[0]
                held, nxt.held = nxt.held, []
                for item in held:
                    await self._play(nxt, item)
        if not reply.segments and reply.ended:
            await self._end_reply(reply)

    async def _end_reply(self, reply: _Reply) -> None:
        """TTSStoppedFrame and the end of the Pipecat audio context; forget the reply's server contexts."""
        self._replies.pop(reply.id, None)
        for seg in reply.segments:
            self._server_contexts.pop(seg.id, None)
        if self.audio_context_available(reply.id):
            await self.append_to_audio_context(reply.id, TTSStoppedFrame(context_id=reply.id))
            await self.remove_audio_context(reply.id)

    async def _on_event(self, msg: dict):
        kind = msg.get("type")
        seg = self._server_contexts.get(msg.get("context_id"))
        if kind == "timestamps":
            if seg is not None and msg.get("words"):
                await self._play(seg, ("words", msg))
        elif kind == "audio_done":
            if seg is None:
                return
            logger.debug(f"{self}: context {seg.id} done: {msg.get('stop_reason')}, {msg.get('audio_seconds')} s "
                         f"of audio, first audio after {msg.get('time_to_first_audio_ms')} ms")
            await self._play(seg, ("done", None))  # held with the rest if an earlier one still plays
            seg.done = True
            self._server_contexts.pop(seg.id, None)
            await self._advance(seg.reply)
        elif kind == "error":
            await self.stop_all_metrics()
            await self.push_error(error_msg=f"Qwen TTS server error: {msg.get('message', msg)}")
            if seg is not None:
                self._failed.add(seg.reply.id)
                self.error_reported(seg.reply.id)
                await self._cancel_reply(seg.reply)
                await self._end_reply(seg.reply)
        elif kind != "audio_start":
            logger.debug(f"{self}: ignoring message {msg}")
