"""`bench --all`'s report code on results built by each section's own producer, so that a result key renamed on
one side (the decode section once read the one-stream keys of a result that had become batched) fails on a CPU.

The streaming and first-chunk sections run for real, on a tiny CPU checkpoint with the reference backend; the
GPU-only sections (decode, server, official, Pipecat) get their result from the producer's summary function fed
with made-up raw measurements.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from qwen_tts_megakernel.engine import Synthesizer
from qwen_tts_megakernel.synthetic import write_tiny_model
from qwen_tts_megakernel.tools import bench_all
from qwen_tts_megakernel.tools.mk_bench import format_md, summarize_decode
from qwen_tts_megakernel.tools.official_baseline import frames_summary
from qwen_tts_megakernel.tools.server_bench import level_summary

ROOT = Path(__file__).resolve().parent.parent


def readme_script():
    spec = importlib.util.spec_from_file_location("update_readme_table", ROOT / "scripts" / "update_readme_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def decode_result() -> dict:
    raw = {"frame_stream_only_ms": 1.5, "talker_step_stream_only_ms": 0.5}
    for b, ms in zip(bench_all.DECODE_BATCHES, (4.5, 7.8, 23.6)):
        raw[str(b)] = {"positions": [50] * b, "kv_bytes": 1_000_000 * b, "frame_ms": ms, "frame_ms_p90": ms * 1.1,
                       "talker_step_ms": ms / 3, "talker_step_ms_p90": ms / 2.9, "step_wall_ms": ms + 0.2}
    res = summarize_decode(gpu="Fake GPU", size="0.6b", blocks=132, weight_bytes={"frame": 2_000_000_000,
                           "talker": 1_000_000_000}, matvec_GBps=4000.0, megakernel=raw,
                           batches=bench_all.DECODE_BATCHES, memory_per_stream=100 << 20, hidden_size=1024)
    res["reference_graphs"] = {str(b): {"talker_step_ms": 9.0, "frame_ms": 30.0} for b in bench_all.DECODE_BATCHES}
    res["reference_graphs"]["note"] = "bf16"
    return res


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_bench")
    write_tiny_model(path, "0.6b", "custom_voice", seed=0)
    s = Synthesizer.from_pretrained(str(path), device="cpu")
    yield s
    s.close()


@pytest.fixture(scope="module")
def report(synth) -> dict:
    pipecat_bench = pytest.importorskip("qwen_tts_megakernel.tools.pipecat_bench")
    sections = {
        "decode": decode_result(),
        "streaming": bench_all.section_streaming({"reference": synth}, runs=1),
        "ttfc_breakdown": bench_all.section_ttfc_breakdown(synth, runs=1),
        "official": {"results": [{**frames_summary(f, [(2.0, f * 0.08)]), "text": label}
                                 for label, f in (("short", 25), ("medium", 100))]},
        "server": {"results": [level_summary(p, c, [{"ttfc_s": 0.02, "total_s": 1.0, "audio_s": 8.0,
                                                     "stop_reason": "max_new_tokens"}], wall=1.0)
                               for p in ("http", "ws") for c in (1, 4)]},
        "pipecat": {name: pipecat_bench.service_summary(name, [(0.03, 1000), (None, 0)])
                    for name in ("http", "websocket")},
    }
    return {"device": "Fake GPU", "date": "2026-12-07T00:00:00+00:00", "commit": "abc1234", "torch": "2",
            "model": "random weights, real 0.6b shapes", "kernel_defines": "", "fixed_frame_count": "fixed",
            "sections": sections, "errors": {}}


def test_every_section_of_bench_all_renders_its_own_producers_result(report):
    md = bench_all.format_markdown(report)
    for heading in ("## Decode, batched", "## In-process streaming", "## Time to first chunk, stage by stage",
                    "## The official qwen-tts package", "## Server over loopback", "## Pipecat"):
        assert heading in md
    assert "| 64 | 23.600 |" in md  # the 64-stream decode row, from the batched result
    assert "| reference | short (5 words) | 25 |" in md
    assert "first codec decode | send |" in md  # the first chunk's stages, the last one included


def test_the_readme_table_renders_the_same_report(report):
    text = readme_script().table(report, "benchmarks/results/fake.json")
    assert "| megakernel frame (ms) | 4.500 | 7.800 | 23.600 |" in text
    assert "| short (25) |" in text and "first chunk, median ms" in text and "Pipecat TTFB" in text


def test_the_decode_markdown_reads_the_summary_it_is_given():
    assert "| 16 | 7.800 |" in format_md(decode_result())


def test_a_failed_section_is_listed_not_fatal(report):
    broken = {**report, "sections": {"decode": decode_result()}, "errors": {"server": "RuntimeError: boom"}}
    assert "- server: RuntimeError: boom" in bench_all.format_markdown(broken)
    assert "server (RuntimeError: boom)" in readme_script().table(broken, "x.json")
