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
from kvfuse.segments import SegmentGraph

LOG2E = 1.4426950408889634
EMPTY, FULL, PARTIAL = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """What a plan is computed from.

    graphs: one `SegmentGraph` per sequence (its total tokens = the sequence's KV length).
    q_lens: queries per sequence; they are the sequence's *last* ``q_len`` tokens (their K/V are in
        the pool already). ``None`` means every token (prefill).
    device: where the plan's tensors live (the device of q and the pools).
    """

    graphs: Sequence[SegmentGraph]
    q_lens: Sequence[int] | None = None
    device: str | torch.device = "cpu"


@dataclasses.dataclass
class TileMap:
    """Non-empty (query tile, key tile) pairs of a plan, in CSR form over work items.

    A work item is one query tile of one sequence (``work_seq``, ``work_qtile``); its key tiles are
    ``kt_index[kt_indptr[w]:kt_indptr[w+1]]``, ascending, with ``kt_full`` 1 where the whole tile is
    visible (no element mask needed) and 0 where it is partial.
    """

    block_q: int
    block_k: int
    work_seq: torch.Tensor
    work_qtile: torch.Tensor
    kt_indptr: torch.Tensor
    kt_index: torch.Tensor
    kt_full: torch.Tensor
    kinds: list  # per sequence: int8 [num_qtiles, num_ktiles] of EMPTY / FULL / PARTIAL (CPU)


class AttentionPlan:
    """Segment metadata of a batch, computed once and reused by every layer (and step).

    Tensors (on ``spec.device``): ``qo_indptr`` int32 [B+1], ``kv_lens`` int32 [B], ``token_seg``
    int32 [B, max_kv] (segment of each token, -1 past the end), ``ancestors`` uint8 [B, S, S].
    ``tiles(block_q, block_k)`` classifies every tile as empty / full / partial (cached).
    """

    def __init__(self, spec: AttentionSpec):
        if not isinstance(spec, AttentionSpec):
            raise TypeError(f"plan() takes a kvfuse.AttentionSpec, got {type(spec).__name__}")
        graphs = list(spec.graphs)
        if not graphs:
            raise ValueError("AttentionSpec.graphs must not be empty")
        for i, g in enumerate(graphs):
            if not isinstance(g, SegmentGraph):
                raise TypeError(f"AttentionSpec.graphs[{i}] must be a SegmentGraph, got {type(g).__name__}")
        kv = [g.num_tokens for g in graphs]
        if spec.q_lens is not None and any(not isinstance(x, int) or isinstance(x, bool) for x in spec.q_lens):
            raise TypeError(f"AttentionSpec.q_lens must be ints, got {list(spec.q_lens)!r}")
        q_lens = kv if spec.q_lens is None else list(spec.q_lens)
        if len(q_lens) != len(graphs):
            raise ValueError(f"AttentionSpec.q_lens needs one entry per graph ({len(graphs)}), got {len(q_lens)}")
        for i, (ql, n) in enumerate(zip(q_lens, kv)):
            if not 0 <= ql <= n:
                raise ValueError(f"AttentionSpec.q_lens[{i}]={ql} must lie in [0, kv_len={n}]")
        self.graphs, self.q_lens, self.kv_lens_list = graphs, q_lens, kv
        dev = torch.device(spec.device)
        if dev.type == "cuda" and dev.index is None:  # "cuda" means the current device, as for tensors
            dev = torch.device("cuda", torch.cuda.current_device())
        self.device = dev
        self.batch_size = len(graphs)
        self.total_q = sum(q_lens)
        self.max_kv = max(kv)
        self.max_q = max(q_lens)
        dev = self.device
        self.qo_indptr = torch.tensor([0] + list(torch.cumsum(torch.tensor(q_lens), 0).tolist()),
                                      dtype=torch.int32, device=dev)
        self.kv_lens = torch.tensor(kv, dtype=torch.int32, device=dev)
        seg = torch.full((len(graphs), max(self.max_kv, 1)), -1, dtype=torch.int32)
        s_max = max(g.num_segments for g in graphs)
        anc = torch.zeros(len(graphs), s_max, s_max, dtype=torch.uint8)
        for b, g in enumerate(graphs):
            seg[b, : g.num_tokens] = g.token_segments()
            anc[b, : g.num_segments, : g.num_segments] = g.ancestors.to(torch.uint8)
        self.token_seg, self.ancestors = seg.to(dev), anc.to(dev)
        self._tiles: dict = {}

    def visible_pairs(self) -> int:
        """(query, key) pairs that are visible: the work of the attention, for FLOP counts."""
        return sum(g.visible_pairs(ql) for g, ql in zip(self.graphs, self.q_lens))

    def tiles(self, block_q: int, block_k: int) -> TileMap:
        key = (block_q, block_k)
        if key not in self._tiles:
            self._tiles[key] = _classify_batch(self, block_q, block_k)
        return self._tiles[key]


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


def _classify(graph: SegmentGraph, q_len: int, bq: int, bk: int) -> torch.Tensor:
    """int8 [ceil(q_len/bq), ceil(n/bk)]: EMPTY / FULL / PARTIAL of each tile, from segment intervals."""
    n = graph.num_tokens
    starts = graph.starts
    ends = starts + graph.lengths
    nqt, nkt = -(-q_len // bq), -(-n // bk)
    qa = (n - q_len) + torch.arange(nqt) * bq
    qb = torch.clamp(qa + bq, max=n)
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
    return out


def _classify_batch(p: AttentionPlan, bq: int, bk: int) -> TileMap:
    ws, wq, indptr, idx, full, kinds = [], [], [0], [], [], []
    for b, (g, ql) in enumerate(zip(p.graphs, p.q_lens)):
        k = _classify(g, ql, bq, bk)
        kinds.append(k)
        for qt in range(k.shape[0]):
            nz = torch.nonzero(k[qt]).flatten()
            ws.append(b)
            wq.append(qt)
            idx.append(nz)
            full.append(k[qt, nz] == FULL)
            indptr.append(indptr[-1] + nz.numel())
    dev = p.device

    def i32(x):
        return torch.as_tensor(x, dtype=torch.int32).to(dev)

    cat = (lambda xs, dt: torch.cat(xs).to(dt) if xs else torch.empty(0, dtype=dt))
    return TileMap(bq, bk, i32(ws), i32(wq), i32(indptr), cat(idx, torch.int32).to(dev),
                   cat(full, torch.int8).to(dev), kinds)


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
              plan: AttentionPlan, *, sm_scale: float | None = None, return_lse: bool = False,
              backend: str | None = None):
    """Segment-masked attention of each sequence's queries over its paged K/V.

    Query token i of a sequence sees key token j iff j's segment is an ancestor of i's segment, or
    both are in the same segment and j <= i (the plan's `SegmentGraph`). Empty tiles are skipped,
    full tiles need no mask. Prefill (all tokens are queries) and decode (a few last tokens) are the
    same call. GQA/MQA: query head h reads KV head ``h // (Hq // Hkv)``.

    Args:
        q: ``[total_q, Hq, D]`` fp16/bf16 (fp32 on the torch backend); rows of sequence b are
            ``plan.qo_indptr[b]:plan.qo_indptr[b+1]``, the sequence's last tokens, in order.
        k_cache, v_cache: one layer's pools ``[num_pages, page_size, Hkv, D]``, same dtype as q.
        block_table: int32 ``[B, max_pages]`` page ids of each sequence (enough for its KV length).
        plan: from `plan` for this batch.
        sm_scale: softmax scale, default ``1/sqrt(D)``.
        return_lse: also return the log-sum-exp of the scaled scores, float32 ``[total_q, Hq]``, in
            **natural log** (`lse_to_base2` converts). A query that sees nothing gets -inf and a zero
            output.
    Returns:
        ``out`` ``[total_q, Hq, D]`` in q's dtype, or ``(out, lse)``.

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
    # validated once per (block table, its version, pool size) and plan: every layer of a model step
    # passes the same table, and each check costs a device round trip
    seen = getattr(plan, "_checked_table", None)
    if seen is None or seen[0]() is not block_table or seen[1:] != (block_table._version, k_cache.shape[0]):
        used = torch.cat([block_table[b, : -(-n // page_size)] for b, n in enumerate(plan.kv_lens_list)])
        check_in_range("block_table", used, 0, k_cache.shape[0], "page ids")
        plan._checked_table = (weakref.ref(block_table), block_table._version, k_cache.shape[0])
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)

    b = choose("segment_attention", backend, q=q, k_cache=k_cache, plan=plan)
    tile_shape = meta("segment_attention", b).get("tile_shape")
    if tile_shape is None:
        e = torch.empty(0, dtype=torch.int32, device=q.device)
        tm_args = (e, e, e, e, e.to(torch.int8), 0, 0)
    else:
        tm = plan.tiles(*tile_shape(d, plan.max_q))
        tm_args = (tm.work_seq, tm.work_qtile, tm.kt_indptr, tm.kt_index, tm.kt_full, tm.block_q, tm.block_k)
    out, lse = _ops.segment_attention_op(q, k_cache, v_cache, block_table, plan.kv_lens, plan.qo_indptr,
                                         plan.token_seg, plan.ancestors, *tm_args, sm_scale, b)
    return (out, lse) if return_lse else out


def lse_to_base2(lse: torch.Tensor) -> torch.Tensor:
    """Convert a natural-log LSE (kvfuse's convention) to base 2 (FlashInfer's convention)."""
    return lse * LOG2E


def lse_from_base2(lse2: torch.Tensor) -> torch.Tensor:
    return lse2 / LOG2E
