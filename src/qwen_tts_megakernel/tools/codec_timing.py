"""Streaming codec decode time, eager against CUDA graphs, on the real codec shapes (random weights).

    python -m qwen_tts_megakernel.tools.codec_timing [--runs 30] [--chunks 1 8] [--out FILE]

prints one JSON object: per chunk size, one `StreamingCodecDecoder.push` on a stream past its attention window
(median and p95 ms over `runs`, each push synchronised), the first 1-frame push of a fresh utterance, the time to
capture the graphs, and the largest sample difference between the two paths over the same pushes.
`codec_decode_timing(decoder)` is the same measurement for any decoder (bench_all.py can call it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .common import summary
from ..codec import (
    CodecDecoder,
    CodecDecoderConfig,
    StreamingCodecDecoder,
)
from ..synthetic.checkpoints import real_speech_tokenizer_config
from ..synthetic.codec import random_speech_tokenizer_weights


def real_codec(device: torch.device, seed: int = 1) -> CodecDecoder:
    """The codec decoder with the released speech tokenizer's shapes and random weights (fp32), as in
    synthetic.random_checkpoint (whose codec seed is its seed + 1)."""
    config = real_speech_tokenizer_config()
    weights = random_speech_tokenizer_weights(config, seed)
    return CodecDecoder.from_state_dict(CodecDecoderConfig.from_json_dict(config), weights, device=device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def codec_decode_timing(decoder: CodecDecoder, chunk_sizes: tuple[int, ...] = (1, 8), runs: int = 20,
                        context_frames: int = 80) -> dict:
    """Eager and graphed push times of `decoder` (see the module docstring). `context_frames` are pushed first
    (8 at a time) so the timed pushes see a full attention window; the default passes the real 72-frame one."""
    device = decoder.device
    gen = torch.Generator().manual_seed(0)
    total = context_frames + runs * sum(chunk_sizes)
    codes = torch.randint(0, decoder.cfg.codebook_size, (total, decoder.cfg.num_quantizers), generator=gen)
    codes = codes.to(device)

    start = time.perf_counter()
    decoder.streaming_graphs().warm_up()
    _sync(device)
    capture_s = time.perf_counter() - start

    def first_push_ms(use_graphs: bool) -> list[float]:
        times = []
        for _ in range(runs):
            _sync(device)
            t0 = time.perf_counter()
            StreamingCodecDecoder(decoder, use_graphs=use_graphs).push(codes[:1])
            _sync(device)
            times.append(1000 * (time.perf_counter() - t0))
        return times

    def stream(use_graphs: bool) -> tuple[dict[int, list[float]], torch.Tensor]:
        """One utterance: the context, then `runs` timed pushes of each chunk size. Times and all samples."""
        decoder_stream = StreamingCodecDecoder(decoder, use_graphs=use_graphs)
        wavs = [decoder_stream.push(codes[i : min(i + 8, context_frames)]) for i in range(0, context_frames, 8)]
        i = context_frames
        times: dict[int, list[float]] = {n: [] for n in chunk_sizes}
        for n in chunk_sizes:
            for _ in range(runs):
                _sync(device)
                t0 = time.perf_counter()
                wavs.append(decoder_stream.push(codes[i : i + n]))
                _sync(device)
                times[n].append(1000 * (time.perf_counter() - t0))
                i += n
        return times, torch.cat(wavs)

    for use_graphs in (False, True):  # warm-up: library initialisation, kernel choice
        first_push_ms(use_graphs)
    eager_first, graphed_first = first_push_ms(False), first_push_ms(True)
    eager_times, eager_wav = stream(False)
    graphed_times, graphed_wav = stream(True)

    push = {}
    for n in chunk_sizes:
        eager, graphed = summary(eager_times[n]), summary(graphed_times[n])
        push[str(n)] = {"eager": eager, "graphed": graphed, "graphed_per_frame_ms": graphed["median"] / n,
                        "speedup": eager["median"] / graphed["median"]}
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "graphs": decoder.streaming_graphs().use_graphs,  # False off CUDA: the "graphed" path then runs eagerly
        "dtype": str(decoder.quantizer.codebooks.dtype),
        "runs": runs,
        "context_frames": context_frames,
        "capture_s": capture_s,
        "first_push_1_frame_ms": {"eager": summary(eager_first), "graphed": summary(graphed_first)},
        "push_ms": push,
        "max_abs_diff_graphed_vs_eager": (graphed_wav - eager_wav).abs().max().item(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 8], help="chunk sizes in frames")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="also write the JSON to this file")
    args = parser.parse_args(argv)
    result = codec_decode_timing(real_codec(torch.device(args.device)), tuple(args.chunks), args.runs)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
