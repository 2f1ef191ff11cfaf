"""merge's shortcuts against the general paths: page runs of either direction against page tensors, the
grid-built slot and rotation tables against per-segment ones and `RopeConfig.rotation_tables`, the
shared-prefix hand-over against an independent replay of `incref` + `release`; bad input still
raises before anything changes."""

import random

import pytest
import torch

import kvfuse
from kvfuse import PagedKVStore
from kvfuse.compose import _as_tensor, _tables
from kvfuse.paged import host_ints, slots_of

L, H, D = 3, 2, 16
ROPE = kvfuse.RopeConfig(head_dim=D, rotary_dim=12, theta=1000.0)
ROPES = {
    "uniform": ROPE,
    "mixed": kvfuse.ModelRope((ROPE, None, kvfuse.RopeConfig(head_dim=D, theta=5e5))),  # a NoPE layer between
}


def _world(seed: int, rope, num_pages: int = 96):
    """A store whose free list is shuffled in runs (page lists come out ascending, descending or
    scattered), a prefix (maybe none, maybe ending mid-page), threads of random lengths (0 and partial
    pages included), one of them maybe also forked elsewhere (its pages then shared)."""
    rnd = random.Random(seed)
    ps = rnd.choice([1, 3, 4])
    s = PagedKVStore(L, num_pages, ps, H, D, rope=rope)
    s.k_cache.copy_(torch.randn(s.k_cache.shape, generator=torch.Generator().manual_seed(seed)))
    s.v_cache.copy_(torch.randn(s.v_cache.shape, generator=torch.Generator().manual_seed(seed + 1)))
    runs, free = [], list(s._free)
    while free:
        n = rnd.randint(1, 12)
        run, free = free[:n], free[n:]
        runs.append(run[::-1] if rnd.random() < 0.5 else run)
    rnd.shuffle(runs)
    s._free = [p for r in runs for p in r]
    gen = torch.Generator().manual_seed(seed + 2)

    def kv(n):
        return torch.randn(L, n, H, D, generator=gen), torch.randn(L, n, H, D, generator=gen)

    prefix = s.sequence("prefix", position=rnd.randint(0, 50))
    n_pre = rnd.choice([0, 2 * ps, 3 * ps + 1, 7])
    if n_pre:
        prefix.append_kv(*kv(n_pre))
    threads = kvfuse.fork(prefix, rnd.randint(1, 4))
    for t in threads:
        n = rnd.choice([0, ps, 2 * ps, rnd.randint(1, 4 * ps)])
        if n:
            t.append_kv(*kv(n))
    extra = kvfuse.fork(threads[rnd.randrange(len(threads))], 1) if rnd.random() < 0.3 else []
    return s, prefix, threads, extra, rnd


def _replay(rc, free, merged_pages, threads_pages, release):
    """What `merge` must do to the counts and the free list, by the documented semantics: the pages it
    did not allocate are taken over (one reference more each), then each thread is released in order."""
    rc, free = list(rc), list(free)
    new = [p for p in merged_pages if rc[p] == 0]
    assert new == free[::-1][: len(new)]  # allocated from the end of the free list, in table order
    del free[len(free) - len(new):]
    for p in new:
        rc[p] = 1
    for p in merged_pages:
        if p not in new:
            rc[p] += 1
    if release:
        for pages in threads_pages:
            for p in pages:
                rc[p] -= 1
                if rc[p] == 0:
                    free.append(p)
    return rc, free


def _hand_over_shared(store, shared, freed, release):
    """`PagedKVStore._hand_over_shared` by its contract, through the general `_hand_over`."""
    out = set(freed)
    own = [[p for p in seq.pages[len(shared):] if p not in out] for seq in release]
    store._hand_over([list(shared), *own], release)


def _merge(seed, rope, layout, keep, general, monkeypatch):
    s, prefix, threads, extra, _ = _world(seed, rope)
    rc, free, pages = list(s.refcount), list(s._free), [list(t.pages) for t in threads]
    with monkeypatch.context() as m:
        if general:  # page lists as tensors, every reference moved one by one
            m.setattr(kvfuse.threads, "_page_arg", lambda p: torch.tensor(p, dtype=torch.int32))
            m.setattr(PagedKVStore, "_hand_over_shared", _hand_over_shared)
        merged = kvfuse.merge(threads, layout, keep_threads=keep, backend="torch")
    assert (list(s.refcount), list(s._free)) == _replay(rc, free, merged.pages, pages, not keep)
    return s, merged


@pytest.mark.parametrize("rope", list(ROPES))
@pytest.mark.parametrize("keep", [False, True], ids=["give-up", "keep"])
@pytest.mark.parametrize("layout", ["sequential", "shared"])
def test_merge_shortcuts_match_the_general_path(layout, keep, rope, monkeypatch):
    for seed in range(12):
        a, ma = _merge(seed, ROPES[rope], layout, keep, False, monkeypatch)
        b, mb = _merge(seed, ROPES[rope], layout, keep, True, monkeypatch)
        assert torch.equal(a.k_cache, b.k_cache) and torch.equal(a.v_cache, b.v_cache), seed
        assert (ma.pages, ma.segments) == (mb.pages, mb.segments), seed
        assert (a.refcount, a._free) == (b.refcount, b._free), seed


def _reference_tables(segments, new_pos, items, ps, table, cfgs):
    """The slot and rotation tables as `compose` built them per segment: slots_of, rotation_tables."""
    src = torch.cat([slots_of(_as_tensor(segments[i].pages), segments[i].start, segments[i].length, ps)
                     for i, _ in items])
    dst = None if table is None else torch.cat([slots_of(table, off, segments[i].length, ps) for i, off in items])
    delta = torch.cat([torch.full((segments[i].length,), new_pos[i] - segments[i].position) for i, _ in items])
    meta = []
    for c in cfgs:
        cfg = c or kvfuse.RopeConfig(head_dim=2, rotary_dim=2)
        cos, sin, idx = cfg.rotation_tables(delta if c is not None else torch.zeros_like(delta))
        meta.append((idx, cos, sin))
    return src, dst, meta


@pytest.mark.parametrize("seed", range(20))
def test_slot_and_rotation_tables(seed):
    """Grid-built (runs of whole pages, either direction) and per-segment tables (tensors, partial
    pages, copies) equal the per-segment reference exactly."""
    rnd = random.Random(seed)
    ps = rnd.choice([1, 3, 4, 16])
    other = kvfuse.RopeConfig(head_dim=D, theta=5e5, rope_type="linear", factor=2.0)
    cfgs = rnd.choice([[ROPE], [ROPE, None, other, ROPE], [None]])
    segments, new_pos, items, at, off = [], [], [], 200, 0
    runs = rnd.random() < 0.7
    for i in range(rnd.randint(1, 5)):
        n_pages = rnd.randint(1, 5)
        length = n_pages * ps - (rnd.randrange(ps) if i == 4 or rnd.random() < 0.2 else 0)
        start = 0 if runs or rnd.random() < 0.5 else rnd.randrange(ps)
        n_pages += -(-start // ps) + 1
        up = rnd.random() < 0.5
        pages = range(at, at + n_pages) if up else range(at + n_pages - 1, at - 1, -1)
        at += n_pages + rnd.randint(0, 3)
        segments.append(kvfuse.SourceSegment(pages if runs else _as_tensor(pages), length, start,
                                             rnd.randint(0, 1000)))
        new_pos.append(rnd.choice([segments[-1].position, rnd.randint(0, 5000)]))
        items.append((i, off))
        off += length
    table = None if rnd.random() < 0.5 else torch.arange(500, 500 + -(-off // ps) + 1)
    got = _tables(segments, new_pos, items, ps, table, cfgs, torch.device("cpu"))
    want = _reference_tables(segments, new_pos, items, ps, table, cfgs)
    assert torch.equal(got[0], want[0]) and got[0].dtype == torch.int64
    assert (got[1] is None) == (want[1] is None) and (got[1] is None or torch.equal(got[1], want[1]))
    for (gi, gc, gs), (wi, wc, ws) in zip(got[2], want[2], strict=True):
        assert gi.dtype == torch.int32 and torch.equal(gi, wi)
        assert gc.dtype == torch.float32 and torch.equal(gc, wc) and torch.equal(gs, ws)
        assert gi.is_contiguous() and gc.is_contiguous() and gs.is_contiguous()
    base = got[0].untyped_storage().data_ptr()  # one buffer, every table 16-byte aligned in it
    for t in [got[0], *([got[1]] if table is not None else []), *(t for m in got[2] for t in m)]:
        assert t.untyped_storage().data_ptr() == base and (t.data_ptr() - base) % 16 == 0


def test_compose_takes_no_descending_range():
    """A downward run is `merge`'s own page list; compose's argument stays a range of step 1."""
    k, v = torch.randn(2, 16, 4, 1, 8).unbind(0)
    before = k.clone(), v.clone()
    with pytest.raises(ValueError, match="range of consecutive page ids"):
        kvfuse.compose(k, v, [kvfuse.SourceSegment(range(5, 2, -1), 12, give_up=True)], kvfuse.RopeConfig(8),
                       layout="shared")
    assert torch.equal(k, before[0]) and torch.equal(v, before[1])


def test_merge_of_downward_pages_raises_before_anything_changes():
    """Threads whose pages run downwards, moved past the last position: the error of compose, with the
    destination pages given back in order and nothing else changed."""
    s = PagedKVStore(2, 32, 4, H, D, rope=ROPE)
    s._free = s._free[::-1]  # pages come out downwards
    p = s.sequence("late", position=2**31 - 40)
    p.append_kv(torch.randn(2, 8, H, D), torch.randn(2, 8, H, D))
    a, b = kvfuse.fork(p, 2)
    a.append_kv(torch.randn(2, 20, H, D), torch.randn(2, 20, H, D))
    b.append_kv(torch.randn(2, 16, H, D), torch.randn(2, 16, H, D))
    assert a.pages[2:] == list(range(a.pages[2], a.pages[2] - 5, -1))
    snap = (list(s.refcount), list(s._free), s.k_cache.clone(), s.v_cache.clone(), list(a.pages), list(b.pages))
    with pytest.raises(ValueError, match="overflow"):
        kvfuse.merge([a, b], "sequential")
    assert (list(s.refcount), list(s._free)) == snap[:2] and (a.pages, b.pages) == snap[4:]
    assert torch.equal(s.k_cache, snap[2]) and torch.equal(s.v_cache, snap[3])
    assert not a.released and not b.released


def test_host_ints():
    assert host_ints([]).dtype == torch.int64 and host_ints([], torch.int32).numel() == 0
    t = host_ints([3, -1, 2**40])
    assert t.dtype == torch.int64 and t.tolist() == [3, -1, 2**40]
    assert host_ints([5, 7], torch.int32).tolist() == [5, 7] and host_ints([5], torch.int32).dtype == torch.int32
