"""The data model of the benchmark and the helpers scenarios build their cases with.

A scenario builds the inputs of one *case* (a ``state`` dict of tensors and metadata) and a list of
`Provider` objects, and hands the `Case` to `kvfuse.bench.runner.run_case`, which checks, times and
reports every provider (`kvfuse.bench.timing` times, `kvfuse.bench.report` prints and writes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from kvfuse._deps import install_hint

PROVIDERS = ("torch", "torch-compile", "triton", "cuda", "flex", "sdpa", "flashinfer", "flash-attn")
HIDDEN_PROVIDERS = ("_wrong",)  # test-only: the torch provider with its output perturbed
KVFUSE_BACKENDS = ("torch", "triton", "cuda")

# Ceilings of bench/TARGETS.md (one H200), used when they are not measured in the same run.
# matmul: the low end of the measured 680-790 TFLOP/s range.
ANCHORS = {"copy": 4.27, "read": 4.50, "matmul": 680.0}
CEILING_UNITS = {"copy": "TB/s", "read": "TB/s", "matmul": "TFLOP/s"}
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
    series: str = ""  # the line of the plot the row belongs to, across swept sizes (default: its label)


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
    series: str = ""  # appended to each provider's label to name its plot line (e.g. " (masked)")
    # host-bound calls (page-table work that enqueues little or nothing on the device): timed with the
    # host clock until the call returns, the device idle before each call, since CUDA events recorded
    # around a call that enqueues nothing measure nothing of it
    host_timed: bool = False


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
    """The module, or `Skip` saying why it is not importable and how to install it."""
    try:
        return __import__(name)
    except Exception as e:
        raise Skip(f"{name} is not importable ({type(e).__name__}: {e}; {install_hint(name)})") from None


def hf_or_skip(ctx: Ctx, scenario: str, provider: str, label: str | None = None):
    """`kvfuse.integrations.hf`, or None after recording ``scenario`` as skipped (transformers is not
    importable), with the reason and how to install it."""
    try:
        import transformers  # noqa: F401

        from kvfuse.integrations import hf
        return hf
    except Exception as e:
        r = Result(scenario, scenario, provider, label or provider, "skipped",
                   note=f"transformers (with kvfuse.integrations.hf) is not importable ({type(e).__name__}: {e}; "
                        f"{install_hint('transformers')})")
        ctx.results.append(r)
        print(f"\n### {scenario}: skipped: {r.note}")
        return None


def model_shape(ctx: Ctx) -> tuple[int, int, int, int]:
    """(layers, query heads, KV heads, head_dim) of the Llama-3-8B-shaped model of the model scenarios
    (``--layers``, ``--q-heads``, ``--kv-heads``, ``--head-dim``; small on CPU)."""
    return (opt(ctx, "layers", 32, 2), opt(ctx, "q_heads", 32, 4), opt(ctx, "kv_heads", 8, 2),
            opt(ctx, "head_dim", 128, 64))


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)
