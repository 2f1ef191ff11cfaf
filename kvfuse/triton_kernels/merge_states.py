"""Triton kernel: merge two partial attention results over disjoint key sets by their LSE."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_states_kernel(va_ptr, sa_ptr, vb_ptr, sb_ptr, v_ptr, s_ptr, rows,
                         D: tl.constexpr, D_P: tl.constexpr, BLOCK_R: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < rows
    s_a = tl.load(sa_ptr + r, mask=r_ok, other=float("-inf"))
    s_b = tl.load(sb_ptr + r, mask=r_ok, other=float("-inf"))
    s_max = tl.maximum(s_a, s_b)
    s_max = tl.where(s_max == float("-inf"), 0.0, s_max)
    w_a = tl.exp(s_a - s_max)
    w_b = tl.exp(s_b - s_max)
    tot = w_a + w_b
    inv = 1.0 / tl.where(tot > 0, tot, 1.0)
    e = tl.arange(0, D_P)
    off = r.to(tl.int64)[:, None] * D + e[None, :]
    m = r_ok[:, None] & (e < D)[None, :]
    va = tl.load(va_ptr + off, mask=m, other=0.0).to(tl.float32)
    vb = tl.load(vb_ptr + off, mask=m, other=0.0).to(tl.float32)
    v = (va * (w_a * inv)[:, None] + vb * (w_b * inv)[:, None])
    tl.store(v_ptr + off, v.to(v_ptr.dtype.element_ty), mask=m)
    tl.store(s_ptr + r, tl.where(tot > 0, s_max + tl.log(tl.where(tot > 0, tot, 1.0)), float("-inf")), mask=r_ok)


def merge_states(v_a: torch.Tensor, s_a: torch.Tensor, v_b: torch.Tensor, s_b: torch.Tensor):
    """v: ``[N, H, D]``, s: float32 ``[N, H]`` natural-log LSE (-inf: that side saw no key).
    Returns ``(v, s)`` of the union, v in v_a's dtype."""
    v_a, v_b, s_a, s_b = v_a.contiguous(), v_b.contiguous(), s_a.contiguous(), s_b.contiguous()
    v = torch.empty_like(v_a)
    s = torch.empty_like(s_a)
    rows = s_a.numel()
    if rows == 0:
        return v, s
    d = v_a.shape[-1]
    d_p = triton.next_power_of_2(d)
    block_r = max(1, min(triton.next_power_of_2(rows), 4096 // d_p if v_a.is_cuda else 16))
    _merge_states_kernel[(triton.cdiv(rows, block_r),)](v_a, s_a, v_b, s_b, v, s, rows, D=d, D_P=d_p,
                                                         BLOCK_R=block_r, num_warps=4)
    return v, s
