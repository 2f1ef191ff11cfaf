import os

import pytest
import torch

import kvfuse
from kvfuse.dispatch import reasons_for

BACKENDS = ("torch", "triton", "cuda")

# Tolerances (atol, rtol) of a kernel against a float64 oracle, per storage dtype. bf16 keeps 8 bits
# of mantissa (eps 2**-8 = 3.9e-3): one rounding of the output gives up to ~4e-3 relative; fp16 has
# eps 2**-11; float32 results are compared after float32 arithmetic inside (eps 1.2e-7) on values of
# order 1-10, so 1e-5 leaves room for a few roundings.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def device_for(backend: str) -> torch.device:
    """The device a backend's tests run on, or skip with the reason."""
    if torch.cuda.is_available():
        dev = torch.device("cuda")
    elif backend == "torch" or (backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"):
        dev = torch.device("cpu")
    else:
        pytest.skip(f"{backend} backend needs a CUDA GPU (the triton backend also runs with TRITON_INTERPRET=1)")
    return dev


def skip_unless_supported(op: str, backend: str, **inputs):
    reasons = reasons_for(op, backend, **inputs)
    if reasons:
        pytest.skip(f"{backend} cannot run {op}: {'; '.join(reasons)}")


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pool_randn(shape, dtype, device):
    """Random pool values (never zeros)."""
    return torch.randn(shape, dtype=torch.float32, device=device).to(dtype)


__all__ = ["BACKENDS", "TOL", "device_for", "skip_unless_supported", "pool_randn", "kvfuse"]
