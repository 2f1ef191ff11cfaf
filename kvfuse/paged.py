"""Paged KV pools and the small helpers every op and test uses.

A pool is ``k_cache``/``v_cache`` of shape ``[num_pages, page_size, num_kv_heads, head_dim]`` ("NHD"),
or layer-stacked ``[num_layers, num_pages, page_size, num_kv_heads, head_dim]`` (every op then applies
to all layers at once). A sequence is a 1-D tensor of page ids plus a length; token ``t`` of it lives
in *slot* ``pages[t // page_size] * page_size + t % page_size``.
"""

from __future__ import annotations

import array

import torch

from kvfuse._checks import ANY_FLOAT, check_cache, check_in_range, check_int, check_page_ids, check_tensor


def page_size_of(cache: torch.Tensor) -> int:
    return cache.shape[-3]


def num_pages_of(cache: torch.Tensor) -> int:
    return cache.shape[-4]


def slot_view(cache: torch.Tensor) -> torch.Tensor:
    """View ``[L, num_pages * page_size, H, D]`` of a pool (L = 1 for a single-layer pool)."""
    if cache.dim() == 4:
        cache = cache.unsqueeze(0)
    L, P, S, H, D = cache.shape
    return cache.view(L, P * S, H, D)


def to_device_async(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host tensor to ``device`` without waiting for the device's queue (pinned, non-blocking)
    on CUDA; a plain copy elsewhere."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def host_ints(values: list[int], dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A CPU int64 / int32 tensor of a list of Python ints (through an `array.array`: ``torch.tensor``
    inspects every element, ~10x slower)."""
    if not values:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(array.array("q" if dtype == torch.int64 else "i", values), dtype=dtype)


def slots_of(pages: torch.Tensor, start: int, length: int, page_size: int) -> torch.Tensor:
    """int64 slots of tokens ``[start, start + length)`` of the sequence stored in ``pages``."""
    if start < 0 or length < 0:
        raise ValueError(f"token range must be non-negative, got start={start}, length={length}")
    if length and start + length > pages.numel() * page_size:
        raise ValueError(
            f"token range [{start}, {start + length}) exceeds the {pages.numel()} pages "
            f"({pages.numel() * page_size} slots) of the sequence"
        )
    t = torch.arange(start, start + length, device=pages.device)
    return pages.long()[t // page_size] * page_size + t % page_size


def gather_kv(cache: torch.Tensor, pages: torch.Tensor, length: int) -> torch.Tensor:
    """Contiguous copy of a sequence: ``[length, H, D]`` (or ``[L, length, H, D]`` if stacked)."""
    out = slot_view(cache)[:, slots_of(pages, 0, length, page_size_of(cache))]
    return out[0] if cache.dim() == 4 else out


def write_kv_(cache: torch.Tensor, pages: torch.Tensor, start: int, values: torch.Tensor) -> torch.Tensor:
    """Write ``values`` (``[n, H, D]``, or ``[L, n, H, D]`` for a stacked pool) as tokens
    ``[start, start + n)`` of the sequence in ``pages``. Returns ``cache`` (modified in place).
    Everything is checked before the write."""
    check_cache("cache", cache)
    check_pages("pages", pages, cache)
    start = check_int("start", start, lo=0)
    check_tensor("values", values, ndim=cache.dim() - 1, dtype=ANY_FLOAT)
    vals = values.unsqueeze(0) if cache.dim() == 4 else values
    view = slot_view(cache)
    if vals.shape[0] != view.shape[0] or vals.shape[2:] != view.shape[2:]:
        raise ValueError(f"values must be [n, H, D] matching the pool {tuple(cache.shape)}, got {tuple(values.shape)}")
    view[:, slots_of(pages, start, vals.shape[1], page_size_of(cache))] = vals.to(cache.device, cache.dtype)
    return cache


class OutOfPages(RuntimeError):
    """A pool or store has fewer free pages than an operation needs; nothing was taken or written."""


class PagePool:
    """K and V pools plus a free list of page ids.

    ``alloc(n)`` hands out ``n`` free pages (all or nothing); ``free(pages)`` gives allocated pages
    back (each id once, every id allocated; nothing is freed otherwise).

    Example:
        >>> pool = PagePool(num_pages=8, page_size=4, num_kv_heads=2, head_dim=16)
        >>> pages = pool.alloc(3)
        >>> pool.num_free
        5
    """

    def __init__(self, num_pages, page_size, num_kv_heads, head_dim, *, num_layers=None,
                 dtype=torch.float32, device="cpu"):
        shape = tuple(check_int(n, v, lo=1) for n, v in (("num_pages", num_pages), ("page_size", page_size),
                                                          ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)))
        if num_layers is not None:
            shape = (check_int("num_layers", num_layers, lo=1),) + shape
        self.k_cache = torch.empty(shape, dtype=dtype, device=device)
        self.v_cache = torch.empty(shape, dtype=dtype, device=device)
        self.page_size = page_size
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def num_pages(self) -> int:
        return num_pages_of(self.k_cache)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> torch.Tensor:
        n = check_int("n", n, lo=0)
        if n > len(self._free):
            raise OutOfPages(f"PagePool: out of pages (asked for {n}, {len(self._free)} free)")
        ids = [self._free.pop() for _ in range(n)]
        return torch.tensor(ids, dtype=torch.int32, device=self.k_cache.device)

    def free(self, pages) -> None:
        """Give ``pages`` (int tensor or sequence of ints) back; freeing them right after `alloc`
        restores the free list exactly."""
        ids = check_page_ids("pages", pages, self.num_pages)
        free = set(self._free)
        for i in ids:
            if i in free:
                raise ValueError(f"PagePool.free: page {i} is not allocated")
        self._free.extend(reversed(ids))

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)


def check_pages(name: str, pages, cache: torch.Tensor) -> None:
    check_tensor(name, pages, ndim=1, dtype=(torch.int32, torch.int64))
    check_in_range(name, pages, 0, num_pages_of(cache), "page ids")
