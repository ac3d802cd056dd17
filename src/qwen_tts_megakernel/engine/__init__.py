"""The engine: streams, the scheduler that batches them onto one backend and one codec, and the Python API.

    jobs.py         a stream as the scheduler sees it (Job, PromptSource), chunks, stop reasons, frame limits
    scheduler.py    Engine: admission, batched prefill, one backend step and one codec call per engine step
    step_model.py   StepModel: what a step costs by batch size, the model real-time admission asks
    warmup.py       the start-up warm-up: every batch size stepped once before the first stream
    synthesizer.py  Synthesizer: the public API; every call is a Job on the synthesizer's one Engine
"""

from .jobs import (DEFAULT_CHUNK_SCHEDULE, STOP_REASONS, AudioChunk, Job, JobInfo, PromptSource, Request,
                   check_max_new_tokens, float_to_pcm16, frame_limit, length_guard)
from .scheduler import Engine, EngineFull, EngineSettings, EngineUnavailable
from .synthesizer import (BACKENDS, RANDOM_MODEL_PREFIX, GenerationResult, SpeechStream, StreamError, Synthesizer,
                          pick_seed)

__all__ = ["DEFAULT_CHUNK_SCHEDULE", "STOP_REASONS", "AudioChunk", "Job", "JobInfo", "PromptSource", "Request",
           "check_max_new_tokens", "float_to_pcm16", "frame_limit", "length_guard", "Engine", "EngineFull",
           "EngineSettings", "EngineUnavailable", "BACKENDS", "RANDOM_MODEL_PREFIX", "GenerationResult",
           "SpeechStream", "StreamError", "Synthesizer", "pick_seed"]
