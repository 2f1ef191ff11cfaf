"""Triton kernel: RoPE re-rotation of cached keys, in place.

Each program rotates a block of ``BLOCK_S`` slots × all KV heads × the rotary pairs of one layer:
one read and one write of every rotated element, nothing else touched (dims past ``rotary_dim`` are
neither read nor written). cos/sin rows are loaded once per slot and broadcast over the heads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvfuse.triton_kernels._common import elems_per_program, slot_block


@triton.jit
def _rerotate_kernel(k_ptr, slots_ptr, tidx_ptr, cos_ptr, sin_ptr, n, layer_stride,
                     H: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, H_P: tl.constexpr,
                     HALF_P: tl.constexpr, BLOCK_S: tl.constexpr, INTERLEAVED: tl.constexpr):
    pid = tl.program_id(0)
    layer = tl.program_id(1)
    s_off = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = s_off < n
    slot = tl.load(slots_ptr + s_off, mask=s_ok, other=0).to(tl.int64)
    ti = tl.load(tidx_ptr + s_off, mask=s_ok, other=0).to(tl.int64)
    h = tl.arange(0, H_P)
    j = tl.arange(0, HALF_P)
    cs_mask = s_ok[:, None] & (j < HALF)[None, :]
    c = tl.load(cos_ptr + ti[:, None] * HALF + j[None, :], mask=cs_mask, other=0.0)[:, None, :]
    s = tl.load(sin_ptr + ti[:, None] * HALF + j[None, :], mask=cs_mask, other=0.0)[:, None, :]

    base = layer.to(tl.int64) * layer_stride + slot * (H * D)
    row = k_ptr + base[:, None, None] + (h * D)[None, :, None]
    if INTERLEAVED:  # pairs (2j, 2j+1): one contiguous load of the rotary dims, split into even / odd
        e = tl.arange(0, 2 * HALF_P)
        p = row + e[None, None, :]
        m = s_ok[:, None, None] & (h < H)[None, :, None] & (e < 2 * HALF)[None, None, :]
        x = tl.load(p, mask=m, other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, [BLOCK_S, H_P, HALF_P, 2]))
        y = tl.join(x1 * c - x2 * s, x2 * c + x1 * s)
        tl.store(p, tl.reshape(y, [BLOCK_S, H_P, 2 * HALF_P]).to(k_ptr.dtype.element_ty), mask=m)
    else:
        p1 = row + j[None, None, :]
        p2 = p1 + HALF
        m = s_ok[:, None, None] & (h < H)[None, :, None] & (j < HALF)[None, None, :]
        x1 = tl.load(p1, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(p2, mask=m, other=0.0).to(tl.float32)
        tl.store(p1, (x1 * c - x2 * s).to(k_ptr.dtype.element_ty), mask=m)
        tl.store(p2, (x2 * c + x1 * s).to(k_ptr.dtype.element_ty), mask=m)


def rerotate_(k_cache: torch.Tensor, slots: torch.Tensor, table_idx: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor, rotary_dim: int, interleaved: bool) -> None:
    """In place: rotate the first ``rotary_dim`` dims of every head of ``k_cache`` at ``slots`` by the
    cos/sin table row ``table_idx`` of each slot, all layers.

    k_cache: contiguous ``[(L,) P, page_size, H, D]`` fp16/bf16/fp32; slots: int32/int64 ``[N]``
    distinct slot ids, any stride; table_idx: int ``[N]``; cos/sin: float32 ``[U, rotary_dim // 2]``.
    """
    n = slots.numel()
    if n == 0:
        return
    layers = k_cache.shape[0] if k_cache.dim() == 5 else 1
    h, d = k_cache.shape[-2], k_cache.shape[-1]
    half = rotary_dim // 2
    layer_stride = k_cache[0].numel() if k_cache.dim() == 5 else 0
    h_p, half_p = triton.next_power_of_2(h), triton.next_power_of_2(half)
    bs = slot_block(n, h_p * half_p, elems_per_program(k_cache))
    grid = (triton.cdiv(n, bs), layers)
    _rerotate_kernel[grid](k_cache, slots.contiguous(), table_idx.contiguous(), cos.contiguous(), sin.contiguous(), n,
                           layer_stride, H=h, D=d, HALF=half, H_P=h_p, HALF_P=half_p, BLOCK_S=bs,
                           INTERLEAVED=bool(interleaved), num_warps=8 if bs * h_p * half_p >= 4096 else 4)
