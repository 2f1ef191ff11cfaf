"""Segment graphs and the block classification of a plan, against the dense mask."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvfuse
from kvfuse import Segment, SegmentGraph
from kvfuse.attention import EMPTY, FULL, PARTIAL


@st.composite
def graphs(draw, max_segments=7, max_len=40, positions=False):
    """Random segment DAGs (never empty of tokens); with ``positions``, segments at random positions."""
    n = draw(st.integers(1, max_segments))
    segs = []
    for i in range(n):
        parents = draw(st.lists(st.integers(0, i - 1), max_size=3, unique=True)) if i else []
        pos = draw(st.one_of(st.none(), st.integers(0, 60))) if positions else None
        segs.append(Segment(f"s{i}", draw(st.integers(0, max_len)), tuple(f"s{p}" for p in parents), pos))
    if sum(s.length for s in segs) == 0:
        segs.append(Segment("tail", 3))
    return SegmentGraph(segs)


def brute_tiles(g, q_tokens, bq, bk, window=None):
    """The tile kinds and the visible-pair count of queries ``q_tokens`` from the dense mask."""
    n = g.num_tokens
    m = g.dense_mask(q_tokens, torch.arange(n), window=window)
    nqt, nkt = -(-q_tokens.numel() // bq), -(-n // bk)
    out = torch.empty(nqt, nkt, dtype=torch.int8)
    for i in range(nqt):
        for j in range(nkt):
            t = m[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
            out[i, j] = FULL if bool(t.all()) else PARTIAL if bool(t.any()) else EMPTY
    return out, int(m.sum())


@settings(max_examples=60, deadline=None)
@given(g=graphs(), bq=st.sampled_from([1, 4, 16]), bk=st.sampled_from([1, 8, 16]), data=st.data())
def test_tile_classification_matches_dense_mask(g, bq, bk, data):
    q_len = data.draw(st.integers(1, g.num_tokens))
    p = kvfuse.plan(kvfuse.AttentionSpec([g], q_lens=[q_len]))
    want, pairs = brute_tiles(g, torch.arange(g.num_tokens - q_len, g.num_tokens), bq, bk)
    assert torch.equal(p.tiles(bq, bk).kinds[0], want)
    assert p.visible_pairs() == pairs


def test_fork_join_mask_semantics():
    g = SegmentGraph.fork_join(prefix=3, threads=[2, 0, 2], join=2)
    m = g.dense_mask()
    a0, a1 = g.token_range("thread0")
    c0, c1 = g.token_range("thread2")
    assert m[a0:a1, :3].all() and not m[c0:c1, a0:a1].any()  # threads see the prefix, not each other
    j0, j1 = g.token_range("join")
    assert m[j0:j1, :j0].all()  # the join sees everything before it
    assert m[j0, j0] and not m[j0, j0 + 1]  # causal inside a segment


def test_tilemap_csr_lists_nonempty_tiles_only():
    g = SegmentGraph.fork_join(prefix=64, threads=[64, 64], join=32)
    tm = kvfuse.plan(kvfuse.AttentionSpec([g, g], q_lens=[224, 1])).tiles(32, 32)
    kinds = tm.kinds
    assert tm.work_seq.tolist() == [0] * 7 + [1]
    for w in range(tm.work_seq.numel()):
        b, qt = int(tm.work_seq[w]), int(tm.work_qtile[w])
        lo, hi = int(tm.kt_indptr[w]), int(tm.kt_indptr[w + 1])
        row = kinds[b][qt]
        assert tm.kt_index[lo:hi].tolist() == torch.nonzero(row).flatten().tolist()
        assert tm.kt_full[lo:hi].tolist() == (row[row != 0] == FULL).to(torch.int8).tolist()
    # thread 1's tiles (rows 64..127 of keys) are empty for thread 2's queries
    assert kinds[0][4, 2] == EMPTY and kinds[0][4, 0] == FULL


@pytest.mark.parametrize("segs,match", [
    ([Segment("a", 2), Segment("a", 3)], "duplicate"),
    ([Segment("a", 2, ("zz",))], "unknown parent"),
    ([Segment("a", 2, ("b",)), Segment("b", 2, ("a",))], "cycle"),
    ([Segment("a", 2, ("a",))], "cycle"),
    ([], "empty"),
])
def test_graph_rejects(segs, match):
    with pytest.raises(ValueError, match=match):
        SegmentGraph(segs)


def test_segment_rejects_negative_length():
    with pytest.raises(ValueError, match="length"):
        Segment("a", -1)


def test_plan_rejects_misuse():
    g = SegmentGraph.fork_join(prefix=4, threads=[2])
    with pytest.raises(TypeError, match="AttentionSpec"):
        kvfuse.plan([g])
    with pytest.raises(ValueError, match="q_lens"):
        kvfuse.plan(kvfuse.AttentionSpec([g], q_lens=[7]))
    with pytest.raises(ValueError, match="q_lens"):
        kvfuse.plan(kvfuse.AttentionSpec([g], q_lens=[1, 1]))
    with pytest.raises(TypeError, match="SegmentGraph"):
        kvfuse.plan(kvfuse.AttentionSpec(["g"]))


def test_large_plan_classifies_tiles_not_elements():
    """bench/TARGETS.md section 3 scale: 73K tokens in 128x128 tiles. The kinds match the fork/join
    structure (threads see the prefix, not each other), computed from segment intervals."""
    g = SegmentGraph.fork_join(prefix=8192, threads=[8192] * 8)
    tm = kvfuse.plan(kvfuse.AttentionSpec([g])).tiles(128, 128)
    assert tm.work_seq.numel() == 73728 // 128
    kinds = tm.kinds[0]
    q = 8192 // 128 * 3 + 5  # a query tile inside thread 2
    row = kinds[q]
    assert bool((row[:64] == FULL).all())  # the whole prefix
    assert bool((row[64:64 * 3] == EMPTY).all())  # threads 0 and 1
    assert row[q] == PARTIAL and bool((row[64 * 3:q] == FULL).all()) and bool((row[q + 1:] == EMPTY).all())


def test_segment_parents_string_is_rejected():
    with pytest.raises(TypeError, match="parents"):
        Segment("t", 2, "prefix")


@settings(max_examples=40, deadline=None)
@given(graph=graphs(), bq=st.sampled_from([1, 4, 16]), bk=st.sampled_from([4, 16]))
def test_full_first_order_lists_each_work_items_tiles_full_first(graph, bq, bk):
    """kt_order holds exactly each work item's key tiles, its n_full full ones (not past the end) first."""
    p = kvfuse.plan(kvfuse.AttentionSpec([graph]))
    tm = p.tiles(bq, bk)
    n = graph.num_tokens
    for w in range(tm.work_seq.numel()):
        lo, hi = int(tm.kt_indptr[w]), int(tm.kt_indptr[w + 1])
        idx, order, full = tm.kt_index[lo:hi].tolist(), tm.kt_order[lo:hi].tolist(), tm.kt_full[lo:hi].tolist()
        clean = {i for i, f in zip(idx, full) if f and (i + 1) * bk <= n}
        nf = int(tm.n_full[w])
        assert sorted(order) == idx
        assert set(order[:nf]) == clean and not clean & set(order[nf:])
        assert order[:nf] == sorted(order[:nf]) and order[nf:] == sorted(order[nf:])
