"""Backend dispatch by priority, with reasons.

Every operation has implementations in up to three backends. ``backend="auto"`` (the default, or
the ``KVFUSE_BACKEND`` environment variable) tries them in the op's order in `ORDER` -- the fastest
first, as measured on an H200 in one `kvfuse-bench all` run (bench/RESULTS.md) -- and takes the
first whose ``not_supported_reasons(**inputs) -> list[str]`` is empty; the torch reference supports
every valid input, so "auto" always runs. An explicitly requested backend that cannot run raises
`BackendNotSupported` listing every reason. On CPU tensors "auto" means torch (the kernels run on
CPU only under the Triton interpreter, for tests).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import threading
from collections.abc import Callable

PRIORITY = ("cuda", "triton", "torch")  # every backend (the order of an op not in ORDER)
_BACKEND_MODULES = {b: f"kvfuse.backends.{b}" for b in PRIORITY}
# "auto" per op, fastest first (H200, bf16, bench/RESULTS.md, same run): re-rotation Triton 4.03 TB/s
# vs CUDA 3.79; compose Triton 3.95 vs CUDA 3.82; decode attention Triton 4.35 vs CUDA 4.17; prefill
# (more than 8 queries per sequence) at the Hopper kernel's head dims: CUDA first (effective TFLOP/s,
# P=4K T=4 L=4K, page 16: d 64 352 vs Triton's 314, d 128 522 vs 357, d 256 580 vs 244; the CUDA
# backend declines prefill off Hopper, where Triton runs it). merge_states is not measured: CUDA
# first. An entry is a tuple or a function of the op's inputs returning one.
PREFILL_MIN_Q = 9
CUDA_ATTN_HEAD_DIMS = (64, 128, 256)  # the CUDA backend's attention kernels (decode and the Hopper prefill)


def _attention_order(plan=None, q=None, **_) -> tuple[str, ...]:
    if plan is not None and plan.max_q >= PREFILL_MIN_Q and q is not None and q.shape[-1] in CUDA_ATTN_HEAD_DIMS:
        return ("cuda", "triton", "torch")
    return ("triton", "cuda", "torch")


ORDER = {
    "rerotate_": ("triton", "cuda", "torch"),
    "compose_copy_": ("triton", "cuda", "torch"),
    "segment_attention": _attention_order,
    "merge_states": ("cuda", "triton", "torch"),
    "write_kv_": ("triton", "torch"),  # one launch for K and V of a step's tokens (two indexed assignments in torch)
    "small_mm": ("triton", "torch"),
}


class BackendNotSupported(RuntimeError):
    """An explicitly requested backend cannot run the given inputs."""


@dataclasses.dataclass
class Impl:
    fn: Callable
    reasons: Callable[..., list[str]]
    meta: dict = dataclasses.field(default_factory=dict)


_REGISTRY: dict[str, dict[str, Impl]] = {}
_LOAD_ERRORS: dict[str, str] = {}
_LOADED: set[str] = set()  # backends whose module was imported (or failed to import)
_LOAD_LOCK = threading.RLock()  # the first dispatch of two threads: both wait until the backend is loaded
# the public names `available` takes, and the registered op each runs
PUBLIC_OPS = {"rerotate": "rerotate_", "rerotate_": "rerotate_", "compose": "compose_copy_",
              "attention": "segment_attention", "merge_states": "merge_states", "write_kv_": "write_kv_",
              "small_mm": "small_mm"}


def register(op: str, backend: str, reasons: Callable[..., list[str]] | None = None, **meta):
    """Decorator: register ``fn`` as ``backend``'s implementation of ``op``; ``meta`` holds extra
    per-implementation hooks (for attention: ``tile_shape(head_dim, max_q_len, group) -> (bq, bk)``,
    group = Hq / Hkv)."""

    def deco(fn):
        _REGISTRY.setdefault(op, {})[backend] = Impl(fn, reasons or (lambda **kw: []), dict(meta))
        return fn

    return deco


def _load(backend: str) -> None:
    """Import one backend's module on first use (importing triton alone takes a few hundred ms)."""
    if backend in _LOADED:
        return
    with _LOAD_LOCK:
        if backend in _LOADED:
            return
        try:
            importlib.import_module(_BACKEND_MODULES[backend])
        except Exception as e:  # an unavailable backend becomes a reason, never an import error
            _LOAD_ERRORS[backend] = f"{type(e).__name__}: {e}"
        _LOADED.add(backend)


def resolve(backend: str | None) -> str:
    choices = ("auto",) + PRIORITY
    if not backend and os.environ.get("KVFUSE_BACKEND"):
        env = os.environ["KVFUSE_BACKEND"]
        if env not in choices:
            raise ValueError(f"the KVFUSE_BACKEND environment variable must be one of {choices}, got {env!r}")
        return env
    backend = backend or "auto"
    if backend not in choices:
        raise ValueError(f"backend must be one of {choices}, got {backend!r}")
    return backend


def reasons_for(op: str, backend: str, **inputs) -> list[str]:
    """Why ``backend`` cannot run ``op`` on ``inputs`` (empty: it can). Without inputs only what does
    not depend on them: the backend failed to load, or has no implementation of ``op``."""
    _load(backend)
    if backend in _LOAD_ERRORS:
        return [f"the {backend} backend failed to load ({_LOAD_ERRORS[backend]})"]
    impl = _REGISTRY.get(op, {}).get(backend)
    if impl is None:
        return [f"the {backend} backend has no implementation of {op}"]
    return list(impl.reasons(**inputs)) if inputs else []


def choose(op: str, backend: str | None, **inputs) -> str:
    """Name of the backend that will run ``op`` on ``inputs``."""
    backend = resolve(backend)
    order = ORDER.get(op, PRIORITY)
    candidates = (order(**inputs) if callable(order) else order) if backend == "auto" else (backend,)
    if backend == "auto" and _on_cpu(inputs):
        candidates = ("torch",)  # kernels run on CPU tensors only under the Triton interpreter, for tests
    why = {}
    for b in candidates:
        r = reasons_for(op, b, **inputs)
        if not r:
            return b
        why[b] = r
    lines = "\n".join(f"  - {b}: {msg}" for b, rs in why.items() for msg in rs)
    raise BackendNotSupported(f"{op}: backend {backend!r} cannot run these inputs:\n{lines}")


def _on_cpu(inputs) -> bool:
    import torch

    return any(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in inputs.values())


def implementation(op: str, backend: str) -> Callable:
    _load(backend)
    return _REGISTRY[op][backend].fn


def meta(op: str, backend: str) -> dict:
    _load(backend)
    return _REGISTRY[op][backend].meta


def available(op: str, **inputs) -> dict[str, list[str]]:
    """Reasons per backend why it cannot run ``op`` (an empty list means it would run).

    ``op``: a public name ("rerotate_" or "rerotate", "compose", "attention", "merge_states",
    "write_kv_": `PagedKVStore.write_`) or a registered op ("compose_copy_", "segment_attention").
    ``inputs``: the tensors and options the op would get (``k_cache=``, ``rotary_dim=``,
    ``interleaved=``; ``q=``, ``k_cache=``, ``plan=``; ``v=``). Without inputs only what is known
    without them is reported (a backend that failed to load, with its install hint, or has no
    implementation); an empty list then means "loaded".

    Example:
        >>> import kvfuse
        >>> kvfuse.available("rerotate")["torch"]
        []
    """
    registered = set(PUBLIC_OPS.values())
    if op not in PUBLIC_OPS and op not in registered:
        raise ValueError(f"op must be one of {sorted(set(PUBLIC_OPS) | registered)}, got {op!r}")
    op = PUBLIC_OPS.get(op, op)
    return {b: reasons_for(op, b, **inputs) for b in PRIORITY}
