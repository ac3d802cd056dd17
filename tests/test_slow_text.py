"""The slow-text policy (pacing.py) and its measurement (tools/slow_text.py)."""

from __future__ import annotations

import pytest

from qwen_tts_megakernel.pacing import TextPacer, TextPacing
from qwen_tts_megakernel.tools.slow_text import DOCS_BEGIN, DOCS_END, simulate, write_docs


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_fast_text_speaks_at_the_first_word():
    clock = Clock()
    pacer = TextPacer(TextPacing(lead_seconds=2.0, max_wait_seconds=1.0), clock)
    pacer.on_text()
    clock.now = 0.05
    pacer.on_tokens(2)  # 40 tokens/s: faster than the talker reads
    assert pacer.tokens_needed() == 0 and pacer.may_speak(2, flushed=False)


def test_slow_text_buffers_then_waits_at_most_max_wait():
    clock = Clock()
    pacer = TextPacer(TextPacing(lead_seconds=2.0, max_wait_seconds=1.0), clock)
    pacer.on_text()
    clock.now = 0.4
    pacer.on_tokens(2)  # 5 tokens/s: needs 2 s * (12.5 - 5) = 15 tokens ahead
    assert pacer.tokens_needed() == 15
    assert not pacer.may_speak(2, flushed=False)
    clock.now = 0.99
    assert not pacer.may_speak(4, flushed=False)
    clock.now = 1.0  # waited max_wait_seconds since the first text
    assert pacer.may_speak(5, flushed=False)
    assert pacer.may_speak(1, flushed=False)  # speaking: goes on while a token is there
    assert not pacer.may_speak(0, flushed=False)  # dry
    clock.now = 1.5
    assert not pacer.may_speak(2, flushed=False)  # a resume waits too ...
    clock.now = 2.0
    assert pacer.may_speak(2, flushed=False)  # ... at most max_wait_seconds from running dry


def test_flush_always_goes_ahead_and_off_means_off():
    clock = Clock()
    pacer = TextPacer(TextPacing(lead_seconds=10.0, max_wait_seconds=10.0), clock)
    pacer.on_text()
    clock.now = 1.0
    pacer.on_tokens(1)
    assert not pacer.may_speak(1, flushed=False) and pacer.may_speak(1, flushed=True)
    off = TextPacer(TextPacing(lead_seconds=0.0, max_wait_seconds=0.0), clock)
    off.on_tokens(1)
    clock.now = 5.0
    assert off.may_speak(1, flushed=False) and not off.may_speak(0, flushed=False)


def test_bad_pacing_is_refused():
    with pytest.raises(ValueError, match="lead_seconds"):
        TextPacing(lead_seconds=-1)
    with pytest.raises(ValueError, match="max_wait_seconds"):
        TextPacing(max_wait_seconds=float("nan"))


def test_the_trade_off():
    off, default = TextPacing(0.0, 0.0), TextPacing()
    slow_off, slow_default = simulate(5.0, off), simulate(5.0, default)
    # At 5 tokens/s the policy waits longer for the first audio and then pauses far less often.
    assert slow_default.time_to_first_audio_s > slow_off.time_to_first_audio_s
    assert slow_default.gaps < slow_off.gaps / 3 and slow_default.gap_s <= slow_off.gap_s
    # Text faster than the talker reads (12.5 tokens/s) costs nothing and never pauses.
    for rate in (15.0, 50.0):
        fast = simulate(rate, default)
        assert fast.gaps == 0 and fast.time_to_first_audio_s <= 2 / rate + 0.01


def test_write_docs_replaces_only_the_table(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(f"before\n{DOCS_BEGIN}\nold\n{DOCS_END}\nafter\n")
    write_docs(doc, "| new |")
    assert doc.read_text() == f"before\n{DOCS_BEGIN}\n| new |\n{DOCS_END}\nafter\n"
