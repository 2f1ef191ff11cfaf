"""Running a case: for each provider, build its callable (or report it skipped with the reason),
optionally check its output against the reference in `kvfuse.reference` (a provider that disagrees is
reported as WRONG and not timed), time it, and turn the median time into TB/s or TFLOP/s, a fraction
of the ceiling and a speed-up over the baseline provider."""

from __future__ import annotations

import time

import torch

from kvfuse.bench.common import Case, Ctx, Provider, Result, Skip, as_tuple, clone_state, tensor_bytes
from kvfuse.bench.report import print_table
from kvfuse.bench.timing import Progress, free_memory, measure, n_buffers, sync
from kvfuse.testing import TOL

SLOW_ROW_S = 10.0  # rows slower than this say so in their notes


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
    speedups(results, ctx.args.baseline or case.baseline)
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


def _run_provider_untimed(ctx: Ctx, case: Case, p: Provider, expected: dict) -> Result:
    unit = "TB/s" if case.ceiling in ("copy", "read") else ("TFLOP/s" if case.ceiling == "matmul" else "")
    nbytes = p.bytes if p.bytes is not None else case.bytes
    nflops = p.flops if p.flops is not None else case.flops
    r = Result(case.scenario, case.name, p.name, p.label, "ok", unit=unit, bytes=nbytes, flops=nflops,
               note=p.note, group=case.group or case.name, x=case.x, series=p.label + case.series)
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
        r.ms, r.p20, r.p80, r.timing = measure(fns, ctx, host=case.host_timed)
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


def speedups(results: list[Result], baseline) -> None:
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


def perturb(out):
    """What the hidden ``_wrong`` provider does to a correct output: add 1 to the first 1% of it."""
    t = as_tuple(out)[0]
    flat = t.view(-1)
    flat[: max(1, flat.numel() // 100)] += 1
    return out
