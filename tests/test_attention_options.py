"""Sliding windows, soft-capping and queries anywhere in the sequence: plan classification against the
dense mask, every backend against a float64 oracle.

Positions differ from token indices on purpose (the shared layout: threads share positions), so a
window that read token indices instead of positions would fail.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvfuse
from kvfuse import Segment, SegmentGraph
from kvfuse.attention import EMPTY, FULL
from kvfuse.reference import segment_attention as ref_attention
from tests.conftest import device_for, pool_randn, skip_unless_supported
from tests.test_plan import brute_tiles, graphs


def _shared_layout(prefix=37, threads=(19, 0, 40), join=9):
    """A fork-join graph whose threads all start at position ``prefix`` (shared layout)."""
    segs = [Segment("p", prefix)]
    segs += [Segment(f"t{i}", n, ("p",), prefix) for i, n in enumerate(threads)]
    segs.append(Segment("j", join, ("p",) + tuple(f"t{i}" for i in range(len(threads))), prefix + max(threads)))
    return SegmentGraph(segs)


@settings(max_examples=80, deadline=None)
@given(g=graphs(6, 30, positions=True), bq=st.sampled_from([1, 4, 16]), bk=st.sampled_from([1, 8, 16]),
       window=st.one_of(st.none(), st.integers(1, 40)), data=st.data())
def test_classification_is_safe_and_pairs_exact(g, bq, bk, window, data):
    """FULL only where every pair is visible, EMPTY only where none is (exact for the last q_len tokens
    without a window, conservative otherwise); the visible-pair count is exact."""
    n = g.num_tokens
    scattered = data.draw(st.booleans())
    if scattered:
        q_tokens = sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n)))
        spec = kvfuse.AttentionSpec([g], q_tokens=[q_tokens])
        qt = torch.tensor(q_tokens)
    else:
        q_len = data.draw(st.integers(1, n))
        spec = kvfuse.AttentionSpec([g], q_lens=[q_len])
        qt = torch.arange(n - q_len, n)
    p = kvfuse.plan(spec)
    want, pairs = brute_tiles(g, qt, bq, bk, window)
    got = p.tiles(bq, bk, window).kinds[0]
    assert not bool(((got == FULL) & (want != FULL)).any()), "a tile marked FULL has invisible pairs"
    assert not bool(((got == EMPTY) & (want != EMPTY)).any()), "a tile marked EMPTY has visible pairs"
    if not scattered and window is None:
        assert torch.equal(got, want)
    assert p.visible_pairs(window) == pairs


def test_window_skips_old_tiles():
    """A decode query with a window of 64 over 1000 tokens lists only the tiles the window reaches."""
    g = SegmentGraph([Segment("s", 1000)])
    tm = kvfuse.plan(kvfuse.AttentionSpec([g], q_lens=[1])).tiles(1, 16, 64)
    assert tm.kt_index.tolist() == list(range((1000 - 64) // 16, 1000 // 16 + 1))


CASES = {
    # name: (graphs, q_lens, q_tokens, window, softcap)
    "window-prefill-shared": ([_shared_layout()], None, None, 23, 0.0),
    "window-decode": ([_shared_layout(64, (33, 17), 1), SegmentGraph([Segment("p", 70)])], [1, 1], None, 40, 0.0),
    "softcap-prefill": ([_shared_layout()], None, None, None, 2.0),
    "softcap-decode-gemma2": ([SegmentGraph([Segment("p", 90)])], [3], None, None, 50.0),
    "window-softcap-chunked": ([_shared_layout()], [24], None, 17, 5.0),
    "scattered-queries": ([_shared_layout(), SegmentGraph([Segment("p", 50)])], None,
                          [[0, 5, 6, 7, 38, 40, 77, 78, 99, 104], list(range(3, 50, 4))], None, 0.0),
    "scattered-decode-window": ([_shared_layout()], None, [[39, 70, 104]], 30, 0.0),
}


def _same_dtype(q, k, v, table, p, scale, q_tokens, window, softcap):
    """Masked attention computed in q's dtype (the precision yardstick)."""
    outs = []
    for b in range(p.batch_size):
        n = p.kv_lens_list[b]
        q0, q1 = int(p.qo_indptr[b]), int(p.qo_indptr[b + 1])
        qt = q_tokens[b]
        kk = kvfuse.gather_kv(k, table[b], n).repeat_interleave(q.shape[1] // k.shape[2], 1)
        vv = kvfuse.gather_kv(v, table[b], n).repeat_interleave(q.shape[1] // k.shape[2], 1)
        m = p.graphs[b].dense_mask(qt, torch.arange(n), window=window).to(q.device)
        s = torch.einsum("qhd,khd->hqk", q[q0:q1], kk) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        s = s.masked_fill(~m[None], float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", torch.softmax(s.float(), -1).to(q.dtype), vv))
    return torch.cat(outs)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("hq,hkv,d,page_size", [(4, 1, 64, 16), (6, 2, 128, 5)], ids=["mqa4-d64-ps16", "gqa3-d128-ps5"])
def test_options_against_float64_oracle(backend, case, dtype, hq, hkv, d, page_size):
    dev = device_for(backend)
    graphs, q_lens, q_tokens, window, softcap = CASES[case]
    p = kvfuse.plan(kvfuse.AttentionSpec(graphs, q_lens=q_lens, q_tokens=q_tokens, device=dev))
    pages = [-(-n // page_size) for n in p.kv_lens_list]
    num_pages = sum(pages) + 3
    perm = torch.randperm(num_pages)
    table = torch.zeros(len(graphs), max(pages), dtype=torch.int32)
    off = 0
    for b, n in enumerate(pages):
        table[b, :n] = perm[off: off + n].to(torch.int32)
        off += n
    table = table.to(dev)
    k = pool_randn((num_pages, page_size, hkv, d), dtype, dev) * 3  # large scores: the cap matters
    v = pool_randn((num_pages, page_size, hkv, d), dtype, dev)
    q = pool_randn((p.total_q, hq, d), dtype, dev)
    skip_unless_supported("segment_attention", backend, q=q, k_cache=k, plan=p)
    scale = 1 / math.sqrt(d)
    out, lse = kvfuse.attention(q, k, v, table, p, softcap=softcap, window=window, return_lse=True, backend=backend)
    want, want_lse = ref_attention(q.double(), k.double(), v.double(), table, p.kv_lens, p.qo_indptr, p.token_seg,
                                   p.ancestors, scale, q_token=p.q_token, token_pos=p.token_pos, window=window,
                                   softcap=softcap)
    qts = [torch.tensor(t) for t in q_tokens] if q_tokens else \
        [torch.arange(n - ql, n) for n, ql in zip(p.kv_lens_list, p.q_lens)]
    base = (_same_dtype(q, k, v, table, p, scale, qts, window, softcap).double() - want).abs().max().item()
    err = (out.double() - want).abs().max().item()
    assert torch.isfinite(out).all()
    assert err <= 2 * base + 1e-4, f"error {err:.3g} vs torch-in-{dtype} {base:.3g}"
    torch.testing.assert_close(lse, want_lse.float(), atol=2e-3, rtol=2e-3)


def test_reference_window_and_softcap_against_a_dense_computation():
    """The reference's window and soft-capping, against scores written out by hand (float64)."""
    g = _shared_layout(8, (5, 6), 3)
    n = g.num_tokens
    p = kvfuse.plan(kvfuse.AttentionSpec([g]))
    k, v = torch.randn(2, n, 1, 8, dtype=torch.float64).unbind(0)
    q = torch.randn(n, 1, 8, dtype=torch.float64)
    table = torch.arange(n, dtype=torch.int32)[None]
    out, _ = ref_attention(q, k[:, None], v[:, None], table, p.kv_lens, p.qo_indptr, p.token_seg, p.ancestors, 0.7,
                           q_token=p.q_token, token_pos=p.token_pos, window=4, softcap=1.5)
    pos = g.token_positions()
    for i in range(n):
        s = 1.5 * torch.tanh(0.7 * (k[:, 0] @ q[i, 0]) / 1.5)
        vis = g.dense_mask()[i] & ((pos[i] - pos) < 4)
        w = torch.softmax(s.masked_fill(~vis, float("-inf")), 0)
        torch.testing.assert_close(out[i, 0], w @ v[:, 0])


@pytest.mark.parametrize("kw,match", [
    (dict(softcap=-1.0), "softcap"), (dict(softcap=float("nan")), "softcap"), (dict(window=0), "window"),
    (dict(window=2.5), "window"),
])
def test_bad_options_are_rejected(kw, match):
    g = SegmentGraph([Segment("s", 8)])
    p = kvfuse.plan(kvfuse.AttentionSpec([g]))
    k = torch.randn(1, 8, 1, 16)
    with pytest.raises(ValueError, match=match):
        kvfuse.attention(torch.randn(8, 1, 16), k, k, torch.zeros(1, 1, dtype=torch.int32), p, **kw)


@pytest.mark.parametrize("kw,err,match", [
    (dict(q_tokens=[[3, 2]]), ValueError, "strictly increasing"),
    (dict(q_tokens=[[0, 9]]), ValueError, "kv_len"),
    (dict(q_tokens=[[0]], q_lens=[1]), ValueError, "not both"),
    (dict(q_tokens=[5]), TypeError, "q_tokens"),
    (dict(q_lens=1), TypeError, "q_lens"),
])
def test_bad_specs_are_rejected(kw, err, match):
    g = SegmentGraph([Segment("s", 8)])
    with pytest.raises(err, match=match):
        kvfuse.plan(kvfuse.AttentionSpec([g], **kw))


def test_spec_errors_name_the_argument():
    g = SegmentGraph([Segment("s", 8)])
    with pytest.raises(TypeError, match=r"AttentionSpec\(\[graph\]\)"):
        kvfuse.plan(kvfuse.AttentionSpec(g))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no usable CUDA"):
            kvfuse.plan(kvfuse.AttentionSpec([g], device="cuda"))
    with pytest.raises(ValueError, match="device"):
        kvfuse.plan(kvfuse.AttentionSpec([g], device="gpu"))
