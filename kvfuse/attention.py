"""Block-sparse segment attention over a paged pool: ``plan()`` once, ``attention()`` per layer/step."""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Sequence

import torch

from kvfuse import _ops
from kvfuse._checks import check_in_range, check_tensor
from kvfuse.dispatch import choose, meta
from kvfuse.paged import to_device_async
from kvfuse.segments import SegmentGraph

LOG2E = 1.4426950408889634
EMPTY, FULL, PARTIAL = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """What a plan is computed from.

    graphs: one `SegmentGraph` per sequence (a list; its total tokens = the sequence's KV length;
        its segments' positions are the tokens' RoPE positions, read by a sliding window).
    q_lens: queries per sequence; they are the sequence's *last* ``q_len`` tokens (their K/V are in
        the pool already). ``None`` means every token (prefill).
    q_tokens: instead of ``q_lens``, the token indices of each sequence's queries (strictly
        increasing ints in ``[0, kv_len)``; a list or an int tensor per sequence): queries anywhere in
        the sequence, e.g. tokens whose K/V are recomputed in place.
    device: where the plan's tensors live (the device of q and the pools).
    """

    graphs: Sequence[SegmentGraph]
    q_lens: Sequence[int] | None = None
    device: str | torch.device = "cpu"
    q_tokens: Sequence[Sequence[int] | torch.Tensor] | None = None


@dataclasses.dataclass
class TileMap:
    """Non-empty (query tile, key tile) pairs of a plan, in CSR form over work items.

    A work item is one query tile of one sequence (``work_seq``, ``work_qtile``); its key tiles are
    ``kt_index[kt_indptr[w]:kt_indptr[w+1]]``, ascending, with ``kt_full`` 1 where the whole tile is
    visible (no element mask needed) and 0 where it is partial. ``kt_order`` lists the same tiles of
    each work item with its ``n_full[w]`` full ones first (a full tile that runs past the sequence's
    end counts as partial there), for kernels that run one branch-free loop over the full tiles and
    one masked loop over the rest.
    """

    block_q: int
    block_k: int
    work_seq: torch.Tensor
    work_qtile: torch.Tensor
    kt_indptr: torch.Tensor
    kt_index: torch.Tensor
    kt_full: torch.Tensor
    kt_order: torch.Tensor
    n_full: torch.Tensor
    kinds: list  # per sequence: int8 [num_qtiles, num_ktiles] of EMPTY / FULL / PARTIAL (CPU)


def _device(value) -> torch.device:
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"AttentionSpec.device must name a torch device ('cpu', 'cuda', 'cuda:1'), got {value!r}") \
            from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"AttentionSpec.device={value!r}, but this torch has no usable CUDA device "
                             f"(torch.cuda.is_available() is False)")
        if dev.index is None:  # "cuda" means the current device, as for tensors
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _query_spec(spec: AttentionSpec, graphs: list[SegmentGraph]) -> list:
    """Per sequence: an int (its last ``q_len`` tokens) or a tuple of token indices."""
    kv = [g.num_tokens for g in graphs]
    if spec.q_tokens is not None:
        if spec.q_lens is not None:
            raise ValueError("AttentionSpec: give q_lens or q_tokens, not both")
        if isinstance(spec.q_tokens, torch.Tensor) or not isinstance(spec.q_tokens, (list, tuple)):
            raise TypeError(f"AttentionSpec.q_tokens must be a list with one list/tensor of token indices per "
                            f"graph, got {type(spec.q_tokens).__name__}")
        if len(spec.q_tokens) != len(graphs):
            raise ValueError(f"AttentionSpec.q_tokens needs one entry per graph ({len(graphs)}), "
                             f"got {len(spec.q_tokens)}")
        out = []
        for i, (t, n) in enumerate(zip(spec.q_tokens, kv)):
            if isinstance(t, torch.Tensor):
                if t.dim() != 1 or t.dtype not in (torch.int32, torch.int64):
                    raise TypeError(f"AttentionSpec.q_tokens[{i}] must be a 1-D int tensor, got {t.dtype} "
                                    f"{tuple(t.shape)}")
                t = t.tolist()
            elif not isinstance(t, (list, tuple)) or not all(_is_int(x) for x in t):
                raise TypeError(f"AttentionSpec.q_tokens[{i}] must be a list of ints, got {t!r:.80}")
            t = tuple(t)
            if any(b <= a for a, b in zip(t, t[1:])) or (t and not (0 <= t[0] and t[-1] < n)):
                raise ValueError(f"AttentionSpec.q_tokens[{i}] must be strictly increasing token indices in "
                                 f"[0, kv_len={n})")
            out.append(t)
        return out
    if spec.q_lens is None:
        return kv
    if isinstance(spec.q_lens, (int, torch.Tensor)) or not isinstance(spec.q_lens, (list, tuple)):
        raise TypeError(f"AttentionSpec.q_lens must be a list of ints (one per graph), got {spec.q_lens!r:.80}")
    if any(not _is_int(x) for x in spec.q_lens):
        raise TypeError(f"AttentionSpec.q_lens must be ints, got {list(spec.q_lens)!r:.80}")
    if len(spec.q_lens) != len(graphs):
        raise ValueError(f"AttentionSpec.q_lens needs one entry per graph ({len(graphs)}), got {len(spec.q_lens)}")
    for i, (ql, n) in enumerate(zip(spec.q_lens, kv)):
        if not 0 <= ql <= n:
            raise ValueError(f"AttentionSpec.q_lens[{i}]={ql} must lie in [0, kv_len={n}]")
    return list(spec.q_lens)


def _query_tokens(qs, n: int) -> torch.Tensor:
    """int64 token indices of a query spec (an int q_len or a tuple of indices)."""
    return torch.arange(n - qs, n) if isinstance(qs, int) else torch.tensor(qs, dtype=torch.int64)


class AttentionPlan:
    """Segment metadata of a batch, computed once and reused by every layer (and step).

    Tensors (on ``spec.device``): ``qo_indptr`` int32 [B+1], ``kv_lens`` int32 [B], ``token_seg``
    int32 [B, max_kv] (segment of each token, -1 past the end), ``ancestors`` uint8 [B, S, S],
    ``q_token`` int32 [total_q] (token index of each query row), ``token_pos`` int32 [B, max_kv]
    (RoPE position of each token). ``tiles(block_q, block_k, window)`` classifies every tile as
    empty / full / partial (cached).

    Sequences whose graphs have the same shape (segment lengths, parents, positions; names do not
    matter) and the same queries -- sibling threads decoding in lockstep -- are described once: one
    classification, one row of metadata gathered per sequence on the device; everything reaches the
    device in one pinned, non-blocking copy (no host synchronisation).
    """

    def __init__(self, spec: AttentionSpec):
        if not isinstance(spec, AttentionSpec):
            raise TypeError(f"plan() takes a kvfuse.AttentionSpec, got {type(spec).__name__}")
        if isinstance(spec.graphs, SegmentGraph):
            raise TypeError("AttentionSpec.graphs must be a list of SegmentGraph (one per sequence), got one "
                            "SegmentGraph: write AttentionSpec([graph])")
        if not isinstance(spec.graphs, (list, tuple)):
            raise TypeError(f"AttentionSpec.graphs must be a list of SegmentGraph, got {type(spec.graphs).__name__}")
        graphs = list(spec.graphs)
        if not graphs:
            raise ValueError("AttentionSpec.graphs must not be empty")
        for i, g in enumerate(graphs):
            if not isinstance(g, SegmentGraph):
                raise TypeError(f"AttentionSpec.graphs[{i}] must be a SegmentGraph, got {type(g).__name__}")
        queries = _query_spec(spec, graphs)
        dev = _device(spec.device)
        self.graphs, self.device = graphs, dev
        kv = [g.num_tokens for g in graphs]
        q_lens = [q if isinstance(q, int) else len(q) for q in queries]
        self.q_lens, self.kv_lens_list = q_lens, kv
        self._queries = queries
        self.batch_size, self.total_q, self.max_kv, self.max_q = len(graphs), sum(q_lens), max(kv), max(q_lens)
        # rows of one shape share a class: its graph, queries, metadata rows and tile classification
        keys, classes, row_class = {}, [], []
        for g, qs in zip(graphs, queries):
            c = keys.setdefault((g.shape_key, qs), len(classes))
            if c == len(classes):
                classes.append((g, qs))
            row_class.append(c)
        self._classes, self._row_class = classes, row_class
        B, C = len(graphs), len(classes)
        S = max(g.num_segments for g, _ in classes)
        W = max(self.max_kv, 1)
        anc = torch.zeros(C, S, S, dtype=torch.int32)
        seg = torch.full((C, W), -1, dtype=torch.int32)
        pos = torch.zeros(C, W, dtype=torch.int32)
        for c, (g, _) in enumerate(classes):
            anc[c, : g.num_segments, : g.num_segments] = g.ancestors.to(torch.int32)
            seg[c, : g.num_tokens] = g.token_segments()
            pos[c, : g.num_tokens] = g.token_positions().to(torch.int32)
        qo = torch.zeros(B + 1, dtype=torch.int32)
        qo[1:] = torch.tensor(q_lens, dtype=torch.int32).cumsum(0)
        class_q = [_query_tokens(qs, g.num_tokens).to(torch.int32) for g, qs in classes]
        q_tok = torch.cat([class_q[c] for c in row_class]) if self.total_q else torch.empty(0, dtype=torch.int32)
        # one int32 host buffer, one copy: qo_indptr | kv_lens | row class | q_token | ancestors | token_seg | pos
        host = torch.cat([qo, torch.tensor(kv + row_class, dtype=torch.int32), q_tok, anc.flatten(), seg.flatten(),
                          pos.flatten()])
        buf = to_device_async(host, dev)
        qo, kv_d, rc, q_tok, anc, seg, pos = torch.split(
            buf, (B + 1, B, B, q_tok.numel(), anc.numel(), seg.numel(), pos.numel()))
        self.qo_indptr, self.kv_lens, self.q_token = qo, kv_d, q_tok
        if C == 1:
            self.ancestors = anc.view(1, S, S).expand(B, S, S).to(torch.uint8)
            self.token_seg, self.token_pos = seg.view(1, W).expand(B, W), pos.view(1, W).expand(B, W)
        else:
            rc = rc.long()
            self.ancestors = anc.view(C, S, S)[rc].to(torch.uint8)
            self.token_seg, self.token_pos = seg.view(C, W)[rc], pos.view(C, W)[rc]
        self.token_seg, self.token_pos = self.token_seg.contiguous(), self.token_pos.contiguous()
        self._tiles: dict = {}

    def check_block_table(self, block_table: torch.Tensor, k_cache: torch.Tensor) -> None:
        """Raise ``ValueError`` unless every page id this plan's sequences use (``block_table`` int32
        ``[B, max_pages]``) lies in the pool ``k_cache`` (``[num_pages, page_size, ...]``). Checked once per
        (block table, its version, pool size): `attention` calls it for every layer of a step, and each
        check costs a device round trip. Tensors made under ``torch.inference_mode`` have no version
        counter: they are checked at every call."""
        num_pages, page_size = k_cache.shape[-4], k_cache.shape[-3]
        try:
            version = block_table._version
        except RuntimeError:
            version = None
        seen = getattr(self, "_checked_table", None)
        if version is not None and seen is not None and seen[0]() is block_table and seen[1:] == (version, num_pages):
            return
        used = torch.cat([block_table[b, : -(-n // page_size)] for b, n in enumerate(self.kv_lens_list)])
        check_in_range("block_table", used, 0, num_pages, "page ids")
        if version is not None:
            self._checked_table = (weakref.ref(block_table), version, num_pages)

    def visible_pairs(self, window: int | None = None) -> int:
        """(query, key) pairs that are visible: the work of the attention, for FLOP counts."""
        per_class = [g.visible_pairs(q_tokens=_query_tokens(qs, g.num_tokens), window=window)
                     for g, qs in self._classes]
        return sum(per_class[c] for c in self._row_class)

    def tiles(self, block_q: int, block_k: int, window: int | None = None) -> TileMap:
        """The tile map for ``block_q`` x ``block_k`` tiles (and a sliding ``window``), cached."""
        key = (block_q, block_k, window)
        if key not in self._tiles:
            self._tiles[key] = self._tile_map(block_q, block_k, window)
        return self._tiles[key]

    def _tile_map(self, bq: int, bk: int, window: int | None) -> TileMap:
        per_class = []
        for g, qs in self._classes:
            k = _classify(g, qs, bq, bk, window)
            nz = k != EMPTY
            idx = torch.nonzero(nz)[:, 1]
            full = k[nz] == FULL
            # full-first order within each query tile: a full tile past the sequence's end is masked there
            clean = full & ((idx + 1) * bk <= g.num_tokens)
            qt = torch.nonzero(nz)[:, 0]
            order = torch.sort(qt * 2 + (~clean).long(), stable=True).indices
            n_full = torch.zeros(k.shape[0], dtype=torch.int32).index_add_(0, qt, clean.to(torch.int32))
            per_class.append((k, nz.sum(1).to(torch.int32), idx.to(torch.int32), full.to(torch.int32),
                              idx[order].to(torch.int32), n_full))
        ws, wq, counts, idx, full, order, n_full, kinds = ([] for _ in range(8))
        for b, c in enumerate(self._row_class):
            k, cnt, ix, fl, od, nf = per_class[c]
            ws.append(torch.full((k.shape[0],), b, dtype=torch.int32))
            wq.append(torch.arange(k.shape[0], dtype=torch.int32))
            for out, x in ((counts, cnt), (idx, ix), (full, fl), (order, od), (n_full, nf)):
                out.append(x)
            kinds.append(k)
        ws, wq, counts, idx, full, order, n_full = (torch.cat(x) for x in (ws, wq, counts, idx, full, order, n_full))
        indptr = torch.zeros(counts.numel() + 1, dtype=torch.int32)
        indptr[1:] = counts.cumsum(0)
        buf = to_device_async(torch.cat([ws, wq, indptr, idx, full, order, n_full]), self.device)
        n_w, n_k = ws.numel(), idx.numel()
        ws, wq, indptr, idx, full, order, n_full = torch.split(buf, (n_w, n_w, n_w + 1, n_k, n_k, n_k, n_w))
        return TileMap(bq, bk, ws, wq, indptr, idx, full.to(torch.int8), order, n_full, kinds)


def plan(spec: AttentionSpec) -> AttentionPlan:
    """Compute the segment metadata for `attention` (once per composed batch, reused by all layers).

    Example:
        >>> import kvfuse
        >>> g = kvfuse.SegmentGraph.fork_join(prefix=256, threads=[128, 64], join=16)
        >>> p = kvfuse.plan(kvfuse.AttentionSpec([g]))
        >>> int(p.kv_lens[0]), p.total_q
        (464, 464)
    """
    return AttentionPlan(spec)


def _tile_bounds(values: torch.Tensor, tile: int):
    """(min, max) of ``values`` over consecutive groups of ``tile`` elements."""
    n = values.numel()
    nt = -(-n // tile)
    pad = torch.full((nt * tile - n,), 1 << 40, dtype=values.dtype)  # beyond any position (< 2**31)
    lo = torch.cat([values, pad]).view(nt, tile).amin(1)
    hi = torch.cat([values, -pad]).view(nt, tile).amax(1)
    return lo, hi


def _classify(graph: SegmentGraph, queries, bq: int, bk: int, window: int | None = None) -> torch.Tensor:
    """int8 [ceil(q_len/bq), ceil(n/bk)]: EMPTY / FULL / PARTIAL of each tile, from segment intervals.

    ``queries``: an int (the last q_len tokens) or a tuple of token indices. A query tile spans the
    tokens from its first to its last query; classifying that span is exact for consecutive queries
    and conservative (never FULL or EMPTY wrongly) otherwise. A sliding ``window`` is classified from
    each tile's lowest and highest position: FULL needs every pair inside the window, EMPTY follows
    when every pair is outside it."""
    n = graph.num_tokens
    starts = graph.starts
    ends = starts + graph.lengths
    qt = _query_tokens(queries, n)
    q_len = qt.numel()
    nqt, nkt = -(-q_len // bq), -(-n // bk)
    first = torch.arange(nqt) * bq
    qa = qt[first]
    qb = qt[torch.clamp(first + bq, max=q_len) - 1] + 1
    ka = torch.arange(nkt) * bk
    kb = torch.clamp(ka + bk, max=n)
    Qa, Qb = torch.maximum(qa[:, None], starts), torch.minimum(qb[:, None], ends)  # [QT, S]
    Ka, Kb = torch.maximum(ka[:, None], starts), torch.minimum(kb[:, None], ends)  # [KT, S]
    Qo, Ko = Qa < Qb, Ka < Kb
    anc = graph.ancestors.double()
    nq, nk = Qo.sum(1), Ko.sum(1)
    out = torch.empty(nqt, nkt, dtype=torch.int8)
    S = graph.num_segments
    step = max(1, (1 << 22) // max(1, nkt * S))
    for c in range(0, nqt, step):
        sl = slice(c, c + step)
        anc_cnt = (Qo[sl].double() @ anc @ Ko.double().T).round().long()
        both = Qo[sl, None, :] & Ko[None, :, :]
        s_full = both & ((Kb[None] - 1) <= Qa[sl, None])  # every key <= every query of the segment
        s_empty = both & (Ka[None] > (Qb[sl, None] - 1))  # every key after every query
        s_part = both & ~s_full & ~s_empty
        n_full = anc_cnt + s_full.sum(-1)
        full = n_full == nq[sl, None] * nk[None]
        nonempty = (n_full > 0) | s_part.any(-1)
        out[sl] = torch.where(full, FULL, torch.where(nonempty, PARTIAL, EMPTY)).to(torch.int8)
    if window is not None and nqt and nkt:
        pos = graph.token_positions()
        q_lo, q_hi = _tile_bounds(pos[qt], bq)
        k_lo, k_hi = _tile_bounds(pos, bk)
        inside = (q_hi[:, None] - k_lo[None, :]) < window  # every pair inside the window
        outside = (q_lo[:, None] - k_hi[None, :]) >= window  # every pair outside it
        out = torch.where(outside, EMPTY, torch.where(inside | (out == EMPTY), out, PARTIAL)).to(torch.int8)
    return out


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
              plan: AttentionPlan, *, sm_scale: float | None = None, softcap: float = 0.0, window: int | None = None,
              return_lse: bool = False, backend: str | None = None, check: bool = True):
    """Segment-masked attention of each sequence's queries over its paged K/V.

    Query token i of a sequence sees key token j iff j's segment is an ancestor of i's segment, or
    both are in the same segment and j <= i (the plan's `SegmentGraph`), and, with a sliding
    ``window``, j's position is within ``window - 1`` of i's (``pos_i - pos_j < window``, positions
    from the graph's segments). Empty tiles are skipped, full tiles need no mask. Prefill (all tokens
    are queries) and decode (a few last tokens) are the same call. GQA/MQA: query head h reads KV
    head ``h // (Hq // Hkv)``.

    Args:
        q: ``[total_q, Hq, D]`` fp16/bf16 (fp32 on the torch backend); rows of sequence b are
            ``plan.qo_indptr[b]:plan.qo_indptr[b+1]``: the sequence's last tokens in order, or the
            plan's ``q_tokens``.
        k_cache, v_cache: one layer's pools ``[num_pages, page_size, Hkv, D]``, same dtype as q.
        block_table: int32 ``[B, max_pages]`` page ids of each sequence (enough for its KV length).
        plan: from `plan` for this batch.
        sm_scale: softmax scale, default ``1/sqrt(D)``.
        softcap: attention-logit soft-capping (Gemma 2): scores ``s = sm_scale * q.k`` become
            ``softcap * tanh(s / softcap)`` before the softmax; 0 (default) turns it off.
        window: sliding window in positions (an int >= 1; Mistral / Gemma sliding layers), or None.
        check: check that the page ids the plan's sequences use lie in the pool (a device round trip,
            once per block table, its version and plan). Under ``torch.compile`` or a CUDA-graph
            capture nothing may read a tensor's values: validate the table once beforehand with
            ``plan.check_block_table(block_table, k_cache)`` and pass ``check=False`` there.
        return_lse: also return the log-sum-exp of the scaled scores, float32 ``[total_q, Hq]``, in
            **natural log** (`lse_to_base2` converts). A query that sees nothing gets -inf and a zero
            output.
    Returns:
        ``out`` ``[total_q, Hq, D]`` in q's dtype, or ``(out, lse)``; with ``softcap`` the LSE is
        that of the capped scores.

    Example:
        >>> import torch, kvfuse
        >>> g = kvfuse.SegmentGraph.fork_join(prefix=8, threads=[4, 4])
        >>> p = kvfuse.plan(kvfuse.AttentionSpec([g]))
        >>> k, v = torch.randn(2, 4, 8, 2, 16).unbind(0)
        >>> q = torch.randn(16, 4, 16)
        >>> out = kvfuse.attention(q, k, v, torch.tensor([[0, 1]], dtype=torch.int32), p)
        >>> out.shape
        torch.Size([16, 4, 16])
    """
    if not isinstance(plan, AttentionPlan):
        raise TypeError(f"attention() needs the AttentionPlan returned by kvfuse.plan(), got {type(plan).__name__}")
    check_tensor("q", q, ndim=3, dtype=(torch.float16, torch.bfloat16, torch.float32, torch.float64))
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, c, ndim=4, dtype=q.dtype, device=q.device)
        if not c.is_contiguous():
            raise ValueError(f"{name} must be contiguous ([num_pages, page_size, num_kv_heads, head_dim])")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)}")
    _, page_size, hkv, d = k_cache.shape
    total_q, hq, dq = q.shape
    if dq != d:
        raise ValueError(f"q head_dim {dq} != cache head_dim {d}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q heads ({hq}) must be a multiple of the cache's KV heads ({hkv})")
    if total_q != plan.total_q:
        raise ValueError(f"q has {total_q} rows but the plan was made for {plan.total_q} query tokens")
    if q.device != plan.device:
        raise ValueError(f"q is on {q.device} but the plan was made for {plan.device}")
    check_tensor("block_table", block_table, ndim=2, dtype=torch.int32, device=q.device)
    block_table = block_table.contiguous()  # kernels index rows with one stride
    if block_table.shape[0] != plan.batch_size:
        raise ValueError(f"block_table has {block_table.shape[0]} rows, the plan {plan.batch_size} sequences")
    need = -(-plan.max_kv // page_size)
    if block_table.shape[1] < need:
        raise ValueError(f"block_table has {block_table.shape[1]} columns, the longest sequence needs {need} pages")
    if check:
        if torch.compiler.is_compiling():
            raise ValueError("attention(check=True) reads the block table's values, which torch.compile cannot "
                             "trace: call plan.check_block_table(block_table, k_cache) once outside and pass "
                             "check=False inside the compiled function")
        plan.check_block_table(block_table, k_cache)
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    if sm_scale == 0.0:  # every score is 0: a uniform softmax (kernels would compute -inf * 0 on masked keys)
        q, sm_scale = torch.zeros_like(q), 1.0
    elif sm_scale < 0.0:  # the kernels fold the scale after the row max: give them (-q, -scale), the same scores
        q, sm_scale = -q, -sm_scale
    if not isinstance(softcap, (int, float)) or isinstance(softcap, bool) or not softcap >= 0 or \
            softcap == float("inf"):
        raise ValueError(f"softcap must be a finite float >= 0 (0: off), got {softcap!r}")
    if window is not None and (not _is_int(window) or window < 1):
        raise ValueError(f"window must be None or an int >= 1 (positions), got {window!r}")

    b = choose("segment_attention", backend, q=q, k_cache=k_cache, plan=plan)
    tile_shape = meta("segment_attention", b).get("tile_shape")
    shape = tile_shape(d, plan.max_q, hq // hkv, itemsize=q.element_size()) if tile_shape else None
    tm_args = tile_args(plan.tiles(*shape, window) if shape else None, q.device)
    out, lse = _ops.segment_attention_op(q, k_cache, v_cache, block_table, plan.kv_lens, plan.qo_indptr,
                                         plan.token_seg, plan.ancestors, plan.q_token, plan.token_pos, *tm_args,
                                         sm_scale, float(softcap), window or 0, b)
    return (out, lse) if return_lse else out


def tile_args(tm: TileMap | None, device=None) -> tuple:
    """The tile map's arguments of the ``segment_attention`` op, in order (empty ones on ``device`` for a
    backend that reads no tile map)."""
    if tm is None:
        e = torch.empty(0, dtype=torch.int32, device=device)
        return e, e, e, e, e.to(torch.int8), e, e, 0, 0
    return (tm.work_seq, tm.work_qtile, tm.kt_indptr, tm.kt_index, tm.kt_full, tm.kt_order, tm.n_full, tm.block_q,
            tm.block_k)


def lse_to_base2(lse: torch.Tensor) -> torch.Tensor:
    """Convert a natural-log LSE (kvfuse's convention) to base 2 (FlashInfer's convention)."""
    return lse * LOG2E


def lse_from_base2(lse2: torch.Tensor) -> torch.Tensor:
    return lse2 / LOG2E
