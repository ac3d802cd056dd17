"""Driver for profiling one megakernel frame with Nsight Compute (scripts/ncu_frame.sh runs it under ncu).

Launches a few full frames (random full-size 0.6B weights) of one stream; ncu skips the first
launches and profiles one.
"""

from qwen_tts_megakernel.backends.base import StreamSpec
from qwen_tts_megakernel.megakernel.backend import MegakernelBackend
from qwen_tts_megakernel.tools.validate import random_config, random_prompt, random_weights
from qwen_tts_megakernel.sampling import RandomStream, SamplingParams


def main() -> None:
    config = random_config("0.6b")
    weights = random_weights(config, seed=0, device="cuda")
    backend = MegakernelBackend(config, weights, device="cuda", max_streams=1, max_seq_len=1024,
                                prefill_graphs=False)
    prefill, text, pad = random_prompt(config, n_prefill=12, n_text=64)
    h = backend.open([StreamSpec(prefill=prefill, text_rows=text, pad_row=pad, params=SamplingParams(),
                                 rng=RandomStream(7), max_frames=6)])[0]
    launch = backend._entries([h])
    for _ in range(6):
        backend.launch(launch)  # the same position each time: timing only
    backend.stream.synchronize()
    backend.close(h)
    print("launched 6 frames")


if __name__ == "__main__":
    main()
