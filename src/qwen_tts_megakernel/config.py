"""Typed configuration of a Qwen3-TTS (12 Hz) checkpoint, parsed from its config.json.

The official configuration classes carry placeholder defaults (codec EOS 4198, 20 layers, rope_theta 1e4, ...);
only the checkpoint's own values are real, so every field that matters for the math is read from the file and a
missing one is an error rather than a silent placeholder. The codec decoder's config (speech_tokenizer/config.json)
is `CodecDecoderConfig`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from .sampling import SamplingParams
from .codec_encoder import CodecEncoderConfig
from .speaker_encoder import SpeakerEncoderConfig

MODEL_TYPES = ("custom_voice", "voice_design", "base")
MODEL_SIZES = ("0b6", "1b7")


class ConfigError(ValueError):
    """A checkpoint's config.json is missing a field or holds an inconsistent value."""


def _require(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise ConfigError(f"{where}: missing required field '{key}'")
    return d[key]


@dataclass(frozen=True)
class TransformerConfig:
    """Shapes of one Qwen3 decoder stack (the talker trunk or the code predictor trunk)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int  # rows of the output head(s): 3072 for the talker, 2048 for the code predictor

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> "TransformerConfig":
        hidden = int(_require(d, "hidden_size", where))
        heads = int(_require(d, "num_attention_heads", where))
        cfg = cls(
            hidden_size=hidden,
            num_hidden_layers=int(_require(d, "num_hidden_layers", where)),
            num_attention_heads=heads,
            num_key_value_heads=int(_require(d, "num_key_value_heads", where)),
            # The official attention uses getattr(config, "head_dim", hidden // heads).
            head_dim=int(d.get("head_dim", hidden // heads)),
            intermediate_size=int(_require(d, "intermediate_size", where)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(_require(d, "rope_theta", where)),
            vocab_size=int(_require(d, "vocab_size", where)),
        )
        if heads % cfg.num_key_value_heads:
            raise ConfigError(
                f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads "
                f"{cfg.num_key_value_heads}"
            )
        if cfg.head_dim % 2:
            raise ConfigError(f"{where}: head_dim {cfg.head_dim} must be even for RoPE")
        if d.get("use_sliding_window"):
            raise ConfigError(f"{where}: sliding-window attention is not used by Qwen3-TTS talkers")
        return cfg


@dataclass(frozen=True)
class TalkerConfig(TransformerConfig):
    """The 28-layer talker: trunk shapes plus its text path and codec vocabulary."""

    text_vocab_size: int = 151936
    text_hidden_size: int = 2048
    num_code_groups: int = 16

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "talker_config") -> "TalkerConfig":
        base = TransformerConfig.from_dict(d, where)
        return cls(
            **base.__dict__,
            text_vocab_size=int(_require(d, "text_vocab_size", where)),
            text_hidden_size=int(_require(d, "text_hidden_size", where)),
            num_code_groups=int(_require(d, "num_code_groups", where)),
        )


@dataclass(frozen=True)
class CodePredictorConfig(TransformerConfig):
    """The 5-layer code predictor that fills codebooks 1..15 of each frame."""

    num_code_groups: int = 16

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "talker_config.code_predictor_config") -> "CodePredictorConfig":
        base = TransformerConfig.from_dict(d, where)
        return cls(**base.__dict__, num_code_groups=int(_require(d, "num_code_groups", where)))


@dataclass(frozen=True)
class SpecialIds:
    """Text-side and codec-side control ids (qwen3-tts-model.md section 1.3)."""

    im_start: int = 151644
    im_end: int = 151645
    tts_pad: int = 151671
    tts_bos: int = 151672
    tts_eos: int = 151673
    codec_pad: int = 2148
    codec_bos: int = 2149
    codec_eos: int = 2150
    codec_think: int = 2154
    codec_nothink: int = 2155
    codec_think_bos: int = 2156
    codec_think_eos: int = 2157


@dataclass(frozen=True)
class GenerationDefaults:
    """generation_config.json: sampling defaults and the frame limit, with the official wrapper's fallbacks (the
    SamplingParams defaults, and 2048 frames) for missing keys."""

    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = 2048

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GenerationDefaults":
        names = {f.name for f in fields(SamplingParams)}
        try:
            sampling = SamplingParams(**{k: d[k] for k in names if k in d})
        except ValueError as exc:
            raise ConfigError(f"generation_config.json: {exc}") from exc
        return cls(sampling=sampling, max_new_tokens=int(d.get("max_new_tokens", 2048)))


CODEC_ACTIVATIONS = ("silu", "swish", "gelu")  # hidden_act values the codec decoder implements


@dataclass
class CodecDecoderConfig:
    """Decoder half of speech_tokenizer/config.json (`decoder_config`, plus two top-level rates).

    Defaults are those of the official `Qwen3TTSTokenizerV2DecoderConfig` / `Qwen3TTSTokenizerV2Config`
    classes, which are NOT the released checkpoint's values (that has hidden_size 512, intermediate 1024,
    codebook_dim 512, head_dim 64). `codebook_dim` has no default in the official class either (the
    official decoder fails without it), so it is required here.
    """

    codebook_dim: int  # width of the dequantized features; each codebook vector is codebook_dim // 2
    codebook_size: int = 2048
    hidden_size: int = 1024
    latent_dim: int = 1024
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads (the official fallback)
    intermediate_size: int = 3072
    num_hidden_layers: int = 8
    num_quantizers: int = 16
    sliding_window: int = 72
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    layer_scale_initial_scale: float = 0.01
    attention_bias: bool = False
    hidden_act: str = "silu"
    max_position_embeddings: int = 8000  # informational: default RoPE has no length limit
    upsample_rates: tuple[int, ...] = (8, 5, 4, 3)
    upsampling_ratios: tuple[int, ...] = (2, 2)
    decoder_dim: int = 1536
    sample_rate: int = 24000  # top-level output_sample_rate
    samples_per_frame: int = 1920  # top-level decode_upsample_rate

    def __post_init__(self) -> None:
        self.upsample_rates = tuple(int(r) for r in self.upsample_rates)
        self.upsampling_ratios = tuple(int(r) for r in self.upsampling_ratios)
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        total = math.prod(self.upsample_rates) * math.prod(self.upsampling_ratios)
        if total != self.samples_per_frame:
            raise ValueError(
                f"decode_upsample_rate (samples_per_frame) is {self.samples_per_frame}, but the decoder "
                f"upsamples by prod(upsample_rates {list(self.upsample_rates)}) * prod(upsampling_ratios "
                f"{list(self.upsampling_ratios)}) = {total}"
            )
        if self.hidden_act not in CODEC_ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported ({sorted(CODEC_ACTIVATIONS)})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.num_quantizers < 2:
            raise ValueError(f"num_quantizers must be >= 2 (1 semantic + acoustic), got {self.num_quantizers}")
        if self.codebook_dim % 2:
            raise ValueError(f"codebook_dim must be even (codebook vectors are codebook_dim // 2), got {self.codebook_dim}")
        if self.decoder_dim % 2 ** len(self.upsample_rates):
            raise ValueError(f"decoder_dim {self.decoder_dim} is not divisible by 2**{len(self.upsample_rates)}")

    @property
    def frame_rate(self) -> float:
        """Frames per second (12.5 for the released model)."""
        return self.sample_rate / self.samples_per_frame

    @classmethod
    def from_json_dict(cls, d: dict) -> "CodecDecoderConfig":
        """Parse the full official speech_tokenizer/config.json dict (top level + `decoder_config`)."""
        dec = dict(d.get("decoder_config") or {})
        if "codebook_dim" not in dec:
            raise ValueError("speech tokenizer config: decoder_config.codebook_dim is missing (it has no default)")
        rope_scaling = dec.get("rope_scaling")
        if isinstance(rope_scaling, dict) and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default"):
            raise ValueError(f"speech tokenizer config: rope_scaling {rope_scaling} is not supported (only default RoPE)")
        names = {f for f in cls.__dataclass_fields__ if f not in ("sample_rate", "samples_per_frame")}
        kwargs = {k: v for k, v in dec.items() if k in names}
        kwargs["sample_rate"] = int(d.get("output_sample_rate", 24000))
        kwargs["samples_per_frame"] = int(d.get("decode_upsample_rate", 1920))
        return cls(**kwargs)


@dataclass(frozen=True)
class ModelConfig:
    """Everything the engine needs to know about one checkpoint."""

    model_type: str  # custom_voice | voice_design | base
    model_size: str  # 0b6 | 1b7
    talker: TalkerConfig
    code_predictor: CodePredictorConfig
    codec: CodecDecoderConfig
    ids: SpecialIds
    speakers: dict[str, int] = field(default_factory=dict)  # name (lower case) -> codec row id
    speaker_dialects: dict[str, str] = field(default_factory=dict)  # speaker -> dialect language name
    language_ids: dict[str, int] = field(default_factory=dict)  # language (lower case) -> codec id
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    speaker_embedding_dim: int | None = None  # Base models: x-vector width (= talker hidden)
    speaker_encoder: SpeakerEncoderConfig | None = None  # Base models only
    codec_encoder: CodecEncoderConfig | None = None  # Base models only: encodes reference audio (voice cloning)

    @property
    def languages(self) -> list[str]:
        """Languages a user may ask for: "auto" plus every non-dialect language (the official rule)."""
        return ["auto"] + [name for name in self.language_ids if "dialect" not in name]

    @property
    def size_label(self) -> str:
        """The size as people write it: "0.6B", "1.7B" (config.json's "0b6", "1b7")."""
        return {"0b6": "0.6B", "1b7": "1.7B"}.get(self.model_size, self.model_size)

    @property
    def has_mtp_projection(self) -> bool:
        """1.7B: code-predictor inputs go through small_to_mtp_projection (talker width -> predictor width)."""
        return self.talker.hidden_size != self.code_predictor.hidden_size

    @property
    def supports_instruct(self) -> bool:
        """Voice design always; custom voice only for the 1.7B (the official wrapper drops it for 0b6)."""
        return self.model_type == "voice_design" or (self.model_type == "custom_voice" and self.model_size != "0b6")

    @classmethod
    def from_dicts(
        cls, config: dict[str, Any], codec_config: dict[str, Any], generation_config: dict[str, Any] | None = None
    ) -> "ModelConfig":
        model_type = config.get("tts_model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"config.json: tts_model_type must be one of {MODEL_TYPES}, got {model_type!r}")
        model_size = config.get("tts_model_size")
        if model_size not in MODEL_SIZES:
            raise ConfigError(f"config.json: tts_model_size must be one of {MODEL_SIZES}, got {model_size!r}")
        tokenizer_type = config.get("tokenizer_type")
        if tokenizer_type != "qwen3_tts_tokenizer_12hz":
            raise ConfigError(
                f"config.json: tokenizer_type {tokenizer_type!r} is not supported (only the 12 Hz models are)"
            )
        tc = _require(config, "talker_config", "config.json")
        talker = TalkerConfig.from_dict(tc)
        cp = CodePredictorConfig.from_dict(_require(tc, "code_predictor_config", "talker_config"))
        if cp.num_code_groups != talker.num_code_groups:
            raise ConfigError(
                f"num_code_groups differ: talker {talker.num_code_groups}, code predictor {cp.num_code_groups}"
            )
        ids = SpecialIds(
            im_start=int(config.get("im_start_token_id", 151644)),
            im_end=int(config.get("im_end_token_id", 151645)),
            tts_pad=int(config.get("tts_pad_token_id", 151671)),
            tts_bos=int(config.get("tts_bos_token_id", 151672)),
            tts_eos=int(config.get("tts_eos_token_id", 151673)),
            codec_pad=int(_require(tc, "codec_pad_id", "talker_config")),
            codec_bos=int(_require(tc, "codec_bos_id", "talker_config")),
            codec_eos=int(_require(tc, "codec_eos_token_id", "talker_config")),
            codec_think=int(_require(tc, "codec_think_id", "talker_config")),
            codec_nothink=int(_require(tc, "codec_nothink_id", "talker_config")),
            codec_think_bos=int(_require(tc, "codec_think_bos_id", "talker_config")),
            codec_think_eos=int(_require(tc, "codec_think_eos_id", "talker_config")),
        )
        for name in ("codec_pad", "codec_bos", "codec_eos", "codec_think", "codec_nothink"):
            if not 0 <= getattr(ids, name) < talker.vocab_size:
                raise ConfigError(f"talker_config: {name} id {getattr(ids, name)} outside the codec vocabulary")
        speakers = {str(k).lower(): int(v) for k, v in (tc.get("spk_id") or {}).items()}
        dialects = {str(k).lower(): v for k, v in (tc.get("spk_is_dialect") or {}).items() if v}
        languages = {str(k).lower(): int(v) for k, v in (tc.get("codec_language_id") or {}).items()}
        for spk, dialect in dialects.items():
            if dialect not in languages:
                raise ConfigError(f"talker_config: speaker {spk!r} has dialect {dialect!r} with no codec_language_id")
        spk_dim, speaker_encoder, codec_encoder = None, None, None
        if model_type == "base":
            try:
                speaker_encoder = SpeakerEncoderConfig.from_dict(config.get("speaker_encoder_config") or {})
                codec_encoder = CodecEncoderConfig.from_json_dict(codec_config)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"config.json: {exc}") from exc
            spk_dim = speaker_encoder.enc_dim
            if spk_dim != talker.hidden_size:
                raise ConfigError(f"speaker_encoder_config: enc_dim {spk_dim} differs from the talker hidden size "
                                  f"{talker.hidden_size}")
        return cls(
            model_type=model_type,
            model_size=model_size,
            talker=talker,
            code_predictor=cp,
            codec=CodecDecoderConfig.from_json_dict(codec_config),
            ids=ids,
            speakers=speakers,
            speaker_dialects=dialects,
            language_ids=languages,
            generation=GenerationDefaults.from_dict(generation_config or {}),
            speaker_embedding_dim=spk_dim,
            speaker_encoder=speaker_encoder,
            codec_encoder=codec_encoder,
        )
