"""Paged K/V of every layer of a model, and the sequences stored in it.

`PagedKVStore` holds the K/V of every layer of a model in layer-stacked page pools
(``[num_layers, num_pages, page_size, num_kv_heads, head_dim]``, "NHD") with reference-counted pages:
a page is returned to the free list when its last owner lets go, and running out of pages raises
`OutOfPages` before anything is written.

A `PagedSequence` is a page table plus a list of segments (the `SegmentGraph` of what each token
sees) and the RoPE position of every token. It holds one reference to each of its pages; appending to
a sequence whose partly filled last page is shared copies that page first (copy-on-write). Threads
(`kvfuse.fork`, `kvfuse.merge`) are in `kvfuse.threads`, batched attention plans in `kvfuse.batch`.

Example:
    >>> import torch, kvfuse
    >>> store = kvfuse.PagedKVStore(num_layers=2, num_pages=16, page_size=4, num_kv_heads=1, head_dim=8)
    >>> seq = store.sequence()
    >>> _ = seq.append_kv(torch.randn(2, 6, 1, 8), torch.randn(2, 6, 1, 8))
    >>> seq.num_tokens, len(seq.pages), store.num_free
    (6, 2, 14)
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import torch

from kvfuse import _ops
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
from kvfuse.dispatch import choose, resolve
from kvfuse.paged import OutOfPages, gather_kv, to_device_async
from kvfuse.rope import MAX_POSITION, ModelRope, RopeConfig, as_model_rope
from kvfuse.segments import Segment, SegmentGraph

__all__ = ["PagedKVStore", "PagedSequence", "SegmentInfo", "OutOfPages"]


@dataclasses.dataclass(frozen=True)
class SegmentInfo:
    """One segment of a `PagedSequence`: ``length`` tokens at RoPE positions ``position, position + 1, ...``.

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

    Pages: ``alloc(n)`` hands out ``n`` pages with one reference each (`OutOfPages` when fewer
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
            raise OutOfPages(f"PagedKVStore: out of pages: {n} needed, {len(self._free)} of {self.num_pages} free "
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


    def _hand_over(self, take: list[list[int] | range], release: list[PagedSequence]) -> None:
        """One reference more on each page of the page lists ``take`` (a new sequence's pages taken over
        from others), then ``release`` each sequence of ``release``: what `incref` and
        `PagedSequence.release` do, with the same free-list order, but without their checks, for page
        lists this store already holds (the live sequences' own pages): `merge` hands the threads'
        pages to the merged sequence."""
        rc, free = self.refcount, self._free
        for pages in take:
            _add(rc, pages, 1)
        for seq in release:
            if seq.released:
                continue
            for i in seq.pages:
                rc[i] -= 1
                if rc[i] == 0:
                    free.append(i)
            seq.released, seq.pages = True, []

    def _hand_over_shared(self, shared: list[int] | range, freed: list[int], release: list[PagedSequence]) -> None:
        """`_hand_over` (``shared`` taken, ``release`` released) when every sequence of ``release`` holds
        the pages ``shared`` and otherwise only pages of its own that nobody else holds, each taken over
        too or listed in ``freed`` (then free again, in that order): the same counts and free-list order,
        with a pass over ``shared`` only."""
        rc = self.refcount
        _add(rc, shared, 1 - len(release))
        for i in freed:
            rc[i] = 0
        self._free += freed
        for seq in release:
            seq.released, seq.pages = True, []

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
    def sequence(self, name: str = "seq", *, position: int = 0) -> PagedSequence:
        """A new empty sequence whose first token will sit at RoPE ``position``."""
        check_instance("name", name, str)
        position = check_int("position", position, lo=0, hi=MAX_POSITION)
        return PagedSequence(self, [], [SegmentInfo(self.unique_name(name), 0, (), position)])

    def unique_name(self, hint: str) -> str:
        return f"{hint}#{next(self._names)}"

    def write_(self, layer: int | None, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write K/V of tokens into ``slots`` (int ``[n]``, distinct, on the store's device, e.g. from
        `PagedSequence.reserve`). ``k``/``v``: ``[n, Hkv, D]`` for one ``layer``, or ``[num_layers, n, Hkv, D]``
        with ``layer=None``, floating point, on the store's device. Modifies the pools in place, after
        checking everything; slots on a CUDA device are checked for shape and dtype only (their range
        would cost a device synchronisation at every layer of a decode step)."""
        if layer is not None:
            layer = check_int("layer", layer, lo=0, hi=self.num_layers - 1)
        check_tensor("slots", slots, ndim=1, dtype=(torch.int32, torch.int64), device=self.device)
        n_slots = self.num_pages * self.page_size
        # (inside torch.compile: a compiled decode step, whose slots `reserve` made)
        if slots.device.type == "cpu" and not torch.compiler.is_compiling():
            check_in_range("slots", slots, 0, n_slots, "slot ids (page * page_size + offset)")
            check_unique("slots", slots, "slot ids", upper=n_slots)
        want = (self.num_layers,) * (layer is None) + (slots.numel(), self.num_kv_heads, self.head_dim)
        for name, t in (("k", k), ("v", v)):
            check_tensor(name, t, dtype=ANY_FLOAT, device=self.device)
            if tuple(t.shape) != want:
                raise ValueError(f"{name} must be {'[n' if layer is not None else '[num_layers, n'}, Hkv, D] = "
                                 f"{list(want)} (n = slots.numel()), got {list(t.shape)}")
        chosen = resolve(None)  # KVFUSE_BACKEND: the CUDA backend has no write of its own
        backend = choose("write_kv_", chosen if chosen in ("triton", "torch") else "auto", k_cache=self.k_cache)
        _ops.write_kv_op(self.k_cache, self.v_cache, slots, k, v, -1 if layer is None else layer, backend)


def _add(rc: list[int], pages: list[int] | range, d: int) -> None:
    """``rc[i] += d`` for each page ``i`` (listed once each; a run of consecutive pages as one slice)."""
    if not d:
        return
    if type(pages) is range and pages.step == 1:
        rc[pages.start: pages.stop] = [c + d for c in rc[pages.start: pages.stop]]
    else:
        for i in pages:
            rc[i] += d


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


class PagedSequence:
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
        self.check_live()
        k = gather_kv(self.store.k_cache, self.page_table(), self.length)
        v = gather_kv(self.store.v_cache, self.page_table(), self.length)
        if include_pads:
            return k, v
        idx = self.token_index().to(k.device)
        return k[:, idx], v[:, idx]

    def slots(self, start: int, n: int) -> torch.Tensor:
        """int64 ``[n]`` pool slots of storage tokens ``start .. start + n - 1``, on the store's device."""
        return to_device_async(self.host_slots(start, n), self.store.device)

    def host_slots(self, start: int, n: int) -> torch.Tensor:
        """`slots` on the host (only the pages the range touches are converted; no device transfer)."""
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

    def reserve(self, n: int, *, on_host: bool = False) -> torch.Tensor:
        """Make room for ``n`` tokens at the end of the last segment and return their slots
        (int64 ``[n]``, on the store's device, or on the host with ``on_host=True``: no transfer).
        Allocates pages as needed and copies a shared, partly filled last page first
        (copy-on-write); raises `OutOfPages` if the store is out of pages, changing nothing."""
        start = self._grow(n)
        return self.host_slots(start, n) if on_host else self.slots(start, n)

    def snapshot(self) -> tuple[list[int], list[SegmentInfo]]:
        """The page table and segments, for `restore` (e.g. to undo a forward that failed)."""
        return list(self.pages), list(self.segments)

    def restore(self, snapshot: tuple[list[int], list[SegmentInfo]]) -> None:
        """Undo every `reserve` since ``snapshot``: the pages taken are released in the reverse order of
        their allocation (the store's free list is as before), a last page copied on write is
        taken back, the segments are as they were. K/V written into the released slots are not."""
        pages, segments = snapshot
        now, before = set(self.pages), set(pages)
        self.store.incref([p for p in pages if p not in now])  # a shared last page copied on write
        self.store._unalloc([p for p in self.pages if p not in before])  # [copied page, new pages...]
        self.pages, self.segments = list(pages), list(segments)

    def _grow(self, n: int) -> int:
        """`reserve` without computing the slots; returns the storage index of the first new token."""
        self.check_live()
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
        self.check_live()
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
    def fork(self, n: int, name: str = "thread") -> list[PagedSequence]:
        """See `fork`."""
        from kvfuse.threads import fork

        return fork(self, n, name=name)

    def release(self) -> None:
        """Drop this sequence's references to its pages (pages nobody else holds become free)."""
        if not self.released:
            self.store.decref(self.pages)
            self.released = True
            self.pages = []

    def check_live(self) -> None:
        if self.released:
            raise RuntimeError("this PagedSequence was released (or consumed by merge)")

    def __repr__(self):
        segs = ", ".join(f"{s.name}[{s.length}]" + ("(pad)" if s.pad else f"@{s.position}") for s in self.segments)
        return f"PagedSequence({segs}; {len(self.pages)} pages)"


Sequence = PagedSequence  # the former name (it shadowed collections.abc.Sequence)
