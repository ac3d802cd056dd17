"""Finding and reading a Qwen3-TTS checkpoint: a local folder or a Hugging Face model id, in the official layout.

    config.json  generation_config.json  model.safetensors  vocab.json  merges.txt  tokenizer_config.json
    speech_tokenizer/config.json  speech_tokenizer/model.safetensors

Hub downloads go through huggingface_hub (its cache, HF_HOME, HF_HUB_OFFLINE and tokens apply). Every tensor the
engine uses is checked against the shape the config implies; a mismatch names the tensor and both shapes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from . import DEFAULT_MODEL
from .config import ConfigError, ModelConfig
from .tokenizer import TextTokenizer

HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "speech_tokenizer/*"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class CheckpointError(RuntimeError):
    """The model could not be found, downloaded or read."""


def how_to_get_a_model() -> str:
    return (f"Point --model at a local folder in the official layout, or at a Hugging Face id such as "
            f"{DEFAULT_MODEL} (downloaded once into the Hugging Face cache; needs network unless cached). "
            "For a quick offline demo, `qwen-tts-mk tiny-model DIR` writes a tiny random model.")


def resolve_model_dir(model: str | Path) -> Path:
    """A local checkpoint folder for `model`: the folder itself, or the Hub snapshot (downloaded if needed)."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"model path {path} is a file, not a checkpoint folder. {how_to_get_a_model()}")
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} has no config.json: not a Qwen3-TTS checkpoint folder")
        return path
    if not _HUB_ID.match(str(model)):
        raise CheckpointError(f"model {str(model)!r} is neither an existing folder nor a Hugging Face id "
                              f"(org/name). {how_to_get_a_model()}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HfHubHTTPError

    try:
        return Path(snapshot_download(repo_id=str(model), allow_patterns=HUB_PATTERNS))
    except (HfHubHTTPError, OSError, ValueError) as exc:  # offline, not cached, no network, unknown repo
        raise CheckpointError(f"could not get model {model!r} from the Hugging Face Hub or its cache "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
                              f"{how_to_get_a_model()}") from exc


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"missing {path.name} in {path.parent}")
    try:
        return json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Official tensor name -> shape, for every tensor of the talker and code predictor."""
    t, cp = config.talker, config.code_predictor
    shapes: dict[str, tuple[int, ...]] = {}

    def stack(prefix: str, c) -> None:
        for i in range(c.num_hidden_layers):
            p = f"{prefix}.layers.{i}"
            shapes[f"{p}.input_layernorm.weight"] = (c.hidden_size,)
            shapes[f"{p}.self_attn.q_proj.weight"] = (c.q_dim, c.hidden_size)
            shapes[f"{p}.self_attn.k_proj.weight"] = (c.kv_dim, c.hidden_size)
            shapes[f"{p}.self_attn.v_proj.weight"] = (c.kv_dim, c.hidden_size)
            shapes[f"{p}.self_attn.o_proj.weight"] = (c.hidden_size, c.q_dim)
            shapes[f"{p}.self_attn.q_norm.weight"] = (c.head_dim,)
            shapes[f"{p}.self_attn.k_norm.weight"] = (c.head_dim,)
            shapes[f"{p}.post_attention_layernorm.weight"] = (c.hidden_size,)
            shapes[f"{p}.mlp.gate_proj.weight"] = (c.intermediate_size, c.hidden_size)
            shapes[f"{p}.mlp.up_proj.weight"] = (c.intermediate_size, c.hidden_size)
            shapes[f"{p}.mlp.down_proj.weight"] = (c.hidden_size, c.intermediate_size)
        shapes[f"{prefix}.norm.weight"] = (c.hidden_size,)

    stack("talker.model", t)
    shapes["talker.model.codec_embedding.weight"] = (t.vocab_size, t.hidden_size)
    shapes["talker.model.text_embedding.weight"] = (t.text_vocab_size, t.text_hidden_size)
    shapes["talker.text_projection.linear_fc1.weight"] = (t.text_hidden_size, t.text_hidden_size)
    shapes["talker.text_projection.linear_fc1.bias"] = (t.text_hidden_size,)
    shapes["talker.text_projection.linear_fc2.weight"] = (t.hidden_size, t.text_hidden_size)
    shapes["talker.text_projection.linear_fc2.bias"] = (t.hidden_size,)
    shapes["talker.codec_head.weight"] = (t.vocab_size, t.hidden_size)
    stack("talker.code_predictor.model", cp)
    for j in range(cp.num_code_groups - 1):
        shapes[f"talker.code_predictor.model.codec_embedding.{j}.weight"] = (cp.vocab_size, t.hidden_size)
        shapes[f"talker.code_predictor.lm_head.{j}.weight"] = (cp.vocab_size, cp.hidden_size)
    if config.has_mtp_projection:
        shapes["talker.code_predictor.small_to_mtp_projection.weight"] = (cp.hidden_size, t.hidden_size)
        shapes["talker.code_predictor.small_to_mtp_projection.bias"] = (cp.hidden_size,)
    return shapes


def check_shapes(weights: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], where: str) -> None:
    """Raise CheckpointError naming the first missing tensor or the first tensor whose shape is wrong."""
    missing = [name for name in expected if name not in weights]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: tensor {missing[0]} is missing{more}")
    for name, shape in expected.items():
        got = tuple(weights[name].shape)
        if got != shape:
            raise CheckpointError(f"{where}: tensor {name} has shape {list(got)}, the config implies {list(shape)}")


@dataclass
class Checkpoint:
    """A loaded checkpoint: typed config, talker tensors, codec decoder tensors and the text tokenizer."""

    path: Path | None  # None for in-memory (random) checkpoints
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    codec_weights: dict[str, torch.Tensor]
    tokenizer: TextTokenizer


def load_checkpoint(model: str | Path) -> Checkpoint:
    path = resolve_model_dir(model)
    config_json = _read_json(path / "config.json")
    codec_json = _read_json(path / "speech_tokenizer" / "config.json")
    gen_path = path / "generation_config.json"
    gen_json = _read_json(gen_path) if gen_path.is_file() else {}
    try:
        config = ModelConfig.from_dicts(config_json, codec_json, gen_json)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    weights = _load_safetensors(path, "model.safetensors")
    check_shapes(weights, expected_shapes(config), f"{path / 'model.safetensors'}")
    codec_weights = _load_safetensors(path / "speech_tokenizer", "model.safetensors")
    tokenizer = TextTokenizer.from_dir(path)
    return Checkpoint(path=path, config=config, weights=weights, codec_weights=codec_weights, tokenizer=tokenizer)


def _load_safetensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """One file, or the shards listed in `<name>.index.json`."""
    single = folder / name
    if single.is_file():
        return load_file(str(single))
    index = folder / (name.removesuffix(".safetensors") + ".safetensors.index.json")
    if index.is_file():
        shards = sorted(set(_read_json(index)["weight_map"].values()))
        weights: dict[str, torch.Tensor] = {}
        for shard in shards:
            weights.update(load_file(str(folder / shard)))
        return weights
    raise CheckpointError(f"missing {name} in {folder}")
