"""Repair after a merge versus re-encoding the text (bench/TARGETS.md section 7, the speed half).

A Llama-3-8B-shaped Hugging Face ``transformers`` model with random weights (32 layers, 32 / 8
heads, head_dim 128, bf16; a tiny one on CPU) prefills a prefix of half the context and T threads
of the other half (`hf.prefill` into a `kvfuse.PagedKVStore`, each thread forked from the prefix).
Then, in the same run, every path timed from the same threads:

* ``text``: the text merge: one causal forward over the whole composed text (prefix + threads) with
  ``attn_implementation="sdpa"`` (what re-encoding costs; the baseline).
* ``merge``: `kvfuse.merge` (sequential layout; the threads are kept, so moved threads are copied).
* ``merge+first``: the merge, then `hf.repair` of the first tokens of every thread that did not see
  the threads before it, ``--repair`` of all tokens in total (EPIC-style; no selection cost).
* ``merge+deviation``: the merge, `hf.kv_deviation` at layer 1 (CacheBlend's signal: every token
  through two layers), then `hf.repair` of the ``--repair`` fraction with the largest deviation.

Times: median of ``--steps`` repetitions after one untimed (kernel compilation, autotuning), each on a
fresh merge; CUDA synchronised. Speed-up: text time / path time.

``--check``: the repaired first tokens of the second thread see only exact tokens (the prefix, the
first thread, each other), so after ``merge+first`` their K/V at every layer must equal the text
merge's (normwise, `NORM_TOL`: the two computations round differently in bf16).
"""

from __future__ import annotations

import time

import torch

import kvfuse
from kvfuse.bench.common import Case, Ctx, Result, hf_or_skip, model_shape, opt, thread_counts
from kvfuse.bench.e2e import NORM_TOL, build_model
from kvfuse.bench.report import print_table
from kvfuse.bench.runner import speedups
from kvfuse.bench.timing import sync

NAME = "repair"
X_NAME = "context"
PREFILL_CHUNK = 4096
BASELINE = "text"


def _prefill(hf, model, seq, ids: torch.Tensor) -> None:
    for i in range(0, ids.shape[1], PREFILL_CHUNK):
        hf.prefill(model, seq, ids[:, i: i + PREFILL_CHUNK])


def _timed(dev, fn, reps: int) -> tuple[float, float, float]:
    """(median, p20, p80) ms of ``fn()`` over ``reps`` calls after one untimed call."""
    fn()
    times = []
    for _ in range(reps):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append((time.perf_counter() - t0) * 1000)
    q = torch.tensor(times).quantile(torch.tensor([0.5, 0.2, 0.8])).tolist()
    return q[0], q[1], q[2]


def run(ctx: Ctx) -> None:
    hf = hf_or_skip(ctx, NAME, BASELINE)
    if hf is None:
        return
    from kvfuse import repair as policy

    a = ctx.args
    layers, hq, hkv, d = model_shape(ctx)
    page, n = opt(ctx, "page_size", 16), opt(ctx, "context", 32768, 256)
    T = thread_counts(ctx, (4,))[0]
    frac = a.repair if getattr(a, "repair", None) is not None else 0.15
    reps = opt(ctx, "steps", 3, 2)
    dev, dt = ctx.device, str(ctx.dtype)[6:]
    model, cfg = build_model(ctx, layers, hq, hkv, d, attn_implementation="sdpa")
    P = n // 2
    lens = [(n - P) // T] * T
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (n,), generator=gen).to(dev)
    store = kvfuse.PagedKVStore.from_hf(cfg, 3 * (-(-n // page) + T) + 8, page, dtype=ctx.dtype, device=dev)
    case = (f"{n} tokens (prefix {P}, {T} threads of {lens[0]}), {layers} layers, {dt}, repair {frac:.0%} of the "
            f"tokens")
    rows = {name: Result(NAME, case, name, label, "ok", unit="ms", group=case, x=n) for name, label in (
        ("text", "text merge: one causal sdpa forward over the composed text"),
        ("merge", "kvfuse.merge (sequential)"),
        ("merge+first", f"merge + hf.repair of the first tokens of each thread ({frac:.0%})"),
        ("merge+deviation", f"merge + kv_deviation (layer 1) + hf.repair of the top {frac:.0%}"))}
    threads = []
    try:
        with torch.no_grad():
            rows["text"].ms, rows["text"].p20, rows["text"].p80 = _timed(
                dev, lambda: model(ids[None], use_cache=False, logits_to_keep=1), reps)
            model.set_attn_implementation("kvfuse")
            prefix = store.sequence("prefix")
            _prefill(hf, model, prefix, ids[None, :P])
            threads = kvfuse.fork(prefix, T)
            off = P
            for t, m in zip(threads, lens):
                _prefill(hf, model, t, ids[None, off: off + m])
                off += m
            prefix.release()
            k = int(frac * n) // max(1, T - 1)

            def path(kind):
                def go():
                    merged = kvfuse.merge(threads, layout="sequential", keep_threads=True)
                    try:
                        if kind == "first":
                            hf.repair(model, merged, ids[:off].cpu(), policy.first_tokens(merged, k))
                        elif kind == "deviation":
                            scores = hf.kv_deviation(model, merged, ids[:off].cpu(), layer=1)
                            hf.repair(model, merged, ids[:off].cpu(), policy.top_fraction(merged, scores, frac))
                    finally:
                        merged.release()
                return go

            for name, kind in (("merge", None), ("merge+first", "first"), ("merge+deviation", "deviation")):
                r = rows[name]
                r.ms, r.p20, r.p80 = _timed(dev, path(kind), reps)
            if a.check:
                _check(ctx, hf, policy, model, threads, ids[:off], P + lens[0], k, rows["merge+first"])
    except Exception as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        for r in rows.values():
            if r.ms is None:
                r.status, r.note = "error", f"{type(e).__name__}: {str(e).strip()[:300]}"
    finally:
        for t in threads:
            t.release()
    for r in rows.values():
        r.value, r.timing = r.ms, f"median of {reps} after 1 untimed"
    out = list(rows.values())
    speedups(out, a.baseline or BASELINE)
    ctx.results.extend(out)
    header = (f"{'Llama-3-8B-shaped' if not ctx.cpu else 'tiny'} random-weight model; ms = wall time, CUDA "
              f"synchronised" + ("; **CPU timings**" if ctx.cpu else ""))
    print_table(Case(NAME, case, {}, [], group=case, x=n, header=header), out, ctx)


def _check(ctx: Ctx, hf, policy, model, threads, ids: torch.Tensor, start: int, k: int, row: Result) -> None:
    """The second thread's first ``k`` tokens (from ``start``) after merge+first against the text merge."""
    merged = kvfuse.merge(threads, layout="sequential", keep_threads=True)
    try:
        hf.repair(model, merged, ids.cpu(), policy.first_tokens(merged, k))
        got_k, got_v = merged.gather()
        model.set_attn_implementation("sdpa")
        cache = hf.output_cache(model(ids[None], use_cache=True))
        model.set_attn_implementation("kvfuse")
        err = 0.0
        for layer, lay in enumerate(cache.layers):
            for want, got in ((lay.keys, got_k), (lay.values, got_v)):
                w = want[0, :, start: start + k].transpose(0, 1).float()
                g = got[layer, start: start + k].float()
                err = max(err, float((g - w).norm() / w.norm().clamp_min(1e-30)))
        tol = NORM_TOL.get(ctx.dtype, 5e-2)
        row.checked, row.max_err = True, err
        row.note = f"repaired tokens vs the text merge at every layer: normwise error {err:.2g} (tol {tol:g})"
        if not err <= tol:
            row.status = "WRONG"
    finally:
        merged.release()
