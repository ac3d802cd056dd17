"""Estimated word timings: the estimate itself (word_timing.py) and the WebSocket's "timestamps" events."""

from __future__ import annotations

import json

import pytest

from qwen_tts_megakernel.word_timing import FRAME_SECONDS, WordTimeline


def chars(text: str) -> list[int]:
    """A stand-in tokenizer: one token per character (so token positions are easy to check)."""
    return list(range(len(text)))


def test_words_start_at_their_first_token_over_the_speaking_rate():
    timeline = WordTimeline(chars, tokens_per_second=5.0)  # 0.2 s per token
    timeline.add_text("  Hello there, wor")  # "wor" may go on in the next delta: not a word yet
    words = timeline.due(100.0)
    assert [w.word for w in words] == ["Hello", "there,"]
    # "  Hello" is 7 tokens (leading spaces stay with the first word), " there," 7 more.
    assert [(w.start, w.end) for w in words] == [(0.0, 1.4), (1.4, 2.8)]
    timeline.add_text("ld")
    timeline.flush()
    assert [(w.word, w.start, w.end) for w in timeline.due(100.0)] == [("world", 2.8, 4.0)]


def test_words_go_out_only_once_their_audio_has():
    timeline = WordTimeline(chars, tokens_per_second=5.0)
    timeline.add_text("ab cd ef ")
    assert [w.word for w in timeline.due(0.0)] == []
    assert [w.word for w in timeline.due(0.01)] == ["ab"]
    assert [w.word for w in timeline.due(0.6)] == ["cd"]  # "cd" starts at 0.4 s, "ef" at 1.0 s
    assert [w.word for w in timeline.due(0.6)] == []


def test_reading_rate_is_a_lower_bound():
    timeline = WordTimeline(chars, tokens_per_second=100.0)  # faster than the talker reads: clamped
    timeline.add_text("ab cd ")
    assert [w.start for w in timeline.due(10.0)] == [0.0, round(2 * FRAME_SECONDS, 3)]


def test_finish_fits_the_rest_into_the_audio_or_drops_it():
    timeline = WordTimeline(chars, tokens_per_second=5.0)
    timeline.add_text("ab cd ef gh")
    timeline.flush()
    first = timeline.due(0.5)
    assert [w.word for w in first] == ["ab", "cd"]
    # The estimate ends "gh" at 2.2 s but the audio ended at 1.3 s: "ef" (from 1.0 s) and "gh" share 1.0..1.3 s.
    rest = timeline.finish(1.3, spoken_to_end=True)
    assert [w.word for w in rest] == ["ef", "gh"]
    assert rest[0].start == pytest.approx(1.0) and rest[-1].end == pytest.approx(1.3)
    assert rest[0].start < rest[1].start < rest[1].end
    cut = WordTimeline(chars, tokens_per_second=5.0)
    cut.add_text("ab cd ef")
    assert cut.finish(0.3, spoken_to_end=False) == []


def test_bad_rate_is_refused():
    with pytest.raises(ValueError, match="tokens_per_second"):
        WordTimeline(chars, tokens_per_second=0)


def test_websocket_sends_timestamps_for_every_spoken_word(tmp_path):
    pytest.importorskip("fastapi")
    ws_client = pytest.importorskip("websockets.sync.client")
    from qwen_tts_megakernel.engine import Synthesizer
    from qwen_tts_megakernel.synthetic import write_tiny_model
    from qwen_tts_megakernel.testing.server import running_server

    write_tiny_model(tmp_path, "0.6b", "custom_voice", seed=0)
    synth = Synthesizer.from_pretrained(str(tmp_path), device="cpu")
    text = "Hello there, how are you today?"
    with running_server(synth) as (url, _app):
        with ws_client.connect(url.replace("http", "ws") + "/v1/audio/speech/stream") as ws:
            ws.send(json.dumps({"type": "config", "context_id": "c1", "voice": "ryan", "seed": 3,
                                "max_new_tokens": 300}))
            for piece in ("Hello there,", " how are", " you today?"):
                ws.send(json.dumps({"type": "text", "context_id": "c1", "text": piece}))
            ws.send(json.dumps({"type": "flush", "context_id": "c1"}))
            audio_s, events, done = 0.0, [], None
            while done is None:
                message = ws.recv(timeout=60)
                if isinstance(message, bytes):
                    audio_s += (len(message) - 3) / 2 / 24000
                    continue
                event = json.loads(message)
                if event["type"] == "timestamps":
                    assert event["context_id"] == "c1"
                    # Sent once the audio reaching the first word's start has gone out.
                    assert event["start"][0] < audio_s + 1e-6
                    events.append(event)
                elif event["type"] == "audio_done":
                    done = event
    words = [w for e in events for w in e["words"]]
    assert words, "no timestamps"
    starts = [s for e in events for s in e["start"]]
    ends = [s for e in events for s in e["end"]]
    if done["stop_reason"] == "eos":
        assert words == text.split()
        assert ends[-1] == pytest.approx(done["audio_seconds"], abs=1e-3)
    else:  # the random tiny model hit the frame limit: only the words it reached
        assert words == text.split()[:len(words)]
    assert starts == sorted(starts) and all(s <= e for s, e in zip(starts, ends))
    assert all(s <= done["audio_seconds"] + 1e-6 for s in starts)
