"""A failed argument check inside the CUDA extension raises a Python error (it must never crash the
process): run in a subprocess so that a crash fails this test instead of the whole run."""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _have_extension() -> bool:
    try:
        import kvfuse._C  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(not _have_extension(), reason="needs a CUDA GPU and the built kvfuse._C extension")
def test_failed_checks_in_the_extension_raise():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_probe_check.py")], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, f"the probe crashed (exit {r.returncode}):\n{r.stdout}\n{r.stderr}"
    lines = [x for x in r.stdout.splitlines() if ": raised ValueError: " in x]
    assert len(lines) == 3, r.stdout
    assert "cos/sin must be [U, rotary_dim / 2 = 32]" in r.stdout
