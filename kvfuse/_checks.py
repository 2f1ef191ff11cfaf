"""Input validation shared by the public API. Every check raises before anything is written."""

from __future__ import annotations

import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ANY_FLOAT = FLOAT_DTYPES + (torch.float64,)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_instance(name: str, value, cls: type, hint: str = "") -> None:
    if not isinstance(value, cls):
        where = "kvfuse." if cls.__module__.startswith("kvfuse") else ""
        raise TypeError(f"{name} must be a {where}{cls.__name__}, got {type(value).__name__}{hint}")


def check_int(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int (a Python or numpy integer, not a bool, float or string) in ``[lo, hi]``."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else (f"<= {hi}" if lo is None else f"in [{lo}, {hi}]")
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


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


def check_finite(name: str, t: torch.Tensor) -> None:
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite (it holds NaN or inf)")


def check_disjoint(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """``a`` and ``b`` share no element: not the same tensor, nor views of one buffer that overlap
    (the byte spans of strided views are compared, which is exact for contiguous tensors). Inside
    ``torch.compile`` storages cannot be inspected: the check runs in the eager calls only."""
    if torch.compiler.is_compiling():
        return

    def span(t):
        if not t.numel():
            return 0, 0
        lo = t.storage_offset() * t.element_size()
        return lo, lo + (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))) * t.element_size()

    if a.device != b.device or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return
    (a0, a1), (b0, b1) = span(a), span(b)
    if a0 < b1 and b0 < a1:
        raise ValueError(f"{name_a} and {name_b} share memory (the same tensor, or overlapping views of one "
                         f"buffer); they must be separate tensors")


def check_page_ids(name: str, pages, num_pages: int) -> list[int]:
    """Page ids as a host list: a 1-D integer tensor or a sequence of ints, each in ``[0, num_pages)``
    and none twice."""
    if isinstance(pages, torch.Tensor):
        if pages.dim() != 1 or pages.dtype not in INT_DTYPES:
            raise TypeError(f"{name} must be a 1-D integer tensor of page ids, got shape {tuple(pages.shape)} "
                            f"and dtype {pages.dtype}")
        ids = pages.tolist()
    else:
        try:
            ids = list(pages)
        except TypeError:
            raise TypeError(f"{name} must be a 1-D integer tensor or a sequence of int page ids, got "
                            f"{type(pages).__name__}") from None
        if not all(type(p) is int for p in ids):  # the common case (page lists of sequences) skips the loop
            for i, p in enumerate(ids):
                ids[i] = check_int(f"{name}[{i}]", p)
    bad = [p for p in ids if not 0 <= p < num_pages]
    if bad:
        raise ValueError(f"{name} must hold page ids in [0, {num_pages}), got {bad[:4]}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{name} holds duplicate page ids; each must appear once")
    return ids
