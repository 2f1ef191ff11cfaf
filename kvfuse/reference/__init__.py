"""Pure-torch reference implementations: the oracles of every test and the CPU fallback.

Each is short and float32 inside. Nothing else in kvfuse re-derives them.
"""

from kvfuse.reference.attention import segment_attention
from kvfuse.reference.compose import compose_copy_, compose_dense, write_kv_
from kvfuse.reference.merge_states import merge_states
from kvfuse.reference.rerotate import rerotate_
from kvfuse.reference.rope import apply_rope, rotate
from kvfuse.reference.small_mm import small_mm

__all__ = ["apply_rope", "rotate", "rerotate_", "compose_copy_", "compose_dense", "segment_attention", "merge_states",
           "small_mm", "write_kv_"]
