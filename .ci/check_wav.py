"""CI check of the WAV the README's speak command wrote: a valid 24 kHz 16-bit mono file, 0.5 to 60 s, not silent."""

import array
import math
import sys
import wave

path = sys.argv[1]
with wave.open(path, "rb") as f:
    params = (f.getnchannels(), f.getsampwidth(), f.getframerate())
    samples = array.array("h", f.readframes(f.getnframes()))
seconds = len(samples) / 24000
rms = math.sqrt(sum(s * s for s in samples) / max(1, len(samples)))
problems = [p for p, bad in [(f"format {params}, expected (1, 2, 24000)", params != (1, 2, 24000)),
                             (f"{seconds:.2f} s long, expected 0.5 to 60 s", not 0.5 <= seconds <= 60),
                             (f"silent (RMS {rms:.1f} of 32767)", rms < 30)] if bad]
if problems:
    sys.exit(f"{path}: " + "; ".join(problems))
print(f"{path}: {seconds:.2f} s of 24 kHz mono PCM16, RMS {rms:.0f}", file=sys.stderr)
