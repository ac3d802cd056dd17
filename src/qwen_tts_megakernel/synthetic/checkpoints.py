"""Random checkpoints in the exact official Hugging Face layout: tiny ones are the test fixture of this project,
full-size ones (the real 0.6B / 1.7B shapes) stand in for real weights in GPU validation and benchmarks.

`write_tiny_model(dir)` writes config.json, generation_config.json, model.safetensors (official tensor names),
vocab.json + merges.txt + tokenizer_config.json, preprocessor_config.json and speech_tokenizer/{config.json,
model.safetensors, preprocessor_config.json}. The structure is real (16 codebooks, codec vocab 3072 with the real
control ids, speakers and languages, 1920 samples per frame); only the widths are small. The official qwen-tts
package loads these folders, which is how the parity tests compare the two implementations.

Base checkpoints (`model_type="base"`) also carry the speaker encoder ("speaker_encoder.*" in model.safetensors,
narrow channels in the tiny ones) for voice cloning.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..codec_encoder import CodecEncoderConfig, codec_encoder_shapes
from ..speaker_encoder import SpeakerEncoderConfig, speaker_encoder_shapes
from ..tokenizer import build_tiny_tokenizer, write_tokenizer_files
from .codec import PREPROCESSOR_CONFIG, random_speech_tokenizer_weights, tiny_speech_tokenizer_config, write_speech_tokenizer

# Real control ids, speakers and languages (qwen3-tts-model.md section 1.3).
CODEC_IDS = dict(codec_pad_id=2148, codec_bos_id=2149, codec_eos_token_id=2150, codec_think_id=2154,
                 codec_nothink_id=2155, codec_think_bos_id=2156, codec_think_eos_id=2157)
SPEAKERS = {"aiden": 2861, "sohee": 2864, "ono_anna": 2873, "eric": 2875, "dylan": 2878, "uncle_fu": 3010,
            "ryan": 3061, "vivian": 3065, "serena": 3066}
SPEAKER_DIALECTS = {name: False for name in SPEAKERS} | {"eric": "sichuan_dialect", "dylan": "beijing_dialect"}
LANGUAGES = {"english": 2050, "german": 2053, "spanish": 2054, "chinese": 2055, "japanese": 2058, "french": 2061,
             "sichuan_dialect": 2062, "korean": 2064, "russian": 2069, "italian": 2070, "portuguese": 2071,
             "beijing_dialect": 2074}

# Widths of the tiny models: (talker hidden, talker FFN, text hidden). The code predictor is 32 wide in both, so
# the 1.7B-like model has a small_to_mtp_projection (64 -> 32) like the real 1.7B (2048 -> 1024).
TINY_SIZES = {"0.6b": (32, 64, 48), "1.7b": (64, 96, 48)}
TINY_HEADS, TINY_KV_HEADS, TINY_HEAD_DIM, TINY_LAYERS, TINY_CP_HIDDEN, TINY_CP_FFN = 4, 2, 16, 2, 32, 64
# The tiny speaker encoder: the real ECAPA-TDNN structure (kernels, dilations, Res2Net scale 8) with narrow channels.
TINY_SPEAKER_ENCODER = dict(enc_channels=[32, 32, 32, 32, 96], enc_kernel_sizes=[5, 3, 3, 3, 1],
                            enc_dilations=[1, 2, 3, 4, 1], enc_attention_channels=16, enc_res2net_scale=8,
                            enc_se_channels=16)


def tiny_config(size: str, model_type: str, text_vocab_size: int, special_ids: dict[str, int]) -> dict:
    hidden, ffn, text_hidden = TINY_SIZES[size]
    code_predictor = dict(
        vocab_size=2048, hidden_size=TINY_CP_HIDDEN, intermediate_size=TINY_CP_FFN, num_hidden_layers=TINY_LAYERS,
        num_attention_heads=TINY_HEADS, num_key_value_heads=TINY_KV_HEADS, head_dim=TINY_HEAD_DIM,
        hidden_act="silu", max_position_embeddings=65536, rms_norm_eps=1e-6, rope_theta=1000000,
        rope_scaling=None, attention_bias=False, use_sliding_window=False, num_code_groups=16,
        model_type="qwen3_tts_talker_code_predictor",
    )
    talker = dict(
        code_predictor_config=code_predictor, vocab_size=3072, hidden_size=hidden, intermediate_size=ffn,
        num_hidden_layers=TINY_LAYERS, num_attention_heads=TINY_HEADS, num_key_value_heads=TINY_KV_HEADS,
        head_dim=TINY_HEAD_DIM, hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_theta=1000000,
        rope_scaling={"interleaved": True, "mrope_section": [4, 2, 2], "rope_type": "default"},
        attention_bias=False, use_sliding_window=False, num_code_groups=16, text_hidden_size=text_hidden,
        text_vocab_size=text_vocab_size, position_id_per_seconds=13, model_type="qwen3_tts_talker",
        spk_id=SPEAKERS if model_type == "custom_voice" else {},
        spk_is_dialect=SPEAKER_DIALECTS if model_type == "custom_voice" else {},
        codec_language_id=LANGUAGES, **CODEC_IDS,
    )
    config = dict(
        architectures=["Qwen3TTSForConditionalGeneration"], model_type="qwen3_tts",
        tokenizer_type="qwen3_tts_tokenizer_12hz", tts_model_size={"0.6b": "0b6", "1.7b": "1b7"}[size],
        tts_model_type=model_type, im_start_token_id=special_ids["<|im_start|>"],
        im_end_token_id=special_ids["<|im_end|>"], tts_pad_token_id=special_ids["<tts_pad>"],
        tts_bos_token_id=special_ids["<tts_text_bos>"], tts_eos_token_id=special_ids["<tts_text_eod>"],
        talker_config=talker, torch_dtype="float32", transformers_version="4.57.3",
    )
    if model_type == "base":
        config["speaker_encoder_config"] = dict(enc_dim=hidden, sample_rate=24000, **TINY_SPEAKER_ENCODER)
    return config


GENERATION_CONFIG = dict(do_sample=True, temperature=0.9, top_k=50, top_p=1.0, repetition_penalty=1.05,
                         subtalker_dosample=True, subtalker_temperature=0.9, subtalker_top_k=50, subtalker_top_p=1.0,
                         max_new_tokens=8192)


def _randn(gen: torch.Generator, *shape: int, dtype=torch.float32, device=None) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, device=gen.device).to(device=device, dtype=dtype)


def _transformer_weights(prefix: str, c: dict, gen: torch.Generator, dtype, device) -> dict:
    """Random Qwen3 decoder-stack weights under `prefix` (…layers.{i}.…, norm.weight) for config dict `c`."""

    def linear(out_f: int, in_f: int) -> torch.Tensor:
        return _randn(gen, out_f, in_f, dtype=dtype, device=device) / in_f ** 0.5

    def norm(n: int) -> torch.Tensor:
        return 1.0 + 0.1 * _randn(gen, n, dtype=dtype, device=device)

    hidden, ffn, head_dim = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q_dim, kv_dim = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
    w = {}
    for i in range(c["num_hidden_layers"]):
        p = f"{prefix}.layers.{i}"
        w[f"{p}.input_layernorm.weight"] = norm(hidden)
        w[f"{p}.self_attn.q_proj.weight"] = linear(q_dim, hidden)
        w[f"{p}.self_attn.k_proj.weight"] = linear(kv_dim, hidden)
        w[f"{p}.self_attn.v_proj.weight"] = linear(kv_dim, hidden)
        w[f"{p}.self_attn.o_proj.weight"] = linear(hidden, q_dim)
        w[f"{p}.self_attn.q_norm.weight"] = norm(head_dim)
        w[f"{p}.self_attn.k_norm.weight"] = norm(head_dim)
        w[f"{p}.post_attention_layernorm.weight"] = norm(hidden)
        w[f"{p}.mlp.gate_proj.weight"] = linear(ffn, hidden)
        w[f"{p}.mlp.up_proj.weight"] = linear(ffn, hidden)
        w[f"{p}.mlp.down_proj.weight"] = linear(hidden, ffn)
    w[f"{prefix}.norm.weight"] = norm(hidden)
    return w


def random_weights(config: dict, seed: int, dtype: torch.dtype = torch.float32,
                   device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """Random talker + code-predictor weights with the official names and shapes of config.json `config`.

    Linear layers are scaled by 1/sqrt(fan_in) so activations keep unit scale at any width; the EOS row of the
    codec head is shrunk so random models rarely stop by themselves (tests that need EOS raise it, benchmarks get
    a fixed frame count)."""
    gen = torch.Generator(device=device or "cpu").manual_seed(seed)
    tc, cc = config["talker_config"], config["talker_config"]["code_predictor_config"]
    hidden, text_hidden, cp_hidden = tc["hidden_size"], tc["text_hidden_size"], cc["hidden_size"]

    def randn(*shape: int) -> torch.Tensor:
        return _randn(gen, *shape, dtype=dtype, device=device)

    w = _transformer_weights("talker.model", tc, gen, dtype, device)
    w["talker.model.codec_embedding.weight"] = randn(tc["vocab_size"], hidden)
    w["talker.model.text_embedding.weight"] = randn(tc["text_vocab_size"], text_hidden)
    w["talker.text_projection.linear_fc1.weight"] = randn(text_hidden, text_hidden) / text_hidden ** 0.5
    w["talker.text_projection.linear_fc1.bias"] = 0.1 * randn(text_hidden)
    w["talker.text_projection.linear_fc2.weight"] = randn(hidden, text_hidden) / text_hidden ** 0.5
    w["talker.text_projection.linear_fc2.bias"] = 0.1 * randn(hidden)
    head = randn(tc["vocab_size"], hidden) / hidden ** 0.5
    head[tc["codec_eos_token_id"]] *= 0.25
    w["talker.codec_head.weight"] = head
    w.update(_transformer_weights("talker.code_predictor.model", cc, gen, dtype, device))
    for j in range(cc["num_code_groups"] - 1):
        w[f"talker.code_predictor.model.codec_embedding.{j}.weight"] = randn(cc["vocab_size"], hidden)
        w[f"talker.code_predictor.lm_head.{j}.weight"] = randn(cc["vocab_size"], cp_hidden) / cp_hidden ** 0.5
    if hidden != cp_hidden:
        w["talker.code_predictor.small_to_mtp_projection.weight"] = randn(cp_hidden, hidden) / hidden ** 0.5
        w["talker.code_predictor.small_to_mtp_projection.bias"] = 0.1 * randn(cp_hidden)
    if config["tts_model_type"] == "base":
        # The speaker encoder: fan-in scaled convolutions, small biases.
        encoder = SpeakerEncoderConfig.from_dict(config["speaker_encoder_config"])
        for name, shape in speaker_encoder_shapes(encoder).items():
            w[name] = randn(*shape) * (0.1 if name.endswith("bias") else math.prod(shape[1:]) ** -0.5)
    return {k: v.contiguous() for k, v in w.items()}


def random_codec_encoder_weights(codec_config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random "encoder.*" tensors (the speech tokenizer's Mimi encoder) with the official names and shapes: fan-in
    scaled convolutions and linears, LayerNorms near identity, LayerScales 0.05..0.2, unit-scale codebooks."""
    gen = torch.Generator().manual_seed(seed + 7919)
    out = {}
    for name, shape in sorted(codec_encoder_shapes(CodecEncoderConfig.from_json_dict(codec_config)).items()):
        leaf = name.rsplit(".", 1)[1]
        if leaf == "initialized":
            t = torch.ones(shape)
        elif leaf == "cluster_usage":
            t = 0.5 + 1.5 * torch.rand(*shape, generator=gen)
        elif leaf == "embed_sum":
            t = torch.randn(*shape, generator=gen)
        elif leaf == "scale":  # LayerScale
            t = 0.05 + 0.15 * torch.rand(*shape, generator=gen)
        elif "layernorm" in name:
            t = (1.0 if leaf == "weight" else 0.0) + 0.1 * torch.randn(*shape, generator=gen)
        elif leaf == "bias":
            t = 0.02 * torch.randn(*shape, generator=gen)
        else:
            t = torch.randn(*shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
        out[name] = t
    for name in out:  # codebook rows embed_sum / cluster_usage at unit scale
        if name.endswith("embed_sum"):
            out[name] = out[name] * out[name.replace("embed_sum", "cluster_usage")][:, None]
    return {k: v.float().contiguous() for k, v in out.items()}


def _write_checkpoint(out: Path, config: dict, weights: dict[str, torch.Tensor], tokenizer, special_ids: dict,
                      codec_config: dict, codec_seed: int) -> Path:
    """Every file of the official layout: configs, weights, tokenizer files, speech_tokenizer/."""
    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer_files(tokenizer, special_ids, out)
    (out / "config.json").write_text(json.dumps(config, indent=2), "utf-8")
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2), "utf-8")
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2), "utf-8")
    save_file({k: v.cpu() for k, v in weights.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    codec_dir = write_speech_tokenizer(out / "speech_tokenizer", codec_config, seed=codec_seed)
    if config["tts_model_type"] == "base":  # the encoder too: in-context cloning encodes reference audio
        codec = load_file(str(codec_dir / "model.safetensors"))
        codec.update(random_codec_encoder_weights(codec_config, codec_seed))
        save_file(codec, str(codec_dir / "model.safetensors"), metadata={"format": "pt"})
    return out


def write_tiny_model(out_dir: str | Path, size: str = "0.6b", model_type: str = "custom_voice",
                     seed: int = 0) -> Path:
    """Write a tiny random checkpoint in the official layout into `out_dir` and return its path."""
    if size not in TINY_SIZES:
        raise ValueError(f"size must be one of {sorted(TINY_SIZES)}, got {size!r}")
    if model_type not in ("custom_voice", "voice_design", "base"):
        raise ValueError(f"model type must be custom_voice, voice_design or base, got {model_type!r}")
    tokenizer, special_ids = build_tiny_tokenizer()
    text_vocab_size = -(-tokenizer.get_vocab_size() // 64) * 64
    config = tiny_config(size, model_type, text_vocab_size, special_ids)
    return _write_checkpoint(Path(out_dir), config, random_weights(config, seed), tokenizer, special_ids,
                             tiny_speech_tokenizer_config(), seed + 1)


# ---------------------------------------------------------------------------------------------------------------
# Full-size random checkpoints (real shapes, random values)

REAL_TALKER_WIDTHS = {"0.6b": (1024, 3072), "1.7b": (2048, 6144)}  # hidden, FFN (qwen3-tts-model.md 1.1)


def real_config(size: str, model_type: str, special_ids: dict[str, int]) -> dict:
    """config.json with the real 0.6B / 1.7B shapes (the text tokenizer's special ids are the caller's)."""
    hidden, ffn = REAL_TALKER_WIDTHS[size]
    config = tiny_config(size, model_type, 151936, special_ids)
    config["talker_config"]["code_predictor_config"].update(
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=5, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128)
    config["talker_config"].update(
        hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, text_hidden_size=2048,
        rope_scaling={"interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"})
    config["torch_dtype"] = "bfloat16"
    if model_type == "base":
        config["speaker_encoder_config"] = dict(enc_dim=hidden, sample_rate=24000)  # the official channel defaults
    return config


def real_speech_tokenizer_config() -> dict:
    """speech_tokenizer/config.json with the real decoder shapes (qwen3-tts-model.md section 5)."""
    config = tiny_speech_tokenizer_config()
    config["decoder_config"].update(
        codebook_dim=512, decoder_dim=1536, head_dim=64, hidden_size=512, intermediate_size=1024, latent_dim=1024,
        num_attention_heads=16, num_hidden_layers=8, num_key_value_heads=16)
    config["encoder_config"] = {}  # the official MimiConfig defaults; only voice cloning uses the encoder
    return config


def write_random_model(out_dir: str | Path, size: str = "0.6b", model_type: str = "custom_voice", seed: int = 0,
                       device: str | torch.device | None = None) -> Path:
    """A full-size random checkpoint (bf16) in the official layout, with the tiny tokenizer. About 2.3 GB (0.6B)."""
    tokenizer, special_ids = build_tiny_tokenizer()
    config = real_config(size, model_type, special_ids)
    return _write_checkpoint(Path(out_dir), config, random_weights(config, seed, torch.bfloat16, device), tokenizer,
                             special_ids, real_speech_tokenizer_config(), seed + 1)


def random_checkpoint(size: str = "0.6b", model_type: str = "custom_voice", seed: int = 0,
                      device: str | torch.device | None = None):
    """A full-size random model as an in-memory Checkpoint (talker weights in bf16, made on `device`): the same
    weights write_random_model() writes for the same size, type, seed and device."""
    from ..checkpoint import Checkpoint
    from ..config import ModelConfig
    from ..tokenizer import TextTokenizer

    if size not in REAL_TALKER_WIDTHS:
        raise ValueError(f"random model size must be one of {sorted(REAL_TALKER_WIDTHS)}, got {size!r}")
    tokenizer, special_ids = build_tiny_tokenizer()
    config = real_config(size, model_type, special_ids)
    codec_config = real_speech_tokenizer_config()
    codec_weights = random_speech_tokenizer_weights(codec_config, seed + 1)
    if model_type == "base":
        codec_weights.update(random_codec_encoder_weights(codec_config, seed + 1))
    return Checkpoint(path=None, config=ModelConfig.from_dicts(config, codec_config, GENERATION_CONFIG),
                      weights=random_weights(config, seed, torch.bfloat16, device),
                      codec_weights=codec_weights,
                      tokenizer=TextTokenizer(tokenizer))
