"""``kvfuse.merge`` of T threads in a `PagedKVStore`: the whole call, against its byte floor.

A store shaped like Llama-3-8B's cache (32 layers, 8 KV heads, head_dim 128, bf16, page 16; tiny on
CPU) holds a ``--prefix``-token prefix (default 4096) and ``--threads`` threads (default 4) forked from
it, ``--thread-len`` tokens each (default 1024): 8K tokens. Random K/V (never zeros). Per backend and
layout, ``REPEATS`` merges, each of fresh forks (made and filled outside the timing):

* **to done**: from the call to the device being idle again (the call, then a synchronisation);
* **returns after**: until the call returns (the host's share: validation, page tables, the
  rotation tables, the launches; the device may still be copying).

The floor of the sequential layout: the keys of threads 2..T, read and written once (in-place
re-rotation) at the copy ceiling; the shared layout moves no bytes (page tables only). ``--check``:
every merged sequence's K/V (`PagedSequence.gather`, every layer) against the inputs: concatenated
(shared), thread i's keys rotated by i * thread_len positions with `kvfuse.reference.rope` (sequential).
"""

from __future__ import annotations

import time

import torch

from kvfuse.bench.common import Case, Ctx, Result, Skip, kvfuse_reasons, opt
from kvfuse.bench.report import print_table
from kvfuse.bench.runner import speedups
from kvfuse.bench.timing import Progress, free_memory, quantiles, sync

NAME = "merge"
X_NAME = "context"
BACKENDS = ("torch", "triton", "cuda")
LAYOUTS = ("sequential", "shared")
BASELINE = "torch sequential"


def _store(ctx: Ctx, layers: int, hkv: int, d: int, page: int, P: int, T: int, L: int):
    import kvfuse

    pages = 2 * (-(-P // page) + T * -(-L // page)) + T + 8
    store = kvfuse.PagedKVStore(layers, pages, page, hkv, d, rope=kvfuse.RopeConfig(head_dim=d, theta=5e5),
                                dtype=ctx.dtype, device=ctx.device)
    gen = torch.Generator(device=ctx.device).manual_seed(0)

    def randn(n):
        return torch.randn(layers, n, hkv, d, generator=gen, device=ctx.device, dtype=torch.float32).to(ctx.dtype)

    prefix = store.sequence("prefix")
    prefix_kv = (randn(P), randn(P))
    if P:
        prefix.append_kv(*prefix_kv)
    threads_kv = [(randn(L), randn(L)) for _ in range(T)]

    def fresh():
        threads = prefix.fork(T)
        for t, (k, v) in zip(threads, threads_kv):
            t.append_kv(k, v)
        sync(ctx.device)
        return threads

    return store, fresh, prefix_kv, threads_kv


def _expected(store, prefix_kv, threads_kv, layout: str, L: int):
    """The merged K/V from the inputs: the shared layout concatenates; the sequential one rotates
    thread i's keys by i * L positions (float64 angles, float32 products: `kvfuse.reference.rope`)."""
    from kvfuse.reference.rope import rotate

    cfg = store.rope.layers[0]
    ks, vs = [prefix_kv[0]], [prefix_kv[1]]
    for i, (k, v) in enumerate(threads_kv):
        if layout == "sequential" and i:
            ang = torch.tensor(float(i * L), dtype=torch.float64) * cfg.inv_freq()
            cos, sin = (torch.cos(ang).float().to(k.device), torch.sin(ang).float().to(k.device))
            k = rotate(k, cos, sin, cfg.rotary_dim, cfg.interleaved).to(k.dtype)
        ks.append(k)
        vs.append(v)
    return torch.cat(ks, 1), torch.cat(vs, 1)


def _time(ctx: Ctx, fresh, layout: str, backend: str, repeats: int):
    """(median, p20, p80) ms to done, the median ms until the call returned, one merged (K, V)."""
    import kvfuse

    kvfuse.merge(fresh(), layout, backend=backend).release()  # compilation, first-call costs
    done, ret = [], []
    for _ in range(repeats):
        threads = fresh()
        t0 = time.perf_counter()
        merged = kvfuse.merge(threads, layout, backend=backend)
        t1 = time.perf_counter()
        sync(ctx.device)
        t2 = time.perf_counter()
        done.append((t2 - t0) * 1e3)
        ret.append((t1 - t0) * 1e3)
        merged.release()
    merged = kvfuse.merge(fresh(), layout, backend=backend)
    kv = merged.gather()
    merged.release()
    return quantiles(done), quantiles(ret)[0], kv


def run(ctx: Ctx) -> None:
    a = ctx.args
    layers = opt(ctx, "layers", 32, 2)
    hkv, d = opt(ctx, "kv_heads", 8, 2), opt(ctx, "head_dim", 128, 16)
    page = opt(ctx, "page_size", 16, 4)
    P, L = opt(ctx, "prefix", 4096, 16), opt(ctx, "thread_len", 1024, 8)
    T = opt(ctx, "threads", 4)
    T = T[0] if isinstance(T, tuple) else T
    repeats = 30 if not ctx.cpu else 5
    backends = [b for b in (a.providers or BACKENDS) if b in BACKENDS]
    prog = Progress(len(backends) * len(LAYOUTS), NAME, not a.quiet)
    el = torch.tensor([], dtype=ctx.dtype).element_size()
    moved = 2 * max(0, T - 1) * L * layers * hkv * d * el  # keys of threads 2..T, read + written
    copy_bw = ctx.ceiling("copy")
    floor_ms = moved / (copy_bw * 1e12) * 1e3 if copy_bw else None
    dt = str(ctx.dtype)[6:]
    case = f"prefix {P} + {T} x {L} tokens, {layers} layers, {hkv} KV heads, head_dim {d}, page {page}, {dt}"
    header = (f"kvfuse.merge of {T} threads forked in a PagedKVStore; ms median of {repeats} merges of fresh forks, "
              f"to done (device idle) and until the call returned; sequential floor: the keys of threads 2..{T} "
              f"read and written once ({moved / 1e6:.3g} MB)"
              + (f" at {copy_bw:.3g} TB/s = {floor_ms:.3g} ms" if floor_ms else "")
              + ("; **CPU timings**" if ctx.cpu else ""))
    store, fresh, prefix_kv, threads_kv = _store(ctx, layers, hkv, d, page, P, T, L)
    rows = []
    try:
        for layout in LAYOUTS:
            for b in backends:
                label = f"{b} {layout}"
                prog.step(label)
                r = Result(NAME, case, b, label, "ok", unit="TB/s", group=case, x=P + T * L, series=label)
                rows.append(r)
                try:
                    kvfuse_reasons("rerotate_", b, k_cache=store.k_cache, rotary_dim=d, interleaved=False)
                    (r.ms, r.p20, r.p80), returned, kv = _time(ctx, fresh, layout, b, repeats)
                    r.timing = "CPU perf_counter around the call, then a device synchronisation"
                    notes = [f"returns after {returned:.3g} ms"]
                    if layout == "sequential" and floor_ms:
                        notes.append(f"{r.ms / floor_ms:.1f}x the floor")
                        r.bytes, r.ceiling = moved, copy_bw
                        r.value = moved / (r.ms * 1e-3) / 1e12
                        r.frac_ceiling = r.value / copy_bw
                    if a.check:
                        ref = _expected(store, prefix_kv, threads_kv, layout, L)
                        err = max(float((x.float() - y.float()).abs().max()) for x, y in zip(kv, ref))
                        r.checked, r.max_err = True, err
                        # bf16 / fp16: one rounding of the rotated key, |k| < ~6 (normal samples)
                        tol = 0.0 if layout == "shared" else (1e-4 if ctx.dtype == torch.float32 else 0.05)
                        notes.append(f"K/V of every layer vs the rotated inputs: max abs {err:.2g} (tol {tol:g})")
                        if err > tol:
                            r.status = "WRONG"
                    r.note = "; ".join(notes)
                except Exception as e:  # one backend failing never aborts the others
                    if isinstance(e, KeyboardInterrupt):
                        raise
                    skip = isinstance(e, Skip)
                    msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
                    r.status, r.note = ("skipped", msg) if skip else ("error", f"{type(e).__name__}: {msg}")
        speedups(rows, a.baseline or BASELINE)
        ctx.results.extend(rows)
        print_table(Case(NAME, case, {}, [], group=case, x=P + T * L, header=header), rows, ctx)
    finally:
        del store
        free_memory(ctx.device, reset_compiled=False)
