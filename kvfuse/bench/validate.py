"""kvfuse-bench validate: the GPU correctness pass over the installed kvfuse (it builds nothing).

    kvfuse-bench validate                     # the test suite, then compute-sanitizer over the small calls
    kvfuse-bench validate --skip-tests --log-dir out
    kvfuse-bench validate --calls             # only the small calls (what compute-sanitizer runs)

1. The test suite (``python -m pytest -q -p no:cacheprovider [-n WORKERS] TESTS``): on a GPU it runs every
   backend (``tests/`` skips what the machine cannot run, with the reason).
2. ``compute-sanitizer`` memcheck over one small call of every kernel of the CUDA and Triton backends, and
   racecheck over the CUDA ones (the calls: odd shapes, a layer-stacked pool, strided slots, interleaved and
   partial rotary, an empty LSE side, decode and prefill attention over pages of 5 tokens). Each call is
   also compared with the torch backend (`kvfuse.testing.TOL`).

Exit status 1 when the tests fail, a call disagrees with the torch backend, or the sanitizer reports an
error; steps that cannot run here (no tests folder, no GPU, no compute-sanitizer) are skipped with the reason.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import shutil
import subprocess
import sys

import torch

import kvfuse
from kvfuse import _ops
from kvfuse.dispatch import BackendNotSupported, reasons_for
from kvfuse.testing import TOL

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SANITIZERS = {"memcheck": ("cuda", "triton"), "racecheck": ("cuda",)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tests", help="the test folder (default: tests/ of the checkout kvfuse is imported from)")
    p.add_argument("--workers", type=int, help="pytest-xdist workers (default 8 when pytest-xdist is installed)")
    p.add_argument("--skip-tests", action="store_true", help="do not run the test suite")
    p.add_argument("--skip-sanitizer", action="store_true", help="do not run compute-sanitizer")
    p.add_argument("--log-dir", default="bench/out", help="where the logs go (default bench/out)")
    p.add_argument("--calls", action="store_true",
                   help="only run the small calls and compare them with the torch backend")
    p.add_argument("--backends", default="cuda,triton", help="backends of the small calls (default cuda,triton)")


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _randn(*shape, dtype, device):
    return torch.randn(*shape, dtype=torch.float32, device=device).to(dtype)


def _rerotate(backend, dev):
    rope = kvfuse.RopeConfig(head_dim=64, interleaved=True)
    k = _randn(2, 7, 5, 3, 64, dtype=torch.float16, device=dev)  # layer-stacked [L, pages, page, H, D]
    slots = (torch.arange(18, device=dev) * 2)[::2]  # a strided view: 0, 4, ..., 32
    old = torch.arange(9, device=dev) * 11
    kvfuse.rerotate_(k, slots, old, old + 1000, rope, backend=backend)
    return k


def _compose(backend, dev):
    rope = kvfuse.RopeConfig(head_dim=64, rotary_dim=32)
    k, v = (_randn(2, 7, 5, 3, 64, dtype=torch.float16, device=dev) for _ in range(2))
    src = torch.arange(9, device=dev)
    cos, sin, idx = rope.rotation_tables(torch.tensor([5] * 4 + [-3] * 5), device=dev)
    why = reasons_for("compose_copy_", backend, k_cache=k, rotary_dim=32, interleaved=False)
    if why:
        raise BackendNotSupported("; ".join(why))
    _ops.compose_copy_op(k, v, src, src + 20, idx, cos, sin, 32, False, backend)
    return k, v


def _merge_states(backend, dev):
    va, vb = _randn(2, 10, 3, 64, dtype=torch.float16, device=dev).unbind(0)
    sa, sb = torch.randn(10, 3, device=dev), torch.full((10, 3), -math.inf, device=dev)
    return kvfuse.merge_states(va, sa, vb, sb, backend=backend)


def _attention(q_lens):
    def call(backend, dev):
        g = kvfuse.SegmentGraph.fork_join(prefix=50, threads=[30, 21])
        plan = kvfuse.plan(kvfuse.AttentionSpec([g, g], q_lens=q_lens, device=dev))
        k, v = (_randn(42, 5, 2, 128, dtype=torch.bfloat16, device=dev) for _ in range(2))  # 21 pages per sequence
        table = torch.randperm(42, device=dev, dtype=torch.int32).view(2, 21)
        q = _randn(plan.total_q, 6, 128, dtype=torch.bfloat16, device=dev)
        return kvfuse.attention(q, k, v, table, plan, backend=backend, return_lse=True)

    return call


CALLS = {
    "rerotate_ (layer-stacked fp16, strided slots, interleaved)": _rerotate,
    "compose_copy_ (partial rotary 32 of 64)": _compose,
    "merge_states (one side empty)": _merge_states,
    "attention decode (3 + 1 queries, pages of 5, GQA 3)": _attention([3, 1]),
    "attention prefill (every token a query)": _attention(None),
}


def small_calls(backends: tuple[str, ...]) -> bool:
    """One call of every kernel per backend, compared with the torch backend on the same inputs."""
    dev = _device()
    ok = True
    for name, fn in CALLS.items():
        torch.manual_seed(0)
        want = fn("torch", dev)
        for backend in backends:
            torch.manual_seed(0)
            try:
                got = fn(backend, dev)
            except BackendNotSupported as e:
                print(f"{name} [{backend}]: skipped ({' '.join(str(e).split())})", flush=True)
                continue
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            err, good = _compare(got, want)
            ok &= good
            print(f"{name} [{backend}]: {'ok' if good else 'WRONG'} (max error {err:.3g})", flush=True)
    return ok


def _compare(got, want) -> tuple[float, bool]:
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    err, good = 0.0, True
    for g, w in zip(got, want):
        atol, rtol = TOL[w.dtype]
        finite = torch.isfinite(w)
        good &= bool(torch.equal(finite, torch.isfinite(g)))
        d = (g.float() - w.float())[finite].abs()
        err = max(err, float(d.max()) if d.numel() else 0.0)
        good &= bool((d <= atol + rtol * w.float()[finite].abs()).all())
    return err, good


def _step(title: str, cmd: list[str], log: str) -> bool:
    print(f"\n## {title}\n$ {' '.join(cmd)}   (log: {log})", flush=True)
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                           env=dict(os.environ, PYTHONUNBUFFERED="1"))
    with open(log) as f:
        tail = [line.rstrip() for line in f if line.strip()][-6:]
    print("\n".join(tail))
    print(f"-> {'ok' if r.returncode == 0 else f'FAILED (exit {r.returncode})'}", flush=True)
    return r.returncode == 0


def main(args) -> int:
    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    if args.calls:
        return 0 if small_calls(backends) else 1
    os.makedirs(args.log_dir, exist_ok=True)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    print(f"# kvfuse-bench validate\n\n{gpu or 'no CUDA GPU'}; torch {torch.__version__}; kvfuse {kvfuse.__version__}; "
          f"backends: {', '.join(b for b, r in kvfuse.available('attention').items() if not r)}")
    checkout = os.path.join(ROOT, "tests") if os.path.exists(os.path.join(ROOT, "pyproject.toml")) else None
    tests = args.tests or checkout
    ok = True
    if args.skip_tests:
        print("\n## tests: skipped (--skip-tests)")
    elif tests is None:
        print("\n## tests: skipped (kvfuse is not imported from a checkout: pass --tests)")
    else:
        workers = args.workers
        if workers is None and importlib.util.find_spec("xdist") is not None:
            workers = 8
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", tests]
        cmd += ["-n", str(workers)] if workers else []
        ok &= _step("tests", cmd, os.path.join(args.log_dir, "pytest.log"))
    sanitizer = shutil.which("compute-sanitizer")
    if args.skip_sanitizer:
        print("\n## compute-sanitizer: skipped (--skip-sanitizer)")
    elif gpu is None or sanitizer is None:
        print(f"\n## compute-sanitizer: skipped ({'no CUDA GPU' if gpu is None else 'not on PATH'})")
    else:
        for tool, tool_backends in SANITIZERS.items():
            chosen = [b for b in backends if b in tool_backends]
            if not chosen:
                continue
            cmd = [sanitizer, "--tool", tool, "--error-exitcode", "1", "--print-limit", "20", sys.executable, "-m",
                   "kvfuse.bench", "validate", "--calls", "--backends", ",".join(chosen)]
            ok &= _step(f"compute-sanitizer {tool} ({', '.join(chosen)})", cmd,
                        os.path.join(args.log_dir, f"sanitizer_{tool}.log"))
    print(f"\nvalidate: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1
