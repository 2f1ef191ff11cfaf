"""RoPE re-rotation of cached keys, in place."""

from __future__ import annotations

import torch

from kvfuse import _ops
from kvfuse._checks import check_cache, check_in_range, check_tensor, check_unique
from kvfuse.dispatch import choose
from kvfuse.rope import MAX_POSITION, RopeConfig


def check_rope(rope, head_dim: int) -> None:
    if not isinstance(rope, RopeConfig):
        raise TypeError(f"rope must be a kvfuse.RopeConfig, got {type(rope).__name__}")
    if rope.head_dim != head_dim:
        raise ValueError(f"rope.head_dim={rope.head_dim} does not match the cache's head_dim={head_dim}")


def check_positions(name: str, pos, n: int) -> None:
    check_tensor(name, pos, ndim=1, dtype=(torch.int32, torch.int64))
    if pos.numel() != n:
        raise ValueError(f"{name} must have one position per slot ({n}), got {pos.numel()}")
    check_in_range(name, pos, 0, MAX_POSITION + 1, "positions")


def rerotate_(k_cache: torch.Tensor, slots: torch.Tensor, old_positions: torch.Tensor,
              new_positions: torch.Tensor, rope: RopeConfig, *, backend: str | None = None) -> torch.Tensor:
    """Move cached keys from ``old_positions`` to ``new_positions`` by re-rotating them in place.

    Because RoPE is relative, ``R(new) = R(new - old) R(old)``: each key is rotated by its position
    difference (a pure rotation; YaRN's attention factor, already in the key, is not applied again).
    Angles are computed in float64 from the integer differences and handed to the kernel as a cos/sin
    table per distinct difference, so positions up to 2**31 - 1 lose no accuracy.

    Args:
        k_cache: key pool ``[num_pages, page_size, num_kv_heads, head_dim]`` or layer-stacked
            ``[num_layers, ...]`` (all layers rotate), fp16/bf16/fp32, contiguous. **Modified in place.**
        slots: int32/int64 ``[N]`` distinct slot ids (``page * page_size + offset``).
        old_positions, new_positions: int ``[N]`` in ``[0, 2**31 - 1]``.
        rope: the model's `RopeConfig` (NeoX or interleaved, partial rotary, any scaling).
        backend: "auto" (default, or ``KVFUSE_BACKEND``), "cuda", "triton" or "torch".

    Returns:
        ``k_cache`` itself. Every slot not listed is left bit-identical. All inputs are validated
        before anything is written.

    Example:
        >>> import torch, kvfuse
        >>> cfg = kvfuse.RopeConfig(head_dim=64)
        >>> k = torch.randn(4, 16, 2, 64)
        >>> slots = torch.arange(16, 32)          # page 1
        >>> _ = kvfuse.rerotate_(k, slots, torch.arange(16), torch.arange(16) + 100, cfg)
    """
    check_cache("k_cache", k_cache)
    check_rope(rope, k_cache.shape[-1])
    check_tensor("slots", slots, ndim=1, dtype=(torch.int32, torch.int64), device=k_cache.device)
    n_slots = k_cache.shape[-4] * k_cache.shape[-3]
    check_in_range("slots", slots, 0, n_slots, "slot ids (page * page_size + offset)")
    check_unique("slots", slots, "slot ids", upper=n_slots)
    check_positions("old_positions", old_positions, slots.numel())
    check_positions("new_positions", new_positions, slots.numel())
    if slots.numel() == 0:
        return k_cache
    cos, sin, idx = rope.rotation_tables(new_positions.long() - old_positions.long().to(new_positions.device),
                                         device=k_cache.device)
    b = choose("rerotate_", backend, k_cache=k_cache, rotary_dim=rope.rotary_dim, interleaved=rope.interleaved)
    _ops.rerotate_op(k_cache, slots, idx, cos, sin, rope.rotary_dim, rope.interleaved, b)
    return k_cache
