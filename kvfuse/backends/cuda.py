"""The CUDA C++ backend: the compiled extension ``kvfuse._C`` (csrc/).

Importing this module raises ImportError when the extension was not built; the dispatcher turns
that into a reason. Nothing here touches ``torch.cuda`` at import time.
"""

from __future__ import annotations

import torch

from kvfuse.dispatch import CUDA_ATTN_HEAD_DIMS, register

try:
    from kvfuse import _C
except ImportError as e:  # the extension is not built (or was built against another torch)
    raise ImportError(f"the CUDA extension kvfuse._C is not available ({e}); reinstall with "
                      f"`pip install --no-build-isolation -e .` on a CUDA build of torch") from e

POOL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ATTN_DTYPES = (torch.float16, torch.bfloat16)
ATTN_HEAD_DIMS = CUDA_ATTN_HEAD_DIMS
DECODE_MAX_Q = 8  # queries per sequence the decode kernel takes; more: the Hopper prefill kernel
DECODE_BLOCK_K = 64
PREFILL_ROWS = 128  # (query, head) rows of a block of the prefill kernel (csrc/include/kvfuse/prefill_sm90.cuh)
PREFILL_BLOCK_K = {64: 128, 128: 128, 256: 64}  # PrefillConfig<D>::kBlockK
# dynamic shared memory per block of the decode kernel (csrc/include/kvfuse/attention.cuh, DecodeConfig)
DECODE_SMEM = {64: 65536, 128: 98304, 256: 139264}


def _device_reasons(name, t) -> list[str]:
    if not isinstance(t, torch.Tensor):
        return []
    if t.device.type != "cuda":
        return [f"{name} is on {t.device}, the CUDA kernels need a CUDA tensor"]
    return []


def _pool_reasons(k_cache=None, rotary_dim=None, interleaved=False, **_) -> list[str]:
    why = _device_reasons("k_cache", k_cache)
    if k_cache is None:
        return why
    if k_cache.dtype not in POOL_DTYPES:
        why.append(f"k_cache dtype {k_cache.dtype} is not one of fp16/bf16/fp32")
    if not k_cache.is_contiguous():
        why.append("k_cache must be contiguous")
    if rotary_dim is not None and (rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > k_cache.shape[-1]):
        why.append(f"rotary_dim={rotary_dim} must be even and in (0, head_dim]")
    if interleaved and k_cache.shape[-1] % 2:
        why.append("interleaved RoPE needs an even head_dim")
    return why


def _merge_reasons(v=None, **_) -> list[str]:
    why = _device_reasons("v", v)
    if v is not None and v.dtype not in POOL_DTYPES:
        why.append(f"dtype {v.dtype} is not one of fp16/bf16/fp32")
    return why


def _attention_reasons(q=None, k_cache=None, plan=None, **_) -> list[str]:
    why = _device_reasons("q", q)
    if q is None or k_cache is None:
        return why
    if q.dtype not in ATTN_DTYPES:
        why.append(f"dtype {q.dtype} is not fp16/bf16")
    if q.shape[-1] not in ATTN_HEAD_DIMS:
        why.append(f"head_dim {q.shape[-1]} is not one of {ATTN_HEAD_DIMS}")
    if not k_cache.is_contiguous():
        why.append("k_cache/v_cache must be contiguous")
    prefill = plan is not None and plan.max_q > DECODE_MAX_Q
    available = _prefill_available(q.device) if q.device.type == "cuda" and prefill else True
    if available is None:
        why.append("the CUDA prefill kernel's availability is probed with a device synchronisation, which a "
                   "CUDA-graph capture does not allow: run one prefill on this device before capturing")
    elif not available:
        props = torch.cuda.get_device_properties(q.device)
        why.append(f"the plan has {plan.max_q} queries per sequence, more than the decode kernel's {DECODE_MAX_Q}: "
                   f"the CUDA prefill kernel needs a Hopper GPU (compute capability 9.0) and an extension built for "
                   f"sm_90a (TORCH_CUDA_ARCH_LIST with 9.0a); {props.name} is {props.major}.{props.minor}")
    if q.device.type == "cuda" and not prefill:
        props = torch.cuda.get_device_properties(q.device)
        if props.major < 8:
            why.append(f"the decode kernel needs compute capability 8.0 or newer (tensor-core mma, cp.async), "
                       f"{props.name} is {props.major}.{props.minor}")
        optin = getattr(props, "shared_memory_per_block_optin", None)
        need = DECODE_SMEM.get(q.shape[-1])
        if optin and need and need > optin:
            why.append(f"head_dim {q.shape[-1]} needs {need} bytes of shared memory per block, "
                       f"{props.name} allows {optin}")
    return why


_PREFILL_AVAILABLE: dict[int, bool] = {}


def _prefill_available(device: torch.device) -> bool | None:
    """Whether the Hopper prefill kernel runs on ``device``; None when that cannot be probed now (the
    probe synchronises: not during a CUDA-graph capture; run one prefill eagerly first). Cached once
    known."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _PREFILL_AVAILABLE:
        if torch.cuda.is_current_stream_capturing():
            return None
        answer = int(_C.prefill_sm90_available(index))
        if answer < 0:
            return None
        _PREFILL_AVAILABLE[index] = answer == 1
    return _PREFILL_AVAILABLE[index]


def _tile_shape(head_dim: int, max_q_len: int, group: int = 1, itemsize: int = 2) -> tuple[int, int]:
    """Decode (at most 8 queries per sequence): one query tile per sequence (the next power of two >= its
    query count), 64-key tiles. Prefill: tiles of ``128 // group`` queries, so that a block's 128
    (query, head) rows cover the GQA group, or 16 queries when that would be 8 or fewer (always more
    than the decode kernel takes, which is how the extension tells the two plans apart); keys in tiles
    of the kernel's ``PREFILL_BLOCK_K`` (``itemsize``: the kernels run 16-bit floats only)."""
    if max_q_len <= DECODE_MAX_Q:
        bq = 1
        while bq < max(1, max_q_len):
            bq *= 2
        return bq, DECODE_BLOCK_K
    # groups of 15 and more: 16 queries, so that the rows fill whole blocks when the group is a power of 2
    fill = PREFILL_ROWS // max(1, group)
    return (fill if fill > DECODE_MAX_Q else 2 * DECODE_MAX_Q), PREFILL_BLOCK_K.get(head_dim, 64)


@register("rerotate_", "cuda", reasons=_pool_reasons)
def rerotate_(k_cache, slots, table_idx, cos, sin, rotary_dim, interleaved):
    _C.rerotate_(k_cache, slots, table_idx, cos, sin, rotary_dim, interleaved)


@register("compose_copy_", "cuda", reasons=_pool_reasons)
def compose_copy_(k_cache, v_cache, src_slots, dst_slots, table_idx, cos, sin, rotary_dim, interleaved):
    _C.compose_copy_(k_cache, v_cache, src_slots, dst_slots, table_idx, cos, sin, rotary_dim, interleaved)


@register("merge_states", "cuda", reasons=_merge_reasons)
def merge_states(v_a, s_a, v_b, s_b):
    return _C.merge_states(v_a, s_a, v_b, s_b)


@register("segment_attention", "cuda", reasons=_attention_reasons, tile_shape=_tile_shape)
def segment_attention(q, k_cache, v_cache, block_table, kv_lens, qo_indptr, token_seg, ancestors, q_token, token_pos,
                      work_seq, work_qtile, kt_indptr, kt_index, kt_full, kt_order, n_full, block_q, block_k, sm_scale,
                      softcap, window):
    # both CUDA kernels read the tiles in ascending order with their full flags (not kt_order / n_full);
    # block_q > DECODE_MAX_Q (a prefill tile map, _tile_shape) selects the Hopper prefill kernel
    return _C.segment_attention(q, k_cache, v_cache, block_table, kv_lens, qo_indptr, token_seg.contiguous(),
                                ancestors, q_token, token_pos.contiguous(), work_seq, work_qtile, kt_indptr, kt_index,
                                kt_full, block_q, block_k, sm_scale, softcap, window)
