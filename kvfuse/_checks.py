"""Input validation shared by the public API. Every check raises before anything is written."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(name: str, t, *, ndim=None, dtype=None, device=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        ndims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in ndims:
            raise ValueError(f"{name} must have {' or '.join(map(str, ndims))} dims, got shape {tuple(t.shape)}")
    if dtype is not None:
        dtypes = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if t.dtype not in dtypes:
            raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")


def check_cache(name: str, cache) -> None:
    """A page pool: [num_pages, page_size, num_kv_heads, head_dim] or layer-stacked with a leading L."""
    check_tensor(name, cache, ndim=(4, 5), dtype=FLOAT_DTYPES)
    if not cache.is_contiguous():
        raise ValueError(f"{name} must be contiguous (layout [.., num_pages, page_size, num_kv_heads, head_dim])")


def check_same_pool(name_a: str, a, name_b: str, b) -> None:
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, dtype and device, got "
            f"{tuple(a.shape)}/{a.dtype}/{a.device} and {tuple(b.shape)}/{b.dtype}/{b.device}"
        )


def check_in_range(name: str, t: torch.Tensor, lo: int, hi: int, what: str) -> None:
    """Every value in [lo, hi) (one min/max pass; the message gives the offending extremes)."""
    if t.numel():
        mn, mx = torch.aminmax(t)
        if int(mn) < lo or int(mx) >= hi:
            raise ValueError(f"{name} must hold {what} in [{lo}, {hi}), got min {int(mn)}, max {int(mx)}")


def check_unique(name: str, t: torch.Tensor, what: str, upper: int | None = None) -> None:
    """No value twice. With ``upper`` (values known to lie in [0, upper)) a counting pass replaces the sort."""
    if not t.numel():
        return
    if upper is not None:
        dup = bool(torch.bincount(t.long(), minlength=upper).max() > 1)
    else:
        dup = torch.unique(t).numel() != t.numel()
    if dup:
        raise ValueError(f"{name} holds duplicate {what}; each must appear once")
