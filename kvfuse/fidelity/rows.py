"""The rows of the fidelity table: ways to get from a task's threads to the join's logits, and their cost.

A row is a name and a function ``(model, task) -> RowOutput``: the teacher-forced logits of every
target of the task after the join, the measured wall time and the counted FLOPs of the work the row
does *after the threads ran*. Built in (`ROWS`, in table order):

* ``text``: the text merge, the gold. A plain transformers forward (``attn_implementation="sdpa"``)
  of ``threads + join`` over the prefix's ``DynamicCache`` (the prefix was encoded before the
  threads ran, so it is not counted); identical, up to float rounding, to one causal pass over
  ``prefix + threads + join`` (tests check this).
* ``shared`` / ``sequential``: kvfuse's real path. A `kvfuse.PagedKVStore`; the prefix through
  `hf.prefill`; `kvfuse.fork` into T threads, each through `hf.prefill`; `kvfuse.merge` with that
  layout; the join through `hf.decode`. Counted: the merge and the join's forward (the threads'
  prefills are not: they ran while the threads did).
* ``memory``: memory tasks only. Each document was encoded after its own context and saved with
  `kvfuse.memory.save` (not counted); the row loads each block and inserts it
  (`kvfuse.memory.insert`, sequential positions after the prefix), then the join through `hf.decode`.
* ``prefix-only``: the threads dropped (the floor): a plain forward of the join over the prefix.

FLOPs (`forward_flops`) count the matrix multiplications of a forward: ``2 x`` the parameters of the
decoder layers' linear maps per token processed, ``4 x heads x head_dim x layers`` per visible
(query, key) pair of attention, and the LM head (``2 x hidden x vocab``) for ONE position per
forward (the join's last: the others are not needed). Not counted: norms, rotary, softmax, the MLP's
activation, embedding lookups, the merge itself (no FLOPs: its cost is memory traffic, in the wall
time), and the scoring of the targets (the same for every row). Wall time (``seconds``) is measured
around the same work (CUDA synchronised); `hf.decode` also computes the logits of every join token,
which the time includes and the FLOPs do not.

Adding a row (the **repair** rows and the APE-style temperature/scale row go here): either
``kvfuse_row(name, layout, before_join=fn)``, where ``fn(model, task, merged) -> flops`` runs after
`kvfuse.merge` and before the join, may modify the merged sequence's K/V in place (recompute a
chosen subset of tokens with full visibility, at some budget) and returns the FLOPs it spent (its wall
time is measured with the rest); or any ``Row(name, run)`` whose ``run`` returns a `RowOutput`
(use `score_targets` for the targets), then `register` it so that the CLI lists it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
from collections.abc import Callable

import torch

from kvfuse.fidelity.tasks import KINDS, Task, cache_kwargs

__all__ = ["Row", "RowOutput", "ROWS", "register", "kvfuse_row", "text_merge", "prefix_only", "memory_insert",
           "prefill_threads", "score_targets", "forward_flops", "attention", "default_rows", "repair_before_join",
           "repair_flops", "probe_flops", "temperature_before_join"]


@dataclasses.dataclass
class RowOutput:
    """What a row returns. logits: one float32 CPU tensor ``[len(target), vocab]`` per target of the
    task, ``logits[i]`` predicting ``target[i]``. seconds: measured wall time of the counted work.
    flops: counted FLOPs (module docstring). note: anything the table should say about this run.
    recomputed: the fraction of the merged sequence's tokens whose K/V were recomputed (repair rows)."""

    logits: list[torch.Tensor]
    seconds: float
    flops: float
    note: str = ""
    recomputed: float | None = None


@dataclasses.dataclass(frozen=True)
class Row:
    """A row of the table: ``run(model, task) -> RowOutput``; ``kinds``: the task kinds it applies to
    (others are reported as skipped); ``description``: one line for the table's legend."""

    name: str
    run: Callable[..., RowOutput]
    kinds: tuple[str, ...] = KINDS
    description: str = ""
    default: bool = True  # in `default_rows` (the repair and temperature rows are asked for by name)


ROWS: dict[str, Row] = {}


def register(row: Row) -> Row:
    """Add ``row`` to `ROWS` (replacing one of the same name); returns it."""
    ROWS[row.name] = row
    return row


def default_rows(kind: str) -> list[Row]:
    """The registered default rows that apply to tasks of ``kind``, in table order (``text`` first)."""
    return [r for r in ROWS.values() if kind in r.kinds and r.default]


# ---------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def attention(model, name: str):
    """Run ``model`` with ``attn_implementation=name`` inside the block (restored afterwards)."""
    old = model.config._attn_implementation
    if old != name:
        model.set_attn_implementation(name)
    try:
        yield model
    finally:
        if old != name:
            model.set_attn_implementation(old)


class _Timer:
    def __init__(self, device):
        self.device, self.seconds = torch.device(device), 0.0

    @contextlib.contextmanager
    def __call__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - t0


def forward_flops(model, n_new: int, n_past: int, *, logits: int = 1) -> float:
    """FLOPs of one causal forward of ``n_new`` tokens after ``n_past`` visible cached tokens, each
    new token seeing all cached ones and the new ones up to itself (module docstring: what counts)."""
    cfg = model.config
    layers = model.model.layers
    linear = sum(m.weight.numel() for m in layers.modules() if isinstance(m, torch.nn.Linear))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    pairs = n_new * n_past + n_new * (n_new + 1) // 2
    head = model.get_output_embeddings().weight.numel()
    return 2.0 * linear * n_new + 4.0 * cfg.num_attention_heads * head_dim * len(layers) * pairs + 2.0 * head * logits


def _pad(targets: list[torch.Tensor], device) -> torch.Tensor:
    """Targets as one ``[C, max_len]`` batch, each padded with its own last token (causal: a pad never
    changes the logits before it; those after the target are not read)."""
    n = max(t.numel() for t in targets)
    return torch.stack([torch.cat([t, t[-1:].expand(n - t.numel())]) for t in targets]).to(device)


def _split(last: torch.Tensor, out: torch.Tensor | None, targets: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per target: the join's last logits, then the batch's logits before the target's last token."""
    res = []
    for c, t in enumerate(targets):
        rest = out[c, : t.numel() - 1] if out is not None else last[:0]
        res.append(torch.cat([last[None], rest]).float().cpu())
    return res


def score_targets(model, seq, last: torch.Tensor, targets: list[torch.Tensor]) -> list[torch.Tensor]:
    """Teacher-forced logits of every target after a kvfuse ``seq`` (prefix, threads, join decoded):
    ``last`` ``[vocab]`` are the join's last logits; the targets run as one batch of forks of ``seq``
    (one `hf.decode` call), which are released afterwards; ``seq`` is not changed."""
    import kvfuse
    from kvfuse.integrations import hf

    if max(t.numel() for t in targets) == 1:
        return _split(last, None, targets)
    forks = kvfuse.fork(seq, len(targets))
    try:
        out = hf.decode(model, forks, _pad(targets, last.device))
    finally:
        for f in forks:
            f.release()
    return _split(last, out, targets)


def _plain_targets(model, cache, pos: int, last: torch.Tensor, targets: list[torch.Tensor]) -> list[torch.Tensor]:
    """`score_targets` over a ``DynamicCache`` holding ``pos`` tokens (the cache is consumed)."""
    if max(t.numel() for t in targets) == 1:
        return _split(last, None, targets)
    ids = _pad(targets, last.device)
    cache.batch_repeat_interleave(len(targets))
    position = torch.arange(pos, pos + ids.shape[1], device=ids.device).expand(len(targets), -1)
    out = model(input_ids=ids, position_ids=position, use_cache=True, **cache_kwargs(model, cache)).logits
    return _split(last, out, targets)


# ---------------------------------------------------------------------------------------- plain rows
def _plain_row(model, task: Task, body: list[torch.Tensor]) -> RowOutput:
    """Prefix into a DynamicCache (not counted), then ONE forward of ``body + join`` (counted), then targets."""
    from transformers import DynamicCache

    dev = model.device
    timer = _Timer(dev)
    with torch.no_grad(), attention(model, "sdpa"):
        cache = DynamicCache(config=model.config)
        P = task.prefix.numel()
        model(input_ids=task.prefix[None].to(dev), position_ids=torch.arange(P, device=dev)[None], use_cache=True,
              logits_to_keep=1, **cache_kwargs(model, cache))
        ids = torch.cat([*body, task.join])[None].to(dev)
        n = ids.shape[1]
        with timer():
            out = model(input_ids=ids, position_ids=torch.arange(P, P + n, device=dev)[None], use_cache=True,
                        logits_to_keep=1, **cache_kwargs(model, cache))
        logits = _plain_targets(model, cache, P + n, out.logits[0, -1], task.targets)
    return RowOutput(logits, timer.seconds, forward_flops(model, n, P))


def text_merge(model, task: Task) -> RowOutput:
    """The gold: ``threads + join`` re-encoded as text after the cached prefix (one causal pass)."""
    return _plain_row(model, task, list(task.threads))


def prefix_only(model, task: Task) -> RowOutput:
    """The floor: the threads dropped; the join right after the prefix."""
    return _plain_row(model, task, [])


# ---------------------------------------------------------------------------------------- kvfuse rows
def _store(model, task: Task, page_size: int, extra_tokens: int = 0):
    import kvfuse

    def pages(n: int) -> int:  # a segment's pages, one more for a padded or copied last page
        return -(-n // page_size) + 1

    longest = max(t.numel() for t in task.targets)
    n = (pages(task.prefix.numel()) + sum(pages(t.numel()) for t in task.threads) + pages(task.join.numel())
         + len(task.targets) * pages(longest) + task.num_threads + pages(extra_tokens) + 4)
    return kvfuse.PagedKVStore.from_hf(model.config, 2 * n, page_size, dtype=model.dtype, device=model.device)


def prefill_threads(model, task: Task, *, page_size: int = 16):
    """kvfuse's path up to the merge: a `kvfuse.PagedKVStore` shaped for ``model`` (its dtype and
    device), the prefix through `hf.prefill`, `kvfuse.fork` into the task's threads, each thread
    through `hf.prefill`. Returns ``(store, prefix, threads)`` (live `kvfuse.PagedSequence` objects).
    ``model`` must run ``attn_implementation="kvfuse"`` (see `attention`)."""
    import kvfuse
    from kvfuse.integrations import hf

    store = _store(model, task, page_size)
    dev = model.device
    prefix = store.sequence("prefix")
    hf.prefill(model, prefix, task.prefix[None].to(dev))
    threads = kvfuse.fork(prefix, task.num_threads)
    for t, ids in zip(threads, task.threads):
        if ids.numel():
            hf.prefill(model, t, ids[None].to(dev))
    return store, prefix, threads


def _join(model, task: Task, seq, timer: _Timer, flops: float, recomputed: float | None = None) -> RowOutput:
    """The join through `hf.decode` on ``seq`` (counted), then the targets (not counted)."""
    from kvfuse.integrations import hf

    dev = model.device
    n_seen = seq.num_tokens
    with timer():
        out = hf.decode(model, [seq], task.join[None].to(dev))
    flops += forward_flops(model, task.join.numel(), n_seen)
    logits = score_targets(model, seq, out[0, -1], task.targets)
    return RowOutput(logits, timer.seconds, flops, recomputed=recomputed)


BeforeJoin = Callable[..., float]


def kvfuse_row(name: str, layout: str, *, before_join: BeforeJoin | None = None, page_size: int = 16,
               description: str = "", default: bool = True) -> Row:
    """A row through kvfuse's real path with ``kvfuse.merge(threads, layout=layout)``.

    ``before_join(model, task, merged) -> flops``, when given, runs after the merge and before the
    join (timed with them) and may change the merged sequence's K/V in place: the place of repair
    (recompute chosen tokens with full visibility) and of any other post-merge treatment. It must
    leave ``merged`` live and return the FLOPs it spent (`forward_flops` counts a forward), or
    ``(flops, recomputed)`` with the fraction of the merged tokens it recomputed."""
    import kvfuse

    def run(model, task: Task) -> RowOutput:
        timer = _Timer(model.device)
        with torch.no_grad(), attention(model, "kvfuse"):
            store, prefix, threads = prefill_threads(model, task, page_size=page_size)
            prefix.release()
            with timer():
                merged = kvfuse.merge(threads, layout=layout)
                spent = before_join(model, task, merged) if before_join is not None else 0.0
            flops, recomputed = spent if isinstance(spent, tuple) else (spent, None)
            try:
                return _join(model, task, merged, timer, float(flops), recomputed)
            finally:
                merged.release()

    return Row(name, run, ("reading", "branches"), description or f"kvfuse.merge(layout={layout!r})", default)


def memory_insert(model, task: Task, *, page_size: int = 16) -> RowOutput:
    """Memory task: each document's K/V, encoded after its own context and saved as a memory block
    (not counted), loaded and inserted after the prefix at new positions (counted, with the join)."""
    import kvfuse
    from kvfuse import memory
    from kvfuse.integrations import hf

    if task.contexts is None:
        raise ValueError("memory_insert needs a memory task (task.contexts)")
    dev = model.device
    timer = _Timer(dev)
    identity = memory.model_identity(model.config)
    extra = sum(c.numel() for c in task.contexts)
    with torch.no_grad(), attention(model, "kvfuse"), tempfile.TemporaryDirectory() as tmp:
        store = _store(model, task, page_size, extra)
        paths = []
        for i, (ctx, ids) in enumerate(zip(task.contexts, task.threads)):
            seq = store.sequence(f"context{i}")
            hf.prefill(model, seq, ctx[None].to(dev))
            (block,) = kvfuse.fork(seq, 1, name=f"doc{i}")
            hf.prefill(model, block, ids[None].to(dev))
            paths.append(os.path.join(tmp, f"block{i}.safetensors"))
            memory.save(paths[-1], block, identity=identity, segment=block.segments[-1].name)
            seq.release()
            block.release()
        seq = store.sequence("prefix")
        hf.prefill(model, seq, task.prefix[None].to(dev))
        with timer():
            for p in paths:
                memory.insert(store, memory.load(p, identity=identity, device=dev), into=seq)
        try:
            return _join(model, task, seq, timer, 0.0)
        finally:
            seq.release()


register(Row("text", text_merge, KINDS, "text merge: threads + join re-encoded after the cached prefix (the gold)"))
register(kvfuse_row("shared", "shared", description="kvfuse.merge, shared layout (threads keep their positions)"))
register(kvfuse_row("sequential", "sequential",
                    description="kvfuse.merge, sequential layout (threads moved after one another by re-rotation)"))
register(Row("memory", memory_insert, ("memory",), "memory blocks saved in other contexts, inserted after the prefix"))


# ---------------------------------------------------------------------------------------- repair
def repair_flops(model, positions: torch.Tensor) -> float:
    """FLOPs of recomputing the tokens at ``positions`` (indices in the merged order, each seeing
    every token up to itself): the decoder's linear maps per token, attention per visible pair."""
    cfg = model.config
    layers = model.model.layers
    linear = sum(m.weight.numel() for m in layers.modules() if isinstance(m, torch.nn.Linear))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    pairs = float((positions.double() + 1).sum())
    return 2.0 * linear * positions.numel() + 4.0 * cfg.num_attention_heads * head_dim * len(layers) * pairs


def probe_flops(model, n: int, layer: int = 1) -> float:
    """FLOPs of `hf.kv_deviation`: ``n`` tokens through the first ``layer`` layers (causal attention)
    and the K/V projections of layer ``layer`` (counted as a whole layer)."""
    per_layer = repair_flops(model, torch.arange(n)) / len(model.model.layers)
    return per_layer * (layer + 1)


def repair_before_join(policy: str, budget: float):
    """A `kvfuse_row` hook that repairs the merged sequence. ``policy``: "first" (the first ``budget``
    tokens of every thread that did not see the threads before it: EPIC), "deviation" (the
    ``budget`` fraction of all tokens with the largest K/V deviation at layer 1: CacheBlend), "union"
    (first 16 tokens plus the deviation fraction) or "all" (every token)."""
    from kvfuse import repair
    from kvfuse.integrations import hf

    def fn(model, task: Task, merged) -> float:
        ids = torch.cat([task.prefix, *task.threads])
        flops = 0.0
        if policy == "first":
            chosen = repair.first_tokens(merged, int(budget))
        elif policy == "all":
            chosen = torch.arange(merged.num_tokens)
        else:
            dev = hf.kv_deviation(model, merged, ids, layer=1)
            flops += probe_flops(model, merged.num_tokens)
            chosen = repair.top_fraction(merged, dev, float(budget))
            if policy == "union":
                chosen = repair.union(chosen, repair.first_tokens(merged, 16))
        hf.repair(model, merged, ids, chosen)
        return flops + repair_flops(model, chosen), chosen.numel() / merged.num_tokens

    return fn


for _layout in ("sequential", "shared"):
    for _policy, _budgets in (("first", (8, 16, 32)), ("deviation", (0.05, 0.10, 0.15)), ("union", (0.10,))):
        for _b in _budgets:
            _label = f"{_b}" if _policy == "first" else f"{int(round(_b * 100))}%"
            register(kvfuse_row(f"{_layout}+{_policy}{_label}", _layout, before_join=repair_before_join(_policy, _b),
                                description=f"{_layout} layout, then repair ({_policy} {_label})", default=False))
register(kvfuse_row("sequential+all", "sequential", before_join=repair_before_join("all", 1.0),
                    description="sequential layout, every token repaired (must equal the text merge)", default=False))


def temperature_before_join(temperature: float):
    """A `kvfuse_row` hook: APE-style attention temperature on the threads at the join. Every thread
    token's keys (all layers) are divided by ``temperature`` in place, so every later query's scores
    for them are ``q.k / temperature`` (the prefix and the join are untouched). APE also scales the
    threads' attention weights by a factor; that needs a per-segment weight in the attention kernels,
    which kvfuse does not have, so only the temperature is measured."""

    def fn(model, task: Task, merged) -> float:
        store = merged.store
        n_pre = task.prefix.numel()
        storage = merged.token_index()[n_pre:]
        ps = store.page_size
        pages = torch.tensor(merged.pages, dtype=torch.int64)
        slots = (pages[storage // ps] * ps + storage % ps).to(store.device)
        view = store.k_cache.view(store.num_layers, -1, store.num_kv_heads, store.head_dim)
        view[:, slots] = (view[:, slots].float() / temperature).to(view.dtype)
        return 0.0

    return fn


for _t in (0.9, 0.8):
    register(kvfuse_row(f"shared+temp{_t}", "shared", before_join=temperature_before_join(_t),
                        description=f"shared layout, APE-style temperature {_t} on the threads' keys (no scale)",
                        default=False))
register(Row("prefix-only", prefix_only, KINDS, "threads dropped: the join right after the prefix (the floor)"))
