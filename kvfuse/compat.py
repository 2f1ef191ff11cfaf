"""Drop-in signatures: torch's ``scaled_dot_product_attention`` and flash-attn's ``flash_attn_with_kvcache``.

Both run `kvfuse.attention` underneath whenever the requested mask is a segment mask (causal, full
attention of one query, or an explicit `SegmentGraph`), and keep the original library's argument
names, shapes and semantics. `sdpa` hands anything else (an arbitrary mask, dropout, gradients,
non-4D inputs) to ``torch.nn.functional.scaled_dot_product_attention`` itself, so it is always
correct; `flash_attn_with_kvcache` raises ``NotImplementedError`` for the options it does not cover.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from kvfuse.attention import AttentionPlan, AttentionSpec, attention, plan
from kvfuse.reference.rope import rotate
from kvfuse.segments import Segment, SegmentGraph

__all__ = ["sdpa", "flash_attn_with_kvcache"]

_PAGE = 16


@functools.lru_cache(maxsize=64)
def _uniform_plan(batch: int, q_len: int, kv_len: int, device: str) -> AttentionPlan:
    """Plan of ``batch`` rows of one causal segment of ``kv_len`` tokens whose last ``q_len`` are queries."""
    g = SegmentGraph([Segment("s", kv_len)])
    return plan(AttentionSpec([g] * batch, [q_len] * batch, device=device))


def _dense_pool(x: torch.Tensor, page: int) -> tuple[torch.Tensor, int]:
    """``[B, H, S, D]`` -> pool ``[B * ceil(S / page), page, H, D]`` (a copy, zero-padded); pages per row."""
    b, h, s, d = x.shape
    n = -(-s // page)
    pool = x.new_zeros(b, n * page, h, d)
    pool[:, :s] = x.transpose(1, 2)
    return pool.view(b * n, page, h, d), n


def _is_bottom_right_causal(mask: torch.Tensor, q_len: int, kv_len: int) -> bool:
    if mask.dtype != torch.bool or mask.shape[-2:] != (q_len, kv_len):
        return False
    want = torch.ones(q_len, kv_len, dtype=torch.bool, device=mask.device).tril(kv_len - q_len)
    return bool((mask == want).all())


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
         dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False, *,
         segments: SegmentGraph | list[SegmentGraph] | AttentionPlan | None = None,
         backend: str | None = None) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` with kvfuse's segment attention underneath.

    Same arguments and result as torch's SDPA: ``query`` ``[B, Hq, L, D]``, ``key``/``value``
    ``[B, Hkv, S, D]`` (``Hkv == Hq``, or ``Hq % Hkv == 0`` with ``enable_gqa=True``), ``is_causal``
    top-left aligned (query i sees keys ``j <= i``), ``attn_mask`` bool (True = attend) or additive
    float, ``scale`` default ``1/sqrt(D)``; returns ``[B, Hq, L, D]`` in query's dtype. Nothing is
    modified in place.

    kvfuse runs it when the mask is a segment mask: ``is_causal`` with ``L <= S``, no mask with
    ``L == 1``, a bool mask equal to the bottom-right causal mask (``tril(S - L)``), or ``segments``.
    Everything else (other masks, ``dropout_p > 0``, inputs that need gradients, non-4D inputs) is
    handed to torch's SDPA unchanged.

    Args:
        segments: (kvfuse extension) the mask as a `SegmentGraph` shared by every row, one graph per
            row, or an `AttentionPlan`: the keys are the composed sequence (``S`` tokens, or each
            graph's token count when shorter: the rest of a row is ignored) and the queries are its
            last ``L`` tokens. Exclusive with ``attn_mask`` and ``is_causal``.
        backend: kvfuse backend ("auto", "cuda", "triton", "torch").

    Example:
        >>> import torch, kvfuse
        >>> q, k, v = torch.randn(3, 2, 4, 10, 16).unbind(0)
        >>> out = kvfuse.sdpa(q, k, v, is_causal=True)
        >>> torch.allclose(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5)
        True
    """
    if segments is not None:
        if attn_mask is not None or is_causal:
            raise ValueError("sdpa: segments replaces attn_mask and is_causal; pass only one of them")
        if dropout_p:
            raise ValueError("sdpa: dropout is not supported with segments")
    fast = (dropout_p == 0.0 and query.dim() == 4 and key.dim() == 4 and value.shape == key.shape
            and query.shape[-1] == key.shape[-1] and query.shape[0] == key.shape[0]
            and (query.shape[1] == key.shape[1] or (enable_gqa and query.shape[1] % key.shape[1] == 0))
            and query.dtype == key.dtype == value.dtype
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))))
    if not fast:
        if segments is not None:
            raise ValueError("sdpa: segments needs 4D query/key/value of one dtype, equal head dims, no gradients")
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    b, hq, q_len, d = query.shape
    kv_len = key.shape[2]
    p = None
    if segments is not None:
        if isinstance(segments, AttentionPlan):
            p = segments
        else:
            graphs = [segments] * b if isinstance(segments, SegmentGraph) else list(segments)
            if len(graphs) != b or any(g.num_tokens > kv_len for g in graphs):
                raise ValueError(f"sdpa: segments needs one graph (or one per row, {b}) of at most S={kv_len} tokens")
            p = plan(AttentionSpec(graphs, [q_len] * b, device=query.device))
        if p.batch_size != b or any(ql != q_len for ql in p.q_lens) or p.max_kv > kv_len:
            raise ValueError(f"sdpa: the plan does not fit B={b}, L={q_len}, S={kv_len}")
    elif attn_mask is None and is_causal and q_len <= kv_len:
        kv_len = q_len  # top-left causal: keys past the last query are never seen
    elif attn_mask is None and not is_causal and q_len == 1:
        pass
    elif attn_mask is not None and not is_causal and q_len <= kv_len and _is_bottom_right_causal(attn_mask, q_len,
                                                                                                  kv_len):
        pass
    else:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    if p is None:
        p = _uniform_plan(b, q_len, kv_len, str(query.device))
    kc, n_pages = _dense_pool(key[:, :, :kv_len], _PAGE)
    vc, _ = _dense_pool(value[:, :, :kv_len], _PAGE)
    table = torch.arange(b * n_pages, dtype=torch.int32, device=query.device).view(b, n_pages)
    q = query.transpose(1, 2).reshape(b * q_len, hq, d)
    out = attention(q, kc, vc, table, p, sm_scale=scale, backend=backend)
    return out.view(b, q_len, hq, d).transpose(1, 2)


def _rotate_at(x: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool):
    """Rotate ``x`` ``[B, n, H, D]`` at integer positions ``pos`` ``[B, n]`` with flash-attn tables."""
    c, s = cos[pos.long()], sin[pos.long()]
    return rotate(x, c, s, 2 * cos.shape[-1], interleaved).to(x.dtype)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False,
                            *, backend: str | None = None):
    """flash-attn's ``flash_attn_with_kvcache``, computed by `kvfuse.attention`.

    Args (flash-attn's names and semantics):
        q: ``[B, Lq, Hq, D]``.
        k_cache, v_cache: ``[B_cache, S, Hkv, D]``, or paged ``[num_blocks, block_size, Hkv, D]`` with
            ``block_table``. **Modified in place** when ``k``/``v`` are given.
        k, v: ``[B, Lnew, Hkv, D]`` new tokens, written at positions ``cache_seqlens[b] ...`` of each
            row (after rotary, if given).
        rotary_cos, rotary_sin: ``[seqlen_ro, rotary_dim / 2]``; only with ``k``/``v``: rotate ``k`` at
            ``cache_seqlens + i`` and ``q`` at ``cache_seqlens + i`` (causal) or at ``cache_seqlens`` (not
            causal); ``rotary_interleaved`` True = GPT-J pairs ``(2i, 2i+1)``, False = NeoX halves.
        cache_seqlens: int or int32 ``[B]``: tokens in each row's cache before appending (default: all).
        cache_batch_idx: int ``[B]``: which cache row each batch row uses (non-paged only).
        block_table: int32 ``[B, max_blocks]``.
        softmax_scale: default ``1/sqrt(D)``.
        causal: bottom-right aligned: query i sees keys ``j <= i + Lk - Lq`` (``Lk`` = row's length after
            appending). Not causal: every query sees all ``Lk`` keys.
        return_softmax_lse: also return the float32 log-sum-exp ``[B, Hq, Lq]`` (natural log).
        cache_leftpad, window_size, softcap, alibi_slopes: only their defaults are supported
            (``NotImplementedError`` otherwise); num_splits is ignored.
    Returns:
        ``out`` ``[B, Lq, Hq, D]`` (q's dtype), or ``(out, lse)``.

    Example:
        >>> import torch, kvfuse
        >>> kc, vc = torch.randn(2, 4, 16, 1, 32).unbind(0)       # 4 blocks of 16, 1 KV head
        >>> table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
        >>> q, k, v = torch.randn(2, 1, 4, 32), torch.randn(2, 1, 1, 32), torch.randn(2, 1, 1, 32)
        >>> seqlens = torch.tensor([5, 20], dtype=torch.int32)
        >>> out = kvfuse.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=seqlens, block_table=table)
        >>> out.shape                                             # k/v were written at 5 and 20
        torch.Size([2, 1, 4, 32])
    """
    if cache_leftpad is not None or tuple(window_size) != (-1, -1) or softcap or alibi_slopes is not None:
        raise NotImplementedError("flash_attn_with_kvcache: cache_leftpad, window_size, softcap and alibi_slopes "
                                  "are not supported by kvfuse")
    if (k is None) != (v is None):
        raise ValueError("flash_attn_with_kvcache: pass both k and v, or neither")
    if rotary_cos is not None and k is None:
        raise ValueError("flash_attn_with_kvcache: rotary_cos/rotary_sin apply only when k and v are given")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("flash_attn_with_kvcache: pass both rotary_cos and rotary_sin, or neither")
    b, q_len, hq, d = q.shape
    dev = q.device
    if block_table is not None:
        if cache_batch_idx is not None:
            raise ValueError("flash_attn_with_kvcache: cache_batch_idx cannot be used with block_table")
        k_pool, v_pool, table = k_cache, v_cache, block_table.to(torch.int32)
        page = k_cache.shape[1]
        capacity = table.shape[1] * page
    else:
        s = k_cache.shape[1]
        page = _PAGE if s % _PAGE == 0 else s
        per_row = s // page
        k_pool = k_cache.view(k_cache.shape[0] * per_row, page, *k_cache.shape[2:])
        v_pool = v_cache.view(v_cache.shape[0] * per_row, page, *v_cache.shape[2:])
        rows = (torch.arange(b, device=dev) if cache_batch_idx is None else cache_batch_idx.to(dev).long())
        table = (rows[:, None] * per_row + torch.arange(per_row, device=dev)).to(torch.int32)
        capacity = s
    if cache_seqlens is None:
        if k is not None:
            raise ValueError("flash_attn_with_kvcache: cache_seqlens is required to append k and v")
        seqlens = torch.full((b,), capacity, dtype=torch.int64, device=dev)
    elif isinstance(cache_seqlens, int):
        seqlens = torch.full((b,), cache_seqlens, dtype=torch.int64, device=dev)
    else:
        seqlens = cache_seqlens.to(dev).long()
    n_new = 0 if k is None else k.shape[1]
    kv_lens = seqlens + n_new
    if int(kv_lens.max()) > capacity:
        raise ValueError(f"flash_attn_with_kvcache: a row needs {int(kv_lens.max())} slots, the cache has {capacity}")
    if causal and int(kv_lens.min()) < q_len:
        raise ValueError("flash_attn_with_kvcache: causal attention needs at least Lq keys in every row")

    if k is not None:
        new_pos = seqlens[:, None] + torch.arange(n_new, device=dev)  # [B, n_new]
        if rotary_cos is not None:
            k = _rotate_at(k, new_pos, rotary_cos, rotary_sin, rotary_interleaved)
            q_pos = seqlens[:, None] + (torch.arange(q_len, device=dev) if causal else torch.zeros(q_len, device=dev,
                                                                                                 dtype=torch.long))
            q = _rotate_at(q, q_pos, rotary_cos, rotary_sin, rotary_interleaved)
        slots = (table.long().gather(1, new_pos // page) * page + new_pos % page).flatten()
        k_pool.view(-1, *k_pool.shape[2:])[slots] = k.reshape(-1, *k.shape[2:]).to(k_pool.dtype)
        v_pool.view(-1, *v_pool.shape[2:])[slots] = v.reshape(-1, *v.shape[2:]).to(v_pool.dtype)

    lens = kv_lens.tolist()
    if causal or q_len == 1:
        graphs = [SegmentGraph([Segment("s", n)]) for n in lens]
        p = plan(AttentionSpec(graphs, [q_len] * b, device=dev))
        qq, tt = q.reshape(b * q_len, hq, d), table
    else:  # every query sees every key: each query is the last token of its own copy of the row
        graphs = [SegmentGraph([Segment("s", n)]) for n in lens for _ in range(q_len)]
        p = plan(AttentionSpec(graphs, [1] * (b * q_len), device=dev))
        qq, tt = q.reshape(b * q_len, hq, d), table.repeat_interleave(q_len, 0)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    out, lse = attention(qq.contiguous(), k_pool, v_pool, tt.contiguous(), p, sm_scale=scale, return_lse=True,
                         backend=backend)
    out = out.view(b, q_len, hq, d)
    if return_softmax_lse:
        return out, lse.view(b, q_len, hq).transpose(1, 2)
    return out
