"""Triton kernel: fused compose copy ``k[dst] = R k[src]``, ``v[dst] = v[src]`` over all layers.

One pass: each program gathers a block of ``BLOCK_S`` source slots (all heads), rotates the first
``rotary_dim`` dims of K, copies K's other dims and all of V, and writes them to the destination
slots. Every byte of the listed source slots is read once and every destination byte written once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvfuse.triton_kernels._common import elems_per_program, slot_block


@triton.jit
def _compose_copy_kernel(k_ptr, v_ptr, src_ptr, dst_ptr, tidx_ptr, cos_ptr, sin_ptr, n, layer_stride,
                         H: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, H_P: tl.constexpr,
                         HALF_P: tl.constexpr, TAIL: tl.constexpr, TAIL_P: tl.constexpr, D_P: tl.constexpr,
                         BLOCK_S: tl.constexpr, INTERLEAVED: tl.constexpr):
    pid = tl.program_id(0)
    layer = tl.program_id(1)
    s_off = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = s_off < n
    src = tl.load(src_ptr + s_off, mask=s_ok, other=0).to(tl.int64)
    dst = tl.load(dst_ptr + s_off, mask=s_ok, other=0).to(tl.int64)
    ti = tl.load(tidx_ptr + s_off, mask=s_ok, other=0).to(tl.int64)
    h = tl.arange(0, H_P)
    h_ok = (h < H)[None, :, None]
    lbase = layer.to(tl.int64) * layer_stride
    src_row = (lbase + src * (H * D))[:, None, None] + (h * D)[None, :, None]
    dst_row = (lbase + dst * (H * D))[:, None, None] + (h * D)[None, :, None]

    # V: a plain copy of whole heads
    e = tl.arange(0, D_P)
    mv = s_ok[:, None, None] & h_ok & (e < D)[None, None, :]
    val = tl.load(v_ptr + src_row + e[None, None, :], mask=mv)
    tl.store(v_ptr + dst_row + e[None, None, :], val, mask=mv)

    # K: rotate the rotary pairs
    j = tl.arange(0, HALF_P)
    cs_mask = s_ok[:, None] & (j < HALF)[None, :]
    c = tl.load(cos_ptr + ti[:, None] * HALF + j[None, :], mask=cs_mask, other=0.0)[:, None, :]
    s = tl.load(sin_ptr + ti[:, None] * HALF + j[None, :], mask=cs_mask, other=0.0)[:, None, :]
    if INTERLEAVED:  # pairs (2j, 2j+1): one contiguous load of the rotary dims, split into even / odd
        e = tl.arange(0, 2 * HALF_P)
        m = s_ok[:, None, None] & h_ok & (e < 2 * HALF)[None, None, :]
        x = tl.load(k_ptr + src_row + e[None, None, :], mask=m, other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, [BLOCK_S, H_P, HALF_P, 2]))
        y = tl.reshape(tl.join(x1 * c - x2 * s, x2 * c + x1 * s), [BLOCK_S, H_P, 2 * HALF_P])
        tl.store(k_ptr + dst_row + e[None, None, :], y.to(k_ptr.dtype.element_ty), mask=m)
    else:
        o1 = j[None, None, :]
        o2 = o1 + HALF
        m = s_ok[:, None, None] & h_ok & (j < HALF)[None, None, :]
        x1 = tl.load(k_ptr + src_row + o1, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(k_ptr + src_row + o2, mask=m, other=0.0).to(tl.float32)
        tl.store(k_ptr + dst_row + o1, (x1 * c - x2 * s).to(k_ptr.dtype.element_ty), mask=m)
        tl.store(k_ptr + dst_row + o2, (x2 * c + x1 * s).to(k_ptr.dtype.element_ty), mask=m)

    # K: dims past rotary_dim are copied unchanged
    if TAIL > 0:
        t = tl.arange(0, TAIL_P)
        mt = s_ok[:, None, None] & h_ok & (t < TAIL)[None, None, :]
        off = (2 * HALF + t)[None, None, :]
        kt = tl.load(k_ptr + src_row + off, mask=mt)
        tl.store(k_ptr + dst_row + off, kt, mask=mt)


def compose_copy_(k_cache: torch.Tensor, v_cache: torch.Tensor, src_slots: torch.Tensor, dst_slots: torch.Tensor,
                  table_idx: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int,
                  interleaved: bool) -> None:
    """For every i, all layers: ``k[dst[i]] = R(table row table_idx[i]) k[src[i]]``, ``v[dst[i]] = v[src[i]]``.

    k_cache/v_cache: contiguous ``[(L,) P, page_size, H, D]`` pools of one shape and dtype; src/dst:
    int ``[N]`` slot ids (destinations distinct and disjoint from the sources); table_idx int ``[N]``
    into float32 cos/sin ``[U, rotary_dim // 2]``.
    """
    n = src_slots.numel()
    if n == 0:
        return
    layers = k_cache.shape[0] if k_cache.dim() == 5 else 1
    h, d = k_cache.shape[-2], k_cache.shape[-1]
    half = rotary_dim // 2
    tail = d - 2 * half
    layer_stride = k_cache[0].numel() if k_cache.dim() == 5 else 0
    h_p, half_p, d_p = triton.next_power_of_2(h), triton.next_power_of_2(half), triton.next_power_of_2(d)
    bs = slot_block(n, h_p * d_p, 2 * elems_per_program(k_cache))
    grid = (triton.cdiv(n, bs), layers)
    _compose_copy_kernel[grid](k_cache, v_cache, src_slots.contiguous(), dst_slots.contiguous(), table_idx.contiguous(),
                               cos.contiguous(), sin.contiguous(), n, layer_stride, H=h, D=d, HALF=half, H_P=h_p,
                               HALF_P=half_p, TAIL=tail, TAIL_P=triton.next_power_of_2(max(tail, 1)), D_P=d_p,
                               BLOCK_S=bs, INTERLEAVED=bool(interleaved),
                               num_warps=8 if bs * h_p * d_p >= 4096 else 4)
