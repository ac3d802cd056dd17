"""Driver for profiling one megakernel frame with Nsight Compute (scripts/ncu_frame.sh runs it under ncu).

Launches a few full frames (random full-size 0.6B weights, greedy, no EOS) on one stream; ncu skips the first
launches and profiles one.
"""

import torch

from qwen_tts_megakernel.megakernel.backend import MegakernelBackend
from qwen_tts_megakernel.tools.validate import random_config, random_prompt, random_weights
from qwen_tts_megakernel.sampling import RandomStream, SamplingParams


def main() -> None:
    config = random_config("0.6b")
    weights = random_weights(config, seed=0, device="cuda")
    backend = MegakernelBackend(config, weights, device="cuda", max_seq_len=1024)
    prefill, text, pad = random_prompt(config, n_prefill=12, n_text=64)
    stream = backend.open_stream(prefill, text, pad, SamplingParams(), RandomStream(7), lookahead=0)
    stream.struct.min_new_tokens = 1 << 40  # never stop at EOS
    for k in range(6):
        backend.launch(stream.struct, k, stream.L - 1 + k)
    backend.stream.synchronize()
    stream.launched = 6
    stream.close()
    print("launched 6 frames")


if __name__ == "__main__":
    main()
