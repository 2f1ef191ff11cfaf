"""Every public call validates before it mutates: a rejected call raises an error that names the
argument, and every tensor, refcount, free list, page table and segment list is bit-identical
afterwards. Plus the semantics decided alongside (merge of siblings, flash-attn's causal Lq > Lk,
sdpa at scale 0 and on empty inputs, dispatch without inputs and from two threads, bench exit codes).
"""

import math
import os
import subprocess
import sys
import threading
import time
import types

import pytest
import torch
import torch.nn.functional as F

import kvfuse
from kvfuse import PagedKVStore, PagePool, Sequence, SourceSegment, dispatch, memory
from tests.conftest import device_for, skip_unless_supported

L, H, D, PS = 2, 2, 16, 4
ROPE = kvfuse.RopeConfig(head_dim=D, rotary_dim=12, theta=1000.0)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _kv(n, layers=L):
    return torch.randn(layers, n, H, D), torch.randn(layers, n, H, D)


def _store(rope=ROPE, num_pages=24):
    s = PagedKVStore(L, num_pages, PS, H, D, rope=rope)
    s.k_cache.normal_()  # never zeros
    s.v_cache.normal_()
    return s


def _world():
    """Stores with a prefix (its last page partly filled and shared) and two threads, another store, a
    rope-less and an unmovable store, a PagePool, a pair of flat pools and memory blocks."""
    w = types.SimpleNamespace()
    w.store = _store()
    w.prefix = w.store.sequence("prefix")
    w.prefix.append_kv(*_kv(6))
    w.a, w.b = kvfuse.fork(w.prefix, 2)
    w.a.append_kv(*_kv(3))
    w.b.append_kv(*_kv(2))
    w.other = _store()
    w.o = w.other.sequence("o")
    w.o.append_kv(*_kv(2))
    w.bare = _store(rope=None)
    w.bp = w.bare.sequence("p")
    w.bp.append_kv(*_kv(3))
    w.ba, w.bb = kvfuse.fork(w.bp, 2)
    w.ba.append_kv(*_kv(2))
    w.bb.append_kv(*_kv(5))
    w.late = _store()  # threads near the last position: moving the second overflows
    w.lp = w.late.sequence("late", position=2**31 - 12)
    w.lp.append_kv(*_kv(6))
    w.la, w.lb = kvfuse.fork(w.lp, 2)
    w.la.append_kv(*_kv(3))
    w.lb.append_kv(*_kv(5))
    w.frozen = _store(rope=kvfuse.ModelRope((ROPE,) * L, unmovable="tokens of this model cannot move"))
    w.pool = PagePool(8, PS, H, D)
    w.pool_pages = w.pool.alloc(3)
    w.big_pool = PagePool(16, PS, H, D)  # its next free pages lie past the 8 pages of kc/vc
    w.big_pool.alloc(9)
    w.kc, w.vc = torch.randn(2, 8, PS, H, D).unbind(0)
    w.block = memory.MemoryBlock(*_kv(5), torch.arange(5), w.store.rope, "m", {})
    w.frozen_block = memory.MemoryBlock(*_kv(5), torch.arange(5), w.frozen.rope, "m", {})
    return w


def _state(x):
    """A deep, bitwise-comparable copy of everything a call could change."""
    if isinstance(x, torch.Tensor):
        return ("tensor", x.dtype, tuple(x.shape), x.detach().clone())
    if isinstance(x, PagedKVStore):
        return _state(dict(k_cache=x.k_cache, v_cache=x.v_cache, refcount=x.refcount, free=x._free))
    if isinstance(x, Sequence):
        return _state(dict(pages=x.pages, segments=x.segments, released=x.released))
    if isinstance(x, PagePool):
        return _state(dict(k_cache=x.k_cache, v_cache=x.v_cache, free=x._free))
    if isinstance(x, memory.MemoryBlock):
        return _state(dict(k=x.k, v=x.v, positions=x.positions, rope=x.rope, identity=x.identity,
                           metadata=x.metadata))
    if isinstance(x, types.SimpleNamespace):
        return _state(vars(x))
    if isinstance(x, dict):
        return {k: _state(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_state(v) for v in x]
    return x


def _assert_same(a, b, where="state"):
    if isinstance(a, tuple) and a and a[0] == "tensor":
        assert a[:3] == b[:3], where
        bits = (a[3].contiguous().view(torch.uint8), b[3].contiguous().view(torch.uint8))
        assert torch.equal(*bits), f"{where} changed"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), f"{where} changed length"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} became {b!r}"


def _page(seq):
    """A page only ``seq`` holds (its last)."""
    return seq.pages[-1]


def _bad_block(w, **kw):
    b = w.block
    return memory.MemoryBlock(kw.get("k", b.k), kw.get("v", b.v), kw.get("positions", b.positions), b.rope, "m", {})


def _with_nan(t):
    t = t.clone()
    t.view(-1)[3] = float("nan")
    return t


def _flash(w, **kw):
    """flash_attn_with_kvcache on the flat pools of ``w`` (paged, 2 rows of 2 blocks), one new token."""
    args = dict(q=torch.randn(2, 1, 4, D), k_cache=w.kc, v_cache=w.vc, k=torch.randn(2, 1, H, D),
                v=torch.randn(2, 1, H, D), cache_seqlens=torch.tensor([3, 5], dtype=torch.int32),
                block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32))
    args.update(kw)
    return lambda: kvfuse.flash_attn_with_kvcache(**args)


def _compose(w, k=None, v=None, **kw):
    seg = [SourceSegment(torch.tensor([0, 1]), 6, position=0), SourceSegment(torch.tensor([2]), 3, position=20)]
    k = w.kc if k is None else k
    v = w.vc if v is None else v
    return lambda: kvfuse.compose(k, v, seg, ROPE, **{"dst_pages": torch.tensor([4, 5, 6]), **kw})


def _rerotate(w, **kw):
    args = dict(k_cache=w.kc, slots=torch.tensor([1, 2]), old_positions=torch.tensor([1, 2]),
                new_positions=torch.tensor([5, 6]), rope=ROPE)
    args.update(kw)
    return lambda: kvfuse.rerotate_(**args)


def _full(store):
    store.alloc(store.num_free)
    return store


def _after(_setup, call):
    """``call``, once the setup (evaluated first, before the snapshot) is done."""
    return call


# (id, call on a fresh world, exception, message that names the argument)
REJECTED = [
    # pages: PagedKVStore.alloc / incref / decref (duplicates are rejected: a page table holds a page once)
    ("alloc-negative", lambda w: lambda: w.store.alloc(-1), ValueError, "n must be >= 0"),
    ("alloc-str", lambda w: lambda: w.store.alloc("2"), TypeError, "n must be an int"),
    ("alloc-out-of-pages", lambda w: lambda: w.store.alloc(99), RuntimeError, "out of pages"),
    ("incref-negative", lambda w: lambda: w.store.incref([-1]), ValueError, r"pages must hold page ids in \[0, 24\)"),
    ("incref-past-end", lambda w: lambda: w.store.incref(torch.tensor([24])), ValueError, r"page ids in \[0, 24\)"),
    ("incref-float-tensor", lambda w: lambda: w.store.incref(torch.tensor([1.0])), TypeError, "1-D integer tensor"),
    ("incref-float-id", lambda w: lambda: w.store.incref([w.prefix.pages[0], 1.0]), TypeError,
     r"pages\[1\] must be an int"),
    ("incref-bool-id", lambda w: lambda: w.store.incref([True]), TypeError, r"pages\[0\] must be an int"),
    ("incref-2d", lambda w: lambda: w.store.incref(torch.tensor([[0]])), TypeError, "1-D integer tensor"),
    ("incref-duplicate", lambda w: lambda: w.store.incref([_page(w.a), _page(w.a)]), ValueError, "duplicate"),
    ("incref-free-page", lambda w: lambda: w.store.incref([23]), ValueError, "page 23 is not allocated"),
    ("decref-duplicate", lambda w: lambda: w.store.decref([_page(w.a), _page(w.a)]), ValueError, "duplicate"),
    ("decref-free-page", lambda w: lambda: w.store.decref([_page(w.a), 23]), ValueError, "not allocated"),
    ("decref-negative", lambda w: lambda: w.store.decref([-3]), ValueError, "page ids in"),
    # PagePool
    ("pool-free-negative", lambda w: lambda: w.pool.free(torch.tensor([-1])), ValueError, "pages must hold page ids"),
    ("pool-free-past-end", lambda w: lambda: w.pool.free([8]), ValueError, r"page ids in \[0, 8\)"),
    ("pool-free-float", lambda w: lambda: w.pool.free(w.pool_pages.float()), TypeError, "integer tensor"),
    ("pool-free-duplicate", lambda w: lambda: w.pool.free([int(w.pool_pages[0])] * 2), ValueError, "duplicate"),
    ("pool-free-unallocated", lambda w: lambda: w.pool.free([7]), ValueError, "page 7 is not allocated"),
    ("pool-alloc-negative", lambda w: lambda: w.pool.alloc(-2), ValueError, "n must be >= 0"),
    ("pool-alloc-float", lambda w: lambda: w.pool.alloc(1.5), TypeError, "n must be an int"),
    # Sequence.append_kv / reserve (the prefix's shared last page would be copied on write first)
    ("append-layers", lambda w: lambda: w.prefix.append_kv(*_kv(2, layers=L + 1)), ValueError,
     r"k must be \[num_layers=2"),
    ("append-heads", lambda w: lambda: w.prefix.append_kv(torch.randn(L, 2, 1, D), torch.randn(L, 2, 1, D)),
     ValueError, r"Hkv=2"),
    ("append-v-shape", lambda w: lambda: w.prefix.append_kv(_kv(2)[0], _kv(3)[1]), ValueError,
     "k and v must have the same shape"),
    ("append-3d", lambda w: lambda: w.prefix.append_kv(torch.randn(2, H, D), torch.randn(2, H, D)), ValueError,
     "k must have 4 dims"),
    ("append-int-dtype", lambda w: lambda: w.prefix.append_kv(torch.ones(L, 2, H, D, dtype=torch.int64), _kv(2)[1]),
     TypeError, "k must have dtype"),
    ("append-not-tensor", lambda w: lambda: w.prefix.append_kv([1.0], _kv(1)[1]), TypeError,
     "k must be a torch.Tensor"),
    ("append-nan-v", lambda w: lambda: w.prefix.append_kv(_kv(2)[0], _with_nan(_kv(2)[1])), ValueError,
     "v must be finite"),
    ("append-out-of-pages", lambda w: _after(_full(w.store), lambda: w.prefix.append_kv(*_kv(1))), RuntimeError,
     "out of pages"),
    ("append-released", lambda w: _after(w.a.release(), lambda: w.a.append_kv(*_kv(1))), RuntimeError, "released"),
    ("reserve-float", lambda w: lambda: w.prefix.reserve(1.5), TypeError, "n must be an int"),
    ("reserve-negative", lambda w: lambda: w.prefix.reserve(-1), ValueError, "n must be >= 0"),
    # PagedKVStore.write_ and kvfuse.write_kv_
    ("write-layer", lambda w: lambda: w.store.write_(L, torch.tensor([0]), *_kv(1, 1)[0:1], _kv(1)[0][0]),
     ValueError, r"layer must be in \[0, 1\]"),
    ("write-slots-range", lambda w: lambda: w.store.write_(0, torch.tensor([96]), _kv(1)[0][0], _kv(1)[1][0]),
     ValueError, r"slots must hold slot ids .* in \[0, 96\)"),
    ("write-slots-twice", lambda w: lambda: w.store.write_(0, torch.tensor([5, 5]), _kv(2)[0][0], _kv(2)[1][0]),
     ValueError, "slots holds duplicate"),
    ("write-slots-float", lambda w: lambda: w.store.write_(0, torch.tensor([5.0]), _kv(1)[0][0], _kv(1)[1][0]),
     TypeError, "slots must have dtype"),
    ("write-k-shape", lambda w: lambda: w.store.write_(None, torch.tensor([5]), _kv(2)[0], _kv(2)[1]),
     ValueError, r"k must be \[num_layers, n, Hkv, D\] = \[2, 1, 2, 16\]"),
    ("write_kv_-pages", lambda w: lambda: kvfuse.write_kv_(w.kc, torch.tensor([8]), 0, torch.randn(2, H, D)),
     ValueError, r"pages must hold page ids in \[0, 8\)"),
    ("write_kv_-start", lambda w: lambda: kvfuse.write_kv_(w.kc, torch.tensor([1]), -1, torch.randn(2, H, D)),
     ValueError, "start must be >= 0"),
    ("write_kv_-values", lambda w: lambda: kvfuse.write_kv_(w.kc, torch.tensor([1]), 0, torch.randn(2, 1, D)),
     ValueError, "values must be"),
    # fork
    ("fork-n-str", lambda w: lambda: kvfuse.fork(w.prefix, "3"), TypeError, "fork: n must be an int"),
    ("fork-n-zero", lambda w: lambda: kvfuse.fork(w.prefix, 0), ValueError, "fork: n must be >= 1"),
    ("fork-store", lambda w: lambda: kvfuse.fork(w.store, 2), TypeError,
     r"prefix must be a kvfuse.PagedSequence, got PagedKVStore \(.*store.sequence\(\)"),
    ("fork-name", lambda w: lambda: w.prefix.fork(2, name=3), TypeError, "fork: name must be a str, got int"),
    # merge
    ("merge-one-sequence", lambda w: lambda: kvfuse.merge(w.a), TypeError,
     "merge: threads must be a list of kvfuse.PagedSequence, got a single PagedSequence"),
    ("merge-not-iterable", lambda w: lambda: kvfuse.merge(3), TypeError, "threads must be a list"),
    ("merge-not-sequence", lambda w: lambda: kvfuse.merge([w.a, "b"]), TypeError,
     r"threads\[1\] must be a kvfuse.PagedSequence"),
    ("merge-empty", lambda w: lambda: kvfuse.merge([]), ValueError, "threads must not be empty"),
    ("merge-twice", lambda w: lambda: kvfuse.merge([w.a, w.a]), ValueError, "listed twice"),
    ("merge-two-stores", lambda w: lambda: kvfuse.merge([w.a, w.o]), ValueError, "different stores"),
    ("merge-layout", lambda w: lambda: kvfuse.merge([w.a, w.b], "diagonal"), ValueError, "layout must be"),
    ("merge-prefix-and-thread", lambda w: lambda: kvfuse.merge([w.prefix, w.a]), ValueError,
     r"threads\[0\] and threads\[1\] both hold segment 'prefix#0'.*one continues the other"),
    ("merge-thread-and-grandchild", lambda w: (lambda c: lambda: kvfuse.merge([w.a, c]))(kvfuse.fork(w.a, 1)[0]),
     ValueError, "both hold segment"),
    ("merge-prefix-grew-between-forks", lambda w: _after(w.prefix.append_kv(*_kv(1)), (
        lambda c: lambda: kvfuse.merge([w.a, c]))(kvfuse.fork(w.prefix, 1)[0])), ValueError, "both hold segment"),
    ("merge-sequential-without-rope", lambda w: lambda: kvfuse.merge([w.ba, w.bb], keep_threads=True), ValueError,
     "needs the store's rotation"),
    ("merge-positions-overflow", lambda w: lambda: kvfuse.merge([w.la, w.lb], keep_threads=True), ValueError,
     "overflow"),  # raised by compose once the destination pages are taken: they go back in order
    ("merge-out-of-pages", lambda w: _after(_full(w.store), lambda: kvfuse.merge([w.a, w.b], keep_threads=True)),
     RuntimeError, "out of pages"),
    # batch_plan
    ("batch_plan-two-stores", lambda w: lambda: kvfuse.batch_plan([w.a, w.o], 1), ValueError, "different stores"),
    ("batch_plan-q_len-str", lambda w: lambda: kvfuse.batch_plan([w.a, w.b], "1"), TypeError,
     "batch_plan: q_len must be an int, got '1'"),
    ("batch_plan-q_len-float", lambda w: lambda: kvfuse.batch_plan([w.a, w.b], 1.0), TypeError,
     "batch_plan: q_len must be an int, got 1.0"),
    ("batch_plan-q_len-negative", lambda w: lambda: kvfuse.batch_plan([w.a, w.b], [1, -1]), ValueError,
     r"q_len\[1\] must be >= 0"),
    ("batch_plan-hogwild-descendant", lambda w: lambda: kvfuse.batch_plan([w.prefix, w.a], 1, hogwild=True),
     ValueError, "both hold segment"),
    # memory.insert
    ("insert-into-other-store", lambda w: lambda: memory.insert(w.store, w.block, into=w.o), ValueError,
     "into belongs to another store"),
    ("insert-position-str", lambda w: lambda: memory.insert(w.store, w.block, position="10"), TypeError,
     "position must be an int"),
    ("insert-position-negative", lambda w: lambda: memory.insert(w.store, w.block, into=w.a, position=-1), ValueError,
     "position must be in"),
    ("insert-position-overflow", lambda w: lambda: memory.insert(w.store, w.block, into=w.a, position=2**31 - 3),
     ValueError, "overflow"),
    ("insert-v-shape", lambda w: lambda: memory.insert(w.store, _bad_block(w, v=_kv(4)[1]), into=w.a), ValueError,
     "block.k and block.v must have the same shape"),
    ("insert-positions-length", lambda w: lambda: memory.insert(w.store, _bad_block(w, positions=torch.arange(4)),
                                                                into=w.a), ValueError, "block.positions must have one"),
    ("insert-positions-float", lambda w: lambda: memory.insert(w.store, _bad_block(w, positions=torch.ones(5)),
                                                               into=w.a), TypeError, "block.positions must have dtype"),
    ("insert-nan", lambda w: lambda: memory.insert(w.store, _bad_block(w, k=_with_nan(w.block.k)), into=w.a),
     ValueError, "block.k must be finite"),
    ("insert-store-type", lambda w: lambda: memory.insert(w.a, w.block), TypeError,
     "store must be a kvfuse.PagedKVStore"),
    ("insert-into-type", lambda w: lambda: memory.insert(w.store, w.block, into=w.store), TypeError,
     "into must be a kvfuse.PagedSequence"),
    ("insert-into-released", lambda w: _after(w.b.release(), lambda: memory.insert(w.store, w.block, into=w.b)),
     RuntimeError, "released"),
    ("insert-out-of-pages-new", lambda w: _after(_full(w.store), lambda: memory.insert(w.store, w.block)),
     RuntimeError, "out of pages"),
    ("insert-out-of-pages-into", lambda w: _after(_full(w.store), lambda: memory.insert(w.store, w.block, into=w.a)),
     RuntimeError, "out of pages"),
    ("insert-unmovable", lambda w: lambda: memory.insert(w.frozen, w.frozen_block, position=40), ValueError,
     "cannot move"),
    ("insert-backend-from-env", lambda w: _after(os.environ.__setitem__("KVFUSE_BACKEND", "cuda"),
                                                 lambda: memory.insert(w.store, w.block, into=w.a, position=50)),
     kvfuse.BackendNotSupported, "rerotate_: backend 'cuda' cannot run"),
    # compose
    ("compose-k-is-v", lambda w: _compose(w, v=w.kc), ValueError, "k_cache and v_cache share memory"),
    ("compose-overlapping-views", lambda w: (lambda base: _compose(w, k=base[:8], v=base[1:]))(
        torch.randn(9, PS, H, D)), ValueError, "share memory"),
    ("compose-pool-too-large", lambda w: _compose(w, dst_pages=w.big_pool), ValueError,
     "dst_pages: the PagePool has 16 pages, the pools only 8"),
    ("compose-dst-list", lambda w: _compose(w, dst_pages=[4, 5, 6]), TypeError, "dst_pages must be"),
    ("compose-dst-range", lambda w: _compose(w, dst_pages=torch.tensor([4, 5, 8])), ValueError,
     r"dst_pages must hold page ids in \[0, 8\)"),
    # rerotate_
    ("rerotate-slots-range", lambda w: _rerotate(w, slots=torch.tensor([1, 32])), ValueError, "slots must hold"),
    ("rerotate-positions", lambda w: _rerotate(w, new_positions=torch.tensor([5])), ValueError,
     "new_positions must have one position per slot"),
    # flash_attn_with_kvcache: nothing is written before everything is checked
    ("flash-q-3d", lambda w: _flash(w, q=torch.randn(2, 4, D)), ValueError, "q must have 4 dims"),
    ("flash-v-shape", lambda w: _flash(w, v=torch.randn(2, 2, H, D)), ValueError, r"v must be \[B=2, Lnew, Hkv=2"),
    ("flash-k-heads", lambda w: _flash(w, k=torch.randn(2, 1, 1, D)), ValueError, r"k must be \[B=2, Lnew, Hkv=2"),
    ("flash-table-range", lambda w: _flash(w, block_table=torch.tensor([[0, 1], [2, 9]], dtype=torch.int32)),
     ValueError, r"block_table must hold block ids in \[0, 8\)"),
    ("flash-table-float", lambda w: _flash(w, block_table=torch.zeros(2, 2)), TypeError, "block_table must have dtype"),
    ("flash-table-rows", lambda w: _flash(w, block_table=torch.tensor([[0, 1]], dtype=torch.int32)), ValueError,
     "block_table must have one row per batch row"),
    ("flash-seqlens-str", lambda w: _flash(w, cache_seqlens="3"), TypeError, "cache_seqlens must be an int"),
    ("flash-seqlens-negative", lambda w: _flash(w, cache_seqlens=torch.tensor([-1, 2])), ValueError,
     "cache_seqlens must hold token counts"),
    ("flash-seqlens-length", lambda w: _flash(w, cache_seqlens=torch.tensor([1, 2, 3])), ValueError,
     "cache_seqlens must have one entry per batch row"),
    ("flash-capacity", lambda w: _flash(w, cache_seqlens=8), ValueError, "a row needs 9 slots, the cache has 8"),
    ("flash-k-cache-is-v-cache", lambda w: _flash(w, v_cache=w.kc), ValueError, "k_cache and v_cache share memory"),
    ("flash-cache-dtype", lambda w: _flash(w, q=torch.randn(2, 1, 4, D, dtype=torch.float64)), TypeError,
     "k_cache must have dtype"),
    ("flash-rows-share-a-slot", lambda w: _flash(w, block_table=torch.tensor([[0, 1], [0, 1]], dtype=torch.int32),
                                                 cache_seqlens=3), ValueError, "the slots of k/v"),
    ("flash-rotary-short", lambda w: _flash(w, rotary_cos=torch.ones(4, 4), rotary_sin=torch.ones(4, 4)),
     ValueError, "rotary_cos/rotary_sin have 4 positions"),
    ("flash-rotary-dim", lambda w: _flash(w, rotary_cos=torch.ones(16, 9), rotary_sin=torch.ones(16, 9)),
     ValueError, "rotary_dim"),
    ("flash-batch-idx-range", lambda w: _flash(w, block_table=None, k_cache=w.kc.view(4, 8, H, D),
                                               v_cache=w.vc.view(4, 8, H, D),
                                               cache_batch_idx=torch.tensor([0, 4], dtype=torch.int32)),
     ValueError, r"cache_batch_idx must hold cache rows in \[0, 4\)"),
    ("flash-backend", lambda w: _flash(w, backend="cuda"), kvfuse.BackendNotSupported,
     "segment_attention: backend 'cuda' cannot run"),
    ("flash-scale-str", lambda w: _flash(w, softmax_scale="0.1"), TypeError, "softmax_scale must be a float"),
]


@pytest.mark.parametrize("make, exc, match", [c[1:] for c in REJECTED], ids=[c[0] for c in REJECTED])
def test_rejected_calls_change_nothing(make, exc, match, monkeypatch):
    monkeypatch.setenv("KVFUSE_BACKEND", "auto")  # a case may set it: monkeypatch restores what was there
    w = _world()
    call = make(w)
    before = _state(w)
    with pytest.raises(exc, match=match):
        call()
    _assert_same(before, _state(w), "world")


def test_rejected_calls_change_nothing_is_able_to_fail():
    """The snapshot sees a page handed to a second owner by a duplicate decref (the bug it guards)."""
    w = _world()
    before = _state(w)
    w.store.refcount[_page(w.a)] -= 1
    with pytest.raises(AssertionError, match=r"world.store.refcount\[\d+\]: 1 became 0"):
        _assert_same(before, _state(w), "world")


# ---------------------------------------------------------------------------------------------- merge
def _contents(seq):
    k, v = seq.gather()
    return k, v, seq.positions().tolist(), seq.token_graph().dense_mask()


@pytest.mark.parametrize("layout", ["shared", "sequential"])
@pytest.mark.parametrize("prefix_len", [6, 8], ids=["partial-last-page", "page-aligned"])
def test_merge_takes_siblings_of_separate_fork_calls(layout, prefix_len):
    """Threads of two fork calls of one (unchanged) prefix merge exactly like threads of one call."""
    s = _store(num_pages=48)
    p = s.sequence("prefix")
    p.append_kv(*_kv(prefix_len))
    kvs = [_kv(n) for n in (3, 5)]
    one = kvfuse.fork(p, 2)
    two = [kvfuse.fork(p, 1)[0], kvfuse.fork(p, 1)[0]]
    for t1, t2, kv in zip(one, two, kvs):
        t1.append_kv(*kv)
        t2.append_kv(*kv)
    want = _contents(kvfuse.merge(one, layout))
    got = _contents(kvfuse.merge(two, layout))
    assert got[2] == want[2]
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and torch.equal(got[3], want[3])
    bp = kvfuse.batch_plan([kvfuse.fork(p, 1)[0], kvfuse.fork(p, 1)[0]], 0, hogwild=True)
    assert bp.block_table.shape[0] == 2


def test_merge_of_independent_sequences_composes_them():
    s = _store()
    a, b = s.sequence("a"), s.sequence("b")
    a.append_kv(*_kv(5))
    b.append_kv(*_kv(3))
    merged = kvfuse.merge([a, b], "sequential")
    assert merged.positions().tolist() == list(range(8)) and merged.num_tokens == 8


# ---------------------------------------------------------------------------------------------- rerotate_
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rerotate_honours_the_stride_of_slots(backend):
    dev = device_for(backend)
    k = torch.randn(4, PS, H, D, device=dev)
    skip_unless_supported("rerotate_", backend, k_cache=k, rotary_dim=ROPE.rotary_dim, interleaved=False)
    base = torch.tensor([0, 7, 5, 3, 9, 11, 14, 2], device=dev)
    slots = base[::2]  # 0, 5, 9, 14: a strided view (a contiguous read would take 0, 7, 5, 3)
    old, new = torch.arange(4, device=dev), torch.arange(4, device=dev) + 50
    want = k.clone()
    kvfuse.rerotate_(want, slots.contiguous(), old, new, ROPE, backend="torch")
    kvfuse.rerotate_(k, slots, old, new, ROPE, backend=backend)
    torch.testing.assert_close(k, want, atol=1e-5, rtol=1e-5)
    untouched = torch.ones(4 * PS, dtype=torch.bool)
    untouched[slots.cpu()] = False
    assert torch.equal(k.view(-1, H, D)[untouched.to(dev)], want.view(-1, H, D)[untouched.to(dev)])


# ---------------------------------------------------------------------------------------------- dispatch
def test_first_dispatch_of_two_threads_does_not_race(monkeypatch):
    """Every thread waits until the backends are loaded (the first used to mark them loaded, then import)."""
    dispatch._load("torch")  # `saved` is a snapshot of the registry: it must hold the torch backend
    saved = {op: dict(impls) for op, impls in dispatch._REGISTRY.items()}

    def slow_import(mod):
        time.sleep(0.2)
        name = mod.rsplit(".", 1)[1]
        if not any(name in impls for impls in saved.values()):
            raise ImportError(f"{name} is not available here")
        for op, impls in saved.items():
            if name in impls:
                dispatch._REGISTRY.setdefault(op, {})[name] = impls[name]

    monkeypatch.setattr(dispatch, "_LOADED", set())
    monkeypatch.setattr(dispatch, "_REGISTRY", {})
    monkeypatch.setattr(dispatch, "_LOAD_ERRORS", {})
    monkeypatch.setattr(dispatch, "importlib", types.SimpleNamespace(import_module=slow_import))
    k = torch.randn(2, PS, H, D)
    start, got = threading.Barrier(4), []

    def run():
        start.wait()
        try:
            got.append(dispatch.choose("rerotate_", "torch", k_cache=k, rotary_dim=16, interleaved=False))
        except Exception as e:
            got.append(e)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == ["torch"] * 4


def test_backend_from_the_environment_is_named(monkeypatch):
    k = torch.randn(2, PS, H, D)
    before = k.clone()
    monkeypatch.setenv("KVFUSE_BACKEND", "gpu")
    with pytest.raises(ValueError, match="the KVFUSE_BACKEND environment variable must be one of .* got 'gpu'"):
        kvfuse.rerotate_(k, torch.tensor([1]), torch.tensor([1]), torch.tensor([3]), ROPE)
    assert torch.equal(k, before)
    with pytest.raises(ValueError, match="^backend must be one of"):
        kvfuse.rerotate_(k, torch.tensor([1]), torch.tensor([1]), torch.tensor([3]), ROPE, backend="gpu")


@pytest.mark.parametrize("name, op", [("rerotate", "rerotate_"), ("rerotate_", "rerotate_"),
                                      ("compose", "compose_copy_"), ("attention", "segment_attention"),
                                      ("merge_states", "merge_states"), ("segment_attention", "segment_attention")])
def test_available_takes_public_names_and_no_inputs(name, op):
    av = kvfuse.available(name)
    assert set(av) == set(dispatch.PRIORITY) and av["torch"] == []
    assert av == {b: dispatch.reasons_for(op, b) for b in dispatch.PRIORITY}
    for b, reasons in av.items():  # what is known without inputs: the backend loaded, and implements the op
        assert all("failed to load" in r or "no implementation" in r for r in reasons), (b, reasons)


def test_available_rejects_unknown_ops_and_takes_partial_inputs():
    with pytest.raises(ValueError, match="op must be one of .*'attention'"):
        kvfuse.available("rotate")
    assert kvfuse.available("attention", k_cache=torch.randn(2, PS, H, D))["torch"] == []


@pytest.mark.parametrize("backend, blocked, hint", [
    ("cuda", "kvfuse._C", "reinstall with `pip install --no-build-isolation -e .` on a CUDA build of torch"),
    ("triton", "triton", "pip install kvfuse[triton]"),
])
def test_a_missing_backend_says_how_to_install_it(monkeypatch, backend, blocked, hint):
    monkeypatch.setitem(sys.modules, blocked, None)  # importing it now fails
    if blocked == "kvfuse._C":
        monkeypatch.delattr(kvfuse, "_C", raising=False)
    monkeypatch.delitem(sys.modules, f"kvfuse.backends.{backend}", raising=False)
    monkeypatch.setattr(dispatch, "_LOADED", set())
    monkeypatch.setattr(dispatch, "_LOAD_ERRORS", {})
    monkeypatch.setattr(dispatch, "_REGISTRY", {op: dict(impls) for op, impls in dispatch._REGISTRY.items()})
    (reason,) = dispatch.reasons_for("rerotate_", backend)
    assert f"the {backend} backend failed to load (ImportError: " in reason and hint in reason


# ---------------------------------------------------------------------------------------------- sdpa
def _uniform_oracle(v, mask):
    """Mean of the values each query sees: v [B, H, S, D], mask bool [L, S]."""
    w = mask.double() / mask.double().sum(-1, keepdim=True)
    return torch.einsum("ls,bhsd->bhld", w, v.double())


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", ["causal", "decode", "bottom-right-mask"])
def test_sdpa_scale_zero_is_a_uniform_softmax(backend, case, monkeypatch):
    dev = device_for(backend)
    L_, S = (6, 6) if case == "causal" else ((1, 9) if case == "decode" else (3, 9))
    q, k, v = torch.randn(2, 4, L_, 16, device=dev), torch.randn(2, 4, S, 16, device=dev), torch.randn(2, 4, S, 16,
                                                                                                       device=dev)
    mask = torch.ones(L_, S, dtype=torch.bool).tril(S - L_)
    kw = dict(is_causal=True) if case == "causal" else (dict(attn_mask=mask.to(dev)) if L_ > 1 else {})
    monkeypatch.setattr(kvfuse.compat.F, "scaled_dot_product_attention", None)  # kvfuse's own path must run
    got = kvfuse.sdpa(q, k, v, scale=0.0, backend=backend, **kw)
    torch.testing.assert_close(got.double().cpu(), _uniform_oracle(v.cpu(), mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(0, 2, 4, 16), (2, 2, 4, 0), (2, 2, 1, 0), (0, 2, 1, 16), (2, 2, 0, 16)],
                         ids=["batch0-L4", "d0-L4", "d0-decode", "batch0-decode", "L0"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sdpa_on_empty_inputs_matches_torch(shape, causal):
    q = torch.randn(shape)
    k = v = torch.randn(shape[0], shape[1], 5, shape[3])
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    got = kvfuse.sdpa(q, k, v, is_causal=causal)
    assert got.shape == want.shape and got.dtype == want.dtype and torch.equal(got, want)


# ---------------------------------------------------------------------------------------------- flash-attn
def _dense_flash(q, ks, vs, causal, scale):
    """float64 flash-attn semantics for one row, bottom-right causal; a query that sees no key: 0, lse +inf."""
    lq, lk = q.shape[0], ks.shape[0]
    rep = q.shape[1] // ks.shape[1]
    k, v = ks.double().repeat_interleave(rep, 1), vs.double().repeat_interleave(rep, 1)
    sc = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    m = torch.ones(lq, lk, dtype=torch.bool)
    if causal:
        m = m.tril(lk - lq)
    sc = sc.masked_fill(~m[None], float("-inf"))
    out = torch.einsum("hqk,khd->qhd", torch.nan_to_num(sc.softmax(-1)), v)
    lse = torch.logsumexp(sc, -1)
    return out, torch.where(m.any(-1)[None], lse, torch.full_like(lse, math.inf))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("paged", [True, False], ids=["paged", "dense"])
@pytest.mark.parametrize("causal, lq, seqlens, new", [
    (True, 5, [1, 6], 1),   # row 0: Lq 5 > Lk 2, the first 3 queries see nothing
    (True, 4, [0, 2], 0),   # row 0 has no key at all, row 1 Lq 4 > Lk 2
    (False, 3, [0, 4], 0),  # not causal: a row without keys
], ids=["causal-Lq>Lk", "causal-empty-row", "full-empty-row"])
def test_flash_attn_with_kvcache_where_queries_see_no_key(backend, paged, causal, lq, seqlens, new):
    dev = device_for(backend)
    b, hq, hkv, d, cap = 2, 4, 2, 32, 8
    kc, vc = torch.randn(2, 4 if paged else b, 4 if paged else cap, hkv, d, device=dev).unbind(0)
    skip_unless_supported("segment_attention", backend, q=torch.randn(1, hq, d, device=dev), k_cache=kc)
    rows_k = [kc[2 * i: 2 * i + 2].flatten(0, 1) if paged else kc[i] for i in range(b)]
    rows_k = [r.clone() for r in rows_k]
    rows_v = [(vc[2 * i: 2 * i + 2].flatten(0, 1) if paged else vc[i]).clone() for i in range(b)]
    extra = dict(block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=dev)) if paged else {}
    q = torch.randn(b, lq, hq, d, device=dev)
    k = torch.randn(b, new, hkv, d, device=dev) if new else None
    v = torch.randn(b, new, hkv, d, device=dev) if new else None
    out, lse = kvfuse.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=torch.tensor(seqlens, device=dev),
                                              causal=causal, softmax_scale=0.3, return_softmax_lse=True,
                                              backend=backend, **extra)
    for i, n0 in enumerate(seqlens):
        ks, vs = rows_k[i][:n0], rows_v[i][:n0]
        if new:
            ks, vs = torch.cat([ks, k[i]]), torch.cat([vs, v[i]])
        want, want_lse = _dense_flash(q[i].cpu(), ks.cpu(), vs.cpu(), causal, 0.3)
        torch.testing.assert_close(out[i].double().cpu(), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[i].double().cpu(), want_lse, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- bench
def test_bench_exits_non_zero_when_every_requested_provider_is_skipped(tmp_path):
    """Through the CLI entry point: the CUDA provider alone on a CPU machine measures nothing."""
    base = [sys.executable, "-m", "kvfuse.bench", "rerotate", "--pages", "8", "--page-size", "4", "--kv-heads", "1",
            "--head-dim", "16", "--rep-ms", "1", "--quiet", "--device", "cpu"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([*base, "--providers", "cuda"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "nothing was measured in rerotate: every requested provider was skipped or failed" in r.stderr
    r = subprocess.run([*base, "--providers", "torch"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def test_bench_exits_non_zero_when_every_provider_raises(monkeypatch):
    from kvfuse import bench
    from kvfuse.bench import common, rerotate

    def broken(ctx, rope):
        def make(st):
            raise RuntimeError("boom")

        return [common.Provider("torch", "broken", make)]

    monkeypatch.setattr(rerotate, "providers", broken)
    assert bench.main(["rerotate", "--pages", "8", "--page-size", "4", "--kv-heads", "1", "--head-dim", "16",
                       "--rep-ms", "1", "--quiet", "--device", "cpu"]) == 1
