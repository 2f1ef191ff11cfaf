"""The operations registered with ``torch.library`` (so torch.compile and CUDA graphs see them).

Each op takes its inputs already validated by the public API plus the name of the backend that
the dispatcher chose, and calls that backend's implementation.

The public API calls the functions of this module (``rerotate_op``, ...), not ``torch.ops.kvfuse.*``.
In a plain eager call they run the implementation directly: the custom op's Python dispatch costs tens
of microseconds per call, and its first call imports ``torch._dynamo`` (seconds). Whenever something
may be tracing or transforming the call (torch.compile or export, a dispatch mode such as make_fx or
FakeTensorMode, functorch transforms, tensor subclasses, TorchScript tracing, inputs that require grad)
they call the registered op instead, so compiled graphs hold ``torch.ops.kvfuse.*``.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from kvfuse.dispatch import implementation


def _traced(args, lists: bool = False) -> bool:
    """Whether a call with these arguments must go through the registered op (``lists``: look at the
    tensors inside list arguments too)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return True
    if torch._C._len_torch_dispatch_stack() or torch._C._are_functorch_transforms_active():
        return True
    grad = torch.is_grad_enabled()
    if lists:
        args = [x for a in args for x in (a if isinstance(a, (list, tuple)) else (a,))]
    return any(isinstance(a, Tensor) and (type(a) is not Tensor or (grad and a.requires_grad)) for a in args)


def _entry(op, fn, mutated: tuple[int, ...] = (), lists: bool = False):
    """``fn`` directly in plain eager calls (bumping the version of the arguments it mutates, as the
    registered op does), the registered ``op`` otherwise; ``lists``: some arguments are lists of tensors."""

    @functools.wraps(fn)
    def call(*args):
        if _traced(args, lists):
            return call.op(*args)
        out = fn(*args)
        if mutated:
            torch.autograd.graph.increment_version([args[i] for i in mutated])
        return out

    call.op = op
    return call


def _rerotate(k_cache: Tensor, slots: Tensor, table_idx: Tensor, cos: Tensor, sin: Tensor, rotary_dim: int,
              interleaved: bool, backend: str) -> None:
    implementation("rerotate_", backend)(k_cache, slots, table_idx, cos, sin, rotary_dim, interleaved)


_rerotate_op = torch.library.custom_op("kvfuse::rerotate_", _rerotate, mutates_args=("k_cache",))


@_rerotate_op.register_fake
def _(k_cache, slots, table_idx, cos, sin, rotary_dim, interleaved, backend):
    return None


def _compose_copy(k_cache: Tensor, v_cache: Tensor, src_slots: Tensor, dst_slots: Tensor, table_idx: Tensor,
                  cos: Tensor, sin: Tensor, rotary_dim: int, interleaved: bool, backend: str) -> None:
    implementation("compose_copy_", backend)(k_cache, v_cache, src_slots, dst_slots, table_idx, cos, sin,
                                             rotary_dim, interleaved)


_compose_copy_op = torch.library.custom_op("kvfuse::compose_copy_", _compose_copy, mutates_args=("k_cache", "v_cache"))


@_compose_copy_op.register_fake
def _(k_cache, v_cache, src_slots, dst_slots, table_idx, cos, sin, rotary_dim, interleaved, backend):
    return None


def _segment_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, kv_lens: Tensor,
                       qo_indptr: Tensor, token_seg: Tensor, ancestors: Tensor, q_token: Tensor, token_pos: Tensor,
                       work_seq: Tensor, work_qtile: Tensor, kt_indptr: Tensor, kt_index: Tensor, kt_full: Tensor,
                       kt_order: Tensor, n_full: Tensor, block_q: int, block_k: int, sm_scale: float, softcap: float,
                       window: int, backend: str) -> tuple[Tensor, Tensor]:
    """``window`` 0: no sliding window; ``softcap`` 0: no soft-capping."""
    fn = implementation("segment_attention", backend)
    if backend == "torch":
        return fn(q, k_cache, v_cache, block_table, kv_lens, qo_indptr, token_seg, ancestors, sm_scale,
                  q_token=q_token, token_pos=token_pos, window=window or None, softcap=softcap)
    return fn(q, k_cache, v_cache, block_table, kv_lens, qo_indptr, token_seg, ancestors, q_token, token_pos,
              work_seq, work_qtile, kt_indptr, kt_index, kt_full, kt_order, n_full, block_q, block_k, sm_scale,
              softcap, window)


_segment_attention_op = torch.library.custom_op("kvfuse::segment_attention", _segment_attention, mutates_args=())


@_segment_attention_op.register_fake
def _(q, k_cache, v_cache, block_table, kv_lens, qo_indptr, token_seg, ancestors, q_token, token_pos, work_seq,
      work_qtile, kt_indptr, kt_index, kt_full, kt_order, n_full, block_q, block_k, sm_scale, softcap, window, backend):
    return torch.empty_like(q), q.new_empty(q.shape[:2], dtype=torch.float32)


def _write_kv(k_cache: Tensor, v_cache: Tensor, slots: Tensor, k: Tensor, v: Tensor, layer: int, backend: str) -> None:
    """K/V of ``n`` tokens into their slots of the layer-stacked pools (``layer`` -1: ``k``/``v`` hold every
    layer), in place: an op of its own so that a compiled graph writes the pools where they are (traced as
    an indexed assignment, the write would be functionalised into a copy of the pool)."""
    implementation("write_kv_", backend)(k_cache, v_cache, slots, k, v, layer)


_write_kv_op = torch.library.custom_op("kvfuse::write_kv_", _write_kv, mutates_args=("k_cache", "v_cache"))


@_write_kv_op.register_fake
def _(k_cache, v_cache, slots, k, v, layer, backend):
    return None


def _merge_states(v_a: Tensor, s_a: Tensor, v_b: Tensor, s_b: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    return implementation("merge_states", backend)(v_a, s_a, v_b, s_b)


_merge_states_op = torch.library.custom_op("kvfuse::merge_states", _merge_states, mutates_args=())


@_merge_states_op.register_fake
def _(v_a, s_a, v_b, s_b, backend):
    return torch.empty_like(v_a), torch.empty_like(s_a)


def _small_mm(x: Tensor, weights: list[Tensor], biases: list[Tensor], backend: str) -> list[Tensor]:
    """``x @ w.T (+ b)`` per weight for a few rows of ``x`` (``biases`` empty: none)."""
    return implementation("small_mm", backend)(x, weights, biases)


_small_mm_op = torch.library.custom_op("kvfuse::small_mm", _small_mm, mutates_args=())


@_small_mm_op.register_fake
def _(x, weights, biases, backend):
    return [x.new_empty(x.shape[0], w.shape[0]) for w in weights]


rerotate_op = _entry(_rerotate_op, _rerotate, mutated=(0,))
compose_copy_op = _entry(_compose_copy_op, _compose_copy, mutated=(0, 1))
segment_attention_op = _entry(_segment_attention_op, _segment_attention)
write_kv_op = _entry(_write_kv_op, _write_kv, mutated=(0, 1))
merge_states_op = _entry(_merge_states_op, _merge_states)
small_mm_op = _entry(_small_mm_op, _small_mm, lists=True)
