"""Compose several sequences' paged KV into one sequence."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import torch

from kvfuse import _ops
from kvfuse._checks import check_cache, check_disjoint, check_same_pool, check_tensor, check_unique
from kvfuse.dispatch import choose
from kvfuse.paged import PagePool, check_pages, slots_of, to_device_async
from kvfuse.rerotate import check_movable, layer_runs
from kvfuse.rope import MAX_POSITION, ModelRope, RopeConfig

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
    zero-copy composition costs metadata only. When every segment's pages were runs (``range``) and
    nothing was copied, ``page_runs`` lists the page table as ``(first page, count)`` runs and ``pages`` /
    ``reused_pages`` are built on first use too (``page_runs`` is None otherwise). ``host_pages`` /
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

    def __post_init__(self):
        if self.new_pages is None:
            self.new_pages = _no_pages(self.device)

    @functools.cached_property
    def pages(self) -> torch.Tensor:
        return self._pages if self._pages is not None else _runs_tensor(self.page_runs, self.device)

    @functools.cached_property
    def reused_pages(self) -> torch.Tensor:
        return self._reused if self._reused is not None else _runs_tensor(self.page_runs, self.device)

    @functools.cached_property
    def host_pages(self) -> torch.Tensor:
        if self._host is not None:
            return self._host[0]
        return _runs_tensor(self.page_runs, "cpu") if self.page_runs is not None else self.pages.cpu()

    @functools.cached_property
    def host_reused_pages(self) -> torch.Tensor:
        if self._host is not None:
            return self._host[1]
        return _runs_tensor(self.page_runs, "cpu") if self.page_runs is not None else self.reused_pages.cpu()

    @functools.cached_property
    def positions(self) -> torch.Tensor:
        parts = [torch.arange(p, p + (b - a), dtype=torch.int64) for (a, b), p in zip(self.ranges, self.starts)]
        return (torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)).to(self.pages.device)


_NO_PAGES = torch.empty(0, dtype=torch.int32)  # read only
_EMPTY: dict = {}


def _no_pages(device) -> torch.Tensor:
    """An empty int32 tensor on ``device`` (one per device: nothing can be written into it)."""
    t = _EMPTY.get(device)
    if t is None:
        t = _EMPTY[device] = torch.empty(0, dtype=torch.int32, device=device)
    return t


def _runs_tensor(runs, device) -> torch.Tensor:
    """int32 page ids of ``(first, count)`` runs, on ``device``."""
    if not runs:
        return torch.empty(0, dtype=torch.int32, device=device)
    return torch.cat([torch.arange(a, a + n, dtype=torch.int32) for a, n in runs]).to(device)


def _as_tensor(pages) -> torch.Tensor:
    """A segment's page list as a host int64 tensor (a run materialised)."""
    if isinstance(pages, range):
        return torch.arange(pages.start, pages.stop, dtype=torch.int64)
    return pages


def _disjoint_runs(runs) -> bool:
    """Whether ``(first, count)`` runs share no page (sorted once: O(runs log runs))."""
    last = -1
    for a, n in sorted(r for r in runs if r[1]):
        if a <= last:
            return False
        last = a + n - 1
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
    (nothing copied) the table as ``(first, count)`` runs."""
    if not lay.n_new and all(type(p) is range for _, p in lay.table):
        runs = tuple([(p.start, len(p)) for _, p in lay.table])
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
    check_cache("k_cache", k_cache)
    check_cache("v_cache", v_cache)
    check_same_pool("k_cache", k_cache, "v_cache", v_cache)
    check_disjoint("k_cache", k_cache, "v_cache", v_cache)
    runs = layer_runs(rope, k_cache, v_cache)
    segments = _host_segments(segments, k_cache)
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
    if isinstance(table, tuple):  # runs only, nothing copied: the tables are built on first use
        return Composed(off, ranges, new_pos, None, page_runs=table, device=k_cache.device)
    reused = [p for k, p in lay.table if k == "reuse"]
    reused_t = torch.cat(reused).to(torch.int32) if reused else torch.empty(0, dtype=torch.int32)
    out = to_device_async(torch.cat([table, dst.to(torch.int32), reused_t]), k_cache.device)
    table_d, dst_d, reused_d = out.split([table.numel(), dst.numel(), reused_t.numel()])
    return Composed(off, ranges, new_pos, dst_d, device=k_cache.device, _pages=table_d, _reused=reused_d,
                    _host=(table, reused_t))


def _host_segments(segments, k_cache: torch.Tensor) -> list[SourceSegment]:
    """Validate the segments and return them with host page lists (int64 tensors, or runs). The page
    lists on the device come back in one transfer (the only device round trip; none for host page
    lists or runs)."""
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
                _check_run(f"segments[{i}].pages", pages, num_pages)
        elif isinstance(pages, range):
            _check_run(f"segments[{i}].pages", pages, num_pages)
        else:
            check_tensor(f"segments[{i}].pages", pages, ndim=1, dtype=(torch.int32, torch.int64))
            if pages.device.type != "cpu":
                if pages.device != k_cache.device:
                    raise ValueError(f"segments[{i}].pages must be on {k_cache.device} or the CPU, got {pages.device}")
                on_dev.append(i)
            elif pages.dtype != torch.int64:
                pages = pages.to(torch.int64)
        host.append(pages)
    if on_dev:
        fetched = torch.cat([segments[i].pages.to(torch.int64) for i in on_dev]).cpu()
        for i, h in zip(on_dev, fetched.split([segments[i].pages.numel() for i in on_dev])):
            host[i] = h
    out = []
    for i, (s, pages) in enumerate(zip(segments, host)):
        if not isinstance(pages, range):
            check_pages(f"segments[{i}].pages", pages, k_cache)
        if s.start < 0 or s.length < 0 or s.start + s.length > len(pages) * page_size:
            raise ValueError(f"segments[{i}]: tokens [{s.start}, {s.start + s.length}) do not fit its "
                             f"{len(pages)} pages of {page_size}")
        if s.position < 0 or s.position + s.length - 1 > MAX_POSITION:
            raise ValueError(f"segments[{i}].position={s.position} must keep its positions in [0, {MAX_POSITION}]")
        out.append(s if pages is s.pages else dataclasses.replace(s, pages=pages))
    return out


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
            shared = any(a and b and a.start < b.stop and b.start < a.stop for a in rotated for b in kept)
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


def _slots_and_moves(segments, new_pos, items, page_size: int, table: torch.Tensor | None):
    """For ``items`` = [(segment index, composed offset)]: the int64 source slots of their tokens,
    their destination slots in ``table`` (None when rotating in place) and [(tokens, delta)]."""
    src, dst, moves = [], [], []
    for i, off in items:
        s = segments[i]
        if type(s.pages) is range:  # consecutive pages: consecutive slots (the range was validated)
            first = s.pages.start * page_size + s.start
            src.append(torch.arange(first, first + s.length, dtype=torch.int64))
        else:
            src.append(slots_of(_as_tensor(s.pages), s.start, s.length, page_size))
        if table is not None:
            dst.append(slots_of(table, off, s.length, page_size))
        moves.append((s.length, new_pos[i] - s.position))
    return torch.cat(src), (torch.cat(dst) if table is not None else None), moves


def _write(work, segments, lay: _Layout, table, new_pos, page_size: int, device) -> None:
    """The copies (gather, rotate K, copy V into the destination pages), then the in-place rotations
    of given-up segments, per run of layers."""
    for copy, items in ((True, lay.copies), (False, [(i, None) for i in lay.rotations])):
        if not items:
            continue
        src, dst, moves = _slots_and_moves(segments, new_pos, items, page_size, table if copy else None)
        slots = to_device_async(torch.stack([src, dst]) if copy else src[None], device)
        for cfg, kv, vv, copy_b, rot_b in work:
            if cfg is None and not copy:
                continue  # a NoPE run: nothing to rotate
            c = cfg or _identity(kv.shape[-1])
            idx, cos, sin = _to_device(*_rotation_meta(c, moves if cfg is not None else [(n, 0) for n, _ in moves]),
                                       device)
            if copy:
                _ops.compose_copy_op(kv, vv, slots[0], slots[1], idx, cos, sin, c.rotary_dim, c.interleaved, copy_b)
            else:
                _ops.rerotate_op(kv, slots[0], idx, cos, sin, c.rotary_dim, c.interleaved, rot_b)


def _to_device(idx, cos, sin, device):
    """The per-token table rows (int32) and the cos/sin tables on ``device``, in two copies."""
    tables = to_device_async(torch.stack([cos, sin]), device)
    return to_device_async(idx.to(torch.int32), device), tables[0], tables[1]


def _rotation_meta(rope: RopeConfig, moves: list[tuple[int, int]]):
    """Per-token table rows and the cos/sin tables of the distinct deltas of ``moves`` = [(tokens,
    delta)] (one delta per segment: the tables have one row per distinct segment delta)."""
    deltas = sorted({d for _, d in moves})
    row = {d: r for r, d in enumerate(deltas)}
    cos, sin, _ = rope.rotation_tables(torch.tensor(deltas, dtype=torch.int64))  # rows in sorted order
    idx = torch.cat([torch.full((n,), row[d], dtype=torch.int64) for n, d in moves])
    return idx, cos, sin

