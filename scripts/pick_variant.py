"""Print the QWEN_TTS_MK_DEFINES of the fastest validated kernel variant in a variants.jsonl (scripts/mk_variants.sh),
or "" (the defaults) unless one beats the variant named `base` by more than --margin in full-frame time.

    python scripts/pick_variant.py variants.jsonl [--margin 0.02]
"""

import argparse
import json


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("jsonl")
    p.add_argument("--margin", type=float, default=0.02, help="relative frame-time gain needed over base")
    args = p.parse_args()
    rows = [json.loads(line) for line in open(args.jsonl) if line.strip()]
    ok = [r for r in rows if r.get("validate_pass") and "mk" in r]
    base = next((r for r in ok if r["name"] == "base"), None)
    best = min(ok, key=lambda r: r["mk"]["frame_ms"], default=None)
    if base is None or best is None or best["mk"]["frame_ms"] > (1 - args.margin) * base["mk"]["frame_ms"]:
        print("")
    else:
        print(best["defines"])


if __name__ == "__main__":
    main()
