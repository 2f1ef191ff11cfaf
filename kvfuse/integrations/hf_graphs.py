"""Decode steps of a Hugging Face model over paged rows as CUDA-graph replays (`DecodeGraphs`).

`kvfuse.integrations.hf.decode` runs the model's forward in Python at every step: for a 32-layer
model that is hundreds of kernel launches and tens of milliseconds of host work, more than the GPU
needs. `DecodeGraphs` captures the forward of one token per row once per batch-size bucket (1, 2, 4,
8, ... rows, as serving engines do) over inputs at fixed addresses: token ids, positions, the slots
the new K/V go to, the block table and a `kvfuse.static_plan.StaticPlan`. A step then costs its host
planning (the rows' segment graphs, classified once per shape of row: sibling threads share one),
one copy of the step's metadata and one graph replay.

Rows that do not fill a bucket are padded with one-token rows writing to a scratch page that the
runner holds. Capacity (tokens and segments per row) starts from the rows seen and doubles when a
row outgrows it (the bucket is captured again). Without CUDA, or with ``graphs=False``, the same
static path runs eagerly (every step a Python forward): the CPU tests check it against `hf.decode`.

Example:
    >>> import torch, transformers, kvfuse
    >>> from kvfuse.integrations import hf
    >>> from kvfuse.integrations.hf_graphs import DecodeGraphs
    >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                num_attention_heads=4, num_key_value_heads=2)
    >>> model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="kvfuse").eval()
    >>> store = kvfuse.PagedKVStore.from_hf(cfg, num_pages=64, page_size=4)
    >>> prompt = store.sequence()
    >>> _ = hf.prefill(model, prompt, torch.tensor([[1, 2, 3, 4, 5]]))
    >>> threads = kvfuse.fork(prompt, 3)
    >>> runner = DecodeGraphs(model, store)
    >>> runner.decode(threads, torch.tensor([[7], [8], [9]])).shape
    torch.Size([3, 1, 64])
"""

from __future__ import annotations

import dataclasses
import types

import torch
from transformers.cache_utils import Cache

from kvfuse._checks import check_int
from kvfuse.attention import AttentionPlan, AttentionSpec, attention
from kvfuse.batch import row_graphs, shared_view
from kvfuse.integrations.hf import CACHE_KW, NAME, KVFuseCache, _check_mask, _model_name, _options, _PagedLayer
from kvfuse.integrations.hf_config import UnsupportedModel, cache_shape, unsupported_attention
from kvfuse.paged import OutOfPages
from kvfuse.segments import Segment, SegmentGraph
from kvfuse.small_mm import compile_pass
from kvfuse.static_plan import StaticPlan, _Buffers
from kvfuse.store import PagedKVStore, PagedSequence
from kvfuse.threads import _check_rows

__all__ = ["DecodeGraphs"]

_PAD_GRAPH = SegmentGraph([Segment("pad-row", 1)])


class _StaticCache(KVFuseCache):
    """The cache a captured forward reads: every layer writes the new K/V to the bucket's slots and
    runs one `kvfuse.attention` over its block table and `StaticPlan`; nothing is read from the host.
    Masks transformers builds are checked outside a capture (where the step is also run eagerly)."""

    def __init__(self, store: PagedKVStore, bucket: _Bucket, config):
        Cache.__init__(self, layers=[])  # not KVFuseCache's: there are no rows to check
        self.store, self.config, self.bucket = store, config, bucket
        self.rows, self.hogwild = [], False
        self._step = self._pending = self._issued = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.bucket.seq_length

    def get_mask_sizes(self, query, layer_idx: int = 0) -> tuple[int, int]:
        q = query.shape[-1] if isinstance(query, torch.Tensor) else int(query)
        return self.bucket.seq_length + q, 0

    @property
    def batch_size(self) -> int:
        return self.bucket.size

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        marker = _PagedLayer(self, layer_idx, key_states, value_states)
        return marker, marker

    def _attend(self, module, query, layer: _PagedLayer, attention_mask, scaling, kwargs):
        window, softcap = _options(module, kwargs)
        if getattr(module, "is_causal", True) is False or kwargs.get("is_causal") is False:
            raise UnsupportedModel("DecodeGraphs: bidirectional (non-causal) attention is not supported")
        if kwargs.get("position_ids") is None:  # as KVFuseCache: nothing shows the keys were rotated where the rows go
            raise UnsupportedModel(f"DecodeGraphs: {_model_name(module)} does not pass position_ids to its attention, "
                                   f"so kvfuse cannot check that it rotates the new keys at the positions the rows "
                                   f"continue at")
        b, hq, q, d = query.shape
        bk = self.bucket
        # masks are checked eagerly only (a compiled runner's first step of each bucket runs eagerly)
        eager = not torch.compiler.is_compiling() and not (query.is_cuda and torch.cuda.is_current_stream_capturing())
        if attention_mask is not None and eager:
            _check_mask(attention_mask, q, bk.seq_length, window)
        k = layer.key.transpose(1, 2).reshape(b * q, *layer.key.shape[1::2])
        v = layer.value.transpose(1, 2).reshape(b * q, *layer.value.shape[1::2])
        self.store.write_(layer.layer, bk.slots, k, v)
        qf = query.transpose(1, 2).reshape(b * q, hq, d)
        out = attention(qf, self.store.k_cache[layer.layer], self.store.v_cache[layer.layer], bk.block_table,
                        bk.plan, sm_scale=scaling, softcap=softcap, window=window, check=False)
        return out.view(b, q, hq, d)


@dataclasses.dataclass
class _Bucket:
    """The fixed-address inputs of one batch size, its cache and its captured graph."""

    size: int
    max_kv: int
    max_segments: int
    plan: StaticPlan
    inputs: _Buffers  # input_ids, position_ids, slots (int32 on the device: cast inside the graph)
    block_table: torch.Tensor
    table_buf: _Buffers
    cache: _StaticCache | None = None
    graph: object = None
    logits: torch.Tensor | None = None
    seq_length: int = 0
    warm: bool = False  # run eagerly once (compiled runners)

    @property
    def slots(self) -> torch.Tensor:
        return self.inputs.views["slots"]


class DecodeGraphs:
    """Decode steps (one token per row) of ``model`` over rows of ``store``, replayed as CUDA graphs.

    Args:
        model: a causal LM running ``attn_implementation="kvfuse"``, on the store's device and dtype.
        store: the `kvfuse.PagedKVStore` the rows live in (`PagedKVStore.from_hf`). The runner holds
            ``ceil(max_batch / page_size)`` of its pages (scratch pages for padded rows) until `close`.
        max_batch: the largest batch; buckets are the powers of two up to it (and it).
        hogwild: rows are sibling threads that also see each other's earlier tokens (`kvfuse.batch_plan`).
        graphs: capture CUDA graphs (default: when the store is on a CUDA device); ``False`` runs the
            same static path eagerly.
        shared_prefix: read a long common prefix of sibling rows once per step (`kvfuse.batch_plan`'s
            automatic choice); ``False``: every row reads its own view.
        compile: compile the step's forward with ``torch.compile`` (inductor, ``fullgraph=True``,
            static shapes; a dict: more arguments of ``torch.compile``, e.g. ``{"mode":
            "max-autotune-no-cudagraphs"}``) before it is captured: the model's norms, rotary
            embedding, activations and K/V writes become a few fused kernels per layer. Each bucket
            compiles once (tens of seconds for a large model). The cache then reports its capacity
            as its length, so that no step specialises the compiled code to a length: transformers'
            mask (which the paged attention does not read) is built for the capacity.
        small_mm: with ``compile``, route the compiled forward's projections (``nn.Linear`` of at most
            16 rows: every weight of a decode step) to `kvfuse.small_mm.small_mm`'s Triton kernel,
            up to three products of one input per launch (q / k / v, gate / up), instead of cuBLAS
            (`kvfuse.small_mm.SmallMMPass`); ignored without ``compile`` or where Triton cannot run.

    `decode(rows, input_ids)` has `hf.decode`'s contract for one token per row: the rows grow by one
    token each (in place) and the logits ``[B, 1, vocab]`` are returned. A refused call (bad rows or
    ids, out of pages) changes nothing. Ids on the host are checked against the vocabulary; ids on the
    device (the previous step's choices) are not read, to keep the step free of synchronisation.
    """

    def __init__(self, model, store: PagedKVStore, *, max_batch: int = 8, hogwild: bool = False,
                 graphs: bool | None = None, shared_prefix: bool = True, compile: bool | dict = False,
                 small_mm: bool = True):
        if not isinstance(store, PagedKVStore):
            raise TypeError(f"DecodeGraphs: store must be a kvfuse.PagedKVStore, got {type(store).__name__}")
        config = getattr(model, "config", None)
        if config is None or getattr(config, "_attn_implementation", None) != NAME:
            raise ValueError(f"DecodeGraphs needs a model running attn_implementation={NAME!r}")
        why = unsupported_attention(config)
        if why:
            raise UnsupportedModel("DecodeGraphs: " + "; ".join(why))
        if cache_shape(config) != (store.num_layers, store.num_kv_heads, store.head_dim):
            raise ValueError(f"DecodeGraphs: the model caches (layers, KV heads, head_dim) = {cache_shape(config)}, "
                             f"the store holds {(store.num_layers, store.num_kv_heads, store.head_dim)}")
        param = next(model.parameters())
        if param.device != store.device or param.dtype != store.k_cache.dtype:
            raise ValueError(f"DecodeGraphs: the model is on {param.device} in {param.dtype}, the store on "
                             f"{store.device} in {store.k_cache.dtype}")
        self.max_batch = check_int("DecodeGraphs: max_batch", max_batch, lo=1)
        self.model, self.store, self.hogwild, self.shared_prefix = model, store, bool(hogwild), bool(shared_prefix)
        self.graphs = store.device.type == "cuda" if graphs is None else bool(graphs)
        if self.graphs and store.device.type != "cuda":
            raise ValueError("DecodeGraphs: graphs=True needs a store on a CUDA device")
        if not isinstance(compile, (bool, dict)):
            raise TypeError(f"DecodeGraphs: compile must be a bool or a dict of torch.compile arguments, got "
                            f"{type(compile).__name__}")
        opts = {"fullgraph": True, "dynamic": False, **(compile if isinstance(compile, dict) else {})}
        self.compile = compile is not False
        if not isinstance(small_mm, bool):
            raise TypeError(f"DecodeGraphs: small_mm must be a bool, got {type(small_mm).__name__}")
        self.small_mm = small_mm
        self._compiled = torch.compile(_own_copy(_step_forward), **opts) if self.compile else None
        self._entries = 0  # buckets made for the compiled forward (each is one entry of its cache)
        self.buckets = sorted({min(1 << i, self.max_batch) for i in range(self.max_batch.bit_length() + 1)})
        self._scratch = store._alloc_ids(-(-self.max_batch // store.page_size))  # padded rows write here
        self._buckets: dict[tuple[str, int], _Bucket] = {}  # (layout, rows) -> bucket
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None

    def close(self) -> None:
        """Drop the graphs (and the compiled forward) and give the scratch page back."""
        if self._scratch is not None:
            self.store.decref(self._scratch)
            self._scratch = None
        self._buckets.clear()
        self._compiled = None

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def decode(self, rows: list[PagedSequence], input_ids: torch.Tensor) -> torch.Tensor:
        rows = _check_rows("DecodeGraphs.decode", rows, "rows")
        if self._scratch is None:
            raise RuntimeError("DecodeGraphs.decode: this runner was closed")
        if rows[0].store is not self.store:
            raise ValueError("DecodeGraphs.decode: the rows belong to another store")
        B = len(rows)
        if B > self.max_batch:
            raise ValueError(f"DecodeGraphs.decode: {B} rows, max_batch={self.max_batch}")
        if not isinstance(input_ids, torch.Tensor) or input_ids.shape != (B, 1) or input_ids.dtype not in (
                torch.int32, torch.int64):
            raise ValueError(f"DecodeGraphs.decode: input_ids must be an int tensor [B={B}, 1], got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        vocab = getattr(self.model.config, "vocab_size", None)
        if input_ids.device.type == "cpu" and vocab and input_ids.numel() and not (
                0 <= int(input_ids.min()) and int(input_ids.max()) < vocab):
            raise ValueError(f"DecodeGraphs.decode: input_ids must lie in [0, vocab_size={vocab})")
        need = sum(r.pages_needed(1) for r in rows)
        if need > self.store.num_free:
            raise OutOfPages(f"DecodeGraphs.decode: out of pages: this step needs {need}, {self.store.num_free} free")
        size = next(b for b in self.buckets if b >= B)
        undo = [r.snapshot() for r in rows]
        try:
            positions = [r.next_position for r in rows]
            ps = self.store.page_size
            slots = []  # `reserve(1)` of each row, its slot as a Python int (no tensors per row)
            for r in rows:
                start = r._grow(1)
                slots.append(r.pages[start // ps] * ps + start % ps)
            key, plan, tables, pad_slots = self._step_plan(rows, size)
            bucket = self._bucket(key, plan, tables)
            self._load(bucket, plan, tables, input_ids, positions, slots, pad_slots)
            logits = self._run(bucket)
        except Exception:
            for r, snap in reversed(list(zip(rows, undo))):
                r.restore(snap)
            raise
        return logits[:B].clone()

    def _step_plan(self, rows, size: int):
        """``(bucket key, host plan, block table rows, slots of the padded rows)`` of a step of ``rows``
        padded to ``size``: sibling rows of a long common prefix as one sequence that reads the prefix once
        (`kvfuse.batch_plan`'s ``shared_prefix``), other rows one sequence each."""
        B, n_pad, ps = len(rows), size - len(rows), self.store.page_size
        shared = shared_view(rows, [1] * B, pad_last=True) if self.shared_prefix and not self.hogwild else None
        if shared is None:
            tables, graphs = row_graphs(rows, [1] * B, hogwild=self.hogwild)
            plan = AttentionPlan(AttentionSpec(graphs + [_PAD_GRAPH] * n_pad, [1] * size))
            pad = self._scratch[0] * ps
            return ("rows", size), plan, tables + [[self._scratch[0]]] * n_pad, [pad] * n_pad
        table, segs, q_tokens = shared
        off = sum(s.length for s in segs)  # page-aligned: the padded rows' tokens fill scratch pages
        segs = segs + [Segment(f"pad-row-{j}", 1) for j in range(n_pad)]
        plan = AttentionPlan(AttentionSpec([SegmentGraph(segs)], q_tokens=[q_tokens + list(range(off, off + n_pad))]))
        scratch = self._scratch[: -(-n_pad // ps)]
        return ("shared", size), plan, [table + scratch], [scratch[j // ps] * ps + j % ps for j in range(n_pad)]

    def _bucket(self, key, plan: AttentionPlan, tables) -> _Bucket:
        """The bucket of ``key`` (layout, rows), made (again, with doubled capacity) when the plan
        outgrows it."""
        bk = self._buckets.get(key)
        n_seg = plan.ancestors.shape[-1]
        width = max(len(t) for t in tables)
        ps = self.store.page_size
        if bk is not None and plan.max_kv <= bk.max_kv and n_seg <= bk.max_segments:
            return bk
        max_kv = max(bk.max_kv * 2 if bk else 0, _pow2(max(plan.max_kv, width * ps, 256)))
        max_seg = max(bk.max_segments * 2 if bk else 0, _pow2(max(n_seg, 8)))
        dev = self.store.device
        size = key[1]
        rows = 1 if key[0] == "shared" else size
        sp = StaticPlan(rows, size // rows, max_kv, max_seg, device=dev)
        inputs = _Buffers({"input_ids": (torch.int32, (size, 1)), "position_ids": (torch.int32, (size, 1)),
                           "slots": (torch.int32, (size,))}, dev)
        table_buf = _Buffers({"block_table": (torch.int32, (rows, -(-max_kv // ps)))}, dev)
        bk = _Bucket(size, max_kv, max_seg, sp, inputs, table_buf.views["block_table"], table_buf)
        bk.cache = _StaticCache(self.store, bk, self.model.config)
        self._buckets[key] = bk
        return bk

    def _load(self, bk: _Bucket, plan, tables, input_ids, positions, slots, pad_slots) -> None:
        h = bk.inputs.begin()
        B = len(positions)
        on_dev = input_ids.device == self.store.device and input_ids.device.type != "cpu"
        if not on_dev:
            h["input_ids"][:B].copy_(input_ids)
        h["input_ids"][B:] = 0
        n_pad = h["slots"].shape[0] - B
        h["position_ids"][:, 0] = torch.tensor(positions + [0] * n_pad, dtype=torch.int32)
        h["slots"][:] = torch.tensor(slots + list(pad_slots), dtype=torch.int32)
        bk.inputs.commit()
        if on_dev:  # ids the previous step computed on the device: copied there, no wait for that step
            bk.inputs.views["input_ids"][:B].copy_(input_ids)
        t = bk.table_buf.begin()["block_table"]
        t.zero_()
        for i, row in enumerate(tables):
            t[i, : len(row)] = torch.tensor(row, dtype=torch.int32)
        bk.table_buf.commit()
        bk.plan.load_(plan)
        bk.seq_length = bk.max_kv - 1 if self.compile else max(r for r in plan.kv_lens_list) - 1

    def _forward(self, bk: _Bucket) -> torch.Tensor:
        if self._compiled is None:
            return self._forward_eager(bk)
        if not bk.warm:  # once eagerly first: checks the masks, makes the plan's tile maps (no tracing of that)
            self._forward_eager(bk)
            bk.warm = True
            self._entries += 1
        # one compiled entry per bucket made (its own cache and buffers), in a cache of this runner's own
        with torch._dynamo.config.patch(recompile_limit=max(8, self._entries)), compile_pass(self.small_mm):
            return self._compiled(self.model, bk)

    def _forward_eager(self, bk: _Bucket) -> torch.Tensor:
        return _step_forward(self.model, bk)

    def _run(self, bk: _Bucket) -> torch.Tensor:
        if not self.graphs:
            return self._forward(bk)
        if bk.graph is None:
            self._capture(bk)
        bk.graph.replay()
        return bk.logits

    def _capture(self, bk: _Bucket) -> None:
        """Run the step once eagerly on a side stream (compiles kernels, checks masks), then capture it.
        The eager run's K/V writes are the replay's own (same inputs, same values)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward(bk)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            bk.logits = self._forward(bk)
        bk.graph = graph


def _step_forward(model, bk: _Bucket) -> torch.Tensor:
    """The step's forward: one token per row of the bucket, its logits."""
    v = bk.inputs.views
    out = model(input_ids=v["input_ids"].long(), position_ids=v["position_ids"].long(), use_cache=True,
                **{CACHE_KW: bk.cache})
    return out.logits


def _own_copy(fn):
    """``fn`` with a code object of its own. torch.compile keeps its compiled entries, and counts them
    against its recompile limit, per code object: each runner's entries (one per bucket) are then its
    own, not shared with every other runner of the process, and go away with it."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
