"""OpenAI's voice names as aliases of the loaded model's speakers, so that unmodified OpenAI clients work.

OpenAI clients (the openai SDK's examples, Pipecat's OpenAITTSService, ...) send one of OpenAI's voice names. The
server accepts them wherever it takes a voice and speaks with the speaker the alias points to. The default table
pairs each name with a CustomVoice speaker of a similar register (OpenAI's female-sounding voices with Vivian,
Serena or Sohee; the male-sounding ones with Ryan, Aiden or Uncle Fu; the dialect speakers Eric and Dylan are left
out, since they switch Chinese to a dialect). An alias whose default speaker the model lacks points to the model's
speakers in order instead. Base models have no built-in speakers: there the table holds only the overrides, and
each must name a voice stored when the server starts (`qwen-tts-mk voices add`), so that OpenAI-default clients
can be pointed at a cloned voice. VoiceDesign models have no voices at all: an override there is an error.

Override or extend the table with the server setting `voice_aliases` ("alloy=serena,echo=aiden"; from the
environment: QWEN_TTS_MK_VOICE_ALIASES); `GET /v1/audio/voices` lists the table in force.
"""

from __future__ import annotations

OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse",
                 "marin", "cedar")

DEFAULT_ALIASES = {
    "alloy": "vivian", "ash": "ryan", "ballad": "aiden", "coral": "serena", "echo": "ryan", "fable": "aiden",
    "nova": "vivian", "onyx": "uncle_fu", "sage": "serena", "shimmer": "sohee", "verse": "aiden",
    "marin": "serena", "cedar": "ryan",
}

def parse_aliases(spec: str) -> dict[str, str]:
    """"alloy=serena, echo=aiden" -> {"alloy": "serena", "echo": "aiden"}; a malformed entry is a ValueError."""
    out = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        alias, sep, speaker = item.partition("=")
        if not sep or not alias.strip() or not speaker.strip():
            raise ValueError(f"voice alias {item!r} is not NAME=SPEAKER")
        out[alias.strip().lower()] = speaker.strip().lower()
    return out


def voice_aliases(speakers: list[str], overrides: dict[str, str] | None = None,
                  stored: list[str] | None = None) -> dict[str, str]:
    """The alias table for a model with these speakers (or, for a Base model, these `stored` voices): the
    defaults, then `overrides`. Aliases that name a real speaker or voice are kept out (it wins); an override that
    names an unknown one is a ValueError, so a typo fails at start-up rather than on the first request."""
    speakers = sorted(s.lower() for s in speakers)
    if not speakers:
        return _stored_voice_aliases(overrides or {}, stored)
    table = {}
    fallback = iter(speakers * len(OPENAI_VOICES))
    for alias in OPENAI_VOICES:
        target = DEFAULT_ALIASES[alias]
        table[alias] = target if target in speakers else next(fallback)
    for alias, target in (overrides or {}).items():
        if target not in speakers:
            raise ValueError(f"voice alias {alias}={target}: this model has no speaker {target!r} "
                             f"(it has: {', '.join(speakers)})")
        table[alias] = target
    return {alias: target for alias, target in table.items() if alias not in speakers}


def _stored_voice_aliases(overrides: dict[str, str], stored: list[str] | None) -> dict[str, str]:
    if not overrides:
        return {}
    if stored is None:
        raise ValueError(f"voice aliases ({', '.join(f'{a}={t}' for a, t in overrides.items())}) given, but this "
                         "model has no voices to point them at (VoiceDesign: describe the voice with instructions)")
    stored = sorted(v.lower() for v in stored)
    for alias, target in overrides.items():
        if target not in stored:
            raise ValueError(f"voice alias {alias}={target}: there is no stored voice {target!r} (stored: "
                             f"{', '.join(stored) or 'none'}); add it with `qwen-tts-mk voices add` first")
    return {alias: target for alias, target in overrides.items() if alias not in stored}
