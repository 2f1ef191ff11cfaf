"""Backend dispatch by priority, with reasons.

Every operation has implementations in up to three backends, tried in the order of `PRIORITY`.
Each implementation answers ``not_supported_reasons(**inputs) -> list[str]``. ``backend="auto"``
(the default, or the ``KVFUSE_BACKEND`` environment variable) takes the first backend with no
reasons; the torch reference supports every valid input, so "auto" always runs. An explicitly
requested backend that cannot run raises `BackendNotSupported` listing every reason.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable

PRIORITY = ("cuda", "triton", "torch")
_BACKEND_MODULES = {b: f"kvfuse.backends.{b}" for b in PRIORITY}


class BackendNotSupported(RuntimeError):
    """An explicitly requested backend cannot run the given inputs."""


@dataclasses.dataclass
class Impl:
    fn: Callable
    reasons: Callable[..., list[str]]
    meta: dict = dataclasses.field(default_factory=dict)


_REGISTRY: dict[str, dict[str, Impl]] = {}
_LOAD_ERRORS: dict[str, str] = {}
_LOADED = False


def register(op: str, backend: str, reasons: Callable[..., list[str]] | None = None, **meta):
    """Decorator: register ``fn`` as ``backend``'s implementation of ``op``; ``meta`` holds extra
    per-implementation hooks (for attention: ``tile_shape(head_dim, max_q_len) -> (bq, bk)``)."""

    def deco(fn):
        _REGISTRY.setdefault(op, {})[backend] = Impl(fn, reasons or (lambda **kw: []), dict(meta))
        return fn

    return deco


def _load_backends() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for name, mod in _BACKEND_MODULES.items():
        try:
            importlib.import_module(mod)
        except Exception as e:  # an unavailable backend becomes a reason, never an import error
            _LOAD_ERRORS[name] = f"{type(e).__name__}: {e}"


def resolve(backend: str | None) -> str:
    backend = backend or os.environ.get("KVFUSE_BACKEND") or "auto"
    if backend not in PRIORITY + ("auto",):
        raise ValueError(f"backend must be one of {('auto',) + PRIORITY}, got {backend!r}")
    return backend


def reasons_for(op: str, backend: str, **inputs) -> list[str]:
    _load_backends()
    if backend in _LOAD_ERRORS:
        return [f"the {backend} backend failed to load ({_LOAD_ERRORS[backend]})"]
    impl = _REGISTRY.get(op, {}).get(backend)
    if impl is None:
        return [f"the {backend} backend has no implementation of {op}"]
    return list(impl.reasons(**inputs))


def choose(op: str, backend: str | None, **inputs) -> str:
    """Name of the backend that will run ``op`` on ``inputs``."""
    backend = resolve(backend)
    candidates = PRIORITY if backend == "auto" else (backend,)
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
    _load_backends()
    return _REGISTRY[op][backend].fn


def meta(op: str, backend: str) -> dict:
    _load_backends()
    return _REGISTRY[op][backend].meta


def available(op: str, **inputs) -> dict[str, list[str]]:
    """Reasons per backend (an empty list means it would run)."""
    return {b: reasons_for(op, b, **inputs) for b in PRIORITY}
