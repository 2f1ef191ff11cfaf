"""Threads over a paged KV store: fork a prefix, decode the threads as one batch, merge, continue.

`PagedKVStore` holds the K/V of every layer of a model in layer-stacked page pools
(``[num_layers, num_pages, page_size, num_kv_heads, head_dim]``, "NHD") with reference-counted pages:
a page is returned to the free list when its last owner lets go, and running out of pages raises
``RuntimeError`` before anything is written.

A `Sequence` is a page table plus a list of segments (the `SegmentGraph` of what each token sees) and
the RoPE position of every token. ``fork(prefix, n)`` makes ``n`` threads that share the prefix's pages
without copying. A thread never writes into a page it shares: its first token starts a fresh page
(the unused rest of the prefix's last page becomes a *pad* segment, which no token sees), and
appending to a sequence whose partly filled last page is shared copies that page first
(copy-on-write). ``merge(threads, layout)`` composes the threads into one sequence with
`kvfuse.compose` (page tables are concatenated; a thread's pages are re-rotated in place only when it
is given up and no one else holds them, otherwise its tokens are copied) and opens an empty
continuation segment that sees everything.

What the layouts mean (the exactness the tests check):

* ``"shared"``: threads keep their positions (every thread starts right after the prefix, the
  continuation after the longest thread). The composed cache is exactly the cache of one forward pass
  over the composed tokens with the segment mask and those positions, at every layer, so the
  continuation is exact against that masked re-prefill.
* ``"sequential"``: thread i is moved after thread i-1 by re-rotating its keys. That is exact for
  layer 0 (whose K/V depend on the token alone) and for the first thread (which does not move); the
  deeper layers of moved threads still encode their original distance to the prefix, so the
  composed cache is *not* the cache of a re-prefill at the new positions. It is exactly "each thread's
  own cache with its keys rotated to the new positions", which is what the tests compare against.

Model-independent: the model-facing side (batched decoding through Hugging Face models) is in
`kvfuse.integrations.hf`.

Example:
    >>> import torch, kvfuse
    >>> store = kvfuse.PagedKVStore(num_layers=2, num_pages=16, page_size=4, num_kv_heads=1, head_dim=8,
    ...                             rope=kvfuse.RopeConfig(head_dim=8))
    >>> prefix = store.sequence()
    >>> _ = prefix.append_kv(torch.randn(2, 6, 1, 8), torch.randn(2, 6, 1, 8))
    >>> threads = kvfuse.fork(prefix, 3)
    >>> for t in threads:
    ...     _ = t.append_kv(torch.randn(2, 5, 1, 8), torch.randn(2, 5, 1, 8))
    >>> merged = kvfuse.merge(threads, layout="shared")
    >>> merged.num_tokens, merged.next_position
    (21, 11)
"""

from __future__ import annotations

import array
import dataclasses
import functools
import itertools
import numbers
from collections.abc import Sequence as _Seq

import torch

from kvfuse._checks import (
    ANY_FLOAT,
    FLOAT_DTYPES,
    check_finite,
    check_in_range,
    check_instance,
    check_int,
    check_page_ids,
    check_tensor,
    check_unique,
)
from kvfuse.attention import AttentionPlan, AttentionSpec
from kvfuse.compose import SourceSegment, compose, pages_needed
from kvfuse.paged import gather_kv, slot_view, to_device_async
from kvfuse.rope import MAX_POSITION, ModelRope, RopeConfig, as_model_rope
from kvfuse.segments import Segment, SegmentGraph

__all__ = ["PagedKVStore", "Sequence", "SegmentInfo", "BatchPlan", "fork", "merge", "batch_plan"]


@dataclasses.dataclass(frozen=True)
class SegmentInfo:
    """One segment of a `Sequence`: ``length`` tokens at RoPE positions ``position, position + 1, ...``.

    ``parents`` name the segments it sees entirely; ``pad`` marks storage filler that no token sees
    (the unused rest of a page before a page-aligned segment); a pad's position is meaningless.
    """

    name: str
    length: int
    parents: tuple[str, ...] = ()
    position: int = 0
    pad: bool = False


class PagedKVStore:
    """Layer-stacked paged K/V for all layers of a model, with reference-counted pages.

    Args:
        num_layers, num_pages, page_size, num_kv_heads, head_dim: pool shape; ``k_cache`` and
            ``v_cache`` are ``[num_layers, num_pages, page_size, num_kv_heads, head_dim]``.
        rope: the model's rotation, a `ModelRope` (per layer) or a `RopeConfig` (every layer alike);
            kept as a `ModelRope`. Needed to move tokens (`merge` "sequential", memory blocks).
        dtype, device: of the pools. They start zeroed (unused slots never hold NaN).

    Pages: ``alloc(n)`` hands out ``n`` pages with one reference each (``RuntimeError`` when fewer
    than ``n`` are free; nothing is taken then), ``incref``/``decref`` add and drop one reference of
    each page listed, and a page whose count reaches zero is free again. Each page may be listed
    once per call (a page table never holds a page twice, so a duplicate is a caller's bug): ids out
    of range, duplicates, non-integers and pages that are not allocated raise before any count
    changes.

    Example:
        >>> store = PagedKVStore(num_layers=2, num_pages=4, page_size=16, num_kv_heads=2, head_dim=64)
        >>> pages = store.alloc(3)
        >>> store.incref(pages[:1]); store.decref(pages); store.num_free  # pages[0] is still held once
        3
    """

    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, *,
                 rope: RopeConfig | ModelRope | None = None, dtype: torch.dtype = torch.float32, device="cpu"):
        shape = tuple(check_int(n, v, lo=1) for n, v in (
            ("num_layers", num_layers), ("num_pages", num_pages), ("page_size", page_size),
            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)))
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of {[str(d) for d in FLOAT_DTYPES]}, got {dtype}")
        rope = as_model_rope(rope, num_layers)
        if rope is not None and rope.head_dim not in (None, head_dim):
            raise ValueError(f"rope.head_dim={rope.head_dim} does not match head_dim={head_dim}")
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.rope = rope
        self.page_size = page_size
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.refcount = [0] * num_pages
        self._free = list(range(num_pages - 1, -1, -1))
        self._names = itertools.count()

    @classmethod
    def from_hf(cls, config, num_pages: int, page_size: int = 16, *, dtype: torch.dtype | None = None,
                device="cpu") -> PagedKVStore:
        """A store shaped for a Hugging Face ``PretrainedConfig``: layers, KV heads and head_dim of what the
        model caches (`kvfuse.integrations.hf_config.cache_shape`) and its per-layer rotation
        (`kvfuse.ModelRope.from_hf`; a model whose tokens cannot be moved gets a store that refuses moves).

        Raises ``UnsupportedModel`` naming the model and the feature for caches kvfuse cannot hold (MLA,
        linear-attention / state-space hybrids, cross-layer KV sharing, encoder-decoders)."""
        from kvfuse.integrations.hf_config import cache_shape, model_rope

        num_layers, hkv, head_dim = cache_shape(config)
        dtype = dtype or getattr(config, "dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        return cls(num_layers, num_pages, page_size, hkv, head_dim, rope=model_rope(config), dtype=dtype,
                   device=device)

    # ------------------------------------------------------------------ pages
    @property
    def num_pages(self) -> int:
        return len(self.refcount)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def device(self) -> torch.device:
        return self.k_cache.device

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def alloc(self, n: int) -> torch.Tensor:
        """``n`` free pages (int32 ``[n]``), each with one reference. All or nothing."""
        return torch.tensor(self._alloc_ids(n), dtype=torch.int32, device=self.device)

    def _alloc_ids(self, n: int) -> list[int]:
        """`alloc` as a host list (no device transfer)."""
        n = check_int("n", n, lo=0)
        if n > len(self._free):
            raise RuntimeError(f"PagedKVStore: out of pages: {n} needed, {len(self._free)} of {self.num_pages} free "
                               f"(page_size {self.page_size}); release sequences or make a larger store")
        ids = [self._free.pop() for _ in range(n)]
        for i in ids:
            self.refcount[i] = 1
        return ids

    def incref(self, pages) -> None:
        """Add one reference to each page (int tensor or sequence of ints; each allocated, listed once)."""
        for i in self._held("incref", pages):
            self.refcount[i] += 1

    def decref(self, pages) -> None:
        """Drop one reference of each page (as `incref`); a page whose count reaches zero is free again."""
        for i in self._held("decref", pages):
            self.refcount[i] -= 1
            if self.refcount[i] == 0:
                self._free.append(i)

    free = decref

    def _held(self, what: str, pages) -> list[int]:
        ids = check_page_ids("pages", pages, self.num_pages)
        for i in ids:
            if self.refcount[i] <= 0:
                raise ValueError(f"PagedKVStore.{what}: page {i} is not allocated")
        return ids

    def _unalloc(self, ids: list[int]) -> None:
        """Undo ``ids = _alloc_ids(n)``: the free list is restored exactly (same order)."""
        self.decref(ids[::-1])

    # ------------------------------------------------------------------ sequences
    def sequence(self, name: str = "seq", *, position: int = 0) -> Sequence:
        """A new empty sequence whose first token will sit at RoPE ``position``."""
        check_instance("name", name, str)
        position = check_int("position", position, lo=0, hi=MAX_POSITION)
        return Sequence(self, [], [SegmentInfo(self.unique_name(name), 0, (), position)])

    def unique_name(self, hint: str) -> str:
        return f"{hint}#{next(self._names)}"

    def write_(self, layer: int | None, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write K/V of tokens into ``slots`` (int ``[n]``, distinct, on the store's device, e.g. from
        `Sequence.reserve`). ``k``/``v``: ``[n, Hkv, D]`` for one ``layer``, or ``[num_layers, n, Hkv, D]``
        with ``layer=None``, floating point, on the store's device. Modifies the pools in place, after
        checking everything; slots on a CUDA device are checked for shape and dtype only (their range
        would cost a device synchronisation at every layer of a decode step)."""
        if layer is not None:
            layer = check_int("layer", layer, lo=0, hi=self.num_layers - 1)
        check_tensor("slots", slots, ndim=1, dtype=(torch.int32, torch.int64), device=self.device)
        n_slots = self.num_pages * self.page_size
        if slots.device.type == "cpu":
            check_in_range("slots", slots, 0, n_slots, "slot ids (page * page_size + offset)")
            check_unique("slots", slots, "slot ids", upper=n_slots)
        want = (self.num_layers,) * (layer is None) + (slots.numel(), self.num_kv_heads, self.head_dim)
        for name, t in (("k", k), ("v", v)):
            check_tensor(name, t, dtype=ANY_FLOAT, device=self.device)
            if tuple(t.shape) != want:
                raise ValueError(f"{name} must be {'[n' if layer is not None else '[num_layers, n'}, Hkv, D] = "
                                 f"{list(want)} (n = slots.numel()), got {list(t.shape)}")
        if layer is None:
            kv, vv = slot_view(self.k_cache), slot_view(self.v_cache)
        else:
            kv, vv = slot_view(self.k_cache[layer])[0], slot_view(self.v_cache[layer])[0]
        kv[..., slots, :, :] = k.to(self.k_cache.dtype)
        vv[..., slots, :, :] = v.to(self.v_cache.dtype)


def _segment(s: SegmentInfo, parents: tuple[str, ...] | None = None, length: int | None = None) -> Segment:
    """The `Segment` of a stored segment (pads get no position: nobody sees them)."""
    if parents is None and length is None:
        return _as_segment(s)
    return Segment(s.name, s.length if length is None else length, s.parents if parents is None else parents,
                   None if s.pad else s.position)


@functools.lru_cache(maxsize=1 << 16)
def _as_segment(s: SegmentInfo) -> Segment:
    """`_segment` of an unchanged stored segment, cached: a decode step converts every segment of
    every row, and a long-lived sequence's history does not change."""
    return Segment(s.name, s.length, s.parents, None if s.pad else s.position)


class Sequence:
    """A paged sequence in a `PagedKVStore`: page table, segments, positions. Made by
    `PagedKVStore.sequence`, `fork` and `merge`; holds one reference to each of its pages until
    `release`.

    Token ``t`` (in storage order, pads included) lives in slot ``pages[t // page_size] * page_size +
    t % page_size``. New tokens go to the last segment.
    """

    def __init__(self, store: PagedKVStore, pages: list[int], segments: list[SegmentInfo]):
        self.store = store
        self.pages = list(pages)
        self.segments = list(segments)
        self.released = False

    # ------------------------------------------------------------------ views
    @property
    def length(self) -> int:
        """Tokens in storage order, pads included (the KV length attention runs over)."""
        return sum(s.length for s in self.segments)

    @property
    def num_tokens(self) -> int:
        """Real tokens (pads excluded)."""
        return sum(s.length for s in self.segments if not s.pad)

    @property
    def next_position(self) -> int:
        """RoPE position of the next token appended (after the last token of the last segment)."""
        s = self.segments[-1]
        return s.position + s.length

    def page_table(self) -> torch.Tensor:
        """int32 ``[num_pages]`` page ids, on the store's device."""
        return torch.tensor(self.pages, dtype=torch.int32, device=self.store.device)

    def graph(self) -> SegmentGraph:
        """The `SegmentGraph` over all stored tokens (pads included: no token sees them)."""
        return SegmentGraph([_segment(s) for s in self.segments])

    def token_graph(self) -> SegmentGraph:
        """The `SegmentGraph` of the real tokens only (pads removed): the mask a re-prefill uses."""
        return SegmentGraph([_segment(s, tuple(p for p in s.parents if not self._is_pad(p)))
                             for s in self.segments if not s.pad])

    def _is_pad(self, name: str) -> bool:
        return any(s.pad and s.name == name for s in self.segments)

    def positions(self, include_pads: bool = False) -> torch.Tensor:
        """int64 RoPE position of every real token (or every stored token, pads as -1)."""
        parts = []
        for s in self.segments:
            if s.pad:
                if include_pads:
                    parts.append(torch.full((s.length,), -1, dtype=torch.int64))
            else:
                parts.append(torch.arange(s.position, s.position + s.length, dtype=torch.int64))
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)

    def token_index(self) -> torch.Tensor:
        """int64 storage index of every real token, in order."""
        parts, off = [], 0
        for s in self.segments:
            if not s.pad:
                parts.append(torch.arange(off, off + s.length))
            off += s.length
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)

    def gather(self, include_pads: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Contiguous copies ``(K, V)``, each ``[num_layers, n, Hkv, D]`` (post-RoPE keys)."""
        self._check_live()
        k = gather_kv(self.store.k_cache, self.page_table(), self.length)
        v = gather_kv(self.store.v_cache, self.page_table(), self.length)
        if include_pads:
            return k, v
        idx = self.token_index().to(k.device)
        return k[:, idx], v[:, idx]

    def slots(self, start: int, n: int) -> torch.Tensor:
        """int64 ``[n]`` pool slots of storage tokens ``start .. start + n - 1``, on the store's device."""
        return to_device_async(self._host_slots(start, n), self.store.device)

    def _host_slots(self, start: int, n: int) -> torch.Tensor:
        """`slots` on the host (only the pages the range touches are converted)."""
        ps = self.store.page_size
        if n <= 0:
            return torch.empty(0, dtype=torch.int64)
        first = start // ps
        pages = torch.tensor(self.pages[first: (start + n - 1) // ps + 1], dtype=torch.int64)
        t = torch.arange(start, start + n)
        return pages[t // ps - first] * ps + t % ps

    # ------------------------------------------------------------------ writing
    def pages_needed(self, n: int) -> int:
        """Pages `reserve` (n) would allocate (new pages plus a copied shared last page)."""
        n = check_int("n", n, lo=0)
        ps, length = self.store.page_size, self.length
        cow = n > 0 and length % ps != 0 and self.store.refcount[self.pages[-1]] > 1
        return self.store.pages_for(length + n) - len(self.pages) + int(cow)

    def reserve(self, n: int) -> torch.Tensor:
        """Make room for ``n`` tokens at the end of the last segment and return their slots
        (int64 ``[n]``). Allocates pages as needed and copies a shared, partly filled last page
        first (copy-on-write); raises ``RuntimeError`` if the store is out of pages, changing nothing."""
        return self.slots(self._grow(n), n)

    def _grow(self, n: int) -> int:
        """`reserve` without computing the slots; returns the storage index of the first new token."""
        self._check_live()
        n = check_int("n", n, lo=0)
        if self.next_position + n - 1 > MAX_POSITION:
            raise ValueError(f"reserve: {n} more tokens after position {self.next_position} overflow the "
                             f"positions [0, {MAX_POSITION}]")
        store, ps, length = self.store, self.store.page_size, self.length
        cow = n > 0 and length % ps != 0 and store.refcount[self.pages[-1]] > 1
        grow = store.pages_for(length + n) - len(self.pages)
        new = store._alloc_ids(grow + int(cow))
        if cow:
            old, page = self.pages[-1], new.pop(0)
            store.k_cache[:, page] = store.k_cache[:, old]
            store.v_cache[:, page] = store.v_cache[:, old]
            store.decref([old])
            self.pages[-1] = page
        self.pages += new
        last = self.segments[-1]
        self.segments[-1] = dataclasses.replace(last, length=last.length + n)
        return length

    def append_kv(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Append tokens' K/V of all layers, ``[num_layers, n, Hkv, D]`` (keys already rotated at
        positions ``next_position, ...``; floating point, finite, any device). Returns their slots.
        Everything is checked before a page is taken."""
        self._check_live()
        st = self.store
        for name, t in (("k", k), ("v", v)):
            check_tensor(name, t, ndim=4, dtype=ANY_FLOAT)
            if (t.shape[0], *t.shape[2:]) != (st.num_layers, st.num_kv_heads, st.head_dim):
                raise ValueError(f"append_kv: {name} must be [num_layers={st.num_layers}, n, Hkv={st.num_kv_heads}, "
                                 f"D={st.head_dim}], got {list(t.shape)}")
        if k.shape != v.shape:
            raise ValueError(f"append_kv: k and v must have the same shape, got {list(k.shape)} and {list(v.shape)}")
        check_finite("k", k)
        check_finite("v", v)
        k, v = k.to(st.device), v.to(st.device)
        slots = self.reserve(k.shape[1])
        st.write_(None, slots, k, v)
        return slots

    # ------------------------------------------------------------------ lifetime
    def fork(self, n: int, name: str = "thread") -> list[Sequence]:
        """See `fork`."""
        return fork(self, n, name=name)

    def release(self) -> None:
        """Drop this sequence's references to its pages (pages nobody else holds become free)."""
        if not self.released:
            self.store.decref(self.pages)
            self.released = True
            self.pages = []

    def _check_live(self):
        if self.released:
            raise RuntimeError("this Sequence was released (or consumed by merge)")

    def __repr__(self):
        segs = ", ".join(f"{s.name}[{s.length}]" + ("(pad)" if s.pad else f"@{s.position}") for s in self.segments)
        return f"Sequence({segs}; {len(self.pages)} pages)"


def fork(prefix: Sequence, n: int, *, name: str = "thread") -> list[Sequence]:
    """``n`` threads that continue ``prefix``: each sees all that the prefix's next token would see,
    plus its own tokens. No data is copied: the threads hold references to the prefix's pages, and
    each starts its own tokens on a fresh page (the rest of the prefix's last page is a pad).

    Args:
        prefix: a live `Sequence` (it stays usable; appending to it later copies its shared last page).
        n: number of threads (>= 1).
    Returns:
        list of ``n`` `Sequence`, each with an empty last segment at position ``prefix.next_position``.

    Example:
        >>> import torch, kvfuse
        >>> store = kvfuse.PagedKVStore(1, 8, 4, 1, 8)
        >>> p = store.sequence(); _ = p.append_kv(torch.randn(1, 5, 1, 8), torch.randn(1, 5, 1, 8))
        >>> a, b = kvfuse.fork(p, 2)
        >>> store.refcount[p.pages[0]], a.length, a.next_position
        (3, 8, 5)
    """
    check_instance("fork: prefix", prefix, Sequence,
                   " (a PagedKVStore makes one with store.sequence())" if isinstance(prefix, PagedKVStore) else "")
    n = check_int("fork: n", n, lo=1)
    check_instance("fork: name", name, str)
    prefix._check_live()
    store, ps = prefix.store, prefix.store.page_size
    segs = list(prefix.segments)
    pad = -prefix.length % ps
    if pad:
        segs.append(SegmentInfo(store.unique_name("pad"), pad, (), 0, pad=True))
    parent = next(s.name for s in reversed(prefix.segments) if not s.pad)
    threads = []
    for _ in range(n):
        store.incref(prefix.pages)
        own = SegmentInfo(store.unique_name(name), 0, (parent,), prefix.next_position)
        threads.append(Sequence(store, prefix.pages, segs + [own]))
    return threads


def _alike(a: SegmentInfo, b: SegmentInfo) -> bool:
    """Same segment; two pads of one length count as alike (storage filler that no token sees: the
    pads two `fork` calls of one prefix add are the same slots of the prefix's last page)."""
    return a == b or (a.pad and b.pad and a.length == b.length)


def _common_prefix(threads: _Seq[Sequence], what: str) -> tuple[int, int]:
    """(number of shared leading segments, their storage length) of sibling threads.

    Siblings: the leading segments they hold alike (`_alike`, never a thread's open last segment)
    lie in the same pages and end on a page boundary, and after them no two threads hold a segment
    of one name (a sequence and its own descendant are not siblings). Threads of one `fork` call,
    or of several calls on an unchanged prefix, are siblings; so are sequences with nothing in common.
    """
    first = threads[0]
    k = 0
    while all(k < len(t.segments) - 1 and _alike(t.segments[k], first.segments[k]) for t in threads):
        k += 1
    owner = {}
    for i, t in enumerate(threads):
        for s in t.segments[k:]:
            j = owner.setdefault(s.name, i)
            if j != i:
                raise ValueError(f"{what}: threads[{j}] and threads[{i}] both hold segment {s.name!r} past their "
                                 f"common prefix: one continues the other, or their prefix changed between fork "
                                 f"calls. {what} takes sibling threads of a common prefix (from kvfuse.fork)")
    n = sum(s.length for s in first.segments[:k])
    ps = first.store.page_size
    if n % ps:
        raise ValueError(f"{what}: the threads' common prefix ({n} tokens) does not end on a page boundary "
                         f"(make them with kvfuse.fork)")
    if any(t.pages[: n // ps] != first.pages[: n // ps] for t in threads):
        raise ValueError(f"{what}: the threads do not share their common prefix's pages (make them with kvfuse.fork)")
    return k, n


def _check_rows(what: str, rows, noun: str = "threads") -> list[Sequence]:
    """``rows`` as a non-empty list of distinct live sequences of one store."""
    if isinstance(rows, Sequence):
        raise TypeError(f"{what}: {noun} must be a list of kvfuse.Sequence, got a single Sequence (pass [seq])")
    try:
        rows = list(rows)
    except TypeError:
        raise TypeError(f"{what}: {noun} must be a list of kvfuse.Sequence, got {type(rows).__name__}") from None
    if not rows:
        raise ValueError(f"{what}: {noun} must not be empty")
    for i, r in enumerate(rows):
        check_instance(f"{what}: {noun}[{i}]", r, Sequence)
        r._check_live()
    if len({id(r) for r in rows}) != len(rows):
        raise ValueError(f"{what}: a sequence is listed twice")
    if any(r.store is not rows[0].store for r in rows):
        raise ValueError(f"{what}: the sequences belong to different stores")
    return rows


def _last_real(segs: _Seq[SegmentInfo]) -> list[str]:
    """The name of the last segment that is not a pad, as a list (empty if there is none)."""
    return next(([s.name] for s in reversed(segs) if not s.pad), [])


def _span(segs: _Seq[SegmentInfo]) -> tuple[int, int]:
    real = [s for s in segs if not s.pad and s.length]
    if not real:
        return (segs[0].position if segs else 0), 0
    lo = min(s.position for s in real)
    return lo, max(s.position + s.length for s in real) - lo


def merge(threads: _Seq[Sequence], layout: str = "sequential", *, keep_threads: bool = False,
          name: str = "join", backend: str | None = None) -> Sequence:
    """Compose sibling threads (from one `fork`) into one sequence, via `kvfuse.compose`.

    The result holds the shared prefix, then each thread's tokens in the given order, then an empty
    continuation segment that sees the prefix and every thread. Layouts:

    * ``"shared"``: every thread keeps its positions; the continuation starts after the longest
      thread. Nothing is rotated; no K/V is copied (page tables are concatenated; each thread's last
      page is padded so the next thread starts on a page boundary).
    * ``"sequential"``: thread i is moved to start where thread i-1 ends (positions counted without
      pads). Keys of moved threads are re-rotated; in place (zero copy) for threads that are given up
      (``keep_threads=False``) and whose pages nobody else holds, otherwise copied to new pages.
      Exact for layer 0 and the first thread only; see the module docstring.

    Args:
        threads: a list of live sibling `Sequence`s of one store (any token counts, 0 allowed):
            threads of one `fork` call, or of several `fork` calls of one prefix that did not change
            in between, or sequences with no common prefix at all (composed one after the other).
            A sequence and its own descendant (a prefix and its thread) are not siblings:
            ``ValueError``.
        layout: "sequential" or "shared".
        keep_threads: keep the threads usable (their pages are then never modified). By default
            they are released: their pages now belong to the merged sequence.
    Returns:
        the merged `Sequence`; ``K``/``V`` of the store are modified in place only in pages of given-up
        threads and in newly allocated pages.

    Raises:
        RuntimeError: the store has too few free pages for the copies.
        ValueError, TypeError: bad arguments, or a move the store's rotation cannot make.
        Nothing has changed when it raises.
    """
    threads = _check_rows("merge", threads)
    if layout not in ("sequential", "shared"):
        raise ValueError(f"merge: layout must be 'sequential' or 'shared', got {layout!r}")
    check_instance("merge: name", name, str)
    store = threads[0].store
    rope = store.rope
    if rope is None:  # nothing may move: the shared layout still works
        rope = ModelRope((None,) * store.num_layers, unmovable="merge: moving tokens (layout='sequential') needs "
                         "the store's rotation (PagedKVStore(..., rope=...))")
    ps = store.page_size
    k, n_pre = _common_prefix(threads, "merge")
    prefix_segs = threads[0].segments[:k]

    sources, new_pos, out_segs = [], [], list(prefix_segs)
    if n_pre:
        first_pos = next((s.position for s in prefix_segs if not s.pad), 0)
        sources.append(SourceSegment(torch.tensor(threads[0].pages, dtype=torch.int32, device=store.device),
                                     n_pre, 0, first_pos, give_up=False))
        new_pos.append(first_pos)
    cursor = None
    # the join sees everything: the last real segment of the prefix and of each thread already sees all
    # that came before it (as the next token appended to a sequence does), so they are its parents --
    # a parent list that stays short however many fork / merge rounds a sequence went through
    join_parents = _last_real(prefix_segs)
    for i, t in enumerate(threads):
        rest = t.segments[k:]
        n = sum(s.length for s in rest)
        lo, span = _span(rest)
        cursor = lo if cursor is None else cursor
        target = lo if layout == "shared" else cursor
        cursor = target + span
        delta = target - lo
        join_parents += _last_real(rest)
        out_segs += [s if s.pad else dataclasses.replace(s, position=s.position + delta) for s in rest]
        stored = n if i == len(threads) - 1 else -(-n // ps) * ps
        if stored > n:
            out_segs.append(SegmentInfo(store.unique_name("pad"), stored - n, (), 0, pad=True))
        if stored == 0:
            continue
        own_pages = t.pages[n_pre // ps:]
        sole = all(store.refcount[p] == 1 for p in own_pages)
        give_up = delta == 0 or (not keep_threads and sole)
        sources.append(SourceSegment(torch.tensor(t.pages, dtype=torch.int32, device=store.device), stored, n_pre,
                                     lo, give_up=give_up))
        new_pos.append(target)
    last_pos = max([s.position + s.length for s in out_segs if not s.pad] or [0])
    if any(p != s.position for s, p in zip(sources, new_pos)):
        rope.check_movable()
    out_segs.append(SegmentInfo(store.unique_name(name), 0, tuple(join_parents), last_pos))

    if not sources:  # nothing stored at all
        return Sequence(store, [], out_segs)
    dst = store._alloc_ids(pages_needed(sources, ps, positions=new_pos))
    try:
        composed = compose(store.k_cache, store.v_cache, sources, rope, positions=new_pos,
                           dst_pages=torch.tensor(dst, dtype=torch.int32), backend=backend)
    except Exception:
        store._unalloc(dst)
        raise
    store.incref(composed.reused_pages)
    merged = Sequence(store, composed.pages.tolist(), out_segs)
    if not keep_threads:
        for t in threads:
            t.release()
    return merged


# ---------------------------------------------------------------------- batched attention
@dataclasses.dataclass
class BatchPlan:
    """What one batched `kvfuse.attention` call over several sequences needs, for every layer.

    block_table: int32 ``[B, max_pages]``; plan: the `AttentionPlan` (queries are each row's last
    ``q_len`` tokens); graphs: the row views' `SegmentGraph` (built on first access).
    """

    block_table: torch.Tensor
    plan: AttentionPlan

    @property
    def graphs(self) -> list[SegmentGraph]:
        return self.plan.graphs


def batch_plan(rows: _Seq[Sequence], q_len: int | _Seq[int], *, hogwild: bool = False) -> BatchPlan:
    """Plan one batched attention call: row b's queries are its last ``q_len`` tokens (already
    reserved / written), over its own view of the store.

    Default view: the row itself (prefix and own tokens, by its segment graph). ``hogwild=True``
    (rows are sibling threads of one fork): each row also sees the other rows' tokens written before
    this step (not those of the current step), Hogwild-style; the views are assembled from the
    others' page tables without copying.

    The plan equals ``kvfuse.plan(AttentionSpec(graphs, q_lens))`` (same tensors, same tile maps) but
    is built for a decode step: rows of the same shape (sibling threads) are classified once, the
    per-token segment map is computed on the device, and the metadata goes to the device in one
    non-blocking copy (no host synchronisation).

    Example:
        >>> import torch, kvfuse
        >>> store = kvfuse.PagedKVStore(1, 16, 4, 1, 8)
        >>> p = store.sequence(); _ = p.append_kv(torch.randn(1, 5, 1, 8), torch.randn(1, 5, 1, 8))
        >>> ts = kvfuse.fork(p, 2)
        >>> for t in ts: _ = t.append_kv(torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8))
        >>> bp = kvfuse.batch_plan(ts, 1)
        >>> q = torch.randn(2, 2, 8)
        >>> out = kvfuse.attention(q, store.k_cache[0], store.v_cache[0], bp.block_table, bp.plan)
    """
    rows = _check_rows("batch_plan", rows, "rows")
    if isinstance(q_len, numbers.Integral | str) or not isinstance(q_len, _Seq):
        q_lens = [check_int("batch_plan: q_len", q_len, lo=0)] * len(rows)
    else:
        q_lens = [check_int(f"batch_plan: q_len[{i}]", x, lo=0) for i, x in enumerate(q_len)]
    if len(q_lens) != len(rows):
        raise ValueError(f"batch_plan: one q_len per row ({len(rows)}), got {len(q_lens)}")
    store = rows[0].store
    if hogwild and len(rows) > 1:
        tables, views = _hogwild_views(rows, q_lens)
    else:
        tables = [r.pages for r in rows]
        views = [[_segment(s) for s in r.segments] for r in rows]
    # rows of one shape (sibling threads in lockstep) share one SegmentGraph: the plan then describes
    # and classifies them once
    graphs, shapes = [], {}
    for segs in views:
        index = {s.name: i for i, s in enumerate(segs)}
        key = (len(index),) + tuple((s.length, tuple(index.get(p, -1) for p in s.parents), s.position)
                                    for s in segs)  # len(index): duplicate names never share a valid key
        g = shapes.get(key)
        if g is None:
            g = shapes[key] = SegmentGraph(segs)  # validates names, parents and cycles
        graphs.append(g)
    p = AttentionPlan(AttentionSpec(graphs, q_lens, device=store.device))
    return BatchPlan(_block_table(tables, store.device), p)


def _block_table(tables: list[list[int]], device) -> torch.Tensor:
    """int32 ``[B, max_pages]`` from host page lists (zero-padded), in one non-blocking copy."""
    width = max(1, max(len(t) for t in tables))
    flat = array.array("i")  # page lists -> int32 without a Python loop over the pages
    for t in tables:
        flat.extend(t)
        flat.extend(_ZERO * (width - len(t)))
    return to_device_async(torch.frombuffer(flat, dtype=torch.int32), torch.device(device)).view(len(tables), width)


def _hogwild_views(rows, q_lens):
    ps = rows[0].store.page_size
    k, n_pre = _common_prefix(rows, "batch_plan(hogwild=True)")
    prefix = [_segment(s) for s in rows[0].segments[:k]]
    tables, views = [], []
    for i, r in enumerate(rows):
        pages = list(r.pages[: n_pre // ps])
        segs = list(prefix)
        seen = []
        for j, o in enumerate(rows):
            if j == i:
                continue
            visible = o.length - n_pre - q_lens[j]
            rest, left = [], visible
            for s in o.segments[k:]:
                take = min(s.length, left)
                if take > 0:
                    rest.append(_segment(s, length=take))
                    if not s.pad:
                        seen.append(s.name)
                left -= take
            if visible <= 0:
                continue
            stored = -(-visible // ps) * ps
            if stored > visible:
                rest.append(Segment(f"{o.segments[-1].name}~hogwild-pad", stored - visible))
            segs += rest
            pages += o.pages[n_pre // ps: n_pre // ps + stored // ps]
        own = [_segment(s) for s in r.segments[k:]]
        own[-1] = dataclasses.replace(own[-1], parents=tuple(own[-1].parents) + tuple(seen))
        segs += own
        pages += r.pages[n_pre // ps:]
        tables.append(pages)
        views.append(segs)
    return tables, views


_ZERO = array.array("i", [0])
