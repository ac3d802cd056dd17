"""Random speech tokenizers in the official layout: the codec part of the synthetic checkpoints (tiny ones for
tests and demos, full-size ones for benchmarks)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..codec import CodecDecoder, CodecDecoderConfig, official_parameter_names, official_shapes
from ..codec.modules import CausalConvTranspose1d, SnakeBeta
from ..layers import RMSNorm


def tiny_speech_tokenizer_config() -> dict:
    """speech_tokenizer/config.json of a tiny random model in the official format.

    Real structure (16 quantizers x 2048 codes, window 72, rates [8,5,4,3] x [2,2] = 1920 samples per
    frame at 24 kHz, head_dim != hidden / heads) with tiny widths. Unlike the real model (16 query and
    16 K/V heads) it has 4 query heads sharing 2 K/V heads, to exercise that path too. The encoder
    (a Mimi encoder, needed only to encode reference audio) is tiny as well.
    """
    return {
        "architectures": ["Qwen3TTSTokenizerV2Model"],
        "model_type": "qwen3_tts_tokenizer_12hz",
        "encoder_valid_num_quantizers": 16,
        "input_sample_rate": 24000,
        "output_sample_rate": 24000,
        "decode_upsample_rate": 1920,
        "encode_downsample_rate": 1920,
        "decoder_config": {
            "attention_bias": False,
            "attention_dropout": 0.0,
            "codebook_dim": 16,
            "codebook_size": 2048,
            "decoder_dim": 32,
            "head_dim": 16,
            "hidden_act": "silu",
            "hidden_size": 32,
            "intermediate_size": 64,
            "latent_dim": 64,
            "layer_scale_initial_scale": 0.01,
            "max_position_embeddings": 8000,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "num_key_value_heads": 2,
            "num_quantizers": 16,
            "num_semantic_quantizers": 1,
            "rms_norm_eps": 1e-05,
            "rope_theta": 10000,
            "semantic_codebook_size": 4096,
            "sliding_window": 72,
            "upsample_rates": [8, 5, 4, 3],
            "upsampling_ratios": [2, 2],
        },
        "encoder_config": {
            "_frame_rate": 12.5,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "audio_channels": 1,
            "codebook_dim": 8,
            "codebook_size": 2048,
            "compress": 2,
            "dilation_growth_rate": 2,
            "head_dim": 8,
            "hidden_act": "gelu",
            "hidden_size": 16,
            "intermediate_size": 32,
            "kernel_size": 7,
            "last_kernel_size": 3,
            "layer_scale_initial_scale": 0.01,
            "max_position_embeddings": 8000,
            "norm_eps": 1e-05,
            "num_attention_heads": 2,
            "num_filters": 4,
            "num_hidden_layers": 1,
            "num_key_value_heads": 2,
            "num_quantizers": 32,
            "num_residual_layers": 1,
            "num_semantic_quantizers": 1,
            "pad_mode": "constant",
            "residual_kernel_size": 3,
            "rope_theta": 10000.0,
            "sampling_rate": 24000,
            "sliding_window": 250,
            "trim_right_ratio": 1.0,
            "upsample_groups": 16,
            "upsampling_ratios": [8, 6, 5, 4],
            "use_cache": False,
            "use_causal_conv": True,
            "use_conv_shortcut": False,
            "use_streaming": False,
            "vector_quantization_hidden_dimension": 8,
        },
    }


def random_speech_tokenizer_weights(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random fp32 `decoder.*` weights with the official names and shapes for a speech tokenizer config.

    Only the decoder is generated: the encoder (Mimi) weights are omitted, so the official loader
    reports `encoder.*` as missing and initialises them itself. Statistics are chosen so the audio is a
    non-constant signal well inside [-1, 1]: positive cluster usage, log-scale SnakeBeta parameters near
    0, fan-in scaled convolutions, positive layer scales and ConvNeXt gammas.
    """
    cfg = CodecDecoderConfig.from_json_dict(config)
    with torch.device("meta"):  # our module tree, only for its shapes and layer types
        model = CodecDecoder(cfg)
    shapes = official_shapes(model)
    gen = torch.Generator().manual_seed(seed)

    def normal(shape, std: float, mean: float = 0.0) -> torch.Tensor:
        return mean + std * torch.randn(*shape, generator=gen)

    def uniform(shape, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=gen)

    out: dict[str, torch.Tensor] = {}
    # Dense weights, chosen by the kind of layer they belong to.
    for official, ours in official_parameter_names(cfg):
        name, shape = "decoder." + official, shapes["decoder." + official]
        module_name, leaf = ours.rsplit(".", 1)
        module = model.get_submodule(module_name)
        if isinstance(module, SnakeBeta):  # stored as logs: alpha ~ 0.6, beta ~ 1.6, a mild periodic term
            t = normal(shape, 0.2, mean=-0.5 if leaf == "alpha" else 0.5)
        elif isinstance(module, (RMSNorm, nn.LayerNorm)) and leaf == "weight":
            t = normal(shape, 0.1, mean=1.0)
        elif leaf in ("attn_scale", "mlp_scale"):  # LayerScale
            t = uniform(shape, 0.05, 0.2)
        elif leaf == "gamma":  # ConvNeXt residual scale
            t = uniform(shape, 0.1, 0.3)
        elif leaf == "bias":
            t = normal(shape, 0.02)
        elif isinstance(module, CausalConvTranspose1d):  # [in, out, k]: in * k/stride taps per output
            t = normal(shape, 1.0 / math.sqrt(shape[0] * shape[2] / module.stride))
        else:  # Linear [out, in], Conv1d [out, in/groups, k]
            t = normal(shape, 1.0 / math.sqrt(math.prod(shape[1:])))
            if ours.endswith("conv2.weight"):  # residual-unit branch: small, so blocks do not blow up
                t = t * 0.25
            if ours == "final_conv.weight":  # a waveform at about 0.25 RMS
                t = t * 0.15
        out[name] = t
    # The acoustic projection sums num_quantizers-1 codebook vectors: keep its output at unit scale.
    out["decoder.quantizer.rvq_rest.output_proj.weight"] /= math.sqrt(cfg.num_quantizers - 1)
    # Codebooks (rows = embedding_sum / cluster_usage ~ N(0, 1)) and the unused encoder-side input_proj.
    for name in sorted(set(shapes) - set(out)):
        shape = shapes[name]
        if name.endswith("cluster_usage"):
            out[name] = uniform(shape, 0.5, 2.0)
        elif name.endswith("embedding_sum"):
            out[name] = normal(shape, 1.0) * out[name.replace("embedding_sum", "cluster_usage")][:, None]
        else:
            out[name] = normal(shape, 1.0 / math.sqrt(math.prod(shape[1:])))
    return {k: v.float().contiguous() for k, v in out.items()}


PREPROCESSOR_CONFIG = {
    "chunk_length_s": None,
    "feature_extractor_type": "EncodecFeatureExtractor",
    "feature_size": 1,
    "overlap": None,
    "padding_side": "right",
    "padding_value": 0.0,
    "return_attention_mask": True,
    "sampling_rate": 24000,
}


def write_speech_tokenizer(dir: str | Path, config: dict, seed: int = 0) -> Path:
    """Write config.json, random model.safetensors and preprocessor_config.json of a speech tokenizer with
    `config` into `dir` (a `speech_tokenizer/` folder). Returns the folder."""

    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (d / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n")
    save_file(random_speech_tokenizer_weights(config, seed), str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def write_tiny_speech_tokenizer(dir: str | Path, seed: int = 0) -> Path:
    """The tiny speech tokenizer (tiny_speech_tokenizer_config) with random weights, written into `dir`."""
    return write_speech_tokenizer(dir, tiny_speech_tokenizer_config(), seed)
