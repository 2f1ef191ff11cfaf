import os

import pytest
import torch

import kvfuse
from kvfuse.dispatch import reasons_for
from kvfuse.testing import TOL  # the table kvfuse-bench --check uses too

BACKENDS = ("torch", "triton", "cuda")


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


@pytest.fixture
def no_compile_caches():
    """No inductor / AOT autograd cache hits: a graph compiled by an earlier test or run would not go
    through the graph passes a test watches. (torch's config modules are patched with their own
    ``patch``: pytest's monkeypatch deletes, and so hides, a config entry when it undoes.)"""
    import torch._functorch.config
    import torch._inductor.config

    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        yield


__all__ = ["BACKENDS", "TOL", "device_for", "skip_unless_supported", "pool_randn", "kvfuse"]
