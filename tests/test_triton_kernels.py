"""Triton-kernel specifics the backend-parametrized tests do not reach: split-K decode with many
splits, work items with no key tile, float32 attention, merge of two empty sides, odd shapes."""

import math
import os

import pytest
import torch

import kvfuse
from kvfuse import Segment, SegmentGraph, reference

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="triton kernels need a CUDA GPU or TRITON_INTERPRET=1")


def _dev():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _pool(n_tokens, page_size, hkv, d, dtype, dev):
    pages = [-(-n // page_size) for n in n_tokens]
    perm = torch.randperm(sum(pages) + 2).to(torch.int32)
    table = torch.zeros(len(n_tokens), max(pages), dtype=torch.int32)
    o = 0
    for b, m in enumerate(pages):
        table[b, :m] = perm[o: o + m]
        o += m
    k = torch.randn(sum(pages) + 2, page_size, hkv, d).to(dtype).to(dev)
    v = torch.randn(sum(pages) + 2, page_size, hkv, d).to(dtype).to(dev)
    return k, v, table.to(dev)


@pytest.mark.parametrize("nsplit", [1, 3, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_decode_splits_match_reference(monkeypatch, nsplit, dtype):
    from kvfuse.triton_kernels import attention as ta

    dev = _dev()
    monkeypatch.setattr(ta, "num_splits", lambda *a, **k: nsplit)
    g = SegmentGraph([Segment("p", 40), Segment("a", 37, ("p",)), Segment("b", 30, ("p",)),
                      Segment("next", 2, ("b",))])
    p = kvfuse.plan(kvfuse.AttentionSpec([g, SegmentGraph([Segment("x", 9)])], q_lens=[2, 1], device=dev))
    k, v, table = _pool(p.kv_lens_list, 8, 2, 64, dtype, dev)
    q = torch.randn(p.total_q, 6, 64).to(dtype).to(dev)
    out, lse = kvfuse.attention(q, k, v, table, p, return_lse=True, backend="triton")
    want, want_lse = reference.segment_attention(q.double(), k.double(), v.double(), table, p.kv_lens,
                                                 p.qo_indptr, p.token_seg, p.ancestors, 1 / 8)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, want_lse.float(), atol=1e-4, rtol=1e-4)


def test_work_item_without_key_tiles_gives_zero_and_minus_inf():
    from kvfuse.triton_kernels.attention import segment_attention

    dev = _dev()
    g = SegmentGraph([Segment("a", 20)])
    p = kvfuse.plan(kvfuse.AttentionSpec([g], device=dev))
    k, v, table = _pool([20], 4, 1, 32, torch.float16, dev)
    q = torch.randn(20, 2, 32).half().to(dev)
    tm = p.tiles(16, 16)
    empty = torch.zeros_like(tm.kt_indptr)  # drop every key tile
    out, lse = segment_attention(q, k, v, table, p.kv_lens, p.qo_indptr, p.token_seg, p.ancestors, p.q_token,
                                 p.token_pos, tm.work_seq, tm.work_qtile, empty, tm.kt_index[:0], tm.kt_full[:0],
                                 tm.kt_order[:0], torch.zeros_like(tm.n_full), 16, 16, 0.1)
    assert torch.equal(out, torch.zeros_like(out))
    assert bool(torch.isneginf(lse).all())


@pytest.mark.parametrize("d", [32, 64, 128, 256])
def test_prefill_float32(d):
    """float32 prefill at every head dim: on a GPU its tiles are sized by the bytes of a row (at
    head_dim 128 the 16-bit kernel's 128x128 tiles would not fit in shared memory)."""
    dev = _dev()
    g = SegmentGraph.fork_join(prefix=133, threads=[17, 1, 70], join=7)
    p = kvfuse.plan(kvfuse.AttentionSpec([g], device=dev))
    k, v, table = _pool(p.kv_lens_list, 5, 3, d, torch.float32, dev)
    q = torch.randn(p.total_q, 3, d, device=dev)
    out, lse = kvfuse.attention(q, k, v, table, p, return_lse=True, backend="triton")
    want, want_lse = reference.segment_attention(q.double(), k.double(), v.double(), table, p.kv_lens,
                                                 p.qo_indptr, p.token_seg, p.ancestors, 1 / math.sqrt(d))
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse.float(), atol=1e-5, rtol=1e-5)


def test_merge_states_both_sides_empty():
    dev = _dev()
    v = torch.randn(3, 2, 16, device=dev)
    s = torch.full((3, 2), float("-inf"), device=dev)
    s[0, 0] = 0.5
    vm, sm = kvfuse.merge_states(v, s, v * 2, s.clone(), backend="triton")
    wv, ws = reference.merge_states(v, s, v * 2, s.clone())
    torch.testing.assert_close(vm, wv)
    torch.testing.assert_close(sm, ws)


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_compose_partial_rotary_stacked_odd_heads(interleaved):
    dev = _dev()
    cfg = kvfuse.RopeConfig(head_dim=48, rotary_dim=24, interleaved=interleaved)
    k = torch.randn(2, 6, 3, 5, 48).to(dev)
    v = torch.randn(2, 6, 3, 5, 48).to(dev)
    src = torch.tensor([0, 1, 2, 4, 7], device=dev)
    dst = torch.tensor([9, 10, 11, 12, 13], device=dev)
    cos, sin, idx = cfg.rotation_tables(torch.tensor([3, 3, 5, -7, 100000]), device=dev)
    ka, va, kb, vb = k.clone(), v.clone(), k.clone(), v.clone()
    kvfuse.dispatch.implementation("compose_copy_", "triton")(ka, va, src, dst, idx, cos, sin, 24, interleaved)
    reference.compose_copy_(kb, vb, src, dst, idx, cos, sin, 24, interleaved)
    torch.testing.assert_close(ka, kb, atol=1e-5, rtol=1e-5)
    assert torch.equal(va, vb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_prefill_tensor_descriptor_path_with_poisoned_pool(dtype):
    """Pages that are a multiple of the key tile take the tensor-descriptor (TMA) path, which reads
    whole tiles: pool rows past a sequence's end (NaN here) must not leak into the output."""
    from kvfuse.triton_kernels import attention as ta

    dev = _dev()
    d = 64
    bq, bk = ta.tile_shape(d, 1000)
    page = 2 * bk
    graphs = [SegmentGraph.fork_join(prefix=bk + 3, threads=[bk - 5, 2 * bk + 1]), SegmentGraph([Segment("x", 7)])]
    p = kvfuse.plan(kvfuse.AttentionSpec(graphs, device=dev))
    k, v, table = _pool(p.kv_lens_list, page, 2, d, dtype, dev)
    for b, n in enumerate(p.kv_lens_list):  # poison every pool row that is not a token of a sequence
        last = int(table[b, (n - 1) // page])
        k[last, (n - 1) % page + 1:] = float("nan")
        v[last, (n - 1) % page + 1:] = float("nan")
    used = {int(x) for b, n in enumerate(p.kv_lens_list) for x in table[b, : -(-n // page)]}
    unused = [i for i in range(k.shape[0]) if i not in used]
    k[unused], v[unused] = float("nan"), float("nan")
    if dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] >= 9 or dev.type == "cpu":
        assert ta.use_tma(k, v, bk)
    q = torch.randn(p.total_q, 4, d).to(dtype).to(dev)
    out, lse = kvfuse.attention(q, k, v, table, p, return_lse=True, backend="triton")
    want, want_lse = reference.segment_attention(q.double(), k.double().nan_to_num(), v.double().nan_to_num(), table,
                                                 p.kv_lens, p.qo_indptr, p.token_seg, p.ancestors, 1 / 8)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, want_lse.float(), atol=1e-4, rtol=1e-4)


WRITE_DTYPES = [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float32, torch.float16)]


@pytest.mark.parametrize("layer", [-1, 0, 2], ids=["all-layers", "layer0", "layer2"])
@pytest.mark.parametrize("pool_dtype,src_dtype", WRITE_DTYPES, ids=["bf16", "f32-to-bf16", "f16-to-f32"])
@pytest.mark.parametrize("hkv,d", [(2, 16), (3, 24)], ids=["pow2", "odd-row"])
def test_write_kv_matches_reference(layer, pool_dtype, src_dtype, hkv, d):
    """The one-launch K/V write: exactly the reference's indexed assignment (casts included), nothing
    else of the partly poisoned pools touched; a non-contiguous source for one layer."""
    from kvfuse.triton_kernels.write_kv import write_kv_

    dev = _dev()
    L, P, S = 3, 6, 4
    kc = torch.full((L, P, S, hkv, d), float("nan"), dtype=pool_dtype, device=dev)
    kc[:, :3] = torch.randn(L, 3, S, hkv, d).to(pool_dtype).to(dev)
    vc = kc.flip(0).clone()
    kc2, vc2 = kc.clone(), vc.clone()
    slots = torch.tensor([22, 0, 9, 3, 17], dtype=torch.int32, device=dev)
    if layer < 0:
        k = torch.randn(L, 5, hkv, d).to(src_dtype).to(dev)
        v = torch.randn(L, 5, hkv, d).to(src_dtype).to(dev)
    else:
        k = torch.randn(hkv, 5, d).to(src_dtype).to(dev).transpose(0, 1)
        v = torch.randn(5, hkv, d).to(src_dtype).to(dev)
    write_kv_(kc, vc, slots, k, v, layer)
    reference.write_kv_(kc2, vc2, slots.long(), k, v, layer)
    assert torch.equal(kc.nan_to_num(7.0), kc2.nan_to_num(7.0))
    assert torch.equal(vc.nan_to_num(7.0), vc2.nan_to_num(7.0))
    assert not kc2.nan_to_num(7.0).equal(kc.clone().fill_(7.0))  # (the write did land somewhere)


def test_store_write_goes_through_the_write_kernel(monkeypatch):
    """`PagedKVStore.write_` dispatches to the Triton write kernel where that backend runs (forced on
    the CPU through KVFUSE_BACKEND=triton, under the interpreter)."""
    from kvfuse.triton_kernels.write_kv import write_kv_

    dev = _dev()
    kvfuse.dispatch._load("triton")
    calls = []

    def spy(*args):
        calls.append(args[-1])  # the layer
        write_kv_(*args)

    monkeypatch.setattr(kvfuse.dispatch._REGISTRY["write_kv_"]["triton"], "fn", spy)
    if dev.type == "cpu":
        monkeypatch.setenv("KVFUSE_BACKEND", "triton")
    store = kvfuse.PagedKVStore(2, 8, 4, 2, 16, dtype=torch.float32, device=dev)
    slots = torch.tensor([5, 30, 1], device=dev)
    k, v = torch.randn(3, 2, 16, device=dev), torch.randn(3, 2, 16, device=dev)
    store.write_(1, slots, k, v)
    assert calls == [1]
    assert torch.equal(store.k_cache[1].view(-1, 2, 16)[slots], k)
    assert torch.equal(store.v_cache[1].view(-1, 2, 16)[slots], v)
    assert not store.k_cache[0].any() and not store.v_cache[0].any()

