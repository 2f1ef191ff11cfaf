"""The operations registered with ``torch.library`` (so torch.compile and CUDA graphs see them).

Each op takes its inputs already validated by the public API plus the name of the backend that
the dispatcher chose, and calls that backend's implementation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvfuse.dispatch import implementation


@torch.library.custom_op("kvfuse::rerotate_", mutates_args=("k_cache",))
def rerotate_op(k_cache: Tensor, slots: Tensor, table_idx: Tensor, cos: Tensor, sin: Tensor, rotary_dim: int,
                interleaved: bool, backend: str) -> None:
    implementation("rerotate_", backend)(k_cache, slots, table_idx, cos, sin, rotary_dim, interleaved)


@rerotate_op.register_fake
def _(k_cache, slots, table_idx, cos, sin, rotary_dim, interleaved, backend):
    return None


@torch.library.custom_op("kvfuse::compose_copy_", mutates_args=("k_cache", "v_cache"))
def compose_copy_op(k_cache: Tensor, v_cache: Tensor, src_slots: Tensor, dst_slots: Tensor, table_idx: Tensor,
                    cos: Tensor, sin: Tensor, rotary_dim: int, interleaved: bool, backend: str) -> None:
    implementation("compose_copy_", backend)(k_cache, v_cache, src_slots, dst_slots, table_idx, cos, sin,
                                             rotary_dim, interleaved)


@compose_copy_op.register_fake
def _(k_cache, v_cache, src_slots, dst_slots, table_idx, cos, sin, rotary_dim, interleaved, backend):
    return None


@torch.library.custom_op("kvfuse::segment_attention", mutates_args=())
def segment_attention_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, kv_lens: Tensor,
                         qo_indptr: Tensor, token_seg: Tensor, ancestors: Tensor, q_token: Tensor, token_pos: Tensor,
                         work_seq: Tensor, work_qtile: Tensor, kt_indptr: Tensor, kt_index: Tensor, kt_full: Tensor,
                         block_q: int, block_k: int, sm_scale: float, softcap: float, window: int,
                         backend: str) -> tuple[Tensor, Tensor]:
    """``window`` 0: no sliding window; ``softcap`` 0: no soft-capping."""
    fn = implementation("segment_attention", backend)
    if backend == "torch":
        return fn(q, k_cache, v_cache, block_table, kv_lens, qo_indptr, token_seg, ancestors, sm_scale,
                  q_token=q_token, token_pos=token_pos, window=window or None, softcap=softcap)
    return fn(q, k_cache, v_cache, block_table, kv_lens, qo_indptr, token_seg, ancestors, q_token, token_pos,
              work_seq, work_qtile, kt_indptr, kt_index, kt_full, block_q, block_k, sm_scale, softcap, window)


@segment_attention_op.register_fake
def _(q, k_cache, v_cache, block_table, kv_lens, qo_indptr, token_seg, ancestors, q_token, token_pos, work_seq,
      work_qtile, kt_indptr, kt_index, kt_full, block_q, block_k, sm_scale, softcap, window, backend):
    return torch.empty_like(q), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.custom_op("kvfuse::merge_states", mutates_args=())
def merge_states_op(v_a: Tensor, s_a: Tensor, v_b: Tensor, s_b: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    return implementation("merge_states", backend)(v_a, s_a, v_b, s_b)


@merge_states_op.register_fake
def _(v_a, s_a, v_b, s_b, backend):
    return torch.empty_like(v_a), torch.empty_like(s_a)
