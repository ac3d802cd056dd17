"""Pipecat TTS over the server's WebSocket (WS /v1/audio/speech/stream): streamed text in, audio by context id out.

Protocol (client -> server, JSON):
    {"type": "config", "context_id", "voice", "language", "instructions", "seed", "max_new_tokens", "temperature"}
    {"type": "text", "context_id", "text"}      text delta, appended verbatim
    {"type": "flush", "context_id"}             no more text: finish speaking
    {"type": "cancel", "context_id"}            stop now
server -> client: {"type": "audio_start", ...}, binary [1 byte N][N bytes context id][PCM16LE mono],
    {"type": "audio_done", "context_id", "stop_reason", ...}, {"type": "error", "context_id" or null, "message"}

One Pipecat audio context = one server context: the first text of a context sends its config (voice, language,
seed, ...), every aggregation (a sentence, or a single LLM token in TOKEN mode) is a text delta, the end of the
LLM turn is a flush, and an interruption is a cancel. Audio of contexts Pipecat no longer has (interrupted ones)
is dropped on arrival.
"""

from __future__ import annotations

import asyncio
import json
from typing import AsyncGenerator
from urllib.parse import urlsplit, urlunsplit

from loguru import logger
from pipecat.frames.frames import (CancelFrame, EndFrame, ErrorFrame, Frame, TTSAudioRawFrame, TTSStoppedFrame)
from pipecat.processors.frame_processor import FrameProcessorSetup
from pipecat.services.tts_service import TextAggregationMode, WebsocketTTSService
from pipecat.transcriptions.language import Language
from websockets.protocol import State

from ._common import SERVER_SAMPLE_RATE, PCMStream, QwenTTSSettings, auth_headers, default_settings, given, qwen_language

WS_PATH = "/v1/audio/speech/stream"


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


class QwenTTSService(WebsocketTTSService):
    """Streams text to a ``qwen-tts-mk serve`` server over one WebSocket and plays the audio it streams back.

    Text streams as the LLM produces it: in TOKEN mode (the default here) every LLM token goes to the server at
    once, and the server starts speaking after the first word while the rest of the reply is still being
    generated; SENTENCE mode sends whole sentences. Several contexts can be open on the one connection.

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
            settings: voice, language, instructions, seed, max_new_tokens, temperature.
            text_aggregation_mode: TOKEN (default: the server buffers text itself) or SENTENCE.
            **kwargs: passed to Pipecat's ``WebsocketTTSService`` (``sample_rate``, ``reconnect_on_error``, ...).
        """
        super().__init__(push_start_frame=True, push_stop_frames=False, pause_frame_processing=False,
                         text_aggregation_mode=text_aggregation_mode,
                         settings=default_settings(self.Settings, settings, voice=None), **kwargs)
        self._url = websocket_url(base_url)
        self._api_key = api_key
        self._receive_task: asyncio.Task | None = None
        self._configured: set[str] = set()  # contexts whose config went out on the current connection
        self._audio: dict[str, PCMStream] = {}  # per context: sample alignment and resampling

    def can_generate_metrics(self) -> bool:
        return True

    def language_to_service_language(self, language: Language) -> str | None:
        return qwen_language(language)

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
            self._configured.clear()
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
            self._configured.clear()
            self._audio.clear()
            await self._call_event_handler("on_disconnected")

    async def _send(self, message: dict) -> None:
        if self._websocket is None:
            raise ConnectionError("Qwen TTS websocket is not connected")
        await self._websocket.send(json.dumps(message))

    # Text out ------------------------------------------------------------------------------------------------

    def _config_message(self, context_id: str) -> dict:
        s = self._settings
        msg = {"type": "config", "context_id": context_id, "voice": given(s.voice),
               "language": given(s.language) or "auto"}
        for key in ("instructions", "seed", "max_new_tokens", "temperature"):
            value = given(getattr(s, key))
            if value is not None:
                msg[key] = value
        return msg

    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame | None, None]:
        try:
            if self._websocket is None or self._websocket.state is not State.OPEN:
                await self._connect()
            if context_id not in self._configured:
                await self._send(self._config_message(context_id))
                self._configured.add(context_id)
                self._audio[context_id] = PCMStream(SERVER_SAMPLE_RATE, self.sample_rate)
            await self._send({"type": "text", "context_id": context_id, "text": text})
            await self.start_tts_usage_metrics(text)
        except Exception as e:
            yield ErrorFrame(error=f"Qwen TTS: cannot send text: {e}", exception=e)
            await self.stop_all_metrics()
            self._configured.discard(context_id)
            await self.remove_audio_context(context_id)
            return
        yield None

    async def flush_audio(self, context_id: str | None = None):
        context_id = context_id or self.get_active_audio_context_id()
        if not context_id or context_id not in self._configured or self._websocket is None:
            return
        try:
            await self._send({"type": "flush", "context_id": context_id})
        except Exception as e:
            logger.warning(f"{self}: flush of {context_id} failed: {e}")

    async def on_audio_context_interrupted(self, context_id: str):
        await self.stop_all_metrics()
        if context_id in self._configured and self._websocket is not None:
            try:
                await self._send({"type": "cancel", "context_id": context_id})
            except Exception as e:
                logger.warning(f"{self}: cancel of {context_id} failed: {e}")
        self._configured.discard(context_id)
        self._audio.pop(context_id, None)
        await super().on_audio_context_interrupted(context_id)

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
        if not self.audio_context_available(context_id):
            return  # an interrupted (cancelled) or finished context: late audio is dropped
        stream = self._audio.get(context_id)
        if stream is None:
            stream = self._audio[context_id] = PCMStream(SERVER_SAMPLE_RATE, self.sample_rate)
        await self._append_audio(context_id, await stream.push(pcm))

    async def _append_audio(self, context_id: str, pcm: bytes):
        if pcm:
            await self.append_to_audio_context(
                context_id, TTSAudioRawFrame(audio=pcm, sample_rate=self.sample_rate, num_channels=1,
                                             context_id=context_id))

    async def _on_event(self, msg: dict):
        kind = msg.get("type")
        context_id = msg.get("context_id")
        if kind == "audio_start":
            rate = int(msg.get("sample_rate") or SERVER_SAMPLE_RATE)
            if context_id and rate != SERVER_SAMPLE_RATE:
                self._audio[context_id] = PCMStream(rate, self.sample_rate)
        elif kind == "audio_done":
            self._configured.discard(context_id)
            stream = self._audio.pop(context_id, None)
            if context_id and self.audio_context_available(context_id):
                if stream is not None:
                    await self._append_audio(context_id, await stream.finish())
                logger.debug(f"{self}: context {context_id} done: {msg.get('stop_reason')}, "
                             f"{msg.get('audio_seconds')} s of audio, first audio after "
                             f"{msg.get('time_to_first_audio_ms')} ms")
                await self.append_to_audio_context(context_id, TTSStoppedFrame(context_id=context_id))
                await self.remove_audio_context(context_id)
        elif kind == "error":
            message = msg.get("message", msg)
            await self.stop_all_metrics()
            await self.push_error(error_msg=f"Qwen TTS server error: {message}")
            if context_id:
                self._configured.discard(context_id)
                self._audio.pop(context_id, None)
                if self.audio_context_available(context_id):
                    await self.append_to_audio_context(context_id, TTSStoppedFrame(context_id=context_id))
                    await self.remove_audio_context(context_id)
        else:
            logger.debug(f"{self}: ignoring message {msg}")
