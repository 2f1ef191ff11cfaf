"""Decoding with ``model.generate`` and kvfuse's decode graphs: ms per generated token, against the floor.

A Llama-3-8B-shaped random-weight model (as `e2e`; bf16, tiny on CPU) decodes ``--steps`` tokens
greedily after a prompt of ``--context`` tokens (default 4096), batch 1. Paths, in the same run:

* ``sdpa``: ``model.generate`` with ``attn_implementation="sdpa"`` and transformers' dynamic cache;
* ``sdpa+static``: the same with ``cache_implementation="static"`` (transformers compiles the forward);
* ``kvfuse``, ``kvfuse+static``: the same two with ``attn_implementation="kvfuse"``;
* ``kvfuse+graphs``: the prompt prefilled into a `kvfuse.PagedKVStore` (`hf.prefill`), then one
  `DecodeGraphs` replay per token (greedy, the same loop); ``kvfuse+graphs-compiled`` the same with
  the forward compiled before the capture (``DecodeGraphs(compile=True)``: as ``sdpa+static``, a
  compiled forward replayed as a CUDA graph).

ms per token: (time of a generate of ``1 + steps`` new tokens - time of one of 1 new token) / steps,
median over ``REPEATS`` runs after one untimed run (compilation, graph capture); for ``kvfuse+graphs``
the median of the timed decode steps. The floor: the weights and the prompt's K/V read once per token
at the read ceiling. ``--check``: every path's greedy tokens are compared with the ``sdpa`` path's
(random weights give near ties: the first step where they differ is reported, not a verdict), and
``kvfuse+graphs``' first logits with ``sdpa``'s (normwise, `NORM_TOL`).
"""

from __future__ import annotations

import time

import torch

from kvfuse.bench.common import Case, Ctx, Result, hf_or_skip, model_shape, opt
from kvfuse.bench.e2e import NORM_TOL, build_model
from kvfuse.bench.report import print_table
from kvfuse.bench.runner import speedups
from kvfuse.bench.timing import Progress, free_memory, quantiles, sync

NAME = "generate"
X_NAME = "context"
REPEATS = 3
BASELINE = "sdpa"
PATHS = ("sdpa", "sdpa+static", "kvfuse", "kvfuse+static", "kvfuse+graphs", "kvfuse+graphs-compiled")


def _timed(ctx: Ctx, fn):
    """(ms, fn's result), the device synchronised before and after."""
    sync(ctx.device)
    t0 = time.perf_counter()
    out = fn()
    sync(ctx.device)
    return (time.perf_counter() - t0) * 1000, out


def _generate(model, ids, n: int, static: bool):
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, return_dict_in_generate=True, output_logits=True)
    if static:
        kw["cache_implementation"] = "static"
    return model.generate(ids, attention_mask=torch.ones_like(ids), **kw)


def _time_generate(ctx: Ctx, model, ids, steps: int, static: bool):
    """(median, p20, p80) ms per token, the tokens and the first logits."""
    _generate(model, ids, 1 + steps, static)  # compilation, autotuning, allocator warm-up
    per_token, out = [], None
    for _ in range(REPEATS):
        t1, _ = _timed(ctx, lambda: _generate(model, ids, 1, static))
        tn, out = _timed(ctx, lambda: _generate(model, ids, 1 + steps, static))
        per_token.append((tn - t1) / steps)
    return quantiles(per_token), out.sequences[0, ids.shape[1]:].tolist(), out.logits[0][0].float()


def _time_graphs(ctx: Ctx, hf, model, cfg, ids, steps: int, page: int, compile: bool = False):
    import kvfuse
    from kvfuse.integrations.hf_graphs import DecodeGraphs

    n = ids.shape[1] + 2 * (steps + 1)
    store = kvfuse.PagedKVStore.from_hf(cfg, 2 * (-(-n // page)) + 2, page, dtype=ctx.dtype, device=ctx.device)
    runner = DecodeGraphs(model, store, max_batch=1, compile=compile)
    try:
        times, tokens, first = [], [], None
        for timed in (False, True):  # an untimed pass first: the capture
            seq = store.sequence()
            logits = hf.prefill(model, seq, ids)[:, -1]
            first = logits[0].float() if first is None else first
            tok = logits.argmax(-1, keepdim=True)
            toks = [int(tok)]
            for _ in range(steps):
                ms, logits = _timed(ctx, lambda s=seq, t=tok: runner.decode([s], t))
                tok = logits[:, -1].argmax(-1, keepdim=True)
                toks.append(int(tok))
                if timed:
                    times.append(ms)
            tokens = toks
            seq.release()
        return quantiles(times), tokens, first
    finally:
        runner.close()


def run(ctx: Ctx) -> None:
    hf = hf_or_skip(ctx, NAME, BASELINE)
    if hf is None:
        return
    a = ctx.args
    layers, hq, hkv, d = model_shape(ctx)
    page, steps = opt(ctx, "page_size", 16), opt(ctx, "steps", 32, 4)
    contexts = tuple(a.sweep) if a.sweep else (opt(ctx, "context", 4096, 64),)
    paths = PATHS
    prog = Progress(len(contexts) * len(paths), NAME, not a.quiet)
    model, cfg = build_model(ctx, layers, hq, hkv, d, attn_implementation="sdpa")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    read_bw = ctx.ceiling("read")
    dt = str(ctx.dtype)[6:]
    gen = torch.Generator().manual_seed(0)
    try:
        for C in contexts:
            ids = torch.randint(0, cfg.vocab_size, (1, C), generator=gen).to(ctx.device)
            kv_bytes = 2 * layers * (C + steps) * hkv * d * torch.tensor([], dtype=ctx.dtype).element_size()
            floor_ms = (weight_bytes + kv_bytes) / (read_bw * 1e12) * 1e3 if read_bw else None
            case = f"context {C}, {steps} new tokens, batch 1, {layers} layers, {dt}"
            header = (f"{'Llama-3-8B-shaped' if not ctx.cpu else 'tiny'} random-weight model; ms per generated "
                      f"token (median of {REPEATS}); floor: weights {weight_bytes / 1e9:.3g} GB + K/V "
                      f"{kv_bytes / 1e9:.3g} GB read once per token"
                      + (f" at {read_bw:.3g} TB/s = {floor_ms:.3g} ms" if floor_ms else "")
                      + ("; **CPU timings**" if ctx.cpu else ""))
            rows, ref = [], None
            for p in paths:
                prog.step(f"{C} {p}")
                r = Result(NAME, case, p, p, "ok", unit="tok/s", group=case, x=C, series=p)
                rows.append(r)
                try:
                    impl, _, mode = p.partition("+")
                    model.set_attn_implementation(impl)
                    if mode.startswith("graphs"):
                        (r.ms, r.p20, r.p80), toks, first = _time_graphs(ctx, hf, model, cfg, ids, steps, page,
                                                                         compile=mode == "graphs-compiled")
                    else:
                        (r.ms, r.p20, r.p80), toks, first = _time_generate(ctx, model, ids, steps, mode == "static")
                    r.value, r.timing = 1e3 / r.ms, f"CPU perf_counter around synchronised calls, {steps} tokens"
                    notes = [f"{r.ms / floor_ms:.2f}x the floor"] if floor_ms else []
                    if p == BASELINE:
                        ref = (toks, first)
                    elif a.check and ref is not None:
                        err = float((first - ref[1]).norm() / ref[1].norm().clamp_min(1e-30))
                        tol = NORM_TOL.get(ctx.dtype, 5e-2)
                        r.checked, r.max_err = True, err
                        same = next((i for i, (x, y) in enumerate(zip(toks, ref[0])) if x != y), None)
                        notes.append(f"first logits vs sdpa: normwise {err:.2g} (tol {tol:g}); greedy tokens "
                                     + ("equal" if same is None else f"equal up to step {same}"))
                        if err > tol:
                            r.status = "WRONG"
                    r.note = "; ".join(notes)
                except Exception as e:  # one path failing never aborts the others
                    if isinstance(e, KeyboardInterrupt):
                        raise
                    msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
                    r.status, r.note = "error", f"{type(e).__name__}: {msg}"
                    free_memory(ctx.device, reset_compiled=False)
            speedups(rows, a.baseline or BASELINE)
            ctx.results.extend(rows)
            print_table(Case(NAME, case, {}, [], group=case, x=C, header=header), rows, ctx)
    finally:
        model.set_attn_implementation("sdpa")
        ctx.models.clear()
