"""Hugging Face transformers integration: ``attn_implementation="kvfuse"`` and a paged cache.

Importing this module (or calling `register`) registers "kvfuse" with transformers' registration
APIs (``AttentionInterface`` and ``AttentionMaskInterface``; nothing is patched), so

    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="kvfuse")

runs every attention through kvfuse. Tested with transformers 5.10 and 5.24 on 45 variants of 35
architectures, each exact against eager attention or refused by name (`tests/test_hf_models.py`; rotations:
`tests/test_model_zoo.py`). Models that compute attention in their own code (Bloom, MPT, Falcon) are refused.

* With transformers' own caches (``DynamicCache``, ``StaticCache``, or none) the K/V are dense
  tensors: the attention is torch's SDPA (copying them into a paged pool at every layer would cost
  more than the attention), or with attention-logit soft-capping (Gemma 2) `kvfuse.sdpa`. This path
  is as fast as ``attn_implementation="sdpa"`` and compiles with ``cache_implementation="static"``.
* With a `KVFuseCache` the K/V live in a `kvfuse.PagedKVStore`; each batch row is a
  `kvfuse.PagedSequence` (a prefix, a thread, a merged sequence...), new tokens are appended to its pages
  and every layer runs ONE batched `kvfuse.attention` call over all rows with their segment masks
  (planned once per forward, reused by every layer), with the layer's sliding window (over RoPE
  positions) and soft-capping. `decode` and `prefill` wrap this; `model.generate` works on a
  `KVFuseCache` too (see `KVFuseCache.generate_inputs`).

What is refused, by name, rather than run wrong: models whose attention kvfuse cannot compute
(attention sinks, ALiBi / position biases, chunked attention, multi-head latent attention, ...;
`kvfuse.integrations.hf_config`), any attention argument a model passes that kvfuse does not know,
padding or custom masks on a `KVFuseCache`, and ``position_ids`` that do not continue the cache's rows.
A refused forward changes nothing: the rows' pages and segments are as before.

Positions: the model rotates new keys at the ``position_ids`` it is given. After a merge in the
"shared" layout the next position is not the token count, so pass ``position_ids`` (the helpers
here do); a forward whose ``position_ids`` disagree with the cache raises ``ValueError``.

Example:
    >>> import torch, transformers, kvfuse
    >>> from kvfuse.integrations import hf
    >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                num_attention_heads=4, num_key_value_heads=2)
    >>> model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="kvfuse").eval()
    >>> store = kvfuse.PagedKVStore.from_hf(cfg, num_pages=64, page_size=4)
    >>> prompt = store.sequence()
    >>> logits = hf.prefill(model, prompt, torch.tensor([[1, 2, 3, 4, 5]]))
    >>> threads = kvfuse.fork(prompt, 3)
    >>> logits = hf.decode(model, threads, logits[:, -1:].argmax(-1).repeat(3, 1))   # one batched step
    >>> merged = kvfuse.merge(threads, layout="shared")
    >>> out = model.generate(**hf.KVFuseCache(store, [merged], config=cfg).generate_inputs(torch.tensor([[7]])),
    ...                      max_new_tokens=4, do_sample=False)
    >>> out.shape
    torch.Size([1, 5])
"""

from __future__ import annotations

import dataclasses
import inspect
import weakref

import torch
import torch.nn.functional as F

try:
    from transformers import AttentionInterface, LlamaModel
    from transformers.cache_utils import Cache
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(f"kvfuse.integrations.hf needs transformers >= 5.10 ({e}): pip install 'kvfuse[hf]'") from e

from kvfuse.attention import AttentionPlan, AttentionSpec, attention
from kvfuse.batch import BatchPlan, batch_plan
from kvfuse.compat import sdpa
from kvfuse.integrations.hf_config import UnsupportedModel, cache_shape, unsupported_attention
from kvfuse.paged import OutOfPages, to_device_async
from kvfuse.segments import Segment, SegmentGraph
from kvfuse.store import PagedKVStore, PagedSequence
from kvfuse.threads import _check_rows

__all__ = ["NAME", "KVFuseCache", "UnsupportedModel", "register", "attention_forward", "prefill", "decode", "repair",
           "kv_deviation", "cache_kwargs", "output_cache"]

NAME = "kvfuse"

# The keyword models take their cache by: ``cache`` (transformers >= 5.24), formerly ``past_key_values``.
CACHE_KW = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def output_cache(out):
    """The cache a model's forward returned: ``out.cache`` (transformers >= 5.24), formerly
    ``out.past_key_values``."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def cache_kwargs(model, cache) -> dict:
    """``{keyword: cache}`` for ``model(...)``: the keyword this model's forward takes its cache by."""
    params = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in params else "past_key_values" if "past_key_values" in params else CACHE_KW: cache}

# Attention arguments models pass that do not change what the attention computes (bookkeeping, or
# packing information that transformers also turns into the mask).
_BOOKKEEPING = frozenset({
    "position_ids", "cache_position", "output_attentions", "output_hidden_states", "output_router_logits",
    "use_cache", "return_dict", "num_items_in_batch", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
    "max_length_k", "seq_idx", "position_embeddings", "layer_idx", "is_causal", "sliding_window", "softcap",
})
# Arguments kvfuse cannot honour, with what they mean (anything else unknown is refused by its name).
_MEANING = {"s_aux": "attention sinks", "sinks": "attention sinks", "position_bias": "a position bias (ALiBi / "
            "relative positions)", "alibi": "ALiBi position biases", "indices": "sparse attention indices",
            "block_indices": "block-sparse attention indices", "attention_chunk_size": "chunked attention"}


def _model_name(module) -> str:
    return getattr(getattr(module, "config", None), "model_type", None) or type(module).__name__


def _options(module, kwargs) -> tuple[int | None, float]:
    """The sliding window and soft-cap a layer asks for; raises `UnsupportedModel` on an argument
    kvfuse cannot honour (naming it and the model)."""
    for key, value in kwargs.items():
        if key in _BOOKKEEPING or value is None or value is False:
            continue
        model = _model_name(module)
        what = _MEANING.get(key, "an attention argument kvfuse does not know")
        raise UnsupportedModel(f"{model}: its attention passes {key}= ({what}), which kvfuse's attention does not "
                               f"compute; use another attn_implementation for this model")
    window = kwargs.get("sliding_window")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise UnsupportedModel(f"sliding_window={window!r}: kvfuse takes a window of >= 1 positions")
    softcap = kwargs.get("softcap") or 0.0
    return window, float(softcap)


@dataclasses.dataclass
class _PagedLayer:
    """What `KVFuseCache.update` returns instead of dense K/V: this layer's new K/V, written to the
    paged store by the attention call (after its checks), never before.

    Only kvfuse's attention function reads it. A model that uses it as a tensor computes attention in its
    own code, not through transformers' attention interface (Bloom; CodeGen on transformers 5.10): any
    tensor operation or attribute of it raises `UnsupportedModel`, before anything is written."""

    cache: KVFuseCache
    layer: int
    key: torch.Tensor  # [B, Hkv, q, D], keys rotated
    value: torch.Tensor

    def _refuse(self) -> UnsupportedModel:
        model = getattr(self.cache.config, "model_type", None) or "this model"
        return UnsupportedModel(f"KVFuseCache: {model} computes attention in its own modeling code (it used the "
                                f"cache's keys/values itself, not through transformers' attention interface), which "
                                f"a KVFuseCache cannot serve")

    def __getattr__(self, name):
        if name.startswith("__"):  # Python's protocols (copy, pickle) look these up and expect AttributeError
            raise AttributeError(name)
        raise self._refuse()

    def _refusing(self, *args):
        raise self._refuse()

    __getitem__ = __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __matmul__ = _refusing

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        flat = [*args, *(kwargs or {}).values()]
        flat += [x for a in flat if isinstance(a, (list, tuple)) for x in a]  # torch.cat([past, new])
        raise next(a for a in flat if isinstance(a, cls))._refuse()


@dataclasses.dataclass
class _Step:
    """One forward over the rows: the slots its tokens' K/V go to, the plan, the layers done, and how
    to undo it. An append step grows the rows (``undo``: each row's pages and segments before); a
    rewrite step (repair) overwrites tokens already in row 0 (``backup``: their K/V, all layers)."""

    q_len: int
    slots: torch.Tensor
    plan: BatchPlan
    positions: torch.Tensor  # int64 [B, q_len] the position_ids the forward must have
    undo: list | None = None
    backup: tuple | None = None
    probe: int | None = None  # stop at this layer and measure how far its fresh K/V are from the stored
    q_offset: int = 0  # row 0's tokens before the step (where transformers' masks put the first query)
    layers: set = dataclasses.field(default_factory=set)
    masks: set = dataclasses.field(default_factory=set)  # (id, window) of the masks checked in this step


class _ProbeDone(Exception):
    """Raised by a probing forward at its layer, carrying the deviation of every query token."""

    def __init__(self, deviation: torch.Tensor):
        super().__init__("probe done")
        self.deviation = deviation


class KVFuseCache(Cache):
    """A transformers ``Cache`` whose K/V live in a `kvfuse.PagedKVStore`.

    Args:
        store: the paged store (shaped for the model: `PagedKVStore.from_hf`; same dtype/device).
        rows: one live `kvfuse.PagedSequence` per batch row (distinct). New tokens are appended to them in
            place (their pages and the store's pools are modified); a forward of ``q`` tokens appends
            ``q`` to each.
        hogwild: rows are sibling threads that also see each other's earlier tokens (`kvfuse.batch_plan`).
        config: the model's config: checked against the store (layers, KV heads, head_dim) and for
            attention features kvfuse cannot compute (`UnsupportedModel`), and used to check that the
            model runs ``attn_implementation="kvfuse"``.

    Only ``attn_implementation="kvfuse"`` can read this cache. Beam search, ``crop`` and the other
    batch reshaping methods are not supported (fork threads instead). A forward that raises (a
    refused mask, wrong positions, an unsupported attention argument, out of pages) leaves every row
    as it was; a forward interrupted between layers by anything else is undone when the next one starts.
    Refused at its first layer, a forward has written nothing; refused at a later one (a mask of another
    layer type that is not its plain causal / sliding pattern), the rows, refcounts and free list are
    restored and the earlier layers' writes lie in slots that no row holds.
    """

    def __init__(self, store: PagedKVStore, rows: list[PagedSequence], *, hogwild: bool = False, config=None):
        super().__init__(layers=[])
        if not isinstance(store, PagedKVStore):
            raise TypeError(f"KVFuseCache: store must be a kvfuse.PagedKVStore, got {type(store).__name__}")
        rows = _check_rows("KVFuseCache", rows, "rows")
        if rows[0].store is not store:
            raise ValueError("KVFuseCache: every row must belong to the given store")
        if config is not None:
            why = unsupported_attention(config)
            if why:
                raise UnsupportedModel("KVFuseCache: " + "; ".join(why))
            want = cache_shape(config)
            have = (store.num_layers, store.num_kv_heads, store.head_dim)
            if want != have:
                raise ValueError(f"KVFuseCache: the model caches (layers, KV heads, head_dim) = {want}, the store "
                                 f"holds {have}; make it with PagedKVStore.from_hf(config, ...)")
        self.store, self.rows, self.hogwild, self.config = store, rows, bool(hogwild), config
        self._step: _Step | None = None
        self._pending: _Step | None = None  # a rewrite step the next forward runs (repair)
        self._issued: tuple | None = None  # (tensor, its version, host copy) last returned by position_ids

    # ------------------------------------------------------------------ transformers' Cache API
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """Take this layer's new keys/values (``[B, Hkv, q, D]``, keys rotated). They are written to the
        rows' pages by the layer's attention call, after its checks; nothing is written here."""
        if self.config is not None and getattr(self.config, "_attn_implementation", NAME) != NAME:
            raise ValueError(f"KVFuseCache needs attn_implementation={NAME!r}, the model runs "
                             f"{self.config._attn_implementation!r}")
        b, h, q, d = key_states.shape
        if b != len(self.rows):
            raise ValueError(f"KVFuseCache holds {len(self.rows)} rows, the forward has batch size {b}")
        if (h, d) != (self.store.num_kv_heads, self.store.head_dim) or value_states.shape != key_states.shape:
            raise ValueError(f"KVFuseCache: the store holds {self.store.num_kv_heads} KV heads of "
                             f"{self.store.head_dim}, the model gives keys {tuple(key_states.shape)} and values "
                             f"{tuple(value_states.shape)}")
        if not 0 <= layer_idx < self.store.num_layers:
            raise ValueError(f"KVFuseCache: layer {layer_idx} is outside the store's {self.store.num_layers} layers")
        marker = _PagedLayer(self, layer_idx, key_states, value_states)
        return marker, marker

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Real tokens of row 0 (pads excluded)."""
        return self.rows[0].num_tokens

    def get_mask_sizes(self, query, layer_idx: int = 0) -> tuple[int, int]:
        """``query``: the query length (transformers >= 5.x) or the cache positions tensor (earlier)."""
        q = query.shape[-1] if isinstance(query, torch.Tensor) else int(query)
        return max(r.num_tokens for r in self.rows) + q, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length()

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return True

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * self.store.num_layers

    @property
    def is_linear(self) -> list[bool]:
        return [False] * self.store.num_layers

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * self.store.num_layers

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    def __len__(self):
        return self.store.num_layers

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError("KVFuseCache does not support beam search, crop or batch reshaping; "
                                  "fork threads (kvfuse.fork) instead")

    crop = reorder_cache = batch_repeat_interleave = batch_select_indices = reset = _unsupported

    # ------------------------------------------------------------------ helpers
    def position_ids(self, n: int) -> torch.Tensor:
        """int64 ``[B, n]``: the positions of each row's next ``n`` tokens."""
        host = self._positions(n)
        out = to_device_async(host, self.store.device)
        # a forward given exactly this tensor, unmodified, needs no device-side comparison
        self._issued = (out, out._version, host)
        return out

    def _positions(self, n: int) -> torch.Tensor:
        return torch.tensor([r.next_position for r in self.rows], dtype=torch.int64)[:, None] + torch.arange(n)

    def generate_inputs(self, input_ids: torch.Tensor) -> dict:
        """Keyword arguments for ``model.generate`` that continue the rows with ``input_ids``
        (``[B, n]``, new tokens only): the ids, a full-length attention mask, the right position ids
        and this cache. ``generate`` returns the new tokens followed by the generated ones."""
        b, n = input_ids.shape
        mask = torch.ones(b, max(r.num_tokens for r in self.rows) + n, dtype=torch.long, device=input_ids.device)
        return {"input_ids": input_ids, "attention_mask": mask,
                "position_ids": self.position_ids(n).to(input_ids.device), CACHE_KW: self}

    # ------------------------------------------------------------------ one forward
    def _check_first_layer(self, module, query, layer: _PagedLayer, attention_mask, kwargs, want: torch.Tensor) -> None:
        """Everything a forward can be refused for, checked before the rows grow (or are rewritten)."""
        b, _, q, _ = query.shape
        if query.dtype != self.store.k_cache.dtype or layer.key.dtype != self.store.k_cache.dtype:
            raise ValueError(f"KVFuseCache: the model runs in {query.dtype}, the store holds "
                             f"{self.store.k_cache.dtype}")
        if want.shape != (b, q):
            raise ValueError(f"KVFuseCache: this forward has {q} tokens per row, the cache expects {want.shape[1]}")
        pos = kwargs.get("position_ids")
        if pos is None:  # transformers passes them wherever the model's attention forwards them
            raise UnsupportedModel(f"KVFuseCache: {_model_name(module)} does not pass position_ids to its attention, "
                                   f"so kvfuse cannot check that the positions it rotated the new keys at continue "
                                   f"the cache's rows; use transformers' own cache for this model")
        issued = self._issued
        if issued is not None and pos is issued[0] and pos._version == issued[1] and torch.equal(issued[2], want):
            pos = None  # the tensor of position_ids(), unmodified and still right: no device round trip
        if pos is not None and not torch.equal(pos.cpu().expand(b, q), want):
            raise ValueError(f"position_ids {pos.tolist()} do not continue the cache's rows (expected "
                             f"{want.tolist()}); pass position_ids=cache.position_ids(n)")
        if attention_mask is not None:
            _check_mask(attention_mask, q, self.rows[0].num_tokens, kwargs.get("sliding_window"))
        need = 0 if self._pending is not None else sum(r.pages_needed(q) for r in self.rows)
        if need > self.store.num_free:
            raise OutOfPages(f"KVFuseCache: out of pages: this forward needs {need}, {self.store.num_free} free")

    def _begin(self, q: int) -> None:
        """Reserve ``q`` slots per row and plan the step. Host work only: the slots and the plan's
        metadata reach the device in non-blocking copies (no synchronisation per step)."""
        undo = [r.snapshot() for r in self.rows]
        positions = self._positions(q)
        try:
            slots = torch.cat([r.reserve(q, on_host=True) for r in self.rows])
            self._step = _Step(q, to_device_async(slots, self.store.device),
                               batch_plan(self.rows, q, hogwild=self.hogwild, shared_prefix=None), positions,
                               undo=undo)
        except Exception:
            self._undo(_Step(q, None, None, positions, undo=undo))
            raise

    def _undo(self, step: _Step) -> None:
        """Put every row back as it was before the step: pages it took are released (in the reverse order
        of their allocation, so the free list is as before too), K/V it overwrote restored."""
        if step.undo is not None:
            for r, snapshot in reversed(list(zip(self.rows, step.undo))):
                r.restore(snapshot)
        if step.backup is not None:
            k, v = step.backup
            self.store.k_cache.view(self.store.num_layers, -1, *k.shape[2:])[:, step.slots] = k
            self.store.v_cache.view(self.store.num_layers, -1, *v.shape[2:])[:, step.slots] = v
        self._step = None

    def _rewrite(self, tokens: torch.Tensor, *, probe: int | None = None) -> None:
        """Make the next forward recompute row 0's tokens at storage indices ``tokens`` (ascending),
        in place: each sees every token before it in the row's order (pads excepted), at its own
        position; nothing grows. With ``probe``, the forward stops at that layer instead (nothing
        written) and reports how far each token's fresh K/V are from the stored ones."""
        if len(self.rows) != 1:
            raise ValueError("KVFuseCache: a rewrite takes one row")
        r, st = self.rows[0], self.store
        graph = _sees_everything_before(r)
        plan = AttentionPlan(AttentionSpec([graph], q_tokens=[tokens.tolist()], device=st.device))
        ps = st.page_size
        pages = torch.tensor(r.pages, dtype=torch.int64)
        slots = to_device_async(pages[tokens // ps] * ps + tokens % ps, st.device)
        positions = r.positions(include_pads=True)[tokens][None]
        block_table = to_device_async(torch.tensor(r.pages, dtype=torch.int32), st.device)[None]
        step = _Step(tokens.numel(), slots, BatchPlan(block_table, plan), positions, probe=probe)
        if probe is None:
            view = (st.num_layers, -1, st.num_kv_heads, st.head_dim)
            step.backup = (st.k_cache.view(view)[:, slots].clone(), st.v_cache.view(view)[:, slots].clone())
        self._pending = step

    def _attend(self, module, query, layer: _PagedLayer, attention_mask, scaling, kwargs):
        window, softcap = _options(module, kwargs)
        if getattr(module, "is_causal", True) is False or kwargs.get("is_causal") is False:
            raise UnsupportedModel("KVFuseCache: bidirectional (non-causal) attention is not supported")
        step = self._step
        if step is None or layer.layer in step.layers:  # a new forward
            if step is not None and len(step.layers) < self.store.num_layers and step.probe is None:
                self._undo(step)  # the previous forward stopped between layers
            q_offset = self.rows[0].num_tokens
            if self._pending is not None:
                self._check_first_layer(module, query, layer, attention_mask, kwargs, self._pending.positions)
                self._step, self._pending = self._pending, None
            else:
                self._check_first_layer(module, query, layer, attention_mask, kwargs, self._positions(query.shape[2]))
                self._begin(query.shape[2])
            self._step.q_offset, self._step.masks = q_offset, {(id(attention_mask), window)}
            step = self._step
        if step.probe is not None and layer.layer == step.probe:
            raise _ProbeDone(self._deviation(step, layer))
        try:
            b, hq, q, d = query.shape
            if q != step.q_len:
                raise ValueError(f"KVFuseCache: layer {layer.layer} has {q} queries, the forward {step.q_len}")
            if attention_mask is not None and (id(attention_mask), window) not in step.masks:
                # a mask the first layer did not see (another layer type's): refused here, the step undone
                _check_mask(attention_mask, q, step.q_offset, window)
                step.masks.add((id(attention_mask), window))
            k = layer.key.transpose(1, 2).reshape(b * q, *layer.key.shape[1::2])
            v = layer.value.transpose(1, 2).reshape(b * q, *layer.value.shape[1::2])
            if step.probe is None:
                self.store.write_(layer.layer, step.slots, k, v)
            qf = query.transpose(1, 2).reshape(b * q, hq, d)
            out = attention(qf, self.store.k_cache[layer.layer], self.store.v_cache[layer.layer],
                            step.plan.block_table, step.plan.plan, sm_scale=scaling, softcap=softcap, window=window)
        except Exception:
            self._undo(step)
            raise
        step.layers.add(layer.layer)
        return out.view(b, q, hq, d)

    def _deviation(self, step: _Step, layer: _PagedLayer) -> torch.Tensor:
        """float32 [q]: ||K_fresh - K_stored|| + ||V_fresh - V_stored|| over heads, per query token
        (CacheBlend's selection signal)."""
        st = self.store
        view = (-1, st.num_kv_heads, st.head_dim)
        k = layer.key[0].transpose(0, 1).float()
        v = layer.value[0].transpose(0, 1).float()
        k0 = st.k_cache[layer.layer].view(view)[step.slots].float()
        v0 = st.v_cache[layer.layer].view(view)[step.slots].float()
        self._step = None
        return ((k - k0).flatten(1).norm(dim=1) + (v - v0).flatten(1).norm(dim=1)).cpu()


def _sees_everything_before(seq: PagedSequence) -> SegmentGraph:
    """``seq``'s segments (with their positions) where every real segment sees all real segments
    before it: the mask of one causal pass over the sequence's tokens in its order (pads unseen)."""
    segs, before = [], []
    for s in seq.segments:
        if s.pad:
            segs.append(Segment(s.name, s.length))
        else:
            segs.append(Segment(s.name, s.length, tuple(before), s.position))
            before.append(s.name)
    return SegmentGraph(segs)


# The masks `_mask` made from a 2D attention mask that pads some token (by id; a mask lives for one forward).
_PADDED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _mask(*args, attention_mask=None, config=None, **kwargs):
    """transformers' SDPA mask (the "kvfuse" mask interface).

    It refuses the models whose attention kvfuse cannot compute (`unsupported_attention`) before any layer
    runs: models that compute attention in their own code (Bloom, MPT) call no kvfuse function but this
    one, and would misread its boolean masks. It remembers the masks made from a padding mask: a
    `KVFuseCache` refuses those at the first layer even where its sliding window hides the padded tokens
    (Gemma 2 / 3, Cohere 2: the full-attention layers after it would see them)."""
    # (inside torch.compile the model has run eagerly before, where this check ran)
    why = unsupported_attention(config) if config is not None and not torch.compiler.is_compiling() else []
    if why:
        raise UnsupportedModel(f"attn_implementation={NAME!r}: " + "; ".join(why))
    mask = sdpa_mask(*args, attention_mask=attention_mask, config=config, **kwargs)
    # (compiled forwards run transformers' own caches: a KVFuseCache is not compileable, so no lookup is needed)
    if isinstance(mask, torch.Tensor) and attention_mask is not None and not torch.compiler.is_compiling() \
            and not bool(attention_mask.all()):
        _PADDED[id(mask)] = mask
    return mask


def _check_mask(mask: torch.Tensor, q: int, q_offset: int, window: int | None) -> None:
    """A mask transformers built for a `KVFuseCache` must be its plain causal (sliding) pattern, and not
    made from a padding mask: any other is padding or a custom mask, which a paged row (whose mask is its
    segment graph) cannot take."""
    ok = (isinstance(mask, torch.Tensor) and _PADDED.get(id(mask)) is not mask and mask.dtype == torch.bool
          and mask.dim() == 4 and mask.shape[-2] == q)
    if ok:
        kv = mask.shape[-1]
        qi = q_offset + torch.arange(q, device=mask.device)[:, None]
        ki = torch.arange(kv, device=mask.device)[None, :]
        want = ki <= qi
        if window is not None:
            want &= ki > qi - window
        ok = bool((mask == want).all())
    if not ok:
        raise ValueError("KVFuseCache: padding or custom attention masks are not supported; each row is its own "
                         "paged sequence and its segment graph is the mask")


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs):
    """The function registered as ``attn_implementation="kvfuse"`` (transformers' attention signature).

    ``query`` ``[B, Hq, q, D]``; ``key``/``value`` ``[B, Hkv, S, D]`` from a transformers cache, or
    the paged layer of a `KVFuseCache`. Returns ``([B, q, Hq, D], None)``. Raises `UnsupportedModel`
    for an attention argument kvfuse does not compute.
    """
    if isinstance(key, _PagedLayer):
        return key.cache._attend(module, query, key, attention_mask, scaling, kwargs), None
    _, softcap = _options(module, kwargs)  # a sliding window arrives as the mask transformers built
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = query.shape[2] > 1 and attention_mask is None and is_causal
    # Dense K/V (transformers' own caches): torch's SDPA. kvfuse's kernels read paged pools, and copying the
    # K/V into one at every layer and step costs more than the attention; with soft-capping (which torch's
    # SDPA lacks) `kvfuse.sdpa` computes it.
    attend = sdpa if softcap else F.scaled_dot_product_attention
    extra = {"softcap": softcap} if softcap else {}
    out = attend(query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal, scale=scaling,
                 enable_gqa=query.shape[1] != key.shape[1], **extra)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``attn_implementation="kvfuse"`` with transformers (done on import; idempotent)."""
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, _mask)


register()


# ---------------------------------------------------------------------- driving a model over sequences
@torch.no_grad()
def prefill(model, seq: PagedSequence, input_ids: torch.Tensor) -> torch.Tensor:
    """Append ``input_ids`` (``[1, n]``) to ``seq`` through ``model`` (``attn_implementation="kvfuse"``).
    Returns the logits ``[1, n, vocab]``; ``seq`` and its store are modified in place."""
    return decode(model, [seq], input_ids)


@torch.no_grad()
def decode(model, rows: list[PagedSequence], input_ids: torch.Tensor, *, hogwild: bool = False) -> torch.Tensor:
    """One forward of ``input_ids`` (``[B, q]``, row b continues ``rows[b]``) as ONE batch: every layer
    runs one `kvfuse.attention` call over all rows with their segment masks. Returns logits
    ``[B, q, vocab]``; the rows grow by ``q`` tokens (in place)."""
    rows = _check_rows("decode", rows, "rows")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != len(rows):
        raise ValueError(f"decode: input_ids must be an int tensor [B={len(rows)}, q], got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    cache = KVFuseCache(rows[0].store, rows, hogwild=hogwild, config=model.config)
    out = model(input_ids=input_ids, position_ids=cache.position_ids(input_ids.shape[1]), use_cache=True,
                **{CACHE_KW: cache})
    return out.logits


def _one_logit(model) -> dict:
    """``logits_to_keep=1`` where the model takes it (the logits of a recompute are not needed)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _check_repair_args(model, seq: PagedSequence, token_ids: torch.Tensor) -> PagedSequence:
    seq = _check_rows("repair", [seq], "seq")[0]
    if not isinstance(token_ids, torch.Tensor) or token_ids.dim() != 1 or token_ids.dtype not in (torch.int32,
                                                                                                 torch.int64):
        raise TypeError(f"repair: token_ids must be a 1-D int tensor (the ids of every real token of seq, in "
                        f"order), got {getattr(token_ids, 'shape', type(token_ids).__name__)}")
    if token_ids.numel() != seq.num_tokens:
        raise ValueError(f"repair: token_ids holds {token_ids.numel()} ids, seq has {seq.num_tokens} tokens")
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and token_ids.numel() and not 0 <= int(token_ids.min()) <= int(token_ids.max()) < vocab:
        raise ValueError(f"repair: token_ids must lie in [0, vocab_size={vocab})")
    return seq


def _real_to_storage(seq: PagedSequence, tokens, what: str) -> torch.Tensor:
    """Real-token indices (pads excluded) -> sorted distinct storage indices, validated."""
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 1 or tokens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{what}: tokens must be a 1-D int tensor of token indices, got {tokens.dtype} "
                            f"{tuple(tokens.shape)}")
        tokens = tokens.cpu().long()
    else:
        tokens = list(tokens)
        if any(not isinstance(t, int) or isinstance(t, bool) for t in tokens):
            raise TypeError(f"{what}: tokens must be ints (indices of seq's real tokens)")
        tokens = torch.tensor(tokens, dtype=torch.int64)
    n = seq.num_tokens
    if tokens.numel() and not (0 <= int(tokens.min()) and int(tokens.max()) < n):
        raise ValueError(f"{what}: tokens must be indices in [0, num_tokens={n})")
    tokens = torch.unique(tokens)
    return seq.token_index()[tokens], tokens


@torch.no_grad()
def repair(model, seq: PagedSequence, token_ids: torch.Tensor, tokens) -> int:
    """Recompute, in place, the K/V of chosen tokens of ``seq`` at every layer, each token seeing
    every token before it in ``seq``'s order (CacheBlend / EPIC-style selective recompute after a
    merge). One forward of the chosen tokens through ``model`` (``attn_implementation="kvfuse"``):
    at each layer their fresh K/V overwrite the stored ones, then they attend over the sequence
    (``kvfuse.attention`` with queries at their own indices).

    Recomputing every token of a sequentially merged sequence reproduces the text merge (one causal
    pass over the concatenated tokens) exactly; fewer tokens trade cost for fidelity.

    Args:
        seq: a live `kvfuse.PagedSequence` (e.g. from `kvfuse.merge`). Its pages are written in place (only
            the chosen tokens' slots); its segments and positions do not change.
        token_ids: int ``[seq.num_tokens]``: the id of every real token of ``seq``, in order.
        tokens: indices (into the real tokens, pads excluded) of the tokens to recompute; duplicates
            are ignored, order does not matter.
    Returns:
        the number of tokens recomputed. Nothing is written if the call is refused; a forward that
        fails part-way restores the chosen tokens' K/V.
    """
    seq = _check_repair_args(model, seq, token_ids)
    storage, real = _real_to_storage(seq, tokens, "repair")
    if not storage.numel():
        return 0
    cache = KVFuseCache(seq.store, [seq], config=model.config)
    cache._rewrite(storage)
    dev = seq.store.device
    pos = seq.positions()[real][None].to(dev)
    model(input_ids=token_ids.to(dev)[real][None], position_ids=pos, use_cache=True, **_one_logit(model),
          **{CACHE_KW: cache})
    return int(storage.numel())


@torch.no_grad()
def kv_deviation(model, seq: PagedSequence, token_ids: torch.Tensor, *, layer: int = 1) -> torch.Tensor:
    """How far each real token's stored K/V at ``layer`` are from what it would get seeing every token
    before it (float32 ``[seq.num_tokens]``: the norm of the K difference plus that of the V
    difference, over heads). CacheBlend's selection signal: one forward of every token through the
    first ``layer`` layers (their attention with full visibility), stopped at ``layer``; nothing is
    written. Layer 0's K/V depend on the token alone, so ``layer`` must be >= 1."""
    seq = _check_repair_args(model, seq, token_ids)
    if not isinstance(layer, int) or isinstance(layer, bool) or not 1 <= layer < seq.store.num_layers:
        raise ValueError(f"kv_deviation: layer must be an int in [1, {seq.store.num_layers})")
    if not seq.num_tokens:
        return torch.zeros(0)
    storage = seq.token_index()
    cache = KVFuseCache(seq.store, [seq], config=model.config)
    cache._rewrite(storage, probe=layer)
    dev = seq.store.device
    try:
        model(input_ids=token_ids.to(dev)[None], position_ids=seq.positions()[None].to(dev), use_cache=True,
              **_one_logit(model), **{CACHE_KW: cache})
    except _ProbeDone as done:
        return done.deviation
    raise RuntimeError("kv_deviation: the model never reached its attention layer "
                       f"{layer} (does it run attn_implementation='kvfuse'?)")
