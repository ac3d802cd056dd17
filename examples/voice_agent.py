"""A voice agent on Pipecat: microphone -> STT -> LLM -> Qwen3-TTS (our server) -> speaker, with latency figures.

Start the TTS server first (`qwen-tts-mk serve --model Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice --port 8001`), then:

  Local audio (needs `pipecat-ai[local]`, PortAudio, a microphone and a speaker):
    python examples/voice_agent.py --mode local --stt whisper --llm-base-url http://localhost:11434/v1 \
        --llm-model llama3.2
  Pipecat's small WebRTC page in a browser (needs `pipecat-ai[webrtc,runner]`); open http://localhost:7860/client/:
    python examples/voice_agent.py --mode webrtc --stt whisper --llm-base-url http://localhost:11434/v1 \
        --llm-model llama3.2
  Headless (no microphone): user turns from text (or a WAV file, which needs STT), bot speech into a WAV file:
    python examples/voice_agent.py --mode headless --say "Hi, who are you?" --say "Tell me a joke." \
        --output-wav bot.wav --llm-base-url http://localhost:11434/v1 --llm-model llama3.2
    python examples/voice_agent.py --mode headless --input-wav question.wav --stt whisper --output-wav bot.wav ...
  Fully offline smoke test (a built-in stub LLM that quotes the user):
    python examples/voice_agent.py --mode headless --llm stub --say "Hello there." --output-wav bot.wav

STT: `--stt whisper` (local faster-whisper, `pipecat-ai[whisper]`; the model downloads on first use) or
`--stt deepgram` (`pipecat-ai[deepgram]`, DEEPGRAM_API_KEY). LLM: any OpenAI-compatible endpoint (`--llm-base-url`,
`--llm-model`, `--llm-api-key` or OPENAI_API_KEY); without --llm-base-url it is OpenAI itself. TTS: `--tts ws`
(default; streamed LLM tokens, cancel on barge-in) or `--tts http`.

Printed: each service's TTFB (STT, LLM, TTS) and, per bot turn, the user-stopped-speaking -> bot-started-speaking
latency with its breakdown (Pipecat's UserBotLatencyObserver). In headless mode "user stopped speaking" is the moment
the text turn is injected (or the end of the WAV's speech), and "bot started speaking" is the first bot audio reaching
the WAV writer; `--report-json` writes the figures to a file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import wave
from dataclasses import dataclass, field

import aiohttp
from loguru import logger
from pipecat.frames.frames import (BotStartedSpeakingFrame, BotStoppedSpeakingFrame, EndFrame, ErrorFrame, Frame,
                                   InputAudioRawFrame, LLMFullResponseEndFrame, LLMRunFrame, MetricsFrame,
                                   StartFrame, TranscriptionFrame, TTSAudioRawFrame, UserStartedSpeakingFrame,
                                   UserStoppedSpeakingFrame, VADUserStartedSpeakingFrame,
                                   VADUserStoppedSpeakingFrame)
from pipecat.metrics.metrics import TTFBMetricsData
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.observers.user_bot_latency_observer import UserBotLatencyObserver
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (LLMContextAggregatorPair,
                                                                   LLMUserAggregatorParams)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.utils.time import time_now_iso8601
from pipecat.workers.runner import WorkerRunner

from qwen_tts_megakernel.pipecat import QwenHttpTTSService, QwenTTSService

SYSTEM_PROMPT = ("You are a friendly voice assistant. Your answers are spoken aloud, so keep them to one or two "
                 "short sentences, with no lists, markdown or emoji.")


# ---------------------------------------------------------------------------------------------------------------
# Command line


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=["local", "webrtc", "headless"], default="local")
    # TTS (our server)
    p.add_argument("--tts", choices=["ws", "http"], default="ws", help="WebSocket (streamed text) or HTTP service")
    p.add_argument("--tts-url", default=os.environ.get("QWEN_TTS_URL", "http://127.0.0.1:8001"))
    p.add_argument("--tts-api-key", default=os.environ.get("QWEN_TTS_MK_API_KEY"))
    p.add_argument("--voice", default="ryan")
    p.add_argument("--language", default="english")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None, help="frame limit per utterance (80 ms each)")
    p.add_argument("--sentence-aggregation", action="store_true",
                   help="send whole sentences to the WS service instead of streaming LLM tokens")
    # LLM
    p.add_argument("--llm", choices=["openai", "stub"], default="openai",
                   help="an OpenAI-compatible endpoint, or a built-in stub that quotes the user (offline tests)")
    p.add_argument("--llm-base-url", default=os.environ.get("OPENAI_BASE_URL"),
                   help="e.g. http://localhost:11434/v1 (Ollama), http://localhost:8000/v1 (vLLM); default OpenAI")
    p.add_argument("--llm-model", default=os.environ.get("LLM_MODEL", "gpt-4o-mini"))
    p.add_argument("--llm-api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--system-prompt", default=SYSTEM_PROMPT)
    # STT
    p.add_argument("--stt", choices=["whisper", "deepgram", "none"], default=None,
                   help="default: whisper for local/webrtc and --input-wav, none for text turns")
    p.add_argument("--whisper-model", default="base.en",
                   help="a faster-whisper model name or local CTranslate2 folder")
    p.add_argument("--whisper-device", default="cpu")
    # Headless
    p.add_argument("--say", action="append", default=[], help="a user turn as text (repeatable; headless)")
    p.add_argument("--input-wav", default=None, help="a user turn as speech (mono WAV; headless, needs STT)")
    p.add_argument("--output-wav", default="bot.wav", help="where the bot's speech goes (headless)")
    p.add_argument("--report-json", default=None, help="write the latency figures as JSON (headless)")
    p.add_argument("--turn-timeout", type=float, default=60.0, help="seconds to wait for one bot turn (headless)")
    return p


# ---------------------------------------------------------------------------------------------------------------
# Services


def make_tts(args, session: aiohttp.ClientSession | None):
    common = dict(voice=args.voice, language=args.language, seed=args.seed, max_new_tokens=args.max_new_tokens)
    if args.tts == "http":
        return QwenHttpTTSService(base_url=args.tts_url, aiohttp_session=session, api_key=args.tts_api_key,
                                  settings=QwenHttpTTSService.Settings(**common))
    from pipecat.services.tts_service import TextAggregationMode

    mode = TextAggregationMode.SENTENCE if args.sentence_aggregation else TextAggregationMode.TOKEN
    return QwenTTSService(base_url=args.tts_url, api_key=args.tts_api_key, text_aggregation_mode=mode,
                          settings=QwenTTSService.Settings(**common))


def make_llm(args, base_url: str | None):
    return OpenAILLMService(api_key=args.llm_api_key or "none", base_url=base_url,
                            settings=OpenAILLMService.Settings(model=args.llm_model,
                                                               system_instruction=args.system_prompt))


def make_stt(args):
    if args.stt == "whisper":
        from pipecat.services.whisper.stt import WhisperSTTService

        return WhisperSTTService(settings=WhisperSTTService.Settings(model=args.whisper_model),
                                 device=args.whisper_device, compute_type="int8")
    if args.stt == "deepgram":
        from pipecat.services.deepgram.stt import DeepgramSTTService

        if not os.environ.get("DEEPGRAM_API_KEY"):
            raise SystemExit("voice_agent: --stt deepgram needs DEEPGRAM_API_KEY in the environment")
        return DeepgramSTTService(api_key=os.environ["DEEPGRAM_API_KEY"])
    return None


def make_vad():
    from pipecat.audio.vad.silero import SileroVADAnalyzer

    return SileroVADAnalyzer()


async def unreachable(session: aiohttp.ClientSession, args, llm_base_url: str | None) -> str | None:
    """One line naming the TTS server or LLM endpoint that does not answer, or None when both do."""
    timeout = aiohttp.ClientTimeout(total=5)
    try:
        async with session.get(args.tts_url.rstrip("/") + "/health", timeout=timeout) as r:
            if r.status != 200:
                return f"the TTS server at {args.tts_url} answered /health with HTTP {r.status}"
    except (aiohttp.ClientError, TimeoutError) as e:
        return (f"the TTS server at {args.tts_url} is unreachable ({_reason(e)}): start it with `qwen-tts-mk serve` "
                f"or point --tts-url at it")
    base = (llm_base_url or "https://api.openai.com/v1").rstrip("/")
    try:  # any HTTP answer, even 401 or 404, means something listens there
        async with session.get(base + "/models", timeout=timeout):
            pass
    except (aiohttp.ClientError, TimeoutError) as e:
        return (f"the LLM endpoint {base} is unreachable ({_reason(e)}): point --llm-base-url at an OpenAI-compatible "
                f"server (e.g. Ollama's http://localhost:11434/v1) or use --llm stub")
    return None


def _reason(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# ---------------------------------------------------------------------------------------------------------------
# Latency reporting


@dataclass
class LatencyReport:
    ttfb: dict[str, list[float]] = field(default_factory=dict)  # processor -> TTFB seconds, each measurement
    user_to_bot: list[float] = field(default_factory=list)  # user stopped speaking -> bot started speaking
    breakdowns: list[list[str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # every ErrorFrame of the run

    def as_dict(self) -> dict:
        if self.errors:  # figures of a failed run are no latencies (see summary_lines)
            return {"ttfb_s": {}, "user_stopped_to_bot_started_s": [], "breakdowns": [], "errors": self.errors}
        return {"ttfb_s": self.ttfb, "user_stopped_to_bot_started_s": self.user_to_bot,
                "breakdowns": self.breakdowns, "errors": self.errors}

    def summary_lines(self) -> list[str]:
        """The figures, or one line saying why there are none: a service that failed still reports a "TTFB" (the
        time to its failure), which is no latency figure."""
        if self.errors:
            return [f"no latency figures: the run failed ({self.errors[0]})"]
        lines = ["latency summary:"]
        for name, values in sorted(self.ttfb.items()):
            lines.append(f"  TTFB {name:<32} " + ", ".join(f"{1000 * v:.0f} ms" for v in values))
        for i, v in enumerate(self.user_to_bot, 1):
            lines.append(f"  turn {i}: user stopped speaking -> bot started speaking {1000 * v:.0f} ms")
        return lines


class TTFBObserver(BaseObserver):
    """Collects every TTFB metric (STT, LLM, TTS) and every error once, at the processor that reported it."""

    def __init__(self, report: LatencyReport):
        super().__init__()
        self._report = report
        self._seen: set[int] = set()

    async def on_push_frame(self, data: FramePushed):
        frame = data.frame
        if not isinstance(frame, (MetricsFrame, ErrorFrame)) or frame.id in self._seen:
            return
        self._seen.add(frame.id)
        if isinstance(frame, ErrorFrame):
            self._report.errors.append(" ".join(str(frame.error).split()))
            return
        for d in frame.data:
            if isinstance(d, TTFBMetricsData) and d.value > 0:
                self._report.ttfb.setdefault(d.processor, []).append(d.value)


def latency_observers(report: LatencyReport) -> list[BaseObserver]:
    latency = UserBotLatencyObserver()

    @latency.event_handler("on_latency_measured")
    async def _on_latency(observer, seconds: float):
        report.user_to_bot.append(seconds)
        logger.info(f"user stopped speaking -> bot started speaking: {1000 * seconds:.0f} ms")

    @latency.event_handler("on_latency_breakdown")
    async def _on_breakdown(observer, breakdown):
        lines = breakdown.turn_contribution_lines()
        report.breakdowns.append(lines)
        for line in lines:
            logger.info(f"  {line}")

    return [latency, TTFBObserver(report)]


# ---------------------------------------------------------------------------------------------------------------
# Headless source and sink


class WavSink(FrameProcessor):
    """Writes the bot's audio to a WAV file, standing in for a speaker: announces BotStarted/StoppedSpeaking
    around each bot turn (so the latency observer can measure) and tells the source when a turn has ended."""

    def __init__(self, path: str, gap_s: float = 0.3):
        super().__init__()
        self._path = path
        self._gap_s = gap_s
        self._wav: wave.Wave_write | None = None
        self._rate = 0
        self._speaking = False
        self.turn_done = asyncio.Event()
        self.samples = 0

    def _open(self, rate: int):
        self._wav = wave.open(self._path, "wb")
        self._wav.setnchannels(1)
        self._wav.setsampwidth(2)
        self._wav.setframerate(rate)
        self._rate = rate

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame):
            if self._wav is None:
                self._open(frame.sample_rate)
            if not self._speaking:
                self._speaking = True
                if self.samples:  # a short pause between bot turns
                    self._wav.writeframes(b"\x00\x00" * int(self._gap_s * self._rate))
                await self.push_frame(BotStartedSpeakingFrame())
                await self.push_frame(BotStartedSpeakingFrame(), FrameDirection.UPSTREAM)
            audio = frame.audio
            if frame.sample_rate != self._rate:
                logger.warning(f"audio at {frame.sample_rate} Hz in a {self._rate} Hz file")
            self._wav.writeframes(audio)
            self.samples += len(audio) // 2
            await self.push_frame(frame, direction)
            return
        await self.push_frame(frame, direction)
        if isinstance(frame, LLMFullResponseEndFrame) and direction == FrameDirection.DOWNSTREAM:
            # The TTS queues the end of the reply behind the reply's audio: the bot turn is over.
            if self._speaking:
                self._speaking = False
                await self.push_frame(BotStoppedSpeakingFrame())
                await self.push_frame(BotStoppedSpeakingFrame(), FrameDirection.UPSTREAM)
            self.turn_done.set()

    def close(self):
        if self._wav is None:  # no audio at all: still leave a valid (empty) file
            self._open(24000)
        self._wav.close()


class TurnSource(FrameProcessor):
    """Plays the user's side of a conversation once the pipeline starts (`_turns`, in a subclass), waits for the
    bot's reply after each turn, and ends the pipeline after the last one."""

    def __init__(self, sink: WavSink, worker_ref: list, turn_timeout_s: float):
        super().__init__()
        self._sink, self._worker_ref, self._timeout = sink, worker_ref, turn_timeout_s
        self._task: asyncio.Task | None = None
        self.error: str | None = None

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)
        if isinstance(frame, StartFrame) and self._task is None:
            self._task = self.create_task(self._play())

    async def _play(self):
        try:
            await self._turns()
        finally:
            await self._worker_ref[0].queue_frame(EndFrame())

    async def _bot_replied(self, what: str) -> bool:
        """Wait for the bot's turn to end; False (and `error` set) after the timeout."""
        try:
            await asyncio.wait_for(self._sink.turn_done.wait(), self._timeout)
            return True
        except TimeoutError:
            self.error = f"no bot reply within {self._timeout} s{what}"
            logger.error(self.error)
            return False

    async def _turns(self):
        raise NotImplementedError


class TextTurnSource(TurnSource):
    """The user's turns from text: for each, the frames a VAD + STT front end would push (user started speaking,
    the transcript, VAD stop, user stopped speaking)."""

    def __init__(self, turns: list[str], sink: WavSink, worker_ref: list, turn_timeout_s: float):
        super().__init__(sink, worker_ref, turn_timeout_s)
        self._texts = turns

    async def _turns(self):
        await asyncio.sleep(0.2)  # let every processor (and the TTS WebSocket) finish starting
        for text in self._texts:
            self._sink.turn_done.clear()
            logger.info(f"user: {text}")
            await self.push_frame(VADUserStartedSpeakingFrame())
            await self.push_frame(UserStartedSpeakingFrame())
            await asyncio.sleep(0.1)  # the user talking (the turn must be open before its transcript)
            await self.push_frame(TranscriptionFrame(text, "user", time_now_iso8601(), finalized=True))
            # The transcript is a data frame and the stop frames are system frames, which overtake queued data
            # frames: let the transcript reach the user aggregator first, as a real STT's final result does.
            await asyncio.sleep(0.05)
            await self.push_frame(VADUserStoppedSpeakingFrame(stop_secs=0.0, timestamp=time.time()))
            await self.push_frame(UserStoppedSpeakingFrame())
            if not await self._bot_replied(f" to: {text!r}"):
                break


class WavTurnSource(TurnSource):
    """Plays a WAV file as microphone input (20 ms chunks at real-time pace, then silence for the VAD to end the
    turn) and waits for the bot's reply."""

    def __init__(self, path: str, sink: WavSink, worker_ref: list, turn_timeout_s: float, rate: int = 16000):
        super().__init__(sink, worker_ref, turn_timeout_s)
        self._path, self._rate = path, rate

    def _read(self) -> bytes:
        import numpy as np

        with wave.open(self._path, "rb") as f:
            if f.getsampwidth() != 2:
                raise ValueError(f"{self._path}: 16-bit PCM WAV expected")
            pcm = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2").reshape(-1, f.getnchannels())
            rate = f.getframerate()
        mono = pcm.mean(axis=1).astype(np.float32)
        if rate != self._rate:
            import soxr

            mono = soxr.resample(mono, rate, self._rate)
        return np.clip(mono, -32768, 32767).astype("<i2").tobytes()

    async def _turns(self):
        pcm = await asyncio.to_thread(self._read)
        pcm += b"\x00\x00" * int(1.5 * self._rate)  # trailing silence: the VAD ends the turn
        step = int(0.02 * self._rate) * 2
        self._sink.turn_done.clear()
        start = time.monotonic()
        for i, off in enumerate(range(0, len(pcm), step)):
            await self.push_frame(InputAudioRawFrame(pcm[off:off + step], self._rate, 1))
            await asyncio.sleep(max(0.0, start + (i + 1) * 0.02 - time.monotonic()))
        await self._bot_replied("")


# ---------------------------------------------------------------------------------------------------------------
# Runs


async def run_headless(args) -> int:
    report = LatencyReport()
    if not args.say and not args.input_wav:
        print("headless mode needs --say TEXT (repeatable) or --input-wav FILE", file=sys.stderr)
        return 2
    stub = None
    base_url = args.llm_base_url
    if args.llm == "stub":
        from qwen_tts_megakernel.testing.stub_llm import StubLLMServer

        stub = StubLLMServer().start()
        base_url = stub.base_url
    stt_kind = args.stt or ("whisper" if args.input_wav else "none")
    args.stt = stt_kind
    try:
        async with aiohttp.ClientSession() as session:
            if problem := await unreachable(session, args, base_url):
                print(f"voice_agent: {problem}", file=sys.stderr)
                return 2
            tts = make_tts(args, session)
            llm = make_llm(args, base_url)
            context = LLMContext()
            sink = WavSink(args.output_wav)
            worker_ref: list = []
            if args.input_wav:
                stt = make_stt(args)
                if stt is None:
                    print("--input-wav needs --stt whisper or --stt deepgram", file=sys.stderr)
                    return 2
                source = WavTurnSource(args.input_wav, sink, worker_ref, args.turn_timeout)
                user_params = LLMUserAggregatorParams(vad_analyzer=make_vad())
                front = [source, stt]
            else:
                from pipecat.turns.user_turn_strategies import ExternalUserTurnStrategies

                source = TextTurnSource(args.say, sink, worker_ref, args.turn_timeout)
                user_params = LLMUserAggregatorParams(user_turn_strategies=ExternalUserTurnStrategies())
                front = [source]
            user_agg, assistant_agg = LLMContextAggregatorPair(context, user_params=user_params)
            pipeline = Pipeline([*front, user_agg, llm, tts, sink, assistant_agg])
            worker = PipelineWorker(pipeline, params=PipelineParams(enable_metrics=True, enable_usage_metrics=True),
                                    observers=latency_observers(report), cancel_on_idle_timeout=False)
            worker_ref.append(worker)
            runner = WorkerRunner(handle_sigint=False)
            await runner.add_workers(worker)
            await runner.run()
            sink.close()
    finally:
        if stub is not None:
            stub.stop()
    if not report.errors and sink.samples == 0:
        report.errors.append(source.error or "no bot speech arrived")
    for line in report.summary_lines():
        print(line)
    seconds = sink.samples / (sink._rate or 24000)
    print(f"wrote {args.output_wav}: {seconds:.2f} s of bot speech")
    assistant = [m.get("content") for m in context.get_messages() if m.get("role") == "assistant"]
    if args.report_json:
        with open(args.report_json, "w") as f:
            json.dump(report.as_dict() | {"output_wav": args.output_wav, "bot_audio_seconds": seconds,
                                          "assistant_messages": assistant, "error": source.error}, f, indent=2)
    return 1 if source.error or report.errors else 0


async def run_live_pipeline(args, transport) -> None:
    report = LatencyReport()
    stt = make_stt(args)
    if stt is None:
        raise SystemExit("live modes need speech recognition: --stt whisper or --stt deepgram")
    async with aiohttp.ClientSession() as session:
        if problem := await unreachable(session, args, args.llm_base_url):
            raise SystemExit(f"voice_agent: {problem}")
        tts = make_tts(args, session)
        llm = make_llm(args, args.llm_base_url)
        context = LLMContext()
        user_agg, assistant_agg = LLMContextAggregatorPair(
            context, user_params=LLMUserAggregatorParams(vad_analyzer=make_vad()))
        pipeline = Pipeline([transport.input(), stt, user_agg, llm, tts, transport.output(), assistant_agg])
        worker = PipelineWorker(pipeline, params=PipelineParams(enable_metrics=True, enable_usage_metrics=True),
                                observers=latency_observers(report))
        context.add_message({"role": "user", "content": "Say hello and introduce yourself in one sentence."})
        await worker.queue_frames([LLMRunFrame()])
        runner = WorkerRunner(handle_sigint=True)
        await runner.add_workers(worker)
        try:
            await runner.run()
        finally:
            for line in report.summary_lines():
                print(line)


async def run_local(args) -> None:
    from pipecat.transports.local.audio import LocalAudioTransport, LocalAudioTransportParams

    transport = LocalAudioTransport(LocalAudioTransportParams(audio_in_enabled=True, audio_out_enabled=True))
    await run_live_pipeline(args, transport)


async def bot(runner_args):
    """Entry point of Pipecat's development runner (--mode webrtc)."""
    from pipecat.runner.utils import create_transport
    from pipecat.transports.base_transport import TransportParams

    args = runner_args.cli_args
    args.stt = args.stt or "whisper"
    transport = await create_transport(runner_args, {
        "webrtc": lambda: TransportParams(audio_in_enabled=True, audio_out_enabled=True)})
    await run_live_pipeline(args, transport)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--mode", choices=["local", "webrtc", "headless"], default="local")
    mode = pre.parse_known_args(argv)[0].mode
    try:
        if mode == "webrtc":
            # Pipecat's development runner serves the WebRTC page and calls bot() per session; it parses the command
            # line itself, with this script's options added (they reach bot() as runner_args.cli_args).
            from pipecat.runner.run import main as runner_main

            sys.argv = [sys.argv[0], *argv]
            if "-t" not in argv and "--transport" not in argv:
                sys.argv += ["-t", "webrtc"]
            runner_main(build_parser(argparse.ArgumentParser(description="Qwen3-TTS voice agent (WebRTC)")))
            return 0
        args = build_parser().parse_args(argv)
        if mode == "local":
            args.stt = args.stt or "whisper"
            asyncio.run(run_local(args))
            return 0
        return asyncio.run(run_headless(args))
    except ImportError as e:
        hint = {"local": "local", "webrtc": "webrtc,runner"}.get(mode)
        extra = f' (this mode needs: pip install "pipecat-ai[{hint}]==1.14.0")' if hint else ""
        print(f"voice_agent: {e}{extra}; STT needs pipecat-ai[whisper] or pipecat-ai[deepgram]", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
