"""Speaking rate: a pitch-preserving time stretch of streamed PCM16, chunk by chunk.

`speed` 2.0 speaks twice as fast (half the duration), 0.5 half as fast; the pitch stays. The stretch is FFmpeg's
`atempo` filter (a WSOLA time stretch) through PyAV, the same library as the compressed response formats: it keeps
a small state between chunks, so each engine chunk is stretched as it arrives and nothing waits for the end of the
utterance. atempo takes 0.5-100 per instance; slower speeds chain instances (0.25 = 0.5 x 0.5).

Input is fed in 10 ms pieces so that the filter's output buffer (sized by its input frames) never holds a whole
chunk back. What remains is the filter's look-ahead (about 40 ms of input at 24 kHz): the first engine chunk
(one 80 ms frame) gives its stretched audio minus that look-ahead at speeds up to 2.75, and from 3 on
the first audio comes with the second chunk. `finish()` drains the rest, so no audio is lost.

    stretch = TimeStretch(1.5, 24000)
    for pcm in chunks:               # int16 mono numpy arrays
        yield stretch.process(pcm)   # possibly empty
    yield stretch.finish()

Cost (CPU time per second of 24 kHz audio, one core of the 2-core development machine; tests/test_client_requests
prints it): about 1 ms at 1.5x and 4x, 1.4-2 ms at 0.5x, 3-5 ms at 0.25x when the machine is idle, up to 2-3x that
under load; under 0.5 % of a core at any speed.
"""

from __future__ import annotations

import math

import numpy as np

SPEED_MIN, SPEED_MAX = 0.25, 4.0
_ATEMPO_MIN = 0.5  # one atempo instance's lower bound
_PIECE_S = 0.010


def check_speed(value) -> float:
    """`value` as a float if it is a speed within 0.25-4.0, else ValueError naming the range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"speed must be a number between {SPEED_MIN} and {SPEED_MAX}, got {str(value)[:40]!r}")
    if not SPEED_MIN <= value <= SPEED_MAX:
        raise ValueError(f"speed must be between {SPEED_MIN} and {SPEED_MAX}, got {value}")
    return float(value)


def atempo_stages(speed: float) -> list[float]:
    """atempo factors whose product is `speed`, each within one instance's range."""
    stages = 1 if speed >= _ATEMPO_MIN else math.ceil(math.log(speed) / math.log(_ATEMPO_MIN))
    return [speed ** (1.0 / stages)] * stages


class TimeStretch:
    """One stream's time stretch (see the module doc). Not thread-safe: one per stream."""

    def __init__(self, speed: float, sample_rate: int):
        try:
            import av
            from av.filter import Graph
        except ImportError as exc:  # pragma: no cover - av is in the server extra
            raise RuntimeError("speed other than 1.0 needs PyAV: pip install 'qwen-tts-megakernel[server]'") from exc
        self.speed = check_speed(speed)
        self.sample_rate = sample_rate
        self._av = av
        self._graph = Graph()
        nodes = [self._graph.add_abuffer(format="s16", sample_rate=sample_rate, layout="mono",
                                         time_base=f"1/{sample_rate}")]
        nodes += [self._graph.add("atempo", f"{factor:.9f}") for factor in atempo_stages(self.speed)]
        nodes.append(self._graph.add("aformat", "sample_fmts=s16:channel_layouts=mono"))
        nodes.append(self._graph.add("abuffersink"))
        self._graph.link_nodes(*nodes).configure()
        self._piece = max(1, int(sample_rate * _PIECE_S))
        self._pts = 0
        self.finished = False

    def _pull(self) -> list[np.ndarray]:
        out = []
        while True:
            try:
                frame = self._graph.pull()
            except (self._av.BlockingIOError, self._av.EOFError):
                return out
            out.append(frame.to_ndarray().reshape(-1))

    def process(self, pcm: np.ndarray) -> np.ndarray:
        """The stretched audio that is ready after `pcm` (int16 mono); may be empty."""
        if self.finished:
            raise RuntimeError("process() after finish()")
        pcm = np.ascontiguousarray(pcm, dtype=np.int16).reshape(-1)
        out = []
        for start in range(0, len(pcm), self._piece):
            piece = pcm[start:start + self._piece]
            frame = self._av.AudioFrame.from_ndarray(piece.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = self.sample_rate
            frame.pts = self._pts
            self._pts += len(piece)
            self._graph.push(frame)
            out += self._pull()
        return np.concatenate(out).astype(np.int16, copy=False) if out else np.zeros(0, np.int16)

    def finish(self) -> np.ndarray:
        """The rest of the stretched audio (the filter's look-ahead); the stretch is done after this."""
        if self.finished:
            return np.zeros(0, np.int16)
        self.finished = True
        self._graph.push(None)
        out = self._pull()
        return np.concatenate(out).astype(np.int16, copy=False) if out else np.zeros(0, np.int16)
