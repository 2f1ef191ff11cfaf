"""Merge partial attention results computed over disjoint key sets."""

from __future__ import annotations

import torch

from kvfuse import _ops
from kvfuse._checks import check_tensor
from kvfuse.dispatch import choose


def merge_states(v_a: torch.Tensor, s_a: torch.Tensor, v_b: torch.Tensor, s_b: torch.Tensor, *,
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two attention outputs over disjoint key sets into the output over their union.

    Args:
        v_a, v_b: ``[N, H, D]`` outputs (same dtype). s_a, s_b: float32 ``[N, H]`` natural-log LSE
            (as returned by `attention`); -inf marks an empty side.
    Returns:
        ``(v, s)``: merged output in v_a's dtype and its float32 natural-log LSE.

    Example:
        >>> import torch, kvfuse
        >>> v, s = kvfuse.merge_states(torch.ones(2, 1, 4), torch.zeros(2, 1), torch.zeros(2, 1, 4), torch.zeros(2, 1))
        >>> v[0, 0, 0].item()
        0.5
    """
    check_tensor("v_a", v_a, ndim=3)
    check_tensor("v_b", v_b, ndim=3, dtype=v_a.dtype, device=v_a.device)
    if v_a.shape != v_b.shape:
        raise ValueError(f"v_a and v_b must have the same shape, got {tuple(v_a.shape)} and {tuple(v_b.shape)}")
    for name, s in (("s_a", s_a), ("s_b", s_b)):
        check_tensor(name, s, ndim=2, dtype=torch.float32, device=v_a.device)
        if s.shape != v_a.shape[:2]:
            raise ValueError(f"{name} must have shape {tuple(v_a.shape[:2])}, got {tuple(s.shape)}")
    b = choose("merge_states", backend, v=v_a)
    return _ops.merge_states_op(v_a, s_a, v_b, s_b, b)
