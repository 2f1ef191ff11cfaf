"""Reference composition: the fused gather + rotate K + copy V, and a dense oracle."""

from __future__ import annotations

import torch

from kvfuse.paged import gather_kv, slot_view
from kvfuse.reference.rope import rotate


def compose_copy_(k_cache, v_cache, src_slots, dst_slots, table_idx, cos, sin, rotary_dim: int,
                  interleaved: bool) -> None:
    """For every i: ``k[dst_slots[i]] = R(table row table_idx[i]) k[src_slots[i]]`` and
    ``v[dst_slots[i]] = v[src_slots[i]]``, all layers. Source and destination slots must not overlap."""
    kv, vv = slot_view(k_cache), slot_view(v_cache)
    src, dst, ti = src_slots.long(), dst_slots.long(), table_idx.long()
    kv[:, dst] = rotate(kv[:, src], cos[ti], sin[ti], rotary_dim, interleaved).to(k_cache.dtype)
    vv[:, dst] = vv[:, src]


def compose_dense(k_cache, v_cache, segments, new_positions, cfg):
    """What a composition must produce, as contiguous tensors.

    segments: list of (pages, start, length, old_position); new_positions: first new position of
    each. Returns (K, V) of shape ``[(L,) total, H, D]``: each segment's tokens gathered in order,
    keys rotated by ``new_position - old_position`` (a pure rotation), values copied.
    """
    ks, vs = [], []
    for (pages, start, length, old_pos), new_pos in zip(segments, new_positions):
        k = gather_kv(k_cache, pages, start + length)[..., start:, :, :]
        v = gather_kv(v_cache, pages, start + length)[..., start:, :, :]
        ang = torch.tensor(float(new_pos - old_pos), dtype=torch.float64) * cfg.inv_freq()
        cos, sin = torch.cos(ang).float().to(k.device), torch.sin(ang).float().to(k.device)
        ks.append(rotate(k, cos, sin, cfg.rotary_dim, cfg.interleaved).to(k.dtype))
        vs.append(v)
    dim = -3
    return torch.cat(ks, dim), torch.cat(vs, dim)


def write_kv_(k_cache, v_cache, slots, k, v, layer: int) -> None:
    """K/V of ``n`` tokens into ``slots`` of the layer-stacked pools ``[L, P, page_size, H, D]``:
    ``k`` / ``v`` ``[n, H, D]`` into ``layer``, or ``[L, n, H, D]`` into every layer (``layer`` -1);
    cast to the pools' dtype."""
    for cache, x in ((k_cache, k), (v_cache, v)):
        slot_view(cache if layer < 0 else cache[layer])[:, slots] = x.to(cache.dtype)
