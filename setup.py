"""Package build hook: with QWEN_TTS_MK_PREBUILD set, the wheel also carries the compiled megakernel libraries.

    QWEN_TTS_MK_PREBUILD=all pip wheel --no-deps . -w dist      # sm_80 86 89 90a 100a 120a + PTX; needs nvcc
    QWEN_TTS_MK_PREBUILD="90a ptx" pip wheel --no-deps . -w dist  # just these targets

They land in qwen_tts_megakernel/megakernel/prebuilt/ (see megakernel/build.py), so that a GPU machine with the
driver and PyTorch but no CUDA toolkit runs the megakernel. Unset (the default, and CI), or without nvcc, nothing is
compiled and the package stays pure Python: the megakernel then compiles with nvcc at first use.
"""

import importlib.util
import os
import shutil
import time
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def _kernel_build():
    """megakernel/build.py by path: importing the package would import torch, which a build environment lacks."""
    spec = importlib.util.spec_from_file_location("_mk_build", HERE / "src/qwen_tts_megakernel/megakernel/build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _targets() -> list[str]:
    """The targets to prebuild: none unless QWEN_TTS_MK_PREBUILD asks for them and nvcc is there."""
    requested = os.environ.get("QWEN_TTS_MK_PREBUILD", "").replace(",", " ").split()
    if not requested:
        print("qwen-tts-megakernel: no prebuilt megakernel libraries (set QWEN_TTS_MK_PREBUILD=all to build them "
              "with nvcc); the megakernel will compile with nvcc at first use")
        return []
    mk = _kernel_build()
    try:
        mk.find_nvcc()
    except mk.BuildError as exc:
        print(f"qwen-tts-megakernel: QWEN_TTS_MK_PREBUILD is set but {exc}; no prebuilt libraries")
        return []
    return list(mk.PREBUILT_TARGETS) if requested == ["all"] else requested


TARGETS = _targets()


class BuildPyWithKernels(build_py):
    def run(self):
        super().run()
        if not TARGETS:
            return
        mk = _kernel_build()
        nvcc = mk.find_nvcc()
        targets = TARGETS
        root = HERE / "src" if self.editable_mode else Path(self.build_lib)
        out = root / "qwen_tts_megakernel" / "megakernel" / "prebuilt"
        keep = {mk.library_path(t, out).parent.name for t in targets}
        for old in out.glob("*") if out.is_dir() else ():  # libraries of earlier sources, left in the build folder
            if old.name not in keep:
                shutil.rmtree(old)
        print(f"qwen-tts-megakernel: compiling the megakernel for {' '.join(targets)} with {nvcc} into {out}")
        start = time.perf_counter()
        for path in mk.prebuild(targets, out):
            print(f"  {path.relative_to(root)}")
        print(f"qwen-tts-megakernel: prebuilt libraries compiled in {time.perf_counter() - start:.0f} s")


class KernelDistribution(Distribution):
    """With compiled libraries inside, the package is not pure Python: its wheel is for this platform."""

    def has_ext_modules(self):
        return bool(TARGETS)


class BdistWheelPlatform(bdist_wheel):
    """... for any Python 3, though: the libraries are loaded with ctypes, not imported."""

    def get_tag(self):
        python, abi, plat = super().get_tag()
        return ("py3", "none", plat) if TARGETS else (python, abi, plat)


setup(distclass=KernelDistribution, cmdclass={"build_py": BuildPyWithKernels, "bdist_wheel": BdistWheelPlatform})
