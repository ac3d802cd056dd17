"""The voice library through the real server (tiny Base model): upload, list, use over HTTP, the OpenAI endpoint
and the WebSocket, delete, restart and use again; the bad-upload table; concurrent uploads and deletes; the
library's atomic files; the CLI."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
sf = pytest.importorskip("soundfile")
ws_client = pytest.importorskip("websockets.sync.client")

from qwen_tts_megakernel.engine import Synthesizer  # noqa: E402
from qwen_tts_megakernel.prompt import ClonedVoice, PromptError  # noqa: E402
from qwen_tts_megakernel.synthetic import write_tiny_model  # noqa: E402
from qwen_tts_megakernel.testing.server import running_server  # noqa: E402
from qwen_tts_megakernel.voices import VoiceError, VoiceLibrary, read_reference_audio  # noqa: E402

TEXT = "Hello from a cloned voice."
REF_TEXT = "This is what the reference clip says."


def clip(seconds: float, rate: int = 24000, amplitude: float = 0.3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * 180 * t) + 0.02 * rng.standard_normal(len(t))).astype(np.float32)


def encode(audio: np.ndarray, rate: int = 24000, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny_base"), "0.6b", "base", seed=1)


@pytest.fixture(scope="module")
def voices_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("voices")


def new_synth(model_dir, voices_dir) -> Synthesizer:
    synth = Synthesizer.from_pretrained(str(model_dir), device="cpu")
    from qwen_tts_megakernel.voices import speaker_encoder_fingerprint

    synth.voice_library = VoiceLibrary(voices_dir, speaker_encoder_fingerprint(synth.checkpoint))
    return synth


@pytest.fixture(scope="module")
def synth(model_dir, voices_dir):
    return new_synth(model_dir, voices_dir)


@pytest.fixture(scope="module")
def url(synth):
    with running_server(synth, model_name="qwen3-tts-base-tiny") as (url, app):
        yield url


def upload(url, name, data=None, *, transcript=REF_TEXT, consent="true", filename="ref.wav"):
    files = {"audio": (filename, encode(clip(2.0)) if data is None else data, "application/octet-stream")}
    fields = {"name": name}
    if consent is not None:
        fields["consent"] = consent
    if transcript is not None:
        fields["transcript"] = transcript
    return httpx.post(f"{url}/v1/audio/voices", files=files, data=fields, timeout=120)


def pcm_of(synth, text, voice, seed, frames, layout="prefill") -> bytes:
    stream = synth.stream(text, voice=voice, seed=seed, max_new_tokens=frames, text_layout=layout)
    return b"".join(c.pcm.astype("<i2").tobytes() for c in stream)


def test_upload_list_use_delete_and_restart(url, synth, model_dir, voices_dir):
    r = upload(url, "Alice")
    assert r.status_code == 201, r.text
    meta = r.json()
    assert meta["name"] == "alice" and meta["layout"] == "in_context" and meta["reference_frames"] == 25
    r = upload(url, "bob", transcript=None)
    assert r.status_code == 201 and r.json()["layout"] == "x_vector_only"

    listed = httpx.get(f"{url}/v1/audio/voices").json()
    assert listed["supports_cloning"] and listed["builtin_voices"] == []
    assert listed["voices"] == ["alice", "bob"]
    assert [v["name"] for v in listed["stored_voices"]] == ["alice", "bob"]

    # HTTP streaming endpoint: the same bytes as the in-process API with the same stored voice and seed.
    body = {"text": TEXT, "speaker": "alice", "max_new_tokens": 6, "seed": 3}
    r = httpx.post(f"{url}/tts/stream", json=body, timeout=120)
    assert r.status_code == 200, r.text
    expected_alice = pcm_of(synth, TEXT, "alice", 3, 6)
    assert r.content == expected_alice and len(r.content) == 6 * 1920 * 2

    # OpenAI endpoint, through the official SDK.
    oai = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    r = oai.audio.speech.create(model="qwen3-tts-base-tiny", voice="bob", input=TEXT, response_format="pcm",
                                extra_body={"seed": 4, "max_new_tokens": 5})
    assert r.content == pcm_of(synth, TEXT, "bob", 4, 5)

    # WebSocket (streamed text): x-vector voice, and an in-context voice (speaks after flush).
    for voice, seed in (("bob", 5), ("alice", 6)):
        with ws_client.connect(url.replace("http://", "ws://") + "/v1/audio/speech/stream") as conn:
            conn.send(json.dumps({"type": "config", "context_id": "c", "voice": voice, "seed": seed,
                                  "max_new_tokens": 4}))
            conn.send(json.dumps({"type": "text", "context_id": "c", "text": TEXT}))
            conn.send(json.dumps({"type": "flush", "context_id": "c"}))
            audio, done = b"", None
            while done is None:
                msg = conn.recv(timeout=120)
                if isinstance(msg, bytes):
                    audio += msg[1 + msg[0]:]
                else:
                    event = json.loads(msg)
                    assert event["type"] != "error", event
                    done = event if event["type"] == "audio_done" else None
        assert done["frames"] == 4
        assert audio == pcm_of(synth, TEXT, voice, seed, 4, layout="interleaved")

    assert httpx.delete(f"{url}/v1/audio/voices/bob").status_code == 200
    assert httpx.delete(f"{url}/v1/audio/voices/bob").status_code == 404
    r = httpx.post(f"{url}/tts/stream", json={**body, "speaker": "bob"})
    assert r.status_code == 400 and "bob" in r.json()["error"]["message"]
    assert httpx.get(f"{url}/v1/audio/voices").json()["voices"] == ["alice"]

    # A restarted server (new process state: model, library, app) reads the stored voice back from disk.
    fresh = new_synth(model_dir, voices_dir)
    with running_server(fresh, model_name="again") as (url2, _):
        assert httpx.get(f"{url2}/v1/audio/voices").json()["voices"] == ["alice"]
        r = httpx.post(f"{url2}/tts/stream", json=body, timeout=120)
        assert r.status_code == 200 and r.content == expected_alice


# What each bad upload gets: (case, status, the field named in "param").
BAD_UPLOADS = [
    ("not audio", 415, "audio"),
    ("empty file", 400, "audio"),
    ("too short", 400, "audio"),
    ("too long", 400, "audio"),
    ("too large", 413, "audio"),
    ("silent", 400, "audio"),
    ("sample rate too low", 400, "audio"),
    ("bad name", 400, "name"),
    ("name exists", 409, "name"),
    ("no consent", 400, "consent"),
    ("consent false", 400, "consent"),
    ("audio is a field", 400, "audio"),
    ("name is a file", 400, "name"),
]


@pytest.mark.parametrize("case,status,param", BAD_UPLOADS)
def test_bad_uploads_get_a_4xx_naming_the_problem(url, voices_dir, case, status, param):
    if case == "name exists":
        assert upload(url, "taken", transcript=None).status_code in (201, 409)
    name = {"bad name": "../evil", "name exists": "taken"}.get(case, "fresh")
    data = {"not audio": b"this is not a sound file" * 40, "empty file": b"",
            "too short": encode(clip(0.3)), "too long": encode(clip(31.0, rate=8000), rate=8000),
            "too large": b"\0" * (21 * 1024 * 1024), "silent": encode(np.zeros(48000, np.float32)),
            "sample rate too low": encode(clip(2.0, rate=4000), rate=4000)}.get(case)
    consent = {"no consent": None, "consent false": "false"}.get(case, "true")
    if case == "audio is a field":
        r = httpx.post(f"{url}/v1/audio/voices", data={"name": name, "consent": "true", "audio": "hello"},
                       files={"other": ("x", b"1")})
    elif case == "name is a file":
        r = httpx.post(f"{url}/v1/audio/voices", data={"consent": "true", "audio": "hello"},
                       files={"name": ("name.txt", b"fresh")})
    else:
        r = upload(url, name, data, consent=consent)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param
    assert " object at 0x" not in r.json()["error"]["message"]  # no Python repr in what a client reads
    assert "fresh" not in [p.name for p in voices_dir.iterdir()]
    assert not [p for p in voices_dir.iterdir() if p.name.startswith(".")], "half-written files stayed"


def test_reference_formats_and_resampling():
    audio = clip(2.0)
    for data in (encode(audio), encode(audio, fmt="FLAC"), encode(audio, fmt="MP3"),
                 encode(clip(2.0, rate=48000), rate=48000, fmt="OGG", subtype="OPUS"),
                 encode(np.stack([audio, audio], 1))):
        out = read_reference_audio(data)
        assert out.dtype == np.float32 and abs(len(out) - 48000) <= 1200
        assert 0.15 < float(np.sqrt(np.mean(out ** 2))) < 0.3
    out = read_reference_audio(encode(clip(2.0, rate=16000), rate=16000))
    assert len(out) == 48000
    with pytest.raises(VoiceError, match="silent"):
        read_reference_audio(encode(np.zeros(48000, np.float32)))


def test_concurrent_uploads_and_deletes_keep_the_library_whole(tmp_path, synth):
    library = VoiceLibrary(tmp_path, "fp")
    voice = ClonedVoice(x_vector=synth.talker.codec_head.weight[0].detach().clone(),
                        ref_codes=np.arange(32, dtype=np.int64).reshape(2, 16), ref_text="hi")
    results: dict[str, list] = {"add": [], "remove": []}

    def adder():
        for _ in range(20):
            try:
                library.add("same", voice)
                results["add"].append("ok")
            except VoiceError as exc:
                results["add"].append(exc.status)

    def remover():
        for _ in range(20):
            try:
                library.remove("same")
                results["remove"].append("ok")
            except VoiceError as exc:
                results["remove"].append(exc.status)

    def reader():
        for _ in range(60):
            got = library.get("same")
            assert got is None or (got.ref_text == "hi" and np.array_equal(got.ref_codes, voice.ref_codes))

    threads = [threading.Thread(target=f) for f in (adder, adder, remover, remover, reader, reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(results["add"]) <= {"ok", 409} and set(results["remove"]) <= {"ok", 404}
    adds, removes = results["add"].count("ok"), results["remove"].count("ok")
    assert removes <= adds <= removes + 1  # every successful remove removed a whole voice that was added
    assert library.names() == (["same"] if adds > removes else [])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # Concurrent adds of distinct names all land.
    threads = [threading.Thread(target=library.add, args=(f"v{i}", voice)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [n for n in library.names() if n.startswith("v")] == [f"v{i}" for i in range(8)]


def test_python_api_resolves_stored_voices_and_explains_unknown_ones(synth):
    with pytest.raises(PromptError, match="unknown voice 'nobody'"):
        synth.prepare(TEXT, voice="nobody")
    with pytest.raises(PromptError, match="voice cloning"):
        synth.prepare(TEXT)


def test_cli_voices_add_list_remove(tmp_path, model_dir):
    ref = tmp_path / "ref.flac"
    sf.write(ref, clip(2.0, rate=44100), 44100)
    run = lambda *a: subprocess.run([sys.executable, "-m", "qwen_tts_megakernel.cli", "voices", *a,  # noqa: E731
                                     "--voices-dir", str(tmp_path / "lib")], capture_output=True, text=True)
    r = run("add", "carol", str(ref), "--text", REF_TEXT, "--model", str(model_dir))
    assert r.returncode == 0 and "in-context" in r.stdout, r.stderr
    r = run("add", "carol", str(ref), "--x-vector-only", "--model", str(model_dir))
    assert r.returncode == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr
    r = run("list", "--model", str(model_dir))
    assert r.returncode == 0 and "carol (in context)" in r.stdout
    assert run("remove", "carol").returncode == 0
    r = run("remove", "carol")
    assert r.returncode == 2 and "no stored voice" in r.stderr


def test_voice_aliases_point_at_stored_voices_and_a_bad_one_stops_start_up(url, model_dir, voices_dir):
    from fastapi.testclient import TestClient

    from qwen_tts_megakernel.server.app import create_app
    from qwen_tts_megakernel.server.protocol import ServerSettings
    from qwen_tts_megakernel.server.voice_aliases import voice_aliases

    assert upload(url, "carol").status_code == 201
    try:
        synth = new_synth(model_dir, voices_dir)  # its own: the app's shutdown stops its engine
        with pytest.raises(ValueError, match="no stored voice 'nobody'"):
            create_app(synth, settings=ServerSettings(voice_aliases="alloy=nobody"))
        with pytest.raises(ValueError, match="no voices to point them at"):  # VoiceDesign: nothing to alias
            voice_aliases([], {"alloy": "x"}, stored=None)
        app = create_app(synth, settings=ServerSettings(voice_aliases="alloy=carol"))
        with TestClient(app, base_url="http://127.0.0.1") as client:
            assert client.get("/v1/audio/voices").json()["voice_aliases"] == {"alloy": "carol"}
            body = {"model": "tts-1", "input": TEXT, "voice": "alloy", "response_format": "pcm", "seed": 3,
                    "max_new_tokens": 5}
            r = client.post("/v1/audio/speech", json=body)
            assert r.status_code == 200, r.text
            assert r.content == pcm_of(synth, TEXT, "carol", 3, 5)
    finally:
        httpx.delete(f"{url}/v1/audio/voices/carol", timeout=30)
