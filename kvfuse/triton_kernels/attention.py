"""Triton kernels: block-sparse segment attention over a paged KV pool (prefill and decode).

The plan's `TileMap` lists, per work item (one query tile of one sequence), the non-empty key tiles
and whether each is *full* (every pair visible: no mask work) or *partial* (element mask from the
segment graph). One kernel serves both regimes:

* prefill: a program is (query head, work item); rows are ``block_q`` query tokens of one head.
* decode (``block_q <= 16``): a program is (KV head, work item, split); rows are the ``block_q``
  tokens × all ``Hq / Hkv`` query heads of the KV head group, so every K/V page is read once per
  group, and the work item's key tiles are split over ``num_splits`` programs whose partial results
  are merged by their log-sum-exp in a second small kernel.

Scores run in base 2 (``sm_scale * log2(e)`` folded into one multiply); the returned LSE is natural
log. A query that sees no key gets a zero output and LSE -inf. Keys are gathered token by token
through the block table, so any page size works.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # older Triton: the pointer path only
    TensorDescriptor = None

from kvfuse.triton_kernels._common import interpreting, sm_count

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
DECODE_MAX_Q = 16


def tile_shape(head_dim: int, max_q_len: int, group: int = 1, itemsize: int = 2) -> tuple[int, int]:
    """(block_q, block_k) the plan is classified with. Decode (few queries per sequence) takes
    ``block_q`` = the next power of two of the query count; prefill takes tiles by the bytes of a row
    (``head_dim * itemsize``, so that the pipelined K/V tiles fit in shared memory): 128×128 up to
    256 bytes (16-bit head_dim 128), 64×64 up to 512 (head_dim 256, float32 128), 32×32 above
    (float32 256). Under the interpreter the tiles are 32 wide so small tests span many tiles."""
    if max_q_len <= DECODE_MAX_Q:
        return triton.next_power_of_2(max(1, max_q_len)), 16 if interpreting() else 128
    if interpreting():
        return 32, 32
    width = _width(head_dim, itemsize)
    return (128, 128) if width <= 128 else (64, 64) if width <= 256 else (32, 32)


def _width(head_dim: int, itemsize: int) -> int:
    """The head_dim of 16-bit elements a row of ``head_dim`` elements of ``itemsize`` bytes is as wide as."""
    return head_dim * itemsize // 2


LN2_C = tl.constexpr(LN2)


@triton.jit
def _cast(x, dtype: tl.constexpr, INTERP: tl.constexpr):
    """x.to(dtype). The interpreter truncates float32 -> bfloat16; round to nearest even first there so
    CPU runs have the GPU's numerics."""
    if INTERP and dtype == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr, acc=None):
    """tl.dot (accumulating into ``acc`` when given), with the operands widened to float32 first under
    the interpreter (whose bf16 dot is wrong)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _tanh(x):
    """tanh from exp (the interpreter and every target have exp): 1 - 2 / (e^2x + 1), exact at +-inf."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _tile(i, q, m_i, l_i, acc, k_ptr, v_ptr, bt_base, seg_base, anc_base, pos_base, kt_index_ptr, n, qseg,
          qtok, qpos, r_ok, kvh, qk_scale, window, cap_pre, cap_mul, HKV: tl.constexpr, PAGE: tl.constexpr,
          D: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, MASK: tl.constexpr,
          TMA: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr):
    """One key tile of the online softmax: scores (soft-capped), the element mask (segments, sliding
    window) on partial tiles, rescale, P @ V.

    TMA (the key tile lies inside one page): K and V come through tensor descriptors over the pool
    viewed as ``[P * page_size, Hkv * D]``, one bulk copy per tile; otherwise token by token through
    the block table."""
    d = tl.arange(0, D)
    kt = tl.load(kt_index_ptr + i)
    ktok = kt * BK + tl.arange(0, BK)
    k_ok = ktok < n
    if TMA:
        page0 = tl.load(bt_base + (kt * BK) // PAGE)
        row0 = page0 * PAGE + (kt * BK) % PAGE
        k = k_ptr.load([row0, kvh * D])
    else:
        page = tl.load(bt_base + ktok // PAGE, mask=k_ok, other=0)
        kv_row = ((page.to(tl.int64) * PAGE + ktok % PAGE) * HKV + kvh) * D
        k = tl.load(k_ptr + kv_row[:, None] + d[None, :], mask=k_ok[:, None], other=0.0)
    s = _dot(q, tl.trans(k), PREC, UPCAST)  # unscaled; the scale is folded into the exponent below
    if SOFTCAP:  # softcap * tanh(sm_scale * s / softcap), in base 2 (qk_scale is 1 then)
        s = _tanh(s * cap_pre) * cap_mul
    if MASK:
        kseg = tl.load(seg_base + ktok, mask=k_ok, other=-2)
        anc = tl.load(anc_base[:, None] + kseg[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0)
        vis = (anc != 0) | ((qseg[:, None] == kseg[None, :]) & (ktok[None, :] <= qtok[:, None]))
        if WINDOW:
            kpos = tl.load(pos_base + ktok, mask=k_ok, other=0)
            vis = vis & ((qpos[:, None] - kpos[None, :]) < window)
        s = tl.where(vis & k_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet
    else:  # a full tile: every row sees every key, so the running maximum is finite
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_use = m_new
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s * qk_scale - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if TMA:
        v = v_ptr.load([row0, kvh * D])
        if MASK:  # rows past the sequence's end hold whatever the pool has there (p is 0, but 0 * nan is nan)
            v = tl.where(k_ok[:, None], v, 0.0)
    else:
        v = tl.load(v_ptr + kv_row[:, None] + d[None, :], mask=k_ok[:, None], other=0.0)
    acc = _dot(_cast(p, v.dtype, UPCAST), v, PREC, UPCAST, acc * alpha[:, None])  # accumulate in place
    return m_new, l_i, acc


# sizes that change from step to step while decoding are not specialised on (divisibility by 16,
# == 1): each new specialisation is a compile of seconds in the middle of a decode loop
@triton.jit(do_not_specialize=["num_work", "bt_stride", "seg_stride", "num_segs", "total_q", "window"])
def _attn_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, bt_ptr, kvlen_ptr, qo_ptr, seg_ptr, anc_ptr, qtok_ptr, pos_ptr,
                 work_seq_ptr, work_qtile_ptr, kt_indptr_ptr, kt_index_ptr, nfull_ptr,
                 qk_scale, window, cap_pre, cap_mul, num_work, bt_stride, seg_stride, num_segs, total_q,
                 HQ: tl.constexpr, HKV: tl.constexpr, GROUP: tl.constexpr, PAGE: tl.constexpr,
                 D: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr, GP: tl.constexpr, HPP: tl.constexpr,
                 BM: tl.constexpr, NSPLIT: tl.constexpr, PREC: tl.constexpr,
                 INTERP: tl.constexpr, TMA: tl.constexpr = False, WS: tl.constexpr = False,
                 WINDOW: tl.constexpr = False, SOFTCAP: tl.constexpr = False):
    hb = tl.program_id(0)
    w = num_work - 1 - tl.program_id(1)  # the last query tiles have the most key tiles: start them first
    split = tl.program_id(2)

    b = tl.load(work_seq_ptr + w)
    qt = tl.load(work_qtile_ptr + w)
    q0 = tl.load(qo_ptr + b)
    q_len = tl.load(qo_ptr + b + 1) - q0
    n = tl.load(kvlen_ptr + b)

    m_idx = tl.arange(0, BM)
    t = m_idx // GP
    g = m_idx % GP
    rows = qt * BQ + t
    r_ok = (t < BQ) & (rows < q_len) & (g < HPP)
    head = hb * HPP + g
    kvh = (hb * HPP) // GROUP
    qtok = tl.load(qtok_ptr + q0 + rows, mask=r_ok, other=0)
    d = tl.arange(0, D)

    q_row = (q0 + rows).to(tl.int64) * HQ + head
    q = tl.load(q_ptr + q_row[:, None] * D + d[None, :], mask=r_ok[:, None], other=0.0)
    qseg = tl.load(seg_ptr + b.to(tl.int64) * seg_stride + qtok, mask=r_ok, other=-1)
    anc_base = anc_ptr + b.to(tl.int64) * num_segs * num_segs + qseg * num_segs
    seg_base = seg_ptr + b.to(tl.int64) * seg_stride
    pos_base = pos_ptr + b.to(tl.int64) * seg_stride
    qpos = qtok
    if WINDOW:
        qpos = tl.load(pos_base + qtok, mask=r_ok, other=0)
    bt_base = bt_ptr + b.to(tl.int64) * bt_stride

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)

    i0 = tl.load(kt_indptr_ptr + w)
    i1 = tl.load(kt_indptr_ptr + w + 1)
    f1 = i0 + tl.load(nfull_ptr + w)  # the work item's tiles are ordered full first, then partial
    if NSPLIT > 1:
        chunk = tl.cdiv(i1 - i0, NSPLIT)
        i0 = i0 + split * chunk
        i1 = tl.minimum(i0 + chunk, i1)
    fa = tl.minimum(f1, i1)
    pb = tl.maximum(f1, i0)
    # the interpreter cannot take loaded scalars as range() bounds; compiled code needs range() to pipeline
    if INTERP:
        i = i0
        while i < fa:
            m_i, l_i, acc = _tile(i, q, m_i, l_i, acc, k_ptr, v_ptr, bt_base, seg_base, anc_base, pos_base,
                                  kt_index_ptr, n, qseg, qtok, qpos, r_ok, kvh, qk_scale, window, cap_pre, cap_mul,
                                  HKV, PAGE, D, BK, PREC, INTERP, False, TMA, WINDOW, SOFTCAP)
            i += 1
        i = pb
        while i < i1:
            m_i, l_i, acc = _tile(i, q, m_i, l_i, acc, k_ptr, v_ptr, bt_base, seg_base, anc_base, pos_base,
                                  kt_index_ptr, n, qseg, qtok, qpos, r_ok, kvh, qk_scale, window, cap_pre, cap_mul,
                                  HKV, PAGE, D, BK, PREC, INTERP, True, TMA, WINDOW, SOFTCAP)
            i += 1
    else:
        for i in tl.range(i0, fa, warp_specialize=WS):
            m_i, l_i, acc = _tile(i, q, m_i, l_i, acc, k_ptr, v_ptr, bt_base, seg_base, anc_base, pos_base,
                                  kt_index_ptr, n, qseg, qtok, qpos, r_ok, kvh, qk_scale, window, cap_pre, cap_mul,
                                  HKV, PAGE, D, BK, PREC, INTERP, False, TMA, WINDOW, SOFTCAP)
        for i in range(pb, i1):
            m_i, l_i, acc = _tile(i, q, m_i, l_i, acc, k_ptr, v_ptr, bt_base, seg_base, anc_base, pos_base,
                                  kt_index_ptr, n, qseg, qtok, qpos, r_ok, kvh, qk_scale, window, cap_pre, cap_mul,
                                  HKV, PAGE, D, BK, PREC, INTERP, True, TMA, WINDOW, SOFTCAP)

    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * LN2_C, float("-inf"))
    if NSPLIT > 1:  # partial results [NSPLIT, total_q, HQ, (D)] in float32
        part = split.to(tl.int64) * total_q * HQ + q_row
        tl.store(o_ptr + part[:, None] * D + d[None, :], out, mask=r_ok[:, None])
        tl.store(lse_ptr + part, lse, mask=r_ok)
    else:
        o = _cast(out, o_ptr.dtype.element_ty, INTERP)
        tl.store(o_ptr + q_row[:, None] * D + d[None, :], o, mask=r_ok[:, None])
        tl.store(lse_ptr + q_row, lse, mask=r_ok)


@triton.jit(do_not_specialize=["rows"])
def _merge_splits_kernel(op_ptr, lp_ptr, o_ptr, lse_ptr, rows, NSPLIT: tl.constexpr, D: tl.constexpr,
                         BLOCK_R: tl.constexpr, INTERP: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < rows
    d = tl.arange(0, D)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for sp in tl.static_range(NSPLIT):
        m = tl.maximum(m, tl.load(lp_ptr + sp * rows + r, mask=r_ok, other=float("-inf")))
    m_use = tl.where(m == float("-inf"), 0.0, m)
    tot = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, D], tl.float32)
    for sp in tl.static_range(NSPLIT):
        wgt = tl.exp(tl.load(lp_ptr + sp * rows + r, mask=r_ok, other=float("-inf")) - m_use)
        o = tl.load(op_ptr + (sp * rows + r.to(tl.int64))[:, None] * D + d[None, :], mask=r_ok[:, None], other=0.0)
        acc += o * wgt[:, None]
        tot += wgt
    out = acc / tl.where(tot > 0, tot, 1.0)[:, None]
    o = _cast(out, o_ptr.dtype.element_ty, INTERP)
    tl.store(o_ptr + r.to(tl.int64)[:, None] * D + d[None, :], o, mask=r_ok[:, None])
    tl.store(lse_ptr + r, tl.where(tot > 0, m_use + tl.log(tl.where(tot > 0, tot, 1.0)), float("-inf")), mask=r_ok)


def _configs(decode: bool, head_dim: int):
    if decode:
        cfgs = [(4, 4), (4, 3), (8, 3)]
    elif head_dim <= 64:
        cfgs = [(4, 3), (4, 4), (8, 3)]
    elif head_dim <= 128:  # H200, 128x128 tiles: (8, 4) best with TMA, (8, 2) without
        # (bench/results/2026-11-22-h200-session2/prefill_sweep.md)
        cfgs = [(8, 4), (8, 3), (8, 2)]
    elif head_dim <= 256:
        cfgs = [(8, 2), (4, 2), (8, 3)]
    else:  # float32 at head_dim 256, 32x32 tiles
        cfgs = [(4, 2), (4, 1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w, s in cfgs]


_TUNED: dict = {}


def _kernel(decode: bool, head_dim: int):
    """The autotuned kernel for this regime (num_warps / num_stages per head_dim), or the plain one
    under the interpreter."""
    if interpreting():
        return _attn_kernel, dict(num_warps=4)
    key = (decode, head_dim)
    if key not in _TUNED:
        _TUNED[key] = triton.autotune(_configs(decode, head_dim),
                                      key=["D", "BK", "BM", "GP", "NSPLIT", "PAGE", "TMA", "WINDOW", "SOFTCAP"])(
            _attn_kernel)
    return _TUNED[key], {}


def num_splits(work: int, hkv: int, max_tiles: int, device: torch.device) -> int:
    """Splits of each decode work item's key tiles: enough programs for ~8 per multiprocessor,
    with at least 8 key tiles per split (2 under the interpreter). A power of two: the split count is
    a compile-time constant, so a growing context recompiles at most a few times."""
    min_tiles = 2 if device.type == "cpu" else 8
    want = triton.cdiv(8 * sm_count(device), max(1, work * hkv))
    n = int(max(1, min(want, max_tiles // min_tiles, 64)))
    return 1 << (n.bit_length() - 1)


def use_tma(k_cache: torch.Tensor, v_cache: torch.Tensor, block_k: int) -> bool:
    """Whether prefill key tiles can come through tensor descriptors (TMA on Hopper): every tile lies
    inside one page (``page_size % block_k == 0``), rows are 16-byte aligned, and the pool's rows fit
    the descriptor's int32 coordinates. ``KVFUSE_TRITON_TMA=0`` turns it off."""
    if TensorDescriptor is None or os.environ.get("KVFUSE_TRITON_TMA", "1") == "0":
        return False
    if k_cache.is_cuda and torch.cuda.get_device_capability(k_cache.device)[0] < 9:
        return False
    p, page, hkv, d = k_cache.shape
    row_bytes = hkv * d * k_cache.element_size()
    return (page % block_k == 0 and row_bytes % 16 == 0 and (d * k_cache.element_size()) % 16 == 0
            and p * page < 2**31 and all(c.data_ptr() % 16 == 0 for c in (k_cache, v_cache)))


def _descriptor(cache: torch.Tensor, block_k: int):
    p, page, hkv, d = cache.shape
    flat = cache.view(p * page, hkv * d)
    return TensorDescriptor(flat, list(flat.shape), list(flat.stride()), [block_k, d])


def segment_attention(q, k_cache, v_cache, block_table, kv_lens, qo_indptr, token_seg, ancestors, q_token, token_pos,
                      work_seq, work_qtile, kt_indptr, kt_index, kt_full, kt_order, n_full, block_q: int, block_k: int,
                      sm_scale: float, softcap: float = 0.0, window: int = 0):
    """Segment-masked attention over a paged pool with the plan's tile map.

    q ``[total_q, Hq, D]`` fp16/bf16/fp32; k_cache/v_cache contiguous ``[P, page_size, Hkv, D]``;
    block_table int32 ``[B, max_pages]``; kv_lens int32 ``[B]``; qo_indptr int32 ``[B+1]``; token_seg
    and token_pos int32 ``[B, max_kv]`` (contiguous, one stride); ancestors uint8 ``[B, S, S]``;
    q_token int32 ``[total_q]``; the tile map from ``plan.tiles(block_q, block_k, window or None)``;
    ``softcap`` 0 / ``window`` 0 turn soft-capping / the sliding window off.
    Returns ``(out [total_q, Hq, D] in q.dtype, lse [total_q, Hq] float32 natural log)``.
    """
    token_seg, token_pos = token_seg.contiguous(), token_pos.contiguous()
    if token_pos.shape != token_seg.shape:
        raise ValueError(f"token_pos {tuple(token_pos.shape)} must be shaped like token_seg {tuple(token_seg.shape)}")
    q, k_cache, v_cache = q.contiguous(), k_cache.contiguous(), v_cache.contiguous()
    total_q, hq, d = q.shape
    _, page, hkv, _ = k_cache.shape
    group = hq // hkv
    out = torch.empty_like(q)
    lse = torch.empty(total_q, hq, dtype=torch.float32, device=q.device)
    work = work_seq.numel()
    if work == 0 or total_q == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    decode = block_q <= DECODE_MAX_Q
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    if decode:
        gp = triton.next_power_of_2(group)
        hpp, bm = group, max(16, block_q * gp)
        max_tiles = triton.cdiv(block_table.shape[1] * page, block_k)
        nsplit = num_splits(work, hkv, max_tiles, q.device)
        grid = (hkv, work, nsplit)
    else:
        gp, hpp, bm, nsplit = 1, 1, block_q, 1
        grid = (hq, work, 1)
    kernel, launch = _kernel(decode, _width(d, q.element_size()))
    tma = not decode and use_tma(k_cache, v_cache, block_k)
    k_arg, v_arg = (_descriptor(k_cache, block_k), _descriptor(v_cache, block_k)) if tma else (k_cache, v_cache)
    if nsplit > 1:
        o_dst = torch.empty(nsplit, total_q, hq, d, dtype=torch.float32, device=q.device)
        l_dst = torch.empty(nsplit, total_q, hq, dtype=torch.float32, device=q.device)
    else:
        o_dst, l_dst = out, lse
    if softcap:  # the kernel computes softcap * tanh(sm_scale * s / softcap) directly in base 2
        qk_scale, cap_pre, cap_mul = 1.0, float(sm_scale) / softcap, softcap * LOG2E
    else:
        qk_scale, cap_pre, cap_mul = float(sm_scale) * LOG2E, 0.0, 0.0
    kernel[grid](q, k_arg, v_arg, o_dst, l_dst, block_table, kv_lens, qo_indptr, token_seg, ancestors, q_token,
                 token_pos, work_seq, work_qtile, kt_indptr, kt_order, n_full, qk_scale, int(window), cap_pre, cap_mul,
                 work, block_table.stride(0), token_seg.stride(0), ancestors.shape[-1], total_q,
                 HQ=hq, HKV=hkv, GROUP=group, PAGE=page, D=d, BQ=block_q, BK=block_k, GP=gp, HPP=hpp, BM=bm,
                 NSPLIT=nsplit, PREC=prec, INTERP=interpreting(), TMA=tma, WINDOW=bool(window),
                 SOFTCAP=bool(softcap), **launch)
    if nsplit > 1:
        rows = total_q * hq
        block_r = 16 if q.device.type == "cpu" else max(1, 2048 // d)
        _merge_splits_kernel[(triton.cdiv(rows, block_r),)](o_dst, l_dst, out, lse, rows, NSPLIT=nsplit, D=d,
                                                            BLOCK_R=block_r, INTERP=interpreting(), num_warps=4)
    return out, lse


__all__ = ["segment_attention", "tile_shape", "num_splits"]
