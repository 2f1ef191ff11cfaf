"""Batched attention over several sequences of one store: the plan of one `kvfuse.attention` call
per layer for a decode (or prefill) step of many rows (sibling threads, merged sequences); see
`batch_plan` for an example."""

from __future__ import annotations

import array
import dataclasses
import numbers
from collections.abc import Sequence as _Seq

import torch

from kvfuse._checks import check_int
from kvfuse.attention import AttentionPlan, AttentionSpec
from kvfuse.paged import to_device_async
from kvfuse.segments import Segment, SegmentGraph
from kvfuse.store import PagedSequence, _segment
from kvfuse.threads import _check_rows, _common_prefix

__all__ = ["BatchPlan", "batch_plan"]


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


SHARE_MIN_PREFIX = 256  # tokens of common prefix from which the automatic choice shares it (shared_prefix=None)
SHARE_MAX_QUERIES = 16  # queries of all rows together that one decode tile holds


def batch_plan(rows: _Seq[PagedSequence], q_len: int | _Seq[int], *, hogwild: bool = False,
               shared_prefix: bool | None = False) -> BatchPlan:
    """Plan one batched attention call: row b's queries are its last ``q_len`` tokens (already
    reserved / written), over its own view of the store.

    Default view: the row itself (prefix and own tokens, by its segment graph). ``hogwild=True``
    (rows are sibling threads of one fork): each row also sees the other rows' tokens written before
    this step (not those of the current step), Hogwild-style; the views are assembled from the
    others' page tables without copying.

    ``shared_prefix=True`` (sibling threads of one fork, not hogwild): the rows become ONE sequence in the
    plan -- their common prefix once, then each row's own tokens, each row's queries its own last tokens,
    each row seeing the prefix and itself only -- so the attention reads the prefix's K/V once for all
    rows instead of once per row (the result is the same; the block table has one row and the plan one
    sequence of ``sum(q_lens)`` queries, in the rows' order). ``None``: share when the rows are siblings
    with a common prefix of at least `SHARE_MIN_PREFIX` tokens and at most `SHARE_MAX_QUERIES` queries in all
    (a decode step). ``False`` (default): one sequence per row.

    Otherwise the plan equals ``kvfuse.plan(AttentionSpec(graphs, q_lens))`` (same tensors, same tile maps) but
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
    q_lens = _q_lens(rows, q_len)
    store = rows[0].store
    if shared_prefix not in (True, False, None):
        raise TypeError(f"batch_plan: shared_prefix must be True, False or None (automatic), got {shared_prefix!r}")
    shared = shared_view(rows, q_lens, required=shared_prefix is True) if shared_prefix is not False else None
    if shared_prefix is not False and hogwild:
        if shared_prefix:
            raise ValueError("batch_plan: shared_prefix=True and hogwild=True do not combine (a hogwild row also "
                             "sees its siblings' earlier tokens)")
        shared = None
    if shared is not None:
        table, segs, q_tokens = shared
        p = AttentionPlan(AttentionSpec([SegmentGraph(segs)], q_tokens=[q_tokens], device=store.device))
        return BatchPlan(_block_table([table], store.device), p)
    tables, graphs = row_graphs(rows, q_lens, hogwild=hogwild)
    p = AttentionPlan(AttentionSpec(graphs, q_lens, device=store.device))
    return BatchPlan(_block_table(tables, store.device), p)


def _q_lens(rows, q_len) -> list[int]:
    if isinstance(q_len, numbers.Integral | str) or not isinstance(q_len, _Seq):
        q_lens = [check_int("batch_plan: q_len", q_len, lo=0)] * len(rows)
    else:
        q_lens = [check_int(f"batch_plan: q_len[{i}]", x, lo=0) for i, x in enumerate(q_len)]
    if len(q_lens) != len(rows):
        raise ValueError(f"batch_plan: one q_len per row ({len(rows)}), got {len(q_lens)}")
    return q_lens


def row_graphs(rows: _Seq[PagedSequence], q_lens: list[int], *, hogwild: bool = False):
    """Host page lists and `SegmentGraph` of each row's view (`batch_plan`'s, before any transfer):
    ``(tables, graphs)``; rows of one shape share one graph object."""
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
    return tables, graphs


def shared_view(rows: _Seq[PagedSequence], q_lens: list[int], *, required: bool = False, pad_last: bool = False):
    """The rows as one sequence that holds their common prefix once: ``(page table, segments, query token
    indices)``, or None when they are not siblings with a shareable prefix (with ``required``: ``ValueError``
    instead). Each row's own pages follow the prefix in order, its last page padded (``pad_last``: the
    last row's too) so the next region starts on a page boundary; each row's queries are its last
    ``q_lens[i]`` tokens."""
    if len(rows) < 2 and not required:
        return None
    try:
        k, n_pre = _common_prefix(rows, "batch_plan(shared_prefix=True)")
    except ValueError:
        if required:
            raise
        return None
    if not required and (n_pre < SHARE_MIN_PREFIX or sum(q_lens) > SHARE_MAX_QUERIES):
        return None
    if n_pre == 0:
        if required:
            raise ValueError("batch_plan(shared_prefix=True): the rows have no common prefix")
        return None
    ps = rows[0].store.page_size
    segs = [_segment(s) for s in rows[0].segments[:k]]
    table, q_tokens, off = list(rows[0].pages[: n_pre // ps]), [], n_pre
    for i, r in enumerate(rows):
        n, pages = r.length - n_pre, r.pages[n_pre // ps:]
        q_tokens += range(off + n - q_lens[i], off + n)
        segs += [_segment(s) for s in r.segments[k:]]
        table += pages
        stored = len(pages) * ps
        if stored > n and (pad_last or i < len(rows) - 1):
            segs.append(Segment(f"{r.segments[-1].name}~page-pad", stored - n))
        off += stored if (pad_last or i < len(rows) - 1) else n
    return table, segs, q_tokens


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
