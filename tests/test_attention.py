"""Segment attention (prefill and decode) against a float64 oracle; merge_states; misuse errors.

Accuracy rule (flash-attn's): the kernel's max error against the float64 oracle is at most twice the
error of a plain torch computation in the same dtype (matmuls and softmax in that dtype), plus a
floor of 1e-4 for the cases where torch happens to be almost exact.
"""

import math

import pytest
import torch

import kvfuse
from kvfuse import Segment, SegmentGraph
from kvfuse.reference import segment_attention as ref_attention
from tests.conftest import device_for, pool_randn, skip_unless_supported


def _graphs(case):
    if case == "prefill-fork-join":
        return [SegmentGraph.fork_join(prefix=37, threads=[19, 0, 40], join=9)], None
    if case == "prefill-batch":
        return [SegmentGraph.fork_join(prefix=20, threads=[13, 7]),
                SegmentGraph([Segment("a", 50)]),
                SegmentGraph.fork_join(prefix=3, threads=[30, 31, 1], join=5)], None
    if case == "chunked-prefill":  # the last 24 tokens are the queries
        return [SegmentGraph.fork_join(prefix=40, threads=[20, 20], join=24)], [24]
    if case == "decode":
        return [SegmentGraph.fork_join(prefix=64, threads=[33, 17], join=1),
                SegmentGraph([Segment("p", 70)]),
                SegmentGraph.fork_join(prefix=5, threads=[2, 2], join=1)], [1, 1, 1]
    if case == "mixed-prefill-decode":  # one batch: a chunked prefill, two decodes, a whole prefill
        return [SegmentGraph.fork_join(prefix=30, threads=[20, 15], join=24),
                SegmentGraph([Segment("p", 70)]),
                SegmentGraph.fork_join(prefix=5, threads=[2, 2], join=1),
                SegmentGraph([Segment("a", 41)])], [24, 1, 1, 41]
    if case == "decode-cross-thread":  # the decoding token continues thread0 only
        g = SegmentGraph([Segment("p", 48), Segment("t0", 30, ("p",)), Segment("t1", 25, ("p",)),
                          Segment("next", 3, ("t0",))])
        return [g, g], [3, 1]
    raise KeyError(case)


CASES = ["prefill-fork-join", "prefill-batch", "chunked-prefill", "decode", "decode-cross-thread",
         "mixed-prefill-decode"]


def _setup(graphs, q_lens, hq, hkv, d, page_size, dtype, dev):
    p = kvfuse.plan(kvfuse.AttentionSpec(graphs, q_lens=q_lens, device=dev))
    pages_per_seq = [-(-n // page_size) for n in p.kv_lens_list]
    num_pages = sum(pages_per_seq) + 3
    perm = torch.randperm(num_pages)  # scattered, non-monotonic page ids
    table = torch.zeros(len(graphs), max(pages_per_seq), dtype=torch.int32)
    off = 0
    for b, n in enumerate(pages_per_seq):
        table[b, :n] = perm[off: off + n].to(torch.int32)
        off += n
    k = pool_randn((num_pages, page_size, hkv, d), dtype, dev)
    v = pool_randn((num_pages, page_size, hkv, d), dtype, dev)
    q = pool_randn((p.total_q, hq, d), dtype, dev)
    return p, q, k, v, table.to(dev)


def _torch_same_dtype(q, k, v, table, p, scale):
    """Masked attention computed entirely in q's dtype (the precision yardstick)."""
    outs = []
    for b in range(p.batch_size):
        n, ql = p.kv_lens_list[b], p.q_lens[b]
        q0 = int(p.qo_indptr[b])
        kk = kvfuse.gather_kv(k, table[b], n).repeat_interleave(q.shape[1] // k.shape[2], 1)
        vv = kvfuse.gather_kv(v, table[b], n).repeat_interleave(q.shape[1] // k.shape[2], 1)
        m = p.graphs[b].dense_mask(torch.arange(n - ql, n), torch.arange(n)).to(q.device)
        s = torch.einsum("qhd,khd->hqk", q[q0:q0 + ql], kk) * scale
        s = s.masked_fill(~m[None], float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", torch.softmax(s.float(), -1).to(q.dtype), vv))
    return torch.cat(outs)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("hq,hkv", [(4, 1), (6, 2), (2, 2)], ids=["mqa4", "gqa3", "mha"])
@pytest.mark.parametrize("d,page_size", [(64, 16), (128, 1), (128, 16)], ids=["d64-ps16", "d128-ps1", "d128-ps16"])
def test_attention_against_float64_oracle(backend, case, dtype, hq, hkv, d, page_size):
    dev = device_for(backend)
    graphs, q_lens = _graphs(case)
    p, q, k, v, table = _setup(graphs, q_lens, hq, hkv, d, page_size, dtype, dev)
    skip_unless_supported("segment_attention", backend, q=q, k_cache=k, plan=p)
    scale = 1 / math.sqrt(d)
    out, lse = kvfuse.attention(q, k, v, table, p, return_lse=True, backend=backend)
    assert out.dtype == dtype and out.shape == q.shape and lse.dtype == torch.float32
    want, want_lse = ref_attention(q.double(), k.double(), v.double(), table, p.kv_lens, p.qo_indptr,
                                   p.token_seg, p.ancestors, scale)
    base_err = (_torch_same_dtype(q, k, v, table, p, scale).double() - want).abs().max().item()
    err = (out.double() - want).abs().max().item()
    assert torch.isfinite(out).all()
    assert err <= 2 * base_err + 1e-4, f"error {err:.3g} vs torch-in-{dtype} {base_err:.3g}"
    torch.testing.assert_close(lse, want_lse.float(), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("case", ["prefill-fork-join", "decode", "mixed-prefill-decode"])
def test_attention_head_dim_256(backend, case):
    dev = device_for(backend)
    graphs, q_lens = _graphs(case)
    p, q, k, v, table = _setup(graphs, q_lens, 4, 2, 256, 16, torch.bfloat16, dev)
    skip_unless_supported("segment_attention", backend, q=q, k_cache=k, plan=p)
    out = kvfuse.attention(q, k, v, table, p, backend=backend)
    want, _ = ref_attention(q.double(), k.double(), v.double(), table, p.kv_lens, p.qo_indptr,
                            p.token_seg, p.ancestors, 1 / 16)
    base_err = (_torch_same_dtype(q, k, v, table, p, 1 / 16).double() - want).abs().max().item()
    assert (out.double() - want).abs().max().item() <= 2 * base_err + 1e-4


def test_reference_matches_sdpa_with_dense_mask():
    """The reference itself against torch SDPA with the graph's dense mask (float64)."""
    graphs, q_lens = _graphs("chunked-prefill")
    p, q, k, v, table = _setup(graphs, q_lens, 4, 2, 32, 8, torch.float64, torch.device("cpu"))
    out, _ = ref_attention(q, k, v, table, p.kv_lens, p.qo_indptr, p.token_seg, p.ancestors, 0.3)
    n = p.kv_lens_list[0]
    kk = kvfuse.gather_kv(k, table[0], n).repeat_interleave(2, 1).transpose(0, 1)
    vv = kvfuse.gather_kv(v, table[0], n).repeat_interleave(2, 1).transpose(0, 1)
    m = graphs[0].dense_mask(torch.arange(n - 24, n), torch.arange(n))
    want = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), kk, vv, attn_mask=m, scale=0.3)
    torch.testing.assert_close(out, want.transpose(0, 1))


def test_merge_states_of_split_keys_equals_full(backend):
    """Attention over keys A, over keys B, merged == attention over A u B (via two graphs)."""
    dev = device_for(backend)
    n_a, n_b, h, d = 20, 13, 3, 16
    q = torch.randn(5, h, d, dtype=torch.float32, device=dev)
    k = torch.randn(n_a + n_b, h, d, dtype=torch.float32, device=dev)
    v = torch.randn(n_a + n_b, h, d, dtype=torch.float32, device=dev)

    def part(ks, vs):
        s = torch.einsum("qhd,khd->qhk", q, ks)
        return torch.einsum("qhk,khd->qhd", torch.softmax(s, -1), vs), torch.logsumexp(s, -1)

    va, sa = part(k[:n_a], v[:n_a])
    vb, sb = part(k[n_a:], v[n_a:])
    vf, sf = part(k, v)
    skip_unless_supported("merge_states", backend, v=va)
    vm, sm = kvfuse.merge_states(va, sa, vb, sb, backend=backend)
    torch.testing.assert_close(vm, vf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sm, sf, atol=1e-5, rtol=1e-5)
    # an empty side (-inf) contributes nothing
    vm2, sm2 = kvfuse.merge_states(va, sa, vb, torch.full_like(sb, float("-inf")), backend=backend)
    torch.testing.assert_close(vm2, va, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sm2, sa)


def test_lse_base_conversion():
    lse = torch.tensor([[0.0, 1.0, -2.5]])
    torch.testing.assert_close(kvfuse.lse_to_base2(lse), lse / math.log(2))
    torch.testing.assert_close(kvfuse.lse_from_base2(kvfuse.lse_to_base2(lse)), lse)


def test_attention_misuse_fails_loudly():
    graphs, q_lens = _graphs("decode")
    p, q, k, v, table = _setup(graphs, q_lens, 4, 2, 32, 8, torch.float32, torch.device("cpu"))
    with pytest.raises(TypeError, match="AttentionPlan"):
        kvfuse.attention(q, k, v, table, None)
    with pytest.raises(ValueError, match="plan was made for"):
        kvfuse.attention(q[:2], k, v, table, p)
    with pytest.raises(ValueError, match="block_table has 2 rows"):
        kvfuse.attention(q, k, v, table[:2], p)
    with pytest.raises(ValueError, match="columns"):
        kvfuse.attention(q, k, v, table[:, :3], p)
    with pytest.raises(ValueError, match="multiple"):
        kvfuse.attention(q[:, :3], k, v, table, p)
    with pytest.raises(TypeError, match="v_cache"):
        kvfuse.attention(q, k, v.half(), table, p)
    with pytest.raises(TypeError, match="block_table"):
        kvfuse.attention(q, k, v, table.long(), p)
    bad = table.clone()
    bad[0, 0] = k.shape[0]
    with pytest.raises(ValueError, match="page ids"):
        kvfuse.attention(q, k, v, bad, p)
    # the check is cached per (table, version): a table that passed and is then changed in place is checked again
    ok = table.clone()
    kvfuse.attention(q, k, v, ok, p)
    ok[0, 0] = k.shape[0]
    with pytest.raises(ValueError, match="page ids"):
        kvfuse.attention(q, k, v, ok, p)


def test_strided_block_table_is_honoured(backend):
    dev = device_for(backend)
    graphs, q_lens = _graphs("decode")
    p, q, k, v, table = _setup(graphs, q_lens, 4, 2, 64, 16, torch.bfloat16, dev)
    skip_unless_supported("segment_attention", backend, q=q, k_cache=k, plan=p)
    wide = torch.zeros(table.shape[0], 2 * table.shape[1], dtype=torch.int32, device=dev)
    wide[:, ::2] = table
    strided = wide[:, ::2]
    assert not strided.is_contiguous()
    torch.testing.assert_close(kvfuse.attention(q, k, v, strided, p, backend=backend),
                               kvfuse.attention(q, k, v, table, p, backend=backend))


def test_plan_rejects_float_q_lens():
    with pytest.raises(TypeError, match="q_lens"):
        kvfuse.plan(kvfuse.AttentionSpec([SegmentGraph([Segment("a", 4)])], q_lens=[2.9]))


@pytest.mark.parametrize("case", ["prefill-fork-join", "decode"])
@pytest.mark.parametrize("softcap", [0.0, 5.0], ids=["plain", "softcap"])
def test_negative_sm_scale(backend, case, softcap):
    """A negative softmax scale is a valid scale: the scores are ``sm_scale * q.k`` with the sign kept
    (kernels that take the row max of unscaled scores would get it backwards)."""
    dev = device_for(backend)
    graphs, q_lens = _graphs(case)
    p, q, k, v, table = _setup(graphs, q_lens, 4, 2, 64, 16, torch.float16, dev)
    skip_unless_supported("segment_attention", backend, q=q, k_cache=k, plan=p)
    out, lse = kvfuse.attention(q, k, v, table, p, sm_scale=-0.3, softcap=softcap, return_lse=True, backend=backend)
    want, want_lse = ref_attention(q.double(), k.double(), v.double(), table, p.kv_lens, p.qo_indptr,
                                   p.token_seg, p.ancestors, -0.3, softcap=softcap)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse, want_lse.float(), atol=2e-3, rtol=2e-3)
