"""GPU sweep of the slot kernels: rerotate_ and compose_copy_, CUDA against Triton, on the
BENCH_TARGETS shapes (§1: 16384 pages x 16 x 8 KV heads x 128 bf16, every slot rotated in place;
§2: 4 threads composed into fresh pages) and a few neighbours (head_dim 64 / 256, one KV head,
page size 1, interleaved pairs, partial rotary).

The inputs are those of ``kvfuse-bench rerotate`` / ``compose`` (their ``make_state``). Each case is
first checked: the CUDA output against the Triton output and the torch reference (bf16 tolerance);
then both backends are timed with ``triton.testing.do_bench`` (median), next to a device copy of the
same bytes. Prints a markdown table (ms, TB/s, fraction of the copy).

Then the CUDA launch variants (``KVFUSE_CUDA_ROTARY_VARIANT``, see csrc/include/kvfuse/rotary.cuh;
read once per process, so each runs in a subprocess of this script) on the §1 / §2 rows: each is
checked the same way and timed, and a second table lists them next to Triton. ``--variants ""``
skips them.

    python bench/gpu_rotary_sweep.py              # every case, then variants 0-7 on §1 / §2
    python bench/gpu_rotary_sweep.py --only rerotate --variants 0,1,4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
from triton.testing import do_bench

from kvfuse import _ops
from kvfuse.bench import compose as bench_compose
from kvfuse.bench import rerotate as bench_rerotate
from kvfuse.bench.common import Ctx
from kvfuse.rope import RopeConfig

TOL = dict(atol=1.6e-2, rtol=1.6e-2)  # bf16: one rounding of the output


def bench(fn) -> float:
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_ms(nbytes: int) -> float:
    """A device copy that reads nbytes / 2 and writes nbytes / 2."""
    src = torch.empty(nbytes // 4, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    return bench(lambda: dst.copy_(src))


def rerotate_case(ctx, pages, page, heads, d, rd, interleaved, timed=("cuda", "triton")):
    rope = RopeConfig(head_dim=d, rotary_dim=rd, theta=1e4)
    st = bench_rerotate.make_state(ctx, pages, page, heads, d, rope)
    args = (st["slots"], st["idx"], st["cos"], st["sin"], rd, interleaved)
    outs = {}
    for b in ("cuda", "triton", "torch"):
        k = st["k"].clone()
        _ops.rerotate_op(k, *args, b)
        outs[b] = k.float()
    torch.testing.assert_close(outs["cuda"], outs["triton"], **TOL)
    torch.testing.assert_close(outs["cuda"], outs["torch"], **TOL)
    del outs
    k = st["k"]
    nbytes = 2 * k.numel() * k.element_size() * rd // d  # dims >= rotary_dim are not touched
    times = {b: bench(lambda b=b: _ops.rerotate_op(k, *args, b)) for b in timed}
    return nbytes, times


def compose_case(ctx, pages, page, heads, d, rd, interleaved, threads=4, timed=("cuda", "triton")):
    rope = RopeConfig(head_dim=d, rotary_dim=rd, theta=1e4)
    st = bench_compose.make_state(ctx, pages, page, heads, d, threads, 0, rope, full=False)
    args = (st["src_slots"], st["dst_slots"], st["idx"], st["cos"], st["sin"], rd, interleaved)
    src, dst = st["src_slots"].long(), st["dst_slots"].long()
    outs = {}
    for b in ("cuda", "triton", "torch"):
        k, v = st["k"].clone(), st["v"].clone()
        _ops.compose_copy_op(k, v, *args, b)
        outs[b] = (k.view(-1, heads, d)[dst].float(), v.view(-1, heads, d)[dst].float())
        assert torch.equal(k.view(-1, heads, d)[src], st["k"].view(-1, heads, d)[src]), f"{b} changed a source"
    for name in ("triton", "torch"):
        torch.testing.assert_close(outs["cuda"][0], outs[name][0], **TOL)
        assert torch.equal(outs["cuda"][1], outs[name][1]), f"compose V differs from {name}"
    del outs
    k, v = st["k"], st["v"]
    nbytes = 2 * 2 * st["total"] * heads * d * k.element_size()  # K + V, read + write
    times = {b: bench(lambda b=b: _ops.compose_copy_op(k, v, *args, b)) for b in timed}
    return nbytes, times


CASES = [
    # (op, label, pages, page_size, kv_heads, head_dim, rotary_dim, interleaved)
    ("rerotate", "§1 bf16 d128 h8 ps16", 16384, 16, 8, 128, 128, False),
    ("rerotate", "§1 interleaved", 16384, 16, 8, 128, 128, True),
    ("rerotate", "d64 h8", 16384, 16, 8, 64, 64, False),
    ("rerotate", "d256 h8", 8192, 16, 8, 256, 256, False),
    ("rerotate", "d128 h2 (K 2)", 65536, 16, 2, 128, 128, False),
    ("rerotate", "d128 h1 (K 1)", 131072, 16, 1, 128, 128, False),
    ("rerotate", "page size 1", 262144, 1, 8, 128, 128, False),
    ("rerotate", "partial rd 64", 16384, 16, 8, 128, 64, False),
    ("compose", "§2 bf16 d128 h8 ps16, 4 threads", 16384, 16, 8, 128, 128, False),
    ("compose", "§2 interleaved", 16384, 16, 8, 128, 128, True),
    ("compose", "d256 h8", 8192, 16, 8, 256, 256, False),
    ("compose", "partial rd 64", 16384, 16, 8, 128, 64, False),
]


# The rows the launch variants are timed on: §1 and §2.
VARIANT_CASES = [c for c in CASES if c[1].startswith(("§1 bf16", "§2 bf16"))]


def run_case(ctx, case, timed=("cuda", "triton")):
    op, _, pages, page, heads, d, rd, inter = case
    fn = rerotate_case if op == "rerotate" else compose_case
    return fn(ctx, pages, page, heads, d, rd, inter, timed=timed)


def cuda_times(ctx, only) -> None:
    """Child mode: check and time the cuda backend (this process's variant) on VARIANT_CASES; one
    JSON line {label: [bytes, ms]}."""
    out = {}
    for case in VARIANT_CASES:
        if only and case[0] != only:
            continue
        nbytes, t = run_case(ctx, case, timed=("cuda",))
        out[case[1]] = [nbytes, t["cuda"]]
        torch.cuda.empty_cache()
    print(json.dumps(out), flush=True)


def variant_table(variants, only, triton_ms) -> None:
    print()
    print("CUDA launch variants (KVFUSE_CUDA_ROTARY_VARIANT; flags: 1 one block per tile, 2 256-thread blocks, "
          "4 two rows per thread for K 4)")
    print("| case | variant | cuda ms | cuda TB/s | cuda / triton time |")
    print("| --- | --- | --- | --- | --- |")
    for v in variants:
        env = dict(os.environ, KVFUSE_CUDA_ROTARY_VARIANT=str(v))
        cmd = [sys.executable, os.path.abspath(__file__), "--cuda-times"] + (["--only", only] if only else [])
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"| (all) | {v} | FAILED: {(r.stderr or r.stdout).strip().splitlines()[-1:]} | | |", flush=True)
            continue
        res = json.loads(r.stdout.strip().splitlines()[-1])
        for label, (nbytes, ms) in res.items():
            tri = triton_ms.get(label)
            ratio = f"{ms / tri:.2f}" if tri else "-"
            print(f"| {label} | {v} | {ms:.3f} | {nbytes / ms / 1e9:.2f} | {ratio} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("rerotate", "compose"))
    ap.add_argument("--variants", default="0,1,2,3,4,5,6,7",
                    help="comma-separated KVFUSE_CUDA_ROTARY_VARIANT values timed on the §1 / §2 rows ('' = none)")
    ap.add_argument("--cuda-times", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    ctx = Ctx(args=argparse.Namespace(dtype="bf16"), device=torch.device("cuda"))
    if a.cuda_times:
        cuda_times(ctx, a.only)
        return
    variants = [int(x) for x in a.variants.split(",") if x.strip()]
    triton_ms = {}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| op | case | MB moved | copy ms | cuda ms | cuda TB/s | cuda / copy | triton ms | triton TB/s "
          "| cuda / triton time |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for op, label, pages, page, heads, d, rd, inter in CASES:
        if a.only and op != a.only:
            continue
        nbytes, t = run_case(ctx, (op, label, pages, page, heads, d, rd, inter))
        triton_ms[label] = t["triton"]
        cp = copy_ms(nbytes)
        tb_cuda, tb_triton = nbytes / t["cuda"] / 1e9, nbytes / t["triton"] / 1e9
        print(f"| {op} | {label} | {nbytes / 1e6:.0f} | {cp:.3f} | {t['cuda']:.3f} | {tb_cuda:.2f} | "
              f"{cp / t['cuda']:.2f} | {t['triton']:.3f} | {tb_triton:.2f} | {t['cuda'] / t['triton']:.2f} |",
              flush=True)
        torch.cuda.empty_cache()
    if variants:
        variant_table(variants, a.only, triton_ms)


if __name__ == "__main__":
    main()
