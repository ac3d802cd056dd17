"""CPU test: the megakernel compiles with nvcc for Hopper (sm_90a), Blackwell consumer (sm_120a) and Ampere (sm_80).

Skipped when nvcc is not on PATH. Compile only (no GPU needed), the three architectures at once (one nvcc each, in
parallel). The frame kernel's register spills on sm_90a, as ptxas reports them, stay within today's bound: about
0.7 KB of spill stores per thread now (docs/megakernel.md), a variant with 1.7 KB was slower and reverted.
"""

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from qwen_tts_megakernel.megakernel.build import CSRC, nvcc_flags

NVCC = shutil.which("nvcc")
ARCHS = ("90a", "120a", "80")
MAX_SPILL_STORES = 1024  # bytes per thread, frame kernel, sm_90a

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """arch -> the finished `nvcc -c -Xptxas -v` of megakernel.cu for that architecture."""
    out = tmp_path_factory.mktemp("nvcc")

    def compile_for(arch: str) -> subprocess.CompletedProcess:
        flags = [f for f in nvcc_flags(arch) if f != "-shared"]
        cmd = [NVCC, *flags, "-c", "-Xptxas", "-v", "-o", str(out / f"mk_{arch}.o"), str(CSRC / "megakernel.cu")]
        return subprocess.run(cmd, capture_output=True, text=True)

    with ThreadPoolExecutor(len(ARCHS)) as pool:
        return dict(zip(ARCHS, pool.map(compile_for, ARCHS)))


@pytest.mark.parametrize("arch", ARCHS)
def test_compiles(compiled, arch):
    proc = compiled[arch]
    assert proc.returncode == 0, proc.stderr[-3000:]


def frame_kernel_spill_stores(ptxas_log: str) -> list[int]:
    """Bytes of spill stores of each frame_kernel instantiation in a `-Xptxas -v` log."""
    found = re.findall(r"Function properties for \S*frame_kernel\S*\n"
                       r"\s*\d+ bytes stack frame, (\d+) bytes spill stores", ptxas_log)
    return [int(n) for n in found]


def test_frame_kernel_spills_stay_within_bound(compiled):
    spills = frame_kernel_spill_stores(compiled["90a"].stderr + compiled["90a"].stdout)
    assert len(spills) == 2, "expected the 0.6B and 1.7B frame kernels in ptxas's report"
    assert max(spills) <= MAX_SPILL_STORES, spills
