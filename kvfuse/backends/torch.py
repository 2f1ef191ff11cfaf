"""The torch backend: the reference implementations, valid for every input."""

from kvfuse import reference
from kvfuse.dispatch import register

register("rerotate_", "torch")(reference.rerotate_)
register("compose_copy_", "torch")(reference.compose_copy_)
register("segment_attention", "torch")(reference.segment_attention)
register("merge_states", "torch")(reference.merge_states)
register("write_kv_", "torch")(reference.write_kv_)
register("small_mm", "torch")(reference.small_mm)
