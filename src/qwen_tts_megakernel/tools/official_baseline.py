"""What a user would run instead: the official qwen-tts package's generate, timed on the same checkpoint and GPU.

Runs in its own process (the official package pins transformers 4.57.3, which the benchmark loads from a separate
site directory), prints one JSON object on stdout:

    python -m qwen_tts_megakernel.tools.official_baseline --model DIR --frames 25 100 400 --runs 3

For each frame count: time to complete audio (generate + speech-tokenizer decode; the official API returns audio
only at the end), its real-time factor, and the frames actually produced. Random weights rarely emit EOS, so
max_new_tokens fixes the frame count (the official generate completes max_new_tokens - 1 frames).
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import statistics
import sys
import time
import types


FRAME_S = 0.08  # one 12.5 Hz frame of audio


def stub_torchaudio_if_missing() -> None:
    """The official package imports torchaudio.compliance.kaldi for its 25 Hz tokenizer only, which the 12 Hz
    models never use; where no torchaudio is installed, a bare module with a spec stands in for that one import."""
    try:
        import torchaudio  # noqa: F401
        return
    except ImportError:
        pass
    for name in ("torchaudio", "torchaudio.compliance", "torchaudio.compliance.kaldi"):
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=not name.endswith("kaldi"))
        if not name.endswith("kaldi"):
            mod.__path__ = []
        sys.modules[name] = mod
    sys.modules["torchaudio"].compliance = sys.modules["torchaudio.compliance"]
    sys.modules["torchaudio.compliance"].kaldi = sys.modules["torchaudio.compliance.kaldi"]


def frames_summary(frames: int, runs: list[tuple[float, float]]) -> dict:
    """One frame count's figures from its runs' (seconds to the complete audio, audio seconds)."""
    from .common import summary

    times = [t for t, _ in runs]
    audio_s = statistics.median(a for _, a in runs)
    elapsed = summary(times)
    return {
        "frames_requested": frames,
        "frames_produced": [round(a / FRAME_S) for _, a in runs],
        "time_to_complete_audio_ms": {"median": 1000 * elapsed["median"], "p95": 1000 * elapsed["p95"],
                                      "all": [1000 * t for t in times]},
        "rtf_median": elapsed["median"] / audio_s if audio_s else None,
        "ms_per_frame_median": 1000 * elapsed["median"] / max(1, round(audio_s / FRAME_S)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--frames", type=int, nargs="+", default=[25, 100, 400])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--text", default="Hello there, this is a benchmark of the official implementation.")
    args = parser.parse_args(argv)

    stub_torchaudio_if_missing()
    import torch
    import transformers
    from qwen_tts import Qwen3TTSModel


    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    model = Qwen3TTSModel.from_pretrained(args.model, device_map=args.device, dtype=dtype)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    speaker = next(iter(model.get_supported_speakers() or []), None)

    def run(frames: int) -> tuple[float, float]:
        """Seconds to the complete audio of `frames` frames, and that audio's duration in seconds."""
        sync()
        start = time.perf_counter()
        wavs, sr = model.generate_custom_voice(text=args.text, speaker=speaker, language="English",
                                               max_new_tokens=frames + 1)
        sync()
        return time.perf_counter() - start, len(wavs[0]) / sr

    run(8)  # warm-up: kernels, caches, allocator
    results = []
    for frames in args.frames:
        results.append(frames_summary(frames, [run(frames) for _ in range(args.runs)]))
    print(json.dumps({"package": "qwen-tts 0.1.1", "transformers": transformers.__version__,
                      "torch": torch.__version__, "device": torch.cuda.get_device_name() if cuda else "cpu",
                      "attn_implementation": "sdpa (flash-attn not installed)", "dtype": str(dtype).removeprefix("torch."),
                      "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
