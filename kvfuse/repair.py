"""Which tokens of a merged sequence to recompute (repair), model-independent.

After a merge, a thread's tokens saw the prefix and their own thread, not the threads placed before
them: their K/V differ from the text merge's. `candidates` lists those tokens; the policies pick a
budget of them; `kvfuse.integrations.hf.repair` recomputes the chosen ones in place (and
`kvfuse.integrations.hf.kv_deviation` measures CacheBlend's signal).

Policies (each returns indices into the sequence's real tokens, pads excluded, ascending):

* `first_tokens` (EPIC / LegoLink): the first ``k`` tokens of every segment that did not see
  everything before it -- where attention sinks form and the missing context matters most.
* `top_fraction` (CacheBlend): the tokens with the largest K/V deviation at an early layer, up to a
  fraction of all the sequence's tokens.
* `union` of several.

Example:
    >>> import torch, kvfuse
    >>> from kvfuse import repair
    >>> store = kvfuse.PagedKVStore(1, 32, 4, 1, 8)
    >>> p = store.sequence(); _ = p.append_kv(torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 8))
    >>> a, b = kvfuse.fork(p, 2)
    >>> for t, n in ((a, 3), (b, 5)): _ = t.append_kv(torch.randn(1, n, 1, 8), torch.randn(1, n, 1, 8))
    >>> merged = kvfuse.merge([a, b], layout="shared")
    >>> repair.candidates(merged).tolist()     # b's tokens did not see a's
    [7, 8, 9, 10, 11]
    >>> repair.first_tokens(merged, 2).tolist()
    [7, 8]
"""

from __future__ import annotations

import torch

from kvfuse.store import PagedSequence

__all__ = ["candidates", "first_tokens", "top_fraction", "union"]


def _segments(seq: PagedSequence):
    """(first real-token index, length, saw everything before) of every real segment."""
    if not isinstance(seq, PagedSequence):
        raise TypeError(f"seq must be a kvfuse.PagedSequence, got {type(seq).__name__}")
    seq.check_live()
    out, start, before = [], 0, set()
    graph = seq.graph()
    for s in seq.segments:
        if s.pad:
            continue
        i = graph.index[s.name]
        seen = {graph.segments[j].name for j in torch.nonzero(graph.ancestors[i]).flatten().tolist()}
        out.append((start, s.length, before <= seen))
        before.add(s.name)
        start += s.length
    return out


def candidates(seq: PagedSequence) -> torch.Tensor:
    """int64 indices of the real tokens whose segment did not see every real segment before it (the
    tokens whose K/V a merge leaves different from the text merge's)."""
    parts = [torch.arange(a, a + n) for a, n, full in _segments(seq) if not full]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)


def first_tokens(seq: PagedSequence, k: int) -> torch.Tensor:
    """The first ``k`` tokens of every segment that did not see everything before it."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ValueError(f"first_tokens: k must be an int >= 0, got {k!r}")
    parts = [torch.arange(a, a + min(k, n)) for a, n, full in _segments(seq) if not full]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)


def top_fraction(seq: PagedSequence, scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """The candidates with the largest ``scores`` (one per real token, e.g. `kv_deviation`), at most
    ``fraction`` (in [0, 1]) of all the sequence's real tokens, ascending."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"top_fraction: fraction must be a number in [0, 1], got {fraction!r}")
    if not isinstance(scores, torch.Tensor) or scores.shape != (seq.num_tokens,):
        raise ValueError(f"top_fraction: scores must be a tensor [num_tokens={seq.num_tokens}], got "
                         f"{getattr(scores, 'shape', type(scores).__name__)}")
    cand = candidates(seq)
    n = min(cand.numel(), int(round(fraction * seq.num_tokens)))
    best = torch.topk(scores.float().cpu()[cand], n).indices
    return torch.sort(cand[best]).values


def union(*selections: torch.Tensor) -> torch.Tensor:
    """The tokens chosen by any of ``selections``, ascending."""
    parts = [s.long().cpu() for s in selections]
    return torch.unique(torch.cat(parts)) if parts else torch.empty(0, dtype=torch.int64)
