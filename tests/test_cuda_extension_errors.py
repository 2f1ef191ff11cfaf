"""A failed argument check inside the CUDA extension raises a Python error (it must never crash the
process: TORCH_CHECK's ostream formatting of numbers once did, on the H200 image; the extension's checks
now build their messages without ostreams, see csrc/torch_utils.h). The probes run in a subprocess so
that a crash fails this test instead of the whole run."""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBES = """
import torch
import kvfuse._C as C

dev = torch.device("cuda", 0)
k = torch.randn(4, 16, 2, 64, device=dev, dtype=torch.bfloat16)
v = torch.randn_like(k)
slots = torch.arange(8, device=dev, dtype=torch.int32)
idx = torch.zeros(8, device=dev, dtype=torch.int32)
cos = torch.ones(1, 16, device=dev)  # wrong width: rotary_dim 64 needs 32 columns
sin = torch.zeros(1, 16, device=dev)
probes = {
    "rerotate_ wrong table width": lambda: C.rerotate_(k, slots, idx, cos, sin, 64, False),
    "compose_copy_ wrong table width": lambda: C.compose_copy_(k, v, slots, slots + 8, idx, cos, sin, 64, False),
    "rerotate_ cpu slots": lambda: C.rerotate_(k, slots.cpu(), idx, cos, sin, 64, False),
}
for name, fn in probes.items():
    try:
        fn()
        print(f"{name}: NO ERROR", flush=True)
    except Exception as e:
        print(f"{name}: raised {type(e).__name__}: {str(e).splitlines()[0]}", flush=True)
"""


def _have_extension() -> bool:
    try:
        import kvfuse._C  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(not _have_extension(), reason="needs a CUDA GPU and the built kvfuse._C extension")
def test_failed_checks_in_the_extension_raise():
    r = subprocess.run([sys.executable, "-c", PROBES], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"a probe crashed the process (exit {r.returncode}):\n{r.stdout}\n{r.stderr}"
    lines = r.stdout.splitlines()
    assert len(lines) == 3 and all(": raised ValueError: " in x for x in lines), r.stdout
    assert "cos/sin must be [U, rotary_dim / 2 = 32]" in r.stdout
