"""The `qwen-tts-mk` command line.

    qwen-tts-mk tiny-model DIR [--size 0.6b|1.7b] [--type custom_voice|voice_design|base] [--seed N]
    qwen-tts-mk say "text" -o out.wav [--model M] [--voice V] [--language L] [--instruct I] [--seed N] ...
    qwen-tts-mk voices [--model M]
    qwen-tts-mk serve [--model M] [--backend B] [--host 127.0.0.1] [--port 8001] [--api-key K]
                      [--ray [--replicas N | --autoscale MIN..MAX] [--gpus-per-replica 1]]
    qwen-tts-mk validate (--model M | --random-weights 0.6b) [--batch 1,2,7,16,64]
    qwen-tts-mk bench (--all | --decode | --server | --load | --serve-overhead)

Errors a user can fix (unknown voice, missing model, empty text, ...) print one line naming the problem and exit
with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
import wave
from pathlib import Path

import numpy as np

from .checkpoint import DEFAULT_MODEL


class UsageError(Exception):
    """An error the user can fix; printed as one line."""


def write_wav(path: str | Path, pcm16: np.ndarray, sample_rate: int) -> None:
    """Mono 16-bit PCM WAV."""
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(np.ascontiguousarray(pcm16, dtype="<i2").tobytes())


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"HF id or local folder (default {DEFAULT_MODEL})")
    p.add_argument("--backend", default="reference", choices=["reference", "graphed", "megakernel"])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="talker precision (default: bfloat16 on CUDA, float32 on CPU)")


def _load(args):
    from .engine import Synthesizer

    print(f"loading {args.model} ({args.backend} backend)...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    synth = Synthesizer.from_pretrained(args.model, backend=args.backend, device=args.device, dtype=args.dtype)
    print(f"loaded in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return synth


def cmd_tiny_model(args) -> int:
    from .synthetic import write_tiny_model

    out = write_tiny_model(args.dir, size=args.size, model_type=args.type, seed=args.seed)
    print(f"wrote a tiny random {args.size} {args.type} checkpoint to {out}")
    return 0


def cmd_say(args) -> int:
    synth = _load(args)
    stream = synth.stream(args.text, voice=args.voice, language=args.language, instruct=args.instruct,
                          seed=args.seed, max_new_tokens=args.max_new_tokens, text_layout=args.text_layout,
                          do_sample=not args.greedy)
    pieces = []
    frames = 0
    for chunk in stream:
        pieces.append(chunk.pcm)
        frames += chunk.num_frames
        if sys.stderr.isatty() or frames == chunk.num_frames:
            print(f"\r{frames} frames ({frames * 0.08:.2f} s of audio)", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    pcm = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int16)
    write_wav(args.output, pcm, synth.sample_rate)
    audio_s = len(pcm) / synth.sample_rate
    print(f"wrote {args.output}: {audio_s:.2f} s, {frames} frames, stop reason {stream.stop_reason}, "
          f"first chunk after {1000 * (stream.first_chunk_s or 0):.0f} ms, seed {stream.seed}")
    return 0


def cmd_voices(args) -> int:
    from .checkpoint import load_checkpoint

    cfg = load_checkpoint(args.model).config
    print(f"model type: {cfg.model_type} ({cfg.model_size})")
    print("voices:", ", ".join(cfg.speakers) if cfg.speakers else "(none: describe the voice with --instruct)")
    print("languages:", ", ".join(cfg.languages))
    return 0


def cmd_serve(args) -> int:
    if args.ray:
        from .server.ray_serve import run_serve_ray

        return run_serve_ray(args)
    if args.replicas is not None or args.autoscale is not None:
        raise UsageError("--replicas and --autoscale need --ray")
    from .server.app import run_serve

    return run_serve(args)


def cmd_validate(args) -> int:
    from .tools.validate import main_validate

    return main_validate(args)


def cmd_bench(args) -> int:
    if args.all:
        from .tools.bench_all import run_all

        return run_all(args)
    if args.decode:
        from .tools.mk_bench import main_bench_decode

        return main_bench_decode(args)
    if args.server:
        from .tools.server_bench import run_bench_server

        return run_bench_server(args)
    if args.load:
        from .tools.load_bench import run_bench_load

        return run_bench_load(args)
    if args.serve_overhead:
        from .tools.serve_overhead import run_bench_serve_overhead

        return run_bench_serve_overhead(args)
    raise UsageError("bench needs one of --all, --decode, --server, --load or --serve-overhead")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen-tts-mk", description="Streaming Qwen3-TTS on a decode megakernel")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tiny-model", help="write a tiny random checkpoint in the official layout (tests, demos)")
    p.add_argument("dir")
    p.add_argument("--size", default="0.6b", choices=["0.6b", "1.7b"])
    p.add_argument("--type", default="custom_voice", choices=["custom_voice", "voice_design", "base"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("say", help="speak a text into a WAV file")
    p.add_argument("text")
    p.add_argument("-o", "--output", required=True, help="output .wav path")
    _add_model_args(p)
    p.add_argument("--voice", default=None, help="speaker (custom voice models); see `qwen-tts-mk voices`")
    p.add_argument("--language", default="auto")
    p.add_argument("--instruct", default=None, help="voice description (voice design, 1.7B custom voice)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None, help="frame limit (80 ms each)")
    p.add_argument("--text-layout", default="prefill", choices=["prefill", "interleaved"])
    p.add_argument("--greedy", action="store_true", help="argmax decoding (not recommended: degenerates)")
    p.set_defaults(func=cmd_say)

    p = sub.add_parser("voices", help="list the voices and languages of a model")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.set_defaults(func=cmd_voices)

    p = sub.add_parser("serve", help="run the streaming HTTP/WebSocket server")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--api-key", default=None)
    p.add_argument("--allow-unauthenticated-public", action="store_true",
                   help="allow binding a non-loopback address without --api-key")
    from .server.protocol import ServerSettings

    ServerSettings.add_arguments(p)
    p.add_argument("--ray", action="store_true", help="serve on Ray Serve: one engine per replica (GPU), one address")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=None, help="--ray: replicas (default 1)")
    scale.add_argument("--autoscale", default=None, metavar="MIN..MAX", help="--ray: replicas follow the load")
    p.add_argument("--gpus-per-replica", type=float, default=1.0, help="--ray: 0 serves on CPUs (default 1)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="--ray: (default 1)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("validate", help="compare the megakernel with the reference backend on the GPU")
    p.add_argument("--model", default=None)
    p.add_argument("--random-weights", default=None, choices=["0.6b", "1.7b"])
    p.add_argument("--frames", type=int, default=None, help="frames per stream (default 64; with --batch 8)")
    p.add_argument("--batch", default=None, help="batch sizes to check, e.g. 1,2,7,16,64 (streams at mixed "
                                                 "positions, batch invariance)")
    p.add_argument("--output", default=None, help="JSON report path")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("bench", help="benchmarks (GPU)")
    p.add_argument("--decode", action="store_true", help="megakernel decode step vs reference baselines")
    p.add_argument("--server", action="store_true", help="server time to first chunk and RTF over loopback")
    p.add_argument("--all", action="store_true", help="everything vs the alternatives, one process (GPU)")
    p.add_argument("--load", action="store_true",
                   help="a fleet of calls over loopback: closed and open loop, listener underruns (GPU)")
    p.add_argument("--serve-overhead", action="store_true",
                   help="time to first audio added by Ray Serve over the direct server, 1 and 16 streams ([ray])")
    p.add_argument("--backends", nargs="+", default=None, help="--load: backends to run (default: megakernel)")
    p.add_argument("--models", nargs="+", default=None, help="--load: models (default: random:0.6b)")
    p.add_argument("--levels", nargs="+", type=int, default=None,
                   help="--load: closed-loop stream counts (default: 1 8 16 32 64 128)")
    p.add_argument("--rates", nargs="+", type=float, default=None,
                   help="--load: open-loop requests per second, tried in order until p95 TTFA > 200 ms")
    p.add_argument("--protocols", nargs="+", default=None, choices=["http", "ws"], help="--load: default both")
    p.add_argument("--frames", type=int, default=None, help="--load: frames per request (default 100 = 8 s)")
    p.add_argument("--runs", type=int, default=5, help="repetitions per measurement (--all)")
    p.add_argument("--only", nargs="+", default=None, metavar="SECTION",
                   help="--all: run just these sections (decode, streaming, ttfc_breakdown, streaming_plot, "
                        "official, server, pipecat) into <gpu>-only-<sections>.json, leaving <gpu>.json alone")
    p.add_argument("--official-site", default=None,
                   help="a site directory holding the official qwen-tts and its pinned transformers (--all)")
    p.add_argument("--model", default=None)
    p.add_argument("--random-weights", default="0.6b", choices=["0.6b", "1.7b"])
    p.add_argument("--backend", default=None, choices=["reference", "graphed", "megakernel"])
    p.add_argument("--device", default=None)
    p.add_argument("--batch", default="1", help="--decode: batch sizes, e.g. 1,2,4,8,16,32,64")
    p.add_argument("--output-dir", default="benchmarks/results")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError
    from .prompt import PromptError
    from .tokenizer import TokenizerError

    try:
        return args.func(args)
    except (UsageError, CheckpointError, PromptError, TokenizerError, ValueError) as exc:
        print(f"qwen-tts-mk {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qwen-tts-mk {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
