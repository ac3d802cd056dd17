"""Voice cloning parity with the official implementation (PyPI qwen-tts 0.1.1) on tiny Base checkpoints.

  - x-vector: our speaker encoder equals the official extract_speaker_embedding to 1e-4,
  - reference codes: our speech-tokenizer encoder equals the official speech_tokenizer.encode on every frame,
  - prefill rows equal the official talker's first input, and greedy codes equal the official generate() for the
    x-vector-only and in-context (ICL) layouts, in both text layouts, 0.6B-like and 1.7B-like,
  - streamed ICL audio (the codec continuing from the reference frames) equals the official joint decode with the
    reference part cut off.
"""

import numpy as np
import pytest
import torch

from qwen_tts_megakernel.engine import PromptSource, Request, Synthesizer
from qwen_tts_megakernel.prompt import ClonedVoice
from qwen_tts_megakernel.synthetic import write_tiny_model
from qwen_tts_megakernel.voices import VoiceEncoder

pytestmark = pytest.mark.parity

FRAMES = 20
TEXT = "Hello world, this is a test of the speech model."
REF_TEXT = "The reference clip says this."


def reference_clip(seconds: float, seed: int = 0) -> np.ndarray:
    """A voiced-like test signal at 24 kHz: a gliding harmonic tone with noise, inside [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(24000 * seconds)) / 24000
    f0 = 140 + 30 * np.sin(2 * np.pi * 1.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / 24000
    audio = sum(0.25 / k * np.sin(k * phase) for k in range(1, 6)) + 0.02 * rng.standard_normal(len(t))
    return audio.astype(np.float32)


@pytest.fixture(scope="module")
def models(tmp_path_factory, qwen_tts):
    """(ours, official, our VoiceEncoder) per size, loaded once."""
    cache = {}

    def get(size):
        if size not in cache:
            path = write_tiny_model(tmp_path_factory.mktemp(f"{size}-base"), size, "base", seed=5)
            ours = Synthesizer.from_pretrained(str(path), device="cpu", dtype=torch.float32)
            official = qwen_tts.Qwen3TTSModel.from_pretrained(str(path), device_map="cpu", dtype=torch.float32)
            cache[size] = (ours, official, VoiceEncoder.from_checkpoint(ours.checkpoint))
        return cache[size]

    return get


def official_clone(official, *, text, voice: ClonedVoice, layout, frames=FRAMES):
    """The official generate() for a voice clone prompt, greedy, recording the talker's first input."""
    m = official
    inputs = []
    hook = m.model.talker.model.register_forward_pre_hook(
        lambda mod, args, kwargs: inputs.append(kwargs["inputs_embeds"].detach().clone()), with_kwargs=True)
    try:
        ref_ids = None
        if voice.in_context:
            ref_ids = [m._tokenize_texts([m._build_ref_text(voice.ref_text)])[0]]
        prompt = dict(ref_code=[torch.from_numpy(voice.ref_codes) if voice.in_context else None],
                      ref_spk_embedding=[voice.x_vector], x_vector_only_mode=[not voice.in_context],
                      icl_mode=[voice.in_context])
        codes_list, _ = m.model.generate(
            input_ids=m._tokenize_texts([m._build_assistant_text(text)]), ref_ids=ref_ids,
            voice_clone_prompt=prompt, languages=["english"], non_streaming_mode=(layout == "prefill"),
            do_sample=False, subtalker_dosample=False, max_new_tokens=frames + 1, top_k=50, top_p=1.0,
            temperature=0.9, repetition_penalty=1.05, subtalker_top_k=50, subtalker_top_p=1.0,
            subtalker_temperature=0.9)
    finally:
        hook.remove()
    return codes_list[0].cpu().numpy(), inputs[0][0]


def our_codes(ours, prompt, frames=FRAMES):
    """Greedy codes of our reference backend, stepped through the backend contract."""
    request = Request(prompt=prompt, params=ours.sampling_params(do_sample=False), limit=frames,
                      limit_reason="max_new_tokens")
    [stream] = ours.backend.open([PromptSource(request, seed=0).spec(ours.embedder, ours.config)])
    try:
        return np.stack([ours.backend.step([stream]).codes[0] for _ in range(frames)])
    finally:
        ours.backend.close(stream)


@pytest.mark.parametrize("size", ["0.6b", "1.7b"])
def test_x_vector_equals_official(models, size):
    ours, official, encoder = models(size)
    audio = reference_clip(2.0)
    ref = official.model.extract_speaker_embedding(audio, 24000)
    x_vector = encoder.speaker_embedding(audio)
    assert x_vector.shape == (ours.config.talker.hidden_size,)
    assert (x_vector - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("size", ["0.6b", "1.7b"])
@pytest.mark.parametrize("layout", ["prefill", "interleaved"])
def test_x_vector_only_prompt_and_greedy_codes_equal_official(models, size, layout):
    ours, official, encoder = models(size)
    voice = ClonedVoice(x_vector=encoder.speaker_embedding(reference_clip(2.0)), name="tone")
    ref_codes, ref_prefill = official_clone(official, text=TEXT, voice=voice, layout=layout)
    assert ref_codes.shape == (FRAMES, 16), "the official run stopped early"

    prompt = ours.prompt(TEXT, voice=voice, language="english", text_layout=layout)
    prefill = ours.embedder.embed_prompt(prompt)
    assert prefill.shape == ref_prefill.shape
    torch.testing.assert_close(prefill, ref_prefill, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(our_codes(ours, prompt), ref_codes)


@pytest.mark.parametrize("seconds", [2.0, 3.37])
def test_reference_codes_equal_official_encode(models, seconds):
    ours, official, encoder = models("0.6b")
    audio = reference_clip(seconds, seed=1)
    ref = official.model.speech_tokenizer.encode(audio, sr=24000).audio_codes[0].numpy()
    codes = encoder.reference_codes(audio)
    assert codes.shape == (int(np.ceil(len(audio) / 1920)), 16) == ref.shape
    assert len(np.unique(codes[:, 0])) > 3, "degenerate fixture: the codes should vary over time"
    np.testing.assert_array_equal(codes, ref)


# (size, layout, reference seconds, text). Interleaved: a short reference leaves text rows for the decode steps
# (text rows > reference frames + 1); a long reference with a short text fits all the text in the prefill.
ICL_CASES = [("0.6b", "prefill", 2.0, TEXT), ("0.6b", "interleaved", 0.5, TEXT), ("0.6b", "interleaved", 4.0, "Hi."),
             ("1.7b", "prefill", 2.0, TEXT), ("1.7b", "interleaved", 0.5, TEXT)]


@pytest.mark.parametrize("size,layout,seconds,text", ICL_CASES)
def test_in_context_prompt_and_greedy_codes_equal_official(models, size, layout, seconds, text):
    ours, official, encoder = models(size)
    voice = encoder.clone(reference_clip(seconds, seed=2), ref_text=REF_TEXT, name="tone")
    assert voice.in_context
    ref_codes, ref_prefill = official_clone(official, text=text, voice=voice, layout=layout)
    assert ref_codes.shape == (FRAMES, 16), "the official run stopped early"

    prompt = ours.prompt(text, voice=voice, language="english", text_layout=layout)
    if layout == "interleaved":
        assert bool(prompt.trailing_text_ids) == (text == TEXT)
    prefill = ours.embedder.embed_prompt(prompt)
    assert prefill.shape == ref_prefill.shape
    torch.testing.assert_close(prefill, ref_prefill, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(our_codes(ours, prompt), ref_codes)


def test_streamed_in_context_audio_equals_official_joint_decode_with_the_reference_cut(models):
    ours, official, encoder = models("0.6b")
    voice = encoder.clone(reference_clip(1.5, seed=3), ref_text=REF_TEXT)
    frames = 8
    stream = ours.stream(TEXT, voice=voice, language="english", do_sample=False, max_new_tokens=frames,
                         chunk_schedule=(1, 3))
    chunks = list(stream)
    assert chunks[0].num_frames == 1, "the first chunk is still one frame"
    pcm = np.concatenate([c.pcm for c in chunks])
    codes = np.stack(stream.codes)
    assert codes.shape == (frames, 16)

    joint = np.concatenate([voice.ref_codes, codes])
    wavs, sr = official.model.speech_tokenizer.decode([{"audio_codes": torch.from_numpy(joint)}])
    ref_len = len(voice.ref_codes)
    cut = int(ref_len / len(joint) * wavs[0].shape[0])  # the official generate_voice_clone cut
    assert abs(cut - ref_len * 1920) <= 1
    official_new = wavs[0][ref_len * 1920:]
    assert len(pcm) == len(official_new) == frames * 1920
    assert np.abs(pcm / 32767.0 - official_new).max() <= 1e-4 + 0.5 / 32767  # PCM16 rounding
    # A second stream of the same voice primes its own codec state: the same bytes.
    again = ours.stream(TEXT, voice=voice, language="english", do_sample=False, max_new_tokens=frames,
                        chunk_schedule=(1, 3))
    assert np.concatenate([c.pcm for c in again]).tobytes() == pcm.tobytes()
    # The float path, whole utterance: equal to 1e-4 without the int16 rounding.
    audio = ours.decode(codes, prime_codes=voice.ref_codes)
    assert np.abs(audio - official_new).max() <= 1e-4
