"""kvfuse: fused kernels for composing KV caches (re-rotate RoPE keys, compose paged KV, block-sparse
segment attention), with pure-torch references as fallback and oracle."""

from kvfuse.attention import AttentionPlan, AttentionSpec, attention, lse_from_base2, lse_to_base2, plan
from kvfuse.batch import BatchPlan, batch_plan
from kvfuse.compat import flash_attn_with_kvcache, sdpa
from kvfuse.compose import Composed, SourceSegment, compose, pages_needed
from kvfuse.dispatch import BackendNotSupported, available
from kvfuse.integrations.hf_config import UnsupportedModel
from kvfuse.merge_states import merge_states
from kvfuse.paged import OutOfPages, PagePool, gather_kv, slots_of, write_kv_
from kvfuse.rerotate import copy_rotate_, rerotate_
from kvfuse.rope import ModelRope, RopeConfig
from kvfuse.segments import Segment, SegmentGraph
from kvfuse.store import (
    PagedKVStore,
    PagedSequence,
    SegmentInfo,
    Sequence,  # noqa: F401 - the former name of PagedSequence
)
from kvfuse.threads import fork, merge

__version__ = "0.1.0"

__all__ = [
    "AttentionPlan", "AttentionSpec", "BackendNotSupported", "BatchPlan", "Composed", "ModelRope", "OutOfPages",
    "PagePool", "PagedKVStore", "PagedSequence", "RopeConfig", "Segment", "SegmentGraph", "SegmentInfo",
    "SourceSegment", "UnsupportedModel", "attention", "available", "batch_plan", "compose", "copy_rotate_",
    "flash_attn_with_kvcache", "fork", "gather_kv", "lse_from_base2", "lse_to_base2", "merge", "merge_states",
    "pages_needed", "plan", "rerotate_", "sdpa", "slots_of", "write_kv_",
]
