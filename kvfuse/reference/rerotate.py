"""Reference in-place re-rotation of keys in a paged pool, from cos/sin tables."""

from __future__ import annotations

from kvfuse.paged import slot_view
from kvfuse.reference.rope import rotate


def rerotate_(k_cache, slots, table_idx, cos, sin, rotary_dim: int, interleaved: bool) -> None:
    """Rotate the keys in ``slots`` by the table row ``table_idx`` of each, in place, all layers.

    k_cache: ``[(L,) P, page_size, H, D]``; slots: int ``[N]``; table_idx: int ``[N]``;
    cos/sin: float32 ``[U, rotary_dim // 2]``.
    """
    view = slot_view(k_cache)
    s = slots.long()
    ti = table_idx.long()
    view[:, s] = rotate(view[:, s], cos[ti], sin[ti], rotary_dim, interleaved).to(k_cache.dtype)
