"""Language names as clients write them -> the model's language names.

The model knows languages by name ("english", "chinese", ...; `ModelConfig.languages`). Clients send ISO 639-1
codes ("en"), BCP 47 tags ("en-US", "zh-Hans-CN", "pt_BR"), ISO 639-2/3 codes ("eng", "zho", "cmn") or the name in
any case ("English", "Mandarin"). `model_language` maps all of them; it is the one mapping that every entry point
uses (the prompt builder under the Python API, the CLI and the server, the server's validation and the Pipecat
services' `Language` values).
"""

from __future__ import annotations

# ISO 639-1 / 639-2 / 639-3 codes and other common names of the official Qwen3-TTS languages.
ALIASES = {
    "zh": "chinese", "zho": "chinese", "chi": "chinese", "cmn": "chinese", "mandarin": "chinese",
    "en": "english", "eng": "english",
    "ja": "japanese", "jpn": "japanese",
    "ko": "korean", "kor": "korean",
    "de": "german", "deu": "german", "ger": "german", "deutsch": "german",
    "fr": "french", "fra": "french", "fre": "french", "français": "french",
    "ru": "russian", "rus": "russian",
    "pt": "portuguese", "por": "portuguese", "português": "portuguese",
    "es": "spanish", "spa": "spanish", "español": "spanish", "castellano": "spanish",
    "it": "italian", "ita": "italian", "italiano": "italian",
}


def model_language(value: str | None, languages: list[str]) -> str | None:
    """The model language that `value` names ("en-US" -> "english"), "auto" for None or "", or None when the
    model has no such language."""
    if value is None or not value.strip():
        return "auto"
    name = value.strip().lower()
    if name in languages:
        return name
    for candidate in (name, name.replace("_", "-").split("-")[0]):
        mapped = ALIASES.get(candidate)
        if mapped in languages:
            return mapped
    return None


def unknown_language_message(value, languages: list[str]) -> str:
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
    return (f"unknown language {shown}; this model has: {', '.join(languages)} (ISO 639-1 codes such as 'en' and "
            "tags such as 'en-US' are accepted too)")
