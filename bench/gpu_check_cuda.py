"""GPU check of the CUDA backend (kvfuse._C) at the sizes of BENCH_TARGETS.md §1, §2 and §4.

Each kernel is first checked against the torch reference on the benchmark inputs, then timed with
``triton.testing.do_bench(return_mode="median")`` next to a device-to-device copy of the same bytes
(the ceiling) and, where importable, the Triton kernel, in the same run. Prints a markdown table.

    python bench/gpu_check_cuda.py            # benchmark
    python bench/gpu_check_cuda.py --small    # one small call of every kernel (for compute-sanitizer)
"""

from __future__ import annotations

import argparse
import math

import torch
from triton.testing import do_bench

import kvfuse
from kvfuse import reference
from kvfuse.backends import cuda as ck

DEV = torch.device("cuda", 0)
ROWS: list[tuple] = []


def bench(fn):
    return do_bench(fn, warmup=10, rep=60, return_mode="median")


def row(section, provider, ms, nbytes, ceiling_ms=None):
    tbs = nbytes / ms / 1e9
    frac = f"{ceiling_ms / ms:.2f}" if ceiling_ms else ""
    ROWS.append((section, provider, f"{ms * 1e3:.1f}", f"{tbs:.2f}", frac))


def copy_ms(nbytes):
    """A device-to-device copy that reads nbytes / 2 and writes nbytes / 2."""
    src = torch.empty(nbytes // 4, dtype=torch.bfloat16, device=DEV).normal_()
    dst = torch.empty_like(src)
    return bench(lambda: dst.copy_(src))


def tables(n, rd, device):
    cfg = kvfuse.RopeConfig(head_dim=rd)
    return cfg.rotation_tables(torch.randint(-(1 << 16), 1 << 16, (n,)), device=device)


def rerotate_section(pages, page_size, heads=8, d=128):
    k = torch.randn(pages, page_size, heads, d, device=DEV).to(torch.bfloat16)
    slots = torch.arange(pages * page_size, device=DEV, dtype=torch.int32)
    cos, sin, idx = tables(pages, d, DEV)
    idx = idx.repeat_interleave(page_size)  # a random delta per page
    args = (slots, idx, cos, sin, d, False)
    a, b = k.clone(), k.clone()
    ck.rerotate_(a, *args)
    reference.rerotate_(b, *args)
    torch.testing.assert_close(a.float(), b.float(), atol=1.6e-2, rtol=1.6e-2)
    del a, b
    nbytes = 2 * k.numel() * k.element_size()
    sec = f"1. rerotate {pages}x{page_size}x{heads}x{d} bf16"
    ceil = copy_ms(nbytes)
    row(sec, "d2d copy (ceiling)", ceil, nbytes)
    row(sec, "cuda", bench(lambda: ck.rerotate_(k, *args)), nbytes, ceil)
    try:
        from kvfuse.triton_kernels import rerotate as tk
        row(sec, "triton", bench(lambda: tk.rerotate_(k, *args)), nbytes, ceil)
    except Exception as e:  # noqa: BLE001 - optional provider
        print(f"triton rerotate skipped: {e}")


def compose_section(pages=16384, page_size=16, heads=8, d=128):
    k = torch.randn(pages, page_size, heads, d, device=DEV).to(torch.bfloat16)
    v = torch.randn_like(k)
    n = pages // 2 * page_size - 37  # the second half of the pool is written; a partly filled tail
    perm = torch.randperm(pages // 2, device=DEV)
    src = (perm[:, None] * page_size + torch.arange(page_size, device=DEV)).flatten()[:n]
    dst = torch.arange(pages // 2 * page_size, pages * page_size, device=DEV)[:n]
    cos, sin, idx = tables(4, d, DEV)
    idx = (torch.arange(n, device=DEV) * 4 // n).int()  # 4 threads, one delta each
    args = (src, dst, idx, cos, sin, d, False)
    ka, va, kb, vb = k.clone(), v.clone(), k.clone(), v.clone()
    ck.compose_copy_(ka, va, *args)
    reference.compose_copy_(kb, vb, *args)
    torch.testing.assert_close(ka.float(), kb.float(), atol=1.6e-2, rtol=1.6e-2)
    assert torch.equal(va, vb)
    del ka, va, kb, vb
    nbytes = 2 * 2 * n * heads * d * k.element_size()
    sec = f"2. compose {n} tokens x{heads}x{d} bf16"
    ceil = copy_ms(nbytes)
    row(sec, "d2d copy (ceiling)", ceil, nbytes)
    row(sec, "cuda", bench(lambda: ck.compose_copy_(k, v, *args)), nbytes, ceil)


def decode_section(masked, batch=32, kv_len=32768, hq=32, hkv=8, d=128, page_size=16):
    pages_per = kv_len // page_size
    k = torch.randn(batch * pages_per, page_size, hkv, d, device=DEV).to(torch.bfloat16)
    v = torch.randn_like(k)
    table = torch.randperm(batch * pages_per, device=DEV, dtype=torch.int32).view(batch, pages_per)
    if masked:  # the decoding thread sees the prefix and its own thread only
        g = kvfuse.SegmentGraph.fork_join(prefix=kv_len // 4, threads=[kv_len // 4] * 3)
    else:
        g = kvfuse.SegmentGraph([kvfuse.Segment("all", kv_len)])
    plan = kvfuse.plan(kvfuse.AttentionSpec([g] * batch, q_lens=[1] * batch, device=DEV))
    q = torch.randn(batch, hq, d, device=DEV).to(torch.bfloat16)
    out = kvfuse.attention(q, k, v, table, plan, backend="cuda")
    ref = kvfuse.attention(q[:2].float(), k.float(), v.float(), table[:2],
                           kvfuse.plan(kvfuse.AttentionSpec([g] * 2, q_lens=[1] * 2, device=DEV)), backend="torch")
    torch.testing.assert_close(out[:2].float(), ref, atol=1.6e-2, rtol=1.6e-2)
    tm = plan.tiles(*ck._tile_shape(d, 1))
    args = (q, k, v, table, plan.kv_lens, plan.qo_indptr, plan.token_seg, plan.ancestors, tm.work_seq,
            tm.work_qtile, tm.kt_indptr, tm.kt_index, tm.kt_full, tm.block_q, tm.block_k, 1 / math.sqrt(d))
    seen = tm.kt_index.numel() * tm.block_k / (batch * kv_len)  # fraction of keys read
    nbytes = int(2 * k.numel() * k.element_size() * seen)
    sec = f"4. decode {batch}x{kv_len} Hq{hq} Hkv{hkv} page{page_size}" + (" masked" if masked else "")
    kc = k.view(batch, kv_len, hkv, d).transpose(1, 2).contiguous()  # contiguous K/V, no paging
    vc = v.view(batch, kv_len, hkv, d).transpose(1, 2).contiguous()
    qs = q.view(batch, hq, 1, d)
    sdpa = bench(lambda: torch.nn.functional.scaled_dot_product_attention(qs, kc, vc, enable_gqa=True))
    row(sec, "sdpa contiguous, no mask (all keys)", sdpa, 2 * k.numel() * k.element_size())
    row(sec, "cuda", bench(lambda: ck.segment_attention(*args)), nbytes, None)


def small():
    """One call of every kernel on small odd shapes (for compute-sanitizer)."""
    k = torch.randn(2, 7, 5, 3, 64, device=DEV).to(torch.float16)
    v = torch.randn_like(k)
    cos, sin, idx = tables(9, 64, DEV)
    ck.rerotate_(k, torch.arange(9, device=DEV) * 3, idx, cos, sin, 64, True)
    cos32, sin32, idx32 = tables(9, 32, DEV)  # rotary_dim 32 of head_dim 64: a [U, 16] table
    ck.compose_copy_(k, v, torch.arange(9, device=DEV), torch.arange(9, device=DEV) + 20, idx32, cos32, sin32, 32,
                     False)
    va, vb = torch.randn(2, 10, 3, 64, device=DEV).unbind(0)
    ck.merge_states(va, torch.randn(10, 3, device=DEV), vb, torch.full((10, 3), -math.inf, device=DEV))
    g = kvfuse.SegmentGraph.fork_join(prefix=50, threads=[30, 21])
    plan = kvfuse.plan(kvfuse.AttentionSpec([g, g], q_lens=[3, 1], device=DEV))
    kc = torch.randn(42, 5, 2, 128, device=DEV).to(torch.bfloat16)  # 101 tokens = 21 pages of 5 each
    table = torch.randperm(42, device=DEV, dtype=torch.int32).view(2, 21)
    q = torch.randn(4, 6, 128, device=DEV).to(torch.bfloat16)
    out = kvfuse.attention(q, kc, kc, table, plan, backend="cuda")
    torch.cuda.synchronize()
    print("small: ok", out.float().abs().sum().item())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    a = ap.parse_args()
    if a.small:
        return small()
    torch.manual_seed(0)
    rerotate_section(16384, 16)
    rerotate_section(4096, 64)
    compose_section()
    decode_section(False)
    decode_section(True)
    print(f"\n{torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print("| section | provider | time (us) | TB/s | fraction of copy |")
    print("| --- | --- | --- | --- | --- |")
    for r in ROWS:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
