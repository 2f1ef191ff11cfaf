"""kvfuse.sdpa against torch's SDPA, kvfuse.flash_attn_with_kvcache against a float64 oracle of
flash-attn's semantics (and against flash-attn itself when it is importable, on a GPU)."""

import math

import pytest
import torch
import torch.nn.functional as F

import kvfuse
from kvfuse import Segment, SegmentGraph
from tests.conftest import device_for

ATOL = RTOL = 1e-5  # float32 in and out, float32 math inside on values of order 1


def _sdpa_cases():  # kv=True: a segment mask, computed by kvfuse.attention (the others go to torch)
    yield "causal", dict(L=7, S=7, is_causal=True, kv=True)
    yield "causal-top-left", dict(L=3, S=9, is_causal=True, kv=True)
    yield "decode", dict(L=1, S=13, kv=True)
    yield "gqa", dict(L=5, S=5, is_causal=True, hkv=1, enable_gqa=True, kv=True)
    yield "scale", dict(L=1, S=6, scale=0.3, kv=True)
    yield "bottom-right-mask", dict(L=4, S=10, mask="bottom-right", kv=True)
    yield "other-mask", dict(L=4, S=10, mask="random")
    yield "float-mask", dict(L=4, S=10, mask="float")
    yield "causal-L>S", dict(L=6, S=4, is_causal=True)
    yield "full-L>1", dict(L=3, S=8)
    yield "head-dim-64-one-row", dict(L=2, S=2, is_causal=True, b=1, d=64, kv=True)


@pytest.mark.parametrize("case", [c for _, c in _sdpa_cases()], ids=[n for n, _ in _sdpa_cases()])
def test_sdpa_matches_torch(case, monkeypatch):
    b, hq, d = case.get("b", 2), 4, case.get("d", 16)
    hkv = case.get("hkv", hq)
    L, S = case["L"], case["S"]
    q, k, v = torch.randn(b, hq, L, d), torch.randn(b, hkv, S, d), torch.randn(b, hkv, S, d)
    mask = None
    if case.get("mask") == "bottom-right":
        mask = torch.ones(L, S, dtype=torch.bool).tril(S - L)
    elif case.get("mask") == "random":
        mask = torch.rand(b, 1, L, S) > 0.3
        mask[..., 0] = True
    elif case.get("mask") == "float":
        mask = torch.randn(L, S)
    kw = dict(attn_mask=mask, is_causal=case.get("is_causal", False), scale=case.get("scale"),
              enable_gqa=case.get("enable_gqa", False))
    want = F.scaled_dot_product_attention(q, k, v, **kw)
    if case.get("kv"):
        monkeypatch.setattr(kvfuse.compat.F, "scaled_dot_product_attention", None)  # must not be called
    got = kvfuse.sdpa(q, k, v, **kw)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32], ids=["bool", "additive"])
def test_sdpa_softcap_fallback_query_that_sees_no_key(mask_dtype):
    """The written-out soft-cap path follows torch's SDPA where a query sees no key: a zero output, not NaN
    (left padding under a sliding window). A cap far above the scores leaves them as they are."""
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    mask = torch.rand(3, 5) > 0.3
    mask[0], mask[1:, 0] = False, True
    if mask_dtype is torch.float32:
        mask = torch.zeros(3, 5).masked_fill(~mask, float("-inf"))
    got = kvfuse.sdpa(q, k, v, attn_mask=mask, softcap=1e9)
    assert torch.equal(got[:, :, 0], torch.zeros_like(got[:, :, 0]))
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=ATOL, rtol=RTOL)


def test_sdpa_gradients_and_dropout_go_to_torch():
    q, k, v = (torch.randn(1, 2, 3, 8, requires_grad=True) for _ in range(3))
    out = kvfuse.sdpa(q, k, v, is_causal=True)
    out.sum().backward()
    assert q.grad is not None
    torch.manual_seed(0)
    a = kvfuse.sdpa(q.detach(), k.detach(), v.detach(), dropout_p=0.5)
    torch.manual_seed(0)
    b = F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), dropout_p=0.5)
    assert torch.equal(a, b)


def test_sdpa_segments():
    g = SegmentGraph.fork_join(prefix=6, threads=[4, 3], join=2)
    b, hq, hkv, d = 2, 4, 2, 16
    n, L = g.num_tokens, 5
    q, k, v = torch.randn(b, hq, L, d), torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d)
    got = kvfuse.sdpa(q, k, v, segments=g, enable_gqa=True)
    mask = g.dense_mask()[n - L:]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    # one graph per row, the shorter one ignoring the keys past its end
    g2 = SegmentGraph([Segment("a", 9)])
    got = kvfuse.sdpa(q, k, v, segments=[g, g2], enable_gqa=True)
    want1 = F.scaled_dot_product_attention(q[1:], k[1:, :, :9], v[1:, :, :9], attn_mask=g2.dense_mask()[9 - L:],
                                           enable_gqa=True)
    torch.testing.assert_close(got[1:], want1, atol=ATOL, rtol=RTOL)
    with pytest.raises(ValueError, match="segments"):
        kvfuse.sdpa(q, k, v, is_causal=True, segments=g, enable_gqa=True)


# ---------------------------------------------------------------------------------------------- flash-attn
def _rope_tables(n, rd, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * inv
    return torch.cos(ang).float(), torch.sin(ang).float()


def _rope_oracle(x, pos, cos, sin, interleaved):
    """x [B, n, H, D] rotated at pos [B, n] (first 2 * cos.shape[-1] dims), float64."""
    rd = 2 * cos.shape[-1]
    c, s = cos[pos].double()[:, :, None], sin[pos].double()[:, :, None]
    x = x.double()
    if interleaved:
        x1, x2 = x[..., 0:rd:2], x[..., 1:rd:2]
        r = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), -1).flatten(-2)
    else:
        x1, x2 = x[..., : rd // 2], x[..., rd // 2: rd]
        r = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), -1)
    return torch.cat((r, x[..., rd:]), -1)


def _flash_oracle(q, ks, vs, causal, scale):
    """q [Lq, Hq, D]; ks/vs [Lk, Hkv, D]: flash-attn's (bottom-right) semantics in float64, with lse."""
    lq, lk = q.shape[0], ks.shape[0]
    rep = q.shape[1] // ks.shape[1]
    k, v = ks.double().repeat_interleave(rep, 1), vs.double().repeat_interleave(rep, 1)
    sc = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    if causal:
        m = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
        sc = sc.masked_fill(~m[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", sc.softmax(-1), v), torch.logsumexp(sc, -1)  # [Lq,Hq,D], [Hq,Lq]


FLASH_CASES = [
    dict(paged=True, causal=False, lq=1, new=1, rotary=None),
    dict(paged=True, causal=True, lq=3, new=3, rotary="neox"),
    dict(paged=False, causal=True, lq=2, new=2, rotary="interleaved"),
    dict(paged=False, causal=False, lq=3, new=1, rotary="neox"),
    dict(paged=False, causal=False, lq=2, new=0, rotary=None, batch_idx=True),
    dict(paged=True, causal=True, lq=4, new=0, rotary=None),
]


@pytest.mark.parametrize("case", FLASH_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_flash_attn_with_kvcache_semantics(case):
    torch.manual_seed(0)
    b, hq, hkv, d, page = 3, 4, 2, 32, 4
    lq, new = case["lq"], case["new"]
    seqlens = torch.tensor([5, 6, 11], dtype=torch.int32)
    cap = 16
    if case["paged"]:
        kc, vc = torch.randn(2, 16, page, hkv, d).unbind(0)
        perm = torch.randperm(16).to(torch.int32)
        table = perm[: b * cap // page].view(b, cap // page)
        rows_k = [kvfuse.gather_kv(kc, table[i], cap) for i in range(b)]
        rows_v = [kvfuse.gather_kv(vc, table[i], cap) for i in range(b)]
        extra = dict(block_table=table)
    else:
        kc, vc = torch.randn(2, b + 1, cap, hkv, d).unbind(0)
        idx = torch.tensor([2, 0, 3]) if case.get("batch_idx") else torch.arange(b)
        rows_k = [kc[i].clone() for i in idx]
        rows_v = [vc[i].clone() for i in idx]
        extra = dict(cache_batch_idx=idx.to(torch.int32)) if case.get("batch_idx") else {}
    q = torch.randn(b, lq, hq, d)
    k = torch.randn(b, new, hkv, d) if new else None
    v = torch.randn(b, new, hkv, d) if new else None
    rot = {}
    if case["rotary"]:
        cos, sin = _rope_tables(cap, 24)
        rot = dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=case["rotary"] == "interleaved")
    scale = 0.2
    out, lse = kvfuse.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=seqlens, softmax_scale=scale,
                                              causal=case["causal"], return_softmax_lse=True, **extra, **rot)
    assert out.shape == (b, lq, hq, d) and lse.shape == (b, hq, lq) and lse.dtype == torch.float32
    for i in range(b):
        n0 = int(seqlens[i])
        ks, vs, qi = rows_k[i][:n0].double(), rows_v[i][:n0].double(), q[i].double()
        if new:
            kn = k[i:i + 1]
            if rot:
                pos = torch.arange(n0, n0 + new)[None]
                qpos = (n0 + torch.arange(lq) if case["causal"] else torch.full((lq,), n0))[None]
                kn = _rope_oracle(kn, pos, rot["rotary_cos"], rot["rotary_sin"], rot["rotary_interleaved"])
                qi = _rope_oracle(q[i:i + 1], qpos, rot["rotary_cos"], rot["rotary_sin"],
                                  rot["rotary_interleaved"])[0]
            ks, vs = torch.cat([ks, kn[0].double()]), torch.cat([vs, v[i].double()])
        want, want_lse = _flash_oracle(qi, ks, vs, case["causal"], scale)
        torch.testing.assert_close(out[i].double(), want, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(lse[i].double(), want_lse, atol=ATOL, rtol=RTOL)
        # the new keys/values were written into the cache (rotated), nothing else of the row changed
        got_k = (kvfuse.gather_kv(kc, table[i], cap) if case["paged"] else kc[extra.get("cache_batch_idx",
                                                                                          torch.arange(b))[i]])
        torch.testing.assert_close(got_k[: n0 + new].double(), ks, atol=ATOL, rtol=RTOL)
        assert torch.equal(got_k[n0 + new:], rows_k[i][n0 + new:])


def test_flash_attn_unsupported_options():
    q, kc, vc = torch.randn(1, 2, 2, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)
    with pytest.raises(NotImplementedError, match="causal"):  # a bounded window of non-causal queries
        kvfuse.flash_attn_with_kvcache(q, kc, vc, window_size=(2, 0))
    with pytest.raises(ValueError, match="window_size"):
        kvfuse.flash_attn_with_kvcache(q, kc, vc, window_size=(-2, 0), causal=True)
    with pytest.raises(ValueError, match="softcap"):
        kvfuse.flash_attn_with_kvcache(q, kc, vc, softcap=-1.0)
    with pytest.raises(NotImplementedError, match="alibi"):
        kvfuse.flash_attn_with_kvcache(q, kc, vc, alibi_slopes=torch.ones(2))
    with pytest.raises(ValueError, match="both k and v"):
        kvfuse.flash_attn_with_kvcache(q, kc, vc, k=torch.randn(1, 1, 2, 8))


def _flash_attn():
    try:
        from flash_attn import flash_attn_with_kvcache
    except Exception:
        return None
    return flash_attn_with_kvcache if torch.cuda.is_available() else None


@pytest.mark.skipif(_flash_attn() is None, reason="flash-attn (and a CUDA GPU) not available")
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_with_kvcache_against_flash_attn(causal):
    fa = _flash_attn()
    dev, dt = "cuda", torch.float16
    b, hq, hkv, d, page, blocks = 2, 8, 2, 128, 256, 8
    kc, vc = torch.randn(2, blocks, page, hkv, d, device=dev, dtype=dt).unbind(0)
    table = torch.randperm(blocks, device=dev).to(torch.int32).view(b, blocks // b)
    seqlens = torch.tensor([100, 700], dtype=torch.int32, device=dev)
    q, k, v = (torch.randn(b, 2, h, d, device=dev, dtype=dt) for h in (hq, hkv, hkv))
    cos, sin = (t.to(dev, dt) for t in _rope_tables(blocks * page, 64))
    args = dict(cache_seqlens=seqlens, block_table=table, causal=causal, rotary_cos=cos, rotary_sin=sin,
                rotary_interleaved=False, return_softmax_lse=True, softmax_scale=1 / math.sqrt(d))
    kc2, vc2 = kc.clone(), vc.clone()
    want, want_lse = fa(q, kc, vc, k, v, **args)
    got, got_lse = kvfuse.flash_attn_with_kvcache(q, kc2, vc2, k, v, **args)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)  # fp16: a few roundings (conftest TOL)
    torch.testing.assert_close(got_lse, want_lse, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(kc2, kc, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("left,softcap,q_len", [(3, 0.0, 4), (0, 0.0, 2), (5, 2.0, 3), (-1, 1.5, 3), (2, 0.0, 1)],
                         ids=["window3", "window0", "window5-softcap2", "softcap1.5", "window2-one-query"])
def test_flash_attn_with_kvcache_window_and_softcap(backend, left, softcap, q_len):
    """flash-attn's local attention (query i sees keys [i + Lk - Lq - left, i + Lk - Lq]) and
    soft-capping, against a float64 computation written out."""
    dev = device_for(backend)
    if backend == "cuda":
        pytest.skip("fp32 inputs: the CUDA kernel takes fp16 / bf16 (its window and soft-cap: test_attention_options)")
    torch.manual_seed(3)
    b, hq, hkv, d, cap = 2, 4, 2, 16, 24
    q = torch.randn(b, q_len, hq, d, device=dev)
    kc, vc = torch.randn(2, b, cap, hkv, d, device=dev).unbind(0)
    lens = torch.tensor([11, 20], dtype=torch.int32, device=dev)
    out, lse = kvfuse.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, causal=True, window_size=(left, 0),
                                              softcap=softcap, return_softmax_lse=True, backend=backend)
    for r in range(b):
        n = int(lens[r])
        kk = kc[r, :n].double().repeat_interleave(hq // hkv, 1)
        vv = vc[r, :n].double().repeat_interleave(hq // hkv, 1)
        s = torch.einsum("qhd,khd->hqk", q[r].double(), kk) / math.sqrt(d)
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        i = torch.arange(q_len, device=dev)[:, None] + n - q_len
        j = torch.arange(n, device=dev)[None]
        vis = (j <= i) & ((j >= i - left) if left >= 0 else True)
        s = s.masked_fill(~vis, float("-inf"))
        want = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), vv)
        torch.testing.assert_close(out[r].double(), want, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(lse[r].double(), torch.logsumexp(s, -1), atol=ATOL, rtol=RTOL)
