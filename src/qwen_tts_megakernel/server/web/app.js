// The demo page: voices and languages from GET /v1/audio/voices, speech over the server's own WebSocket protocol
// (/v1/audio/speech/stream) into an AudioWorklet as it arrives, a live waveform, the measured first-audio time,
// and, on Base models, a form that clones a voice (POST /v1/audio/voices). Same origin only, no dependencies.

const $ = (id) => document.getElementById(id);
const WS_PATH = "/v1/audio/speech/stream";

// What the page measured, for people (the stats) and for the browser test (window.qwenTtsPage).
const page = {
  apiKey: null,
  info: null,
  workletSamples: 0, // samples the worklet received for the current utterance
  playedSamples: 0,
  firstAudioMs: null,
  stopReason: null,
  waveformPeak: 0, // the loudest sample the waveform has drawn
  errors: [],
};
window.qwenTtsPage = page;

let audio = null; // {context, node, analyser}
let session = null; // {ws, contextId, sentAt}
let contextCounter = 0;

function authHeaders() {
  return page.apiKey ? { Authorization: `Bearer ${page.apiKey}` } : {};
}

function setStatus(text) {
  $("status").textContent = text;
}

function option(select, value, label) {
  const el = document.createElement("option");
  el.value = value;
  el.textContent = label ?? value;
  select.append(el);
}

async function start() {
  const config = await (await fetch("/web/config.json")).json();
  if (config.api_key_required && !page.apiKey) return askForKey();
  await loadVoices();
}

function askForKey(refused = false) {
  $("key-form").hidden = false;
  $("speak-form").hidden = $("clone-form").hidden = true;
  $("model").textContent = "This server needs its API key.";
  $("key-error").textContent = refused ? "That key was refused." : "";
}

async function loadVoices() {
  const response = await fetch("/v1/audio/voices", { headers: authHeaders() });
  if (response.status === 401) return askForKey(true);
  if (!response.ok) throw new Error(`GET /v1/audio/voices: ${response.status}`);
  const info = (page.info = await response.json());
  $("key-form").hidden = true;
  $("speak-form").hidden = false;
  $("model").textContent = `${info.model} (${info.model_type}, ${info.model_size}), ${info.sample_rate} Hz`;
  const voice = $("voice");
  const keep = voice.value;
  voice.replaceChildren();
  if (!info.voices.length) option(voice, "", info.supports_cloning ? "clone a voice below first" : "(model default)");
  for (const name of info.voices) option(voice, name);
  if (info.voices.includes(keep)) voice.value = keep;
  const language = $("language");
  if (!language.options.length) for (const name of info.languages) option(language, name);
  $("instructions-row").hidden = !info.supports_instructions;
  $("clone-form").hidden = !info.supports_cloning;
}

async function ensureAudio() {
  if (audio) {
    if (audio.context.state === "suspended") await audio.context.resume();
    return audio;
  }
  const context = new AudioContext({ sampleRate: page.info.sample_rate, latencyHint: "interactive" });
  await context.audioWorklet.addModule("/web/player-worklet.js");
  const node = new AudioWorkletNode(context, "pcm-player", { outputChannelCount: [1] });
  const analyser = context.createAnalyser();
  analyser.fftSize = 2048;
  node.connect(analyser).connect(context.destination);
  node.port.onmessage = (event) => {
    page.workletSamples = event.data.received;
    page.playedSamples = event.data.played;
    $("audio-seconds").textContent = `${(page.workletSamples / context.sampleRate).toFixed(2)} s`;
  };
  audio = { context, node, analyser };
  requestAnimationFrame(drawWaveform);
  if (context.state === "suspended") await context.resume();
  return audio;
}

// The live waveform: the loudness (RMS) of each animation frame's worth of the audio playing (the analyser sits
// between the worklet and the speakers), scrolling right to left, scaled to the loudest bar on screen.
const peaks = [];

function drawWaveform() {
  const canvas = $("waveform");
  const g = canvas.getContext("2d");
  const samples = new Float32Array(audio.analyser.fftSize);
  audio.analyser.getFloatTimeDomainData(samples);
  let peak = 0;
  let energy = 0;
  for (const v of samples) {
    peak = Math.max(peak, Math.abs(v));
    energy += v * v;
  }
  page.waveformPeak = Math.max(page.waveformPeak, peak);
  const bar = 3;
  peaks.push(Math.sqrt(energy / samples.length));
  while (peaks.length > canvas.width / bar) peaks.shift();
  const scale = Math.max(0.05, ...peaks);
  const mid = canvas.height / 2;
  g.clearRect(0, 0, canvas.width, canvas.height);
  g.fillStyle = "#2563eb";
  peaks.forEach((p, i) => {
    const h = Math.max(1, (p / scale) * mid * 0.95);
    g.fillRect(canvas.width - (peaks.length - i) * bar, mid - h, bar - 1, 2 * h);
  });
  requestAnimationFrame(drawWaveform);
}

function socketUrl() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const query = page.apiKey ? `?api_key=${encodeURIComponent(page.apiKey)}` : "";
  return `${scheme}://${location.host}${WS_PATH}${query}`;
}

function finish(text) {
  if (session) {
    session.ws.close();
    session = null;
  }
  $("speak").disabled = false;
  $("stop").disabled = true;
  setStatus(text);
}

async function speak() {
  const text = $("text").value;
  if (!text.trim()) return setStatus("Write something to speak.");
  stop();
  const { node } = await ensureAudio();
  node.port.postMessage({ type: "clear" });
  page.workletSamples = 0;
  page.firstAudioMs = page.stopReason = null;
  $("first-audio").textContent = $("stop-reason").textContent = "-";
  $("audio-seconds").textContent = "0.00 s";
  const contextId = `page-${++contextCounter}`;
  const ws = new WebSocket(socketUrl());
  ws.binaryType = "arraybuffer";
  session = { ws, contextId, sentAt: null };
  const mine = session;
  $("speak").disabled = true;
  $("stop").disabled = false;
  setStatus("Connecting...");
  ws.onopen = () => {
    const config = { type: "config", context_id: contextId, language: $("language").value };
    if ($("voice").value) config.voice = $("voice").value;
    if (!$("instructions-row").hidden && $("instructions").value.trim()) config.instructions = $("instructions").value;
    ws.send(JSON.stringify(config));
    ws.send(JSON.stringify({ type: "text", context_id: contextId, text }));
    ws.send(JSON.stringify({ type: "flush", context_id: contextId }));
    mine.sentAt = performance.now();
    setStatus("Speaking...");
  };
  ws.onmessage = (event) => {
    if (session !== mine) return;
    if (event.data instanceof ArrayBuffer) return play(event.data);
    const msg = JSON.parse(event.data);
    if (msg.type === "audio_done") {
      page.stopReason = msg.stop_reason;
      $("stop-reason").textContent = msg.stop_reason;
      finish(msg.stop_reason === "cancelled" ? "Stopped." : "Done.");
    } else if (msg.type === "error") {
      page.errors.push(msg.message);
      setStatus(`Error: ${msg.message}`);
    }
  };
  ws.onclose = (event) => {
    if (session === mine) finish(event.code === 1000 ? "Closed." : `Connection closed (${event.code} ${event.reason}).`);
  };
}

function play(buffer) {
  const bytes = new Uint8Array(buffer);
  const pcm = new Int16Array(buffer.slice(1 + bytes[0])); // 1 byte N, N bytes of context id, then PCM16LE
  const samples = new Float32Array(pcm.length);
  for (let i = 0; i < pcm.length; i++) samples[i] = pcm[i] / 32768;
  if (page.firstAudioMs === null && session && session.sentAt !== null) {
    page.firstAudioMs = performance.now() - session.sentAt;
    $("first-audio").textContent = `${page.firstAudioMs.toFixed(0)} ms`;
  }
  audio.node.port.postMessage(samples, [samples.buffer]);
}

function stop() {
  if (!session) return;
  if (session.ws.readyState === WebSocket.OPEN) {
    session.ws.send(JSON.stringify({ type: "cancel", context_id: session.contextId }));
    setStatus("Stopping...");
  }
  if (audio) audio.node.port.postMessage({ type: "clear" });
  $("stop").disabled = true;
}

async function cloneVoice() {
  const form = new FormData();
  form.append("name", $("clone-name").value.trim());
  form.append("audio", $("clone-audio").files[0]);
  if ($("clone-transcript").value.trim()) form.append("transcript", $("clone-transcript").value.trim());
  form.append("consent", $("clone-consent").checked ? "true" : "false");
  $("clone-submit").disabled = true;
  $("clone-status").textContent = "Cloning...";
  try {
    const response = await fetch("/v1/audio/voices", { method: "POST", body: form, headers: authHeaders() });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error ? body.error.message : `${response.status}`);
    $("clone-status").textContent = `Cloned "${body.name}" (${body.duration_s} s of reference).`;
    await loadVoices();
    $("voice").value = body.name;
  } catch (error) {
    $("clone-status").textContent = `Not cloned: ${error.message}`;
  } finally {
    $("clone-submit").disabled = !$("clone-consent").checked;
  }
}

$("speak-form").addEventListener("submit", (event) => {
  event.preventDefault();
  speak().catch((error) => finish(`Error: ${error.message}`));
});
$("stop").addEventListener("click", stop);
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  page.apiKey = $("api-key").value.trim() || null;
  loadVoices().catch((error) => ($("key-error").textContent = error.message));
});
$("clone-consent").addEventListener("change", () => ($("clone-submit").disabled = !$("clone-consent").checked));
$("clone-form").addEventListener("submit", (event) => {
  event.preventDefault();
  cloneVoice();
});

start().catch((error) => ($("model").textContent = `Could not load the voices: ${error.message}`));
