"""Compose several sequences' paged KV into one sequence."""

from __future__ import annotations

import array
import dataclasses
import functools
import itertools
from collections.abc import Sequence

import torch

from kvfuse import _ops
from kvfuse._checks import FLOAT_DTYPES, check_cache, check_disjoint, check_same_pool, check_tensor, check_unique
from kvfuse.dispatch import choose
from kvfuse.paged import PagePool, check_pages, to_device_async
from kvfuse.rerotate import check_movable, layer_runs
from kvfuse.rope import MAX_POSITION, ModelRope, RopeConfig, tables_into

LAYOUTS = ("sequential", "shared")


@dataclasses.dataclass
class SourceSegment:
    """Tokens ``[start, start + length)`` of a sequence stored in ``pages``.

    Args:
        pages: int ``[n]`` page ids of the source sequence, or a ``range`` of page ids (a run of
            consecutive pages: validated, concatenated and checked for overlaps in O(1) per segment, so a
            zero-copy composition of runs costs O(segments), not O(pages)).
        length: number of tokens taken (0 allowed).
        start: first token taken, within the source sequence.
        position: RoPE position the first taken token was rotated at (the rest follow by one).
        give_up: the caller no longer needs these pages. Only then may a segment that must move be
            re-rotated in place and its pages reused (zero copy); otherwise it is copied.
    """

    pages: torch.Tensor
    length: int
    start: int = 0
    position: int = 0
    give_up: bool = False


@dataclasses.dataclass
class Composed:
    """A composed sequence.

    pages: int32 page table; length: tokens; ranges: token range of each source segment;
    starts: the new RoPE position of each segment's first token; new_pages: destination pages written
    by the copy; reused_pages: source pages taken over without a copy (given up or shared read-only).
    ``positions`` (int64 ``[length]``, the position of every token) is built on first use, so that a
    zero-copy composition costs metadata only. When every segment's pages were runs (``range``, or host
    page tensors of consecutive ids, which are taken as runs) and nothing was copied, ``pages`` /
    ``reused_pages`` are built on first use too, and ``page_runs`` lists the page table as ``(first page,
    count)`` runs when they all run upwards (None otherwise). ``host_pages`` /
    ``host_reused_pages`` are the same tables on the CPU, kept from the composition: reading them
    waits for no device work.
    """

    length: int
    ranges: list[tuple[int, int]]
    starts: list[int]
    new_pages: torch.Tensor
    page_runs: tuple[tuple[int, int], ...] | None = None
    device: torch.device | None = None
    _pages: torch.Tensor | None = None
    _reused: torch.Tensor | None = None
    _host: tuple[torch.Tensor, torch.Tensor] | None = None  # (table, reused) on the CPU
    _runs: tuple[range, ...] | None = None  # the table as runs (either direction), when nothing was copied

    def __post_init__(self):
        if self.new_pages is None:
            self.new_pages = _no_pages(self.device)
        if self._runs is None and self.page_runs is not None:
            self._runs = tuple(range(a, a + n) for a, n in self.page_runs)

    @functools.cached_property
    def pages(self) -> torch.Tensor:
        if self._pages is not None:
            return self._pages
        return _runs_tensor(self._runs, self.device) if self._host is None else self._host[0].to(self.device)

    @functools.cached_property
    def reused_pages(self) -> torch.Tensor:
        if self._reused is not None:
            return self._reused
        return _runs_tensor(self._runs, self.device) if self._host is None else self._host[1].to(self.device)

    @functools.cached_property
    def host_pages(self) -> torch.Tensor:
        if self._host is not None:
            return self._host[0]
        return _runs_tensor(self._runs, "cpu") if self._runs is not None else self.pages.cpu()

    @functools.cached_property
    def host_reused_pages(self) -> torch.Tensor:
        if self._host is not None:
            return self._host[1]
        return _runs_tensor(self._runs, "cpu") if self._runs is not None else self.reused_pages.cpu()

    def _host_table(self) -> list[int]:
        """``host_pages`` as a list (from the runs without a tensor when there are runs)."""
        if self._runs is not None:
            return list(itertools.chain.from_iterable(self._runs))
        return self.host_pages.tolist()

    @functools.cached_property
    def positions(self) -> torch.Tensor:
        parts = [torch.arange(p, p + (b - a), dtype=torch.int64) for (a, b), p in zip(self.ranges, self.starts)]
        return (torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)).to(self.pages.device)


_NO_PAGES = torch.empty(0, dtype=torch.int32)  # read only
_NO_IDS = torch.empty(0, dtype=torch.int64)  # read only
_EMPTY: dict = {}


def _no_pages(device) -> torch.Tensor:
    """An empty int32 tensor on ``device`` (one per device: nothing can be written into it)."""
    t = _EMPTY.get(device)
    if t is None:
        t = _EMPTY[device] = torch.empty(0, dtype=torch.int32, device=device)
    return t


def _runs_tensor(runs: tuple[range, ...], device) -> torch.Tensor:
    """int32 page ids of runs (ranges), on ``device`` (None: the CPU). A CUDA device gets them through a
    pinned, non-blocking copy, ordered on the current stream like any kernel's output (a blocking copy
    would wait for every kernel queued before it, e.g. the composition's own rotations); not inside a
    CUDA-graph capture, where a replay could read the pinned buffer after its reuse."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if not runs:
        return torch.empty(0, dtype=torch.int32, device=device)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("the page table of a composition of page runs is built on its first read, which "
                           "cannot be captured in a CUDA graph: read Composed.pages / reused_pages before capturing")
    return to_device_async(torch.cat([torch.arange(r.start, r.stop, r.step, dtype=torch.int32) for r in runs]), device)


def _as_tensor(pages) -> torch.Tensor:
    """A segment's page list as a host int64 tensor (a run materialised)."""
    if isinstance(pages, range):  # an empty run may have any bounds
        return torch.arange(pages.start, pages.stop, pages.step, dtype=torch.int64) if pages else _NO_IDS
    return pages


def _span(run: range) -> tuple[int, int]:
    """(lowest, highest) page of a non-empty run of either direction."""
    return (run[0], run[-1]) if run.step > 0 else (run[-1], run[0])


def _disjoint_runs(runs) -> bool:
    """Whether runs (ranges) share no page (in one pass when they come in ascending order, else sorted
    once: O(runs log runs))."""
    last = -1
    for r in runs:
        if r:
            lo, hi = _span(r)
            if lo <= last:
                break
            last = hi
    else:
        return True
    last = -1
    for lo, hi in sorted([_span(r) for r in runs if r]):
        if lo <= last:
            return False
        last = hi
    return True


@dataclasses.dataclass
class _Layout:
    table: list  # list of (kind, payload): ("reuse", tensor of pages) or ("new", count)
    copies: list  # (segment index, composed start)
    rotations: list  # segment indices rotated in place
    n_new: int


def _new_positions(segments, layout, positions):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if positions is not None:
        if any(not isinstance(p, int) or isinstance(p, bool) for p in positions):
            raise TypeError(f"positions must be ints, got {list(positions)!r}")
        if len(positions) != len(segments):
            raise ValueError(f"positions must give one start per segment ({len(segments)}), got {len(positions)}")
        return list(positions)
    if layout == "shared":
        return [s.position for s in segments]
    out, cur = [], segments[0].position if segments else 0
    for s in segments:
        out.append(cur)
        cur += s.length
    return out


def _plan_layout(segments, page_size, new_positions) -> _Layout:
    lay = _Layout([], [], [], 0)
    table = lay.table
    off = 0
    n_tail = len(segments) - 1
    while n_tail >= 0 and segments[n_tail].length == 0:
        n_tail -= 1
    for i, s in enumerate(segments):
        length, start = s.length, s.start
        if length == 0:
            continue
        delta = new_positions[i] - s.position
        full = length % page_size == 0
        # a shared (not given-up) segment is reused only if whole pages: appending later must not
        # write into a page the source still owns
        if start % page_size == 0 and off % page_size == 0 and (
                (s.give_up and (full or i == n_tail)) or (delta == 0 and full)):
            p0 = start // page_size
            table.append(("reuse", s.pages[p0: p0 + -(-length // page_size)]))
            if delta != 0:
                lay.rotations.append(i)
        else:
            have = sum(len(p) if k == "reuse" else p for k, p in lay.table)
            need = -(-(off + s.length) // page_size) - have
            if need > 0:
                lay.table.append(("new", need))
                lay.n_new += need
            lay.copies.append((i, off))
        off += length
    return lay


def _page_table(segments, lay: _Layout, dst: torch.Tensor, num_pages: int):
    """Validate the destination pages and assemble the composed page table (int32), or with runs only
    (nothing copied) the table as runs (ranges)."""
    if not lay.n_new and all(type(p) is range for _, p in lay.table):
        runs = tuple([p for _, p in lay.table])
        if not _disjoint_runs(runs):
            raise ValueError("the composed page table holds duplicate page ids (two segments share a page); each "
                             "must appear once")
        return runs
    lay.table = [(k, _as_tensor(p) if k == "reuse" else p) for k, p in lay.table]
    segments = [dataclasses.replace(s, pages=_as_tensor(s.pages)) for s in segments]
    check_unique("dst_pages", dst, "page ids", upper=num_pages)
    if dst.numel() < lay.n_new:
        raise ValueError(f"dst_pages: this composition copies into {lay.n_new} pages, got {dst.numel()}")
    dst = dst[: lay.n_new]
    src_pages = torch.cat([s.pages.long() for s in segments])
    if dst.numel() and bool(torch.isin(dst.long(), src_pages).any()):
        raise ValueError("dst_pages must be disjoint from every source segment's pages")
    parts, used = [], 0
    for kind, payload in lay.table:
        if kind == "reuse":
            parts.append(payload.to(torch.int32))
        else:
            parts.append(dst[used: used + payload].to(torch.int32))
            used += payload
    table = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int32)
    check_unique("the composed page table", table, "page ids (two segments share a page)", upper=num_pages)
    return table


def pages_needed(segments: Sequence[SourceSegment], page_size: int, *, layout: str = "sequential",
                 positions=None) -> int:
    """How many destination pages `compose` will write for these segments."""
    return _plan_layout(list(segments), page_size, _new_positions(list(segments), layout, positions)).n_new


def compose(k_cache: torch.Tensor, v_cache: torch.Tensor, segments: Sequence[SourceSegment],
            rope: RopeConfig | ModelRope, *,
            layout: str = "sequential", positions: Sequence[int] | None = None,
            dst_pages: torch.Tensor | PagePool | None = None, backend: str | None = None) -> Composed:
    """Concatenate segments of paged sequences into one sequence of the same pool.

    Layouts: "sequential" places segment i right after segment i-1 (the first keeps its position)
    and re-rotates the moved keys; "shared" keeps every segment's positions (no rotation; threads
    forked from one prefix then share positions, as in parallel context windows). ``positions``
    (first new position of each segment) overrides the layout, e.g. to insert a memory block.

    Zero-copy path: a segment that starts on a page boundary of both the source and the composed
    sequence, and either is given up or needs no rotation and fills whole pages, keeps its pages;
    a given-up one that moves is re-rotated in place. Every other segment is gathered by one fused
    pass (rotate K, copy V) into ``dst_pages``, densely: partly filled tail pages are compacted.
    Sources are never modified unless given up.

    Args:
        k_cache, v_cache: pools ``[(L,) num_pages, page_size, num_kv_heads, head_dim]``, two separate
            tensors (not one tensor twice, nor overlapping views). **Modified in place** (destination
            pages, and given-up segments that move).
        segments: `SourceSegment` list, in composed order.
        rope: the model's `RopeConfig`, or a `ModelRope` (one rotation per layer) for a layer-stacked
            pool; a model whose tokens cannot be moved raises ``ValueError`` when a segment moves.
        dst_pages: int ``[m]`` free page ids to copy into (distinct, disjoint from every source page;
            `pages_needed` says how many), or a `PagePool` to allocate them from (of at most as many
            pages as the pools; the pages are given back if the composition raises).
    Returns:
        `Composed` (page table, length, positions, segment ranges, pages written / reused).

    Example:
        >>> import torch, kvfuse
        >>> k, v = torch.randn(2, 8, 4, 2, 16).unbind(0)
        >>> cfg = kvfuse.RopeConfig(head_dim=16)
        >>> a = kvfuse.SourceSegment(torch.tensor([0, 1]), length=6)
        >>> b = kvfuse.SourceSegment(torch.tensor([2, 3]), length=5)
        >>> out = kvfuse.compose(k, v, [a, b], cfg, dst_pages=torch.tensor([4, 5, 6]))
        >>> out.length, out.positions[-1].item()
        (11, 10)
    """
    out = _runs_only(k_cache, v_cache, segments, rope, layout, positions, dst_pages)
    return out if out is not None else _compose(k_cache, v_cache, segments, rope, layout, positions, dst_pages,
                                                backend)[0]


def _runs_only(k_cache, v_cache, segments, rope, layout, positions, dst_pages, descending=False):
    """The `Composed` of a composition that moves and copies nothing and whose segments' pages are all
    runs (``range``): every check `_compose` makes, on ints and ranges (the segments first: a
    composition that moves is refused without the pools' checks). None for anything else, valid or
    not: `_compose` then decides (and raises every error)."""
    if not (type(k_cache) is torch.Tensor and type(v_cache) is torch.Tensor and type(segments) in (list, tuple)
            and segments and type(layout) is str and layout in LAYOUTS and (
                dst_pages is None or isinstance(dst_pages, (torch.Tensor, PagePool)))) or (
            torch.compiler.is_compiling()):
        return None
    shape = k_cache.shape
    if len(shape) not in (4, 5) or (type(rope) is RopeConfig and rope.head_dim != shape[-1]):
        return None
    if positions is not None and not (type(positions) in (list, tuple) and len(positions) == len(segments)):
        return None
    page_size, num_pages = shape[-3], shape[-4]
    sequential = positions is None and layout == "sequential"
    runs, ranges, starts, spans = [], [], [], []
    off, cur, last, ordered = 0, None, -1, True
    for i, s in enumerate(segments):
        if type(s) is not SourceSegment:
            return None
        pages, length, start, pos = s.pages, s.length, s.start, s.position
        if not (type(pages) is range and type(length) is int and type(start) is int and type(pos) is int):
            return None
        new = pos if positions is None else positions[i]
        if sequential:
            new = pos if cur is None else cur
            cur = new + length
        if type(new) is not int or new != pos:  # moves
            return None
        step = pages.step
        if step == 1:
            if pages and not (0 <= pages.start and pages.stop <= num_pages):
                return None
        elif not (descending and step == -1 and (not pages or (0 <= pages[-1] and pages[0] < num_pages))):
            return None
        if start < 0 or length < 0 or start + length > len(pages) * page_size or (
                pos < 0 or pos + length - 1 > MAX_POSITION):
            return None
        if length:
            # kept whole pages, or a given-up tail (a later segment would not start on a page boundary)
            if start % page_size or off % page_size or not (s.give_up or length % page_size == 0):
                return None
            p0, n = start // page_size, -(-length // page_size)
            run = pages if p0 == 0 and n == len(pages) else pages[p0: p0 + n]
            runs.append(run)
            if step == 1:  # (first page, count); whether each run so far starts after the last one
                spans.append((run.start, n))
                ordered = ordered and run.start > last
                last = run.stop - 1
            else:
                ordered = False
        ranges.append((off, off + length))
        starts.append(new)
        off += length
    if not (ordered or _disjoint_runs(runs)):
        return None
    # check_cache, check_same_pool and check_disjoint: contiguous pools of one shape whose bytes do not overlap
    dtype, device = k_cache.dtype, k_cache.device
    if not (dtype in FLOAT_DTYPES and v_cache.shape == shape and v_cache.dtype == dtype and v_cache.device == device
            and k_cache.is_contiguous() and v_cache.is_contiguous()):
        return None
    a, b, nbytes = k_cache.data_ptr(), v_cache.data_ptr(), k_cache.nbytes
    if nbytes and a < b + nbytes and b < a + nbytes:
        return None
    if type(rope) is not RopeConfig:
        layer_runs(rope, k_cache, v_cache)  # raises as `_compose` would (before any segment check)
    return Composed(off, ranges, starts, None, device=device, _runs=tuple(runs),
                    page_runs=tuple(spans) if len(spans) == len(runs) else None)


def _compose(k_cache, v_cache, segments, rope, layout="sequential", positions=None, dst_pages=None, backend=None,
             *, descending: bool = False, device_tables: bool = True) -> tuple[Composed, _Layout]:
    """`compose`, and its layout. ``descending``: a ``range`` of pages may also run downwards (step -1;
    `kvfuse.merge` passes the page lists of its sequences so). ``device_tables=False``: the page tables
    of the result are moved to the device on first use only (the host tables are all `kvfuse.merge`
    reads)."""
    out = _runs_only(k_cache, v_cache, segments, rope, layout, positions, dst_pages, descending)
    if out is not None:
        return out, _Layout([("reuse", r) for r in out._runs], [], [], 0)
    check_cache("k_cache", k_cache)
    check_cache("v_cache", v_cache)
    check_same_pool("k_cache", k_cache, "v_cache", v_cache)
    check_disjoint("k_cache", k_cache, "v_cache", v_cache)
    runs = layer_runs(rope, k_cache, v_cache)
    segments = _host_segments(segments, k_cache, descending)
    new_pos = _new_positions(segments, layout, positions)
    for i, (s, p) in enumerate(zip(segments, new_pos)):
        if p < 0 or p + s.length - 1 > MAX_POSITION:
            raise ValueError(f"segment {i}: new positions [{p}, {p + s.length}) overflow [0, {MAX_POSITION}]")
    page_size = k_cache.shape[-3]
    lay = _plan_layout(segments, page_size, new_pos)
    _check_moves(segments, lay, new_pos, rope, page_size)
    work = _backends(runs, lay, backend, k_cache.shape[-1]) if lay.copies or lay.rotations else []
    table, dst = _allocate(segments, lay, dst_pages, k_cache)
    # everything is validated: now write. Copies read sources before any in-place rotation.
    _write(work, segments, lay, table, new_pos, page_size, k_cache.device)
    ranges, off = [], 0
    for s in segments:
        ranges.append((off, off + s.length))
        off += s.length
    device = k_cache.device
    if isinstance(table, tuple):  # runs only, nothing copied: the tables are built on first use
        up = all(r.step == 1 for r in table)
        return Composed(off, ranges, new_pos, None, device=device, _runs=table,
                        page_runs=tuple([(r.start, len(r)) for r in table]) if up else None), lay
    reused = [p for k, p in lay.table if k == "reuse"]
    reused_t = torch.cat(reused).to(torch.int32) if reused else torch.empty(0, dtype=torch.int32)
    if not device_tables:
        new = to_device_async(dst.to(torch.int32), device) if dst.numel() else None
        return Composed(off, ranges, new_pos, new, device=device, _host=(table, reused_t)), lay
    out = to_device_async(torch.cat([table, dst.to(torch.int32), reused_t]), device)
    table_d, dst_d, reused_d = out.split([table.numel(), dst.numel(), reused_t.numel()])
    return Composed(off, ranges, new_pos, dst_d, device=device, _pages=table_d, _reused=reused_d,
                    _host=(table, reused_t)), lay


def _host_segments(segments, k_cache: torch.Tensor, descending: bool = False) -> list[SourceSegment]:
    """Validate the segments and return them with host page lists: int64 tensors, or runs (``range``s:
    those given, with ``descending`` also of step -1, and page tensors of consecutive ids in either
    direction, see `_as_run`). The page lists on the device come back in one transfer (the only device
    round trip; none for host page lists or runs)."""
    segments = list(segments)
    if not segments:
        raise ValueError("segments must not be empty")
    page_size, num_pages = k_cache.shape[-3], k_cache.shape[-4]
    host, on_dev = [], []
    for i, s in enumerate(segments):
        if not isinstance(s, SourceSegment):
            raise TypeError(f"segments[{i}] must be a kvfuse.SourceSegment, got {type(s).__name__}")
        if not (type(s.length) is int and type(s.start) is int and type(s.position) is int):
            for field in ("length", "start", "position"):
                val = getattr(s, field)
                if not isinstance(val, int) or isinstance(val, bool):
                    raise TypeError(f"segments[{i}].{field} must be an int, got {val!r}")
        pages = s.pages
        if type(pages) is range:
            if pages.step != 1 or (pages and not (0 <= pages.start and pages.stop <= num_pages)):
                if not (descending and pages.step == -1 and (not pages or 0 <= pages[-1] <= pages[0] < num_pages)):
                    _check_run(f"segments[{i}].pages", pages, num_pages)
        elif isinstance(pages, range):
            _check_run(f"segments[{i}].pages", pages, num_pages)
        else:
            check_tensor(f"segments[{i}].pages", pages, ndim=1, dtype=(torch.int32, torch.int64))
            if pages.device.type != "cpu":
                if pages.device != k_cache.device:
                    raise ValueError(f"segments[{i}].pages must be on {k_cache.device} or the CPU, got {pages.device}")
                on_dev.append(i)
        host.append(pages)
    if on_dev:
        fetched = torch.cat([segments[i].pages.to(torch.int64) for i in on_dev]).cpu()
        for i, h in zip(on_dev, fetched.split([segments[i].pages.numel() for i in on_dev])):
            host[i] = h
    out = []
    for i, (s, pages) in enumerate(zip(segments, host)):
        if not isinstance(pages, range):
            run = _as_run(pages, num_pages)
            if run is None:
                check_pages(f"segments[{i}].pages", pages, k_cache)
                pages = pages.to(torch.int64)
            else:
                pages = run
        if s.start < 0 or s.length < 0 or s.start + s.length > len(pages) * page_size:
            raise ValueError(f"segments[{i}]: tokens [{s.start}, {s.start + s.length}) do not fit its "
                             f"{len(pages)} pages of {page_size}")
        if s.position < 0 or s.position + s.length - 1 > MAX_POSITION:
            raise ValueError(f"segments[{i}].position={s.position} must keep its positions in [0, {MAX_POSITION}]")
        out.append(s if pages is s.pages else SourceSegment(pages, s.length, s.start, s.position, s.give_up))
    return out


def _as_run(pages: torch.Tensor, num_pages: int) -> range | None:
    """A host page tensor of consecutive ids in [0, num_pages), upwards or downwards, as a ``range`` (then
    every later check and table is O(1) per segment, as for runs given as ranges); None otherwise."""
    n = pages.numel()
    if not n:
        return None
    ids = pages.numpy()  # a host int tensor: shared, not copied (3x cheaper than the tensor ops)
    a, b = int(ids[0]), int(ids[-1])
    step = 1 if b >= a else -1
    if (b - a) * step != n - 1 or min(a, b) < 0 or max(a, b) >= num_pages:
        return None
    if n > 1 and not bool((ids[1:] - ids[:-1] == step).all()):
        return None
    return range(a, b + step, step)


def _check_run(name: str, pages: range, num_pages: int) -> None:
    if pages.step != 1 or (len(pages) and not (0 <= pages.start and pages.stop <= num_pages)):
        raise ValueError(f"{name} must be a range of consecutive page ids in [0, {num_pages}) (step 1), got {pages}")


def _check_moves(segments, lay: _Layout, new_pos, rope, page_size: int) -> None:
    """In-place rotations may not touch pages a kept segment still owns; moving needs a movable model."""
    def used(s):  # the pages holding the segment's tokens
        return s.pages[s.start // page_size: -(-(s.start + s.length) // page_size)]

    kept = [used(s) for s in segments if not s.give_up]
    if lay.rotations and kept:
        rotated = [used(segments[i]) for i in lay.rotations]
        if all(type(p) is range for p in rotated + kept):  # runs: compare the intervals
            spans = [_span(b) for b in kept if b]
            shared = any(lo <= b1 and b0 <= hi for lo, hi in (_span(a) for a in rotated if a) for b0, b1 in spans)
        else:
            shared = bool(torch.isin(torch.cat([_as_tensor(p) for p in rotated]),
                                     torch.cat([_as_tensor(p) for p in kept])).any())
        if shared:
            raise ValueError("a given-up segment that must be re-rotated in place shares pages with a segment "
                             "that is not given up; give up both or neither")
    if any(new_pos[i] != segments[i].position for i, _ in lay.copies) or lay.rotations:
        check_movable(rope)


def _backends(runs, lay: _Layout, backend, head_dim: int) -> list:
    """Per run of layers that rotate alike: ``(config, k view, v view, copy backend, rotation
    backend)``, every backend chosen before anything is written. A NoPE run (config None) copies
    with the identity rotation and rotates nothing."""
    work = []
    for cfg, kv, vv in runs:
        c = cfg or _identity(head_dim)
        copy_b = choose("compose_copy_", backend, k_cache=kv, rotary_dim=c.rotary_dim,
                        interleaved=c.interleaved) if lay.copies else None
        rot_b = choose("rerotate_", backend, k_cache=kv, rotary_dim=c.rotary_dim,
                       interleaved=c.interleaved) if lay.rotations and cfg is not None else None
        work.append((cfg, kv, vv, copy_b, rot_b))
    return work


def _identity(head_dim: int) -> RopeConfig:
    return RopeConfig(head_dim=head_dim, rotary_dim=2)  # rotated by 0 only: cos 1, sin 0 exactly


def _allocate(segments, lay: _Layout, dst_pages, k_cache) -> tuple[torch.Tensor, torch.Tensor]:
    """The composed page table and the destination pages used (read and validated only when the
    composition copies; pages taken from a `PagePool` are given back if the table is refused)."""
    if dst_pages is not None and not isinstance(dst_pages, (torch.Tensor, PagePool)):
        raise TypeError(f"dst_pages must be an int tensor of page ids or a kvfuse.PagePool, got "
                        f"{type(dst_pages).__name__}")
    pool = dst_pages if isinstance(dst_pages, PagePool) and lay.n_new else None
    if pool is not None and pool.num_pages > k_cache.shape[-4]:
        raise ValueError(f"dst_pages: the PagePool has {pool.num_pages} pages, the pools only {k_cache.shape[-4]}")
    if pool is not None:
        dst = pool.alloc(lay.n_new).cpu()
    elif dst_pages is None or isinstance(dst_pages, PagePool) or not lay.n_new:
        dst = _NO_PAGES
    else:
        check_pages("dst_pages", dst_pages, k_cache)
        dst = dst_pages.cpu()
    try:
        table = _page_table(segments, lay, dst, k_cache.shape[-4])
    except (ValueError, TypeError):
        if pool is not None:
            pool.free(dst)
        raise
    return table, (dst if dst.numel() == lay.n_new else dst[: lay.n_new])


_OFFSETS: dict = {}


def _offsets(page_size: int) -> torch.Tensor:
    """int64 ``[page_size]`` offsets within a page (read only)."""
    t = _OFFSETS.get(page_size)
    if t is None:
        t = _OFFSETS[page_size] = torch.arange(page_size, dtype=torch.int64)
    return t


def _slots_into(out: torch.Tensor, pages, start: int, length: int, page_size: int) -> None:
    """Write the int64 slots of tokens ``[start, start + length)`` of the sequence stored in ``pages``
    (a validated run of either direction, or an int64 host tensor) into ``out`` (``[length]``)."""
    if type(pages) is range and pages.step == 1:  # consecutive pages: consecutive slots
        first = pages.start * page_size + start
        torch.arange(first, first + length, out=out)
        return
    p0, off = divmod(start, page_size)
    n = -(-(off + length) // page_size)  # pages touched
    if type(pages) is range:
        top = pages[p0] * page_size
        base = torch.arange(top, top - n * page_size, -page_size)
    else:
        base = pages[p0: p0 + n] * page_size
    if off == 0 and length == n * page_size:  # whole pages
        torch.add(base[:, None], _offsets(page_size), out=out.view(n, page_size))
    else:
        out.copy_((base[:, None] + _offsets(page_size)).view(-1)[off: off + length])


def _tables(segments, new_pos, items, page_size: int, table, cfgs, device):
    """For ``items`` = [(segment index, composed offset)] and the configs of the layer runs (None: NoPE,
    rotated by 0): the int64 source slots of their tokens, their destination slots in ``table`` (an
    int64 host tensor; None when rotating in place), and per config ``(table rows, cos, sin)`` (int32
    ``[n]``; float32 ``[U, rotary_dim // 2]``, one row per distinct segment delta). All are built in one
    host buffer (pinned for a CUDA device, each table 16-byte aligned) that goes to ``device`` in one
    transfer.

    When the segments are runs of whole pages (the last may end in a partial page) and nothing is
    copied, the slots and rows are written page by page in two broadcast passes, whatever the
    number of segments."""
    segs = [segments[i] for i, _ in items]
    n = sum(s.length for s in segs)
    deltas = [new_pos[i] - s.position for (i, _), s in zip(items, segs)]
    uniq = sorted(set(deltas))
    confs = list(dict.fromkeys(cfgs))  # one cos/sin table per distinct config
    specs = [(c, uniq) if c is not None else (_identity(2), [0]) for c in confs]
    kinds = [k for k in (True, False) if any((c is not None) is k for c in confs)]  # idx: rows of uniq / zeros
    grid = table is None and all(type(s.pages) is range and s.start % page_size == 0 for s in segs) and all(
        s.length % page_size == 0 for s in segs[:-1])
    m = -(-n // page_size) * page_size if grid else n  # slots and rows of whole pages
    # the tables: (elements, dtype, shape); src and dst slots, the idx of each kind, cos and sin per config
    tabs = [(m, torch.int64, None)] + [(n, torch.int64, None)] * (table is not None) + [(m, torch.int32, None)] * len(
        kinds) + [(len(rows) * (c.rotary_dim // 2), torch.float32, (len(rows), c.rotary_dim // 2))
                  for c, rows in specs for _ in "cs"]
    sizes = [-(-count * dt.itemsize // 16) * 2 for count, dt, _ in tabs]  # in int64 units, 16-byte multiples
    buf = torch.empty(sum(sizes), dtype=torch.int64, pin_memory=device.type == "cuda")

    def views(base):
        out = []
        for part, (count, dt, shape) in zip(base.split(sizes), tabs):
            t = part if dt is torch.int64 else part.view(dt)
            t = t if t.numel() == count else t[:count]
            out.append(t if shape is None else t.view(shape))
        return out

    tabs_h = views(buf)
    slots, dst = tabs_h[0], (tabs_h[1] if table is not None else None)
    idx = tabs_h[1 + (table is not None): 1 + (table is not None) + len(kinds)]
    spread = len(uniq) > 1 and True in kinds  # table rows that differ between segments
    row = {d: r for r, d in enumerate(uniq)}
    if grid:  # per page: its first slot, then (rows that differ) its table row
        host = array.array("q")
        for s in segs:
            p0 = s.start // page_size
            run = s.pages[p0: p0 + -(-s.length // page_size)]
            host.extend(range(run.start * page_size, run.stop * page_size, run.step * page_size))
        if spread:
            for s, d in zip(segs, deltas):
                host += array.array("q", [row[d]]) * -(-s.length // page_size)
        first, *rows = torch.frombuffer(host, dtype=torch.int64).view(1 + spread, -1, 1)
        torch.add(first, _offsets(page_size), out=slots.view(-1, page_size))
        if spread:
            idx[0].view(-1, page_size).copy_(rows[0])
    else:
        at = 0
        for (_, off), s in zip(items, segs):
            _slots_into(slots[at: at + s.length], s.pages, s.start, s.length, page_size)
            if table is not None:
                _slots_into(dst[at: at + s.length], table, off, s.length, page_size)
            at += s.length
        if spread:
            at = 0
            for d, s in zip(deltas, segs):
                idx[0][at: at + s.length].fill_(row[d])
                at += s.length
    for k, t in zip(kinds, idx):
        if not (k and spread):
            t.zero_()
    cs = tabs_h[len(tabs) - 2 * len(specs):]
    for i, (c, rows) in enumerate(specs):
        tables_into(c, rows, cs[2 * i], cs[2 * i + 1])
    if device.type != "cpu":
        tabs_d = views(buf.to(device, non_blocking=device.type == "cuda"))
        slots, dst = tabs_d[0], (tabs_d[1] if table is not None else None)
        idx = tabs_d[1 + (table is not None): 1 + (table is not None) + len(kinds)]
        cs = tabs_d[len(tabs) - 2 * len(specs):]
    if m != n:
        slots, idx = slots[:n], [t[:n] for t in idx]
    meta = {c: (idx[kinds.index(c is not None)], cs[2 * i], cs[2 * i + 1]) for i, c in enumerate(confs)}
    return slots, dst, [meta[c] for c in cfgs]


def _write(work, segments, lay: _Layout, table, new_pos, page_size: int, device) -> None:
    """The copies (gather, rotate K, copy V into the destination pages), then the in-place rotations
    of given-up segments, per run of layers."""
    for copy, items in ((True, lay.copies), (False, [(i, None) for i in lay.rotations])):
        runs = [w for w in work if copy or w[0] is not None]  # a NoPE run rotates nothing in place
        if not items or not runs:
            continue
        pages = table.long() if copy else None
        src, dst, meta = _tables(segments, new_pos, items, page_size, pages, [w[0] for w in runs], device)
        for (cfg, kv, vv, copy_b, rot_b), (idx, cos, sin) in zip(runs, meta):
            c = cfg or _identity(kv.shape[-1])
            if copy:
                _ops.compose_copy_op(kv, vv, src, dst, idx, cos, sin, c.rotary_dim, c.interleaved, copy_b)
            else:
                _ops.rerotate_op(kv, src, idx, cos, sin, c.rotary_dim, c.interleaved, rot_b)
