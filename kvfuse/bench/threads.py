"""Parallel decoding: T threads forked from one prefix, decoded as ONE batch per step versus one by one.

A Llama-3-8B-shaped Hugging Face ``transformers`` model with random weights (32 layers, 32 / 8 heads,
head_dim 128, bf16, ``attn_implementation="kvfuse"``, created with ``dtype=``; a tiny one on CPU)
prefills a prefix of ``--prefix`` tokens into a `kvfuse.PagedKVStore` once (`hf.prefill`, in chunks
of `PREFILL_CHUNK` tokens). Then, for every T of ``--threads`` (default 1,2,4,8), in the same run:

* ``graphs``: the batched step as one CUDA-graph replay per step
  (`kvfuse.integrations.hf_graphs.DecodeGraphs`, captured once per batch-size bucket; on CPU the same
  static path runs eagerly).
* ``graphs-compiled``: the same with the step's forward compiled by ``torch.compile`` before the
  capture (``DecodeGraphs(compile=True)``: inductor fuses the model's norms, rotary embedding and
  activations, and the projections run on `kvfuse.small_mm`; the compile time of each bucket is paid
  in the untimed first pass).
* ``graphs-rows``: the same with every row reading the prefix itself (``shared_prefix=False``): the
  attention reads the prefix's K/V T times per step instead of once.
* ``batched``: T threads forked from the prefix (`kvfuse.fork`, no copy) decode greedily with ONE
  `hf.decode` call per step: every layer runs one `kvfuse.attention` call over the T rows.
* ``one-by-one``: T fresh threads forked from the same prefix, each decoded by its own `hf.decode`
  call per step (T forwards of batch 1 per step).

Both start from the same T distinct first tokens and run `WARMUP_STEPS` untimed steps, then
``--steps`` timed ones. ms per step: median, p20 and p80 over the timed steps (CUDA events around
each step on a GPU, ``time.perf_counter`` on CPU); tok/s = T tokens per step / step time; speed-up:
one-by-one time / each path's time; "x the floor": step time over the time to read the weights, the
prefix's K/V and the threads' own K/V once at the read ceiling (measured by ``ceilings`` in ``all``,
else bench/TARGETS.md's anchor). The threads are released after each path (the prefix stays).

Before timing, all paths run all their steps once on separate forks (the check below, or, without
``--check``, the same pass with its verdict unused): the timed steps then pay no first-call costs
(e.g. kernel variants compiled for lengths first reached while decoding).

``--check`` (before timing, on separate forks of the prefix): for ``WARMUP_STEPS + --steps`` steps
every path is fed the same tokens (the graphs path's greedy choices, so one disagreement cannot
make the rest diverge); the graph paths are compared with the same static plan run eagerly (what the
capture must reproduce; for ``graphs-compiled`` the same compiled forward run eagerly, and its
distance to the uncompiled static plan is reported beside, unchecked: inductor's fused kernels keep
float32 where the eager model rounds to bf16 between ops), the batched path with the one-by-one path.
Their last-position logits must agree normwise (`NORM_TOL`: bf16 5e-2, fp32 1e-4) at every step, and
their greedy tokens must be equal, except at a near tie: where the batched logits of the two
candidates differ by at most twice the largest logit difference between the two paths in that row
(then that difference, which the tolerance allows, can swap them). Near ties are counted in the
notes; any other disagreement makes the batched row WRONG (exit status 1).
``--providers _wrong`` (tests only) perturbs the batched logits, which the check must catch.
"""

from __future__ import annotations

import math
import time

import torch

import kvfuse
from kvfuse.bench.common import Case, Ctx, Result, hf_or_skip, model_shape, opt, thread_counts
from kvfuse.bench.e2e import NORM_TOL, build_model
from kvfuse.bench.report import print_table
from kvfuse.bench.runner import perturb, speedups
from kvfuse.bench.timing import Progress, free_memory, quantiles, sync

NAME = "threads"
X_NAME = "threads"
WARMUP_STEPS = 2  # untimed steps of each path (kernel compilation, allocator warm-up)
PREFILL_CHUNK = 4096  # tokens per prefill forward (bounds the logits and activations of the prefill)
BASELINE = "one-by-one"


def _prefill(hf, model, prefix, ids: torch.Tensor) -> None:
    for s in range(0, ids.shape[1], PREFILL_CHUNK):
        logits = hf.prefill(model, prefix, ids[:, s: s + PREFILL_CHUNK])
        del logits


def _step_batched(hf, model, threads, tok: torch.Tensor) -> torch.Tensor:
    """One batched decode step: ``tok`` int64 ``[T, 1]`` -> last-position logits ``[T, vocab]``."""
    return hf.decode(model, threads, tok)[:, -1]


def _step_one_by_one(hf, model, threads, tok: torch.Tensor) -> torch.Tensor:
    """The same step as T decode calls of one thread each."""
    return torch.cat([hf.decode(model, [t], tok[i: i + 1])[:, -1] for i, t in enumerate(threads)])


def _step_graphs(runner):
    """The batched step as a CUDA-graph replay (`DecodeGraphs`; the static path run eagerly on CPU)."""
    return lambda hf, model, threads, tok: runner.decode(threads, tok)[:, -1]


def _step_eager(runner):
    """``runner``'s own static path without the capture (for a compiled runner: the same compiled
    forward, run eagerly on the same buckets)."""
    def step(hf, model, threads, tok):
        graphs, runner.graphs = runner.graphs, False
        try:
            return runner.decode(threads, tok)[:, -1]
        finally:
            runner.graphs = graphs
    return step


def _release(threads) -> None:
    for t in threads:
        t.release()


def check(hf, model, prefix, tok0: torch.Tensor, n_steps: int, tol: float, wrong: bool = False,
          steps=(_step_batched,), refs=(None,)) -> list[dict]:
    """Decode ``n_steps`` with each batched path of ``steps`` from ``tok0`` (``[T, 1]``), each on fresh forks
    of ``prefix``, all fed the first path's greedy tokens, and compare each with its reference in ``refs``
    (None: the one-by-one path; otherwise a step function run on forks of its own, e.g. the same static
    plan without the graph): logits normwise and greedy tokens (near ties allowed). One result per path."""
    T = tok0.shape[0]
    ref_fns = list(dict.fromkeys([_step_one_by_one if r is None else r for r in refs]))
    forks = [kvfuse.fork(prefix, T) for _ in list(steps) + ref_fns]
    res = [dict(err=0.0, equal=0, ties=0, bad=0) for _ in steps]
    try:
        tok = tok0
        for _ in range(n_steps):
            outs = [fn(hf, model, f, tok).float() for fn, f in zip(list(steps) + ref_fns, forks)]
            ref_out = dict(zip(ref_fns, outs[len(steps):]))
            for r, lb, ref in zip(res, outs, refs):
                ls = ref_out[_step_one_by_one if ref is None else ref]
                if wrong:
                    lb = perturb(lb.clone())
                e = float((ls - lb).norm() / lb.norm().clamp_min(1e-30))
                r["err"] = max(r["err"], e) if math.isfinite(e) else math.inf
                gb, gs = lb.argmax(-1), ls.argmax(-1)
                same = gb == gs
                delta = (ls - lb).abs().amax(-1)
                gap = lb.gather(-1, gb[:, None])[:, 0] - lb.gather(-1, gs[:, None])[:, 0]
                tie = ~same & (gap <= 2 * delta)
                r["equal"] += int(same.sum())
                r["ties"] += int(tie.sum())
                r["bad"] += int((~same & ~tie).sum())
            tok = outs[0].argmax(-1)[:, None]
    finally:
        for f in forks:
            _release(f)
    for r in res:
        r.update(ok=r["err"] <= tol and r["bad"] == 0, total=T * n_steps)
    return res


def time_path(ctx: Ctx, hf, model, prefix, tok0: torch.Tensor, warmup: int, steps: int, step):
    """(median, p20, p80) ms per step of greedy decoding of fresh forks of ``prefix`` from ``tok0``."""
    threads = kvfuse.fork(prefix, tok0.shape[0])
    times, events = [], []
    try:
        tok = tok0
        for i in range(warmup + steps):
            timed = i >= warmup
            if timed and not ctx.cpu:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            tok = step(hf, model, threads, tok).argmax(-1, keepdim=True)
            if timed:
                if ctx.cpu:
                    times.append((time.perf_counter() - t0) * 1000)
                else:
                    end.record()
                    events.append((start, end))
        sync(ctx.device)
        times += [s.elapsed_time(e) for s, e in events]
    finally:
        _release(threads)
    return quantiles(times)


def run(ctx: Ctx) -> None:
    hf = hf_or_skip(ctx, NAME, "batched")
    if hf is None:
        return
    a = ctx.args
    layers, hq, hkv, d = model_shape(ctx)
    page = opt(ctx, "page_size", 16)
    P, steps = opt(ctx, "prefix", 8192, 64), opt(ctx, "steps", 32, 4)
    counts = tuple(a.sweep) if a.sweep else thread_counts(ctx, (1, 2, 4, 8))
    warmup = WARMUP_STEPS
    wrong = "_wrong" in (a.providers or ())
    tol = NORM_TOL.get(ctx.dtype, 5e-2)
    dev, dt = ctx.device, str(ctx.dtype)[6:]
    prog = Progress(5 * len(counts), NAME, not a.quiet)

    model, cfg = build_model(ctx, layers, hq, hkv, d, attn_implementation="kvfuse")
    per_thread = -(-(warmup + steps) // page)
    forks = 8  # the check's paths and references decode side by side, each on its own forks
    num_pages = -(-P // page) + forks * max(counts) * per_thread + 3 * max(counts) + 2  # + scratch pages
    store = kvfuse.PagedKVStore.from_hf(cfg, num_pages, page, dtype=ctx.dtype, device=dev)
    gen = torch.Generator().manual_seed(0)
    prefix = store.sequence("prefix")
    t0 = time.perf_counter()
    if P:
        _prefill(hf, model, prefix, torch.randint(0, cfg.vocab_size, (1, P), generator=gen).to(dev))
    sync(dev)
    prefill_ms = (time.perf_counter() - t0) * 1000
    timer = "CPU perf_counter" if ctx.cpu else "CUDA events"
    header = (f"{'Llama-3-8B-shaped' if not ctx.cpu else 'tiny'} random-weight model ({layers} layers, hidden "
              f"{hq * d}, {hq}/{hkv} heads, d {d}, {dt}, attn_implementation=kvfuse); prefix of {P} tokens "
              f"prefilled once ({prefill_ms:.0f} ms, first call, compilation included); {warmup} untimed + "
              f"{steps} timed greedy steps per path; ms per step = {timer}, median over the steps"
              + ("; **CPU timings**" if ctx.cpu else ""))
    from kvfuse.integrations.hf_graphs import DecodeGraphs

    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    read_bw = ctx.ceiling("read")
    summary = []
    try:
        for T in counts:
            case = f"T={T}: {T} threads forked from a {P}-token prefix, {steps} steps, {layers} layers, {dt}"
            kv_bytes = 2 * layers * (P + T * (warmup + steps)) * hkv * d * store.k_cache.element_size()
            floor_ms = (weight_bytes + kv_bytes) / (read_bw * 1e12) * 1e3 if read_bw else None
            floor = (f"; floor (weights {weight_bytes / 1e9:.3g} GB + K/V {kv_bytes / 1e9:.3g} GB at the read "
                     f"ceiling {read_bw:.3g} TB/s): {floor_ms:.3g} ms/step") if floor_ms else ""
            rows = [Result(NAME, case, "graphs", f"graphs: 1 CUDA-graph replay of {T} rows per step (DecodeGraphs)",
                           "ok", unit="tok/s", group=case, x=T, series="graphs",
                           note="the batched step captured once per bucket; the prefix read once" + floor),
                    Result(NAME, case, "graphs-compiled", f"graphs, forward compiled: 1 replay of {T} rows per step",
                           "ok", unit="tok/s", group=case, x=T, series="graphs-compiled",
                           note="DecodeGraphs(compile=True): torch.compile (inductor) before the capture, "
                                "projections on kvfuse.small_mm"),
                    Result(NAME, case, "graphs-rows", f"graphs, each row reading the prefix: {T} rows per step",
                           "ok", unit="tok/s", group=case, x=T, series="graphs-rows",
                           note="DecodeGraphs(shared_prefix=False)"),
                    Result(NAME, case, "batched", f"batched: 1 hf.decode call of {T} rows per step", "ok",
                           unit="tok/s", group=case, x=T, series="batched",
                           note="one kvfuse.attention call per layer over the T threads"),
                    Result(NAME, case, BASELINE, f"one-by-one: {T} hf.decode calls of 1 row per step", "ok",
                           unit="tok/s", group=case, x=T, series="one-by-one")]
            runner = DecodeGraphs(model, store, max_batch=T)
            compiled = DecodeGraphs(model, store, max_batch=T, compile=True)
            apart = DecodeGraphs(model, store, max_batch=T, shared_prefix=False)
            eager = DecodeGraphs(model, store, max_batch=T, graphs=False)  # the graphs' reference: no capture
            steps_of = {"graphs": _step_graphs(runner), "graphs-compiled": _step_graphs(compiled),
                        "graphs-rows": _step_graphs(apart), "batched": _step_batched,
                        BASELINE: _step_one_by_one}
            try:
                tok0 = torch.randperm(cfg.vocab_size, generator=gen)[:T, None].to(dev)  # T distinct first tokens
                # Every path over every step first (the check, or without --check an untimed priming
                # pass): the timed steps then see no first-call costs at all (kernel variants a compiler
                # specialises on lengths that change while decoding, graph captures).
                checked = rows[:4]
                static = _step_graphs(eager)
                # the graphs against the same static path run eagerly; the compiled graphs against the same
                # compiled forward run eagerly (what the capture must reproduce), and, reported alongside,
                # against the uncompiled static path (inductor's fused kernels round differently)
                refs = [static, _step_eager(compiled), static, None]
                results = check(hf, model, prefix, tok0, warmup + steps, tol, wrong,
                                [steps_of[r.provider] for r in checked] + [steps_of["graphs-compiled"]],
                                refs + [static])
                for r, c, ref in zip(checked, results, refs):
                    if a.check:
                        r.checked, r.max_err = True, c["err"]
                        against = ("the same compiled forward run eagerly" if r.provider == "graphs-compiled" else
                                   "the same static plan run eagerly" if ref else "one-by-one")
                        what = (f"vs {against}: logits normwise error {c['err']:.2g} (tol {tol:g}), greedy tokens "
                                f"equal {c['equal']}/{c['total']}, {c['ties']} near ties")
                        if c["bad"]:
                            what += f", {c['bad']} disagree"
                        if not c["ok"]:
                            r.status = "WRONG"
                            what += "; not timed"
                        if r.provider == "graphs-compiled":
                            u = results[-1]
                            what += (f"; vs the uncompiled static plan (not a pass / fail check): normwise "
                                     f"{u['err']:.2g}, greedy tokens equal {u['equal']}/{u['total']}")
                        r.note = "; ".join((r.note, what))
                for r in rows:
                    prog.step(f"T={T} {r.provider}")
                    if r.status != "ok":
                        continue
                    r.ms, r.p20, r.p80 = time_path(ctx, hf, model, prefix, tok0, warmup, steps, steps_of[r.provider])
                    r.value = T / (r.ms * 1e-3)
                    r.timing = f"{timer}, {steps} steps"
                    if floor_ms:
                        r.note = "; ".join(x for x in (r.note, f"{r.ms / floor_ms:.2f}x the floor") if x)
            except Exception as e:  # one thread count failing never aborts the others
                if isinstance(e, KeyboardInterrupt):
                    raise
                msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
                for r in rows:
                    if r.status == "ok" and r.ms is None:
                        r.status, r.note = "error", f"{type(e).__name__}: {msg}"
                free_memory(dev, reset_compiled=False)
            finally:
                for r in (runner, compiled, apart, eager):
                    r.close()
            speedups(rows, a.baseline or BASELINE)
            ctx.results.extend(rows)
            print_table(Case(NAME, case, {}, [], group=case, x=T, header=header), rows, ctx)
            summary.append((T, rows))
    finally:
        prefix.release()
        ctx.models.clear()  # a model e2e kept for this scenario
        del store, model
    _print_summary(summary, ctx)


def _print_summary(summary, ctx: Ctx) -> None:
    if len(summary) < 2:
        return
    print(f"\n### {NAME}: summary" + (" (CPU timings)" if ctx.cpu else ""))
    print("| T | graphs ms/step | graphs-compiled ms/step | batched ms/step | one-by-one ms/step "
          "| graphs-compiled tok/s | graphs-compiled vs T=1 tok/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    base = next((c.value for T, (_, c, *_) in summary if T == 1 and c.value), None)
    for T, (g, c, _, b, s) in summary:
        scale = f"{c.value / base:.2f}×" if base and c.value else "–"
        print(f"| {T} | {_fmt(g.ms, '.3g')} | {_fmt(c.ms, '.3g')} | {_fmt(b.ms, '.3g')} | {_fmt(s.ms, '.3g')} | "
              f"{_fmt(c.value, ',.0f')} | {scale} |")


def _fmt(x, spec: str) -> str:
    return format(x, spec) if x is not None else "–"
