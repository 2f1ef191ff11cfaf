"""Ceilings of this machine, measured the way bench/TARGETS.md measured its anchors.

* copy: device-to-device ``copy_`` of a large buffer, bytes read + written (ceiling of rerotate, compose);
* read: read-only streaming, the larger of a ``sum`` over a large buffer and SDPA decode over contiguous
  K/V (ceiling of decode);
* matmul: a square matmul, 2 n^3 FLOPs (ceiling of prefill's effective TFLOP/s).

`kvfuse-bench all` measures them first and uses them for the "of ceiling" column of every scenario;
a single scenario uses the anchors of bench/TARGETS.md (H200) unless ``--measure-ceilings`` is given.
"""

from __future__ import annotations

import torch

from kvfuse.bench.common import Case, Ctx, Provider, fmt_bytes
from kvfuse.bench.runner import run_case
from kvfuse.bench.timing import Progress

NAME = "ceilings"


def run(ctx: Ctx) -> None:
    big = (64 << 20) if ctx.cpu else (1 << 30)
    mm = 1024 if ctx.cpu else 8192
    dtype = torch.float32 if ctx.cpu else torch.bfloat16
    B, C, H, D = (4, 4096, 8, 128) if ctx.cpu else (32, 32768, 8, 128)
    quiet = ctx.args.quiet
    prog = Progress(4, NAME, not quiet)
    esz = torch.tensor([], dtype=dtype).element_size()

    def make_copy(st):
        src = torch.empty(big // esz, dtype=dtype, device=ctx.device).normal_()
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)

    def make_sum(st):
        src = torch.empty(big // esz, dtype=dtype, device=ctx.device).normal_()
        return lambda: src.sum()

    def make_sdpa(st):
        q = torch.randn(B, H, 1, D, dtype=dtype, device=ctx.device)
        k, v = torch.randn(2, B, H, C, D, dtype=dtype, device=ctx.device).unbind(0)
        return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)

    def make_mm(st):
        a, b = torch.randn(2, mm, mm, dtype=dtype, device=ctx.device).unbind(0)
        return lambda: a @ b

    kv_bytes = 2 * B * C * H * D * esz
    cases = [
        ("copy", Case(NAME, f"copy ({fmt_bytes(big)} {str(dtype)[6:]})", {}, [
            Provider("copy", "copy_ (device to device)", make_copy, ref=None)], bytes=2 * big)),
        ("read", Case(NAME, f"read ({fmt_bytes(big)} sum; SDPA decode B={B} C={C} H={H} d={D})", {}, [
            Provider("read", "sum (read only)", make_sum, ref=None, bytes=big),
            Provider("read", "sdpa decode, contiguous K/V (read only)", make_sdpa, ref=None, bytes=kv_bytes)])),
        ("matmul", Case(NAME, f"matmul {mm}^3 {str(dtype)[6:]}", {}, [
            Provider("matmul", "matmul", make_mm, ref=None)], flops=2 * mm ** 3)),
    ]
    for kind, case in cases:
        case.ceiling = kind
        saved = dict(ctx.ceilings)
        ctx.ceilings.pop(kind, None)
        results = run_case(ctx, case, prog)
        values = [r.value for r in results if r.status == "ok" and r.value]
        if values:
            ctx.ceilings[kind] = max(values)
        elif kind in saved:
            ctx.ceilings[kind] = saved[kind]
    ctx.ceilings_source = "measured"
    if not quiet:
        line = ", ".join(f"{k} {v:.3g} {'TFLOP/s' if k == 'matmul' else 'TB/s'}" for k, v in ctx.ceilings.items())
        print(f"\nceilings used from here on: {line}")
