"""Official tensor names of the codec decoder (the `decoder.*` keys of speech_tokenizer/model.safetensors) and loading
them into a CodecDecoder.

Checkpoint quirks worth knowing (all handled here):
  * each codebook vector has codebook_dim // 2 entries (256 for the real model) and is stored as
    `embedding_sum` / `cluster_usage` (EMA statistics); the row is their ratio, usage clamped at 1e-5;
  * the first codebook has its own output projection (`rvq_first`), codebooks 1..15 share one
    (`rvq_rest`); both are bias-free Conv1d k=1 weights [out, in, 1]; the encoder-side `input_proj`
    weights are in the file too and unused by decoding; `num_semantic_quantizers` is not read (always 1);
  * SnakeBeta `alpha` and `beta` are stored in log space: loading stores exp(alpha) and 1 / (exp(beta) + 1e-9);
  * the attention head_dim (64) is not hidden_size / heads (512 / 16 = 32): q_proj is 512 -> 1024;
  * the window mask lets query t see keys t-71 .. t (72 frames including itself).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from ..config import CodecDecoderConfig


def official_parameter_names(cfg: CodecDecoderConfig) -> Iterator[tuple[str, str]]:
    """(official name without the 'decoder.' prefix, our parameter name) for every dense weight.

    The codebooks (`quantizer.rvq_*.vq.layers.*._codebook.{embedding_sum,cluster_usage}`) are not
    listed; they are combined at load time (see `load_official_state_dict`).
    """
    yield "quantizer.rvq_first.output_proj.weight", "quantizer.first_proj.weight"
    yield "quantizer.rvq_rest.output_proj.weight", "quantizer.rest_proj.weight"
    for p in ("weight", "bias"):
        yield f"pre_conv.conv.{p}", f"pre_conv.{p}"
    t = "pre_transformer"
    for p in ("weight", "bias"):
        yield f"{t}.input_proj.{p}", f"{t}.input_proj.{p}"
        yield f"{t}.output_proj.{p}", f"{t}.output_proj.{p}"
    yield f"{t}.norm.weight", f"{t}.norm.weight"
    for i in range(cfg.num_hidden_layers):
        o, m = f"{t}.layers.{i}", f"{t}.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield f"{o}.self_attn.{proj}.weight", f"{m}.attn.{proj}.weight"
            if cfg.attention_bias:
                yield f"{o}.self_attn.{proj}.bias", f"{m}.attn.{proj}.bias"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            yield f"{o}.mlp.{proj}.weight", f"{m}.mlp.{proj}.weight"
        yield f"{o}.input_layernorm.weight", f"{m}.attn_norm.weight"
        yield f"{o}.post_attention_layernorm.weight", f"{m}.mlp_norm.weight"
        yield f"{o}.self_attn_layer_scale.scale", f"{m}.attn_scale"
        yield f"{o}.mlp_layer_scale.scale", f"{m}.mlp_scale"
    for i in range(len(cfg.upsampling_ratios)):
        for p in ("weight", "bias"):
            yield f"upsample.{i}.0.conv.{p}", f"upsample.{i}.conv.{p}"
            yield f"upsample.{i}.1.dwconv.conv.{p}", f"upsample.{i}.convnext.dwconv.{p}"
            yield f"upsample.{i}.1.norm.{p}", f"upsample.{i}.convnext.norm.{p}"
            yield f"upsample.{i}.1.pwconv1.{p}", f"upsample.{i}.convnext.pwconv1.{p}"
            yield f"upsample.{i}.1.pwconv2.{p}", f"upsample.{i}.convnext.pwconv2.{p}"
        yield f"upsample.{i}.1.gamma", f"upsample.{i}.convnext.gamma"
    # The official `decoder` list: [conv, block_0 .. block_{n-1}, SnakeBeta, conv].
    for p in ("weight", "bias"):
        yield f"decoder.0.conv.{p}", f"head_conv.{p}"
    n = len(cfg.upsample_rates)
    for b in range(n):
        o, m = f"decoder.{b + 1}.block", f"blocks.{b}"
        yield f"{o}.0.alpha", f"{m}.act.alpha"
        yield f"{o}.0.beta", f"{m}.act.inv_beta"
        for p in ("weight", "bias"):
            yield f"{o}.1.conv.{p}", f"{m}.upsample.{p}"
        for j in range(3):
            ou, mu = f"{o}.{j + 2}", f"{m}.res_units.{j}"
            for act in ("act1", "act2"):
                yield f"{ou}.{act}.alpha", f"{mu}.{act}.alpha"
                yield f"{ou}.{act}.beta", f"{mu}.{act}.inv_beta"
            for conv in ("conv1", "conv2"):
                for p in ("weight", "bias"):
                    yield f"{ou}.{conv}.conv.{p}", f"{mu}.{conv}.{p}"
    yield f"decoder.{n + 1}.alpha", "final_act.alpha"
    yield f"decoder.{n + 1}.beta", "final_act.inv_beta"
    for p in ("weight", "bias"):
        yield f"decoder.{n + 2}.conv.{p}", f"final_conv.{p}"


def official_shapes(decoder: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every `decoder.*` tensor of the official checkpoint with its shape, for a CodecDecoder (our view of it)."""
    params = dict(decoder.named_parameters())
    shapes = {}
    for official, ours in official_parameter_names(decoder.cfg):
        shape = tuple(params[ours].shape)
        if official.endswith("output_proj.weight") and official.startswith("quantizer."):
            shape = shape + (1,)  # stored as a Conv1d k=1 weight
        shapes["decoder." + official] = shape
    cfg = decoder.cfg
    K, vq_dim = cfg.codebook_size, cfg.codebook_dim // 2
    for group, count in (("rvq_first", 1), ("rvq_rest", cfg.num_quantizers - 1)):
        # input_proj is the encoder-side projection; present in the checkpoint, unused by decode.
        shapes[f"decoder.quantizer.{group}.input_proj.weight"] = (vq_dim, cfg.codebook_dim, 1)
        for q in range(count):
            cb = f"decoder.quantizer.{group}.vq.layers.{q}._codebook"
            shapes[f"{cb}.cluster_usage"] = (K,)
            shapes[f"{cb}.embedding_sum"] = (K, vq_dim)
    return shapes


@torch.no_grad()
def load_official_state_dict(decoder: nn.Module, sd: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load official `decoder.*` tensors (other keys, e.g. `encoder.*`, are ignored).

    Raises ValueError on a missing tensor, on a wrong shape (naming the tensor and both shapes),
    and, when `strict`, on an unexpected `decoder.*` tensor.
    """
    expected = official_shapes(decoder)
    given = {k: v for k, v in sd.items() if k.startswith("decoder.")}
    missing = sorted(set(expected) - set(given))
    if missing:
        raise ValueError(f"speech tokenizer weights: {len(missing)} decoder tensors missing, e.g. {missing[:5]}")
    unexpected = sorted(set(given) - set(expected))
    if strict and unexpected:
        raise ValueError(f"speech tokenizer weights: unexpected decoder tensors {unexpected[:5]}")
    for name, shape in expected.items():
        if tuple(given[name].shape) != shape:
            raise ValueError(
                f"speech tokenizer weight {name}: expected shape {shape}, got {tuple(given[name].shape)}"
            )

    params = dict(decoder.named_parameters())
    for official, ours in official_parameter_names(decoder.cfg):
        p, value = params[ours], given["decoder." + official].reshape(params[ours].shape)
        if ours.endswith(".alpha"):  # SnakeBeta: the official forward's exp(alpha), once
            value = value.float().exp()
        elif ours.endswith(".inv_beta"):  # and its 1 / (exp(beta) + 1e-9)
            value = 1.0 / (value.float().exp() + 1e-9)
        p.copy_(value.to(p.dtype))

    # Codebook rows = embedding_sum / clamp(cluster_usage, 1e-5), in fp32, then cast.
    rows = []
    for q in range(decoder.cfg.num_quantizers):
        group, idx = ("rvq_first", 0) if q == 0 else ("rvq_rest", q - 1)
        cb = f"decoder.quantizer.{group}.vq.layers.{idx}._codebook"
        usage = given[f"{cb}.cluster_usage"].float().clamp(min=1e-5)
        rows.append(given[f"{cb}.embedding_sum"].float() / usage[:, None])
    codebooks = decoder.quantizer.codebooks
    codebooks.copy_(torch.stack(rows).to(device=codebooks.device, dtype=codebooks.dtype))

