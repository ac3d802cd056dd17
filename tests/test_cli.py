"""The command line as a user meets it: every mistake is one line on stderr and exit status 2 (no traceback, nothing
loaded or generated first), every option's help says its default, threads are bounded; and the megakernel library
lookup: prebuilt before cache before nvcc before PTX, one clear line when nothing fits, and the wheel build hook.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import wave
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from qwen_tts_megakernel import cli
from qwen_tts_megakernel.megakernel import build
from qwen_tts_megakernel.synthetic import write_tiny_model

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = not torch.cuda.is_available()

# (id, argv, expected text in the one line, extra environment); {tiny}, {tmp}, {busy_port} filled in below.
MISTAKES = [
    ("unknown-command", ["speak", "hi"], "invalid choice", {}),
    ("missing-output", ["say", "hi"], "required: -o/--output", {}),
    ("unknown-device", ["say", "hi", "-o", "{tmp}/a.wav", "--device", "tpu"], "--device 'tpu': not a device", {}),
    ("unsupported-device", ["say", "hi", "-o", "{tmp}/a.wav", "--device", "meta"], "unsupported device type", {}),
    ("bad-dtype", ["say", "hi", "-o", "{tmp}/a.wav", "--dtype", "float64"], "invalid choice", {}),
    ("output-folder-missing", ["say", "hi", "-o", "{tmp}/no/such/folder/a.wav", "--model", "{tiny}"],
     "does not exist", {}),
    ("output-is-folder", ["say", "hi", "-o", "{tmp}", "--model", "{tiny}"], "is a directory", {}),
    ("output-unwritable", ["say", "hi", "-o", "/proc/qwen-tts-test.wav", "--model", "{tiny}"], "cannot write it", {}),
    ("empty-text", ["say", "   ", "-o", "{tmp}/a.wav", "--model", "{tiny}"], "text: empty", {}),
    ("zero-frames", ["say", "hi", "-o", "{tmp}/a.wav", "--max-new-tokens", "0"], "must be a positive integer", {}),
    ("seed-not-int", ["say", "hi", "-o", "{tmp}/a.wav", "--seed", "abc"], "must be an integer, got 'abc'", {}),
    ("negative-seed", ["say", "hi", "-o", "{tmp}/a.wav", "--seed", "-1"], "from 0 to 2**64-1", {}),
    ("zero-threads", ["say", "hi", "-o", "{tmp}/a.wav", "--threads", "0"], "must be a positive integer", {}),
    ("threads-env", ["say", "hi", "-o", "{tmp}/a.wav", "--model", "{tiny}"], "$QWEN_TTS_MK_THREADS: must be",
     {"QWEN_TTS_MK_THREADS": "many"}),
    ("bad-layout", ["say", "hi", "-o", "{tmp}/a.wav", "--text-layout", "diagonal"], "invalid choice", {}),
    ("missing-model", ["say", "hi", "-o", "{tmp}/a.wav", "--model", "{tmp}/no-model"], "neither an existing folder",
     {}),
    ("unknown-language", ["say", "hi", "-o", "{tmp}/a.wav", "--model", "{tiny}", "--language", "klingon"],
     "klingon", {}),
    ("unknown-extension", ["say", "hi", "-o", "{tmp}/a.xyz", "--model", "{tiny}"],
     "unknown audio file extension '.xyz'; use .wav, .flac, .mp3, .opus, .ogg", {}),
    ("voices-add-neither", ["voices", "add", "x", "{tmp}/r.wav"], "one of the arguments --text --x-vector-only is "
     "required", {}),
    ("bad-speed", ["say", "hi", "-o", "{tmp}/a.wav", "--speed", "9"], "must be between 0.25 and 4.0, got 9.0", {}),
    ("unknown-voice", ["say", "hi", "-o", "{tmp}/a.wav", "--model", "{tiny}", "--voice", "nobody"], "nobody", {}),
    ("port-out-of-range", ["serve", "--port", "70000"], "from 1 to 65535", {}),
    ("port-taken", ["serve", "--model", "{tmp}/no-model", "--device", "cpu", "--port", "{busy_port}"],
     "cannot listen there", {}),
    ("tiny-model-not-empty", ["tiny-model", "{tiny}"], "add --force", {}),
    ("bench-without-mode", ["bench"], "exactly one of --all, --decode, --server, --load or --serve-overhead", {}),
]
if NO_CUDA:
    MISTAKES += [
        ("cuda-on-cpu-machine", ["say", "hi", "-o", "{tmp}/a.wav", "--device", "cuda"], "no CUDA GPU is available",
         {}),
        ("megakernel-on-cpu-machine", ["say", "hi", "-o", "{tmp}/a.wav", "--backend", "megakernel"],
         "--backend megakernel needs a CUDA GPU", {}),
        ("validate-on-cpu-machine", ["validate", "--random-weights", "0.6b"], "CUDA GPU", {}),
    ]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every mistake run as `python -m qwen_tts_megakernel.cli ...`, a few at a time: id -> CompletedProcess."""
    tmp = tmp_path_factory.mktemp("cli")
    tiny = write_tiny_model(tmp / "tiny", "0.6b", "custom_voice", seed=0)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    fill = {"tiny": str(tiny), "tmp": str(tmp), "busy_port": str(busy.getsockname()[1])}

    def run(case):
        name, argv, _, env = case
        cmd = [sys.executable, "-m", "qwen_tts_megakernel.cli", *(a.format(**fill) for a in argv)]
        return name, subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, **env})

    try:
        with ThreadPoolExecutor(max_workers=3) as pool:
            yield dict(pool.map(run, MISTAKES)) | {"_tmp": tmp}
    finally:
        busy.close()


@pytest.mark.parametrize("case", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_mistake_is_one_line_and_exit_2(results, case):
    name, _, expected, _ = case
    proc = results[name]
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("qwen-tts-mk") and "error:" in lines[0], lines[0]
    assert expected in lines[0], lines[0]
    assert proc.stdout == ""


def test_nothing_written_by_a_failed_say(results):
    tmp = results["_tmp"]
    assert not (tmp / "a.wav").exists()
    assert not Path("/proc/qwen-tts-test.wav").exists()


def test_say_writes_the_wav_and_reports_the_first_chunk(results):
    tmp = results["_tmp"]
    out = tmp / "said.wav"
    cmd = [sys.executable, "-m", "qwen_tts_megakernel.cli", "say", "Hello there.", "-o", str(out), "--model",
           str(tmp / "tiny"), "--max-new-tokens", "5", "--seed", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # progress only on a terminal
    assert "(5 frames, stop reason max_new_tokens, seed 3)" in proc.stdout and "after the command" in proc.stdout
    with wave.open(str(out), "rb") as f:
        assert (f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()) == (1, 2, 24000, 5 * 1920)


def test_tiny_model_overwrites_with_force(tmp_path):
    (tmp_path / "old.txt").write_text("x")
    cmd = [sys.executable, "-m", "qwen_tts_megakernel.cli", "tiny-model", str(tmp_path), "--force"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "config.json").exists()


def test_say_encodes_by_the_extension(results):
    av = pytest.importorskip("av")
    tmp = results["_tmp"]
    out = tmp / "said.mp3"
    cmd = [sys.executable, "-m", "qwen_tts_megakernel.cli", "say", "Hello there.", "-o", str(out), "--model",
           str(tmp / "tiny"), "--max-new-tokens", "5", "--seed", "3", "--language", "en"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:3] in (b"ID3", b"\xff\xfb", b"\xff\xf3")  # an MP3, not a WAV under its name
    with av.open(str(out)) as container:
        stream = container.streams.audio[0]
        assert stream.codec_context.name.startswith("mp3") and stream.codec_context.sample_rate == 24000
        samples = sum(frame.samples for frame in container.decode(audio=0))
    assert abs(samples - 5 * 1920) <= 2 * 1152  # the encoder's priming and padding


def test_help_is_fast_and_imports_no_torch():
    """`qwen-tts-mk --help` parses without importing PyTorch (seconds of import) and returns in under a second."""
    import time

    probe = ("import sys\nfrom qwen_tts_megakernel import cli\ntry:\n    cli.main(['--help'])\n"
             "except SystemExit:\n    pass\nprint('TORCH' if 'torch' in sys.modules else 'NO TORCH')")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("NO TORCH"), proc.stdout + proc.stderr
    timings = []
    for _ in range(3):  # the best of three: a loaded machine's worst moment is not the CLI's start-up
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "qwen_tts_megakernel.cli", "--help"], capture_output=True,
                              text=True, timeout=60)
        timings.append(time.perf_counter() - start)
        assert proc.returncode == 0 and "COMMAND" in proc.stdout
    assert min(timings) < 1.0, timings


def test_every_option_says_its_default():
    parser = cli.build_parser()
    formatter = cli.HelpFormatter("qwen-tts-mk")
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    checked = 0
    for command, sub in subparsers.choices.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{command} {action.dest}: no help text"
            if action.option_strings and not action.required and not isinstance(action, argparse._StoreTrueAction):
                assert "default" in formatter._get_help_string(action), f"{command} {action.option_strings}"
                checked += 1
    assert checked >= 30


def test_thread_default_and_override(monkeypatch):
    assert 1 <= cli.default_threads() <= 16
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv(cli.THREADS_ENV, "3")
        cli.set_threads(argparse.Namespace(threads=None))
        assert torch.get_num_threads() == 3
        cli.set_threads(argparse.Namespace(threads=2))  # the option wins over the environment
        assert torch.get_num_threads() == 2
        monkeypatch.delenv(cli.THREADS_ENV)
        cli.set_threads(argparse.Namespace(threads=None))
        assert torch.get_num_threads() == cli.default_threads()
    finally:
        torch.set_num_threads(before)


# The megakernel library lookup (no GPU needed: the architecture is given, nothing is loaded).


@pytest.fixture
def lookup(tmp_path, monkeypatch):
    """A package prebuilt/ folder and a cache of our own, and an nvcc that must not run unless a test allows it."""
    monkeypatch.setattr(build, "PREBUILT", tmp_path / "prebuilt")
    monkeypatch.setenv("QWEN_TTS_MK_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("QWEN_TTS_MK_DEFINES", raising=False)
    compiled = []

    def fake_compile(arch, out, extra_flags=None, verbose=False):
        compiled.append(arch)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"compiled")
        return out

    monkeypatch.setattr(build, "compile_library", fake_compile)
    monkeypatch.setattr(build, "find_nvcc", lambda: "/fake/nvcc")
    return tmp_path, compiled


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"lib")
    return path


def test_prebuilt_library_is_picked_over_nvcc(lookup):
    tmp, compiled = lookup
    lib = _touch(build.library_path("90a", tmp / "prebuilt"))
    assert build.find_library("90a") == lib
    assert compiled == []


def test_cache_then_nvcc_when_nothing_is_prebuilt(lookup):
    tmp, compiled = lookup
    _touch(build.library_path("ptx", tmp / "prebuilt"))  # PTX is the last resort, after nvcc
    path = build.find_library("90a")
    assert path == build.library_path("90a") and path.is_relative_to(tmp / "cache") and compiled == ["90a"]
    assert build.find_library("90a") == path and compiled == ["90a"]  # cached: compiled once


def test_prebuilt_library_of_other_sources_is_not_used(lookup, monkeypatch):
    tmp, compiled = lookup
    stale = _touch(build.library_path("90a", tmp / "prebuilt"))
    monkeypatch.setenv("QWEN_TTS_MK_DEFINES", "MK_RING=5")  # a variant: other flags, other key
    assert build.find_library("90a") != stale and compiled == ["90a"]


def test_ptx_library_without_nvcc(lookup, monkeypatch):
    tmp, compiled = lookup
    monkeypatch.setattr(build, "find_nvcc", _no_nvcc)
    ptx = _touch(build.library_path("ptx", tmp / "prebuilt"))
    assert build.find_library("103a") == ptx and compiled == []
    with pytest.raises(build.BuildError, match="for sm_75"):  # older than the PTX: no library
        build.find_library("75")


def test_one_clear_line_without_nvcc_or_prebuilt_library(lookup, monkeypatch):
    monkeypatch.setattr(build, "find_nvcc", _no_nvcc)
    with pytest.raises(build.BuildError) as err:
        build.find_library("90a")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("no nvcc and no prebuilt megakernel library for sm_90a")


def _no_nvcc():
    raise build.BuildError("nvcc not found")


def test_library_key_covers_every_source_and_the_flags():
    assert {p.name for p in build.sources()} >= {"megakernel.cu", "mk_common.cuh"}
    assert build.source_hash("90a") != build.source_hash("80")
    assert "-gencode=arch=compute_80,code=compute_80" in build.nvcc_flags("ptx")
    assert set(build.PREBUILT_TARGETS) >= {"80", "86", "89", "90a", "100a", "120a", "ptx"}


def test_wheel_build_hook_puts_prebuilt_libraries_in_the_wheel(tmp_path):
    """setup.py with QWEN_TTS_MK_PREBUILD, an nvcc stand-in (writes the -o file): a platform wheel holding each
    target's library where find_library looks; without the variable, or without nvcc, a pure wheel with none."""
    src = tmp_path / "src-tree"
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "prebuilt", "*.egg-info"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    nvcc = tmp_path / "nvcc"
    nvcc.write_text('#!/bin/sh\nwhile [ "$1" != "-o" ]; do shift; done; echo lib > "$2"\n')
    nvcc.chmod(0o755)
    env = {**os.environ, "NVCC": str(nvcc), "QWEN_TTS_MK_PREBUILD": "90a ptx"}
    env.pop("QWEN_TTS_MK_DEFINES", None)
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(src), "-w"]
    proc = subprocess.run([*cmd, str(tmp_path / "kernels")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "kernels").glob("*.whl")
    assert wheel.name.endswith("-py3-none-linux_x86_64.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for target in ("90a", "ptx"):
        expected = f"qwen_tts_megakernel/megakernel/prebuilt/{build.source_hash(target)}-{target}/{build.LIB_NAME}"
        assert expected in names
    no_nvcc = {**env, "NVCC": str(tmp_path / "missing"), "CUDA_HOME": str(tmp_path / "missing"),
               "PATH": os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not (Path(p) / "nvcc").exists())}
    del env["QWEN_TTS_MK_PREBUILD"]
    for name, build_env in (("unset", env), ("no-nvcc", no_nvcc)):
        proc = subprocess.run([*cmd, str(tmp_path / name)], capture_output=True, text=True, env=build_env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (wheel,) = (tmp_path / name).glob("*.whl")
        assert wheel.name.endswith("-py3-none-any.whl")
        assert not any("/prebuilt/" in n for n in zipfile.ZipFile(wheel).namelist())
