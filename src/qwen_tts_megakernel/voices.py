"""Cloned voices: made once from a reference clip, stored on disk, used by name like a built-in speaker.

    encoder = VoiceEncoder.from_checkpoint(synth.checkpoint)
    voice = encoder.clone(audio_24k, ref_text="what the clip says")      # x-vector + reference codes (ICL)
    library = VoiceLibrary(default_voice_dir(), model_id=model_identity(synth.config))
    library.add("alice", voice)
    synth.voice_library = library; synth.stream("Hi.", voice="alice")   # resolve_voice() turns names into voices
"""

from __future__ import annotations

import numpy as np
import torch

from .checkpoint import Checkpoint
from .prompt import ClonedVoice
from .speaker_encoder import SpeakerEncoder


class VoiceEncoder:
    """The two encoders of a Base checkpoint: the speaker encoder (x-vector) and the speech tokenizer's encoder
    (reference codes for the in-context layout). Both take 24 kHz mono float samples."""

    def __init__(self, speaker_encoder: SpeakerEncoder):
        self.speaker_encoder = speaker_encoder

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, device=None, dtype: torch.dtype = torch.float32) -> "VoiceEncoder":
        config = checkpoint.config
        if config.model_type != "base" or config.speaker_encoder is None:
            raise ValueError(f"voice cloning needs a Base model; this one is {config.model_type}")
        return cls(SpeakerEncoder.from_state_dict(config.speaker_encoder, checkpoint.weights, device, dtype))

    def speaker_embedding(self, audio: np.ndarray) -> torch.Tensor:
        """The x-vector [H] of a 24 kHz clip, float32 on the CPU."""
        return self.speaker_encoder.embed(audio).float().cpu()
