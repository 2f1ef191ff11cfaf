"""compose: composed sequence against the dense oracle, zero-copy path, sources untouched, bad input."""

import dataclasses
import importlib

import pytest
import torch

import kvfuse
from kvfuse import SourceSegment
from kvfuse.reference import compose_dense
from tests.conftest import TOL, device_for, pool_randn, skip_unless_supported


def _pool(num_pages, page_size, heads, dim, dtype, dev, layers=None):
    shape = (num_pages, page_size, heads, dim) if layers is None else (layers, num_pages, page_size, heads, dim)
    return pool_randn(shape, dtype, dev), pool_randn(shape, dtype, dev)


def _make_segments(lengths, page_size, dev, start_pages=0, give_up=False, starts=None, positions=None):
    """Consecutive page runs for each segment, tokens starting at `starts[i]` within them."""
    segs, p = [], start_pages
    for i, n in enumerate(lengths):
        st = 0 if starts is None else starts[i]
        npages = max(1, -(-(st + n) // page_size))
        pages = torch.arange(p, p + npages, device=dev, dtype=torch.int32)
        p += npages
        pos = (positions[i] if positions else 100 * i + 7)
        segs.append(SourceSegment(pages, n, start=st, position=pos, give_up=give_up))
    return segs, p


CASES = {
    # name: (lengths, starts, page_size, give_up)
    "misaligned": ([13, 7, 0, 20], [0, 3, 0, 5], 8, False),
    "aligned-kept": ([16, 32, 8], None, 8, False),
    "aligned-given-up": ([16, 32, 11], None, 8, True),
    "page1": ([3, 4, 5], None, 1, False),
    "tail-compaction": ([5, 5, 5, 5], None, 4, True),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("layout", ["sequential", "shared"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("layers", [None, 2], ids=["flat", "stacked2"])
@pytest.mark.parametrize("pages_as", ["runs", "tensors"])
def test_compose_matches_dense_oracle(backend, case, layout, dtype, layers, pages_as, monkeypatch):
    """``pages_as="tensors"``: the page tensors (consecutive ids) are kept as tensors, not taken as runs."""
    if pages_as == "tensors":
        monkeypatch.setattr(importlib.import_module("kvfuse.compose"), "_as_run", lambda pages, num_pages: None)
    dev = device_for(backend)
    lengths, starts, ps, give_up = CASES[case]
    cfg = kvfuse.RopeConfig(head_dim=32, rotary_dim=24)
    segs, used = _make_segments(lengths, ps, dev, give_up=give_up, starts=starts)
    n_dst = kvfuse.pages_needed(segs, ps, layout=layout)
    k, v = _pool(used + n_dst + 3, ps, 3, 32, dtype, dev, layers)
    skip_unless_supported("compose_copy_", backend, k_cache=k, rotary_dim=24, interleaved=False)
    before_k, before_v = k.clone(), v.clone()
    src = [(s.pages, s.start, s.length, s.position) for s in segs]
    dst = torch.arange(used, used + n_dst + 3, device=dev, dtype=torch.int32).flip(0)
    out = kvfuse.compose(k, v, segs, cfg, layout=layout, dst_pages=dst, backend=backend)
    assert out.length == sum(lengths)
    firsts = [int(out.positions[a]) if b > a else 0 for a, b in out.ranges]
    want_k, want_v = compose_dense(before_k.double(), before_v.double(), src, firsts, cfg)
    got_k = kvfuse.gather_kv(k, out.pages, out.length)
    got_v = kvfuse.gather_kv(v, out.pages, out.length)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got_k.double(), want_k, atol=atol, rtol=rtol)
    assert torch.equal(got_v.double(), want_v)
    # positions follow the layout
    if layout == "shared":
        for (a, b), s in zip(out.ranges, segs):
            assert torch.equal(out.positions[a:b].cpu(), torch.arange(s.position, s.position + s.length))
    else:
        assert torch.equal(out.positions.cpu(), torch.arange(segs[0].position, segs[0].position + out.length))
    # only destination pages and given-up, moved segments may change
    changed_ok = set(out.new_pages.tolist())
    if give_up:
        for s in segs:
            changed_ok |= set(s.pages.tolist())
    for p in range(k.shape[-4]):
        if p not in changed_ok:
            assert torch.equal(k[..., p, :, :, :], before_k[..., p, :, :, :]), f"page {p} of k changed"
            assert torch.equal(v[..., p, :, :, :], before_v[..., p, :, :, :]), f"page {p} of v changed"
    # the composed page table is dense: ceil(length / page_size) pages
    assert out.pages.numel() == -(-out.length // ps)


def test_zero_copy_path_moves_no_data(backend):
    """Page-aligned, given-up segments: only page tables are concatenated and keys rotated in place."""
    dev = device_for(backend)
    cfg = kvfuse.RopeConfig(head_dim=16)
    segs, used = _make_segments([8, 16, 5], 4, dev, give_up=True, positions=[0, 0, 0])
    k, v = _pool(used + 2, 4, 2, 16, torch.float32, dev)
    skip_unless_supported("rerotate_", backend, k_cache=k, rotary_dim=16, interleaved=False)
    before_v = v.clone()
    src = [(s.pages, s.start, s.length, s.position) for s in segs]
    want_k, want_v = compose_dense(k.double(), v.double(), src, [0, 8, 24], cfg)
    out = kvfuse.compose(k, v, segs, cfg, dst_pages=torch.tensor([used, used + 1], device=dev), backend=backend)
    assert out.new_pages.numel() == 0
    assert torch.equal(out.pages.cpu(), torch.cat([s.pages for s in segs]).cpu())
    assert torch.equal(v, before_v)
    torch.testing.assert_close(kvfuse.gather_kv(k, out.pages, 29).double(), want_k, atol=1e-5, rtol=1e-5)


def test_shared_prefix_pages_are_reused_not_copied():
    cfg = kvfuse.RopeConfig(head_dim=16)
    prefix = SourceSegment(torch.tensor([0, 1]), 8, position=0)  # full pages, no move: shared read-only
    thread = SourceSegment(torch.tensor([2, 3]), 6, position=8)
    k, v = torch.randn(2, 6, 4, 1, 16).unbind(0)
    out = kvfuse.compose(k.clone(), v.clone(), [prefix, thread], cfg, dst_pages=torch.tensor([4, 5]))
    assert out.pages[:2].tolist() == [0, 1] and out.reused_pages.tolist() == [0, 1]


def test_empty_composition_segment_and_all_empty():
    cfg = kvfuse.RopeConfig(head_dim=16)
    k, v = torch.randn(2, 4, 4, 1, 16).unbind(0)
    out = kvfuse.compose(k, v, [SourceSegment(torch.tensor([0]), 0)], cfg)
    assert out.length == 0 and out.pages.numel() == 0


def _bad_compose():
    ok = [SourceSegment(torch.tensor([0, 1]), 6, position=0), SourceSegment(torch.tensor([2]), 3, position=0)]
    dst = torch.tensor([3, 4, 5])
    yield "page out of range", [SourceSegment(torch.tensor([0, 9]), 6), ok[1]], dst, ValueError, "pages"
    yield "range exceeds pages", [SourceSegment(torch.tensor([0]), 6), ok[1]], dst, ValueError, "do not fit"
    yield "dst overlaps source", ok, torch.tensor([2, 4, 5]), ValueError, "disjoint"
    yield "duplicate dst", ok, torch.tensor([3, 4, 4]), ValueError, "duplicate"
    yield "too few dst", ok, torch.tensor([4, 5]), ValueError, "copies into 3 pages"
    yield "dst out of range", ok, torch.tensor([3, 4, 6]), ValueError, "dst_pages"
    yield "negative position", [SourceSegment(torch.tensor([0, 1]), 6, position=-1), ok[1]], dst, ValueError, "position"
    yield "overflow", [SourceSegment(torch.tensor([0, 1]), 6, position=2**31 - 3), ok[1]], dst, ValueError, "position"
    yield "not a segment", [(torch.tensor([0]), 3)], dst, TypeError, "SourceSegment"
    yield "shared page twice", [SourceSegment(torch.tensor([0]), 4, give_up=True),
                                SourceSegment(torch.tensor([0]), 4, give_up=True)], dst, ValueError, "share"


@pytest.mark.parametrize("name,segs,dst,exc,match", list(_bad_compose()), ids=[x[0] for x in _bad_compose()])
def test_compose_rejects_and_leaves_pool_identical(name, segs, dst, exc, match):
    cfg = kvfuse.RopeConfig(head_dim=16)
    k, v = torch.randn(2, 6, 4, 1, 16).unbind(0)
    bk, bv = k.clone(), v.clone()
    with pytest.raises(exc, match=match):
        kvfuse.compose(k, v, segs, cfg, dst_pages=dst)
    assert torch.equal(k, bk) and torch.equal(v, bv)


def test_compose_rejects_mismatched_pools_and_layout():
    cfg = kvfuse.RopeConfig(head_dim=16)
    k = torch.randn(6, 4, 1, 16)
    seg = [SourceSegment(torch.tensor([0]), 3)]
    with pytest.raises(ValueError, match="v_cache"):
        kvfuse.compose(k, torch.randn(2, 6, 4, 1, 16), seg, cfg)
    with pytest.raises(ValueError, match="layout"):
        kvfuse.compose(k, k.clone(), seg, cfg, layout="interleaved")


def test_compose_from_page_pool_allocates_exactly():
    cfg = kvfuse.RopeConfig(head_dim=16)
    pool = kvfuse.PagePool(10, 4, 1, 16)
    pool.k_cache.normal_()
    pool.v_cache.normal_()
    a, b = pool.alloc(2), pool.alloc(1)
    segs = [SourceSegment(a, 5), SourceSegment(b, 3, position=0)]
    free = pool.num_free
    out = kvfuse.compose(pool.k_cache, pool.v_cache, segs, cfg, dst_pages=pool)
    assert pool.num_free == free - out.new_pages.numel() == free - 2


@pytest.mark.parametrize("runs", [False, True], ids=["tensors", "runs"])
def test_compose_rejects_rotating_a_page_a_kept_segment_owns(runs):
    cfg = kvfuse.RopeConfig(head_dim=16)
    k, v = torch.randn(2, 6, 4, 1, 16).unbind(0)
    bk = k.clone()
    kept = SourceSegment(range(0, 2) if runs else torch.tensor([0, 1]), 8, position=0)
    moved = SourceSegment(range(1, 2) if runs else torch.tensor([1]), 4, position=0, give_up=True)  # kept's page 1
    with pytest.raises(ValueError, match="shares pages"):
        kvfuse.compose(k, v, [kept, moved], cfg, dst_pages=torch.tensor([4, 5]))
    assert torch.equal(k, bk)
    apart = SourceSegment(range(2, 3) if runs else torch.tensor([2]), 4, position=0, give_up=True)
    out = kvfuse.compose(k, v, [kept, apart], cfg, dst_pages=torch.tensor([4, 5]))  # no shared page: allowed
    assert out.length == 12


def test_compose_pool_pages_not_leaked_when_backend_rejected():
    cfg = kvfuse.RopeConfig(head_dim=16)
    pool = kvfuse.PagePool(8, 4, 1, 16)
    a = pool.alloc(2)
    free = pool.num_free
    for bad, exc in (("cudnn", ValueError), ("cuda", kvfuse.BackendNotSupported)):
        with pytest.raises(exc):
            kvfuse.compose(pool.k_cache, pool.v_cache, [SourceSegment(a, 5, position=3)], cfg, dst_pages=pool,
                           backend=bad)
        assert pool.num_free == free


@pytest.mark.parametrize("field,value", [("length", 3.0), ("start", "0"), ("position", 1.5)])
def test_compose_rejects_non_int_segment_fields(field, value):
    cfg = kvfuse.RopeConfig(head_dim=16)
    k, v = torch.randn(2, 6, 4, 1, 16).unbind(0)
    seg = SourceSegment(torch.tensor([0, 1]), 6)
    setattr(seg, field, value)
    with pytest.raises(TypeError, match=f"segments\\[0\\].{field}"):
        kvfuse.compose(k, v, [seg], cfg, dst_pages=torch.tensor([4, 5]))


def test_compose_rejects_float_positions_and_bad_layout_with_positions():
    cfg = kvfuse.RopeConfig(head_dim=16)
    k, v = torch.randn(2, 6, 4, 1, 16).unbind(0)
    seg = [SourceSegment(torch.tensor([0, 1]), 6)]
    with pytest.raises(TypeError, match="positions"):
        kvfuse.compose(k, v, seg, cfg, positions=[7.9], dst_pages=torch.tensor([4, 5]))
    with pytest.raises(ValueError, match="layout"):
        kvfuse.compose(k, v, seg, cfg, positions=[7], layout="bogus", dst_pages=torch.tensor([4, 5]))


def test_page_pool_free_rejects_duplicates():
    pool = kvfuse.PagePool(4, 2, 1, 8)
    a = pool.alloc(2)
    with pytest.raises(ValueError, match="duplicate"):
        pool.free(torch.cat([a[:1], a[:1]]))
    assert pool.num_free == 2


def _as_runs(segs):
    return [dataclasses.replace(s, pages=range(int(s.pages[0]), int(s.pages[-1]) + 1)) for s in segs]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("layout", ["shared", "sequential"])
def test_page_runs_compose_like_page_tensors(case, layout, monkeypatch):
    """Segments whose pages are ranges compose exactly as the same pages given as tensors (copies,
    in-place rotations, zero copy), and a zero-copy composition of runs keeps its table as runs."""
    lengths, starts, ps, give_up = CASES[case]
    k, v = _pool(40, ps, 2, 16, torch.float32, torch.device("cpu"))
    segs, used = _make_segments(lengths, ps, "cpu", give_up=give_up, starts=starts)
    cfg = kvfuse.RopeConfig(head_dim=16)
    outs = []
    compose_mod = importlib.import_module("kvfuse.compose")
    for s in (segs, _as_runs(segs)):
        kk, vv = k.clone(), v.clone()
        dst = torch.arange(used, 40, dtype=torch.int32)
        with monkeypatch.context() as m:
            if s is segs:  # the page tensors as tensors (consecutive ids are otherwise taken as runs)
                m.setattr(compose_mod, "_as_run", lambda pages, num_pages: None)
            out = kvfuse.compose(kk, vv, s, cfg, layout=layout, dst_pages=dst, backend="torch")
        outs.append((kk, vv, out))
    (k0, v0, a), (k1, v1, b) = outs
    assert torch.equal(k0, k1) and torch.equal(v0, v1)
    for f in ("pages", "new_pages", "reused_pages", "positions"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert (a.length, a.ranges, a.starts) == (b.length, b.ranges, b.starts)
    assert a.page_runs is None and (b.page_runs is not None) == (b.new_pages.numel() == 0)
    for out in (a, b):  # the host copies of the tables are the tables
        assert out.host_pages.device.type == "cpu" and out.host_pages.dtype == torch.int32
        assert torch.equal(out.host_pages, out.pages.cpu())
        assert torch.equal(out.host_reused_pages, out.reused_pages.cpu())


@pytest.mark.parametrize("give_up", [True, False])
@pytest.mark.parametrize("layout", ["sequential", "shared"])
def test_consecutive_page_tensors_compose_as_runs(layout, give_up, monkeypatch):
    """Page tensors of consecutive ids (either direction) are composed as runs, with the same result as
    the tensor path (taken when `_as_run` declines): K/V, every table. A gap or a swap keeps the tensor
    path."""
    import importlib

    compose_mod = importlib.import_module("kvfuse.compose")
    as_run = compose_mod._as_run
    k, v = _pool(64, 4, 2, 16, torch.float32, torch.device("cpu"))
    cfg = kvfuse.RopeConfig(head_dim=16)
    lists = [[0, 1, 2], [9, 8, 7, 6], [20, 21, 23], [30, 32, 31], [40]]
    lens = [12, 16, 10, 9, 3]
    outs, seen = [], []
    for runs in (True, False):
        monkeypatch.setattr(compose_mod, "_as_run", (lambda p, n: seen.append(r := as_run(p, n)) or r) if runs
                            else (lambda p, n: None))
        segs = [SourceSegment(torch.tensor(p, dtype=torch.int32), n, position=0, give_up=give_up)
                for p, n in zip(lists, lens)]
        kk, vv = k.clone(), v.clone()
        out = kvfuse.compose(kk, vv, segs, cfg, layout=layout, dst_pages=torch.arange(50, 63), backend="torch")
        outs.append((kk, vv, out))
    assert seen == [range(0, 3), range(9, 5, -1), None, None, range(40, 41)]
    (k0, v0, a), (k1, v1, b) = outs
    assert torch.equal(k0, k1) and torch.equal(v0, v1)
    for f in ("pages", "new_pages", "reused_pages", "positions", "host_pages", "host_reused_pages"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert (a.length, a.ranges, a.starts) == (b.length, b.ranges, b.starts)


def test_consecutive_page_tensors_become_runs():
    """Which page tensors are taken as runs: consecutive ids in the pool, upwards or downwards; a tensor
    out of the pool is still refused with its message."""
    import importlib

    compose_mod = importlib.import_module("kvfuse.compose")
    as_run = compose_mod._as_run
    t = lambda *p: torch.tensor(p, dtype=torch.int32)  # noqa: E731
    assert as_run(t(3, 4, 5), 10) == range(3, 6)
    assert as_run(t(5, 4, 3), 10) == range(5, 2, -1)
    assert as_run(t(7), 10) == range(7, 8)
    assert as_run(torch.tensor([2, 3], dtype=torch.int64), 10) == range(2, 4)
    for bad in (t(3, 5, 4), t(3, 4, 6), t(3, 3, 4), t(8, 9, 10), t(-1, 0, 1), t(3, 5, 4, 6), t(6, 4, 5, 3)):
        assert as_run(bad, 10) is None, bad
    assert as_run(t(), 10) is None
    k, v = _pool(8, 4, 1, 8, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"page ids in \[0, 8\)"):
        kvfuse.compose(k, v, [SourceSegment(t(7, 8), 8, position=0)], kvfuse.RopeConfig(head_dim=8), layout="shared")


def test_composed_of_runs_built_by_hand():
    """A `Composed` made from page runs with no device builds its tables on the CPU."""
    c = kvfuse.Composed(8, [(0, 8)], [0], None, page_runs=((3, 2), (9, 1)))
    for t in (c.pages, c.reused_pages, c.host_pages, c.host_reused_pages):
        assert t.tolist() == [3, 4, 9] and t.dtype == torch.int32 and t.device.type == "cpu"


def test_zero_copy_of_page_runs_is_runs():
    k, v = _pool(64, 4, 1, 8, torch.float32, torch.device("cpu"))
    segs = [SourceSegment(range(0, 10), 40, position=0, give_up=True), SourceSegment(range(20, 30), 37, position=0,
                                                                                        give_up=True)]
    out = kvfuse.compose(k, v, segs, kvfuse.RopeConfig(head_dim=8), layout="shared")
    assert out.page_runs == ((0, 10), (20, 10)) and out.length == 77
    assert out.pages.tolist() == list(range(10)) + list(range(20, 30)) and out.pages.dtype == torch.int32
    assert torch.equal(out.reused_pages, out.pages) and out.new_pages.numel() == 0


@pytest.mark.parametrize("pages,match", [
    ((range(0, 10), range(9, 12)), "duplicate page ids"),
    ((range(0, 10, 2), range(20, 22)), "range of consecutive page ids"),
    ((range(0, 10), range(60, 70)), r"range of consecutive page ids in \[0, 64\)"),
], ids=["overlap", "step", "out-of-pool"])
def test_page_runs_are_validated(pages, match):
    k, v = _pool(64, 4, 1, 8, torch.float32, torch.device("cpu"))
    before = k.clone(), v.clone()
    segs = [SourceSegment(p, 4 * len(p), give_up=True) for p in pages]
    with pytest.raises(ValueError, match=match):
        kvfuse.compose(k, v, segs, kvfuse.RopeConfig(head_dim=8), layout="shared")
    assert torch.equal(k, before[0]) and torch.equal(v, before[1])



def _outcome(fn):
    """``fn(k, v)`` on fresh pools: (result, k, v), or (error type, message)."""
    k, v = (torch.randn(24, 4, 1, 8, generator=torch.Generator().manual_seed(i)) for i in (0, 1))
    try:
        return fn(k, v), k, v
    except (TypeError, ValueError) as e:
        return type(e), str(e)


def _random_case(g, descending):
    """A random composition of runs that moves and copies nothing (pages ascending, or also descending),
    and then one random change or none: a move, a copy, a bad run, tokens that do not fit, an overlap,
    a bad layout / positions / dst pages / pools / rope, or a valid variant."""
    def num(lo, hi):
        return int(torch.randint(lo, hi, (1,), generator=g))

    def pick(*xs):
        return xs[num(0, len(xs))]

    segs, p, count = [], 0, num(1, 5)
    for i in range(count):
        n = num(0, 4)
        run = range(p, p + n) if not descending or num(0, 2) else range(p + n - 1, p - 1, -1)
        length = 4 * n - (num(0, 4) if n and i == count - 1 else 0)  # a given-up tail may end in a partial page
        segs.append(SourceSegment(run, length, 0, pick(0, 0, 9), give_up=pick(True, length % 4 == 0 or num(0, 4) == 0)))
        p += n + num(0, 2)
    layout, positions, dst, pools, cfg = "shared", None, lambda: None, lambda k, v: (k, v), kvfuse.RopeConfig(8)
    rope, which, i = cfg, num(0, 16), num(0, len(segs))  # which > 11: as it is
    s = segs[i]

    def seg(**kw):
        segs[i] = dataclasses.replace(s, **kw)

    if which == 0:
        seg(length=pick(-1, s.length + 1, 4 * len(s.pages) + 1, max(0, s.length - 1), num(0, 16), True))
    elif which == 1:
        seg(start=pick(-1, 1, 2, 4, True, 1.0), length=max(0, s.length - pick(0, 1, 4)))
    elif which == 2:
        seg(position=pick(-1, 2**31 - 2, 2**31 - 1 - max(0, s.length - 1), True, 1.0, s.position + 1))
    elif which == 3:
        seg(give_up=not s.give_up)
    elif which == 4:
        a, n = s.pages.start, len(s.pages)
        seg(pages=pick(range(a, a + 2 * n, 2), range(-1, n - 1), range(24 - n + 1, 25), range(22, 26),
                       range(a + n - 1, a - 1, -1), range(25, 22, -1), range(n - 1, -2, -1), range(5, 3),
                       range(max(0, a - 1), a + n - 1), torch.arange(a, a + n), list(range(a, a + n))))
    elif which == 5:
        segs[i] = pick((s.pages, s.length), None, s)  # not a segment, or one twice
        if segs[i] is s:
            segs.append(s)
    elif which == 6:
        layout = pick("sequential", "other", None, ["shared"])
    elif which == 7:
        positions = pick([t.position for t in segs], tuple(t.position for t in segs), [t.position for t in segs][1:],
                         [float(t.position) for t in segs], [t.position + 1 for t in segs], [0] * len(segs),
                         [t.position == 1 for t in segs], iter)
    elif which == 8:
        dst = pick(lambda: torch.arange(20, 24), lambda: kvfuse.PagePool(24, 4, 1, 8), lambda: "pages",
                   lambda: kvfuse.PagePool(25, 4, 1, 8), lambda: torch.arange(2))
    elif which == 9:
        pools = pick(lambda k, v: (k, k), lambda k, v: (k, v.double()), lambda k, v: (k.transpose(1, 2), v),
                     lambda k, v: (k[..., 0], v[..., 0]), lambda k, v: (k.long(), v.long()),
                     lambda k, v: (k[:-1], k.view(-1)[32:].view(23, 4, 1, 8)), lambda k, v: (k[:12], k[12:]),
                     lambda k, v: (k[None, None], v[None, None]), lambda k, v: (k, v[:-1]),
                     lambda k, v: (k, v.to("meta")),
                     lambda k, v: (k.transpose(0, 1).contiguous().transpose(0, 1), v),
                     lambda k, v: (k, v.transpose(0, 1).contiguous().transpose(0, 1)),
                     lambda k, v: (k.view(2, 12, 4, 1, 8), v.view(2, 12, 4, 1, 8)), lambda k, v: (k.half(), v.half()))
    elif which == 10:
        rope = pick(kvfuse.RopeConfig(head_dim=16), "rope", kvfuse.ModelRope((cfg, None)),
                    kvfuse.ModelRope((kvfuse.RopeConfig(16),)))
        if num(0, 2):
            pools = lambda k, v: (k.view(2, 12, 4, 1, 8), v.view(2, 12, 4, 1, 8))  # noqa: E731
    listed = list(segs)
    if which == 11:
        segs = pick(tuple(segs), [], iter)

    def fresh(xs, of):  # an iterator is used up by one call: a new one per call
        return (lambda: iter(of)) if xs is iter else (lambda: xs)

    return fresh(segs, listed), layout, fresh(positions, [getattr(t, "position", 0) for t in listed]), dst, pools, rope


def _listed(table):
    return [(kind, p if type(p) is int else list(p) if type(p) is range else p.tolist()) for kind, p in table]


@pytest.mark.parametrize("descending", [False, True])
def test_compose_of_runs_fast_path_is_the_general_path(monkeypatch, descending):
    """Compositions of runs that move and copy nothing are built from ints and ranges alone: on random
    segments that gives what the general path gives, and every input refused there goes to the
    general path, which raises the same errors (before writing anything)."""
    comp = importlib.import_module("kvfuse.compose")
    g = torch.Generator().manual_seed(7 + descending)
    taken = 0
    for trial in range(2000):
        case = segs, layout, positions, dst, pools, rope = _random_case(g, descending)

        def run(k, v, case=case):
            segs, layout, positions, dst, pools, rope = case
            return comp._compose(*pools(k, v), segs(), rope, layout, positions(), dst(), "torch",
                                 descending=descending)

        fast = _outcome(run)
        with monkeypatch.context() as m:
            m.setattr(comp, "_runs_only", lambda *a, **kw: None)
            ref = _outcome(run)
        assert len(fast) == len(ref) and (len(ref) == 3 or fast == ref), (trial, fast, ref)
        if len(ref) == 2:
            continue
        (a, la), ka, va = fast
        (b, lb), kb, vb = ref
        assert torch.equal(ka, kb) and torch.equal(va, vb), trial
        assert (_listed(la.table), la.copies, la.rotations, la.n_new) == (
            _listed(lb.table), lb.copies, lb.rotations, lb.n_new), trial
        for f in ("length", "ranges", "starts", "page_runs", "_runs", "device"):
            assert getattr(a, f) == getattr(b, f), (trial, f)
        for f in ("pages", "new_pages", "reused_pages", "host_pages", "host_reused_pages", "positions"):
            x, y = getattr(a, f), getattr(b, f)
            assert x.dtype == y.dtype and torch.equal(x, y), (trial, f)
        if comp._runs_only(*pools(ka, va), segs(), rope, layout, positions(), dst(), descending) is not None:
            taken += 1
            if not descending:  # kvfuse.compose takes the same path
                with monkeypatch.context() as m:
                    m.setattr(comp, "_compose", None)
                    out = kvfuse.compose(*pools(ka, va), segs(), rope, layout=layout, positions=positions(),
                                         dst_pages=dst())
                assert (out.length, out.ranges, out.starts, out._runs) == (a.length, a.ranges, a.starts, a._runs)
    assert taken > 600
