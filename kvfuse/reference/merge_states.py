"""Reference merge of two partial attention results over disjoint key sets."""

from __future__ import annotations

import torch


def merge_states(v_a, s_a, v_b, s_b):
    """v: ``[N, H, D]``, s: float32 ``[N, H]`` natural-log LSE. Returns (v, s) of the union.
    A side with LSE -inf (no keys) contributes nothing."""
    s_max = torch.maximum(s_a, s_b)
    s_max = torch.where(torch.isinf(s_max), torch.zeros_like(s_max), s_max)
    w_a, w_b = torch.exp(s_a - s_max), torch.exp(s_b - s_max)
    tot = w_a + w_b
    v = (v_a.float() * w_a[..., None] + v_b.float() * w_b[..., None]) / torch.where(tot > 0, tot, 1)[..., None]
    return v.to(v_a.dtype), s_max + torch.log(tot)
