"""``kvfuse-bench``: the benchmark CLI of the scenarios of bench/TARGETS.md.

    kvfuse-bench all --check --json out.json          # every scenario, ceilings measured first
    kvfuse-bench rerotate --providers triton,flashinfer --pages 4096 --page-size 64
    kvfuse-bench prefill --sweep 1024,2048,4096 --plot prefill.png
    python -m kvfuse.bench decode --context 8192 --csv decode.csv
    kvfuse-bench threads --threads 2,4,8 --check --json threads.json
    kvfuse-bench fidelity --model smollm2-135m --threads 2,4,8 --seeds 0,1,2 --plot fidelity.png
    kvfuse-bench validate                             # GPU: the test suite, then compute-sanitizer

Each scenario prints one GitHub-markdown table per case: provider, median / p20 / p80 milliseconds,
TB/s or effective TFLOP/s, fraction of the ceiling and speed-up over the baseline. Providers that
cannot run (not importable, unsupported inputs, no GPU) are listed as skipped with the reason; a
provider that fails is reported and the run goes on. See bench/README.md for every column.

Exit status: 0; 1 when a provider disagrees with the reference (--check), or when a scenario that
ran measured nothing (every requested provider was skipped or failed); 2 for a usage error.
``validate`` is not a timing scenario: see `kvfuse.bench.validate`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time

from kvfuse.bench.common import DTYPES, HIDDEN_PROVIDERS, PROVIDERS, Ctx, Result
from kvfuse.bench.report import environment
from kvfuse.bench.timing import free_memory

SCENARIOS = {
    "rerotate": "RoPE re-rotation of a paged K cache in place (bench/TARGETS.md section 1)",
    "compose": "compose T threads' paged KV: general copy path and zero-copy path (section 2)",
    "prefill": "block-sparse cross-thread prefill (section 3)",
    "decode": "paged decode after a merge, with and without the cross-thread mask (section 4)",
    "e2e": "merge versus text re-prefill on a Llama-3-8B-shaped model (section 5)",
    "merge": "kvfuse.merge of T threads in a PagedKVStore (8K tokens, 32 layers): the whole call vs its byte floor",
    "threads": "T threads decoded as one batch (hf.decode, CUDA graphs) versus one by one, Llama-3-8B-shaped model",
    "generate": "model.generate (sdpa / kvfuse, dynamic / static cache) and kvfuse's decode graphs, ms per token",
    "ceilings": "copy / read / matmul ceilings of this machine",
    "fidelity": "merged caches against the text merge on a trained model: KL, answer scores, cost (section 7)",
    "repair": "merge + repair of a fraction of the tokens versus re-encoding the text (section 7, speed)",
}
# fidelity runs apart
ALL_ORDER = ("ceilings", "rerotate", "compose", "prefill", "decode", "e2e", "merge", "threads", "generate", "repair")
LIST_THREADS = ("threads", "e2e", "fidelity")  # the scenarios whose --threads takes a list


def _positive(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _non_negative(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {v}")
    return v


def _providers(s: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in s.split(",") if x.strip())
    bad = [x for x in names if x not in PROVIDERS + HIDDEN_PROVIDERS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"unknown provider(s) {', '.join(map(repr, bad)) or repr(s)}; "
                                         f"choose from {', '.join(PROVIDERS)}")
    return names


def _sizes(s: str) -> tuple[int, ...]:
    try:
        return tuple(_positive(x) for x in s.split(",") if x.strip()) or _positive("")
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"--sweep takes comma-separated positive integers, got {s!r}") from None


def _counts(s: str) -> tuple[int, ...]:
    try:
        return tuple(_positive(x) for x in s.split(",") if x.strip()) or _positive("")
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"--threads takes a positive integer or a comma list, got {s!r}") from None


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("shapes (defaults: bench/TARGETS.md on a GPU, small shapes on CPU)")
    g.add_argument("--pages", type=_positive, help="pages in the pool (rerotate, compose; default 16384)")
    g.add_argument("--page-size", type=_positive, help="tokens per page (default 16)")
    g.add_argument("--kv-heads", type=_positive, help="KV heads (default 8)")
    g.add_argument("--q-heads", type=_positive, help="query heads (prefill, decode, e2e; default 32)")
    g.add_argument("--head-dim", type=_positive, help="head dim (default 128)")
    g.add_argument("--dtype", choices=sorted(DTYPES), help="bf16 (default on GPU), fp16 or fp32 (default on CPU)")
    g.add_argument("--prefix", type=_non_negative,
                   help="shared prefix tokens (prefill, decode mask, e2e, merge, threads)")
    g.add_argument("--threads", type=_counts, help="threads (default 4); threads, e2e and fidelity take a list: 2,4,8")
    g.add_argument("--thread-len", type=_positive, help="tokens per thread (prefill, e2e, merge)")
    g.add_argument("--batch", type=_positive, help="decode batch (default 32)")
    g.add_argument("--context", type=_positive, help="tokens per sequence (decode default 32768; e2e 8192 and 32768)")
    g.add_argument("--layers", type=_positive, help="model layers (e2e, merge, threads; default 32)")
    g.add_argument("--steps", type=_positive, help="decode steps per thread (threads, generate; default 32, CPU 4); "
                   "repetitions (repair; default 3)")
    g.add_argument("--repair", type=float, help="fraction of the tokens repaired (repair; default 0.15)")
    r = common.add_argument_group("what to run")
    r.add_argument("--providers", type=_providers, help=f"comma-separated subset of: {', '.join(PROVIDERS)} "
                   "(default: every provider of the scenario)")
    r.add_argument("--baseline", help="provider (or row label) the speed-up column divides by (default per scenario)")
    r.add_argument("--check", action="store_true",
                   help="check every provider against kvfuse.reference before timing; one that disagrees is WRONG")
    r.add_argument("--api", action="store_true",
                   help="time the public kvfuse functions (validation, metadata) instead of the registered ops")
    r.add_argument("--sweep", type=_sizes, help="comma-separated sizes of the scenario's main axis: pages "
                   "(rerotate, compose), thread length (prefill), context (decode, e2e), threads (threads)")
    r.add_argument("--measure-ceilings", action="store_true",
                   help="measure the ceilings first (always done by 'all'); otherwise the H200 anchors are used")
    r.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    t = common.add_argument_group("timing")
    t.add_argument("--cuda-graph", action="store_true", help="time through CUDA graphs where the op allows capture")
    t.add_argument("--no-rotate", action="store_true", help="do not rotate among copies of small inputs")
    t.add_argument("--warmup-ms", type=_positive, default=25, help="do_bench warm-up time (default 25)")
    t.add_argument("--rep-ms", type=_positive, help="do_bench measuring time per provider (default 100; CPU 200)")
    o = common.add_argument_group("output")
    o.add_argument("--json", metavar="FILE", help="write results and environment as JSON")
    o.add_argument("--csv", metavar="FILE", help="write one CSV row per result, with GPU, versions, commit, date")
    o.add_argument("--plot", metavar="FILE.png", help="plot the rate (or time) against the swept size (matplotlib)")
    o.add_argument("--quiet", action="store_true", help="no progress bar")

    ap = argparse.ArgumentParser(prog="kvfuse-bench", description="Benchmarks of kvfuse against its baselines "
                                 "(the scenarios of bench/TARGETS.md).")
    sub = ap.add_subparsers(dest="command", metavar="SCENARIO", required=True)
    for name, text in SCENARIOS.items():
        p = sub.add_parser(name, parents=[common], help=text, description=text)
        if name == "fidelity":
            from kvfuse.bench import fidelity

            fidelity.add_arguments(p)
    a = sub.add_parser("all", parents=[common], help="ceilings, then every scenario, one after the other",
                       description="ceilings, then every scenario (GPU memory is freed between them)")
    a.add_argument("--time-limit", type=_positive, metavar="SECONDS",
                   help="start no scenario after SECONDS of the run; those left are reported as skipped (the "
                        "JSON/CSV are written as usual)")
    from kvfuse.bench import validate

    v = sub.add_parser("validate", help="GPU correctness: the test suite, then compute-sanitizer over one small "
                       "call of every kernel (builds nothing)", description=validate.__doc__.split("\n\n")[0],
                       epilog=validate.__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    validate.add_arguments(v)
    return ap


def _validate(ap: argparse.ArgumentParser, args) -> None:
    sub = ap._subparsers._group_actions[0].choices[args.command]
    if args.sweep and args.command in ("all", "ceilings"):
        sub.error("--sweep applies to one scenario (rerotate, compose, prefill, decode, e2e or threads), not to "
                  f"{args.command!r}")
    if args.threads and len(args.threads) > 1 and args.command not in LIST_THREADS:
        sub.error(f"--threads takes one value for {args.command!r}; a list ({','.join(map(str, args.threads))}) "
                  "applies to the threads, e2e and fidelity scenarios")
    if args.command == "fidelity":
        from kvfuse.bench import fidelity

        try:
            fidelity.validate(sub, args)
        except ImportError as e:
            sub.error(str(e))
    # the list for the scenarios that take one (threads, e2e); the single value for the others
    args.thread_counts, args.threads = args.threads, (args.threads[0] if args.threads else None)
    if args.plot:
        try:
            importlib.import_module("matplotlib")
        except ImportError:
            sub.error("--plot needs matplotlib (pip install matplotlib)")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sub.error("--device cuda: no CUDA GPU is available to torch")


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.command == "validate":
        from kvfuse.bench import validate

        return validate.main(args)
    _validate(ap, args)
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if args.rep_ms is None:
        args.rep_ms = 200 if device.type == "cpu" else 100
    ctx = Ctx(args, device)
    meta = environment(device)
    meta["argv"] = list(sys.argv[1:] if argv is None else argv)
    print(f"# kvfuse-bench {args.command}\n")
    where = meta["gpu"] or "CPU"
    print(f"{where}; torch {meta['torch']}, triton {meta['triton']}, flashinfer {meta['flashinfer']}, "
          f"commit {meta['git_commit']}, {meta['date']}")
    if device.type == "cpu":
        print("\n**CPU timings** (no CUDA GPU): the torch providers on small shapes with a wall-clock timer. "
              "They say nothing about GPU performance; GPU-only providers are listed as skipped.")
    names = ALL_ORDER if args.command == "all" else (args.command,)
    if args.command not in ("all", "ceilings") and args.measure_ceilings:
        names = ("ceilings",) + names
    meta["elapsed_s"] = {}
    t_start = time.perf_counter()
    limit = getattr(args, "time_limit", None)
    warm = _start_warmup(ctx, names)
    for name in names:
        if warm is not None and name != "ceilings":
            line = warm.wait()
            meta["flashinfer_warmup"] = line
            if line:
                print(f"\n{line}", flush=True)
            warm = None
        spent = time.perf_counter() - t_start
        if limit is not None and spent > limit:
            note = f"not started: --time-limit {limit} s reached ({spent:.0f} s spent)"
            ctx.results.append(Result(name, "(scenario)", "-", "-", "skipped", note=note))
            print(f"\n### {name}: **skipped**: {note}", flush=True)
            continue
        mod = importlib.import_module(f"kvfuse.bench.{name}")
        t0 = time.perf_counter()
        try:
            mod.run(ctx)
        except Exception as e:  # one scenario failing never aborts the others
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            ctx.results.append(Result(name, "(scenario)", "-", "-", "error", note=f"{type(e).__name__}: {msg}"))
            print(f"\n### {name}: **error**: {type(e).__name__}: {msg}", flush=True)
        finally:
            free_memory(device)
            meta["elapsed_s"][name] = round(time.perf_counter() - t0, 1)
            print(f"\n({name}: {meta['elapsed_s'][name]:.0f} s)", flush=True)
    if warm is not None:
        meta["flashinfer_warmup"] = warm.wait()
    meta["total_s"] = round(time.perf_counter() - t_start, 1)
    if len(names) > 1:
        print("\nwall time per scenario: " + ", ".join(f"{n} {t:.0f} s" for n, t in meta["elapsed_s"].items())
              + f"; total {meta['total_s']:.0f} s")
    meta["ceilings"] = dict(ctx.ceilings) if ctx.ceilings else None
    meta["ceilings_source"] = "measured in this run" if ctx.ceilings else ("none (CPU)" if ctx.cpu else "anchors")
    _write_outputs(args, meta, ctx)
    wrong = [r for r in ctx.results if r.status == "WRONG"]
    if wrong:
        print(f"\n{len(wrong)} provider(s) disagree with the reference: " + ", ".join(
            f"{r.scenario}/{r.label}" for r in wrong), file=sys.stderr)
    idle = _idle_scenarios(ctx.results)
    if idle:
        print(f"\nnothing was measured in {', '.join(idle)}: every requested provider was skipped or failed "
              "(see the notes above)", file=sys.stderr)
    return 1 if wrong or idle else 0


def _idle_scenarios(results: list[Result]) -> list[str]:
    """Scenarios that ran (not left out by --time-limit) and gave no "ok" row."""
    statuses: dict[str, set[str]] = {}
    for r in results:
        if not (r.case == "(scenario)" and r.status == "skipped"):
            statuses.setdefault(r.scenario, set()).add(r.status)
    return [s for s, st in statuses.items() if "ok" not in st]


def _start_warmup(ctx: Ctx, names: tuple[str, ...]):
    """Build FlashInfer's JIT modules in the background when a scenario will use them (GPU only)."""
    if ctx.cpu or not {"rerotate", "prefill", "decode"} & set(names):
        return None
    if ctx.args.providers and "flashinfer" not in ctx.args.providers:
        return None
    if importlib.util.find_spec("flashinfer") is None:
        return None
    from kvfuse.bench import warmup
    from kvfuse.bench.common import opt

    hq, hkv, d = opt(ctx, "q_heads", 32), opt(ctx, "kv_heads", 8), opt(ctx, "head_dim", 128)
    return warmup.start(ctx.dtype, hq, hkv, d, ctx.device)


def _write_outputs(args, meta: dict, ctx: Ctx) -> None:
    from kvfuse.bench import report

    if args.json:
        report.write_json(args.json, meta, ctx.results)
    if args.csv:
        report.write_csv(args.csv, meta, ctx.results)
    if args.plot and args.command == "fidelity":
        from kvfuse.bench import fidelity

        fidelity.write_plot(args.plot, dict(meta, model=args.model), ctx.results)
    elif args.plot:
        x_names = {n: getattr(importlib.import_module(f"kvfuse.bench.{n}"), "X_NAME", "size") for n in SCENARIOS}
        report.write_plot(args.plot, meta, ctx.results, x_names)
    for what, path in (("JSON", args.json), ("CSV", args.csv), ("plot", args.plot)):
        if path:
            print(f"{what} written to {path}")


__all__ = ["main", "build_parser"]
