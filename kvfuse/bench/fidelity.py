"""Fidelity: how close is a merged KV cache to the text merge, on a trained model (bench/TARGETS.md section 7).

    kvfuse-bench fidelity --model smollm2-135m --tasks reading,branches --threads 2,4,8 --seeds 0,1,2 \\
        --json fidelity.json --plot fidelity.png

For every task kind of ``--tasks``, thread count of ``--threads`` and seed of ``--seeds``, one task is
generated (`kvfuse.fidelity.make_task`) and every row of ``--rows`` (default: the registered rows
that apply to the kind, see `kvfuse.fidelity.rows`) runs on it. One table per (kind, T), averaged
over the seeds, then a summary table:

* gold log-lik / rank / acc / EM (reading and memory): the gold answer's summed log-likelihood
  (nats), its rank among the candidates (1 best), the fraction of seeds where it ranks first, the
  fraction where greedy decoding writes it (`kvfuse.fidelity.score`);
* KL mean / max: KL(text merge || row) in nats over the scored positions (mean of the seeds' means;
  max over all positions of all seeds); top-1: agreement of the argmax with the text merge's;
* FLOPs and time vs text: the row's counted FLOPs and measured wall time over the text merge's (the
  merge and the join's forward only; the threads' prefills are not counted: see
  `kvfuse.fidelity.rows`); mean and median over the seeds. ms: the median wall time.

The JSON/CSV rows carry every number in ``metrics`` (with the per-seed values); ``--plot`` draws KL
against relative FLOPs, one panel per task kind. Timings on CPU say little about a GPU.
"""

from __future__ import annotations

import argparse
import statistics

from kvfuse.bench.common import Ctx, Result, opt, thread_counts
from kvfuse.bench.timing import Progress

NAME = "fidelity"
X_NAME = "threads"
DEFAULT_TASKS = ("reading", "branches")
DEFAULT_SEEDS = (0, 1, 2)


def _seeds(s: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        out = ()
    if not out or min(out) < 0:
        raise argparse.ArgumentTypeError(f"--seeds takes comma-separated integers >= 0, got {s!r}")
    return out


def _names(s: str) -> tuple[str, ...]:
    out = tuple(x.strip() for x in s.split(",") if x.strip())
    if not out:
        raise argparse.ArgumentTypeError("expected a comma-separated list of names")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``kvfuse-bench fidelity`` (beside the common ones it reads: --threads, --thread-len,
    --dtype, --device, --json, --csv, --plot, --quiet; kvfuse rows use pages of 16 tokens)."""
    try:
        from kvfuse.fidelity.tasks import KINDS
    except ImportError:  # kvfuse.fidelity needs transformers: `validate` says so when fidelity is asked for
        KINDS = ("(kvfuse.fidelity needs transformers)",)

    g = p.add_argument_group("fidelity")
    g.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (default), stories260k, or a .gguf / llama2.c .bin file or a HF folder")
    g.add_argument("--tasks", type=_names, default=DEFAULT_TASKS,
                   help=f"comma-separated task kinds: {', '.join(KINDS)} (default {','.join(DEFAULT_TASKS)})")
    g.add_argument("--seeds", type=_seeds, default=DEFAULT_SEEDS, help="comma-separated seeds (default 0,1,2)")
    g.add_argument("--rows", type=_names, help="comma-separated rows (default: every registered row of a task kind)")
    g.add_argument("--cont", type=int, default=32, help="teacher-forced continuation tokens of branches (default 32)")
    g.add_argument("--greedy", action="store_true", help="branches written greedily (default: sampled, seeded)")


def validate(sub: argparse.ArgumentParser, args) -> None:
    from kvfuse.fidelity.rows import ROWS
    from kvfuse.fidelity.tasks import KINDS

    bad = [k for k in args.tasks if k not in KINDS]
    if bad:
        sub.error(f"--tasks: unknown task kind(s) {', '.join(bad)}; choose from {', '.join(KINDS)}")
    if args.rows:
        bad = [r for r in args.rows if r not in ROWS]
        if bad:
            sub.error(f"--rows: unknown row(s) {', '.join(bad)}; choose from {', '.join(ROWS)}")
    if args.cont < 1:
        sub.error("--cont must be a positive integer")


def aggregate(per_seed: list[dict]) -> dict:
    """The seeds' metrics of one row as one: means (KL mean, top-1, FLOPs ratio, answer scores; ``acc``
    and ``em`` are the fractions of seeds with rank 1 / an exact greedy answer), the max of KL max,
    medians of wall time and of its ratio."""
    out = dict(seeds=len(per_seed), kl_mean=statistics.fmean(m["kl_mean"] for m in per_seed),
               kl_max=max(m["kl_max"] for m in per_seed), top1=statistics.fmean(m["top1"] for m in per_seed),
               flops=statistics.fmean(m["flops"] for m in per_seed),
               seconds=statistics.median(m["seconds"] for m in per_seed))
    rel = [m["flops_rel"] for m in per_seed if m["flops_rel"] is not None]
    out["flops_rel"] = statistics.fmean(rel) if rel else None
    rel = [m["time_rel"] for m in per_seed if m["time_rel"] is not None]
    out["time_rel"] = statistics.median(rel) if rel else None
    if all("recomputed" in m for m in per_seed):
        out["recomputed"] = statistics.fmean(m["recomputed"] for m in per_seed)
    if all("rank" in m for m in per_seed):
        out.update(loglik=statistics.fmean(m["loglik"] for m in per_seed),
                   rank=statistics.fmean(m["rank"] for m in per_seed),
                   acc=statistics.fmean(float(m["correct"]) for m in per_seed),
                   em=statistics.fmean(float(m["exact"]) for m in per_seed))
    return out


def _f(x, spec=".3g") -> str:
    return "–" if x is None else format(x, spec)


HEAD = ("row", "gold log-lik", "rank", "acc", "EM", "KL mean", "KL max", "top-1", "recomputed", "FLOPs vs text",
        "time vs text", "ms")


def _line(label: str, m: dict) -> str:
    cells = [label, _f(m.get("loglik"), ".2f"), _f(m.get("rank"), ".2f"), _f(m.get("acc"), ".2f"),
             _f(m.get("em"), ".2f"), _f(m["kl_mean"]), _f(m["kl_max"]), _f(m["top1"], ".3f"),
             _f(m.get("recomputed"), ".1%"),
             _f(m["flops_rel"], ".3f"), _f(m["time_rel"], ".2f"), _f(m["seconds"] * 1000, ".0f")]
    return "| " + " | ".join(cells) + " |"


def _table(rows: list[Result]) -> list[str]:
    if rows and all(r.status != "ok" for r in rows) and len({(r.status, r.note) for r in rows}) == 1:
        return [f"**{rows[0].status}**: {rows[0].note}"]
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "|".join([" --- "] * len(HEAD)) + "|"]
    for r in rows:
        if r.status != "ok":
            lines.append(f"| {r.label} | " + " | ".join(["–"] * (len(HEAD) - 2)) + f" | **{r.status}**: {r.note} |")
        else:
            lines.append(_line(r.label, r.metrics))
    return lines


def run(ctx: Ctx) -> None:
    import torch

    from kvfuse import fidelity
    from kvfuse.fidelity.rows import ROWS

    a = ctx.args
    counts = tuple(a.sweep) if a.sweep else thread_counts(ctx, (2, 4, 8))
    thread_len = opt(ctx, "thread_len", 48)
    model, tok = fidelity.load_model(a.model, dtype=ctx.dtype, device=ctx.device)
    where = f"{ctx.device.type}, {str(ctx.dtype)[6:]}, torch threads {torch.get_num_threads()}"
    print(f"\nmodel {a.model} ({model.config.num_hidden_layers} layers, {where}); seeds {','.join(map(str, a.seeds))}; "
          f"branches: {thread_len} tokens per thread, {'greedy' if a.greedy else 'sampled'}, {a.cont} scored tokens")
    prog = Progress(len(a.tasks) * len(counts) * len(a.seeds), NAME, not a.quiet)
    summary = []
    for kind in a.tasks:
        rows = [ROWS[n] for n in a.rows] if a.rows else fidelity.default_rows(kind)
        rows = [ROWS["text"]] + [r for r in rows if r.name != "text"]
        for T in counts:
            case = f"{kind}, T={T}"
            per_row = {r.name: [] for r in rows}
            errors = {}
            for seed in a.seeds:
                prog.step(f"{case} seed {seed}")
                try:
                    task = fidelity.make_task(kind, model, tok, T, seed, thread_len=thread_len, cont=a.cont,
                                              sample=not a.greedy)
                except Exception as e:  # e.g. reading on a checkpoint without a tokenizer
                    errors = {r.name: ("skipped", f"{type(e).__name__}: {e}") for r in rows}
                    break
                applicable = [r for r in rows if kind in r.kinds]
                try:
                    res = fidelity.evaluate(model, task, applicable)
                except Exception as e:  # one case failing never aborts the run
                    if isinstance(e, KeyboardInterrupt):
                        raise
                    errors = {r.name: ("error", f"{type(e).__name__}: {str(e)[:300]}") for r in applicable}
                    break
                for name, m in res.items():
                    per_row[name].append(dict(m, seed=seed))
            results = []
            for r in rows:
                res = Result(NAME, case, r.name, r.name, "ok", unit="KL nats", group=kind, x=T, baseline="text",
                             note=r.description)
                if kind not in r.kinds:
                    res.status, res.note = "skipped", f"applies to {', '.join(r.kinds)} tasks only"
                elif r.name in errors:
                    res.status, res.note = errors[r.name]
                else:
                    m = aggregate(per_row[r.name])
                    m["per_seed"] = per_row[r.name]
                    ms = sorted(x["seconds"] * 1000 for x in per_row[r.name])
                    res.ms, res.p20, res.p80 = statistics.median(ms), ms[0], ms[-1]
                    res.value, res.flops, res.metrics = m["kl_mean"], m["flops"], m
                    res.speedup = 1 / m["time_rel"] if m["time_rel"] else None
                    res.timing = f"wall clock, median (min, max) of {len(ms)} seeds"
                results.append(res)
            ctx.results.extend(results)
            summary += results
            print(f"\n### {NAME}: {case} ({len(a.seeds)} seeds)\n")
            print("\n".join(_table(results)), flush=True)
    _print_summary(summary, rows_legend={r.name: r.description for r in ROWS.values()})


def _print_summary(results: list[Result], rows_legend: dict) -> None:
    ok = [r for r in results if r.status == "ok"]
    if not ok:
        return
    print(f"\n### {NAME}: summary\n")
    print("| task | T | " + " | ".join(HEAD) + " |")
    print("|" + "|".join([" --- "] * (len(HEAD) + 2)) + "|")
    for r in ok:
        print(f"| {r.group} | {r.x:g} " + _line(r.label, r.metrics))
    print("\n" + "; ".join(f"**{n}**: {d}" for n, d in rows_legend.items() if any(r.label == n for r in ok)))


def write_plot(path: str, meta: dict, results: list[Result]) -> None:
    """KL (text || row) against FLOPs relative to the text merge, one panel per task kind, one line per
    row through its thread counts (marker size grows with T)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if r.scenario == NAME and r.status == "ok" and r.metrics]
    kinds = list(dict.fromkeys(r.group for r in rows)) or ["(no results)"]
    colour = {label: f"C{i}" for i, label in enumerate(dict.fromkeys(r.label for r in rows))}  # one per row
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        mine = [r for r in rows if r.group == kind]
        for label in dict.fromkeys(r.label for r in mine):
            pts = sorted((r.x, r.metrics["flops_rel"], r.metrics["kl_mean"]) for r in mine if r.label == label)
            ax.plot([p[1] for p in pts], [p[2] for p in pts], "-", color=colour[label], alpha=0.5)
            ax.scatter([p[1] for p in pts], [p[2] for p in pts], s=[12 * p[0] for p in pts], color=colour[label],
                       label=label)
            for t, x, y in pts:
                ax.annotate(f"T={t:g}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("FLOPs relative to the text merge (merge + join)")
        ax.set_ylabel("mean KL(text merge || row), nats")
        ax.set_title(kind)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"kvfuse fidelity, {meta.get('model', '')} on {meta.get('gpu') or 'CPU'}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
