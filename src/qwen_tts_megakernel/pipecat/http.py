"""Pipecat TTS over the server's chunked HTTP endpoint (POST /tts/stream), one request per text aggregation."""

from __future__ import annotations

from typing import AsyncGenerator

import aiohttp
from loguru import logger
from pipecat.frames.frames import CancelFrame, EndFrame, ErrorFrame, Frame, StartFrame, TTSAudioRawFrame
from pipecat.services.tts_service import TTSService
from pipecat.transcriptions.language import Language
from pipecat.utils.tracing.service_decorators import traced_tts

from ._common import (SERVER_SAMPLE_RATE, PCMStream, QwenTTSSettings, ReportsErrorsOnce, auth_headers, default_settings,
                      error_detail, given, qwen_language, request_fields, wire_rate)


class QwenHttpTTSService(ReportsErrorsOnce, TTSService):
    """Streams speech from a ``qwen-tts-mk serve`` server over HTTP.

    Each aggregated text (a sentence by default) is one ``POST /tts/stream``; the response's PCM chunks become
    ``TTSAudioRawFrame``s as they arrive, so the first audio plays while the server is still synthesizing. An
    interruption cancels the request task, which closes the connection; the server then stops that utterance.

    The server speaks 24 kHz; when the pipeline's output rate (or ``sample_rate=``) differs, audio is resampled
    here (soxr stream resampler).

    Example::

        async with aiohttp.ClientSession() as session:
            tts = QwenHttpTTSService(base_url="http://127.0.0.1:8001", aiohttp_session=session,
                                     settings=QwenHttpTTSService.Settings(voice="ryan", language=Language.EN))
    """

    Settings = QwenTTSSettings
    _settings: QwenTTSSettings

    def __init__(self, *, base_url: str = "http://127.0.0.1:8001", aiohttp_session: aiohttp.ClientSession | None = None,
                 api_key: str | None = None, settings: QwenTTSSettings | None = None,
                 read_timeout_s: float | None = 30.0, **kwargs):
        """Args:
            base_url: the server's root URL (no trailing path), e.g. ``http://127.0.0.1:8001``.
            aiohttp_session: a session to share; without one the service opens and closes its own.
            api_key: the server's ``--api-key`` (sent as ``Authorization: Bearer``).
            settings: voice, language, instructions, seed, max_new_tokens, sampling (``QwenHttpTTSService.Settings``).
            read_timeout_s: the longest wait for the next bytes of a response (None: no limit); a long utterance
                may take as long as it needs as long as it keeps streaming.
            **kwargs: passed to Pipecat's ``TTSService`` (``sample_rate``, ``text_aggregation_mode``, ...).
        """
        super().__init__(push_start_frame=True, push_stop_frames=True,
                         settings=default_settings(self.Settings, settings, voice=None), **kwargs)
        self._base_url = base_url.rstrip("/")
        self._session = aiohttp_session
        self._own_session = aiohttp_session is None
        self._api_key = api_key
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=read_timeout_s)

    def can_generate_metrics(self) -> bool:
        return True

    def language_to_service_language(self, language: Language) -> str | None:
        return qwen_language(language)

    async def start(self, frame: StartFrame):
        await super().start(frame)
        if self._session is None:
            self._session = aiohttp.ClientSession()

    async def stop(self, frame: EndFrame):
        await super().stop(frame)
        await self._close_own_session()

    async def cancel(self, frame: CancelFrame):
        await super().cancel(frame)
        await self._close_own_session()

    async def _close_own_session(self):
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _request_body(self, text: str) -> dict:
        s = self._settings
        return {"text": text, "language": given(s.language) or "auto", "speaker": given(s.voice),
                "sample_rate": wire_rate(self.sample_rate), **request_fields(s)}

    @traced_tts
    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame | None, None]:
        if self._session is None:  # run_tts before start(): a caller's bug, reported like any failure
            yield ErrorFrame(error="QwenHttpTTSService: no HTTP session (the pipeline has not started)")
            return
        failed = False
        try:
            async with self._session.post(f"{self._base_url}/tts/stream", json=self._request_body(text),
                                          headers=auth_headers(self._api_key), timeout=self._timeout) as response:
                if response.status != 200:
                    failed = True
                    message = error_detail(response.status, await response.text())
                    if response.headers.get("Retry-After"):  # 503: the server's queue is full
                        message += f" (retry after {response.headers['Retry-After']} s)"
                    yield ErrorFrame(error=message)
                else:
                    await self.start_tts_usage_metrics(text)
                    rate = int(response.headers.get("X-Sample-Rate", SERVER_SAMPLE_RATE))
                    pcm = PCMStream(rate, self.sample_rate)
                    async for data in response.content.iter_chunked(self.chunk_size):
                        audio = await pcm.push(data)
                        if audio:
                            await self.stop_ttfb_metrics()
                            yield TTSAudioRawFrame(audio, self.sample_rate, 1, context_id=context_id)
                    audio = await pcm.finish()
                    if audio:
                        yield TTSAudioRawFrame(audio, self.sample_rate, 1, context_id=context_id)
        except Exception as e:  # never BaseException: cancellation is how an interruption stops the request
            failed = True
            logger.warning(f"{self}: request failed: {e!r}")
            yield ErrorFrame(error=f"Qwen TTS request failed: {e}", exception=e)
        finally:
            await self.stop_ttfb_metrics()
        if failed:
            self.error_reported(context_id)
            # End this context now rather than after the stop-frame timeout (its TTSStoppedFrame follows).
            await self.stop_all_metrics()
            await self.remove_audio_context(context_id)
