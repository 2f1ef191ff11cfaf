"""RoPE re-rotation of cached keys, in place."""

from __future__ import annotations

import torch

from kvfuse import _ops
from kvfuse._checks import check_cache, check_disjoint, check_in_range, check_same_pool, check_tensor, check_unique
from kvfuse.dispatch import choose
from kvfuse.rope import MAX_POSITION, ModelRope, RopeConfig, as_model_rope


def check_rope(rope, head_dim: int) -> None:
    if not isinstance(rope, RopeConfig):
        raise TypeError(f"rope must be a kvfuse.RopeConfig, got {type(rope).__name__}")
    if rope.head_dim != head_dim:
        raise ValueError(f"rope.head_dim={rope.head_dim} does not match the cache's head_dim={head_dim}")


def layer_runs(rope, k_cache: torch.Tensor, *others: torch.Tensor):
    """Validate ``rope`` against a pool and split the pool by rotation: a list of
    ``(config, k_view, *other_views)``, one per run of consecutive layers that rotate alike
    (``config`` None for NoPE layers). A `RopeConfig` covers the whole pool in one run; a `ModelRope`
    needs a layer-stacked pool with one entry per layer."""
    if isinstance(rope, RopeConfig):
        check_rope(rope, k_cache.shape[-1])
        return [(rope, k_cache, *others)]
    if not isinstance(rope, ModelRope):
        raise TypeError(f"rope must be a kvfuse.RopeConfig or kvfuse.ModelRope, got {type(rope).__name__}")
    if k_cache.dim() != 5:
        raise ValueError(f"a ModelRope (per-layer rotation) needs a layer-stacked pool [num_layers, num_pages, "
                         f"page_size, num_kv_heads, head_dim], got shape {tuple(k_cache.shape)}")
    rope = as_model_rope(rope, k_cache.shape[0])
    if rope.head_dim is not None:
        check_rope(rope.layers[next(i for i, c in enumerate(rope.layers) if c is not None)], k_cache.shape[-1])
    runs = rope.runs()
    if len(runs) == 1:
        return [(runs[0][2], k_cache, *others)]
    return [(c, k_cache[a:b], *(o[a:b] for o in others)) for a, b, c in runs]


def check_movable(rope) -> None:
    """Raise if ``rope`` says tokens of its model cannot be moved (no rotary embedding)."""
    if isinstance(rope, ModelRope):
        rope.check_movable()


def check_positions(name: str, pos, n: int) -> None:
    check_tensor(name, pos, ndim=1, dtype=(torch.int32, torch.int64))
    if pos.numel() != n:
        raise ValueError(f"{name} must have one position per slot ({n}), got {pos.numel()}")
    check_in_range(name, pos, 0, MAX_POSITION + 1, "positions")


def rerotate_(k_cache: torch.Tensor, slots: torch.Tensor, old_positions: torch.Tensor,
              new_positions: torch.Tensor, rope: RopeConfig, *, backend: str | None = None,
              check: bool = True) -> torch.Tensor:
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
        rope: the model's `RopeConfig` (NeoX or interleaved, partial rotary, any scaling), or for a
            layer-stacked pool a `ModelRope` (one rotation per layer; NoPE layers are left as they are;
            a model whose tokens cannot be moved raises ``ValueError`` when any position changes).
        backend: "auto" (default, or ``KVFUSE_BACKEND``), "cuda", "triton" or "torch".
        check: validate the values of ``slots`` and the positions (range, distinct slots), which reads
            them on the host. ``check=False`` reads no tensor value: shapes, dtypes and devices are still
            checked, the cos/sin tables are computed per token on the device, and the call can be
            captured in a CUDA graph or traced by ``torch.compile`` -- the caller guarantees distinct
            in-range slots (as from `PagedSequence.reserve`); a model whose tokens cannot be moved is
            refused outright (no position is read to see whether one changes).

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
    runs = layer_runs(rope, k_cache)
    check_tensor("slots", slots, ndim=1, dtype=(torch.int32, torch.int64), device=k_cache.device)
    n_slots = k_cache.shape[-4] * k_cache.shape[-3]
    delta = _checked_delta("slots", slots, old_positions, new_positions, n_slots, k_cache.device, check)
    if slots.numel() == 0:
        return k_cache
    if isinstance(rope, ModelRope) and rope.unmovable is not None and (not check or bool(delta.any())):
        rope.check_movable()
    runs = [r for r in runs if r[0] is not None]  # NoPE layers: nothing to rotate
    plans = [(view, cfg, choose("rerotate_", backend, k_cache=view, rotary_dim=cfg.rotary_dim,
                                interleaved=cfg.interleaved)) for cfg, view in runs]
    for view, cfg, b in plans:  # every backend is chosen before the first write
        cos, sin, idx = cfg.rotation_tables(delta, device=k_cache.device, per_token=not check)
        _ops.rerotate_op(view, slots, idx, cos, sin, cfg.rotary_dim, cfg.interleaved, b)
    return k_cache


def _checked_delta(name: str, slots, old_positions, new_positions, n_slots: int, device, check: bool) -> torch.Tensor:
    """``new - old`` (int64), after the checks of the slots written and the positions; with ``check=False``
    only those that read no value."""
    if check:
        check_in_range(name, slots, 0, n_slots, "slot ids (page * page_size + offset)")
        check_unique(name, slots, "slot ids", upper=n_slots)
        check_positions("old_positions", old_positions, slots.numel())
        check_positions("new_positions", new_positions, slots.numel())
        return new_positions.long() - old_positions.long().to(new_positions.device)
    for name, pos in (("old_positions", old_positions), ("new_positions", new_positions)):
        check_tensor(name, pos, ndim=1, dtype=(torch.int32, torch.int64), device=device)
        if pos.numel() != slots.numel():
            raise ValueError(f"{name} must have one position per slot ({slots.numel()}), got {pos.numel()}")
    return new_positions.long() - old_positions.long()


def copy_rotate_(k_cache: torch.Tensor, v_cache: torch.Tensor, src_slots: torch.Tensor, dst_slots: torch.Tensor,
                 old_positions: torch.Tensor, new_positions: torch.Tensor, rope: RopeConfig, *,
                 backend: str | None = None, check: bool = True) -> None:
    """Copy the K/V of ``src_slots`` into ``dst_slots`` of the same pools, re-rotating the keys from
    ``old_positions`` to ``new_positions`` on the way (one fused pass; V is copied as is): the write
    step of `compose` on tables the caller already holds, e.g. on the device.

    Args:
        k_cache, v_cache: pools as in `rerotate_` (two separate tensors of one shape). **Modified in
            place** (``dst_slots`` only).
        src_slots, dst_slots: int ``[N]`` slot ids; ``dst_slots`` distinct and disjoint from
            ``src_slots``.
        old_positions, new_positions, rope, backend: as in `rerotate_`.
        check: as in `rerotate_`; ``check=False`` reads no tensor value (capturable) and the caller
            guarantees in-range, distinct, disjoint slots.

    Example:
        >>> import torch, kvfuse
        >>> cfg = kvfuse.RopeConfig(head_dim=16)
        >>> k, v = torch.randn(2, 4, 8, 2, 16).unbind(0)
        >>> src, dst = torch.arange(0, 8), torch.arange(16, 24)
        >>> kvfuse.copy_rotate_(k, v, src, dst, torch.arange(8), torch.arange(8) + 5, cfg)
        >>> torch.equal(v[2], v[0])
        True
    """
    check_cache("k_cache", k_cache)
    check_cache("v_cache", v_cache)
    check_same_pool("k_cache", k_cache, "v_cache", v_cache)
    check_disjoint("k_cache", k_cache, "v_cache", v_cache)
    runs = layer_runs(rope, k_cache, v_cache)
    n_slots = k_cache.shape[-4] * k_cache.shape[-3]
    for name, t in (("src_slots", src_slots), ("dst_slots", dst_slots)):
        check_tensor(name, t, ndim=1, dtype=(torch.int32, torch.int64), device=k_cache.device)
    if dst_slots.numel() != src_slots.numel():
        raise ValueError(f"dst_slots must have one slot per source slot ({src_slots.numel()}), got {dst_slots.numel()}")
    if dst_slots.dtype != src_slots.dtype:  # the kernels take one index type for both lists
        dst_slots = dst_slots.to(src_slots.dtype)
    if check:
        check_in_range("src_slots", src_slots, 0, n_slots, "slot ids (page * page_size + offset)")
        if bool(torch.isin(dst_slots, src_slots).any()):
            raise ValueError("dst_slots must be disjoint from src_slots")
    delta = _checked_delta("dst_slots", dst_slots, old_positions, new_positions, n_slots, k_cache.device, check)
    if src_slots.numel() == 0:
        return
    if isinstance(rope, ModelRope) and rope.unmovable is not None and (not check or bool(delta.any())):
        rope.check_movable()
    work = []
    for cfg, kv, vv in runs:  # every backend is chosen before the first write
        c = cfg or RopeConfig(head_dim=k_cache.shape[-1], rotary_dim=2)  # NoPE: rotated by 0 (a plain copy)
        d = delta if cfg is not None else torch.zeros_like(delta)
        work.append((c, kv, vv, d, choose("compose_copy_", backend, k_cache=kv, rotary_dim=c.rotary_dim,
                                          interleaved=c.interleaved)))
    for c, kv, vv, d, b in work:
        cos, sin, idx = c.rotation_tables(d, device=k_cache.device, per_token=not check)
        _ops.compose_copy_op(kv, vv, src_slots, dst_slots, idx, cos, sin, c.rotary_dim, c.interleaved, b)
