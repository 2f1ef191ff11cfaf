"""Scores of one row against the text merge, from logits. Everything is computed in float64.

Conventions a caller can get wrong:

* ``logits[i]`` is the distribution that *predicts* ``target[i]`` (the logits at the position before
  it): row 0 comes from the join's last token. Shapes ``[n, vocab]``.
* KL is ``KL(p_text || p_row)`` in nats (natural log), per position: the information lost when the
  row's distribution stands in for the text merge's. 0 for the text merge itself; it is not symmetric.
* The answer log-likelihood is the *sum* over the answer's tokens (not a mean): candidates with more
  tokens are penalised, so compare candidates of similar form (the tasks' candidates are all of one
  kind: cities, jobs or four-digit years).
"""

from __future__ import annotations

import torch

__all__ = ["kl_divergence", "top1_agreement", "target_loglik", "greedy_exact", "answer_scores"]


def _logp(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.double(), -1)


def kl_divergence(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(ref) || softmax(logits))`` per position, nats, float64 ``[n]`` (>= 0 up to rounding)."""
    if ref_logits.shape != logits.shape:
        raise ValueError(f"kl_divergence: shapes differ: {tuple(ref_logits.shape)} and {tuple(logits.shape)}")
    lr, lg = _logp(ref_logits), _logp(logits)
    return (lr.exp() * (lr - lg)).sum(-1)


def top1_agreement(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Fraction of positions whose argmax token is the text merge's (ties: the lowest id, both sides)."""
    return float((ref_logits.argmax(-1) == logits.argmax(-1)).double().mean())


def target_loglik(logits: torch.Tensor, target: torch.Tensor) -> float:
    """``sum_i log p(target[i])`` (nats) under ``logits`` ``[n, vocab]`` (``logits[i]`` predicts ``target[i]``)."""
    if logits.shape[0] != target.numel():
        raise ValueError(f"target_loglik: {logits.shape[0]} logits rows for {target.numel()} target tokens")
    return float(_logp(logits).gather(-1, target.view(-1, 1).to(logits.device)).sum())


def greedy_exact(logits: torch.Tensor, target: torch.Tensor) -> bool:
    """Greedy decoding would write ``target`` first: each of its tokens is the argmax given the ones
    before (teacher-forced logits suffice: they are exactly greedy decoding's as long as it agrees).
    Says nothing about what greedy decoding writes after the target."""
    return bool((logits.argmax(-1).cpu() == target.view(-1).cpu()).all())


def answer_scores(logits: list[torch.Tensor], targets: list[torch.Tensor], gold: int) -> dict:
    """Scores of the gold answer among candidates: ``loglik`` (its summed log-likelihood, nats),
    ``rank`` (1 + the number of candidates with a strictly higher log-likelihood: 1 is best),
    ``correct`` (rank 1) and ``exact`` (`greedy_exact` of the gold answer)."""
    if len(logits) != len(targets) or not 0 <= gold < len(targets):
        raise ValueError(f"answer_scores: {len(logits)} logits, {len(targets)} targets, gold {gold}")
    ll = [target_loglik(lg, t) for lg, t in zip(logits, targets)]
    rank = 1 + sum(x > ll[gold] for i, x in enumerate(ll) if i != gold)
    return dict(loglik=ll[gold], rank=rank, correct=rank == 1, exact=greedy_exact(logits[gold], targets[gold]))
