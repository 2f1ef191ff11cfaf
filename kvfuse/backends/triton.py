"""The Triton backend: registers the kernels of ``kvfuse.triton_kernels`` with the dispatcher.

Importing this module raises ImportError when triton is missing (the dispatcher turns that into a
reason). It never touches ``torch.cuda`` at import. The kernels run on CUDA tensors, and on CPU
tensors only under the Triton interpreter (``TRITON_INTERPRET=1``, for tests).
"""

from __future__ import annotations

import torch

try:
    import triton  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError("triton is not installed (pip install kvfuse[triton])") from e

from kvfuse.dispatch import register
from kvfuse.triton_kernels import attention as _attention
from kvfuse.triton_kernels import compose as _compose
from kvfuse.triton_kernels import merge_states as _merge
from kvfuse.triton_kernels import rerotate as _rerotate
from kvfuse.triton_kernels import small_mm as _small_mm
from kvfuse.triton_kernels import write_kv as _write_kv
from kvfuse.triton_kernels._common import interpreting

FLOATS = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (16, 32, 64, 128, 256)


def _device_reasons(t: torch.Tensor | None) -> list[str]:
    if t is None or t.device.type == "cuda":
        return []
    if t.device.type == "cpu" and interpreting():
        return []
    if t.device.type == "cpu":
        return ["tensors are on the CPU (triton kernels run on CUDA tensors, or on CPU under TRITON_INTERPRET=1)"]
    return [f"tensors are on {t.device.type}, triton kernels need CUDA tensors"]


def _cache_reasons(name: str, cache: torch.Tensor) -> list[str]:
    why = _device_reasons(cache)
    if cache.dtype not in FLOATS:
        why.append(f"{name} dtype {cache.dtype} is not float16/bfloat16/float32")
    if not cache.is_contiguous():
        why.append(f"{name} must be contiguous")
    return why


def _rope_reasons(k_cache=None, rotary_dim=None, interleaved=None, **_) -> list[str]:
    if k_cache is None:
        return []
    why = _cache_reasons("k_cache", k_cache)
    if rotary_dim is not None and (rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > k_cache.shape[-1]):
        why.append(f"rotary_dim={rotary_dim} must be even and in (0, head_dim]")
    return why


def _attention_reasons(q=None, k_cache=None, plan=None, **_) -> list[str]:
    if q is None:
        return []
    why = _device_reasons(q)
    if q.dtype not in FLOATS:
        why.append(f"q dtype {q.dtype} is not float16/bfloat16/float32")
    d = q.shape[-1]
    if d not in HEAD_DIMS:
        why.append(f"head_dim {d} is not one of {HEAD_DIMS}")
    if k_cache is not None:
        if k_cache.dim() != 4:
            why.append("k_cache must be one layer's pool [num_pages, page_size, num_kv_heads, head_dim]")
        elif not k_cache.is_contiguous():
            why.append("k_cache/v_cache must be contiguous")
    return why


def _merge_reasons(v=None, **_) -> list[str]:
    if v is None:
        return []
    why = _device_reasons(v)
    if v.dtype not in FLOATS:
        why.append(f"dtype {v.dtype} is not float16/bfloat16/float32")
    return why


def _write_reasons(k_cache=None, **_) -> list[str]:
    return [] if k_cache is None else _cache_reasons("k_cache", k_cache)


def _small_mm_reasons(x=None, weights=None, **_) -> list[str]:
    if x is None:
        return []
    why = _device_reasons(x)
    if x.dtype not in (torch.float16, torch.bfloat16):
        why.append(f"x dtype {x.dtype} is not float16/bfloat16")
    if x.shape[0] > _small_mm.MAX_ROWS:
        why.append(f"x has {x.shape[0]} rows, the kernel takes at most {_small_mm.MAX_ROWS}")
    if weights is not None and len(weights) > _small_mm.MAX_GROUPS:
        why.append(f"{len(weights)} weights, the kernel takes at most {_small_mm.MAX_GROUPS} per launch")
    return why


register("rerotate_", "triton", reasons=_rope_reasons)(_rerotate.rerotate_)
register("compose_copy_", "triton", reasons=_rope_reasons)(_compose.compose_copy_)
register("segment_attention", "triton", reasons=_attention_reasons,
         tile_shape=_attention.tile_shape)(_attention.segment_attention)
register("merge_states", "triton", reasons=_merge_reasons)(_merge.merge_states)
register("write_kv_", "triton", reasons=_write_reasons)(_write_kv.write_kv_)
register("small_mm", "triton", reasons=_small_mm_reasons)(_small_mm.small_mm)
