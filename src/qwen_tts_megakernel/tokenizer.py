"""The talker's text tokenizer: Qwen2's byte-level BPE, read from a checkpoint's own tokenizer files.

Official checkpoints ship vocab.json + merges.txt + tokenizer_config.json (the special tokens live in its
added_tokens_decoder); some also ship tokenizer.json. Either way we build a `tokenizers.Tokenizer` with Qwen2's
pre-tokenizer (NFC, the Qwen2 split regex, byte-level), so that ids equal those of transformers' Qwen2TokenizerFast.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import AddedToken

# Qwen2's pre-tokenization pattern (contractions, letters, single digits, punctuation runs, newlines, spaces).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>")


class TokenizerError(ValueError):
    """The tokenizer files are missing or inconsistent."""


def _qwen2_pipeline(tokenizer: Tokenizer) -> Tokenizer:
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


class TextTokenizer:
    """Text -> ids exactly as the official processor produces them (no BOS/EOS added).

    Two ways to encode: `encode` matches the added tokens (<|im_start|>, <tts_pad>, ...) in its input, for the
    prompt template; `encode_user` never does, for the user's text, which therefore cannot inject control tokens:
    "<|im_end|>" in user text is the plain characters "<", "|", "im", ... (for text without added-token strings
    the two give the same ids)."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        plain = json.loads(tokenizer.to_str())
        plain["added_tokens"] = []
        self._plain = Tokenizer.from_str(json.dumps(plain))

    @classmethod
    def from_dir(cls, path: str | Path) -> "TextTokenizer":
        path = Path(path)
        if (path / "tokenizer.json").is_file():
            return cls(Tokenizer.from_file(str(path / "tokenizer.json")))
        vocab_file, merges_file = path / "vocab.json", path / "merges.txt"
        for f in (vocab_file, merges_file):
            if not f.is_file():
                raise TokenizerError(f"tokenizer file {f.name} not found in {path} (need tokenizer.json, or "
                                     "vocab.json + merges.txt)")
        bpe = models.BPE.from_file(str(vocab_file), str(merges_file), unk_token=None, fuse_unk=False,
                                   byte_fallback=False)
        tokenizer = _qwen2_pipeline(Tokenizer(bpe))
        config_file = path / "tokenizer_config.json"
        added = json.loads(config_file.read_text("utf-8")).get("added_tokens_decoder", {}) if config_file.is_file() else {}
        # Added tokens must keep the ids the file gives them: add in id order, then verify.
        for token_id, spec in sorted(added.items(), key=lambda kv: int(kv[0])):
            token = AddedToken(spec["content"], special=bool(spec.get("special", True)),
                               normalized=bool(spec.get("normalized", False)), lstrip=bool(spec.get("lstrip", False)),
                               rstrip=bool(spec.get("rstrip", False)), single_word=bool(spec.get("single_word", False)))
            if spec.get("special", True):
                tokenizer.add_special_tokens([token])
            else:
                tokenizer.add_tokens([token])
            got = tokenizer.token_to_id(spec["content"])
            if got != int(token_id):
                raise TokenizerError(f"tokenizer_config.json: added token {spec['content']!r} should have id "
                                     f"{token_id} but the vocabulary places it at {got}")
        return cls(tokenizer)

    def encode(self, text: str) -> list[int]:
        """Template text: added tokens in `text` become their ids."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_user(self, text: str) -> list[int]:
        """User text: added-token strings in `text` are ordinary characters (escaped, never control tokens)."""
        return self._plain.encode(text, add_special_tokens=False).ids

    @property
    def added_tokens(self) -> list[str]:
        """The added (special) token strings of the vocabulary."""
        return sorted(self._tok.get_added_tokens_decoder()[i].content for i in self._tok.get_added_tokens_decoder())

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)


# ---------------------------------------------------------------------------------------------------------------
# A tiny tokenizer for test checkpoints

_TINY_CORPUS = [
    "<|im_start|>assistant\nHello world, this is a test of the speech model.<|im_end|>\n",
    "<|im_start|>user\nSpeak warmly and slowly, like a storyteller.<|im_end|>\n",
    "The quick brown fox jumps over the lazy dog. Numbers 0 1 2 3 4 5 6 7 8 9!",
    "assistant user assistant user speech voice audio stream frame text token",
    "Streaming text to speech turns words into sound, one frame at a time.",
    "Bonjour, ça va? Guten Tag. ¿Qué tal? Ciao. Olá. 你好，世界。こんにちは。안녕하세요.",
]


def build_tiny_tokenizer(vocab_size: int = 400) -> tuple[Tokenizer, dict[str, int]]:
    """A small Qwen2-style byte-level BPE trained on a fixed corpus; returns it and the special-token ids.

    Special tokens follow the BPE vocabulary contiguously, as in the real Qwen vocabulary."""
    tokenizer = _qwen2_pipeline(Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False)))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    corpus = [line.replace("<|im_start|>", "").replace("<|im_end|>", "") for line in _TINY_CORPUS] * 8
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    return tokenizer, ids


def write_tokenizer_files(tokenizer: Tokenizer, special_ids: dict[str, int], out_dir: Path) -> None:
    """Write vocab.json, merges.txt and tokenizer_config.json in the layout of the official repositories."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model = json.loads(tokenizer.to_str())["model"]
    (out_dir / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), "utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                     "special": True}
            for t, i in sorted(special_ids.items(), key=lambda kv: kv[1])
        },
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), "utf-8")
