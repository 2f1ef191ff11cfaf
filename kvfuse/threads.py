"""Threads: fork a prefix into sequences that share its pages, merge them back into one.

``fork(prefix, n)`` makes ``n`` threads that share the prefix's pages without copying. A thread never
writes into a page it shares: its first token starts a fresh page (the unused rest of the prefix's
last page becomes a *pad* segment, which no token sees). ``merge(threads, layout)`` composes the
threads into one sequence with `kvfuse.compose` (page tables are concatenated; a thread's pages are
re-rotated in place only when it is given up and no one else holds them, otherwise its tokens are
copied) and opens an empty continuation segment that sees everything.

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

Storage is `kvfuse.store`; batched attention over threads is `kvfuse.batch`; the model-facing side
(decoding through Hugging Face models, repair) is `kvfuse.integrations.hf`.

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

from collections.abc import Sequence as _Seq

import torch

from kvfuse._checks import check_instance, check_int
from kvfuse.compose import SourceSegment, _compose, _plan_layout
from kvfuse.paged import host_ints
from kvfuse.rope import ModelRope
from kvfuse.store import PagedKVStore, PagedSequence, SegmentInfo

__all__ = ["fork", "merge"]


def fork(prefix: PagedSequence, n: int, *, name: str = "thread") -> list[PagedSequence]:
    """``n`` threads that continue ``prefix``: each sees all that the prefix's next token would see,
    plus its own tokens. No data is copied: the threads hold references to the prefix's pages, and
    each starts its own tokens on a fresh page (the rest of the prefix's last page is a pad).

    Args:
        prefix: a live `PagedSequence` (it stays usable; appending to it later copies its shared last page).
        n: number of threads (>= 1).
    Returns:
        list of ``n`` `PagedSequence`, each with an empty last segment at position ``prefix.next_position``.

    Example:
        >>> import torch, kvfuse
        >>> store = kvfuse.PagedKVStore(1, 8, 4, 1, 8)
        >>> p = store.sequence(); _ = p.append_kv(torch.randn(1, 5, 1, 8), torch.randn(1, 5, 1, 8))
        >>> a, b = kvfuse.fork(p, 2)
        >>> store.refcount[p.pages[0]], a.length, a.next_position
        (3, 8, 5)
    """
    check_instance("fork: prefix", prefix, PagedSequence,
                   " (a PagedKVStore makes one with store.sequence())" if isinstance(prefix, PagedKVStore) else "")
    n = check_int("fork: n", n, lo=1)
    check_instance("fork: name", name, str)
    prefix.check_live()
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
        threads.append(PagedSequence(store, prefix.pages, segs + [own]))
    return threads


def _alike(a: SegmentInfo, b: SegmentInfo) -> bool:
    """Same segment; two pads of one length count as alike (storage filler that no token sees: the
    pads two `fork` calls of one prefix add are the same slots of the prefix's last page)."""
    return a is b or a == b or (a.pad and b.pad and a.length == b.length)


def _common_prefix(threads: _Seq[PagedSequence], what: str) -> tuple[int, int]:
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
    head = first.pages[: n // ps]
    if any(t.pages[: n // ps] != head for t in threads[1:]):
        raise ValueError(f"{what}: the threads do not share their common prefix's pages (make them with kvfuse.fork)")
    return k, n


def _check_rows(what: str, rows, noun: str = "threads") -> list[PagedSequence]:
    """``rows`` as a non-empty list of distinct live sequences of one store."""
    if isinstance(rows, PagedSequence):
        raise TypeError(f"{what}: {noun} must be a list of kvfuse.PagedSequence, got a single PagedSequence "
                        "(pass [seq])")
    try:
        rows = list(rows)
    except TypeError:
        raise TypeError(f"{what}: {noun} must be a list of kvfuse.PagedSequence, got {type(rows).__name__}") from None
    if not rows:
        raise ValueError(f"{what}: {noun} must not be empty")
    for i, r in enumerate(rows):
        check_instance(f"{what}: {noun}[{i}]", r, PagedSequence)
        r.check_live()
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


def _page_arg(pages: list[int]):
    """A page list for `SourceSegment`: a ``range`` when the pages are consecutive, upwards or downwards
    (then compose checks and joins them in O(1); a released run of pages is handed out again in the
    opposite order), else an int32 host tensor."""
    n = len(pages)
    if n:
        a = pages[0]
        if pages[-1] - a == n - 1 and pages == list(range(a, a + n)):
            return range(a, a + n)
        if a - pages[-1] == n - 1 and pages == list(range(a, a - n, -1)):
            return range(a, a - n, -1)
    return host_ints(pages, torch.int32)


def merge(threads: _Seq[PagedSequence], layout: str = "sequential", *, keep_threads: bool = False,
          name: str = "join", backend: str | None = None) -> PagedSequence:
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
        threads: a list of live sibling `PagedSequence`s of one store (any token counts, 0 allowed):
            threads of one `fork` call, or of several `fork` calls of one prefix that did not change
            in between, or sequences with no common prefix at all (composed one after the other).
            A sequence and its own descendant (a prefix and its thread) are not siblings:
            ``ValueError``.
        layout: "sequential" or "shared".
        keep_threads: keep the threads usable (their pages are then never modified). By default
            they are released: their pages now belong to the merged sequence.
    Returns:
        the merged `PagedSequence`; ``K``/``V`` of the store are modified in place only in pages of given-up
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

    rc = store.refcount
    sources, new_pos, out_segs = [], [], list(prefix_segs)
    own = []  # (index of the source, pages past the prefix) of each thread that stores tokens
    simple = not keep_threads  # so far every thread's own pages are held by it alone and are its source's
    shared = _page_arg(threads[0].pages[: n_pre // ps]) if n_pre else []
    if n_pre:
        first_pos = next((s.position for s in prefix_segs if not s.pad), 0)
        sources.append(SourceSegment(shared, n_pre, 0, first_pos, give_up=False))
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
        out_segs += [s if s.pad or not delta else SegmentInfo(s.name, s.length, s.parents, s.position + delta)
                     for s in rest]
        stored = n if i == len(threads) - 1 else -(-n // ps) * ps
        if stored > n:
            out_segs.append(SegmentInfo(store.unique_name("pad"), stored - n, (), 0, pad=True))
        own_pages = t.pages[n_pre // ps:]
        sole = not keep_threads and set(map(rc.__getitem__, own_pages)) <= {1}
        if stored == 0:
            simple = simple and not own_pages
            continue
        give_up = delta == 0 or sole
        simple = simple and sole and len(own_pages) == -(-stored // ps)
        own.append((len(sources), own_pages))
        sources.append(SourceSegment(_page_arg(own_pages), stored, n_pre % ps, lo, give_up=give_up))
        new_pos.append(target)
    last_pos = max([s.position + s.length for s in out_segs if not s.pad] or [0])
    if any(p != s.position for s, p in zip(sources, new_pos)):
        rope.check_movable()
    out_segs.append(SegmentInfo(store.unique_name(name), 0, tuple(join_parents), last_pos))

    if not sources:  # nothing stored at all
        return PagedSequence(store, [], out_segs)
    dst = store._alloc_ids(_plan_layout(sources, ps, new_pos).n_new)  # pages_needed: positions are ints
    try:
        composed, lay = _compose(store.k_cache, store.v_cache, sources, rope, "sequential", new_pos,
                                 host_ints(dst, torch.int32) if dst else None, backend,
                                 descending=True, device_tables=False)
    except Exception:
        store._unalloc(dst)
        raise
    # the host tables: no wait for the copies and rotations just queued on the device; the reused
    # pages are the live threads' own (checked above), so the references change unchecked
    merged = PagedSequence(store, composed._host_table(), out_segs)
    copied = {i for i, _ in lay.copies}
    if not simple or (n_pre and 0 in copied):
        take = [p if type(p) is range else p.tolist() for kind, p in lay.table if kind == "reuse"]
        store._hand_over(take, [] if keep_threads else threads)
        return merged
    # every thread holds the prefix (taken over once) and pages of its own that nobody else holds,
    # taken over whole or (copied) released: only the prefix's counts change
    store._hand_over_shared(shared if type(shared) is range else threads[0].pages[: n_pre // ps],
                            [p for i, pages in own if i in copied for p in pages], threads)
    return merged


# ---------------------------------------------------------------------- batched attention
