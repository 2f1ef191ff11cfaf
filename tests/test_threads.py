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
from tests.conftest import TOL, device_for, skip_unless_supported

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
        cos, sin, _ = ROPE.rotation_tables(torch.tensor([delta]))  # float64 angle, float32 table
        ks.append(rotate(tk, cos[0], sin[0], ROPE.rotary_dim, ROPE.interleaved))
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


def _assert_same_plan(got, want, tile_shapes):
    """Every tensor and field of the batch plan equals a fresh kvfuse.plan of the same graphs."""
    for name in ("q_lens", "kv_lens_list", "batch_size", "total_q", "max_kv", "max_q", "device"):
        assert getattr(got, name) == getattr(want, name), name
    fields = [k for k in vars(want) if not k.startswith("_") and k != "graphs"]
    for name in fields:  # a field added to AttentionPlan must be built here too
        w, g = getattr(want, name), getattr(got, name)
        if isinstance(w, torch.Tensor):
            assert g.dtype == w.dtype and torch.equal(g, w), name
    assert [repr(g) for g in got.graphs] == [repr(g) for g in want.graphs]
    assert got.visible_pairs() == want.visible_pairs()
    for bq, bk in tile_shapes:
        tg, tw = got.tiles(bq, bk), want.tiles(bq, bk)
        for f in ("work_seq", "work_qtile", "kt_indptr", "kt_index", "kt_full"):
            assert getattr(tg, f).dtype == getattr(tw, f).dtype and torch.equal(getattr(tg, f), getattr(tw, f)), f
        assert all(torch.equal(a, b) for a, b in zip(tg.kinds, tw.kinds)) and len(tg.kinds) == len(tw.kinds)


@pytest.mark.parametrize("hogwild", [False, True], ids=["own", "hogwild"])
def test_batch_plan_equals_a_fresh_plan_at_every_decode_step(hogwild):
    """batch_plan's decode path (rows of one shape classified once, token_seg gathered per shape, one
    transfer) builds exactly kvfuse.plan(AttentionSpec(graphs, q_lens)), step after step, and the
    attention over it is the same."""
    s = _store(64)
    _, _, rows, _ = _prefix_and_threads(s, lens=(5, 0, 3, 2, 2))  # the last two rows have one shape
    q = torch.randn(len(rows), 2 * H, D)
    for _ in range(PS + 2):  # crosses a page boundary
        for r in rows:
            r.append_kv(*_kv(1))
        bp = kvfuse.batch_plan(rows, 1, hogwild=hogwild)
        fresh = kvfuse.plan(kvfuse.AttentionSpec(bp.graphs, [1] * len(rows)))
        _assert_same_plan(bp.plan, fresh, [(1, 4), (1, 16), (2, 8)])
        if not hogwild:
            assert bp.block_table.tolist() == [r.pages + [0] * (bp.block_table.shape[1] - len(r.pages)) for r in rows]
        want = kvfuse.attention(q, s.k_cache[0], s.v_cache[0], bp.block_table, fresh, backend="torch")
        got = kvfuse.attention(q, s.k_cache[0], s.v_cache[0], bp.block_table, bp.plan, backend="torch")
        assert torch.equal(got, want)
    # several query tokens per row, and a row with none
    for r in rows:
        r.append_kv(*_kv(3))
    bp = kvfuse.batch_plan(rows, [3, 0, 2, 3, 3])
    _assert_same_plan(bp.plan, kvfuse.plan(kvfuse.AttentionSpec(bp.graphs, [3, 0, 2, 3, 3])), [(4, 4), (2, 8)])


# ---------------------------------------------------------------------------------------------- with a model
STEPS, PREFIX, PAGE = 16, 10, 4
FIRST = [5, 17, 33]  # each thread's first token (greedy threads from one prefix would be identical)
JOIN = 41  # the continuation's first token


def _models(arch):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("kvfuse.integrations.hf")
    from tests.hf_utils import make_model, small_config

    ref = make_model(arch)
    model = transformers.AutoModelForCausalLM.from_config(small_config(arch), attn_implementation="kvfuse")
    model.load_state_dict(ref.state_dict())
    return ref, model.float().eval()


def _greedy(step, first, n):
    """Feed ``first`` then greedy tokens, ``n`` forwards; returns (fed tokens [B, n], logits [B, n, V])."""
    tok, fed, logits = first, [], []
    for _ in range(n):
        out = step(tok)[:, -1]
        fed.append(tok)
        logits.append(out)
        tok = out.argmax(-1, keepdim=True)
    return torch.cat(fed, 1), torch.stack(logits, 1)


@pytest.mark.parametrize("layout", ["shared", "sequential"])
@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_fork_decode_merge_continue(arch, layout, monkeypatch):
    """Fork a prompt into 3 threads, greedy-decode 16 tokens each as ONE batch, merge, decode 16 more.

    Compared (float32; tolerance = rounding of summing the same products in another order):
    * thread phase, both layouts: every thread's logits equal an ordinary causal forward of
      [prefix, thread] (each thread sees the prefix and itself), so the greedy tokens agree too.
    * "shared": the continuation's logits equal ONE forward of the whole composed token sequence with
      the segment mask and the shared positions (the masked re-prefill): exact at every layer.
    * "sequential": the continuation's logits equal an eager continuation from each thread's own
      cache with its keys rotated to the new positions (the reference of what "sequential" means;
      it is NOT a re-prefill at the new positions, see kvfuse.threads).
    """
    from kvfuse.integrations import hf
    from tests.hf_utils import additive_mask, cache_from, cache_layers

    ref, model = _models(arch)
    cfg = model.config
    g = torch.Generator().manual_seed(7)
    prefix_ids = torch.randint(0, cfg.vocab_size, (1, PREFIX), generator=g)
    store = kvfuse.PagedKVStore.from_hf(cfg, num_pages=64, page_size=PAGE)
    prefix = store.sequence("prefix")
    hf.prefill(model, prefix, prefix_ids)
    threads = kvfuse.fork(prefix, 3)
    calls = []
    monkeypatch.setattr(hf, "attention", lambda q, *a, **k: calls.append(q.shape[0]) or kvfuse.attention(q, *a, **k))
    fed, logits = _greedy(lambda tok: hf.decode(model, threads, tok), torch.tensor(FIRST)[:, None], STEPS)
    assert calls == [3] * (STEPS * cfg.num_hidden_layers)  # one batched call per layer and step

    tol = dict(atol=2e-5, rtol=2e-5)
    thread_caches = []
    with torch.no_grad():
        for i in range(3):
            ids = torch.cat([prefix_ids[0], fed[i]])[None]
            out = ref(ids, use_cache=True)
            torch.testing.assert_close(logits[i], out.logits[0, PREFIX:], **tol)
            thread_caches.append(cache_layers(out.past_key_values))
    assert len({tuple(f.tolist()) for f in fed}) == 3  # the threads differ

    merged = kvfuse.merge(threads, layout)
    prefix.release()
    fed_c, logits_c = _greedy(lambda tok: hf.decode(model, [merged], tok), torch.tensor([[JOIN]]), STEPS)
    n = PREFIX + 3 * STEPS
    assert merged.num_tokens == n + STEPS

    with torch.no_grad():
        if layout == "shared":
            graph = merged.token_graph()  # prefix, three threads, the continuation (pads removed)
            positions = merged.positions()
            assert positions[n:].tolist() == list(range(PREFIX + STEPS, PREFIX + 2 * STEPS))
            ids = torch.cat([prefix_ids[0], *fed, fed_c[0]])[None]
            want = ref(ids, position_ids=positions[None], attention_mask=additive_mask(graph.dense_mask())).logits
            want = want[0, n:]
        else:
            rope = kvfuse.RopeConfig.from_hf(cfg)
            kv = []
            for layer in range(cfg.num_hidden_layers):
                ks, vs = [thread_caches[0][layer][0][:, :, :PREFIX]], [thread_caches[0][layer][1][:, :, :PREFIX]]
                for i, c in enumerate(thread_caches):
                    k, v = c[layer][0][:, :, PREFIX:], c[layer][1][:, :, PREFIX:]
                    cos, sin, _ = rope.rotation_tables(torch.tensor([i * STEPS]))  # pure rotation by the move
                    k = rotate(k.transpose(1, 2), cos[0], sin[0], rope.rotary_dim, rope.interleaved).transpose(1, 2)
                    ks.append(k)
                    vs.append(v)
                kv.append((torch.cat(ks, 2), torch.cat(vs, 2)))
            pos = torch.arange(n, n + STEPS)[None]
            assert merged.positions()[n:].tolist() == pos[0].tolist()
            want = ref(fed_c, position_ids=pos, past_key_values=cache_from(kv, cfg)).logits[0]
    torch.testing.assert_close(logits_c[0], want, **tol)
    assert torch.equal(want[:-1].argmax(-1), fed_c[0, 1:])  # same greedy tokens
    merged.release()
    assert store.num_free == store.num_pages


def test_join_parents_stay_short_and_see_everything():
    """After many fork / merge rounds (and a memory-style insert) the join lists only the last segment
    of the prefix and of each thread, and still sees every real token before it."""
    from kvfuse import memory

    store = kvfuse.PagedKVStore(1, 512, 4, 1, 8, rope=kvfuse.RopeConfig(head_dim=8))
    seq = store.sequence()
    seq.append_kv(torch.randn(1, 6, 1, 8), torch.randn(1, 6, 1, 8))
    block = memory.MemoryBlock(torch.randn(1, 3, 1, 8), torch.randn(1, 3, 1, 8), torch.arange(3), store.rope,
                               "m", {})
    for r in range(6):
        if r == 3:
            memory.insert(store, block, into=seq)
        threads = kvfuse.fork(seq, 3)
        for i, t in enumerate(threads):
            t.append_kv(torch.randn(1, 2 + i, 1, 8), torch.randn(1, 2 + i, 1, 8))
        seq.release()
        seq = kvfuse.merge(threads, layout="shared" if r % 2 else "sequential")
        assert len(seq.segments[-1].parents) <= 4
        seq.append_kv(torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8))
    g = seq.token_graph()
    j0, j1 = g.token_range(seq.segments[-1].name)
    assert bool(g.dense_mask()[j0:j1, :j0].all())


@pytest.mark.parametrize("window,softcap", [(None, 0.0), (4, 0.0), (None, 3.0)], ids=["plain", "window", "softcap"])
def test_shared_prefix_plan_gives_each_rows_attention(backend, window, softcap):
    """batch_plan(shared_prefix=True): the rows as one sequence reading the prefix once; every row's
    queries get what its own plan gives (torch, Triton, CUDA), over several steps and q lengths."""
    dev = device_for(backend)
    s = kvfuse.PagedKVStore(L, 64, PS, H, D, device=dev)
    p = s.sequence()
    p.append_kv(*(t.to(dev) for t in _kv(9)))
    rows = kvfuse.fork(p, 4)
    for r, n in zip(rows, (5, 0, 3, 2)):
        if n:
            r.append_kv(*(t.to(dev) for t in _kv(n)))
    dtype = torch.float32 if backend == "torch" else torch.float16
    k, v = s.k_cache[1].to(dtype), s.v_cache[1].to(dtype)
    skip_unless_supported("segment_attention", backend, q=torch.empty(1, 2 * H, D, dtype=dtype, device=dev),
                          k_cache=k)
    for q_lens in ([1, 1, 1, 1], [2, 1, 3, 1], [1, 1, 1, 1]):
        for r, n in zip(rows, q_lens):
            r.append_kv(*(t.to(dev) for t in _kv(n)))
        own, shared = kvfuse.batch_plan(rows, q_lens), kvfuse.batch_plan(rows, q_lens, shared_prefix=True)
        assert shared.block_table.shape[0] == 1 and shared.plan.total_q == sum(q_lens)
        q = torch.randn(sum(q_lens), 2 * H, D, device=dev).to(dtype)
        kw = dict(backend=backend, window=window, softcap=softcap)
        want = kvfuse.attention(q, k, v, own.block_table, own.plan, **kw)
        got = kvfuse.attention(q, k, v, shared.block_table, shared.plan, **kw)
        torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype][0], rtol=TOL[dtype][1])


def test_shared_prefix_choice():
    s = kvfuse.PagedKVStore(L, 200, PS, H, D)
    p = s.sequence()
    p.append_kv(*_kv(300))
    rows = kvfuse.fork(p, 3)
    for r in rows:
        r.append_kv(*_kv(1))
    assert kvfuse.batch_plan(rows, 1, shared_prefix=None).block_table.shape[0] == 1  # siblings, long prefix
    assert kvfuse.batch_plan(rows, 6, shared_prefix=None).block_table.shape[0] == 3  # 18 queries: not a decode
    assert kvfuse.batch_plan(rows[:1], 1, shared_prefix=None).block_table.shape[0] == 1
    other = s.sequence()
    other.append_kv(*_kv(2))
    assert kvfuse.batch_plan(rows[:2] + [other], 1, shared_prefix=None).block_table.shape[0] == 3  # not siblings
    with pytest.raises(ValueError, match="takes sibling threads"):
        kvfuse.batch_plan(rows[:2] + [other], 1, shared_prefix=True)
    with pytest.raises(ValueError, match="do not combine"):
        kvfuse.batch_plan(rows, 1, shared_prefix=True, hogwild=True)
