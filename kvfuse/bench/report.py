"""What a run prints and writes: the environment, markdown tables, JSON, CSV and plots."""

from __future__ import annotations

import dataclasses
import datetime
import os
import subprocess
import sys

import torch

from kvfuse.bench.common import CEILING_UNITS, FIELDS, Case, Ctx, Result


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
               f"{'measured in this run' if case.ceiling in ctx.ceilings else 'bench/TARGETS.md anchor'})")
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


def plot_series(results: list[Result]) -> dict[str, dict]:
    """What `write_plot` draws: per scenario with measured rows, ``{"unit": ..., "lines": {series: [(x, y),
    ...]}}`` when it measured more than one size (y: the rate, or the median ms where a row has no rate),
    else ``{"unit": ..., "bars": [(label, y, unit)]}`` (one bar per measured row)."""
    out = {}
    for s in dict.fromkeys(r.scenario for r in results):
        rows = [r for r in results if r.scenario == s and r.status == "ok" and r.ms]
        if not rows:
            continue
        rate = all(r.value is not None for r in rows)
        units = list(dict.fromkeys(r.unit if rate else "ms (median)" for r in rows))
        y = (lambda r: r.value) if rate else (lambda r: r.ms)
        if len({r.x for r in rows}) > 1 and all(r.x is not None for r in rows):
            lines: dict[str, list] = {}
            for r in rows:
                lines.setdefault(r.series or r.label, []).append((r.x, y(r)))
            out[s] = {"unit": units[0], "lines": {k: sorted(v) for k, v in lines.items()}}
        else:
            names = [r.series or r.label for r in rows]
            if len(set(names)) < len(names):
                names = [f"{n} ({r.case})" for n, r in zip(names, rows)]
            bars = [(n, y(r), r.unit if rate else "ms") for n, r in zip(names, rows)]
            out[s] = {"unit": units[0] if len(units) == 1 else "rate", "bars": bars}
    return out


def write_plot(path: str, meta: dict, results: list[Result], x_names: dict[str, str]) -> None:
    """One panel per scenario that measured something: lines over the swept size, or bars of one size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = plot_series(results)
    if not panels:
        panels = {"(nothing measured)": {"unit": "", "bars": []}}
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.5 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (s, panel) in zip(axes.flat, panels.items()):
        if "lines" in panel:
            for label, pts in panel["lines"].items():
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_xlabel(x_names.get(s, "size"))
            ax.set_ylabel(panel["unit"])
            ax.legend(fontsize=7)
        else:
            bars = panel["bars"]
            values = [b[1] for b in bars]
            ax.barh(range(len(bars)), values)
            ax.set_yticks(range(len(bars)), [b[0] for b in bars], fontsize=7)
            ax.invert_yaxis()
            if values and max(values) > 100 * min(values):
                ax.set_xscale("log")
            for i, (_, v, unit) in enumerate(bars):
                ax.annotate(f" {v:.3g} {unit}", (v, i), va="center", fontsize=7)
            ax.set_xlabel(panel["unit"])
        ax.set_title(s)
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"kvfuse-bench on {meta.get('gpu') or 'CPU'} (torch {meta.get('torch')}, commit "
                 f"{meta.get('git_commit')})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
