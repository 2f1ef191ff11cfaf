"""Timing: ``triton.testing.do_bench`` on a GPU (CUDA events for slow calls, CUDA graphs on request),
``time.perf_counter`` on CPU; memory housekeeping between scenarios; the progress bar."""

from __future__ import annotations

import gc
import math
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

from kvfuse.bench.common import Ctx


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device, reset_compiled: bool = True) -> None:
    """Drop everything a scenario left behind (tensors, compiled graphs) before the next one."""
    if reset_compiled and "torch._dynamo" in sys.modules:  # nothing was compiled if it was never imported
        torch._dynamo.reset()
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


def measure(fns: list[Callable], ctx: Ctx, host: bool = False) -> tuple[float, float, float, str]:
    """(median, p20, p80) milliseconds of one call, rotating over the ``fns`` (one per input buffer).
    ``host``: time with the host clock around the calls and a device synchronisation (for calls that
    are host-bound: CUDA events around a call that enqueues nothing would measure ~0)."""
    n = len(fns)

    def call():
        for f in fns:
            f()

    call()  # warm up: compilation, autotuning, workspace allocation
    sync(ctx.device)
    if ctx.cpu:
        return _cpu_timer(call, n, ctx.args.rep_ms)
    if host:  # until the calls return, the device idle before each (the synchronisation is not timed)
        med, p20, p80, how = _cpu_timer(call, n, ctx.args.rep_ms, before=lambda: sync(ctx.device))
        sync(ctx.device)
        return med, p20, p80, how + " until the call returns, the device synchronised before each"
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
        return (*quantiles([t / n for t in times]), "cuda events (3 runs)")
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


def _cpu_timer(call, n, rep_ms, before=None) -> tuple[float, float, float, str]:
    times, budget = [], time.perf_counter() + rep_ms / 1000
    while len(times) < 3 or (time.perf_counter() < budget and len(times) < 1000):
        if before is not None:
            before()
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1000 / n)
    return (*quantiles(times), f"CPU perf_counter ({len(times)} runs)")


def quantiles(times: list[float]) -> tuple[float, float, float]:
    if len(times) < 2:
        return times[0], times[0], times[0]
    qs = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), qs[1], qs[7]


def n_buffers(state_bytes: int, ctx: Ctx) -> int:
    """How many copies of the inputs to rotate over so that L2 does not flatter small cases."""
    if ctx.cpu or ctx.args.no_rotate or state_bytes <= 0:
        return 1
    return max(1, min(4, math.ceil((256 << 20) / state_bytes)))


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
