"""What every scenario of the benchmark shares: providers, checking, timing, tables and output files.

A scenario builds the inputs of one *case* (a ``state`` dict of tensors and metadata) and a list of
`Provider` objects. `run_case` then, for each provider: builds its callable (or reports it skipped
with the reason), optionally checks its output against the reference in `kvfuse.reference`
(a provider that disagrees is reported as WRONG and not timed), times it, and turns the median time
into TB/s or TFLOP/s, a fraction of the ceiling and a speed-up over the baseline provider.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

PROVIDERS = ("torch", "torch-compile", "triton", "cuda", "flex", "sdpa", "flashinfer", "flash-attn")
HIDDEN_PROVIDERS = ("_wrong",)  # test-only: the torch provider with its output perturbed
KVFUSE_BACKENDS = ("torch", "triton", "cuda")

# Ceilings of BENCH_TARGETS.md (one H200), used when they are not measured in the same run.
# matmul: the low end of the measured 680-790 TFLOP/s range.
ANCHORS = {"copy": 4.27, "read": 4.50, "matmul": 680.0}
CEILING_UNITS = {"copy": "TB/s", "read": "TB/s", "matmul": "TFLOP/s"}

# (atol, rtol) of a provider against the reference, per dtype: as the test suite's table (a bf16 output
# is one rounding, 2**-8, away from the float32 reference; attention adds a few more).
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (4e-3, 4e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Skip(Exception):
    """A provider cannot run this case; the message says why."""


@dataclasses.dataclass
class Provider:
    """One row of a table.

    name: the name used by ``--providers``; label: the row label (a provider can have variants).
    make: ``state -> fn``; ``fn()`` runs the operation once on that state (raise `Skip` if it cannot).
    output: ``(state, fn's return value) -> tensor(s)`` compared with the reference; ``None``: the return value.
    ref: which of the case's references this provider is checked against; ``None``: not checkable
    (it computes a different function, e.g. dense causal attention), the note says so.
    bytes / flops: overrides of the case's counts (e.g. dense causal counts every causal pair).
    """

    name: str
    label: str
    make: Callable[[dict], Callable[[], Any]]
    output: Callable[[dict, Any], Any] | None = None
    ref: str | None = "default"
    bytes: float | None = None
    flops: float | None = None
    note: str = ""


@dataclasses.dataclass
class Reference:
    """How a case's correct output is obtained and compared."""

    fn: Callable[[dict], Any]  # state -> expected tensor(s) (may mutate the state: it gets a copy)
    inplace: bool = True  # the reference mutates its state: give it a copy
    normwise: float | None = None  # compare ||got - want|| / ||want|| <= this instead of elementwise
    note: str = ""


@dataclasses.dataclass
class Result:
    scenario: str
    case: str
    provider: str
    label: str
    status: str  # ok | skipped | WRONG | error
    ms: float | None = None
    p20: float | None = None
    p80: float | None = None
    unit: str = ""
    value: float | None = None
    bytes: float | None = None
    flops: float | None = None
    ceiling: float | None = None
    frac_ceiling: float | None = None
    baseline: str | None = None
    speedup: float | None = None
    checked: bool = False
    max_err: float | None = None
    timing: str = ""
    note: str = ""
    group: str = ""
    x: float | None = None  # the swept size (for --plot)
    wall_s: float | None = None  # wall time of the row: setup, compilation, check and timing
    metrics: dict | None = None  # scenario-specific numbers (fidelity: scores, KL, cost); JSON in the CSV


FIELDS = [f.name for f in dataclasses.fields(Result)]


@dataclasses.dataclass
class Ctx:
    """Run-wide settings and collected results."""

    args: Any
    device: torch.device
    ceilings: dict = dataclasses.field(default_factory=dict)
    ceilings_source: str = "anchors"
    results: list = dataclasses.field(default_factory=list)
    models: dict = dataclasses.field(default_factory=dict)  # e2e's model, reused by threads (same shape)

    @property
    def cpu(self) -> bool:
        return self.device.type != "cuda"

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.args.dtype] if self.args.dtype else (torch.float32 if self.cpu else torch.bfloat16)

    def ceiling(self, kind: str | None) -> float | None:
        if kind is None:
            return None
        if kind in self.ceilings:
            return self.ceilings[kind]
        return None if self.cpu else ANCHORS[kind]


# ---------------------------------------------------------------------------------------- environment
def environment(device: torch.device) -> dict:
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "flashinfer": _version("flashinfer"),
        "flash_attn": _version("flash_attn"),
        "kvfuse": _version("kvfuse"),
        "git_commit": _git_commit(),
        "python": sys.version.split()[0],
    }
    if device.type != "cuda":
        meta["cpu_timings"] = True
    return meta


def _version(module: str) -> str | None:
    try:
        return getattr(__import__(module), "__version__", "unknown")
    except Exception:
        return None


def _git_commit() -> str | None:
    """The ``KVFUSE_GIT_COMMIT`` environment variable when set (a copied tree whose ``.git``, if any,
    may not match the files); else HEAD of the checkout (``-dirty`` if tracked files changed); else None."""
    here = os.path.dirname(os.path.abspath(__file__))
    fallback = os.environ.get("KVFUSE_GIT_COMMIT", "").strip() or None
    if fallback:
        return fallback
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return fallback
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except Exception:
        return fallback


# ---------------------------------------------------------------------------------------- helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device, reset_compiled: bool = True) -> None:
    """Drop everything a scenario left behind (tensors, compiled graphs) before the next one."""
    if reset_compiled:
        try:
            torch._dynamo.reset()
        except Exception:
            pass
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def clone_state(state: dict, keys: tuple[str, ...] | None = None) -> dict:
    """A copy of ``state`` whose tensors (those in ``keys``, default all) are fresh clones."""
    out = dict(state)
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and (keys is None or k in keys):
            out[k] = v.clone()
    return out


def kvfuse_reasons(op: str, backend: str, **inputs) -> None:
    """Raise `Skip` with every reason why a kvfuse backend cannot run ``op`` on ``inputs``."""
    from kvfuse.dispatch import reasons_for

    why = reasons_for(op, backend, **inputs)
    if why:
        raise Skip("; ".join(why))


def need_module(name: str):
    try:
        return __import__(name)
    except Exception as e:
        raise Skip(f"{name} is not importable ({type(e).__name__}: {e})") from None


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def perturb(out):
    """What the hidden ``_wrong`` provider does to a correct output: add 1 to the first 1% of it."""
    t = as_tuple(out)[0]
    flat = t.view(-1)
    flat[: max(1, flat.numel() // 100)] += 1
    return out


# ---------------------------------------------------------------------------------------- checking
def compare(got, want, dtype: torch.dtype, normwise: float | None) -> tuple[bool, float]:
    """(agrees, error): elementwise within `TOL` (error = max abs difference) or normwise."""
    got, want = as_tuple(got), as_tuple(want)
    if len(got) != len(want):
        return False, float("inf")
    ok, err = True, 0.0
    for g, w in zip(got, want):
        if g.shape != w.shape:
            return False, float("inf")
        g, w = g.float(), w.float().to(g.device)
        if not bool(torch.isfinite(g).all()) and bool(torch.isfinite(w).all()):
            return False, float("inf")
        if normwise is not None:
            e = float((g - w).norm() / w.norm().clamp_min(1e-30))
            ok &= e <= normwise
        else:
            atol, rtol = TOL.get(dtype, TOL[torch.float32])
            diff = (g - w).abs()
            e = float(diff.max()) if diff.numel() else 0.0
            ok &= bool((diff <= atol + rtol * w.abs()).all())
        err = max(err, e)
    return ok, err


# ---------------------------------------------------------------------------------------- timing
def measure(fns: list[Callable], ctx: Ctx) -> tuple[float, float, float, str]:
    """(median, p20, p80) milliseconds of one call, rotating over the ``fns`` (one per input buffer)."""
    n = len(fns)

    def call():
        for f in fns:
            f()

    call()  # warm up: compilation, autotuning, workspace allocation
    sync(ctx.device)
    if ctx.cpu:
        return _cpu_timer(call, n, ctx.args.rep_ms)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    call()
    end.record()
    torch.cuda.synchronize()
    once = start.elapsed_time(end)
    if once > 4 * ctx.args.rep_ms:  # a slow call (e2e re-prefill): a few timed runs, no do_bench estimate loop
        times = [once]
        for _ in range(2):
            start.record()
            call()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return (*_quantiles([t / n for t in times]), "cuda events (3 runs)")
    from triton.testing import do_bench, do_bench_cudagraph

    q = [0.5, 0.2, 0.8]
    if ctx.args.cuda_graph:
        try:
            med, p20, p80 = do_bench_cudagraph(call, rep=ctx.args.rep_ms, quantiles=q)
            return med / n, p20 / n, p80 / n, "do_bench_cudagraph"
        except Exception as e:
            torch.cuda.synchronize()
            how = f"do_bench (graph capture failed: {type(e).__name__})"
    else:
        how = "do_bench"
    med, p20, p80 = do_bench(call, warmup=ctx.args.warmup_ms, rep=ctx.args.rep_ms, quantiles=q)
    return med / n, p20 / n, p80 / n, how


def _cpu_timer(call, n, rep_ms) -> tuple[float, float, float, str]:
    times, budget = [], time.perf_counter() + rep_ms / 1000
    while len(times) < 3 or (time.perf_counter() < budget and len(times) < 100):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1000 / n)
    return (*_quantiles(times), f"CPU perf_counter ({len(times)} runs)")


def _quantiles(times: list[float]) -> tuple[float, float, float]:
    if len(times) < 2:
        return times[0], times[0], times[0]
    qs = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), qs[1], qs[7]


def n_buffers(state_bytes: int, ctx: Ctx) -> int:
    """How many copies of the inputs to rotate over so that L2 does not flatter small cases."""
    if ctx.cpu or ctx.args.no_rotate or state_bytes <= 0:
        return 1
    return max(1, min(4, math.ceil((256 << 20) / state_bytes)))


# ---------------------------------------------------------------------------------------- progress
class Progress:
    """A plain-text progress bar on stderr (one line per step when stderr is not a terminal)."""

    def __init__(self, total: int, title: str, enabled: bool = True):
        self.total, self.done, self.title, self.enabled = max(1, total), 0, title, enabled
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def step(self, what: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        width = 24
        filled = int(width * self.done / self.total)
        bar = "#" * filled + "." * (width - filled)
        line = f"[{bar}] {self.done}/{self.total} {self.title}: {what} ({time.perf_counter() - self.t0:.0f} s)"
        if self.tty:
            sys.stderr.write("\r\033[K" + line + ("\n" if self.done >= self.total else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


# ---------------------------------------------------------------------------------------- running
@dataclasses.dataclass
class Case:
    """One benchmark configuration of a scenario."""

    scenario: str
    name: str
    state: dict
    providers: list[Provider]
    references: dict = dataclasses.field(default_factory=dict)
    bytes: float | None = None  # for TB/s
    flops: float | None = None  # for TFLOP/s
    ceiling: str | None = None  # "copy" | "read" | "matmul"
    baseline: Any = None  # label or provider name of the baseline row, or a preference list
    inplace: bool = False  # providers mutate the state: each gets a fresh copy
    mutable: tuple[str, ...] | None = None  # the state's tensors that get mutated (default: all)
    group: str = ""
    x: float | None = None
    header: str = ""


def run_case(ctx: Ctx, case: Case, progress: Progress | None = None) -> list[Result]:
    results = []
    expected: dict = {}
    for p in case.providers:
        if progress:
            progress.step(f"{case.name} {p.label}")
        r = _run_provider(ctx, case, p, expected)
        results.append(r)
        if r.status == "error" and ctx.device.type == "cuda":
            free_memory(ctx.device, reset_compiled=False)
    expected.clear()
    _speedups(results, ctx.args.baseline or case.baseline)
    ctx.results.extend(results)
    print_table(case, results, ctx)
    return results


def _run_provider(ctx: Ctx, case: Case, p: Provider, expected: dict) -> Result:
    t0 = time.perf_counter()
    r = _run_provider_untimed(ctx, case, p, expected)
    r.wall_s = round(time.perf_counter() - t0, 2)
    if r.wall_s >= SLOW_ROW_S:
        r.note = "; ".join(x for x in (r.note, f"row took {r.wall_s:.0f} s (setup, compilation, check)") if x)
    return r


SLOW_ROW_S = 10.0  # rows slower than this say so in their notes


def _run_provider_untimed(ctx: Ctx, case: Case, p: Provider, expected: dict) -> Result:
    unit = "TB/s" if case.ceiling in ("copy", "read") else ("TFLOP/s" if case.ceiling == "matmul" else "")
    nbytes = p.bytes if p.bytes is not None else case.bytes
    nflops = p.flops if p.flops is not None else case.flops
    r = Result(case.scenario, case.name, p.name, p.label, "ok", unit=unit, bytes=nbytes, flops=nflops,
               note=p.note, group=case.group or case.name, x=case.x)
    work = None
    try:
        copy = (lambda: clone_state(case.state, case.mutable)) if case.inplace else (lambda: case.state)
        if ctx.args.check and p.ref is not None and p.ref in case.references:
            ref = case.references[p.ref]
            if p.ref not in expected:
                expected[p.ref] = ref.fn(copy() if ref.inplace else case.state)
            st = copy()
            fn = p.make(st)
            got = fn()
            got = p.output(st, got) if p.output else got
            sync(ctx.device)
            ok, err = compare(got, expected[p.ref], ctx.dtype, ref.normwise)
            del got, st, fn
            r.checked, r.max_err = True, err
            if ref.note:
                r.note = "; ".join(x for x in (r.note, ref.note) if x)
            if not ok:
                r.status = "WRONG"
                r.note = "; ".join(x for x in (r.note, f"disagrees with the reference (error {err:.3g}), not timed")
                                   if x)
                return r
        elif ctx.args.check and p.ref is None and case.references:
            r.note = "; ".join(x for x in (r.note, "not checked") if x)
        n = n_buffers(tensor_bytes({k: v for k, v in case.state.items() if isinstance(v, torch.Tensor)}), ctx)
        if case.inplace:
            work = [copy() for _ in range(n)]
        else:
            work = [case.state] + [clone_state(case.state) for _ in range(n - 1)]
        fns = [p.make(s) for s in work]
        r.ms, r.p20, r.p80, r.timing = measure(fns, ctx)
        if n > 1:
            r.timing += f", {n} buffers"
    except Skip as e:
        r.status, r.note = "skipped", str(e)
        return r
    except Exception as e:  # a failing provider is reported, never aborts the run
        if isinstance(e, KeyboardInterrupt):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        r.status, r.note = "error", f"{type(e).__name__}: {msg[:300]}"
        return r
    finally:
        del work
    if r.ms and r.ms > 0:
        if unit == "TB/s" and nbytes:
            r.value = nbytes / (r.ms * 1e-3) / 1e12
        elif unit == "TFLOP/s" and nflops:
            r.value = nflops / (r.ms * 1e-3) / 1e12
        c = ctx.ceiling(case.ceiling)
        if r.value is not None and c:
            r.ceiling, r.frac_ceiling = c, r.value / c
    return r


def _speedups(results: list[Result], baseline) -> None:
    """Speed-up of every row over the first baseline (a label or provider name, or a preference list) that ran."""
    prefs = (baseline,) if isinstance(baseline, str) or baseline is None else tuple(baseline)
    base = None
    for b in prefs:
        base = next((r for r in results if r.status == "ok" and r.ms and b in (r.label, r.provider)), None)
        if base:
            break
    for r in results:
        r.baseline = base.label if base else (prefs[0] if prefs else None)
        if base and r.status == "ok" and r.ms:
            r.speedup = base.ms / r.ms


def provider_selection(ctx: Ctx, available: list[Provider], default: tuple[str, ...]) -> list[Provider]:
    """Providers of a scenario chosen by ``--providers`` (names the scenario does not have are ignored)."""
    want = ctx.args.providers or default
    chosen = [p for name in want for p in available if p.name == name]
    if "_wrong" in want:
        torch_p = next((p for p in available if p.name == "torch"), None)
        if torch_p is not None:
            chosen.append(_wrong(torch_p))
    return chosen


def _wrong(p: Provider) -> Provider:
    def make(state):
        fn = p.make(state)
        return lambda: _perturbed(fn, state, p)

    return Provider("_wrong", "_wrong (test only)", make, output=None, ref=p.ref, bytes=p.bytes, flops=p.flops)


def _perturbed(fn, state, p):
    out = fn()
    return perturb(p.output(state, out) if p.output else out)


# ---------------------------------------------------------------------------------------- output
def _f(x) -> str:
    if x is None:
        return "–"
    if x == 0:
        return "0"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}"


def table_lines(results: list[Result], ctx: Ctx) -> list[str]:
    unit = next((r.unit for r in results if r.unit), "")
    base = next((r.baseline for r in results if r.baseline), None)
    head = ["provider", "ms (median)", "p20", "p80", unit or "rate", "of ceiling", f"vs {base or 'baseline'}",
            "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([" --- "] * len(head)) + "|"]
    for r in results:
        if r.status != "ok":
            note = f"**{r.status}**" + (f": {r.note}" if r.note else "")
            lines.append(f"| {r.label} | – | – | – | – | – | – | {_md(note)} |")
            continue
        frac = f"{r.frac_ceiling:.2f}" if r.frac_ceiling is not None else "–"
        sp = f"{r.speedup:.2f}×" if r.speedup is not None else "–"
        checked = "checked" if r.checked and "checked" not in r.note else ""
        note = "; ".join(x for x in (r.note, checked, r.timing) if x)
        lines.append(f"| {r.label} | {_f(r.ms)} | {_f(r.p20)} | {_f(r.p80)} | {_f(r.value)} | {frac} | {sp} "
                     f"| {_md(note)} |")
    return lines


def _md(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def print_table(case: Case, results: list[Result], ctx: Ctx) -> None:
    c = ctx.ceiling(case.ceiling)
    src = ""
    if c is not None:
        src = (f"; ceiling {c:.3g} {CEILING_UNITS[case.ceiling]} ({case.ceiling}, "
               f"{'measured in this run' if case.ceiling in ctx.ceilings else 'BENCH_TARGETS.md anchor'})")
    print(f"\n### {case.scenario}: {case.name}")
    if case.header or src:
        print(f"{case.header}{src}\n")
    print("\n".join(table_lines(results, ctx)), flush=True)


def write_json(path: str, meta: dict, results: list[Result]) -> None:
    import json

    with open(path, "w") as f:
        json.dump({"meta": meta, "results": [dataclasses.asdict(r) for r in results]}, f, indent=1)


CSV_META = ("gpu", "device", "torch", "triton", "git_commit", "date")


def write_csv(path: str, meta: dict, results: list[Result]) -> None:
    import csv
    import json

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(CSV_META) + FIELDS)
        for r in results:
            row = dataclasses.asdict(r)
            if row["metrics"] is not None:
                row["metrics"] = json.dumps(row["metrics"], default=str)
            w.writerow([meta.get(k) for k in CSV_META] + [row[k] for k in FIELDS])


def write_plot(path: str, meta: dict, results: list[Result], x_names: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = [s for s in dict.fromkeys(r.scenario for r in results)
                 if len({r.x for r in results if r.scenario == s and r.x is not None}) > 1]
    if not scenarios:
        scenarios = list(dict.fromkeys(r.scenario for r in results))
    fig, axes = plt.subplots(1, len(scenarios), figsize=(6 * len(scenarios), 4.5), squeeze=False)
    for ax, s in zip(axes[0], scenarios):
        rows = [r for r in results if r.scenario == s and r.status == "ok" and r.x is not None]
        use_rate = all(r.value is not None for r in rows) and rows
        for label in dict.fromkeys(r.label for r in rows):
            pts = sorted((r.x, r.value if use_rate else r.ms) for r in rows if r.label == label)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(x_names.get(s, "size"))
        ax.set_ylabel((rows[0].unit if use_rate else "ms (median)") if rows else "")
        ax.set_title(s)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"kvfuse-bench on {meta.get('gpu') or 'CPU'} (torch {meta.get('torch')})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def opt(ctx: Ctx, name: str, gpu_default, cpu_default=None):
    """The option's value, or the scenario's default (shrunk on CPU)."""
    v = getattr(ctx.args, name.replace("-", "_"), None)
    if v is not None:
        return v
    return cpu_default if (ctx.cpu and cpu_default is not None) else gpu_default


def thread_counts(ctx: Ctx, default: tuple[int, ...]) -> tuple[int, ...]:
    """The thread counts of ``--threads`` (a comma list for the scenarios that take one), or ``default``."""
    a = ctx.args
    counts = getattr(a, "thread_counts", None) or ((a.threads,) if getattr(a, "threads", None) else None)
    return tuple(counts or default)


def sweep(ctx: Ctx, default: int) -> list[int]:
    return list(ctx.args.sweep) if ctx.args.sweep else [default]


def randn(shape, ctx: Ctx, gen: torch.Generator, dtype=None) -> torch.Tensor:
    """Random normal values (never zeros) on the run's device."""
    return torch.randn(shape, generator=gen, device=ctx.device, dtype=torch.float32).to(dtype or ctx.dtype)


def generator(ctx: Ctx, seed: int = 0) -> torch.Generator:
    return torch.Generator(device=ctx.device).manual_seed(seed)


def dense_mask(graph, device: torch.device) -> torch.Tensor:
    """`SegmentGraph.dense_mask` (all tokens), built on ``device`` without N^2 index tensors: bool [N, N]."""
    seg = graph.token_segments().long().to(device)
    anc = graph.ancestors.to(device)
    pos = torch.arange(graph.num_tokens, device=device)
    mask = anc[seg][:, seg]  # [N, S] rows, then the key tokens' columns
    mask |= (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])
    return mask
