"""Engine behaviour on a tiny checkpoint: prompts, stop reasons, streaming chunks, reproducibility, CLI, loading."""

import json
import shutil
import subprocess
import sys
import threading
import wave

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen_tts_megakernel.checkpoint import CheckpointError, load_checkpoint
from qwen_tts_megakernel.engine import Synthesizer, length_guard
from qwen_tts_megakernel.prompt import PromptError, build_prompt
from qwen_tts_megakernel.synthetic import write_tiny_model

TEXT = "Hello world, this is a test."


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny"), "0.6b", "custom_voice", seed=0)


@pytest.fixture(scope="module")
def synth(tiny_dir):
    return Synthesizer.from_pretrained(str(tiny_dir), device="cpu")


# Prompt layouts -------------------------------------------------------------------------------------------------


def test_custom_voice_prefill_layout(synth):
    cfg, ids = synth.config, synth.config.ids
    p = build_prompt(cfg, synth.tokenizer, TEXT, voice="Ryan", language="English", text_layout="prefill")
    n = p.num_text_tokens
    assert len(p) == n + 11  # 3 role + think, think_bos, lang, think_eos, speaker, pad + text + eos + bos
    assert p.codec_ids[:3] == [None, None, None]
    assert p.codec_ids[3:9] == [ids.codec_think, ids.codec_think_bos, 2050, ids.codec_think_eos, 3061, ids.codec_pad]
    assert p.text_ids[3:9] == [ids.tts_pad] * 5 + [ids.tts_bos]
    assert p.text_ids[-2:] == [ids.tts_eos, ids.tts_pad] and p.codec_ids[-2:] == [ids.codec_pad, ids.codec_bos]
    assert p.trailing_text_ids == []


def test_interleaved_layout_feeds_one_text_token_per_frame(synth):
    ids = synth.config.ids
    p = build_prompt(synth.config, synth.tokenizer, TEXT, voice="ryan", language="auto", text_layout="interleaved")
    assert p.codec_ids[3:6] == [ids.codec_nothink, ids.codec_think_bos, ids.codec_think_eos]
    assert len(p) == 3 + 3 + 2 + 1  # role, auto tags, speaker and pad, first text token with codec_bos
    assert p.codec_ids[-1] == ids.codec_bos
    assert len(p.trailing_text_ids) == p.num_text_tokens and p.trailing_text_ids[-1] == ids.tts_eos


@pytest.mark.parametrize("language,expected", [("chinese", 2062), ("auto", 2062), ("english", 2050)])
def test_dialect_speaker_rule(synth, language, expected):
    p = build_prompt(synth.config, synth.tokenizer, TEXT, voice="eric", language=language)
    assert p.codec_ids[5] == expected


@pytest.mark.parametrize("kwargs,message", [
    (dict(text=""), "empty"),
    (dict(text="   "), "empty"),
    (dict(text=TEXT, voice="nobody"), "unknown voice"),
    (dict(text=TEXT, language="klingon"), "unknown language"),
    (dict(text=TEXT, language="sichuan_dialect"), "unknown language"),
    (dict(text=TEXT, instruct="whisper"), "instruct"),
    (dict(text=TEXT, text_layout="sideways"), "text_layout"),
])
def test_bad_requests_raise_prompt_errors(synth, kwargs, message):
    with pytest.raises(PromptError, match=message):
        build_prompt(synth.config, synth.tokenizer, **kwargs)


def test_voice_design_takes_instruct_rows_and_no_speaker(tmp_path):
    synth = Synthesizer.from_pretrained(str(write_tiny_model(tmp_path, "0.6b", "voice_design")), device="cpu")
    ids = synth.config.ids
    p = build_prompt(synth.config, synth.tokenizer, TEXT, instruct="A calm voice.", language="english")
    instruct_len = len(synth.tokenizer.encode("<|im_start|>user\nA calm voice.<|im_end|>\n"))
    assert p.codec_ids[:instruct_len + 3] == [None] * (instruct_len + 3)
    assert 3061 not in p.codec_ids and ids.codec_pad in p.codec_ids
    with pytest.raises(PromptError, match="no named voices"):
        build_prompt(synth.config, synth.tokenizer, TEXT, voice="ryan")


# Stop reasons and reproducibility --------------------------------------------------------------------------------


def test_max_new_tokens_and_length_guard(synth):
    r = synth.generate_codes(TEXT, seed=1, max_new_tokens=7)
    assert r.codes.shape == (7, 16) and r.stop_reason == "max_new_tokens"
    r = synth.generate_codes("Hi", seed=1, max_new_tokens=10_000)
    assert r.stop_reason == "length_guard" and len(r.codes) == length_guard(r.num_text_tokens)


def test_eos_stops_after_the_minimum_and_is_not_emitted(tiny_dir):
    synth = Synthesizer.from_pretrained(str(tiny_dir), device="cpu")
    eos = synth.config.ids.codec_eos

    def boost_eos(module, args, out):  # make EOS the talker's favourite token
        out = out.clone()
        out[..., eos] += 1000.0
        return out

    synth.talker.codec_head.register_forward_hook(boost_eos)
    r = synth.generate_codes(TEXT, seed=3, max_new_tokens=50, do_sample=False)
    assert r.stop_reason == "eos"
    assert len(r.codes) == 2  # EOS is forbidden for the first two frames
    assert (r.codes[:, 0] < 2048).all()


def test_seeded_sampling_is_reproducible(synth):
    a = synth.generate_codes(TEXT, seed=11, max_new_tokens=12)
    b = synth.generate_codes(TEXT, seed=11, max_new_tokens=12)
    c = synth.generate_codes(TEXT, seed=12, max_new_tokens=12)
    np.testing.assert_array_equal(a.codes, b.codes)
    assert not np.array_equal(a.codes, c.codes)
    assert (a.codes >= 0).all() and (a.codes < 2048).all()


# Streaming ------------------------------------------------------------------------------------------------------


def test_stream_chunks_follow_the_schedule_and_equal_the_whole_decode(synth):
    stream = synth.stream(TEXT, seed=5, max_new_tokens=20, chunk_schedule=(1, 2, 4, 8))
    chunks = list(stream)
    assert [c.num_frames for c in chunks] == [1, 2, 4, 8, 5]
    assert [c.first_frame for c in chunks] == [0, 1, 3, 7, 15]
    assert all(len(c.pcm) == 1920 * c.num_frames and c.pcm.dtype == np.int16 for c in chunks)
    assert all(c.sample_rate == 24000 for c in chunks)
    assert stream.stop_reason == "max_new_tokens"
    codes = np.stack(stream.codes)
    np.testing.assert_array_equal(codes, synth.generate_codes(TEXT, seed=5, max_new_tokens=20).codes)
    whole = np.clip(synth.decode(codes), -1, 1) * 32767
    streamed = np.concatenate([c.pcm for c in chunks]).astype(np.float64)
    assert np.abs(streamed - whole).max() <= 1.0
    assert np.abs(streamed).max() > 100  # not silence


def test_closing_a_stream_cancels_it(synth):
    stream = synth.stream(TEXT, seed=5, max_new_tokens=50)
    next(stream)
    stream.close()
    assert stream.stop_reason == "cancelled"


def test_cancel_event_stops_within_a_frame(synth):
    cancel = threading.Event()
    stream = synth.stream(TEXT, seed=5, max_new_tokens=50, chunk_schedule=(1,), cancel=cancel)
    next(stream)
    cancel.set()
    rest = list(stream)
    assert len(rest) <= 1 and stream.stop_reason == "cancelled"


def test_stream_rejects_bad_requests_before_the_first_chunk(synth):
    with pytest.raises(PromptError):
        synth.stream("", seed=1)
    with pytest.raises(ValueError):
        synth.stream(TEXT, chunk_schedule=(0,))
    with pytest.raises(ValueError):
        synth.generate_codes(TEXT, max_new_tokens=0)
    with pytest.raises(TypeError, match="unknown sampling"):
        synth.generate_codes(TEXT, max_new_tokens=2, top_q=3)


def test_1_7b_layout_runs_with_the_projection(tmp_path):
    synth = Synthesizer.from_pretrained(str(write_tiny_model(tmp_path, "1.7b", "custom_voice")), device="cpu")
    assert synth.config.has_mtp_projection
    r = synth.generate_codes(TEXT, voice="vivian", instruct="Cheerful.", seed=1, max_new_tokens=5,
                             text_layout="interleaved")
    assert r.codes.shape == (5, 16)


# Loading --------------------------------------------------------------------------------------------------------


def test_wrong_tensor_shape_names_the_tensor_and_both_shapes(tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    weights = load_file(str(broken / "model.safetensors"))
    name = "talker.model.layers.1.mlp.up_proj.weight"
    weights[name] = torch.zeros(65, 32)
    save_file(weights, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"{name} has shape \[65, 32\], the config implies \[64, 32\]"):
        load_checkpoint(broken)
    del weights[name]
    save_file(weights, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"{name} is missing"):
        load_checkpoint(broken)


def test_config_errors_are_clear(tiny_dir, tmp_path):
    broken = tmp_path / "cfg"
    shutil.copytree(tiny_dir, broken)
    cfg = json.loads((broken / "config.json").read_text())
    del cfg["talker_config"]["rope_theta"]
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="rope_theta"):
        load_checkpoint(broken)


def test_missing_model_message_says_how_to_get_one(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match="tiny-model"):
        load_checkpoint("Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice")
    with pytest.raises(CheckpointError, match="neither an existing folder"):
        load_checkpoint(str(tmp_path / "nope"))


# CLI ------------------------------------------------------------------------------------------------------------


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "qwen_tts_megakernel.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_cli_tiny_model_then_say_writes_a_24khz_mono_wav(tmp_path):
    model = tmp_path / "model"
    assert _cli("tiny-model", str(model), "--seed", "1").returncode == 0
    out = tmp_path / "out.wav"
    r = _cli("say", "Good morning, everyone.", "-o", str(out), "--model", str(model), "--seed", "2",
             "--max-new-tokens", "30")
    assert r.returncode == 0, r.stderr
    with wave.open(str(out)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 24000)
        assert w.getnframes() == 30 * 1920
    assert "stop reason max_new_tokens" in r.stdout


@pytest.mark.parametrize("args,message", [
    (["say", "", "-o", "x.wav"], "text: empty"),
    (["say", "Hi", "-o", "x.wav", "--voice", "nobody"], "unknown voice"),
    (["say", "Hi", "-o", "x.wav", "--language", "klingon"], "unknown language"),
])
def test_cli_errors_are_one_line(tmp_path, args, message):
    model = tmp_path / "model"
    write_tiny_model(model)
    r = _cli(*args, "--model", str(model))
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def test_cli_missing_model_is_a_clear_error(tmp_path):
    r = _cli("say", "Hi", "-o", str(tmp_path / "x.wav"), "--model", str(tmp_path / "absent"))
    assert r.returncode == 2 and "tiny-model" in r.stderr and "Traceback" not in r.stderr


def test_reference_runs_in_bf16(tiny_dir):
    synth = Synthesizer.from_pretrained(str(tiny_dir), device="cpu", dtype="bfloat16")
    assert synth.talker.codec_head.weight.dtype == torch.bfloat16
    r = synth.generate_codes(TEXT, seed=1, max_new_tokens=4)
    assert r.codes.shape == (4, 16) and (r.codes < 2048).all()


def test_base_models_load_and_explain_that_cloning_is_not_implemented(tmp_path):
    synth = Synthesizer.from_pretrained(str(write_tiny_model(tmp_path, "0.6b", "base")), device="cpu")
    assert synth.config.model_type == "base" and synth.voices == []
    with pytest.raises(PromptError, match="voice cloning"):
        synth.generate_codes(TEXT, max_new_tokens=2)


@pytest.mark.parametrize("size,params_millions", [("0.6b", 906), ("1.7b", 1920)])  # qwen3-tts-model.md 1.5
def test_real_shapes_match_the_published_parameter_counts(size, params_millions):
    import math

    from qwen_tts_megakernel.checkpoint import expected_shapes
    from qwen_tts_megakernel.config import ModelConfig
    from qwen_tts_megakernel.synthetic.checkpoints import GENERATION_CONFIG, real_config, real_speech_tokenizer_config

    config = ModelConfig.from_dicts(real_config(size, "custom_voice", {"<|im_start|>": 1, "<|im_end|>": 2,
                                                                       "<tts_pad>": 3, "<tts_text_bos>": 4,
                                                                       "<tts_text_eod>": 5}),
                                    real_speech_tokenizer_config(), GENERATION_CONFIG)
    total = sum(math.prod(s) for s in expected_shapes(config).values()) / 1e6
    assert abs(total - params_millions) / params_millions < 0.005
    assert config.codec.samples_per_frame == 1920 and config.codec.hidden_size == 512
    assert config.has_mtp_projection == (size == "1.7b")


def test_an_fp32_embedder_of_a_bf16_checkpoint_computes_the_fp32_talkers_rows(tmp_path):
    """The megakernel's prompt rows (model.PromptEmbedder in fp32, the text table left in bf16) equal those of an
    fp32 talker built from the same bf16 weights, bit for bit: the kernel and the reference start from one input."""
    from qwen_tts_megakernel.engine.jobs import prompt_rows
    from qwen_tts_megakernel.model import PromptEmbedder, Talker

    write_tiny_model(tmp_path, "0.6b", "base", seed=3)
    checkpoint = load_checkpoint(str(tmp_path))
    weights = {k: v.to(torch.bfloat16) for k, v in checkpoint.weights.items()}
    embedder = PromptEmbedder.from_state_dict(checkpoint.config, weights, dtype=torch.float32)
    assert embedder.text_embedding.weight.dtype == torch.bfloat16  # the one large table is not widened
    assert embedder.text_projection.linear_fc1.weight.dtype == torch.float32
    talker = Talker.from_state_dict(checkpoint.config, {k: v.float() for k, v in weights.items()},
                                    dtype=torch.float32)
    from qwen_tts_megakernel.voices import VoiceEncoder

    audio = 0.3 * np.sin(np.arange(24000 * 2) * (2 * np.pi * 150 / 24000)).astype(np.float32)
    voice = VoiceEncoder.from_checkpoint(checkpoint).clone(audio, ref_text="A reference.")  # x-vector and frames
    prompt = build_prompt(checkpoint.config, checkpoint.tokenizer, "Rows computed in fp32.", voice=voice,
                          language="english", text_layout="prefill")
    assert prompt.ref_codes is not None and prompt.speaker_embedding is not None
    for ours, theirs in zip(prompt_rows(embedder, checkpoint.config, prompt),
                            prompt_rows(talker.embedder(), checkpoint.config, prompt)):
        assert ours.dtype == torch.float32 and torch.equal(ours, theirs)
