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

from kvfuse._checks import (
    ANY_FLOAT,
    check_disjoint,
    check_in_range,
    check_int,
    check_same_pool,
    check_tensor,
    check_unique,
)
from kvfuse.attention import AttentionPlan, AttentionSpec, attention, plan
from kvfuse.dispatch import choose
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
         segments: SegmentGraph | list[SegmentGraph] | AttentionPlan | None = None, softcap: float = 0.0,
         backend: str | None = None) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` with kvfuse's segment attention underneath.

    Same arguments and result as torch's SDPA: ``query`` ``[B, Hq, L, D]``, ``key``/``value``
    ``[B, Hkv, S, D]`` (``Hkv == Hq``, or ``Hq % Hkv == 0`` with ``enable_gqa=True``), ``is_causal``
    top-left aligned (query i sees keys ``j <= i``), ``attn_mask`` bool (True = attend) or additive
    float, ``scale`` default ``1/sqrt(D)``; returns ``[B, Hq, L, D]`` in query's dtype. Nothing is
    modified in place.

    kvfuse runs it when the mask is a segment mask: ``is_causal`` with ``L <= S``, no mask with
    ``L == 1``, a bool mask equal to the bottom-right causal mask (``tril(S - L)``), or ``segments``.
    Everything else (other masks, ``dropout_p > 0``, inputs that need gradients, non-4D or empty
    inputs, and any call without ``segments`` inside ``torch.compile``) is handed to torch's SDPA
    unchanged. ``scale=0.0`` gives the uniform softmax over the
    keys each query sees (the mean of their values).

    Args:
        segments: (kvfuse extension) the mask as a `SegmentGraph` shared by every row, one graph per
            row, or an `AttentionPlan`: the keys are the composed sequence (``S`` tokens, or each
            graph's token count when shorter: the rest of a row is ignored) and the queries are its
            last ``L`` tokens. Exclusive with ``attn_mask`` and ``is_causal``.
        softcap: (kvfuse extension) attention-logit soft-capping, as Gemma 2: the scaled scores ``s``
            become ``softcap * tanh(s / softcap)`` before the mask and the softmax; 0 (default) is off.
            The torch fallback then computes the attention itself (torch's SDPA has no soft-cap).
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
            and query.numel() > 0 and key.numel() > 0
            and query.shape[-1] == key.shape[-1] and query.shape[0] == key.shape[0]
            and (query.shape[1] == key.shape[1] or (enable_gqa and query.shape[1] % key.shape[1] == 0))
            and query.dtype == key.dtype == value.dtype
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))))
    if segments is None and torch.compiler.is_compiling():
        fast = False  # planning reads host values: a compiled caller gets torch's SDPA (or the soft-cap fallback)
    if not fast:
        if segments is not None:
            raise ValueError("sdpa: segments needs non-empty 4D query/key/value of one dtype, equal head dims, "
                             "no gradients")
        return _torch_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, softcap)
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
        return _torch_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, softcap)
    if p is None:
        p = _uniform_plan(b, q_len, kv_len, str(query.device))
    if scale is not None and float(scale) == 0.0:  # every score is 0: zero queries at scale 1 say so exactly
        query, scale = torch.zeros_like(query), 1.0
    kc, n_pages = _dense_pool(key[:, :, :kv_len], _PAGE)
    vc, _ = _dense_pool(value[:, :, :kv_len], _PAGE)
    table = torch.arange(b * n_pages, dtype=torch.int32, device=query.device).view(b, n_pages)
    q = query.transpose(1, 2).reshape(b * q_len, hq, d)
    out = attention(q, kc, vc, table, p, sm_scale=scale, softcap=softcap, backend=backend)
    return out.view(b, q_len, hq, d).transpose(1, 2)


def _torch_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, softcap):
    """torch's SDPA, or with ``softcap`` the same computation written out (torch's has no soft-cap):
    scores in the inputs' dtype, capped, masked, softmax in float32, as transformers' eager attention; a
    query that sees no key gets a zero output, as from torch's SDPA (a left-padded row's first tokens
    under a sliding window: a NaN there would reach every token through the next layer's values)."""
    if not softcap:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    if not softcap > 0:
        raise ValueError(f"sdpa: softcap must be >= 0 (0: off), got {softcap!r}")
    L, S = query.shape[-2], key.shape[-2]
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
        value = value.repeat_interleave(query.shape[-3] // value.shape[-3], dim=-3)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    s = torch.matmul(query, key.transpose(-2, -1)) * scale
    s = softcap * torch.tanh(s / softcap)
    if is_causal:
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=s.device).tril(), float("-inf"))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    p = torch.softmax(s.float(), dim=-1)
    p = torch.where((s > float("-inf")).any(-1, keepdim=True), p, 0.0).to(query.dtype)
    if dropout_p:
        p = F.dropout(p, dropout_p)
    return torch.matmul(p, value)


def _flash_window(window_size, causal: bool, q_len: int) -> int | None:
    """flash-attn's ``window_size=(left, right)`` as kvfuse's window (``left + 1`` positions), where it
    can be: causal queries (or one query, which has no keys to its right) with any ``left``."""
    try:
        left, right = (int(w) for w in window_size)
    except (TypeError, ValueError):
        raise ValueError(f"flash_attn_with_kvcache: window_size must be a pair of ints (-1: unbounded), got "
                         f"{window_size!r}") from None
    if left < -1 or right < -1:
        raise ValueError(f"flash_attn_with_kvcache: window_size entries must be >= -1, got {window_size!r}")
    if (left, right) == (-1, -1) or ((causal or q_len == 1) and left == -1):
        return None
    if not (causal or q_len == 1):
        raise NotImplementedError("flash_attn_with_kvcache: a bounded window_size needs causal=True (or one query): "
                                  "kvfuse's sliding window bounds keys on the left only")
    return left + 1


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
            appending); with ``Lq > Lk`` the first ``Lq - Lk`` queries see no key. Not causal: every query
            sees all ``Lk`` keys. As in flash-attn, a query that sees no key gets a zero output and an
            LSE of +inf.
        return_softmax_lse: also return the float32 log-sum-exp ``[B, Hq, Lq]`` (natural log).
        window_size: ``(left, right)``, flash-attn's local attention: query i sees keys
            ``[i + Lk - Lq - left, i + Lk - Lq + right]``; -1 is unbounded. Supported with ``causal``
            (or one query): ``left`` becomes kvfuse's sliding window of ``left + 1`` positions
            (``NotImplementedError`` for a bounded window of non-causal queries).
        softcap: attention-logit soft-capping (``softcap * tanh(s / softcap)``); 0 is off.
        cache_leftpad, alibi_slopes: only their defaults are supported (``NotImplementedError``
            otherwise); num_splits is ignored.
    Returns:
        ``out`` ``[B, Lq, Hq, D]`` (q's dtype), or ``(out, lse)``. Every argument is checked before
        ``k``/``v`` are written.

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
    if cache_leftpad is not None or alibi_slopes is not None:
        raise NotImplementedError("flash_attn_with_kvcache: cache_leftpad and alibi_slopes "
                                  "are not supported by kvfuse")
    window = _flash_window(window_size, causal, q.shape[1] if isinstance(q, torch.Tensor) and q.dim() == 4 else 0)
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0 <= softcap < math.inf:
        raise ValueError(f"flash_attn_with_kvcache: softcap must be a finite float >= 0 (0: off), got {softcap!r}")
    if (k is None) != (v is None):
        raise ValueError("flash_attn_with_kvcache: pass both k and v, or neither")
    if rotary_cos is not None and k is None:
        raise ValueError("flash_attn_with_kvcache: rotary_cos/rotary_sin apply only when k and v are given")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("flash_attn_with_kvcache: pass both rotary_cos and rotary_sin, or neither")
    check_tensor("q", q, ndim=4, dtype=ANY_FLOAT)
    b, q_len, hq, d = q.shape
    dev = q.device
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, c, ndim=4, dtype=q.dtype, device=dev)
        if not c.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    check_same_pool("k_cache", k_cache, "v_cache", v_cache)
    hkv = k_cache.shape[2]
    if k_cache.shape[3] != d:
        raise ValueError(f"k_cache head_dim {k_cache.shape[3]} != q head_dim {d}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q heads ({hq}) must be a multiple of the cache's KV heads ({hkv})")
    n_new = 0
    if k is not None:
        check_disjoint("k_cache", k_cache, "v_cache", v_cache)
        check_tensor("k", k, ndim=4, dtype=ANY_FLOAT, device=dev)
        check_tensor("v", v, ndim=4, dtype=ANY_FLOAT, device=dev)
        n_new = k.shape[1]
        for name, t in (("k", k), ("v", v)):
            if t.shape != (b, n_new, hkv, d):
                raise ValueError(f"{name} must be [B={b}, Lnew, Hkv={hkv}, D={d}] with k's Lnew={n_new}, "
                                 f"got {list(t.shape)}")
    if block_table is not None:
        if cache_batch_idx is not None:
            raise ValueError("flash_attn_with_kvcache: cache_batch_idx cannot be used with block_table")
        check_tensor("block_table", block_table, ndim=2, dtype=(torch.int32, torch.int64), device=dev)
        if block_table.shape[0] != b:
            raise ValueError(f"block_table must have one row per batch row ({b}), got {block_table.shape[0]}")
        k_pool, v_pool, table = k_cache, v_cache, block_table.to(torch.int32)
        page = k_cache.shape[1]
        capacity = table.shape[1] * page
    else:
        s = k_cache.shape[1]
        page = _PAGE if s % _PAGE == 0 else s
        per_row = s // page
        k_pool = k_cache.view(k_cache.shape[0] * per_row, page, *k_cache.shape[2:])
        v_pool = v_cache.view(v_cache.shape[0] * per_row, page, *v_cache.shape[2:])
        if cache_batch_idx is None:
            if k_cache.shape[0] < b:
                raise ValueError(f"k_cache has {k_cache.shape[0]} rows for a batch of {b} (pass cache_batch_idx)")
            rows = torch.arange(b, device=dev)
        else:
            check_tensor("cache_batch_idx", cache_batch_idx, ndim=1, dtype=(torch.int32, torch.int64))
            if cache_batch_idx.numel() != b:
                raise ValueError(f"cache_batch_idx must have one entry per batch row ({b}), got "
                                 f"{cache_batch_idx.numel()}")
            check_in_range("cache_batch_idx", cache_batch_idx, 0, k_cache.shape[0], "cache rows")
            rows = cache_batch_idx.to(dev).long()
        table = (rows[:, None] * per_row + torch.arange(per_row, device=dev)).to(torch.int32)
        capacity = s
    if cache_seqlens is None:
        if k is not None:
            raise ValueError("flash_attn_with_kvcache: cache_seqlens is required to append k and v")
        seqlens = torch.full((b,), capacity, dtype=torch.int64, device=dev)
    elif isinstance(cache_seqlens, torch.Tensor):
        check_tensor("cache_seqlens", cache_seqlens, ndim=1, dtype=(torch.int32, torch.int64))
        if cache_seqlens.numel() != b:
            raise ValueError(f"cache_seqlens must have one entry per batch row ({b}), got {cache_seqlens.numel()}")
        check_in_range("cache_seqlens", cache_seqlens, 0, capacity + 1, "token counts")
        seqlens = cache_seqlens.to(dev).long()
    else:
        seqlens = torch.full((b,), check_int("cache_seqlens", cache_seqlens, lo=0), dtype=torch.int64, device=dev)
    kv_lens = seqlens + n_new
    lens = kv_lens.tolist()
    if max(lens, default=0) > capacity:
        raise ValueError(f"flash_attn_with_kvcache: a row needs {max(lens)} slots, the cache has {capacity}")
    if block_table is not None and b:
        used = torch.cat([table[i, : -(-n // page)] for i, n in enumerate(lens)])
        check_in_range("block_table", used, 0, k_cache.shape[0], "block ids")
    if rotary_cos is not None:
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            check_tensor(name, t, ndim=2, dtype=ANY_FLOAT, device=dev)
        if rotary_sin.shape != rotary_cos.shape or not 0 < 2 * rotary_cos.shape[1] <= d:
            raise ValueError(f"rotary_cos/rotary_sin must both be [seqlen_ro, rotary_dim / 2] with 0 < rotary_dim "
                             f"<= D={d}, got {list(rotary_cos.shape)} and {list(rotary_sin.shape)}")
        top = max([max(n, n - n_new + (q_len if causal else 1)) for n in lens], default=0)  # k's and q's positions
        if rotary_cos.shape[0] < top:
            raise ValueError(f"rotary_cos/rotary_sin have {rotary_cos.shape[0]} positions, the rotated tokens "
                             f"reach position {top - 1}")
    if softmax_scale is not None and (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, int | float)):
        raise TypeError(f"softmax_scale must be a float or None, got {softmax_scale!r}")

    # the queries that see at least one key (causal: the last min(Lq, Lk) of a row), as rows of a plan
    graphs, q_lens, t_rows, sel = [], [], [], []
    for r, n in enumerate(lens):
        if causal or q_len == 1:
            m = min(q_len, n)
            if m:
                graphs.append(SegmentGraph([Segment("s", n)]))
                q_lens.append(m)
                t_rows.append(r)
                sel += range(r * q_len + q_len - m, (r + 1) * q_len)
        elif n:  # every query sees every key: each query is the last token of its own copy of the row
            graphs += [SegmentGraph([Segment("s", n)])] * q_len
            q_lens += [1] * q_len
            t_rows += [r] * q_len
            sel += range(r * q_len, (r + 1) * q_len)
    p = plan(AttentionSpec(graphs, q_lens, device=dev)) if sel else None
    if p is not None:  # an explicit backend that cannot run raises here, before the cache is written
        choose("segment_attention", backend, q=q.reshape(b * q_len, hq, d), k_cache=k_pool, plan=p)

    if k is not None:
        new_pos = seqlens[:, None] + torch.arange(n_new, device=dev)  # [B, n_new]
        slots = (table.long().gather(1, new_pos // page) * page + new_pos % page).flatten()
        check_unique("the slots of k/v (rows that write into one cache block or row)", slots, "slots")
        if rotary_cos is not None:
            k = _rotate_at(k, new_pos, rotary_cos, rotary_sin, rotary_interleaved)
            q_pos = seqlens[:, None] + (torch.arange(q_len, device=dev) if causal else torch.zeros(q_len, device=dev,
                                                                                                 dtype=torch.long))
            q = _rotate_at(q, q_pos, rotary_cos, rotary_sin, rotary_interleaved)
        # everything is checked: write the new tokens
        k_pool.view(-1, *k_pool.shape[2:])[slots] = k.reshape(-1, *k.shape[2:]).to(k_pool.dtype)
        v_pool.view(-1, *v_pool.shape[2:])[slots] = v.reshape(-1, *v.shape[2:]).to(v_pool.dtype)

    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    qq = q.reshape(b * q_len, hq, d)
    if scale == 0.0:  # every score is 0: zero queries at scale 1 say so exactly
        qq, scale = torch.zeros_like(qq), 1.0
    every = len(sel) == b * q_len
    out = qq.new_zeros(b * q_len, hq, d)
    lse = torch.full((b * q_len, hq), math.inf, dtype=torch.float32, device=dev)
    if p is not None:
        idx = torch.tensor(sel, device=dev)
        tt = table if t_rows == list(range(b)) else table[torch.tensor(t_rows, device=dev)]
        o, lse_sel = attention((qq if every else qq[idx]).contiguous(), k_pool, v_pool, tt.contiguous(), p,
                               sm_scale=scale, softcap=float(softcap), window=window, return_lse=True,
                               backend=backend)
        if every:
            out, lse = o, lse_sel
        else:
            out[idx], lse[idx] = o, lse_sel
    out = out.view(b, q_len, hq, d)
    if return_softmax_lse:
        return out, lse.view(b, q_len, hq).transpose(1, 2)
    return out
