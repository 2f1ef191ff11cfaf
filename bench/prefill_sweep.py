"""Tile-shape / launch-config sweep of the Triton block-sparse prefill kernel (BENCH_TARGETS.md §3).

Launches ``kvfuse.triton_kernels.attention._attn_kernel`` directly with each (block_q, block_k,
num_warps, num_stages) and page size, checks each output against the default configuration's
(which the test-suite checks against the reference), and prints effective TFLOP/s. With
``--profile`` it runs one configuration twice (compile, then the launch to profile) for ncu:

    python3 bench/prefill_sweep.py                      # the sweep, P=4K T=4 L=4K
    ncu --clock-control none -k regex:_attn_kernel --launch-skip 1 --launch-count 1 --set full \\
        -o prefill python3 bench/prefill_sweep.py --profile
"""

from __future__ import annotations

import argparse
import math

import torch
import triton

import kvfuse
from kvfuse.segments import SegmentGraph
from kvfuse.triton_kernels import attention as ta

DEFAULT = (128, 128, 8, 3)
# (block_q, block_k, num_warps, num_stages[, tensor descriptors (TMA), warp specialisation])
SWEEP = [(128, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3),
         (128, 128, 8, 2, True), (128, 128, 8, 3, True), (128, 128, 8, 4, True), (64, 64, 4, 2, True),
         (64, 64, 4, 3, True), (64, 64, 4, 4, True), (64, 128, 4, 2, True), (64, 128, 4, 3, True),
         (128, 64, 8, 3, True), (128, 64, 8, 4, True), (128, 128, 8, 3, True, True)]


def launch(st, bq, bk, warps, stages, tma=False, ws=False):
    q, k, v, bt, plan = st["q"], st["k"], st["v"], st["bt"], st["plan"]
    t = plan.tiles(bq, bk)
    kt_order, n_full = ta.full_first(t.work_seq, t.kt_indptr, t.kt_index, t.kt_full, plan.kv_lens, bk)
    total_q, hq, d = q.shape
    _, page, hkv, _ = k.shape
    out = torch.empty_like(q)
    lse = torch.empty(total_q, hq, dtype=torch.float32, device=q.device)
    work = t.work_seq.numel()

    if tma:
        if not ta.use_tma(k, v, bk):
            raise ValueError(f"no TMA path for page {page}, block_k {bk}")
        k, v = ta._descriptor(k, bk), ta._descriptor(v, bk)

    def fn():
        ta._attn_kernel[(hq, work, 1)](
            q, k, v, out, lse, bt, plan.kv_lens, plan.qo_indptr, plan.token_seg, plan.ancestors,
            t.work_seq, t.work_qtile, t.kt_indptr, kt_order, n_full, ta.LOG2E / math.sqrt(d), work,
            bt.stride(0), plan.token_seg.stride(0), plan.ancestors.shape[-1], total_q,
            HQ=hq, HKV=hkv, GROUP=hq // hkv, PAGE=page, D=d, BQ=bq, BK=bk, GP=1, HPP=1, BM=bq, NSPLIT=1,
            PREC="tf32", INTERP=False, TMA=tma, WS=ws, num_warps=warps, num_stages=stages)
        return out

    return fn


def state(P, T, L, page, hq=32, hkv=8, d=128, dtype=torch.bfloat16):
    graph = SegmentGraph.fork_join(P, [L] * T)
    n = graph.num_tokens
    plan = kvfuse.plan(kvfuse.AttentionSpec([graph], device="cuda"))
    pages = -(-n // page)
    g = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(pages, page, hkv, d, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(pages, page, hkv, d, device="cuda", dtype=dtype, generator=g)
    perm = torch.randperm(pages, device="cuda", generator=g).to(torch.int32)  # pages scattered in the pool
    q = torch.randn(n, hq, d, device="cuda", dtype=dtype, generator=g)
    return dict(q=q, k=k, v=v, bt=perm[None].contiguous(), plan=plan, flops=4 * d * hq * plan.visible_pairs())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="4096,4,4096", help="P,T,L")
    ap.add_argument("--pages", default="16,128", help="page sizes to sweep")
    ap.add_argument("--profile", action="store_true", help="run the default config twice (for ncu) and exit")
    ap.add_argument("--config", default=",".join(map(str, DEFAULT)), help="bq,bk,warps,stages[,tma,ws] for --profile")
    a = ap.parse_args()
    P, T, L = map(int, a.case.split(","))
    if a.profile:
        st = state(P, T, L, int(a.pages.split(",")[0]))
        fn = launch(st, *map(int, a.config.split(",")))  # tma / ws as 0 or 1
        fn()
        torch.cuda.synchronize()
        fn()
        torch.cuda.synchronize()
        return
    rows = []
    for page in map(int, a.pages.split(",")):
        st = state(P, T, L, page)
        ref = launch(st, *DEFAULT)().clone()
        for cfg in SWEEP:
            try:
                fn = launch(st, *cfg)
                out = fn()
                err = (out.float() - ref.float()).abs().max().item()
                ms = triton.testing.do_bench(fn, warmup=50, rep=300)
                rows.append((page, cfg, ms, st["flops"] / ms / 1e9, err))
            except Exception as e:  # out of shared memory, etc.
                rows.append((page, cfg, float("nan"), float("nan"), f"{type(e).__name__}: {str(e)[:60]}"))
            print(rows[-1], flush=True)
        del st
    print(f"\nprefill sweep P={P} T={T} L={L} (bf16, Hq 32, Hkv 8, d 128, pages scattered)")
    print("| page | block_q | block_k | warps | stages | TMA | WS | ms | TFLOP/s | max diff vs default |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for page, cfg, ms, tf, err in rows:
        e = f"{err:.3g}" if isinstance(err, float) else err
        tma, ws = (tuple(cfg[4:]) + (False, False))[:2]
        print(f"| {page} | {cfg[0]} | {cfg[1]} | {cfg[2]} | {cfg[3]} | {'y' if tma else ''} | {'y' if ws else ''} "
              f"| {ms:.3f} | {tf:.0f} | {e} |")


if __name__ == "__main__":
    main()
