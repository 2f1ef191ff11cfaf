"""GPU check of the CUDA decode-attention kernel against the torch reference and the Triton kernel.

1. Correctness on small odd shapes (fp16/bf16, GQA 1/3/4/8/16, head_dim 64/128/256, page 1/5/16,
   1-8 queries per sequence, no mask and the cross-thread mask): cuda vs ``kvfuse.reference``.
2. The BENCH_TARGETS §4 shapes (batch 32 x 32768 tokens, Hq 32, Hkv 8, head_dim 128, bf16, page 16,
   one query per sequence; no mask and the cross-thread mask of ``kvfuse-bench decode``): cuda is
   checked against the reference on two sequences and against Triton on all, then cuda and Triton are
   timed with ``triton.testing.do_bench`` (median). TB/s = K+V bytes of the visible tokens / time.

3. With ``--variants`` (default: every variant), steps 1-2 for the cuda kernel are repeated once per
   head_dim-128 kernel variant (``KVFUSE_CUDA_DECODE_VARIANT``, read once per process, so each runs
   in a subprocess of this script) and the table lists cuda[vN] per variant; ``--variants ""`` runs
   the default variant only, in this process.

Inputs and plans come from ``kvfuse.bench.decode`` (the benchmark's own builders).

    python bench/gpu_decode_check.py [--context 32768] [--batch 32] [--skip-small] [--variants 0,1,2,3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import types

import torch
from triton.testing import do_bench

import kvfuse
from kvfuse import _ops, reference
from kvfuse.bench.common import Ctx
from kvfuse.bench.decode import make_state, thread_graph
from kvfuse.bench.prefill import kvfuse_attention
from kvfuse.dispatch import meta
from kvfuse.segments import Segment, SegmentGraph

DEV = torch.device("cuda", 0)
TOL = {torch.float16: 4e-3, torch.bfloat16: 1.6e-2}


def ctx_for(dtype: str) -> Ctx:
    return Ctx(args=types.SimpleNamespace(dtype=dtype, api=False), device=DEV)


def graph_for(context: int, masked: bool, threads: int = 4) -> SegmentGraph:
    return thread_graph(context, threads, None) if masked else SegmentGraph([Segment("ctx", context)])


def run_backend(st: dict, backend: str):
    """(out, lse) of one backend's registered op, with the plan's tile map for that backend."""
    q, plan = st["q"], st["plan"]
    t = plan.tiles(*meta("segment_attention", backend)["tile_shape"](q.shape[-1], plan.max_q))
    return _ops.segment_attention_op(q, st["k"], st["v"], st["block_table"], plan.kv_lens, plan.qo_indptr,
                                     plan.token_seg, plan.ancestors, t.work_seq, t.work_qtile, t.kt_indptr,
                                     t.kt_index, t.kt_full, t.block_q, t.block_k, 1.0 / math.sqrt(q.shape[-1]),
                                     backend)


def ref_of(st: dict):
    p = st["plan"]
    q = st["q"]
    # float64 math (the reference gathers and widens one sequence at a time, the pool stays as is)
    return reference.segment_attention(q.double(), st["k"], st["v"], st["block_table"], p.kv_lens, p.qo_indptr,
                                       p.token_seg, p.ancestors, q.shape[-1] ** -0.5)


def compare(name: str, got, want, dtype) -> bool:
    o, lse = got
    wo, wlse = want
    tol = TOL[dtype]
    err_o = (o.double() - wo.double()).abs().max().item()
    fin = torch.isfinite(wlse)
    err_l = (lse.double()[fin] - wlse.double()[fin]).abs().max().item() if fin.any() else 0.0
    same_inf = bool(torch.equal(torch.isfinite(lse), fin))
    ok = err_o <= 2 * tol and err_l <= 1e-3 and same_inf and bool(torch.isfinite(o).all())
    print(f"  {name:<66} out err {err_o:.2e}  lse err {err_l:.2e}  {'ok' if ok else 'WRONG'}")
    return ok


def small_checks() -> bool:
    """cuda vs the float64 reference on small hostile shapes (queries = the last q_len tokens)."""
    print("correctness, small shapes (cuda vs float64 reference):")
    ok = True
    cases = [  # dtype, B, context, page, hq, hkv, d, q_len, masked
        ("bf16", 3, 1000, 16, 32, 8, 128, 1, False),
        ("bf16", 3, 1000, 16, 32, 8, 128, 1, True),
        ("fp16", 2, 777, 5, 6, 2, 64, 3, True),
        ("bf16", 2, 515, 1, 4, 1, 256, 8, True),
        ("fp16", 2, 300, 7, 16, 1, 128, 1, True),
        ("bf16", 2, 300, 16, 16, 2, 128, 8, True),
        ("fp16", 2, 300, 16, 3, 3, 64, 2, False),
        ("bf16", 4, 2049, 16, 8, 8, 256, 1, True),
    ]
    for dt, B, C, page, hq, hkv, d, ql, masked in cases:
        ctx = ctx_for(dt)
        st = make_state(ctx, B, C, page, hq, hkv, d, graph_for(C, masked))
        if ql > 1:  # the same graph with q_len queries per sequence (the last q_len tokens)
            st["plan"] = kvfuse.plan(kvfuse.AttentionSpec([st["graph"]] * B, q_lens=[ql] * B, device=DEV))
            st["q"] = torch.randn(B * ql, hq, d, device=DEV).to(ctx.dtype)
        name = f"{dt} B{B} ctx{C} page{page} Hq{hq} Hkv{hkv} d{d} q{ql}" + (" masked" if masked else "")
        ok &= compare(name, run_backend(st, "cuda"), ref_of(st), ctx.dtype)
    return ok


def bench_section(batch: int, context: int, masked: bool, backends=("cuda", "triton")) -> tuple[bool, list]:
    ctx = ctx_for("bf16")
    graph = graph_for(context, masked)
    st = make_state(ctx, batch, context, 16, 32, 8, 128, graph)
    what = "cross-thread mask" if masked else "no mask"
    print(f"\n§4 decode B={batch} context={context} Hq=32 Hkv=8 d=128 bf16 page 16, {what}: "
          f"{st['n_visible']} visible tokens per sequence")
    # reference on the first two sequences (same pool, same graph)
    sub = dict(st, q=st["q"][:2], block_table=st["block_table"][:2],
               plan=kvfuse.plan(kvfuse.AttentionSpec([graph] * 2, q_lens=[1] * 2, device=DEV)))
    got = run_backend(st, "cuda")
    ok = compare("cuda vs float64 reference (2 sequences)", tuple(x[:2] for x in got), ref_of(sub), ctx.dtype)
    ok &= compare("cuda vs triton (all sequences)", got, run_backend(st, "triton"), ctx.dtype)
    nbytes = 2 * batch * st["n_visible"] * 8 * 128 * 2
    rows = []
    for backend in backends:
        fn = kvfuse_attention(ctx, backend)(st)
        ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
        rows.append((what, backend, ms, nbytes / ms / 1e9))
    return ok, rows


def run_variant(v: int, a) -> tuple[bool, list]:
    """Checks and cuda timings of kernel variant v, in a subprocess (the variant is read once per process)."""
    env = dict(os.environ, KVFUSE_CUDA_DECODE_VARIANT=str(v))
    cmd = [sys.executable, os.path.abspath(__file__), "--context", str(a.context), "--batch", str(a.batch),
           "--child"] + (["--skip-small"] if a.skip_small else [])
    print(f"\n===== variant {v} =====", flush=True)
    r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    rows = []
    for line in r.stdout.splitlines():
        if line.startswith("ROWS "):
            rows = [(what, f"cuda[v{v}]", ms, tbs) for what, _, ms, tbs in json.loads(line[5:])]
        else:
            print(line)
    return r.returncode == 0, rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--skip-small", action="store_true")
    ap.add_argument("--variants", default="0,1,2,3",
                    help="comma-separated head_dim-128 kernel variants to check and time, each in a subprocess; "
                         "empty: the default (or KVFUSE_CUDA_DECODE_VARIANT) in this process")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    torch.manual_seed(0)
    if a.child:  # one variant: checks, then cuda timings as a machine-readable line
        ok = True if a.skip_small else small_checks()
        rows = []
        for masked in (False, True):
            sec_ok, sec_rows = bench_section(a.batch, a.context, masked, backends=("cuda",))
            ok &= sec_ok
            rows += sec_rows
        print("ROWS " + json.dumps(rows), flush=True)
        raise SystemExit(0 if ok else 1)
    variants = [int(v) for v in a.variants.split(",") if v.strip()]
    ok = True
    rows = []
    if variants:
        for v in variants:
            v_ok, v_rows = run_variant(v, a)
            print(f"variant {v}: {'ok' if v_ok else 'FAILED'}")
            ok &= v_ok
            rows += v_rows
        print("\n===== triton =====")
        for masked in (False, True):
            sec_ok, sec_rows = bench_section(a.batch, a.context, masked, backends=("triton",))
            ok &= sec_ok
            rows += sec_rows
    else:
        ok = True if a.skip_small else small_checks()
        for masked in (False, True):
            sec_ok, sec_rows = bench_section(a.batch, a.context, masked)
            ok &= sec_ok
            rows += sec_rows
    print(f"\n{torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print("| case | provider | time (us) | TB/s |")
    print("| --- | --- | --- | --- |")
    for what, backend, ms, tbs in sorted(rows, key=lambda r: r[0]):
        print(f"| {what} | {backend} | {ms * 1e3:.1f} | {tbs:.2f} |")
    print("all checks ok" if ok else "SOME CHECKS FAILED")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
