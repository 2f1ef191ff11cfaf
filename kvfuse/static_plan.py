"""An attention plan at fixed addresses, for CUDA graphs: the metadata of each step is copied into it.

A CUDA graph replays kernels with the pointers and sizes they were captured with. `StaticPlan` is an
`AttentionPlan` whose tensors are preallocated for a capacity (rows, queries per row, tokens per row,
segments per row) and never move; `load_` copies a host-built plan of any batch that fits into them
(padding the rest), in one non-blocking copy per buffer, so a captured `kvfuse.attention` call computes
the newly loaded batch at the next replay. The kernels read sequence lengths and tile lists from the
device, and their launch grids depend only on the capacity, so nothing is captured that a step changes.

Example:
    >>> import torch, kvfuse
    >>> from kvfuse.static_plan import StaticPlan
    >>> sp = StaticPlan(batch_size=2, q_len=1, max_kv=64, max_segments=4, device="cpu")
    >>> g = kvfuse.SegmentGraph.fork_join(prefix=8, threads=[3])
    >>> sp.load_(kvfuse.plan(kvfuse.AttentionSpec([g, g], q_lens=[1, 1])))
    >>> sp.kv_lens.tolist(), sp.token_seg.shape
    ([11, 11], torch.Size([2, 64]))
"""

from __future__ import annotations

import torch

from kvfuse._checks import check_int
from kvfuse.attention import AttentionPlan, TileMap, _device

__all__ = ["StaticPlan"]


class _Buffers:
    """Named int32 and uint8 tensors carved out of one device buffer per dtype, with host staging
    buffers of the same layout (pinned for a CUDA device) and an event guarding their reuse."""

    def __init__(self, fields: dict[str, tuple[torch.dtype, tuple[int, ...]]], device: torch.device):
        self.device = device
        self.views, self.host, self._dev, self._stage = {}, {}, {}, {}
        pinned = device.type == "cuda"
        for dtype in (torch.int32, torch.uint8):
            names = [n for n, (dt, _) in fields.items() if dt == dtype]
            if not names:
                continue
            sizes = [_numel(fields[n][1]) for n in names]
            dev = torch.zeros(sum(sizes), dtype=dtype, device=device)
            stage = torch.zeros(dev.numel(), dtype=dtype, pin_memory=pinned) if pinned else None
            self._dev[dtype], self._stage[dtype] = dev, stage
            off = 0
            for n, size in zip(names, sizes):
                self.views[n] = dev[off: off + size].view(fields[n][1])
                self.host[n] = (stage if stage is not None else dev)[off: off + size].view(fields[n][1])
                off += size
        self._event = torch.cuda.Event() if pinned else None

    def begin(self) -> dict[str, torch.Tensor]:
        """The host views to fill (waits for the previous step's copy out of them to finish)."""
        if self._event is not None:
            self._event.synchronize()
        return self.host

    def commit(self) -> None:
        """Copy the staging buffers to the device (non-blocking; nothing to do on the CPU)."""
        if self._event is None:
            return
        for dtype, dev in self._dev.items():
            dev.copy_(self._stage[dtype], non_blocking=True)
        self._event.record()


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class StaticPlan(AttentionPlan):
    """An `AttentionPlan` of fixed capacity whose tensors never move (for CUDA-graph capture).

    Args:
        batch_size: rows (sequences) of every plan loaded.
        q_len: queries per row (every row has the same number: one for decode).
        max_kv: capacity in tokens per row; the block tables used with it need ``ceil(max_kv /
            page_size)`` columns.
        max_segments: capacity in segments per row.
        tile_shapes: ``(block_q, block_k, window)`` keys whose tile maps are kept; others are added on
            first use outside a capture (`tiles`), from the loaded plan.
        device: where the tensors live.

    `load_(plan)` copies a host plan (one made with ``device="cpu"``) into the tensors. Between loads
    nothing changes: capture a graph after one load and replay it after every later one.
    """

    def __init__(self, batch_size: int, q_len: int, max_kv: int, max_segments: int, *,
                 tile_shapes=(), device="cpu"):
        B = check_int("StaticPlan: batch_size", batch_size, lo=1)
        q = check_int("StaticPlan: q_len", q_len, lo=1)
        W = check_int("StaticPlan: max_kv", max_kv, lo=q)
        S = check_int("StaticPlan: max_segments", max_segments, lo=1)
        self.device = _device(device)
        self.batch_size, self.total_q, self.max_kv, self.max_q, self.max_segments = B, B * q, W, q, S
        self.q_lens, self.kv_lens_list = [q] * B, [W] * B
        self.graphs, self._classes, self._row_class, self._queries = [], [], [], []
        self._host_plan: AttentionPlan | None = None
        i32, u8 = torch.int32, torch.uint8
        self._buf = _Buffers({"qo_indptr": (i32, (B + 1,)), "kv_lens": (i32, (B,)), "q_token": (i32, (B * q,)),
                              "token_seg": (i32, (B, W)), "token_pos": (i32, (B, W)),
                              "ancestors": (u8, (B, S, S))}, self.device)
        v = self._buf.views
        self.qo_indptr, self.kv_lens, self.q_token = v["qo_indptr"], v["kv_lens"], v["q_token"]
        self.token_seg, self.token_pos, self.ancestors = v["token_seg"], v["token_pos"], v["ancestors"]
        self._tiles: dict = {}
        self._tile_bufs: dict = {}
        for key in tile_shapes:
            self._add_tiles(*key)

    # ------------------------------------------------------------------ tile maps
    def _add_tiles(self, bq: int, bk: int, window: int | None) -> TileMap:
        n_work = self.batch_size * -(-self.max_q // bq)
        n_tiles = n_work * -(-self.max_kv // bk)
        i32, u8 = torch.int32, torch.uint8
        buf = _Buffers({"work_seq": (i32, (n_work,)), "work_qtile": (i32, (n_work,)),
                        "kt_indptr": (i32, (n_work + 1,)), "kt_index": (i32, (n_tiles,)),
                        "kt_order": (i32, (n_tiles,)), "n_full": (i32, (n_work,)), "kt_full": (u8, (n_tiles,))},
                       self.device)
        v = buf.views
        tm = TileMap(bq, bk, v["work_seq"], v["work_qtile"], v["kt_indptr"], v["kt_index"],
                     v["kt_full"].view(torch.int8), v["kt_order"], v["n_full"], [])
        self._tiles[(bq, bk, window)], self._tile_bufs[(bq, bk, window)] = tm, buf
        if self._host_plan is not None:
            self._load_tiles((bq, bk, window), buf)
            buf.commit()
        return tm

    def _tile_map(self, bq: int, bk: int, window: int | None) -> TileMap:
        """A tile map for a key not made yet: allowed outside a CUDA-graph capture (its buffers are
        allocated and filled from the loaded plan), refused inside one."""
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"StaticPlan: tiles {(bq, bk, window)} were not made before the capture (it has "
                               f"{sorted(self._tiles, key=str)}); run the step once outside the capture first")
        return self._add_tiles(bq, bk, window)

    def _load_tiles(self, key, buf: _Buffers) -> None:
        tm = self._host_plan.tiles(*key)
        h = buf.begin()
        n_w, n_k = tm.work_seq.numel(), tm.kt_index.numel()
        if n_w != h["work_seq"].numel():  # every row has q_len queries: the work items are fixed
            raise AssertionError(f"StaticPlan: {n_w} work items, {h['work_seq'].numel()} expected")
        for name in ("work_seq", "work_qtile", "kt_indptr", "n_full"):
            h[name].copy_(getattr(tm, name))
        for name in ("kt_index", "kt_order", "kt_full"):
            h[name][:n_k].copy_(getattr(tm, name).view(h[name].dtype) if name == "kt_full" else getattr(tm, name))

    # ------------------------------------------------------------------ loading
    def load_(self, plan: AttentionPlan) -> None:
        """Copy ``plan`` (host tensors: made with ``device="cpu"``; ``batch_size`` rows of ``q_len``
        queries, at most ``max_kv`` tokens and ``max_segments`` segments per row) into this plan's
        tensors, with every tile map kept. Everything is checked before anything is written."""
        if not isinstance(plan, AttentionPlan) or isinstance(plan, StaticPlan):
            raise TypeError(f"StaticPlan.load_ takes a kvfuse.AttentionPlan, got {type(plan).__name__}")
        if plan.device.type != "cpu":
            raise ValueError(f"StaticPlan.load_ takes a plan made on the host (AttentionSpec(device='cpu')), got one "
                             f"on {plan.device}")
        if plan.batch_size != self.batch_size or any(q != self.max_q for q in plan.q_lens):
            raise ValueError(f"StaticPlan.load_: the plan has {plan.batch_size} rows of {sorted(set(plan.q_lens))} "
                             f"queries, this StaticPlan {self.batch_size} rows of {self.max_q}")
        if plan.max_kv > self.max_kv:
            raise ValueError(f"StaticPlan.load_: a row holds {plan.max_kv} tokens, the capacity is max_kv="
                             f"{self.max_kv}")
        n_seg = plan.ancestors.shape[-1]
        if n_seg > self.max_segments:
            raise ValueError(f"StaticPlan.load_: a row has {n_seg} segments, the capacity is max_segments="
                             f"{self.max_segments}")
        self._host_plan = plan
        self.graphs, self._classes, self._row_class = plan.graphs, plan._classes, plan._row_class
        h = self._buf.begin()
        w = plan.token_seg.shape[1]
        h["qo_indptr"].copy_(plan.qo_indptr)
        h["kv_lens"].copy_(plan.kv_lens)
        h["q_token"].copy_(plan.q_token)
        h["token_seg"][:, :w] = plan.token_seg
        h["token_seg"][:, w:] = -1
        h["token_pos"][:, :w] = plan.token_pos
        h["ancestors"].zero_()
        h["ancestors"][:, :n_seg, :n_seg] = plan.ancestors
        self._buf.commit()
        for key, buf in self._tile_bufs.items():
            self._load_tiles(key, buf)
            buf.commit()
