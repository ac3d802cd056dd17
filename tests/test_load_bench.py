"""The load benchmark's listener model and one small closed-loop run against a real server (tiny checkpoint)."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("fastapi")

from qwen_tts_megakernel.engine import Synthesizer  # noqa: E402
from qwen_tts_megakernel.synthetic import write_tiny_model  # noqa: E402
from qwen_tts_megakernel.testing.server import running_server  # noqa: E402
from qwen_tts_megakernel.tools.load_bench import BYTES_PER_SECOND, Fleet, markdown, underruns  # noqa: E402

SECOND = BYTES_PER_SECOND  # bytes of one second of audio


def test_underruns_of_a_stream_that_keeps_ahead_is_zero():
    # 0.5 s of audio every 0.25 s: always ahead.
    arrivals = [(i * 0.25, SECOND // 2) for i in range(8)]
    assert underruns(arrivals, 0.0) == (0, 0.0)


def test_underruns_counts_each_gap_and_its_length():
    # 0.1 s of audio, then the next piece 0.3 s later: 0.2 s of silence, twice.
    arrivals = [(0.0, SECOND // 10), (0.3, SECOND // 10), (0.6, SECOND // 10)]
    count, silent = underruns(arrivals, 0.0)
    assert count == 2 and silent == pytest.approx(0.4)


def test_a_jitter_buffer_absorbs_a_late_piece():
    arrivals = [(0.0, SECOND // 10), (0.25, SECOND // 10)]
    assert underruns(arrivals, 0.0)[0] == 1
    assert underruns(arrivals, 0.2) == (0, 0.0)


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_load")
    write_tiny_model(path, "0.6b", "custom_voice", seed=0)
    synth = Synthesizer.from_pretrained(str(path), device="cpu")
    with running_server(synth) as (base_url, _app):
        yield base_url


@pytest.mark.parametrize("protocol", ["http", "ws"])
def test_closed_loop_run_reports_every_figure(url, protocol):
    result = asyncio.run(Fleet(url, frames=6).closed_loop(protocol, streams=3, requests_per_stream=1))
    assert result["ok"] == result["requests"] == 3, result["errors"]
    assert result["audio_s"] == pytest.approx(3 * 6 * 0.08)
    assert 0 < result["ttfa_ms"]["p50"] <= result["ttfa_ms"]["p95"] <= result["ttfa_ms"]["p99"]
    assert result["audio_s_per_s"] > 0
    assert set(result["underruns_200ms"]) == {"count", "seconds", "streams_with_any"}
    report = {"device": "cpu", "date": "d", "commit": "c", "frames": 6,
              "runs": [{"backend": "reference", "model": "tiny", "results": [{**result, "shape": "closed",
                                                                              "streams": 3}]}]}
    assert "| closed | " + protocol + " | 3 streams | 3/3 |" in markdown(report)
    step = result["engine_step"]  # the server's step split over this level, from /health before and after
    assert step["steps"] >= 1 and step["host_ms"] >= 0
    assert step["host_ms"] == pytest.approx(step["step_ms"] - step["gpu_wait_ms"] - step["prefill_ms"])
    assert "| " + protocol + " | 3 streams | <= " in markdown(report)
    if protocol == "ws":  # the server's audio_done says where its first chunk's time went
        stages = result["first_chunk_ms_p50"]
        assert {"queued", "prefill", "first_step", "codec", "to_client"} <= set(stages)
        assert all(stages[k] >= 0 for k in ("queued", "prefill", "first_step", "codec"))
        assert "First chunk, stage by stage" in markdown(report)


def test_result_files_are_named_by_backend_and_model_size():
    from qwen_tts_megakernel.tools.load_bench import result_stem

    assert result_stem("NVIDIA H200", ["random:0.6b"], ["megakernel"]) == "nvidia-h200-load-megakernel"
    assert result_stem("NVIDIA H200", ["random:1.7b"], ["megakernel"]) == "nvidia-h200-load-megakernel-1.7b"
    assert result_stem("cpu", ["random:0.6b", "random:1.7b"], ["megakernel", "graphed"]) == \
        "cpu-load-megakernel-graphed-1.7b"


class PhaseServer:
    """Stands in for load_bench.StartedServer: the module's in-process server, recording which phases started
    a server (the order is what these tests check; a subprocess per phase would cost a model load each)."""

    phases: list[str] = []
    url = ""

    def __init__(self, model, backend, device, args, phase):
        self.phase, self.start_s = phase, 0.5
        self.server = type("S", (), {"base_url": PhaseServer.url})()

    def __enter__(self):
        PhaseServer.phases.append(self.phase)
        return self

    def __exit__(self, *exc):
        pass


def bench_args(**kwargs):
    import argparse

    defaults = dict(levels=(1,), rates=(3.0,), protocols=("http",), frames=3, requests_per_stream=1,
                    open_seconds=0.8, ttfa_bound_ms=1e9, max_active=4, max_queue=8, open_loop_after_closed=False)
    return argparse.Namespace(**{**defaults, **kwargs})


@pytest.mark.parametrize("after_closed", [False, True])
def test_open_loop_runs_first_on_a_fresh_server_by_default_and_the_report_says_so(url, monkeypatch, after_closed):
    from qwen_tts_megakernel.tools import load_bench

    PhaseServer.phases, PhaseServer.url = [], url
    monkeypatch.setattr(load_bench, "StartedServer", PhaseServer)
    run = load_bench.run_backend("tiny", "reference", "cpu", bench_args(open_loop_after_closed=after_closed))
    shapes = [r["shape"] for r in run["results"]]
    report = {"device": "cpu", "date": "d", "commit": "c", "frames": 3, "runs": [run]}
    if after_closed:
        assert PhaseServer.phases == ["closed"] and shapes == ["closed", "open"]
        assert run["open_loop_server"] == run["results"][1]["server"] == "after closed loop"
        assert "after the closed-loop levels" in load_bench.markdown(report)
    else:
        assert PhaseServer.phases == ["open-http", "closed"] and shapes == ["open", "closed"]
        assert run["open_loop_server"] == run["results"][0]["server"] == "fresh"
        assert run["server_start_s"] == {"open-http": 0.5, "closed": 0.5}
        assert "freshly started server" in load_bench.markdown(report)
        assert "| open | http | 3.0/s (fresh server) |" in load_bench.markdown(report)
    assert all(r["ok"] == r["requests"] >= 1 for r in run["results"])
