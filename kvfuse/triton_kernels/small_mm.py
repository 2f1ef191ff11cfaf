"""Triton kernel: matrix products with few rows (a decode step's projections), up to three weights that
share one input in one launch.

``y_g = x @ W_g^T (+ b_g)`` for ``x [M, K]`` with ``M <= 16`` and weights ``W_g [N_g, K]`` in
``nn.Linear``'s layout (contiguous along K), e.g. a layer's q / k / v or gate / up projections. At
so few rows the product is a stream of the weights: each program reads ``BN`` rows of one weight
once. The weights of a launch are its groups: a program finds its group from its index, so q / k / v
run as one launch over their ``N_q + N_k + N_v`` rows without being concatenated. One row
(``M == 1``): the products accumulate in a ``[BN, BK]`` register tile reduced once at the end; more
rows: ``tl.dot`` on a 16-row tile. Accumulation is float32, rounded once to the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvfuse.triton_kernels._common import interpreting
from kvfuse.triton_kernels.attention import _cast, _dot

MAX_ROWS = 16
MAX_GROUPS = 3


# the weights' widths and block starts are not specialised on (== 1, divisibility by 16): each group's branch
# must see one type. K and x's row stride are (rows of a weight are K apart: 16-byte loads need K % 8 == 0)
@triton.jit(do_not_specialize=["M", "n0", "n1", "n2", "start1", "start2"])
def _small_mm_kernel(x_ptr, w0, w1, w2, b0, b1, b2, y0, y1, y2, M, K, sxm, n0, n1, n2, start1, start2,
                     HAS_BIAS: tl.constexpr, ONE_ROW: tl.constexpr, BM: tl.constexpr,
                     BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr, EVEN_K: tl.constexpr,
                     INTERP: tl.constexpr):
    pid = tl.program_id(0)
    # the program's weight: blocks [0, start1) are the first's, [start1, start2) the second's, the rest
    # the third's (a launch of fewer weights has start = its number of programs)
    w_ptr, b_ptr, y_ptr, N, blk = w0, b0, y0, n0, pid
    if pid >= start1:
        w_ptr, b_ptr, y_ptr, N, blk = w1, b1, y1, n1, pid - start1
    if pid >= start2:
        w_ptr, b_ptr, y_ptr, N, blk = w2, b2, y2, n2, pid - start2
    n = blk * BN + tl.arange(0, BN)
    n_ok = n < N
    kk = tl.arange(0, BK)
    w_rows = w_ptr + n.to(tl.int64) * K
    if ONE_ROW:
        acc = tl.zeros([BN, BK], tl.float32)
        for k0 in tl.range(0, K, BK, num_stages=STAGES):
            k = k0 + kk
            if EVEN_K:
                x = tl.load(x_ptr + k)
                w = tl.load(w_rows[:, None] + k[None, :], mask=n_ok[:, None], other=0.0)
            else:
                x = tl.load(x_ptr + k, mask=k < K, other=0.0)
                w = tl.load(w_rows[:, None] + k[None, :], mask=n_ok[:, None] & (k < K)[None, :], other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        y = tl.sum(acc, 1)
        if HAS_BIAS:
            y += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + n, _cast(y, y_ptr.dtype.element_ty, INTERP), mask=n_ok)
    else:
        m = tl.arange(0, BM)
        m_ok = m < M
        x_rows = x_ptr + m.to(tl.int64) * sxm  # a strided input (e.g. the last token of each row) may be far apart
        acc = tl.zeros([BM, BN], tl.float32)
        for k0 in tl.range(0, K, BK, num_stages=STAGES):
            k = k0 + kk
            if EVEN_K:
                x = tl.load(x_rows[:, None] + k[None, :], mask=m_ok[:, None], other=0.0)
                w = tl.load(w_rows[None, :] + k[:, None], mask=n_ok[None, :], other=0.0)
            else:
                x = tl.load(x_rows[:, None] + k[None, :], mask=m_ok[:, None] & (k < K)[None, :], other=0.0)
                w = tl.load(w_rows[None, :] + k[:, None], mask=n_ok[None, :] & (k < K)[:, None], other=0.0)
            acc = _dot(x, w, "tf32", INTERP, acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + m[:, None] * N + n[None, :], _cast(acc, y_ptr.dtype.element_ty, INTERP),
                 mask=m_ok[:, None] & n_ok[None, :])


def config(m: int, n_total: int, k: int) -> tuple[int, int, int, int]:
    """(BN, BK, num_warps, num_stages) for ``m`` rows, ``n_total`` output columns over the launch's
    weights and depth ``k``. Chosen on an H200 at Llama-3-8B's decode shapes (q / k / v, o,
    gate / up, down, LM head; L2-cold chains of launches in a CUDA graph): one row takes (8, 512, 4, 3),
    within 3% of each shape's best; more rows take 32 columns per program below 6144 columns
    (o, down: the best), 64 above (q / k / v, gate / up, LM head: within 1%). Under the interpreter
    tiles are small so that tests span several programs and K steps."""
    if interpreting():
        return 16, 32, 4, 1
    if m == 1:
        return 8, 512, 4, 3
    if n_total < 6144:
        return 32, 512, 4, 4
    return (64, 256, 4, 4) if n_total <= 8192 else (64, 256, 4, 3)


def small_mm(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor],
             launch: tuple[int, int, int, int] | None = None) -> list[torch.Tensor]:
    """``[x @ w.T + b for w, b in zip(weights, biases)]`` (no bias when ``biases`` is empty) for ``x``
    ``[M <= 16, K]`` (unit stride along K) and 1-3 contiguous fp16 / bf16 weights ``[N_g, K]`` of x's
    dtype; ``launch`` overrides `config`."""
    m, k = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    weights = [w if w.is_contiguous() else w.contiguous() for w in weights]  # a compiled graph's are already
    biases = [b if b.is_contiguous() else b.contiguous() for b in biases]
    ns = [w.shape[0] for w in weights]
    ys = [x.new_empty(m, n) for n in ns]
    if m == 0 or sum(ns) == 0:
        return ys
    bn, bk, warps, stages = launch or config(m, sum(ns), k)
    blocks = [triton.cdiv(n, bn) for n in ns]
    pad = 3 - len(weights)
    w = list(weights) + [weights[0]] * pad
    b = (list(biases) + [biases[0]] * pad) if biases else [weights[0]] * 3
    y = ys + [ys[0]] * pad
    n3 = ns + [0] * pad
    start1, start2 = blocks[0], sum(blocks[:2])
    _small_mm_kernel[(sum(blocks),)](x, *w, *b, *y, m, k, x.stride(0), *n3, start1, start2,
                                     HAS_BIAS=bool(biases), ONE_ROW=m == 1, BM=MAX_ROWS, BN=bn, BK=bk,
                                     STAGES=stages, EVEN_K=k % bk == 0, INTERP=interpreting(), num_warps=warps)
    return ys


__all__ = ["small_mm", "config", "MAX_ROWS", "MAX_GROUPS"]
