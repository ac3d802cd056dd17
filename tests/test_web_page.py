"""The demo page at / in a real headless Chromium (Debian's `chromium`, driven by Playwright): it loads with no
console errors, Speak gets audio samples into its AudioWorklet, Stop cancels the stream on the server, the API key
prompt, the clone form of Base models, /docs offline. Skipped, saying why, without playwright or a Chromium.

QWEN_TTS_MK_SCREENSHOT=docs/img/web-page.png writes the README's screenshot there (else into the test's tmp dir).
"""

from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs the 'browser' extra (playwright)")

from qwen_tts_megakernel.engine import Synthesizer  # noqa: E402
from qwen_tts_megakernel.server.protocol import ServerSettings  # noqa: E402
from qwen_tts_megakernel.synthetic import write_tiny_model  # noqa: E402
from qwen_tts_megakernel.testing.server import running_server  # noqa: E402

LONG_TEXT = " ".join(["The page plays this as it arrives, chunk by chunk, into an audio worklet."] * 6)
BOUND_MS = 30_000  # every wait in the page: first audio, stop, loading (the tiny model on a 2-core CPU)
KEY = "page-key"
# Chromium as root in a container without network: flags of this machine's documented headless set-up.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--autoplay-policy=no-user-gesture-required"]


def chromium_path() -> str | None:
    for candidate in (os.environ.get("QWEN_TTS_MK_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    if path is None:
        reason = "no Chromium found (apt-get install chromium, or set QWEN_TTS_MK_CHROMIUM); .ci/run installs it"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)  # CI installs it: a missing browser there is a broken CI, not a skip
        pytest.skip(reason)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_web")
    write_tiny_model(path, "0.6b", "custom_voice", seed=0)
    return Synthesizer.from_pretrained(str(path), device="cpu")


@pytest.fixture(scope="module")
def server(synth):
    with running_server(synth, model_name="qwen3-tts-tiny") as (url, app):
        yield url, app


class PageWatch:
    """A page with its console errors, uncaught exceptions and every request that left loopback."""

    def __init__(self, browser):
        self.page = browser.new_page(viewport={"width": 960, "height": 860})
        self.errors: list[str] = []
        self.outside: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.route("**/*", self.only_loopback)

    def only_loopback(self, route):
        if urlsplit(route.request.url).hostname in ("127.0.0.1", "localhost"):
            return route.continue_()
        self.outside.append(route.request.url)
        return route.abort()

    def wait(self, expression: str):
        # As a function, not an expression string: the page's CSP forbids eval, which the string form polls with.
        return self.page.wait_for_function(f"() => {expression}", timeout=BOUND_MS)

    def value(self, expression: str):
        return self.page.evaluate(expression)

    def close(self):
        self.page.close()


def wait_idle(app, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while app.state.worker.active_count and time.monotonic() < deadline:
        time.sleep(0.02)
    return app.state.worker.active_count


def screenshot_path(tmp_path) -> Path:
    return Path(os.environ.get("QWEN_TTS_MK_SCREENSHOT") or tmp_path / "web-page.png")


def test_speak_streams_into_the_worklet_and_stop_cancels(browser, server, synth, tmp_path):
    url, app = server
    watch = PageWatch(browser)
    try:
        page = watch.page
        page.goto(f"{url}/")
        watch.wait("document.querySelectorAll('#voice option').length > 0")
        assert watch.value("[...document.querySelectorAll('#voice option')].map(o => o.value)") == sorted(synth.voices)
        assert watch.value("[...document.querySelectorAll('#language option')].map(o => o.value)") == synth.languages
        assert page.is_hidden("#clone-form") and page.is_hidden("#key-form")  # a CustomVoice model, no key
        assert page.is_hidden("#instructions-row")  # the 0.6B CustomVoice model takes no instructions
        page.select_option("#voice", "serena")
        page.select_option("#language", "english")
        page.fill("#text", LONG_TEXT)
        page.click("#speak")
        watch.wait("window.qwenTtsPage.workletSamples >= 24000")  # a second of audio in the worklet
        first_ms = watch.value("window.qwenTtsPage.firstAudioMs")
        assert 0 < first_ms < BOUND_MS and page.inner_text("#first-audio").endswith(" ms")
        assert app.state.worker.active_count == 1  # still speaking: the audio arrived as it was made
        watch.wait("window.qwenTtsPage.playedSamples > 0")  # the worklet plays it
        watch.wait("window.qwenTtsPage.waveformPeak > 0.01")  # and the waveform draws what plays
        page.wait_for_timeout(500)  # a few more waveform frames for the screenshot (not a condition of the test)
        shot = screenshot_path(tmp_path)
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        page.click("#stop")
        watch.wait("window.qwenTtsPage.stopReason === 'cancelled'")
        assert wait_idle(app) == 0
        assert page.inner_text("#stop-reason") == "cancelled"
        assert watch.errors == [] and watch.outside == [] and watch.value("window.qwenTtsPage.errors") == []
    finally:
        watch.close()


def test_docs_work_offline(browser, server):
    url, _app = server
    watch = PageWatch(browser)
    try:
        watch.page.goto(f"{url}/docs")
        watch.page.wait_for_selector(".swagger-ui .information-container h2", timeout=BOUND_MS)
        assert "qwen-tts-megakernel" in watch.page.inner_text(".swagger-ui .information-container h2")
        watch.page.wait_for_selector("[data-path='/v1/audio/speech']", timeout=BOUND_MS)
        assert watch.outside == [] and watch.errors == []
    finally:
        watch.close()


def test_the_page_asks_for_the_api_key(browser, synth):
    with running_server(synth, api_key=KEY) as (url, app):
        assert httpx.get(f"{url}/").status_code == 200  # the page itself holds no secret
        watch = PageWatch(browser)
        try:
            page = watch.page
            page.goto(f"{url}/")
            page.wait_for_selector("#key-form", state="visible", timeout=BOUND_MS)
            assert page.is_hidden("#speak-form")
            page.fill("#api-key", KEY)
            page.click("#key-submit")
            watch.wait("document.querySelectorAll('#voice option').length > 0")
            page.fill("#text", LONG_TEXT)
            page.click("#speak")
            watch.wait("window.qwenTtsPage.workletSamples > 0")  # the socket authenticated with ?api_key
            page.click("#stop")
            watch.wait("window.qwenTtsPage.stopReason === 'cancelled'")
            assert watch.errors == []
        finally:
            watch.close()
        assert wait_idle(app) == 0


def test_off_with_the_flag(synth):
    with running_server(synth, settings=ServerSettings(web_page=False)) as (url, _app):
        assert httpx.get(f"{url}/").status_code == 404 and httpx.get(f"{url}/web/app.js").status_code == 404
        assert httpx.get(f"{url}/health").status_code == 200


def test_page_headers_keep_it_same_origin(server):
    url, _app = server
    r = httpx.get(f"{url}/")
    csp = r.headers["content-security-policy"]
    assert "connect-src 'self'" in csp and "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert httpx.get(f"{url}/web/../app.py").status_code == 404
    # The Origin rules hold for the page's socket as for any: a foreign page cannot use it.
    assert httpx.get(f"{url}/v1/audio/voices", headers={"Origin": "https://evil.example"}).status_code == 403


def wav_clip(seconds: float = 4.0) -> bytes:
    import soundfile as sf

    t = np.arange(int(24000 * seconds)) / 24000
    audio = (0.3 * np.sin(2 * np.pi * 180 * t) + 0.02 * np.random.default_rng(0).standard_normal(len(t)))
    buf = io.BytesIO()
    sf.write(buf, audio.astype(np.float32), 24000, format="WAV")
    return buf.getvalue()


def test_clone_form_on_a_base_model(browser, tmp_path_factory, monkeypatch):
    model = write_tiny_model(tmp_path_factory.mktemp("tiny_web_base"), "0.6b", "base", seed=1)
    monkeypatch.setenv("QWEN_TTS_MK_VOICES_DIR", str(tmp_path_factory.mktemp("web_voices")))
    base = Synthesizer.from_pretrained(str(model), device="cpu")
    clip = tmp_path_factory.mktemp("clip") / "ref.wav"
    clip.write_bytes(wav_clip())
    with running_server(base) as (url, _app):
        watch = PageWatch(browser)
        try:
            page = watch.page
            page.goto(f"{url}/")
            page.wait_for_selector("#clone-form", state="visible", timeout=BOUND_MS)
            assert page.is_disabled("#clone-submit")  # until the consent box is ticked
            page.fill("#clone-name", "page_voice")
            page.set_input_files("#clone-audio", str(clip))
            page.check("#clone-consent")
            page.click("#clone-submit")
            watch.wait("document.querySelector('#voice').value === 'page_voice'")
            assert "Cloned" in page.inner_text("#clone-status")
            page.fill("#text", LONG_TEXT)
            page.click("#speak")
            watch.wait("window.qwenTtsPage.workletSamples > 0")
            page.click("#stop")
            watch.wait("window.qwenTtsPage.stopReason === 'cancelled'")
            assert watch.errors == []
        finally:
            watch.close()
