"""Build the megakernel shared library with nvcc at first use, cached by source hash and GPU architecture.

The library is plain CUDA C++ with a C ABI (csrc/megakernel.cu), loaded with ctypes; no torch extension build.
Cache: $QWEN_TTS_MK_CACHE or ~/.cache/qwen_tts_megakernel/<source-hash>-<arch>/libqwen_tts_mk.so
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = tuple(sorted(p.name for p in CSRC.iterdir() if p.suffix in (".cu", ".cuh")))
LIB_NAME = "libqwen_tts_mk.so"

# Shared-memory tile size per architecture (KB): the ring holds 3 tiles + 56 KB of scratch per block.
TILE_KB = {"90a": 32, "100a": 32, "80": 24, "120a": 12, "86": 12, "89": 12}

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL] = {}


class BuildError(RuntimeError):
    """nvcc is missing or failed."""


def find_nvcc() -> str:
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"),
                 os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.exists(cand):
            return cand
    raise BuildError("nvcc not found: install the CUDA toolkit or set NVCC / CUDA_HOME")


def arch_for_capability(major: int, minor: int) -> str:
    """sm target for a compute capability: the 'a' variants on Hopper/Blackwell for their own instructions."""
    cc = f"{major}{minor}"
    return cc + "a" if major in (9, 10, 12) else cc


def variant_defines() -> list[str]:
    """Extra -D switches from $QWEN_TTS_MK_DEFINES (e.g. "MK_DEV_TIMING=1", dev/mk_breakdown.py): builds of kernel
    variants; part of the cache key. Unset = the committed defaults in mk_common.cuh."""
    return [f"-D{d}" for d in os.environ.get("QWEN_TTS_MK_DEFINES", "").split()]


def nvcc_flags(arch: str) -> list[str]:
    extra = variant_defines()
    tile = [] if any(d.startswith("-DMK_TILE_KB=") for d in extra) else [f"-DMK_TILE_KB={TILE_KB.get(arch, 12)}"]
    return ["-std=c++17", "-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}", *tile, *extra,
            "-Xcompiler", "-fPIC", "-shared", "-lineinfo"]


def source_hash(arch: str) -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    h.update(" ".join(nvcc_flags(arch)).encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    root = os.environ.get("QWEN_TTS_MK_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "qwen_tts_megakernel"


def compile_library(arch: str, out: Path, extra_flags: list[str] | None = None, verbose: bool = False) -> Path:
    """nvcc csrc/megakernel.cu -> out (atomically replaced). Returns out."""
    nvcc = find_nvcc()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [nvcc, *nvcc_flags(arch), *(extra_flags or []), "-o", tmp, str(CSRC / "megakernel.cu")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise BuildError(f"nvcc failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    if verbose:
        print(proc.stderr)
    os.replace(tmp, out)
    return out


def library_path(arch: str) -> Path:
    return cache_dir() / f"{source_hash(arch)}-{arch}" / LIB_NAME


def load_library(arch: str | None = None) -> ctypes.CDLL:
    """The compiled library for `arch` (default: the current CUDA device), building it when not cached."""
    if arch is None:
        import torch

        arch = arch_for_capability(*torch.cuda.get_device_capability())
    with _lock:
        if arch in _loaded:
            return _loaded[arch]
        path = library_path(arch)
        if not path.exists():
            compile_library(arch, path)
        lib = ctypes.CDLL(str(path))
        _declare(lib)
        _loaded[arch] = lib
        return lib


def _declare(lib: ctypes.CDLL) -> None:
    c = ctypes
    lib.mk_layout.argtypes = [c.c_int, c.POINTER(c.c_longlong)]
    lib.mk_occupancy.argtypes = [c.c_int, c.POINTER(c.c_int), c.POINTER(c.c_int)]
    lib.mk_launch.argtypes = [c.c_int, c.c_void_p, c.c_void_p, c.c_int, c.c_int, c.c_void_p]
    lib.mk_host_alloc.argtypes = [c.c_longlong, c.POINTER(c.c_void_p), c.POINTER(c.c_void_p)]
    lib.mk_host_free.argtypes = [c.c_void_p]
    lib.mk_stream_query.argtypes = [c.c_void_p]
    lib.mk_error_string.argtypes = [c.c_int]
    lib.mk_error_string.restype = c.c_char_p
    lib.mk_test_sample.argtypes = [c.c_void_p, c.c_int, c.c_int, c.c_int, c.c_float, c.c_int, c.c_double,
                                   c.c_void_p, c.c_int, c.c_void_p, c.c_void_p]
    lib.mk_test_philox.argtypes = [c.c_uint64, c.c_int, c.c_void_p, c.c_void_p]
    for fn in ("mk_layout", "mk_occupancy", "mk_launch", "mk_host_alloc", "mk_host_free", "mk_stream_query",
               "mk_test_sample", "mk_test_philox"):
        getattr(lib, fn).restype = c.c_int


def main(argv: list[str] | None = None) -> int:
    """python -m qwen_tts_megakernel.megakernel.build [ARCH ...]: compile (e.g. 90a 80 120a) into the cache."""
    import sys

    archs = (argv if argv is not None else sys.argv[1:]) or ["90a"]
    for arch in archs:
        path = library_path(arch)
        if not path.exists():
            compile_library(arch, path)
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
