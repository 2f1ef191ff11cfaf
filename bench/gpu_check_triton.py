"""GPU check of the Triton kernels at the sizes of BENCH_TARGETS.md §1-4, against the baselines in the same run.

Every provider is first checked against the reference (or an exact baseline where the float32
reference would not fit), then timed with ``triton.testing.do_bench(return_mode="median")``. Prints a
markdown table and writes ``gpu_check_triton.json`` to ``$OUT`` when set.

    python bench/gpu_check_triton.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import triton
from kvfuse.triton_kernels import attention as tk_attention
from kvfuse.triton_kernels import compose as tk_compose
from kvfuse.triton_kernels import rerotate as tk_rerotate
from triton.testing import do_bench

import kvfuse
from kvfuse import Segment, SegmentGraph, reference

ROWS: list[dict] = []
DEV = torch.device("cuda", 0)  # an explicit index: plans compare devices exactly


def log(*a):
    print(*a, flush=True)


def bench(fn, warmup=10, rep=60):
    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def record(section, provider, ms, unit, value, **extra):
    row = dict(section=section, provider=provider, ms=round(ms, 4), unit=unit, value=round(value, 3), **extra)
    ROWS.append(row)
    log(f"  {section:<34} {provider:<28} {ms:9.4f} ms  {value:8.3f} {unit}")


def check(name, got, want, atol, rtol=0.0):
    err = (got.float() - want.float()).abs()
    bad = err > atol + rtol * want.float().abs()
    ok = not bool(bad.any()) and bool(torch.isfinite(got.float()).all())
    log(f"  check {name}: max err {err.max().item():.3g} -> {'ok' if ok else 'FAILED'}")
    if not ok:
        raise SystemExit(f"{name}: mismatch against the reference")


def copy_ceiling(nbytes):
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=DEV).normal_()
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a))
    tbs = 2 * nbytes / ms / 1e9
    record("ceiling", "device copy (read+write)", ms, "TB/s", tbs)
    return tbs


# ---------------------------------------------------------------------------------------------- §1
def rerotate_section(page_size, quick):
    pages = (4096 if quick else 16384) * 16 // page_size
    h, d = 8, 128
    cfg = kvfuse.RopeConfig(head_dim=d, theta=1e4)
    k = torch.randn(pages, page_size, h, d, device=DEV).to(torch.bfloat16)
    n = pages * page_size
    slots = torch.arange(n, device=DEV)
    deltas = torch.randint(-50_000, 50_000, (pages,))
    cos, sin, page_idx = cfg.rotation_tables(deltas, device=DEV)
    idx = page_idx.repeat_interleave(page_size)
    args = (slots, idx, cos, sin, cfg.rotary_dim, cfg.interleaved)
    a, b = k.clone(), k.clone()
    tk_rerotate.rerotate_(a, *args)
    reference.rerotate_(b, *args)
    check(f"rerotate page{page_size}", a, b, atol=1.6e-2, rtol=1.6e-2)
    del a, b
    nbytes = 2 * k.numel() * k.element_size()
    sec = f"1. rerotate page {page_size}"
    res = {}
    res["triton"] = bench(lambda: tk_rerotate.rerotate_(k, *args))
    res["torch eager"] = bench(lambda: reference.rerotate_(k, *args))
    comp = torch.compile(reference.rerotate_)
    comp(k, *args)
    res["torch.compile"] = bench(lambda: comp(k, *args))
    for p, ms in res.items():
        record(sec, p, ms, "TB/s", nbytes / ms / 1e9, ratio_vs_triton=round(ms / res["triton"], 2))


# ---------------------------------------------------------------------------------------------- §2
def compose_section(quick):
    page_size, h, d = 16, 8, 128
    pages = 4096 if quick else 16384
    cfg = kvfuse.RopeConfig(head_dim=d, theta=1e4)
    k = torch.randn(pages, page_size, h, d, device=DEV).to(torch.bfloat16)
    v = torch.randn(pages, page_size, h, d, device=DEV).to(torch.bfloat16)
    per = pages // 8  # 4 source threads in the first half of the pool, destinations in the second half
    segs, src, dst, deltas = [], [], [], []
    off = 0
    for t in range(4):
        length = per * page_size - 5 - t  # partly filled tail pages
        src_pages = torch.arange(t * per, (t + 1) * per, device=DEV)
        src.append(kvfuse.paged.slots_of(src_pages, 0, length, page_size))
        segs.append(length)
        deltas.append(torch.full((length,), 1000 * (t + 1) + off, dtype=torch.int64))
        off += length
    dst_pages = torch.arange(pages // 2, pages // 2 + -(-off // page_size), device=DEV)
    dst = kvfuse.paged.slots_of(dst_pages, 0, off, page_size)
    src = torch.cat(src)
    cos, sin, idx = cfg.rotation_tables(torch.cat(deltas), device=DEV)
    args = (src, dst, idx, cos, sin, cfg.rotary_dim, cfg.interleaved)
    ka, va, kb, vb = k.clone(), v.clone(), k.clone(), v.clone()
    tk_compose.compose_copy_(ka, va, *args)
    reference.compose_copy_(kb, vb, *args)
    check("compose K", ka, kb, atol=1.6e-2, rtol=1.6e-2)
    check("compose V", va, vb, atol=0)
    del ka, va, kb, vb
    nbytes = 2 * 2 * off * h * d * k.element_size()
    res = {"triton": bench(lambda: tk_compose.compose_copy_(k, v, *args)),
           "torch eager": bench(lambda: reference.compose_copy_(k, v, *args))}
    comp = torch.compile(reference.compose_copy_)
    comp(k, v, *args)
    res["torch.compile"] = bench(lambda: comp(k, v, *args))
    for p, ms in res.items():
        record("2. compose (4 threads)", p, ms, "TB/s", nbytes / ms / 1e9, ratio_vs_triton=round(ms / res["triton"], 2))


# ---------------------------------------------------------------------------------------------- helpers
def paged_pool(n_tokens_list, page_size, hkv, d, dtype):
    pages_per = [-(-n // page_size) for n in n_tokens_list]
    total = sum(pages_per)
    perm = torch.randperm(total, device=DEV).to(torch.int32)
    table = torch.zeros(len(n_tokens_list), max(pages_per), dtype=torch.int32, device=DEV)
    o = 0
    for b, m in enumerate(pages_per):
        table[b, :m] = perm[o: o + m]
        o += m
    k = torch.randn(total, page_size, hkv, d, device=DEV).to(dtype)
    v = torch.randn(total, page_size, hkv, d, device=DEV).to(dtype)
    return k, v, table


def run_tiles(q, k, v, table, plan, bq, bk, scale):
    tm = plan.tiles(bq, bk)
    return tk_attention.segment_attention(q, k, v, table, plan.kv_lens, plan.qo_indptr, plan.token_seg, plan.ancestors,
                                          tm.work_seq, tm.work_qtile, tm.kt_indptr, tm.kt_index, tm.kt_full, bq, bk,
                                          scale)


def flex_mask_mod(plan, q_offset):
    from torch.nn.attention.flex_attention import create_block_mask

    seg = plan.token_seg[0].long()
    anc = plan.ancestors[0].bool()

    def mask_mod(b, h, qi, ki):
        qt = qi + q_offset
        sq, sk = seg[qt], seg[ki]
        return anc[sq, sk] | ((sq == sk) & (ki <= qt))

    return mask_mod, create_block_mask


# ---------------------------------------------------------------------------------------------- §3
def prefill_section(prefix, threads, length, quick):
    from torch.nn.attention.flex_attention import flex_attention

    hq, hkv, d, page_size = 32, 8, 128, 16
    g = SegmentGraph.fork_join(prefix=prefix, threads=[length] * threads)
    n = g.num_tokens
    plan = kvfuse.plan(kvfuse.AttentionSpec([g], device=DEV))
    k, v, table = paged_pool([n], page_size, hkv, d, torch.bfloat16)
    q = torch.randn(n, hq, d, device=DEV).to(torch.bfloat16)
    scale = d ** -0.5
    flops = 4 * d * hq * plan.visible_pairs()
    sec = f"3. prefill P={prefix} T={threads} L={length}"

    kc = kvfuse.gather_kv(k, table[0], n).transpose(0, 1)[None].contiguous()  # [1, Hkv, N, D]
    vc = kvfuse.gather_kv(v, table[0], n).transpose(0, 1)[None].contiguous()
    qc = q.transpose(0, 1)[None].contiguous()
    mask_mod, create_block_mask = flex_mask_mod(plan, 0)
    bm = create_block_mask(mask_mod, None, None, n, n, device=DEV, BLOCK_SIZE=128)
    flex = torch.compile(flex_attention)
    want = flex(qc, kc, vc, block_mask=bm, enable_gqa=True, scale=scale)[0].transpose(0, 1)

    res = {}
    for bq, bk in ((128, 64), (128, 128), (64, 64)):
        out, _ = run_tiles(q, k, v, table, plan, bq, bk, scale)
        check(f"prefill {bq}x{bk} vs FlexAttention", out, want, atol=3e-2, rtol=3e-2)
        res[f"triton {bq}x{bk}"] = bench(lambda bq=bq, bk=bk: run_tiles(q, k, v, table, plan, bq, bk, scale))
    out = kvfuse.attention(q, k, v, table, plan, backend="triton")
    check("prefill kvfuse.attention (default tiles)", out, want, atol=3e-2, rtol=3e-2)
    res["FlexAttention (BlockMask 128)"] = bench(lambda: flex(qc, kc, vc, block_mask=bm, enable_gqa=True, scale=scale))
    best = min(v for p, v in res.items() if p.startswith("triton"))
    for p, ms in res.items():
        record(sec, p, ms, "TFLOP/s", flops / ms / 1e9, ratio_vs_best_triton=round(ms / best, 2))

    # dense causal baselines: more pairs than needed, TFLOP/s per causal pair (an efficiency ceiling)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    causal_flops = 4 * d * hq * n * (n + 1) / 2
    ke, ve = kc.repeat_interleave(hq // hkv, 1), vc.repeat_interleave(hq // hkv, 1)
    for name, be in (("SDPA FA2 dense causal*", SDPBackend.FLASH_ATTENTION),
                     ("SDPA cuDNN dense causal*", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel([be]):
                f = lambda: torch.nn.functional.scaled_dot_product_attention(qc, ke, ve, is_causal=True, scale=scale)  # noqa: E731
                f()
                ms = bench(f)
            record(sec, name, ms, "TFLOP/s", causal_flops / ms / 1e9, ratio_vs_best_triton=round(ms / best, 2))
        except Exception as e:  # noqa: BLE001 - a missing backend is reported, not fatal
            log(f"  {name}: not run ({type(e).__name__}: {str(e)[:80]})")


# ---------------------------------------------------------------------------------------------- §4
def decode_section(masked, quick):
    from torch.nn.attention.flex_attention import flex_attention

    batch = 8 if quick else 32
    n, hq, hkv, d, page_size = 32768, 32, 8, 128, 16
    if masked:  # prefix + 4 threads; the decoding token is the last of thread 3 and sees prefix + thread 3
        th = (n - 8192) // 4
        g = SegmentGraph([Segment("p", 8192)] + [Segment(f"t{i}", th, ("p",)) for i in range(4)])
    else:
        g = SegmentGraph([Segment("all", n)])
    plan = kvfuse.plan(kvfuse.AttentionSpec([g] * batch, q_lens=[1] * batch, device=DEV))
    k, v, table = paged_pool([n] * batch, page_size, hkv, d, torch.bfloat16)
    q = torch.randn(batch, hq, d, device=DEV).to(torch.bfloat16)
    scale = d ** -0.5
    visible = plan.visible_pairs() // batch  # keys each query reads
    nbytes = 2 * batch * visible * hkv * d * 2
    sec = f"4. decode B={batch} N={n}{' cross-thread mask' if masked else ''}"

    kc = torch.stack([kvfuse.gather_kv(k, table[b], n) for b in range(batch)]).transpose(1, 2).contiguous()
    vc = torch.stack([kvfuse.gather_kv(v, table[b], n) for b in range(batch)]).transpose(1, 2).contiguous()
    qc = q[:, :, None, :]  # [B, Hq, 1, D]
    mask_mod, create_block_mask = flex_mask_mod(plan, n - 1)
    bm = create_block_mask(mask_mod, None, None, 1, n, device=DEV, BLOCK_SIZE=128)
    flex = torch.compile(flex_attention)
    want = flex(qc, kc, vc, block_mask=bm, enable_gqa=True, scale=scale)[:, :, 0]

    res = {}
    for bk in (64, 128):
        out, _ = run_tiles(q, k, v, table, plan, 1, bk, scale)
        check(f"decode bk={bk} vs FlexAttention", out, want, atol=2e-2, rtol=2e-2)
        res[f"triton bk={bk}"] = bench(lambda bk=bk: run_tiles(q, k, v, table, plan, 1, bk, scale))
    res["FlexAttention"] = bench(lambda: flex(qc, kc, vc, block_mask=bm, enable_gqa=True, scale=scale))
    if not masked:
        sd = lambda: torch.nn.functional.scaled_dot_product_attention(qc, kc, vc, scale=scale, enable_gqa=True)  # noqa: E731
        check("SDPA decode", sd()[:, :, 0], want, atol=2e-2, rtol=2e-2)
        res["SDPA contiguous (enable_gqa)"] = bench(sd)
    best = min(v for p, v in res.items() if p.startswith("triton"))
    for p, ms in res.items():
        record(sec, p, ms, "TB/s", nbytes / ms / 1e9, ratio_vs_best_triton=round(ms / best, 2))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller shapes (a smoke run)")
    ap.add_argument("--only", default="1234")
    a = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    log(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    copy_ceiling(1 << 30)
    steps = []
    if "1" in a.only:
        steps += [lambda: rerotate_section(16, a.quick), lambda: rerotate_section(64, a.quick)]
    if "2" in a.only:
        steps += [lambda: compose_section(a.quick)]
    if "3" in a.only:
        steps += [lambda: prefill_section(4096, 4, 4096, a.quick)]
        if not a.quick:
            steps += [lambda: prefill_section(8192, 8, 8192, a.quick)]
    if "4" in a.only:
        steps += [lambda: decode_section(False, a.quick), lambda: decode_section(True, a.quick)]
    for s in steps:
        try:
            s()
        except SystemExit:
            raise
        except Exception as e:  # noqa: BLE001 - report and go on with the other sections
            log(f"  section failed: {type(e).__name__}: {e}")
        torch.cuda.empty_cache()
        log(f"  [{time.time() - t0:.0f}s]")
    log("\n| section | provider | ms | value | unit | ratio |\n| --- | --- | --- | --- | --- | --- |")
    for r in ROWS:
        ratio = r.get("ratio_vs_triton", r.get("ratio_vs_best_triton", ""))
        log(f"| {r['section']} | {r['provider']} | {r['ms']} | {r['value']} | {r['unit']} | {ratio} |")
    out = os.environ.get("OUT")
    if out:
        meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
        with open(os.path.join(out, "gpu_check_triton.json"), "w") as f:
            json.dump(dict(meta=meta, rows=ROWS), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
