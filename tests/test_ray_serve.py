"""Ray Serve scale-out on a local Ray instance: two CPU replicas of a tiny checkpoint behind one address.

Every endpoint answers through Serve's proxy with the audio a direct in-process call gives for the same seed (HTTP,
OpenAI, SSE, WebSocket contexts fed in deltas, a cancelled context); 16 concurrent streams are shared by both
replicas; when every replica is full the proxy answers 503 with Retry-After; killing a replica mid-stream ends its
clients' streams with an error while the other replica's streams finish with their exact audio, and Serve starts a
replacement; a replica whose engine stops fails its health check and is replaced. Without ray[serve] installed the
Ray tests are skipped; the option, CLI and health-check tests run anyway.
"""

from __future__ import annotations

import base64
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

httpx = pytest.importorskip("httpx")
ws_client = pytest.importorskip("websockets.sync.client")
pytest.importorskip("fastapi")

from qwen_tts_megakernel.cli import main as cli_main  # noqa: E402
from qwen_tts_megakernel.engine import Synthesizer  # noqa: E402
from qwen_tts_megakernel.server.ray_serve import (APP_NAME, DEPLOYMENT_NAME, REPLICA_HEADER,  # noqa: E402
                                                  app_builder, options_from, parse_autoscale, replica_actor_name,
                                                  replica_health)
from qwen_tts_megakernel.server.protocol import ServerSettings  # noqa: E402
from qwen_tts_megakernel.synthetic import write_tiny_model  # noqa: E402
from qwen_tts_megakernel.testing.server import free_port  # noqa: E402

WS_PATH = "/v1/audio/speech/stream"
MAX_ACTIVE = 8  # per replica, no engine queue: the two replicas hold 16 streams


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_ray")
    write_tiny_model(path, "0.6b", "custom_voice", seed=0)
    return path


@pytest.fixture(scope="module")
def synth(model_dir):
    return Synthesizer.from_pretrained(str(model_dir), device="cpu")


@pytest.fixture(scope="module", params=["haproxy", "proxy"])
def ingress(request):
    return request.param


def default_ingress_only(ingress):
    """Tests of the replicas themselves (failures, health) run behind the default ingress only: the other adds
    nothing to what they check."""
    if ingress != "haproxy":
        pytest.skip("replica behaviour: checked behind the default (haproxy) ingress")


@pytest.fixture(scope="module")
def cluster(model_dir, ingress):
    """(base URL, serve module): a local Ray instance with two CPU replicas behind `ingress`, shut down after."""
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from qwen_tts_megakernel.server.ray_serve import check_ingress_available, ray_environment, start

    check_ingress_available(ingress)
    # Read by the Ray processes ray.init() starts. A stopping replica behind HAProxy stays up 30 s by default so
    # that remote load balancers can drop it; on one machine HAProxy hears at once.
    env = dict(ray_environment(ingress), RAY_USAGE_STATS_ENABLED="0",
               RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="1")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        options = options_from(model=str(model_dir), ingress=ingress, device="cpu", replicas=2, gpus_per_replica=0,
                               cpus_per_replica=0.1, settings=ServerSettings(max_active=MAX_ACTIVE, max_queue=0))
        options.health_check_period_s = 1.0
        # CPU float sums depend on the thread count: replicas use this process's, so audio compares byte for byte.
        options.env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
        port = free_port()
        start(options, host="127.0.0.1", port=port)
        yield f"http://127.0.0.1:{port}", serve
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def solo_pcm(synth, text, seed, frames, layout="prefill") -> bytes:
    stream = synth.stream(text, voice="ryan", seed=seed, max_new_tokens=frames, text_layout=layout)
    return b"".join(chunk.pcm.astype("<i2").tobytes() for chunk in stream)


def post_stream(url, text, seed, frames):
    """(status, replica, body) of one /tts/stream request."""
    with httpx.Client(timeout=120) as client:
        r = client.post(f"{url}/tts/stream", json={"text": text, "speaker": "ryan", "seed": seed,
                                                   "max_new_tokens": frames})
        return r.status_code, r.headers.get(REPLICA_HEADER), r.content


class WsCall:
    """One WebSocket connection with one live context: opened with part of its text, finished later."""

    def __init__(self, url, cid, text, seed, frames, first_part=6):
        self.cid, self.text, self.first_part = cid, text, first_part
        self.conn = ws_client.connect(url.replace("http://", "ws://") + WS_PATH)
        self.replica = self.conn.response.headers.get(REPLICA_HEADER)
        self.conn.send(json.dumps({"type": "config", "context_id": cid, "voice": "ryan", "seed": seed,
                                   "max_new_tokens": frames}))
        self.send_text(text[:first_part])

    def send_text(self, text):
        for i in range(0, len(text), 5):
            self.conn.send(json.dumps({"type": "text", "context_id": self.cid, "text": text[i:i + 5]}))

    def finish(self, cancel_after_bytes=None):
        """Send the rest of the text and flush; returns (stop_reason or "error: ...", pcm)."""
        pcm = bytearray()
        try:
            self.send_text(self.text[self.first_part:])
            self.conn.send(json.dumps({"type": "flush", "context_id": self.cid}))
            while True:
                msg = self.conn.recv(timeout=120)
                if isinstance(msg, bytes):
                    pcm += msg[1 + msg[0]:]
                    if cancel_after_bytes is not None and len(pcm) >= cancel_after_bytes:
                        self.conn.send(json.dumps({"type": "cancel", "context_id": self.cid}))
                        cancel_after_bytes = None
                    continue
                event = json.loads(msg)
                if event["type"] == "error":
                    return "error: " + event["message"], bytes(pcm)
                if event["type"] == "audio_done":
                    return event["stop_reason"], bytes(pcm)
        except Exception as exc:  # noqa: BLE001 - the connection broke: that is what the client sees
            return f"error: {type(exc).__name__}: {exc}", bytes(pcm)
        finally:
            self.conn.close()


# Without Ray: options, health ----------------------------------------------------------------------------------


def test_autoscale_and_option_errors_name_the_field():
    assert parse_autoscale("1..4") == (1, 4)
    for bad in ("4..1", "0..2", "2", "a..b"):
        with pytest.raises(ValueError, match="--autoscale"):
            parse_autoscale(bad)
    with pytest.raises(ValueError, match="replicas"):
        options_from(model="m", replicas=0)
    with pytest.raises(ValueError, match="max_active"):
        app_builder({"model": "m", "max_active": 0})
    with pytest.raises(ValueError, match="API key is empty"):
        options_from(model="m", api_key=" ")
    with pytest.raises(ValueError, match="device cuda:1"):
        options_from(model="m", device="cuda:1")
    with pytest.raises(ValueError, match="unknown application args"):
        app_builder({"model": "m", "replica": 2})
    options = options_from(model="m", settings=ServerSettings(max_active=4, max_queue=0), gpus_per_replica=0,
                           voices_dir="/shared/voices")
    assert options.capacity == 4 and options.device == "cpu"
    assert options.env["QWEN_TTS_MK_VOICES_DIR"] == "/shared/voices"


def test_deployment_declares_capacity_resources_and_scaling():
    pytest.importorskip("ray.serve")
    from qwen_tts_megakernel.server.ray_serve import deployment

    fixed = deployment(options_from(model="m", ingress="proxy", replicas=3,
                                    settings=ServerSettings(max_active=4, max_queue=2)))
    fixed_limit = options_from(model="m").settings.max_new_tokens_limit  # frames of the longest stream
    assert fixed.num_replicas == 3 and fixed.max_ongoing_requests == 6 and fixed.max_queued_requests == 18
    behind_haproxy = deployment(options_from(model="m", settings=ServerSettings(max_active=4, max_connections=50)))
    assert behind_haproxy.max_ongoing_requests == 50  # the engine refuses past its capacity, not Serve
    assert fixed.ray_actor_options["num_gpus"] == 1.0
    assert fixed._deployment_config.graceful_shutdown_timeout_s > 0.08 * fixed_limit
    assert fixed.backpressure_config.status_code == 503 and fixed.backpressure_config.retry_after_s == 1
    scaled = deployment(options_from(model="m", ingress="proxy", autoscale="1..3", gpus_per_replica=0,
                                     settings=ServerSettings(max_active=4, max_queue=2)))
    autoscaling = scaled._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas, autoscaling.target_ongoing_requests) == (1, 3, 4)
    assert scaled.max_queued_requests == 18  # the most replicas' capacity
    assert scaled.ray_actor_options["num_gpus"] == 0


def test_the_example_serve_config_builds_and_a_wrong_ingress_is_refused(monkeypatch):
    pytest.importorskip("ray.serve")
    yaml = pytest.importorskip("yaml")
    from pathlib import Path

    config = yaml.safe_load((Path(__file__).parents[1] / "examples" / "serve_config.yaml").read_text())
    args = config["applications"][0]["args"]
    assert args["ingress"] == "haproxy"
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")  # as the config's comment says to start Ray
    built = app_builder(args)
    assert type(built).__name__ == "Application"
    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY")
    with pytest.raises(ValueError, match="RAY_SERVE_ENABLE_HA_PROXY=1"):
        app_builder(args)
    assert type(app_builder(dict(args, ingress="proxy"))).__name__ == "Application"


def test_cli_scale_flags_need_ray(capsys):
    assert cli_main(["serve", "--replicas", "2"]) == 2
    assert "--replicas and --autoscale need --ray" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [(["--autoscale", "4..1"], "--autoscale must be MIN..MAX"),
                                            (["--device", "cuda:1"], "device cuda:1 with Ray")])
def test_cli_ray_flag_errors_are_one_line(capsys, flags, message):
    pytest.importorskip("ray.serve")
    assert cli_main(["serve", "--ray", "--model", "m", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_replica_health_follows_the_engine(synth):
    from fastapi.testclient import TestClient

    from qwen_tts_megakernel.server.app import create_app

    app = create_app(synth)
    with TestClient(app):
        replica_health(app)  # the engine runs: healthy
    with pytest.raises(RuntimeError, match="unhealthy"):
        replica_health(app)  # the app stopped its engine: Serve would replace this replica


def test_serve_overhead_report_subtracts_direct_from_serve():
    from qwen_tts_megakernel.tools.serve_overhead import compare, markdown

    def row(protocol, streams, p50, p95):
        return {"protocol": protocol, "streams": streams, "ok": 4, "requests": 4,
                "ttfa_ms": {"p50": p50, "p95": p95, "p99": p95}}

    rows = compare([row("http", 1, 40.0, 50.0), row("ws", 16, 60.0, None)],
                   [row("http", 1, 42.5, 55.0), row("ws", 16, 61.0, 80.0)], "haproxy")
    assert rows[0]["added_p50_ms"] == pytest.approx(2.5) and rows[0]["added_p95_ms"] == pytest.approx(5.0)
    assert rows[1]["added_p50_ms"] == pytest.approx(1.0) and rows[1]["added_p95_ms"] is None
    text = markdown({"device": "cpu", "date": "d", "commit": "c", "backend": "reference", "model": "m", "frames": 3,
                     "ray": "2.x", "comparison": rows})
    assert "| haproxy | http | 1 | 4/4 / 4/4 | 40.0 / 42.5 / +2.5 | 50.0 / 55.0 / +5.0 |" in text


# Through Serve -------------------------------------------------------------------------------------------------


@pytest.mark.ray
def test_every_endpoint_through_serve(cluster, synth):
    url, _ = cluster
    with httpx.Client(timeout=120) as client:
        health = client.get(f"{url}/health")
        assert health.status_code == 200 and health.json()["status"] == "ok" and health.headers[REPLICA_HEADER]
        assert "ryan" in client.get(f"{url}/v1/audio/voices").json()["voices"]
        assert client.get(f"{url}/v1/models").json()["data"][0]["object"] == "model"
        assert "qwen_tts_requests_total" in client.get(f"{url}/metrics").text
        bad = client.post(f"{url}/tts/stream", json={"text": "Hi.", "speaker": "nobody"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] in ("speaker", "voice")

        expected = solo_pcm(synth, "Through the proxy.", 7, 4)
        r = client.post(f"{url}/tts/stream", json={"text": "Through the proxy.", "speaker": "ryan", "seed": 7,
                                                   "max_new_tokens": 4})
        assert r.status_code == 200 and r.content == expected
        r = client.post(f"{url}/v1/audio/speech", json={"model": "tts-1", "input": "Through the proxy.",
                                                        "voice": "ryan", "seed": 7, "max_new_tokens": 4,
                                                        "response_format": "pcm"})
        assert r.status_code == 200 and r.content == expected
        r = client.post(f"{url}/v1/audio/speech", json={"model": "tts-1", "input": "Through the proxy.",
                                                        "voice": "ryan", "seed": 7, "max_new_tokens": 4,
                                                        "response_format": "pcm", "stream_format": "sse"})
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
        audio = b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta")
        assert audio == expected and events[-1]["type"] == "speech.audio.done"

    text = "Live text arrives word by word."
    expected_ws = solo_pcm(synth, text, 11, 6, layout="interleaved")
    kept, cut = WsCall(url, "kept", text, 11, 6), WsCall(url, "cut", "This one is cut off early.", 12, 300)
    assert kept.finish() == ("max_new_tokens", expected_ws)
    reason, _ = cut.finish(cancel_after_bytes=1)
    assert reason == "cancelled"


@pytest.mark.ray
def test_sixteen_streams_are_shared_by_both_replicas(cluster, synth):
    url, _ = cluster
    frames, text = 3, "Sixteen callers at once."
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda seed: post_stream(url, text, seed, frames), range(100, 116)))
    replicas = [replica for _, replica, _ in results]
    assert {status for status, _, _ in results} == {200}, [body[:200] for status, _, body in results if status != 200]
    counts = {r: replicas.count(r) for r in set(replicas)}
    assert len(counts) == 2 and min(counts.values()) >= 3, counts
    for seed, (_, _, body) in zip(range(100, 116), results):
        assert body == solo_pcm(synth, text, seed, frames), f"seed {seed}"


@pytest.mark.ray
def test_serve_overhead_measures_serve_and_direct(cluster, synth, ingress):
    from qwen_tts_megakernel.testing.server import running_server
    from qwen_tts_megakernel.tools.serve_overhead import compare, measure

    url, _ = cluster
    kw = dict(levels=(1, 2), frames=2, requests=2)
    with running_server(synth) as (direct_url, _app):
        direct = measure(direct_url, **kw)
    served = measure(url, **kw)
    rows = compare(direct, served, ingress)
    assert [(r["protocol"], r["streams"]) for r in rows] == [("http", 1), ("http", 2), ("ws", 1), ("ws", 2)]
    assert {r["ingress"] for r in rows} == {ingress}
    for r in rows:
        assert r["ok_direct"] == r["ok_serve"] == "2/2", r
        assert r["direct_p50_ms"] > 0 and r["serve_p50_ms"] > 0 and r["added_p50_ms"] is not None


@pytest.mark.ray
def test_every_replica_full_answers_503_with_retry_after(cluster, ingress):
    url, _ = cluster
    if ingress == "haproxy":
        return every_engine_full_answers_503(url)
    # Idle WebSocket connections are ongoing requests: 2 x MAX_ACTIVE of them fill both replicas. Then the proxy
    # holds up to the deployment's capacity (2 x MAX_ACTIVE) of further requests, and answers 503 to the rest.
    held = [ws_client.connect(url.replace("http://", "ws://") + WS_PATH) for _ in range(2 * MAX_ACTIVE)]
    with ThreadPoolExecutor(3 * MAX_ACTIVE) as pool:
        pending = [pool.submit(httpx.get, f"{url}/v1/models", timeout=60) for _ in range(3 * MAX_ACTIVE)]
        time.sleep(2.0)
        for conn in held:
            conn.close()
        answers = [f.result() for f in pending]
    statuses = sorted(r.status_code for r in answers)
    assert statuses.count(503) >= MAX_ACTIVE // 2 and set(statuses) == {200, 503}, statuses
    assert all(r.headers.get("retry-after") == "1" for r in answers if r.status_code == 503)
    assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 200


def every_engine_full_answers_503(url):
    """HAProxy passes each connection to the replica with the fewest: 2 x MAX_ACTIVE WebSocket contexts waiting for
    the rest of their text fill both engines, and what comes next is refused by a full engine itself, 503 with
    Retry-After, until a context ends."""
    calls, held = [], []
    try:
        for i in range(2 * MAX_ACTIVE):
            call = WsCall(url, f"h{i}", "Waiting for the language model to go on.", 300 + i, 50, first_part=16)
            calls.append(call)
            while True:  # audio of its first words: the engine admitted it; or an error: it was refused
                msg = call.conn.recv(timeout=60)
                if isinstance(msg, bytes):
                    held.append(call.replica)
                    break
                if json.loads(msg)["type"] == "error":
                    break
        # leastconn balances connections, not engine slots: allow a context or two to land on a full replica.
        assert len(held) >= 2 * MAX_ACTIVE - 2 and len(set(held)) == 2, held
        body = {"text": "One more caller.", "speaker": "ryan", "max_new_tokens": 2}
        with ThreadPoolExecutor(MAX_ACTIVE) as pool:
            late = list(pool.map(lambda _: httpx.post(f"{url}/tts/stream", json=body, timeout=60), range(MAX_ACTIVE)))
        refused = [r for r in late if r.status_code != 200]
        assert len(late) - len(refused) <= 2 * MAX_ACTIVE - len(held)  # only the room that was left
        assert len(refused) >= MAX_ACTIVE - 2
        assert all(r.status_code == 503 and r.headers.get("retry-after") == "1" for r in refused), \
            [(r.status_code, r.text[:100]) for r in refused]
    finally:
        for call in calls:
            call.conn.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # closed sockets cancel their contexts; then there is room again
        if httpx.post(f"{url}/tts/stream", json=body, timeout=60).status_code == 200:
            return
        time.sleep(0.5)
    raise AssertionError("no slot came free after the contexts were closed")


@pytest.mark.ray
def test_killed_replica_fails_its_streams_others_finish_and_it_comes_back(cluster, synth, ingress):
    import ray

    default_ingress_only(ingress)

    url, serve = cluster
    # A long HTTP stream picks the replica to kill.
    client = httpx.Client(timeout=120)
    doomed_http = client.stream("POST", f"{url}/tts/stream", json={"text": "A long story that will not finish.",
                                                                   "speaker": "ryan", "max_new_tokens": 2000})
    response = doomed_http.__enter__()
    victim = response.headers[REPLICA_HEADER]
    pieces = response.iter_raw()
    assert next(pieces)
    # WebSocket contexts on both replicas, paused waiting for the rest of their text.
    text = "Streamed text keeps arriving from the language model."
    calls = [WsCall(url, f"c{i}", text, 200 + i, 6) for i in range(6)]
    on_victim = [c for c in calls if c.replica == victim]
    survivors = [c for c in calls if c.replica != victim]
    assert on_victim and survivors, [c.replica for c in calls]

    ray.kill(ray.get_actor(replica_actor_name(victim), namespace="serve"), no_restart=True)

    with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):  # the body is cut, not ended
        for _ in pieces:
            pass
    doomed_http.__exit__(None, None, None)
    client.close()
    with ThreadPoolExecutor(len(calls)) as pool:
        outcomes = dict(zip([c.cid for c in calls], pool.map(lambda c: c.finish(), calls)))
    for c in on_victim:  # the proxy drops the connection: an abnormal closure (1006), never an audio_done
        assert outcomes[c.cid][0].startswith("error: ConnectionClosedError"), outcomes[c.cid][0]
    for c in survivors:
        seed = 200 + int(c.cid[1:])
        assert outcomes[c.cid] == ("max_new_tokens", solo_pcm(synth, text, seed, 6, layout="interleaved")), c.cid

    # Serve replaces the replica; new requests meet only live replicas, then both again.
    deadline = time.monotonic() + 180
    seen: set[str] = set()
    while time.monotonic() < deadline:
        r = httpx.get(f"{url}/health", timeout=30)
        assert r.status_code == 200
        seen.add(r.headers[REPLICA_HEADER])
        status = serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME]
        if status.replica_states.get("RUNNING") == 2 and len(seen - {victim}) == 2:
            break
        time.sleep(0.5)
    assert victim not in seen
    assert len(seen) == 2, seen


@pytest.mark.ray
def test_unhealthy_engine_fails_the_health_check_and_serve_replaces_the_replica(cluster, model_dir, ingress):
    from qwen_tts_megakernel.server.ray_serve import deployment

    default_ingress_only(ingress)

    _, serve = cluster
    options = options_from(model=str(model_dir), device="cpu", replicas=1, gpus_per_replica=0, cpus_per_replica=0.1,
                           settings=ServerSettings(max_active=1, max_queue=0))
    options.health_check_period_s = 1.0
    base = deployment(options)

    class Breakable(base.func_or_class):
        """The product replica plus two handle methods the test calls: its identity, and breaking its engine."""

        def identity(self) -> str:
            return self.replica_id

        def stop_engine(self) -> None:
            self.fastapi_app.state.worker.stop()

    handle = serve.run(base.options(func_or_class=Breakable, name="Breakable").bind(options), name="breakable",
                       route_prefix=None)
    try:
        first = handle.identity.remote().result(timeout_s=60)
        handle.stop_engine.remote().result(timeout_s=60)
        deadline, replacement = time.monotonic() + 120, first
        while replacement == first and time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                replacement = handle.identity.remote().result(timeout_s=30)
            except Exception:  # noqa: BLE001 - the broken replica is being stopped
                pass
        assert replacement != first
    finally:
        serve.delete("breakable")
