"""Threads on several ranks: join attention across ranks, and moving a sequence's pages between ranks.

Built on ``torch.distributed`` (NCCL between GPUs, gloo between CPU processes); every message is an
ordinary collective or point-to-point op of the process group, no transport of its own.

**Join by moving queries** (exact; the cascade / Star-Attention pattern). The keys a query sees are
spread over ranks: each rank runs `kvfuse.attention` over the segments it *contributes* and gets a
partial ``(out, lse)``; the query's owner merges them with `kvfuse.merge_states`. Softmax over a union
of disjoint key sets is the LSE-weighted merge of the softmaxes over each set, so the result is the
single-process attention up to float rounding, provided every key the query sees is contributed by
exactly one rank. `join_plan` builds a rank's local plan from its `PagedSequence` (the segments it
contributes, and on the owner the query segment, which the queries also see causally);
`join_attention` runs it and merges on ``dst``. A rank that contributes nothing sends a zero output
and LSE -inf, which `merge_states` ignores.

**Compose by moving pages.** `send_sequence` / `recv_sequence` copy a sequence (K and V of every
layer of its pages, its segments and positions) from one rank's `PagedKVStore` to another's, and can
move it to a new start position on arrival (keys re-rotated with `kvfuse.rerotate_`, internal
distances kept, as `kvfuse.compose` with ``positions=`` does). The two ranks first exchange headers
(pool shape, dtype, page size, layers, KV heads, head_dim, rotation, free pages) and both check the
same pair, so a mismatch raises the same ``ValueError`` naming the field on both ranks before any
page moves. The K/V arrive in a staging buffer; pages are allocated only after everything arrived and
was rotated, so a failed or timed-out transfer leaves the receiver's store as it was (pool contents,
free list and its order, reference counts). The receiver acknowledges; the sender releases its
sequence (``release=True``) only on that acknowledgement.

**Fork on one rank, merge on another.** Where every rank holds the prompt (the usual case: each worker
prefilled it), a thread forked on one rank is sent as its own part only (``send_sequence(thread, dst,
after=prompt)``) and grafted onto the receiver's copy (``recv_sequence(store, src, onto=prompt)``): the
result is a sibling of the receiver's own threads of that prompt, so `kvfuse.merge` joins them as if
all had been forked there (bit for bit, `tests/test_distributed.py`). Both prompts must have the same
structure (checked on both ranks) and the same tokens (not compared).

Timeouts: every wait has a timeout (``timeout=`` seconds, or the process group's own, which
``init_process_group(timeout=...)`` sets); a peer that died or never calls the matching function
gives a `TransferError`, not a hang. After a timeout the group is broken on that rank (gloo closes
every link of the group, NCCL aborts its communicator): run transfers on a group of their own
(``dist.new_group``), so that a dead peer does not take the model's group with it.

Example (not run here: it needs two processes; see ``tests/test_distributed.py``)::

    # every rank: dist.init_process_group("nccl" or "gloo", ...)
    if rank == 0:                                   # move a thread to rank 1, to position 4096
        kvfuse.distributed.send_sequence(thread, dst=1, release=True)
    else:
        thread = kvfuse.distributed.recv_sequence(store, src=0, position=4096)
    # decode step of a join whose threads live on several ranks (rank 0 holds the query segment)
    bt, p = kvfuse.distributed.join_plan(seq, q_len=1, sees=my_segments, holds_query=(rank == 0))
    for layer in range(store.num_layers):
        res = kvfuse.distributed.join_attention(q[layer], store.k_cache[layer], store.v_cache[layer], bt, p, dst=0)
        # res is (out, lse) on rank 0, None elsewhere

What has been run: gloo between CPU processes on one machine (``tests/test_distributed.py``, float32,
torch backend). **Not measured / not run**: NCCL between GPUs (no GPU was available), bf16/fp16
transfers over a real network, the Triton / CUDA attention backends inside `join_attention`, and any
timing (latency, bandwidth, overlap of transfer and compute).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
from collections.abc import Sequence as _Seq

import torch
import torch.distributed as dist

from kvfuse._checks import check_instance, check_int, check_tensor
from kvfuse.attention import AttentionPlan, AttentionSpec, attention
from kvfuse.attention import plan as _plan
from kvfuse.merge_states import merge_states
from kvfuse.paged import OutOfPages
from kvfuse.rerotate import rerotate_
from kvfuse.rope import MAX_POSITION
from kvfuse.segments import Segment, SegmentGraph
from kvfuse.store import PagedKVStore, PagedSequence, SegmentInfo

__all__ = ["TransferError", "join_attention", "join_plan", "recv_sequence", "send_sequence"]

PROTOCOL = "kvfuse-sequence-1"
MAX_HEADER_BYTES = 1 << 26  # a header longer than this is not one of ours
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
POOL_FIELDS = ("protocol", "num_layers", "page_size", "num_kv_heads", "head_dim", "dtype", "rope")


class TransferError(RuntimeError):
    """A transfer between ranks failed (timeout, peer gone, or the other side failed); the store is unchanged."""


# ---------------------------------------------------------------------- join by moving queries
def join_plan(seq: PagedSequence, q_len: int, *, sees: _Seq[str], holds_query: bool = False):
    """This rank's part of a join: the block table and plan for `join_attention`.

    Every query sees all tokens of the segments named in ``sees`` (segments of ``seq`` whose keys
    this rank contributes; other segments of ``seq``, e.g. a local copy of a prefix another rank
    contributes, are not seen). On the rank with ``holds_query=True`` the queries are the last
    ``q_len`` tokens of ``seq``'s last segment (K/V already written, as for `kvfuse.attention`),
    and each also sees that segment causally. Exactly one rank holds the query; every key the
    queries see must be contributed by exactly one rank.

    Args:
        seq: a live `PagedSequence`.
        q_len: number of query tokens (>= 1), the same on every rank.
        sees: names of non-pad segments of ``seq`` (``[s.name for s in seq.segments]``).
        holds_query: this rank holds the query segment (``seq``'s last segment, not listed in ``sees``).
    Returns:
        ``(block_table, plan)``: int32 ``[B, num_pages]`` and an `AttentionPlan` for ``q_len`` query
        rows, or ``(None, None)`` when this rank contributes no key. Ranks without the query run one
        single-query row per query (B = ``q_len``, plan metadata O(q_len * local tokens)).
        Sliding windows are not supported (a query's position is known only to its owner).

    Example:
        >>> import torch, kvfuse
        >>> from kvfuse.distributed import join_plan
        >>> store = kvfuse.PagedKVStore(1, 8, 4, 1, 16)
        >>> t = store.sequence("thread"); _ = t.append_kv(torch.randn(1, 6, 1, 16), torch.randn(1, 6, 1, 16))
        >>> bt, p = join_plan(t, 2, sees=[t.segments[0].name])
        >>> tuple(bt.shape), p.total_q
        ((2, 2), 2)
    """
    check_instance("join_plan: seq", seq, PagedSequence)
    seq.check_live()
    q_len = check_int("join_plan: q_len", q_len, lo=1)
    if not isinstance(holds_query, bool):
        raise TypeError(f"join_plan: holds_query must be a bool, got {holds_query!r}")
    sees = _seen_names(seq, sees, holds_query)
    segs = seq.segments
    if holds_query:
        last = segs[-1]
        if last.length < q_len:
            raise ValueError(f"join_plan: the query segment {last.name!r} has {last.length} tokens, fewer than "
                             f"q_len={q_len} (write the queries' K/V first)")
        graph = _local_graph(segs, len(segs) - 1, sees)
        spec = AttentionSpec([graph], q_lens=[q_len], device=seq.store.device)
        return seq.page_table()[None], _plan(spec)
    seen = [i for i, s in enumerate(segs) if s.name in sees and s.length > 0]
    if not seen:
        return None, None
    m = seen[-1]  # its last token, whose parents are the other seen segments, sees exactly `sees`
    graph = _local_graph(segs, m, [s for s in sees if s != segs[m].name])
    token = sum(s.length for s in segs[: m + 1]) - 1
    spec = AttentionSpec([graph] * q_len, q_tokens=[[token]] * q_len, device=seq.store.device)
    return seq.page_table()[None].repeat(q_len, 1), _plan(spec)


def _seen_names(seq: PagedSequence, sees, holds_query: bool) -> list[str]:
    if isinstance(sees, str) or not isinstance(sees, _Seq):
        raise TypeError(f"join_plan: sees must be a list of segment names, got {sees!r:.80}")
    real = {s.name for s in seq.segments if not s.pad}
    for n in sees:
        if n not in real:
            raise ValueError(f"join_plan: sees names {n!r}, which is not a (non-pad) segment of {seq}")
    if len(set(sees)) != len(sees):
        raise ValueError(f"join_plan: sees lists a segment twice: {list(sees)}")
    if holds_query and seq.segments[-1].name in sees:
        raise ValueError(f"join_plan: sees lists the query segment {seq.segments[-1].name!r} (its own tokens are "
                         f"seen causally: leave it out)")
    return list(sees)


def _local_graph(segs: list[SegmentInfo], at: int, parents: list[str]) -> SegmentGraph:
    """The stored segments in order, none seeing another, except segment ``at`` which sees ``parents``."""
    return SegmentGraph([Segment(s.name, s.length, tuple(parents) if i == at else (), None if s.pad else s.position)
                         for i, s in enumerate(segs)])


def join_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor | None,
                   plan: AttentionPlan | None, *, dst: int = 0, group=None, sm_scale: float | None = None,
                   softcap: float = 0.0, backend: str | None = None, check: bool = True):
    """Attention of a query over keys spread across ranks, merged on ``dst``. Collective: every rank of
    ``group`` calls it, with the same ``q``.

    Each rank runs `kvfuse.attention` with its ``(block_table, plan)`` from `join_plan` (``None, None``:
    this rank contributes nothing, i.e. output 0 and LSE -inf), the partial results are gathered on
    ``dst`` (one ``gather`` of ``[q_len, Hq, D + 1]`` float32) and merged with `kvfuse.merge_states`
    in float32.

    Args:
        q: ``[q_len, Hq, D]`` queries, identical on every rank (broadcast them from their owner first),
            fp16/bf16 (fp32 on the torch backend), on this rank's device.
        k_cache, v_cache: this rank's pools of one layer, ``[num_pages, page_size, Hkv, D]``, q's dtype
            (``store.k_cache[layer]``).
        block_table, plan: from `join_plan` on this rank (both None, or both given).
        dst: global rank that receives the result (usually the query's owner).
        group: the process group (default: the world).
        sm_scale, softcap, backend: as for `kvfuse.attention`.
        check: first exchange each rank's query shape, dtype and whether its local attention succeeded
            (one small ``all_gather``), so that a mismatch or a local error raises on every rank instead
            of leaving the others waiting; False skips that round trip.
    Returns:
        on ``dst``: ``(out, lse)``, ``out`` ``[q_len, Hq, D]`` in q's dtype, ``lse`` float32 ``[q_len, Hq]``
        natural log (-inf where no rank has a key); on the other ranks: None.
    Raises:
        ValueError, TypeError: bad local inputs (on that rank; the others raise ``ValueError`` naming it
            with ``check=True``), or ranks whose ``q`` differ in shape or dtype (on every rank).
    """
    _require_group(group, "join_attention")
    rank = dist.get_rank()
    dst = _check_peer("join_attention: dst", dst, group, allow_self=True)
    error, part = None, None
    try:
        part = _local_part(q, k_cache, v_cache, block_table, plan, sm_scale=sm_scale, softcap=softcap,
                           backend=backend)
    except (TypeError, ValueError, RuntimeError) as e:
        if not check:
            raise
        error = e
    if check:
        _check_join_ranks(q, error, group)
    gather = [torch.empty_like(part) for _ in range(dist.get_world_size(group))] if rank == dst else None
    dist.gather(part, gather, dst=dst, group=group)
    if rank != dst:
        return None
    out, lse = gather[0][..., :-1], gather[0][..., -1].contiguous()
    for g in gather[1:]:
        out, lse = merge_states(out.contiguous(), lse, g[..., :-1].contiguous(), g[..., -1].contiguous(),
                                backend=backend)
    return out.to(q.dtype).contiguous(), lse


def _local_part(q, k_cache, v_cache, block_table, plan, **kw) -> torch.Tensor:
    """This rank's ``[q_len, Hq, D + 1]`` float32: partial output, then its LSE."""
    check_tensor("join_attention: q", q, ndim=3, dtype=_DTYPES)
    if (block_table is None) != (plan is None):
        raise ValueError("join_attention: give both block_table and plan (from join_plan), or neither")
    if plan is None:
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:2], -math.inf, dtype=torch.float32, device=q.device)
    else:
        out, lse = attention(q, k_cache, v_cache, block_table, plan, return_lse=True, **kw)
    return torch.cat([out.float(), lse[..., None]], dim=-1)


def _check_join_ranks(q, error, group) -> None:
    """All-gather (ok, q_len, Hq, D, dtype) and raise on every rank if any rank failed or differs."""
    ok = error is None
    shape = tuple(q.shape) if isinstance(q, torch.Tensor) and q.dim() == 3 else (-1, -1, -1)
    code = _DTYPES.index(q.dtype) if isinstance(q, torch.Tensor) and q.dtype in _DTYPES else -1
    device = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
    mine = torch.tensor([int(ok), *shape, code], dtype=torch.int64, device=device)
    table = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(table, mine, group=group)
    rows = [t.tolist() for t in table]
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(len(rows)))
    failed = [r for r, row in zip(ranks, rows) if not row[0]]
    if error is not None:
        raise error
    if failed:
        raise ValueError(f"join_attention: rank(s) {failed} rejected their inputs (see the error there)")
    for i, field in enumerate(("q_len (q.shape[0])", "query heads (q.shape[1])", "head_dim (q.shape[2])", "q.dtype")):
        values = {r: row[i + 1] for r, row in zip(ranks, rows)}
        if len(set(values.values())) > 1:
            if field == "q.dtype":
                values = {r: str(_DTYPES[v]) for r, v in values.items()}
            raise ValueError(f"join_attention: the ranks' queries differ in {field}: {values} (rank: value)")


# ---------------------------------------------------------------------- compose by moving pages
def send_sequence(seq: PagedSequence, dst: int, *, after: PagedSequence | None = None, group=None,
                  timeout: float | datetime.timedelta | None = None, release: bool = False) -> None:
    """Send ``seq`` (K/V of all layers of its pages, segments, positions) to rank ``dst``, which calls
    `recv_sequence`. Returns once ``dst`` acknowledged that the sequence is stored.

    Args:
        seq: a live `PagedSequence`; not modified (unless ``release``).
        dst: global rank of the receiver (not this rank).
        after: the prefix ``seq`` was forked from (`kvfuse.fork`): only ``seq``'s own part (its pages and
            segments after the prefix) is sent, and the receiver grafts it onto its own copy of that prefix
            (`recv_sequence` with ``onto=``), so that the received thread is a sibling of the receiver's
            own threads of the prefix and `kvfuse.merge` joins them. The two prefixes must have the same
            structure (segment lengths, positions, parents; checked on both ranks) and hold the same tokens
            (the caller's guarantee: the K/V are not compared).
        group: the process group (default: the world).
        timeout: seconds (or a ``timedelta``) to wait for each message; None: the group's timeout.
        release: release ``seq`` after the receiver acknowledged (moving it rather than copying).
    Raises:
        ValueError: the two stores differ (pool shape, dtype, page size, layers, KV heads, head_dim,
            rotation) or the move cannot be made, naming the field; raised on both ranks alike.
        OutOfPages: the receiver has too few free pages (on both ranks).
        TransferError: a timeout, a peer that is gone, or a receiver that failed to store the sequence.
    """
    _require_group(group, "send_sequence")
    check_instance("send_sequence: seq", seq, PagedSequence)
    seq.check_live()
    dst = _check_peer("send_sequence: dst", dst, group)
    if not isinstance(release, bool):
        raise TypeError(f"send_sequence: release must be a bool, got {release!r}")
    segments, first_page, prefix = _own_part(seq, after)
    link = _Link("send_sequence", dst, group, _timeout(timeout), seq.store.device)
    own_pages = seq.pages[first_page:]
    mine = {**_pool_header(seq.store), "role": "send", "length": sum(s.length for s in segments),
            "num_pages": len(own_pages), "segments": [dataclasses.astuple(s) for s in segments], "prefix": prefix}
    link.send_json(mine, "header")
    theirs = link.recv_json("the receiver's header")
    _raise_verdict(link.what, _verdict(_normal(mine), theirs))
    if own_pages:
        pages = torch.tensor(own_pages, dtype=torch.int64, device=seq.store.device)
        for name, cache in (("K", seq.store.k_cache), ("V", seq.store.v_cache)):
            link.send(cache[:, pages].contiguous().view(torch.uint8), name)
    if link.recv_status() != 1:
        raise TransferError(f"{link.what}: rank {dst} failed to store the sequence (see its error); {seq} is "
                            f"unchanged")
    if release:
        seq.release()


def _own_part(seq: PagedSequence, after: PagedSequence | None):
    """``(segments to send, first page to send, prefix structure or None)``: the whole sequence, or with
    ``after`` its part after that prefix, the parents naming prefix segments as ``"@<index>"``."""
    if after is None:
        return list(seq.segments), 0, None
    check_instance("send_sequence: after", after, PagedSequence)
    after.check_live()
    ps = seq.store.page_size
    k = len(after.segments)
    pad = -after.length % ps
    ok = after.store is seq.store and seq.segments[:k] == after.segments and len(seq.segments) > k
    if ok and pad:
        ok = seq.segments[k].pad and seq.segments[k].length == pad and len(seq.segments) > k + 1
        k += 1
    n_pre = after.length + pad
    if not ok or seq.pages[: n_pre // ps] != after.pages:
        raise ValueError(f"send_sequence: seq does not continue after={after} (seq must be a thread forked from "
                         f"it: kvfuse.fork(after, n))")
    index = {s.name: f"@{i}" for i, s in enumerate(after.segments)}
    own = [dataclasses.replace(s, parents=tuple(index.get(p, p) for p in s.parents)) for s in seq.segments[k:]]
    return own, n_pre // ps, _prefix_structure(after)


def _prefix_structure(seq: PagedSequence) -> list:
    """A prefix's segments without names: [length, position, pad, parent indices], and its page size."""
    index = {s.name: i for i, s in enumerate(seq.segments)}
    return [[s.length, s.position, s.pad, [index[p] for p in s.parents]] for s in seq.segments]


def recv_sequence(store: PagedKVStore, src: int, *, position: int | None = None, onto: PagedSequence | None = None,
                  group=None, timeout: float | datetime.timedelta | None = None,
                  backend: str | None = None) -> PagedSequence:
    """Receive a sequence sent by `send_sequence` on rank ``src`` into new pages of ``store``.

    The segments keep their structure and get new names of this store (``"thread#7"`` becomes
    ``"thread#<n>"``). With ``position``, the whole sequence moves so that its first token sits at
    RoPE ``position`` (every token by the same offset; keys re-rotated with `kvfuse.rerotate_`,
    values unchanged), like `kvfuse.compose` with ``positions=``.

    Args:
        store: the receiving `PagedKVStore` (same layers, page size, KV heads, head_dim, dtype and
            rotation as the sender's; any number of pages, any device).
        src: global rank of the sender (not this rank).
        position: new RoPE position of the first token, or None to keep the positions.
        onto: this store's copy of the prefix the sender named with ``after=``: the received part is
            grafted onto it (the new sequence holds a reference to its pages, as a `kvfuse.fork` thread
            does). Both sides give the prefix or neither; not combined with ``position``.
        group, timeout: as for `send_sequence`.
        backend: for the re-rotation (`kvfuse.rerotate_`).
    Returns:
        the new `PagedSequence` of ``store`` (its own pages, one reference each).
    Raises:
        ValueError, OutOfPages: as for `send_sequence`, on both ranks, before anything is allocated.
        TransferError: a timeout or a peer that is gone. Whatever is raised, ``store`` is unchanged.
    """
    _require_group(group, "recv_sequence")
    check_instance("recv_sequence: store", store, PagedKVStore)
    src = _check_peer("recv_sequence: src", src, group)
    if position is not None:
        position = check_int("recv_sequence: position", position, lo=0, hi=MAX_POSITION)
    if onto is not None:
        check_instance("recv_sequence: onto", onto, PagedSequence)
        onto.check_live()
        if onto.store is not store:
            raise ValueError("recv_sequence: onto must be a sequence of store")
    link = _Link("recv_sequence", src, group, _timeout(timeout), store.device)
    theirs = link.recv_json("the sender's header")
    mine = {**_pool_header(store), "role": "recv", "position": position, "num_free": store.num_free,
            "onto": None if onto is None else _prefix_structure(onto)}
    link.send_json(mine, "header")
    _raise_verdict(link.what, _verdict(theirs, _normal(mine)))
    shape = (store.num_layers, theirs["num_pages"], store.page_size, store.num_kv_heads, store.head_dim)
    k, v = (torch.empty(shape, dtype=store.k_cache.dtype, device=store.device) for _ in "KV")
    if theirs["num_pages"]:
        link.recv(k, "K")
        link.recv(v, "V")
    try:
        segments, delta = _arrived_segments(theirs, position)
        if delta:
            _move_keys(k, segments, delta, store, backend)
        seq = _store_pages(store, k, v, _renamed(store, segments, delta, onto), onto)
    except BaseException:
        try:
            link.send_status(0)
        except TransferError:
            pass  # the sender is gone too: raise what went wrong here
        raise
    try:
        link.send_status(1)
    except TransferError:
        _undo(seq)
        raise
    return seq


def _pool_header(store: PagedKVStore) -> dict:
    return {"protocol": PROTOCOL, "num_layers": store.num_layers, "page_size": store.page_size,
            "num_kv_heads": store.num_kv_heads, "head_dim": store.head_dim, "dtype": str(store.k_cache.dtype),
            "rope": None if store.rope is None else store.rope.to_dict()}


def _normal(header: dict) -> dict:
    """``header`` as the peer will decode it (JSON: tuples become lists)."""
    return json.loads(json.dumps(header))


def _verdict(sent: dict, recv: dict) -> tuple[type, str] | None:
    """What is wrong with this transfer, computed alike on both ranks from the two headers."""
    if sent.get("role") != "send" or recv.get("role") != "recv":
        return ValueError, (f"the peers disagree on who sends: roles {sent.get('role')!r} and {recv.get('role')!r} "
                            f"(one rank calls send_sequence, the other recv_sequence)")
    for field in POOL_FIELDS:
        a, b = sent.get(field), recv.get(field)
        if a != b:
            where = _first_difference(a, b, field)
            return ValueError, (f"the stores differ in {where}: sender {_short(_at(a, where, field))}, receiver "
                                f"{_short(_at(b, where, field))}")
    if (sent.get("prefix") is None) != (recv.get("onto") is None):
        return ValueError, ("one side names a prefix and the other does not: give send_sequence(after=) and "
                            "recv_sequence(onto=) together, or neither")
    if sent.get("prefix") is not None:
        if recv.get("position") is not None:
            return ValueError, "recv_sequence(onto=) grafts the thread onto the prefix: position= cannot move it"
        if sent["prefix"] != recv["onto"]:
            return ValueError, (f"the prefixes differ: the sender's is (length, position, pad, parents) "
                                f"{_short(sent['prefix'])}, the receiver's {_short(recv['onto'])}")
    problem = _check_segments(sent)
    if problem:
        return ValueError, f"the sender's sequence is malformed: {problem}"
    need = sent["num_pages"]
    if need > recv["num_free"]:
        return OutOfPages, f"the receiver has {recv['num_free']} free pages, the sequence needs {need}"
    return _check_move(sent, recv.get("position"))


def _check_segments(h: dict) -> str | None:
    try:
        segs = [SegmentInfo(str(s[0]), int(s[1]), tuple(s[2]), int(s[3]), bool(s[4])) for s in h["segments"]]
        prefix = [Segment(f"@{i}", int(p[0]), tuple(f"@{j}" for j in p[3]))
                  for i, p in enumerate(h.get("prefix") or [])]
        SegmentGraph(prefix + [Segment(s.name, s.length, s.parents) for s in segs])
        length, ps, n = sum(s.length for s in segs), h["page_size"], h["num_pages"]
        if length != h["length"] or n != -(-length // ps):
            return f"{length} tokens in its segments, length {h['length']}, {n} pages of {ps}"
    except (TypeError, ValueError, IndexError, KeyError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _check_move(sent: dict, position: int | None) -> tuple[type, str] | None:
    if position is None:
        return None
    real = [s for s in sent["segments"] if not s[4]]
    delta = position - real[0][3] if real else 0
    if delta and sum(s[1] for s in real):
        rope = sent["rope"]
        if rope is None:
            return ValueError, "moving tokens (position=) needs the stores' rotation (PagedKVStore(..., rope=...))"
        if rope.get("unmovable"):
            return ValueError, rope["unmovable"]
    for s in real:
        if s[3] + delta < 0 or s[3] + delta + s[1] - 1 > MAX_POSITION:
            return ValueError, f"position={position} moves segment {s[0]!r} out of the positions [0, {MAX_POSITION}]"
    return None


def _first_difference(a, b, path: str) -> str:
    """The path of the first field where ``a`` and ``b`` (JSON values) differ, e.g. ``rope.layers[2].theta``."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{path}.{k}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{path}[{i}]")
    return path


def _at(value, path: str, root: str):
    for part in path[len(root):].replace("[", ".[").split(".")[1:]:
        value = value[int(part[1:-1])] if part.startswith("[") else value.get(part)
    return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def _raise_verdict(what: str, verdict) -> None:
    if verdict is not None:
        cls, message = verdict
        raise cls(f"{what}: {message}; nothing was transferred")


def _arrived_segments(sent: dict, position: int | None) -> tuple[list[SegmentInfo], int]:
    """The sender's segments and the position offset of the move (0 without one)."""
    segs = [SegmentInfo(s[0], s[1], tuple(s[2]), s[3], s[4]) for s in sent["segments"]]
    real = [s for s in segs if not s.pad]
    delta = 0 if position is None or not real else position - real[0].position
    return segs, delta


def _move_keys(k: torch.Tensor, segs: list[SegmentInfo], delta: int, store: PagedKVStore, backend) -> None:
    """Re-rotate the staged keys ``k`` (a pool of the sequence's pages, in order) by ``delta`` positions."""
    slots, old, off = [], [], 0
    for s in segs:
        if not s.pad:
            slots.append(torch.arange(off, off + s.length))
            old.append(torch.arange(s.position, s.position + s.length))
        off += s.length
    slots, old = torch.cat(slots).to(k.device), torch.cat(old).to(k.device)
    rerotate_(k, slots, old, old + delta, store.rope, backend=backend)


def _renamed(store: PagedKVStore, segs: list[SegmentInfo], delta: int,
             onto: PagedSequence | None = None) -> list[SegmentInfo]:
    """``segs`` with names of ``store`` (same structure) and real segments moved by ``delta``; grafted
    onto ``onto``: its segments (and the pad `kvfuse.fork` puts after a prefix) first, ``"@i"`` parents
    naming its segments."""
    names = {s.name: store.unique_name(s.name.rsplit("#", 1)[0]) for s in segs}
    head = []
    if onto is not None:
        names.update({f"@{i}": s.name for i, s in enumerate(onto.segments)})
        head = list(onto.segments)
        pad = -onto.length % store.page_size
        if pad:
            head.append(SegmentInfo(store.unique_name("pad"), pad, (), 0, pad=True))
    return head + [dataclasses.replace(s, name=names[s.name], parents=tuple(names[p] for p in s.parents),
                                       position=s.position + (0 if s.pad else delta)) for s in segs]


def _store_pages(store: PagedKVStore, k: torch.Tensor, v: torch.Tensor, segs: list[SegmentInfo],
                 onto: PagedSequence | None = None) -> PagedSequence:
    """Allocate pages, write the staged ``k``/``v`` ``[L, n, page_size, Hkv, D]``, make the sequence (after
    ``onto``'s pages, referenced once more, when grafted)."""
    n, ps = k.shape[1], store.page_size
    pages = store.alloc(n)
    try:
        slots = (pages.long()[:, None] * ps + torch.arange(ps, device=pages.device)).flatten()
        flat = (k.shape[0], n * ps, *k.shape[3:])
        store.write_(None, slots, k.reshape(flat), v.reshape(flat))
    except BaseException:
        store.decref(pages.flip(0))  # the free list is as before (alloc's order undone)
        raise
    head = list(onto.pages) if onto is not None else []
    if head:
        store.incref(head)
    return PagedSequence(store, head + pages.tolist(), segs)


def _undo(seq: PagedSequence) -> None:
    seq.store.decref(seq.pages[::-1])  # a grafted prefix's pages lose the reference the graft added
    seq.pages, seq.released = [], True


# ---------------------------------------------------------------------- the wire
def _require_group(group, what: str) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{what}: torch.distributed is not initialized (call torch.distributed."
                           f"init_process_group first: 'nccl' for GPU stores, 'gloo' for CPU ones)")


def _check_peer(name: str, rank: int, group, allow_self: bool = False) -> int:
    rank = check_int(name, rank, lo=0)
    ranks = dist.get_process_group_ranks(group) if group is not None else range(dist.get_world_size())
    if rank not in ranks:
        raise ValueError(f"{name}={rank} is not a rank of the process group (global ranks {list(ranks)})")
    if rank == dist.get_rank() and not allow_self:
        raise ValueError(f"{name}={rank} is this rank")
    return rank


def _timeout(timeout) -> datetime.timedelta | None:
    if timeout is None or isinstance(timeout, datetime.timedelta):
        return timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be None, a timedelta or a number of seconds > 0, got {timeout!r}")
    return datetime.timedelta(seconds=timeout)


@dataclasses.dataclass
class _Link:
    """Point-to-point messages with one peer; every wait is bounded and failures become `TransferError`."""

    what: str
    peer: int
    group: object
    timeout: datetime.timedelta | None
    device: torch.device

    def __post_init__(self):
        arrow = "->" if self.what.startswith("send") else "<-"
        self.what = f"{self.what} (rank {dist.get_rank()} {arrow} {self.peer})"

    def _wait(self, post, name: str) -> None:
        """Post one op (``post()`` returns its work) and wait for it; errors at either step become TransferError."""
        try:
            work = post()
            work.wait() if self.timeout is None else work.wait(self.timeout)
        except Exception as e:
            limit = "the process group's timeout" if self.timeout is None else f"{self.timeout.total_seconds():g} s"
            raise TransferError(f"{self.what}: {name} did not get through within {limit} (the peer died, or never "
                                f"called the matching function): {str(e).strip()[:300]}; the store is unchanged") from e

    def send(self, t: torch.Tensor, name: str) -> None:
        self._wait(lambda: dist.isend(t, self.peer, group=self.group), name)

    def recv(self, t: torch.Tensor, name: str) -> torch.Tensor:
        buf = t.view(torch.uint8) if t.is_floating_point() else t
        self._wait(lambda: dist.irecv(buf, self.peer, group=self.group), name)
        return t

    def send_json(self, obj: dict, name: str) -> None:
        data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).to(self.device)
        self.send(torch.tensor([data.numel()], dtype=torch.int64, device=self.device), name)
        self.send(data, name)

    def recv_json(self, name: str) -> dict:
        n = int(self.recv(torch.empty(1, dtype=torch.int64, device=self.device), name))
        if not 0 < n <= MAX_HEADER_BYTES:
            raise TransferError(f"{self.what}: {name} announces {n} bytes: the peer does not speak {PROTOCOL}")
        data = self.recv(torch.empty(n, dtype=torch.uint8, device=self.device), name)
        try:
            return json.loads(data.cpu().numpy().tobytes().decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TransferError(f"{self.what}: {name} is not a {PROTOCOL} header: {e}") from e

    def send_status(self, ok: int) -> None:
        self.send(torch.tensor([ok], dtype=torch.int64, device=self.device), "the acknowledgement")

    def recv_status(self) -> int:
        return int(self.recv(torch.empty(1, dtype=torch.int64, device=self.device), "the acknowledgement"))
