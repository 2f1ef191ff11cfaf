"""Triton kernel: K and V of new tokens into their slots of the paged pools, in one launch.

A decode step writes one token per row and layer: as two indexed assignments that is two kernels of
a few KB each per layer, latency-bound. Here each program copies one token's K and V (every KV head
and dim) of one layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(kc_ptr, vc_ptr, slots_ptr, k_ptr, v_ptr, layer0, pool_layer_stride, src_layer_stride,
                     src_row_stride, ROW: tl.constexpr, ROW_P: tl.constexpr):
    i = tl.program_id(0)
    lay = tl.program_id(1)
    slot = tl.load(slots_ptr + i).to(tl.int64)
    e = tl.arange(0, ROW_P)
    m = e < ROW
    src = lay.to(tl.int64) * src_layer_stride + i.to(tl.int64) * src_row_stride + e
    dst = (layer0 + lay).to(tl.int64) * pool_layer_stride + slot * ROW + e
    k = tl.load(k_ptr + src, mask=m)
    v = tl.load(v_ptr + src, mask=m)
    tl.store(kc_ptr + dst, k, mask=m)
    tl.store(vc_ptr + dst, v, mask=m)


def write_kv_(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              layer: int) -> None:
    """In place: ``k`` / ``v`` (``[n, H, D]`` for ``layer`` >= 0, ``[L, n, H, D]`` for every layer with
    ``layer`` -1; any float dtype, cast to the pools' by torch first) into ``slots`` (int ``[n]``, distinct) of the
    contiguous layer-stacked pools ``[L, P, page_size, H, D]``."""
    L, P, S, H, D = k_cache.shape
    n = slots.numel()
    if n == 0:
        return
    row = H * D
    # cast by torch (its rounding, where the interpreter's would differ): a no-op for a model's own K/V
    k, v = (x.to(k_cache.dtype) for x in (k, v))
    k, v = (x if x.stride(-1) == 1 and x.stride(-2) == D else x.contiguous() for x in (k, v))
    if k.stride() != v.stride():
        k, v = k.contiguous(), v.contiguous()
    layers = L if layer < 0 else 1
    src_layer = k.stride(0) if layer < 0 else 0
    _write_kv_kernel[(n, layers)](k_cache, v_cache, slots, k, v, max(layer, 0), P * S * row, src_layer,
                                  k.stride(-3), ROW=row, ROW_P=triton.next_power_of_2(row), num_warps=4)
