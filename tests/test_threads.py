"""The thread API: reference-counted pages, fork without copies, copy-on-write, merge, batched attention.

Store-level tests use random K/V; the model-level test at the end forks a prompt of a small
random-weight model into threads, decodes them as one batch, merges and continues, and compares with
a reference (see `test_fork_decode_merge_continue`).
"""

import pytest
import torch

import kvfuse
from kvfuse import PagedKVStore
from kvfuse.reference import rotate

L, H, D, PS = 2, 2, 16, 4
ROPE = kvfuse.RopeConfig(head_dim=D, rotary_dim=12, theta=1000.0)


def _store(num_pages=32):
    s = PagedKVStore(L, num_pages, PS, H, D, rope=ROPE)
    s.k_cache.normal_()  # garbage everywhere, never zeros
    s.v_cache.normal_()
    return s


def _kv(n):
    return torch.randn(L, n, H, D), torch.randn(L, n, H, D)


def _prefix_and_threads(store, prefix_len=6, lens=(5, 0, 3)):
    p = store.sequence("prefix")
    pk, pv = _kv(prefix_len)
    p.append_kv(pk, pv)
    threads = kvfuse.fork(p, len(lens))
    tkv = []
    for t, n in zip(threads, lens):
        k, v = _kv(n)
        t.append_kv(k, v)
        tkv.append((k, v))
    return p, (pk, pv), threads, tkv


def test_refcount_alloc_free():
    s = _store(4)
    a = s.alloc(3)
    assert s.num_free == 1 and [s.refcount[i] for i in a.tolist()] == [1, 1, 1]
    s.incref(a[:1])
    s.decref(a)
    assert s.num_free == 3 and s.refcount[int(a[0])] == 1
    s.decref(a[:1])
    assert s.num_free == 4
    with pytest.raises(ValueError, match="not allocated"):
        s.decref(a[:1])
    with pytest.raises(ValueError, match="not allocated"):
        s.incref(a[:1])


def test_out_of_pages_is_an_error_and_changes_nothing():
    s = _store(3)
    seq = s.sequence()
    seq.append_kv(*_kv(9))  # 3 pages, last partly filled
    before = (list(s.refcount), s.num_free, list(seq.pages), seq.length, s.k_cache.clone())
    with pytest.raises(RuntimeError, match="out of pages"):
        s.alloc(1)
    with pytest.raises(RuntimeError, match="out of pages"):
        seq.append_kv(*_kv(4))
    assert (list(s.refcount), s.num_free, list(seq.pages), seq.length) == before[:4]
    assert torch.equal(s.k_cache, before[4])
    # fork is free (no pages), but a thread's first token needs a page
    (t,) = kvfuse.fork(seq, 1)
    with pytest.raises(RuntimeError, match="out of pages"):
        t.append_kv(*_kv(1))
    assert t.length == 12 and s.num_free == 0


def test_fork_shares_pages_and_threads_never_write_shared_pages():
    s = _store()
    p, (pk, pv), threads, tkv = _prefix_and_threads(s)
    shared = p.pages
    assert all(t.pages[: len(shared)] == shared for t in threads)  # no copy
    assert all(s.refcount[i] == 4 for i in shared)
    # each thread's tokens start on a fresh page: the rest of the prefix's last page is a pad
    assert [t.length for t in threads] == [8 + 5, 8, 8 + 3]
    own = [i for t in threads for i in t.pages[len(shared):]]
    assert len(own) == len(set(own)) and not set(own) & set(shared)
    k, v = p.gather()
    assert torch.equal(k, pk) and torch.equal(v, pv)  # the prefix is untouched
    for t, (tk, tv) in zip(threads, tkv):
        k, v = t.gather()
        assert torch.equal(k, torch.cat([pk, tk], 1)) and torch.equal(v, torch.cat([pv, tv], 1))
        assert t.positions().tolist() == list(range(6 + tk.shape[1]))


def test_copy_on_write_of_a_shared_partial_page():
    s = _store()
    p, (pk, pv), threads, _ = _prefix_and_threads(s)
    old_last = p.pages[-1]
    before = s.k_cache[:, old_last].clone()
    k2, v2 = _kv(3)
    p.append_kv(k2, v2)  # the prefix continues after the fork: its shared last page is copied first
    assert p.pages[-1] != old_last and s.refcount[old_last] == 3
    assert torch.equal(s.k_cache[:, old_last], before)  # the threads' page is bit-identical
    k, _ = p.gather()
    assert torch.equal(k, torch.cat([pk, k2], 1))
    for t in threads:
        assert torch.equal(t.gather()[0][:, :6], pk)


def test_release_frees_everything():
    s = _store()
    p, _, threads, _ = _prefix_and_threads(s)
    merged = kvfuse.merge(threads, "sequential")
    assert all(t.released for t in threads)
    p.release()
    merged.release()
    assert s.num_free == s.num_pages and set(s.refcount) == {0}
    with pytest.raises(RuntimeError, match="released"):
        p.append_kv(*_kv(1))


def _expected(pk, pv, tkv, layout):
    """Dense expectation: prefix, then each thread rotated by its move (a pure rotation)."""
    ks, vs, pos, start = [pk], [pv], list(range(6)), 6
    for tk, tv in tkv:
        n = tk.shape[1]
        delta = (start if layout == "sequential" else 6) - 6
        ang = torch.tensor(float(delta), dtype=torch.float64) * ROPE.inv_freq()
        ks.append(rotate(tk, torch.cos(ang).float(), torch.sin(ang).float(), ROPE.rotary_dim, False))
        vs.append(tv)
        pos += list(range(6 + delta, 6 + delta + n))
        start += n
    return torch.cat(ks, 1), torch.cat(vs, 1), pos


@pytest.mark.parametrize("layout", ["shared", "sequential"])
def test_merge_zero_copy_when_threads_are_given_up(layout):
    s = _store()
    p, (pk, pv), threads, tkv = _prefix_and_threads(s)
    free = s.num_free
    table = [i for t in threads for i in t.pages[len(p.pages):]]
    merged = kvfuse.merge(threads, layout)
    assert s.num_free == free  # no page allocated: page tables were concatenated
    assert merged.pages == p.pages + table
    k, v = merged.gather()
    ek, ev, pos = _expected(pk, pv, tkv, layout)
    torch.testing.assert_close(k, ek, atol=1e-5, rtol=1e-5)
    assert torch.equal(v, ev)
    assert merged.positions().tolist() == pos
    assert merged.next_position == max(pos) + 1 and merged.num_tokens == 14
    # the continuation sees everything; threads do not see each other
    g = merged.token_graph()
    assert g.num_tokens == 14
    assert torch.equal(g.dense_mask(), kvfuse.SegmentGraph.fork_join(6, [5, 0, 3]).dense_mask())
    assert g.segments[-1].length == 0 and len(g.segments[-1].parents) == 4


def test_merge_keep_threads_copies_and_leaves_them_intact():
    s = _store()
    p, (pk, pv), threads, tkv = _prefix_and_threads(s)
    snap = [t.gather() for t in threads]
    merged = kvfuse.merge(threads, "sequential", keep_threads=True)
    for t, (k, v) in zip(threads, snap):
        assert not t.released
        gk, gv = t.gather()
        assert torch.equal(gk, k) and torch.equal(gv, v)
    ek, ev, _ = _expected(pk, pv, tkv, "sequential")
    k, v = merged.gather()
    torch.testing.assert_close(k, ek, atol=1e-5, rtol=1e-5)
    assert torch.equal(v, ev)
    # a kept thread that continues does not disturb the merged sequence (its last page is copied on write)
    threads[2].append_kv(*_kv(2))
    k2, _ = merged.gather()
    assert torch.equal(k2, k)


def test_merge_out_of_pages_changes_nothing():
    s = _store(7)
    p, _, threads, _ = _prefix_and_threads(s)  # 2 + 2 + 0 + 1 pages
    s.alloc(s.num_free)
    snap = (list(s.refcount), s.k_cache.clone())
    with pytest.raises(RuntimeError, match="out of pages"):
        kvfuse.merge(threads, "sequential", keep_threads=True)
    assert list(s.refcount) == snap[0] and torch.equal(s.k_cache, snap[1])
    assert not any(t.released for t in threads)


def _dense_attention(q, k, v, mask, scale):
    """q [n, Hq, D], k/v [m, Hkv, D], mask bool [n, m] -> [n, Hq, D] (float64 oracle)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    sc = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    sc = sc.masked_fill(~mask[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", sc.softmax(-1), v).float()


@pytest.mark.parametrize("hogwild", [False, True], ids=["own", "hogwild"])
def test_batched_thread_attention(hogwild):
    s = _store()
    p, (pk, pv), threads, tkv = _prefix_and_threads(s, lens=(5, 1, 3))
    steps = [_kv(1) for _ in threads]
    for t, (k, v) in zip(threads, steps):  # this step's token of every thread
        t.append_kv(k, v)
    bp = kvfuse.batch_plan(threads, 1, hogwild=hogwild)
    q = torch.randn(len(threads), 2 * H, D)
    for layer in range(L):
        out = kvfuse.attention(q, s.k_cache[layer], s.v_cache[layer], bp.block_table, bp.plan)
        for i, (tk, tv) in enumerate(tkv):
            ks = [pk[layer], tk[layer]]
            vs = [pv[layer], tv[layer]]
            if hogwild:  # the others' tokens written before this step
                ks += [o[0][layer] for j, o in enumerate(tkv) if j != i]
                vs += [o[1][layer] for j, o in enumerate(tkv) if j != i]
            ks.append(steps[i][0][layer, 0:1])
            vs.append(steps[i][1][layer, 0:1])
            k, v = torch.cat(ks), torch.cat(vs)
            want = _dense_attention(q[i: i + 1], k, v, torch.ones(1, k.shape[0], dtype=torch.bool), D**-0.5)
            torch.testing.assert_close(out[i: i + 1], want, atol=1e-5, rtol=1e-5)
