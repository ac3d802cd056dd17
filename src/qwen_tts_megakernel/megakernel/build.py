"""Find or build the megakernel shared library: prebuilt in the package, else nvcc at first use, cached.

The library is plain CUDA C++ with a C ABI (every .cu in csrc/, including its .cuh headers), loaded with ctypes;
no torch extension build. load_library() takes the first of:
  1. prebuilt/<key>-<arch>/libqwen_tts_mk.so inside this package (a wheel built with QWEN_TTS_MK_PREBUILD: setup.py),
  2. the cache, $QWEN_TTS_MK_CACHE or ~/.cache/qwen_tts_megakernel/<key>-<arch>/libqwen_tts_mk.so,
  3. nvcc, compiling into the cache (the developer path: about a minute, once per source change),
  4. the prebuilt PTX library, which the driver compiles for a GPU that has no library of its own.
<key> hashes the sources and the nvcc flags, so an edited kernel or a variant ($QWEN_TTS_MK_DEFINES, or a header
force-included with $QWEN_TTS_MK_INCLUDE, e.g. dev/mk_trace.cuh) never loads a library built from other code.
The libraries link the CUDA runtime statically: they need the driver, no toolkit.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CSRC = Path(__file__).resolve().parent.parent / "csrc"
PREBUILT = Path(__file__).resolve().parent / "prebuilt"
LIB_NAME = "libqwen_tts_mk.so"

# What a wheel ships: one library per architecture (the shared-memory tile size is a per-architecture define, so one
# fat binary cannot hold them all), plus PTX for GPUs newer than these.
PREBUILT_TARGETS = ("80", "86", "89", "90a", "100a", "120a", "ptx")
PTX_ARCH = "80"  # the PTX target: compute_80 code runs (JIT-compiled by the driver) on every later GPU

# Shared-memory tile size per architecture (KB): the ring holds MK_RING (3) tiles + 32 KB of scratch per block.
# 12 fits every GPU since sm_80 (about 100 KB of shared memory per block), so it is the PTX and unknown-arch value.
TILE_KB = {"90a": 32, "100a": 32, "80": 24, "120a": 12, "86": 12, "89": 12}
# Shared scratch for staged activation rows (KB): what is left of the 227 KB per block on sm_90a / sm_100a, else 32.
STAGE_KB = {"90a": 104, "100a": 104}

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL] = {}


class BuildError(RuntimeError):
    """No library can be found or built (one line naming what is missing), or nvcc failed."""


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


def sources() -> list[Path]:
    """Every source file of the library (the key covers them all); the .cu files are its translation units."""
    return sorted(p for p in CSRC.iterdir() if p.suffix in (".cu", ".cuh", ".h"))


def variant_defines() -> list[str]:
    """Extra -D switches from $QWEN_TTS_MK_DEFINES (e.g. "MK_DEV_TIMING=1", dev/mk_breakdown.py): builds of kernel
    variants; part of the cache key. Unset = the committed defaults in mk_common.cuh."""
    return [f"-D{d}" for d in os.environ.get("QWEN_TTS_MK_DEFINES", "").split()]


def variant_include() -> list[Path]:
    """A header force-included into every unit from $QWEN_TTS_MK_INCLUDE (dev/mk_trace.cuh defines MK_SECTION to
    record a section trace); part of the cache key. Unset = none."""
    path = os.environ.get("QWEN_TTS_MK_INCLUDE")
    if not path:
        return []
    if not os.path.isfile(path):
        raise BuildError(f"QWEN_TTS_MK_INCLUDE={path}: no such file")
    return [Path(path).resolve()]


def nvcc_flags(arch: str) -> list[str]:
    """nvcc flags for an sm target ("90a") or "ptx" (compute_80 PTX only)."""
    extra = variant_defines()
    tile = [] if any(d.startswith("-DMK_TILE_KB=") for d in extra) else [f"-DMK_TILE_KB={TILE_KB.get(arch, 12)}"]
    if not any(d.startswith("-DMK_STAGE_KB=") for d in extra):
        tile.append(f"-DMK_STAGE_KB={STAGE_KB.get(arch, 32)}")
    code = f"compute_{PTX_ARCH}" if arch == "ptx" else f"sm_{arch}"
    virtual = PTX_ARCH if arch == "ptx" else arch
    return ["-std=c++17", "-O3", f"-gencode=arch=compute_{virtual},code={code}", *tile, *extra,
            "-Xcompiler", "-fPIC", "-shared", "-lineinfo"]


def source_hash(arch: str) -> str:
    h = hashlib.sha256()
    for path in sources() + variant_include():
        h.update(path.name.encode())
        h.update(path.read_bytes())
    h.update(" ".join(nvcc_flags(arch)).encode())  # the force-included header counts by name and content, not path
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    root = os.environ.get("QWEN_TTS_MK_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "qwen_tts_megakernel"


def library_path(arch: str, root: Path | None = None) -> Path:
    """Where the library for `arch` lives under `root` (default: the cache)."""
    return (root or cache_dir()) / f"{source_hash(arch)}-{arch}" / LIB_NAME


def compile_library(arch: str, out: Path, extra_flags: list[str] | None = None, verbose: bool = False) -> Path:
    """nvcc csrc/*.cu -> out (atomically replaced). Returns out."""
    nvcc = find_nvcc()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    units = [str(p) for p in sources() if p.suffix == ".cu"]
    include = [f"--pre-include={p}" for p in variant_include()]
    cmd = [nvcc, *nvcc_flags(arch), *include, *(extra_flags or []), "-o", tmp, *units]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise BuildError(f"nvcc failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    if verbose:
        print(proc.stderr)
    os.replace(tmp, out)
    return out


def find_library(arch: str) -> Path:
    """The library to load for `arch`, compiling it with nvcc when nothing prebuilt or cached fits."""
    for path in (library_path(arch, PREBUILT), library_path(arch)):
        if path.exists():
            return path
    try:
        nvcc = find_nvcc()
    except BuildError:
        nvcc = None
    if nvcc is not None:
        path = library_path(arch)
        print(f"compiling the megakernel for sm_{arch} with {nvcc} (once, about a minute; cached in {path.parent})",
              file=sys.stderr, flush=True)
        return compile_library(arch, path)
    ptx = library_path("ptx", PREBUILT)
    if ptx.exists() and int(arch.rstrip("af")) >= int(PTX_ARCH):
        return ptx
    raise BuildError(f"no nvcc and no prebuilt megakernel library for sm_{arch}: install the CUDA toolkit (nvcc on "
                     f"PATH, or set NVCC / CUDA_HOME) or a wheel built with QWEN_TTS_MK_PREBUILD (see README)")


def load_library(arch: str | None = None) -> ctypes.CDLL:
    """The library for `arch` (default: the current CUDA device), loaded once per process."""
    if arch is None:
        import torch

        arch = arch_for_capability(*torch.cuda.get_device_capability())
    with _lock:
        if arch in _loaded:
            return _loaded[arch]
        lib = ctypes.CDLL(str(find_library(arch)))
        _declare(lib)
        _loaded[arch] = lib
        return lib


def prebuild(targets: list[str], root: Path = PREBUILT, jobs: int | None = None) -> list[Path]:
    """Compile the libraries for `targets` (sm targets or "ptx") under `root`, `jobs` nvcc processes at a time."""
    find_nvcc()  # fail before starting any thread
    todo = [t for t in targets if not library_path(t, root).exists()]
    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        list(pool.map(lambda t: compile_library(t, library_path(t, root)), todo))
    return [library_path(t, root) for t in targets]


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
    """python -m qwen_tts_megakernel.megakernel.build [--prebuilt] [TARGET ...]: compile (e.g. 90a 80 ptx) into
    the cache, or with --prebuilt into the package's prebuilt/ folder (default targets: all of PREBUILT_TARGETS)."""
    args = sys.argv[1:] if argv is None else argv
    into_package = "--prebuilt" in args
    targets = [a for a in args if a != "--prebuilt"] or (list(PREBUILT_TARGETS) if into_package else ["90a"])
    for path in prebuild(targets, PREBUILT if into_package else cache_dir()):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
