"""Slow text, measured: time to first audio against pauses, for text arriving at 5, 15 and 50 tokens/s.

    python -m qwen_tts_megakernel.tools.slow_text                 # print the table
    python -m qwen_tts_megakernel.tools.slow_text --write-docs    # and put it into docs/pipecat.md

A simulation of one streamed-text context driven by the server's own policy (pacing.TextPacer) on a simulated
clock, so that it measures the policy and nothing else:

  * the LLM sends one word per token at a steady rate; a word is committed (tokenized) when the next one starts,
    the last one at the end of the reply (the flush); one LLM token counts as one talker text token (Qwen2's
    tokenizer and an LLM's are both large BPE vocabularies: about one token per English word);
  * the talker generates a frame as soon as the policy lets it (a GPU generates far faster than real time), frame k
    reading token k, and the utterance lasts as long as the model's speaking rate says (4.5 tokens per second of
    audio, word_timing.py), its frames after the text's end needing no text;
  * the listener plays 80 ms frames back to back from the first one; a frame not there when it is due is a pause.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..pacing import TextPacer, TextPacing
from ..word_timing import SPEAKING_TOKENS_PER_SECOND

FRAME_S = 0.08
STEP_S = 0.005  # the simulated clock's tick
RATES = (5.0, 15.0, 50.0)
POLICIES = {
    "off (speak whenever a token is there)": TextPacing(lead_seconds=0.0, max_wait_seconds=0.0),
    "default (lead 2 s, wait <= 1 s)": TextPacing(),
    "patient (lead 4 s, wait <= 3 s)": TextPacing(lead_seconds=4.0, max_wait_seconds=3.0),
}
REPLY_WORDS = 60  # a reply of a few sentences: about 13 s of speech

DOCS_BEGIN = "<!-- slow-text table: python -m qwen_tts_megakernel.tools.slow_text --write-docs -->"
DOCS_END = "<!-- end of slow-text table -->"


@dataclass
class Result:
    time_to_first_audio_s: float
    gap_s: float
    gaps: int
    audio_s: float


def simulate(rate: float, pacing: TextPacing, words: int = REPLY_WORDS) -> Result:
    now = 0.0
    pacer = TextPacer(pacing, clock=lambda: now)
    total_frames = math.ceil(words / SPEAKING_TOKENS_PER_SECOND / FRAME_S)
    arrival = [i / rate for i in range(words)]
    committed = 0
    frames: list[float] = []  # generation time of each frame
    while len(frames) < total_frames:
        if arrival[0] <= now:
            pacer.on_text()
        # Word i is committed when word i+1 starts arriving; the last one at the flush, with it.
        while committed < words and (committed + 1 < words and arrival[committed + 1] <= now
                                     or committed + 1 == words and arrival[-1] <= now):
            committed += 1
            pacer.on_tokens(committed)
        flushed = committed == words
        while len(frames) < total_frames and (len(frames) >= words and flushed
                                              or pacer.may_speak(committed - len(frames), flushed)):
            frames.append(now)
        now += STEP_S
    gap, gaps, due = 0.0, 0, frames[0]
    for t in frames[1:]:
        due += FRAME_S
        if t > due + 1e-9:
            gap += t - due
            gaps += 1
            due = t
    return Result(frames[0], gap, gaps, total_frames * FRAME_S)


def table() -> str:
    lines = ["| text arrives at | policy | time to first audio | pauses | total pause |",
             "|---:|---|---:|---:|---:|"]
    for rate in RATES:
        for name, pacing in POLICIES.items():
            r = simulate(rate, pacing)
            lines.append(f"| {rate:g} tokens/s | {name} | {r.time_to_first_audio_s:.2f} s | {r.gaps} | "
                         f"{r.gap_s:.2f} s |")
    return "\n".join(lines) + (f"\n\n{REPLY_WORDS} words, {simulate(RATES[0], TextPacing()).audio_s:.1f} s of speech; "
                               "times from the first token's arrival.")


def write_docs(path: Path, text: str) -> None:
    doc = path.read_text("utf-8")
    pattern = re.compile(re.escape(DOCS_BEGIN) + r".*?" + re.escape(DOCS_END), re.S)
    if not pattern.search(doc):
        raise SystemExit(f"{path}: no slow-text table markers ({DOCS_BEGIN} ... {DOCS_END})")
    path.write_text(pattern.sub(lambda _: f"{DOCS_BEGIN}\n{text}\n{DOCS_END}", doc), "utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-docs", nargs="?", const="docs/pipecat.md", metavar="PATH",
                        help="replace the table in this Markdown file (default docs/pipecat.md)")
    args = parser.parse_args(argv)
    text = table()
    print(text)
    if args.write_docs:
        write_docs(Path(args.write_docs), text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
