"""The `qwen-tts-mk` command line.

    qwen-tts-mk tiny-model DIR [--size 0.6b|1.7b] [--type custom_voice|voice_design|base] [--seed N] [--force]
    qwen-tts-mk say "text" -o out.{wav,flac,mp3,opus} [--model M] [--voice V] [--language L] [--speed S] ...
    qwen-tts-mk voices [list] [--model M] [--voices-dir D]
    qwen-tts-mk voices add NAME REF.wav (--text "transcript" | --x-vector-only) [--model M] [--voices-dir D]
    qwen-tts-mk voices remove NAME [--voices-dir D]
    qwen-tts-mk serve [--model M] [--backend B] [--host 127.0.0.1] [--port 8001] [--api-key K]
                      [--ray [--replicas N | --autoscale MIN..MAX] [--ray-ingress haproxy|proxy] [--gpus-per-replica 1]]
    qwen-tts-mk validate (--model M | --random-weights 0.6b) [--batch 1,2,7,16,64 [--frames 32] [--max-pos 1500]]
    qwen-tts-mk bench (--all | --decode | --server | --load | --serve-overhead)

A mistake the user can fix (a bad option value, a device this machine lacks, an output path that cannot be written,
an unknown voice, a missing model, empty text, ...) prints one line naming it and exits with status 2, never a
traceback; what can be checked before loading a model is checked first. On the CPU, PyTorch runs
$QWEN_TTS_MK_THREADS or --threads threads (default: half the CPUs this process may use, at least 1 and at most 16:
one per physical core, so that busy or hyper-threaded cores do not slow every step down).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time
from pathlib import Path

from . import DEFAULT_MODEL

PROG = "qwen-tts-mk"
THREADS_ENV = "QWEN_TTS_MK_THREADS"


class UsageError(Exception):
    """An error the user can fix; printed as one line."""


# Option types: a bad value is an argparse error, so it is reported as one line before anything runs.


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def seed_int(text: str) -> int:
    value = _int(text)
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2**64-1, got {text!r}")
    return value


def port_int(text: str) -> int:
    value = _int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 1 to 65535, got {text!r}")
    return value


def speed_value(text: str) -> float:
    from .time_stretch import check_speed

    try:
        return check_speed(float(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("speed ")) from None


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and defaults in every option's help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):
        help = action.help or ""
        shown = action.default is not None and action.default is not False and action.default != argparse.SUPPRESS
        if action.option_strings and "default" not in help and shown:
            help += f" (default: {action.default})"
        return help


# Checks that run before a model loads.


def check_device(args) -> None:
    """--device names a device this machine has, and --backend megakernel gets a CUDA one."""
    import torch

    name = args.device
    if name is not None:
        try:
            device = torch.device(name)
        except (RuntimeError, ValueError):
            raise UsageError(f"--device {name!r}: not a device (use cpu, cuda or cuda:N)") from None
        if device.type not in ("cpu", "cuda"):
            raise UsageError(f"--device {name!r}: unsupported device type (use cpu, cuda or cuda:N)")
        if device.type == "cuda":
            if not torch.cuda.is_available():
                build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
                raise UsageError(f"--device {name}: no CUDA GPU is available (PyTorch {torch.__version__} is "
                                 f"{build}); use --device cpu")
            count = torch.cuda.device_count()
            if device.index is not None and device.index >= count:
                raise UsageError(f"--device {name}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    on_cuda = (name is None and torch.cuda.is_available()) or (name is not None and name.startswith("cuda"))
    if getattr(args, "backend", None) == "megakernel" and not on_cuda:
        raise UsageError("--backend megakernel needs a CUDA GPU; use --backend reference on this machine")


def check_output(path: str) -> None:
    """The output file can be created (its folder exists and is writable), checked before any work."""
    out = Path(path)
    if out.is_dir():
        raise UsageError(f"--output {path}: is a directory")
    folder = out.parent
    if not folder.exists():
        raise UsageError(f"--output {path}: folder {folder} does not exist")
    if not folder.is_dir():
        raise UsageError(f"--output {path}: {folder} is not a folder")
    existed = out.exists()
    try:
        with open(out, "ab"):
            pass
    except OSError as exc:
        raise UsageError(f"--output {path}: cannot write it ({exc.strerror})") from None
    if not existed:
        out.unlink()


def check_text(text: str) -> None:
    if not text.strip():
        raise UsageError("text: empty (give the words to speak)")


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (listening starts when the server runs): a taken port fails before loading."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise UsageError(f"--host {host}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise UsageError(f"--host {host} --port {port}: cannot listen there ({exc.strerror})") from None
    sock.set_inheritable(True)
    return sock


def default_threads() -> int:
    """One thread per physical core (half the usable CPUs), 1..16."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(16, cpus // 2))


def set_threads(args) -> None:
    """PyTorch's CPU threads: --threads, else $QWEN_TTS_MK_THREADS, else default_threads()."""
    threads = getattr(args, "threads", None)
    if threads is None and os.environ.get(THREADS_ENV):
        try:
            threads = positive_int(os.environ[THREADS_ENV])
        except argparse.ArgumentTypeError as exc:
            raise UsageError(f"${THREADS_ENV}: {exc}") from None
    import torch

    torch.set_num_threads(threads or default_threads())


# Progress.


class Progress:
    """`with Progress("loading X") as p:` shows "loading X... 12 s" on stderr while it runs, then "loading X: done
    in 12.3 s", when stderr is a terminal (quiet otherwise); p.elapsed holds the seconds afterwards."""

    def __init__(self, what: str):
        self.what = what
        self.elapsed = 0.0
        self._shown = sys.stderr.isatty()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, daemon=True)

    def __enter__(self) -> "Progress":
        self._start = time.perf_counter()
        if self._shown:
            print(f"{self.what}...", end="", file=sys.stderr, flush=True)
            self._thread.start()
        return self

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            print(f"\r{self.what}... {time.perf_counter() - self._start:.0f} s", end="", file=sys.stderr, flush=True)

    def __exit__(self, exc_type, *exc) -> None:
        self.elapsed = time.perf_counter() - self._start
        if self._shown:
            self._stop.set()
            self._thread.join()
            status = "done" if exc_type is None else "failed"
            print(f"\r{self.what}: {status} in {self.elapsed:.1f} s", file=sys.stderr, flush=True)


def seconds_since_process_start() -> float | None:
    """Seconds since this process started (Linux /proc), which includes the interpreter's and PyTorch's imports."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


# Commands.


# `say -o` file extensions -> audio formats (server/audio_formats.py; all but wav need PyAV).
OUTPUT_FORMATS = {".wav": "wav", ".flac": "flac", ".mp3": "mp3", ".opus": "opus", ".ogg": "opus"}


def output_format(path: str) -> str:
    """The audio format that `path`'s extension names; UsageError for any other (checked before any work)."""
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise UsageError(f"--output {path}: unknown audio file extension {suffix or '(none)'!r}; use "
                         f"{', '.join(OUTPUT_FORMATS)}")
    name = OUTPUT_FORMATS[suffix]
    if name != "wav":
        import importlib.util

        if importlib.util.find_spec("av") is None:
            raise UsageError(f"--output {path}: writing {name} needs PyAV: pip install 'qwen-tts-megakernel[server]' "
                             "(or write a .wav)")
    return name


def write_audio(path: str | Path, pcm16, sample_rate: int) -> None:
    """Mono 16-bit audio in the format of the file's extension (wav, flac, mp3, opus)."""
    from .server.audio_formats import encode_whole

    data = encode_whole(output_format(str(path)), pcm16.astype("<i2").tobytes(), sample_rate)
    Path(path).write_bytes(data)


def _load(args):
    """(Synthesizer, seconds it took to load)."""
    from .engine import Synthesizer

    with Progress(f"loading {args.model} ({args.backend} backend)") as progress:
        synth = Synthesizer.from_pretrained(args.model, backend=args.backend, device=args.device, dtype=args.dtype)
    return synth, progress.elapsed


def cmd_tiny_model(args) -> int:
    from .synthetic import write_tiny_model

    out = Path(args.dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"DIR {args.dir}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise UsageError(f"DIR {args.dir}: folder exists and is not empty (add --force to overwrite it)")
    out = write_tiny_model(args.dir, size=args.size, model_type=args.type, seed=args.seed)
    print(f"wrote a tiny random {args.size} {args.type} checkpoint to {out}")
    return 0


def cmd_say(args) -> int:
    check_text(args.text)
    check_output(args.output)
    output_format(args.output)
    check_device(args)
    set_threads(args)
    synth, load_s = _load(args)
    stream = synth.stream(args.text, voice=args.voice, language=args.language, instruct=args.instruct,
                          seed=args.seed, max_new_tokens=args.max_new_tokens, text_layout=args.text_layout,
                          do_sample=not args.greedy, speed=args.speed)
    pieces = []
    frames = 0
    since_command = None
    chunks = iter(stream)
    with Progress("speaking: prefill and the first frame"):  # a minute or more with real weights on a CPU
        first = next(chunks, None)
    for chunk in _prepend(first, chunks):
        if since_command is None:
            since_command = seconds_since_process_start()
        pieces.append(chunk.pcm)
        frames += chunk.num_frames
        if sys.stderr.isatty():
            print(f"\r{frames} frames ({frames * 0.08:.2f} s of audio)", end="", file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    import numpy as np

    pcm = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int16)
    write_audio(args.output, pcm, synth.sample_rate)
    first = f"first chunk {1000 * (stream.first_chunk_s or 0):.0f} ms after the request"
    if since_command is not None:
        first += f", {since_command:.1f} s after the command"
    print(f"wrote {args.output}: {len(pcm) / synth.sample_rate:.2f} s ({frames} frames, stop reason "
          f"{stream.stop_reason}, seed {stream.seed}); loaded in {load_s:.1f} s; {first}")
    return 0


def cmd_voices(args) -> int:
    from .checkpoint import load_checkpoint
    from .voices import VoiceLibrary, speaker_encoder_fingerprint

    checkpoint = load_checkpoint(args.model)
    cfg = checkpoint.config
    print(f"model type: {cfg.model_type} ({cfg.size_label})")
    if cfg.model_type == "base":
        library = VoiceLibrary(args.voices_dir, speaker_encoder_fingerprint(checkpoint))
        stored = [f"{m['name']} ({m['layout'].replace('_', ' ')})" for m in library.list()
                  if m.get("speaker_encoder") == library.fingerprint]
        print(f"stored voices in {library.dir}:", ", ".join(stored) if stored else
              "(none: add one with `qwen-tts-mk voices add NAME REF.wav --text TRANSCRIPT`)")
    else:
        print("voices:", ", ".join(cfg.speakers) if cfg.speakers else "(none: describe the voice with --instruct)")
    print("languages:", ", ".join(cfg.languages))
    return 0


def cmd_voices_add(args) -> int:
    from .checkpoint import load_checkpoint
    from .voices import (ReferenceLimits, VoiceEncoder, VoiceLibrary, check_voice_name, read_reference_audio,
                         speaker_encoder_fingerprint)

    name = check_voice_name(args.name)
    if args.x_vector_only == bool(args.text):
        raise UsageError("give the clip's transcript with --text (in-context cloning, best quality), or "
                         "--x-vector-only (the speaker embedding alone)")
    try:
        with open(args.ref, "rb") as ref:  # at most one byte past the cap: never a whole /dev/zero
            data = ref.read(ReferenceLimits().max_bytes + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {args.ref}: {exc.strerror or exc}") from exc
    checkpoint = load_checkpoint(args.model)
    library = VoiceLibrary(args.voices_dir, speaker_encoder_fingerprint(checkpoint))
    if name in library:
        raise UsageError(f"a voice named {name!r} already exists in {library.dir}")
    audio = read_reference_audio(data, field=args.ref)
    start = time.perf_counter()
    voice = VoiceEncoder.from_checkpoint(checkpoint).clone(audio, ref_text=args.text, name=name)
    library.add(name, voice, duration_s=round(len(audio) / 24000, 3))
    kind = f"in-context, {len(voice.ref_codes)} reference frames" if voice.in_context else "x-vector only"
    print(f"added voice {name!r} ({kind}; {len(audio) / 24000:.1f} s clip, encoded in "
          f"{time.perf_counter() - start:.2f} s) to {library.dir}")
    return 0


def cmd_voices_remove(args) -> int:
    from .voices import VoiceLibrary

    library = VoiceLibrary(args.voices_dir, fingerprint="")
    library.remove(args.name)
    print(f"removed voice {args.name.lower()!r} from {library.dir}")
    return 0


def cmd_serve(args) -> int:
    if args.ray:
        from .server.ray_serve import run_serve_ray

        return run_serve_ray(args)
    if args.replicas is not None or args.autoscale is not None:
        raise UsageError("--replicas and --autoscale need --ray")
    import importlib.util

    if importlib.util.find_spec("uvicorn") is None or importlib.util.find_spec("fastapi") is None:
        raise UsageError("the server needs its extra: pip install -e '.[server]'")
    check_device(args)
    set_threads(args)
    args.socket = bind(args.host, args.port)
    from .server.app import run_serve

    try:
        return run_serve(args)
    finally:
        args.socket.close()


def cmd_validate(args) -> int:
    import torch

    if not torch.cuda.is_available():
        raise UsageError("validate compares the megakernel with the reference on a CUDA GPU; none is available")
    if args.model is None and args.random_weights is None:
        args.random_weights = "0.6b"
    if args.output is not None:
        check_output(args.output)
    from .tools.validate import main_validate

    return main_validate(args)


def cmd_bench(args) -> int:
    if sum((args.all, args.decode, args.server, args.load, args.serve_overhead)) != 1:
        raise UsageError("bench needs exactly one of --all, --decode, --server, --load or --serve-overhead")
    if args.device is not None:
        check_device(args)
    set_threads(args)
    if args.all:
        from .tools.bench_all import run_all

        return run_all(args)
    if args.decode:
        from .tools.mk_bench import main_bench_decode

        return main_bench_decode(args)
    if args.server:
        from .tools.server_bench import run_bench_server

        return run_bench_server(args)
    if args.serve_overhead:
        from .tools.serve_overhead import run_bench_serve_overhead

        return run_bench_serve_overhead(args)
    from .tools.load_bench import run_bench_load

    return run_bench_load(args)



def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="a Hugging Face id, a local folder in the official layout, or random:0.6b / random:1.7b")
    p.add_argument("--backend", default="reference", choices=["reference", "graphed", "megakernel"],
                   help="reference (PyTorch, CPU or CUDA) or megakernel (CUDA)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="talker precision (default: bfloat16 on CUDA, float32 on CPU)")
    _add_threads_arg(p)


def _add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=positive_int, default=None,
                   help=f"PyTorch CPU threads (default: ${THREADS_ENV}, else half the usable CPUs, now "
                        f"{default_threads()})")


def _prepend(first, rest):
    if first is not None:
        yield first
    yield from rest


def build_parser(server_settings: bool = True) -> argparse.ArgumentParser:
    """The parser; `server_settings` False leaves out serve's limit options (their definitions import the server
    and PyTorch, which `--help` and every other command do not need)."""
    parser = Parser(prog=PROG, description="Streaming Qwen3-TTS on a decode megakernel")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    p = sub.add_parser("tiny-model", help="write a tiny random checkpoint in the official layout (tests, demos)")
    p.add_argument("dir", metavar="DIR", help="folder to write (created; must be empty unless --force)")
    p.add_argument("--size", default="0.6b", choices=["0.6b", "1.7b"], help="which model's layout to copy")
    p.add_argument("--type", default="custom_voice", choices=["custom_voice", "voice_design", "base"],
                   help="model type")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the random weights")
    p.add_argument("--force", action="store_true", help="overwrite a folder that is not empty (default: refuse)")
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("say", help="speak a text into an audio file")
    p.add_argument("text", help="the words to speak")
    p.add_argument("-o", "--output", required=True,
                   help="output path; its extension picks the format: .wav, .flac, .mp3, .opus/.ogg (its folder "
                        "must exist)")
    _add_model_args(p)
    p.add_argument("--voice", default=None,
                   help="speaker of a custom voice model (default: ryan); see `qwen-tts-mk voices`")
    p.add_argument("--language", default="auto",
                   help="a language of the model (english, ...), an ISO code or tag (en, en-US), or auto")
    p.add_argument("--speed", type=speed_value, default=1.0, help="speaking rate, 0.25-4.0 (pitch kept)")
    p.add_argument("--instruct", default=None,
                   help="voice description (voice design, 1.7B custom voice; default: none)")
    p.add_argument("--seed", type=seed_int, default=None, help="sampling seed (default: a random one, printed)")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="frame limit, 80 ms each (default: the checkpoint's generation config)")
    p.add_argument("--text-layout", default="prefill", choices=["prefill", "interleaved"],
                   help="all text in the prompt, or one text token per frame")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (default: sampling; greedy degenerates)")
    p.set_defaults(func=cmd_say)

    p = sub.add_parser("voices", help="list a model's voices and languages; add or remove cloned voices")
    voices_dir = dict(type=Path, default=None, help="stored voices (default: $QWEN_TTS_MK_VOICES_DIR or "
                                                    "~/.cache/qwen-tts-megakernel/voices)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"a Hugging Face id or a local folder (default: {DEFAULT_MODEL})")
    p.add_argument("--voices-dir", **voices_dir)
    p.set_defaults(func=cmd_voices)
    actions = p.add_subparsers(dest="action", help="list (default), add or remove")
    voices_dir["default"] = argparse.SUPPRESS  # given before or after the action, either works
    a = actions.add_parser("list", help="built-in speakers, stored voices and languages")
    a.add_argument("--model", default=argparse.SUPPRESS)
    a.add_argument("--voices-dir", **voices_dir)
    a.set_defaults(func=cmd_voices)
    a = actions.add_parser("add", help="clone a voice from a reference clip (Base models) and store it")
    a.add_argument("name", help="1-64 of a-z, 0-9, '_', '-'")
    a.add_argument("ref", help="reference clip: wav, flac, ogg/opus or mp3, 1-30 s (3-10 s of clear speech)")
    how = a.add_mutually_exclusive_group(required=True)
    how.add_argument("--text", default=None, help="what the clip says (in-context cloning, best quality)")
    how.add_argument("--x-vector-only", action="store_true", help="use the speaker embedding alone (no transcript)")
    a.add_argument("--model", default=argparse.SUPPRESS)
    a.add_argument("--voices-dir", **voices_dir)
    a.set_defaults(func=cmd_voices_add)
    a = actions.add_parser("remove", help="delete a stored voice")
    a.add_argument("name")
    a.add_argument("--voices-dir", **voices_dir)
    a.set_defaults(func=cmd_voices_remove)

    p = sub.add_parser("serve", help="run the streaming HTTP/WebSocket server")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=port_int, default=8001, help="port to listen on")
    p.add_argument("--api-key", default=None,
                   help="require Authorization: Bearer KEY (default: $QWEN_TTS_MK_API_KEY, else none)")
    p.add_argument("--allow-unauthenticated-public", action="store_true",
                   help="allow binding a non-loopback address without --api-key")
    if server_settings:
        from .server.protocol import ServerSettings

        ServerSettings.add_arguments(p)
    p.add_argument("--ray", action="store_true", help="serve on Ray Serve: one engine per replica (GPU), one address")
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=None, help="--ray: replicas (default 1)")
    scale.add_argument("--autoscale", default=None, metavar="MIN..MAX", help="--ray: replicas follow the load between MIN and MAX (default: off, a fixed count)")
    p.add_argument("--ray-ingress", default="haproxy", choices=["haproxy", "proxy"],
                   help="--ray: Serve's HAProxy ingress, straight to a replica, or its Python proxy "
                        "(default haproxy)")
    p.add_argument("--gpus-per-replica", type=float, default=1.0, help="--ray: 0 serves on CPUs (default 1)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="--ray: (default 1)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("validate", help="compare the megakernel with the reference backend on the GPU")
    p.add_argument("--model", default=None, help="a Hugging Face id or a local folder (default: --random-weights)")
    p.add_argument("--random-weights", default=None, choices=["0.6b", "1.7b"],
                   help="random weights of the real shapes (default: 0.6b when no --model)")
    p.add_argument("--frames", type=positive_int, default=None, help="frames per stream (default 64; with --batch 32)")
    p.add_argument("--batch", default=None, help="batch sizes to check, e.g. 1,2,7,16,64 (streams at mixed "
                                                 "positions, batch invariance; default: one stream)")
    p.add_argument("--max-pos", type=positive_int, default=1500,
                   help="with --batch: the longest prompt in rows; prompts spread over 20..max-pos (default 1500)")
    p.add_argument("--output", default=None,
                   help="JSON report path (default: benchmarks/results/validate-<model>.json)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("bench", help="benchmarks (GPU)")
    p.add_argument("--decode", action="store_true", help="megakernel decode step vs reference baselines")
    p.add_argument("--server", action="store_true", help="server time to first chunk and RTF over loopback")
    p.add_argument("--all", action="store_true", help="everything vs the alternatives, one process (GPU)")
    p.add_argument("--load", action="store_true",
                   help="a fleet of calls over loopback: closed and open loop, listener underruns (GPU)")
    p.add_argument("--serve-overhead", action="store_true",
                   help="time to first audio added by Ray Serve over the direct server, 1 and 16 streams ([ray])")
    p.add_argument("--backends", nargs="+", default=None, choices=["reference", "graphed", "megakernel"],
                   help="--load: backends to run (default: megakernel)")
    p.add_argument("--models", nargs="+", default=None, help="--load: models (default: random:0.6b)")
    p.add_argument("--levels", nargs="+", type=positive_int, default=None,
                   help="--load: closed-loop stream counts (default: 1 8 16 32 64 128)")
    p.add_argument("--rates", nargs="+", type=float, default=None,
                   help="--load: open-loop requests per second, tried in order until p95 TTFA > 200 ms "
                        "(default: 2 5 10 20 40 60 80 120)")
    p.add_argument("--protocols", nargs="+", default=None, choices=["http", "ws"],
                   help="--load: protocols (default: both)")
    p.add_argument("--frames", type=positive_int, default=None,
                   help="--load: frames per request (default: 100 = 8 s)")
    p.add_argument("--open-loop-after-closed", action="store_true",
                   help="--load: one server, open loop after the closed loop warmed it (default: the open loop "
                        "first, against a freshly started server per protocol)")
    p.add_argument("--server-logs", type=Path, default=None, metavar="DIR",
                   help="--load: keep each server's log in DIR (with $QWEN_TTS_MK_STEP_LOG=N: the engine's "
                        "step-time table every N steps; default: logs are not kept)")
    p.add_argument("--runs", type=positive_int, default=5, help="repetitions per measurement (--all)")
    p.add_argument("--only", nargs="+", default=None, metavar="SECTION",
                   help="--all: run just these sections (decode, streaming, ttfc_breakdown, streaming_plot, "
                        "official, server, pipecat) into <gpu>-only-<sections>.json, leaving <gpu>.json alone "
                        "(default: all sections)")
    p.add_argument("--official-site", default=None,
                   help="a site directory holding the official qwen-tts and its pinned transformers (--all; "
                        "default: the installed one)")
    p.add_argument("--model", default=None, help="a Hugging Face id or a local folder (default: --random-weights)")
    p.add_argument("--random-weights", default="0.6b", choices=["0.6b", "1.7b"],
                   help="random weights of the real shapes")
    p.add_argument("--backend", default=None, choices=["reference", "graphed", "megakernel"],
                   help="--server: the server's backend (default: megakernel on a GPU, else reference)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda)")
    p.add_argument("--ray-ingress", default=None, choices=["haproxy", "proxy"],
                   help="--serve-overhead: measure one of Serve's ingresses (default: both)")
    p.add_argument("--batch", default="1", help="--decode: batch sizes, e.g. 1,2,4,8,16,32,64 (default 1)")
    _add_threads_arg(p)
    p.add_argument("--output-dir", default="benchmarks/results", help="where results are written")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    command = next((w for w in words if not w.startswith("-")), None)
    args = build_parser(server_settings=command == "serve").parse_args(argv)
    from .checkpoint import CheckpointError
    from .megakernel.build import BuildError
    from .prompt import PromptError
    from .tokenizer import TokenizerError

    try:
        return args.func(args)
    except (UsageError, CheckpointError, PromptError, TokenizerError, BuildError, ValueError) as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
