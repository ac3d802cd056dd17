"""Build the megakernel library here (nvcc, no GPU needed) into a cache folder that travels to the GPU machine.

    python scripts/mk_prebuild.py --arch 90a --cache .mkcache "" "MK_DEV_TIMING=1" ...
Each argument is one QWEN_TTS_MK_DEFINES string ("" = the committed defaults); the libraries land where
build.load_library looks for them when QWEN_TTS_MK_CACHE points at the cache folder.
"""

import argparse
import os

from qwen_tts_megakernel.megakernel import build


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="90a")
    p.add_argument("--cache", default=".mkcache")
    p.add_argument("defines", nargs="*", default=[""])
    args = p.parse_args()
    os.environ["QWEN_TTS_MK_CACHE"] = os.path.abspath(args.cache)
    for defines in args.defines:
        os.environ["QWEN_TTS_MK_DEFINES"] = defines  # read by build.nvcc_flags (part of the cache key)
        out = build.library_path(args.arch)
        if not out.exists():
            build.compile_library(args.arch, out)
        print(f"{defines or '(defaults)'} -> {out}")


if __name__ == "__main__":
    main()
