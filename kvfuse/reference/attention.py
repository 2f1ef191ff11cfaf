"""Reference segment-masked attention over a paged pool (prefill and decode are the same code)."""

from __future__ import annotations

import torch

from kvfuse.paged import gather_kv


def segment_attention(q, k_cache, v_cache, block_table, kv_lens, qo_indptr, token_seg, ancestors, sm_scale, *,
                      q_token=None, token_pos=None, window=None, softcap=0.0):
    """Masked attention of each sequence's queries over its paged keys.

    q: ``[total_q, Hq, D]``, queries of sequence b are rows ``qo_indptr[b]:qo_indptr[b+1]``: the tokens
    ``q_token[rows]`` of the sequence, or (``q_token=None``) its *last* ``q_len`` tokens (their K/V are
    already in the pool). k_cache/v_cache: ``[P, page_size, Hkv, D]``; block_table: int
    ``[B, max_pages]``; kv_lens: int ``[B]``; token_seg: int ``[B, max_kv]`` segment of every token;
    ancestors: bool ``[B, S, S]``; token_pos: int ``[B, max_kv]`` positions (needed with ``window``).
    Query token i sees key token j iff ``ancestors[seg_i, seg_j]`` or (same segment and j <= i), and
    with a ``window``, ``pos_i - pos_j < window``. Scores are ``sm_scale * q.k``, soft-capped to
    ``softcap * tanh(s / softcap)`` when ``softcap > 0``.

    Returns ``(out [total_q, Hq, D] in q.dtype, lse [total_q, Hq] float32, natural log)``. A query
    that sees nothing gets out = 0 and lse = -inf. Math in float32 (float64 for float64 inputs).
    """
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    total_q, hq, _ = q.shape
    hkv = k_cache.shape[-2]
    out = torch.zeros(total_q, hq, q.shape[-1], dtype=cdt, device=q.device)
    lse = torch.full((total_q, hq), float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(block_table.shape[0]):
        q0, q1 = int(qo_indptr[b]), int(qo_indptr[b + 1])
        n = int(kv_lens[b])
        if q1 == q0 or n == 0:
            continue
        k = gather_kv(k_cache, block_table[b], n).to(cdt).repeat_interleave(hq // hkv, dim=1)
        v = gather_kv(v_cache, block_table[b], n).to(cdt).repeat_interleave(hq // hkv, dim=1)
        if q_token is None:
            qtok = torch.arange(n - (q1 - q0), n, device=q.device)
        else:
            qtok = q_token[q0:q1].to(q.device).long()
        ktok = torch.arange(n, device=q.device)
        seg = token_seg[b, :n].long()
        qs, ks = seg[qtok], seg[ktok]
        causal = (qs[:, None] == ks[None, :]) & (ktok[None] <= qtok[:, None])
        mask = ancestors[b].bool()[qs[:, None], ks[None, :]] | causal
        if window is not None:
            pos = token_pos[b, :n].long()
            mask &= (pos[qtok][:, None] - pos[None, :]) < window
        scores = torch.einsum("qhd,khd->hqk", q[q0:q1].to(cdt), k) * sm_scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        scores = scores.masked_fill(~mask[None], float("-inf"))
        m = scores.amax(-1, keepdim=True)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        p = torch.exp(scores - m)
        denom = p.sum(-1, keepdim=True)
        o = torch.einsum("hqk,khd->qhd", p / torch.where(denom > 0, denom, 1), v)
        out[q0:q1] = o
        lse[q0:q1] = (m + torch.log(denom)).squeeze(-1).transpose(0, 1).float()
    return out.to(q.dtype), lse
