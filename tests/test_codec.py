"""Codec decoder: parity with the official 12 Hz speech tokenizer, exact streaming, config and loading."""

import math

import pytest
import torch

from qwen_tts_megakernel.codec import CodecDecoder, CodecDecoderConfig, StreamingCodec
from qwen_tts_megakernel.synthetic.codec import random_speech_tokenizer_weights, tiny_speech_tokenizer_config, write_tiny_speech_tokenizer

# The released Qwen3-TTS-Tokenizer-12Hz/config.json, decoder half (docs/qwen3-tts-model.md §5).
REAL_CONFIG = {
    "model_type": "qwen3_tts_tokenizer_12hz",
    "encoder_valid_num_quantizers": 16,
    "input_sample_rate": 24000,
    "output_sample_rate": 24000,
    "decode_upsample_rate": 1920,
    "encode_downsample_rate": 1920,
    "decoder_config": {
        "attention_bias": False,
        "latent_dim": 1024,
        "codebook_dim": 512,
        "codebook_size": 2048,
        "decoder_dim": 1536,
        "hidden_act": "silu",
        "hidden_size": 512,
        "intermediate_size": 1024,
        "layer_scale_initial_scale": 0.01,
        "max_position_embeddings": 8000,
        "head_dim": 64,
        "num_attention_heads": 16,
        "num_hidden_layers": 8,
        "num_key_value_heads": 16,
        "num_quantizers": 16,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000,
        "sliding_window": 72,
        "semantic_codebook_size": 4096,
        "num_semantic_quantizers": 1,
        "upsample_rates": [8, 5, 4, 3],
        "upsampling_ratios": [2, 2],
    },
}

SPF = 1920  # samples per frame


def random_codes(frames: int, seed: int) -> torch.Tensor:
    """Codes over the full range the talker can emit, [frames, 16]."""
    return torch.randint(0, 2048, (frames, 16), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny_decoder() -> CodecDecoder:
    config = tiny_speech_tokenizer_config()
    cfg = CodecDecoderConfig.from_json_dict(config)
    return CodecDecoder.from_state_dict(cfg, random_speech_tokenizer_weights(config, seed=0))


# --- config -------------------------------------------------------------------------------------


def test_config_parses_the_real_checkpoint_values():
    cfg = CodecDecoderConfig.from_json_dict(REAL_CONFIG)
    assert cfg.samples_per_frame == 1920 and cfg.sample_rate == 24000 and cfg.frame_rate == 12.5
    assert (cfg.hidden_size, cfg.latent_dim, cfg.codebook_dim, cfg.decoder_dim) == (512, 1024, 512, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (16, 16, 64)
    assert (cfg.intermediate_size, cfg.num_hidden_layers, cfg.sliding_window) == (1024, 8, 72)
    assert cfg.upsample_rates == (8, 5, 4, 3) and cfg.upsampling_ratios == (2, 2)
    assert (cfg.codebook_size, cfg.num_quantizers, cfg.rope_theta) == (2048, 16, 10000)


def test_config_rejects_a_mismatched_upsample_product():
    bad = {**REAL_CONFIG, "decoder_config": {**REAL_CONFIG["decoder_config"], "upsample_rates": [8, 5, 4, 4]}}
    with pytest.raises(ValueError, match="decode_upsample_rate.*1920.*2560"):
        CodecDecoderConfig.from_json_dict(bad)
    with pytest.raises(ValueError, match="upsample"):
        CodecDecoderConfig.from_json_dict({**REAL_CONFIG, "decode_upsample_rate": 960})


def test_config_requires_codebook_dim():
    with pytest.raises(ValueError, match="codebook_dim"):
        CodecDecoderConfig.from_json_dict({"decoder_config": {}})


def test_config_defaults_are_the_official_class_defaults(qwen_tts):
    from qwen_tts.core.tokenizer_12hz.configuration_qwen3_tts_tokenizer_v2 import (
        Qwen3TTSTokenizerV2Config,
        Qwen3TTSTokenizerV2DecoderConfig,
    )

    ours = CodecDecoderConfig.from_json_dict({"decoder_config": {"codebook_dim": 512}})
    official = Qwen3TTSTokenizerV2DecoderConfig(codebook_dim=512)
    for name in ("codebook_size", "hidden_size", "latent_dim", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "num_hidden_layers", "num_quantizers", "sliding_window", "rope_theta",
                 "rms_norm_eps", "layer_scale_initial_scale", "decoder_dim", "max_position_embeddings",
                 "attention_bias", "hidden_act"):
        assert getattr(ours, name) == getattr(official, name), name
    assert ours.upsample_rates == tuple(official.upsample_rates)
    assert ours.upsampling_ratios == tuple(official.upsampling_ratios)
    assert ours.head_dim == official.hidden_size // official.num_attention_heads
    top = Qwen3TTSTokenizerV2Config()
    assert (ours.sample_rate, ours.samples_per_frame) == (top.output_sample_rate, top.decode_upsample_rate)


# --- parity with the official implementation ---------------------------------------------------


@pytest.mark.parity
def test_tiny_checkpoint_loads_into_the_official_model(qwen_tts, tmp_path):
    from qwen_tts.core import Qwen3TTSTokenizerV2Model

    d = write_tiny_speech_tokenizer(tmp_path / "speech_tokenizer", seed=0)
    model, info = Qwen3TTSTokenizerV2Model.from_pretrained(str(d), output_loading_info=True)
    assert [k for k in info["missing_keys"] if k.startswith("decoder.")] == []
    assert info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    # Every decoder tensor the official model has is one we wrote, with the same shape.
    ours = random_speech_tokenizer_weights(tiny_speech_tokenizer_config(), seed=0)
    official = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("decoder.")}
    assert official == {k: tuple(v.shape) for k, v in ours.items()}


@pytest.mark.parity
def test_decode_matches_the_official_decoder(qwen_tts, tmp_path):
    d = write_tiny_speech_tokenizer(tmp_path / "speech_tokenizer", seed=0)
    official = qwen_tts.Qwen3TTSTokenizer.from_pretrained(str(d), device_map="cpu")
    ours = CodecDecoder.from_pretrained(d)

    frames = 100  # > the 72-frame attention window, <= the official 300-frame chunk
    codes = random_codes(frames, seed=1)
    wavs, sr = official.decode({"audio_codes": codes})
    reference = torch.from_numpy(wavs[0])
    wav = ours.decode(codes)

    assert sr == ours.sample_rate == 24000
    assert wav.shape == reference.shape == (frames * SPF,)
    assert (wav - reference).abs().max().item() <= 1e-4
    # The tiny random model makes a real signal: not constant, not silent, mostly not clipped.
    assert wav.std().item() > 0.05
    assert (wav.abs() >= 1.0).float().mean().item() < 0.05
    assert wav.view(frames, SPF).std(dim=1).min().item() > 0.01


# --- streaming ----------------------------------------------------------------------------------


def _stream(decoder: CodecDecoder, codes: torch.Tensor, schedule) -> torch.Tensor:
    codec = StreamingCodec(decoder, max_streams=1)
    stream, out, i = codec.open(), [], 0
    for n in schedule:
        n = min(n, codes.shape[0] - i)
        if n <= 0:
            break
        chunk = codec.push([stream], [codes[i : i + n]])[0]
        assert chunk.shape == (n * SPF,)
        out.append(torch.from_numpy(chunk))
        i += n
    assert i == codes.shape[0] and stream.frames == i
    return torch.cat(out)


@pytest.mark.parametrize(
    "frames, schedule",
    [
        (40, [1] * 40),
        (60, [1, 2, 4, 8] * 8),
        (100, [7] * 15),  # crosses the 72-frame attention window
        (90, [1] * 90),
    ],
    ids=["ones", "1-2-4-8", "sevens-past-window", "ones-past-window"],
)
def test_streaming_equals_whole_decode(tiny_decoder, frames, schedule):
    codes = random_codes(frames, seed=frames)
    whole = tiny_decoder.decode(codes)
    streamed = _stream(tiny_decoder, codes, schedule)
    assert streamed.shape == whole.shape
    assert (streamed - whole).abs().max().item() <= 1e-5


def test_streaming_state_is_fixed_per_stream(tiny_decoder):
    """Each stream's state is one row of a store allocated up front: conv tails, overlaps, window - 1 frames of K/V."""
    codec = StreamingCodec(tiny_decoder, max_streams=2)
    layout = codec.store.layout
    window, kv_heads, head_dim = tiny_decoder.cfg.sliding_window, 2, 16
    kv_shapes = [shape for _, shape in layout.entries["pre_transformer.layers.0.attn"]]
    assert kv_shapes == [(kv_heads, window - 1, head_dim)] * 2
    assert layout.entries["blocks.0.res_units.2.conv1"][0][1] == (16, 6 * 9)  # k=7, dilation 9, 32 -> 16 channels
    assert codec.store.values.shape == (3, layout.size)  # two slots and the scratch row
    before = codec.store.values.data_ptr()
    stream = codec.open()
    codec.push([stream], [random_codes(9, seed=5)])
    assert codec.store.values.data_ptr() == before and int(codec.store.position[stream.slot]) == 9


# --- loading and input checks -------------------------------------------------------------------


def test_wrong_weight_shape_names_the_tensor_and_both_shapes():
    config = tiny_speech_tokenizer_config()
    weights = random_speech_tokenizer_weights(config, seed=0)
    name = "decoder.pre_transformer.layers.1.self_attn.k_proj.weight"
    weights[name] = torch.zeros(31, 32)
    with pytest.raises(ValueError) as err:
        CodecDecoder.from_state_dict(CodecDecoderConfig.from_json_dict(config), weights)
    message = str(err.value)
    assert name in message and "(32, 32)" in message and "(31, 32)" in message


def test_missing_weight_is_reported():
    config = tiny_speech_tokenizer_config()
    weights = random_speech_tokenizer_weights(config, seed=0)
    del weights["decoder.decoder.6.conv.bias"]
    with pytest.raises(ValueError, match="decoder.decoder.6.conv.bias"):
        CodecDecoder.from_state_dict(CodecDecoderConfig.from_json_dict(config), weights)


def test_random_weights_are_deterministic_and_sane():
    config = tiny_speech_tokenizer_config()
    a = random_speech_tokenizer_weights(config, seed=3)
    b = random_speech_tokenizer_weights(config, seed=3)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(v.dtype == torch.float32 for v in a.values())
    usage = [v for k, v in a.items() if k.endswith("cluster_usage")]
    assert len(usage) == 16 and all(u.min() > 0 and u.shape == (2048,) for u in usage)


def test_decode_rejects_bad_codes(tiny_decoder):
    with pytest.raises(ValueError, match=r"\[T, 16\]"):
        tiny_decoder.decode(torch.zeros(4, 15, dtype=torch.long))
    with pytest.raises(ValueError, match="2048"):
        tiny_decoder.decode(torch.full((4, 16), 2048, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        tiny_decoder.decode(torch.zeros(4, 16))


def test_decode_accepts_the_extreme_codes(tiny_decoder):
    for value in (0, 2047):
        wav = tiny_decoder.decode(torch.full((3, 16), value, dtype=torch.long))
        assert wav.shape == (3 * SPF,) and torch.isfinite(wav).all()


def test_bfloat16_runs_close_to_float32(tiny_decoder):
    config = tiny_speech_tokenizer_config()
    bf16 = CodecDecoder.from_state_dict(
        CodecDecoderConfig.from_json_dict(config), random_speech_tokenizer_weights(config, seed=0), dtype=torch.bfloat16
    )
    codes = random_codes(12, seed=11)
    wav = bf16.decode(codes)
    assert wav.dtype == torch.float32 and torch.isfinite(wav).all()
    assert (wav - tiny_decoder.decode(codes)).abs().mean().item() < 0.02


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_decode_and_streaming_match_cpu(tiny_decoder):
    config = tiny_speech_tokenizer_config()
    gpu = CodecDecoder.from_state_dict(
        CodecDecoderConfig.from_json_dict(config), random_speech_tokenizer_weights(config, seed=0), device="cuda"
    )
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    codes = random_codes(100, seed=13)
    whole = gpu.decode(codes)
    assert whole.is_cuda
    assert (whole.cpu() - tiny_decoder.decode(codes)).abs().max().item() <= 1e-4
    streamed = _stream(gpu, codes, [1, 2, 4, 8] * 10 + [8] * 10)
    assert (streamed - whole.cpu()).abs().max().item() <= 1e-4
    assert math.isfinite(streamed.abs().max().item())
