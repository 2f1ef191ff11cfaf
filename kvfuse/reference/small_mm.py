"""Reference of the few-row matrix products (a decode step's projections)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def small_mm(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor]) -> list[torch.Tensor]:
    """``[x @ w.T + b]`` per weight (no bias when ``biases`` is empty), float32 inside, in x's dtype."""
    bs = list(biases) if biases else [None] * len(weights)
    return [F.linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype) for w, b in zip(weights, bs)]
