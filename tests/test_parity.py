"""Parity with the official implementation (PyPI qwen-tts 0.1.1) on tiny checkpoints in the official layout.

For each tiny config (0.6B-like, 1.7B-like) x text layout x voice type, with greedy decoding:
  - our prefill rows equal the official talker's input embeddings,
  - our codes equal the official generate() codes for every frame,
  - our talker logits equal the official ones to 1e-4 (fp32) at every step,
  - our codec decode equals the official speech tokenizer's decode to 1e-4.
"""

import numpy as np
import pytest
import torch

from qwen_tts_megakernel.engine import PromptSource, Request, Synthesizer
from qwen_tts_megakernel.synthetic import write_tiny_model

pytestmark = pytest.mark.parity

FRAMES = 24
TEXT = "Hello world, this is a test of the speech model."
INSTRUCT = "Speak warmly and slowly, like a storyteller."


@pytest.fixture(scope="module")
def models(tmp_path_factory, qwen_tts):
    """(ours, official) per (size, type), loaded once."""
    cache = {}

    def get(size, model_type):
        key = (size, model_type)
        if key not in cache:
            path = write_tiny_model(tmp_path_factory.mktemp(f"{size}-{model_type}"), size, model_type, seed=3)
            ours = Synthesizer.from_pretrained(str(path), device="cpu", dtype=torch.float32)
            official = qwen_tts.Qwen3TTSModel.from_pretrained(str(path), device_map="cpu", dtype=torch.float32)
            cache[key] = (ours, official)
        return cache[key]

    return get


def official_generate(official, *, model_type, text, speaker, language, instruct, layout):
    """Run the official model.generate() the way its wrapper does, recording talker inputs and logits.

    Official quirk: generate(max_new_tokens=N) samples N codebook-0 tokens but completes only N-1 frames (a frame's
    codebooks 1..15 are filled inside the next talker call), so FRAMES + 1 is asked for to get FRAMES frames."""
    m = official
    inputs, logits = [], []
    talker = m.model.talker
    h1 = talker.model.register_forward_pre_hook(
        lambda mod, args, kwargs: inputs.append(kwargs["inputs_embeds"].detach().clone()), with_kwargs=True)
    h2 = talker.codec_head.register_forward_hook(lambda mod, args, out: logits.append(out[0, -1].detach().clone()))
    try:
        input_ids = m._tokenize_texts([m._build_assistant_text(text)])
        instruct_ids = [m._tokenize_texts([m._build_instruct_text(instruct)])[0] if instruct else None]
        kwargs = dict(input_ids=input_ids, instruct_ids=instruct_ids, languages=[language],
                      non_streaming_mode=(layout == "prefill"), do_sample=False, subtalker_dosample=False,
                      max_new_tokens=FRAMES + 1, top_k=50, top_p=1.0, temperature=0.9, repetition_penalty=1.05,
                      subtalker_top_k=50, subtalker_top_p=1.0, subtalker_temperature=0.9)
        if model_type == "custom_voice":
            kwargs["speakers"] = [speaker]
        codes_list, _ = m.model.generate(**kwargs)
    finally:
        h1.remove()
        h2.remove()
    return codes_list[0].cpu().numpy(), inputs, logits


CASES = [(size, model_type, layout)
         for size in ("0.6b", "1.7b")
         for model_type in ("custom_voice", "voice_design")
         for layout in ("prefill", "interleaved")]


@pytest.mark.parametrize("size,model_type,layout", CASES)
def test_greedy_codes_logits_and_audio_match_official(models, size, model_type, layout):
    ours, official = models(size, model_type)
    speaker = "ryan" if model_type == "custom_voice" else None
    # Instruct applies to voice design and to the 1.7B custom voice model (the 0.6B one drops it).
    instruct = INSTRUCT if (model_type == "voice_design" or size == "1.7b") else None
    language = "english"

    ref_codes, ref_inputs, ref_logits = official_generate(official, model_type=model_type, text=TEXT,
                                                          speaker=speaker, language=language, instruct=instruct,
                                                          layout=layout)
    assert ref_codes.shape == (FRAMES, 16), "the official run stopped early; the fixture should not emit EOS"

    # Our stream, step by step, so we can read the logits of every talker pass.
    prompt = ours.prompt(TEXT, voice=speaker, language=language, instruct=instruct, text_layout=layout)
    params = ours.sampling_params(do_sample=False)
    request = Request(prompt=prompt, params=params, limit=FRAMES, limit_reason="max_new_tokens")
    [stream] = ours.backend.open([PromptSource(request, seed=0).spec(ours.embedder, ours.config)])
    our_codes, our_logits = [], []
    for _ in range(FRAMES):
        our_codes.append(ours.backend.step([stream]).codes[0])
        our_logits.append(stream.last_logits)
    ours.backend.close(stream)

    # The prefill rows are the official talker's first input.
    prefill = ours.talker.embed_rows(prompt.text_ids, prompt.codec_ids)
    assert ref_inputs[0].shape[1] == len(prefill)
    torch.testing.assert_close(prefill, ref_inputs[0][0], atol=1e-5, rtol=1e-5)

    np.testing.assert_array_equal(np.stack(our_codes), ref_codes)
    assert len(ref_logits) == FRAMES + 1
    for step, (a, b) in enumerate(zip(our_logits, ref_logits)):
        err = (a - b.float()).abs().max().item()
        assert err <= 1e-4, f"talker logits differ by {err} at step {step}"

    ref_audio, sr = official.model.speech_tokenizer.decode([{"audio_codes": torch.from_numpy(ref_codes)}])
    assert sr == 24000
    audio = ours.decode(np.stack(our_codes))
    assert audio.shape == (FRAMES * 1920,)
    assert np.abs(audio - ref_audio[0]).max() <= 1e-4


def test_synthesizer_generate_codes_is_the_same_greedy_path(models):
    """The public generate_codes() gives the codes checked above."""
    ours, official = models("0.6b", "custom_voice")
    ref_codes, _, _ = official_generate(official, model_type="custom_voice", text=TEXT, speaker="ryan",
                                        language="english", instruct=None, layout="prefill")
    result = ours.generate_codes(TEXT, voice="ryan", language="english", do_sample=False, max_new_tokens=FRAMES)
    np.testing.assert_array_equal(result.codes, ref_codes)
    assert result.stop_reason == "max_new_tokens"
