"""Hugging Face transformers integration: ``attn_implementation="kvfuse"`` and a paged cache.

Importing this module (or calling `register`) registers "kvfuse" with transformers' registration
APIs (``AttentionInterface`` and ``AttentionMaskInterface``; nothing is patched), so

    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="kvfuse")

runs every attention through kvfuse. Tested with the Llama, Qwen2, Mistral and GPT-NeoX families.

* With transformers' own caches (``DynamicCache``, or none) the attention goes through `kvfuse.sdpa`:
  causal / decode masks run on `kvfuse.attention`, any other mask (padding) on torch's SDPA.
* With a `KVFuseCache` the K/V live in a `kvfuse.PagedKVStore`; each batch row is a
  `kvfuse.Sequence` (a prefix, a thread, a merged sequence...), new tokens are appended to its pages
  and every layer runs ONE batched `kvfuse.attention` call over all rows with their segment masks
  (planned once per forward, reused by every layer). `decode` and `prefill` wrap this;
  `model.generate` works on a `KVFuseCache` too (see `KVFuseCache.generate_inputs`).

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

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvfuse.attention import attention
from kvfuse.compat import _is_bottom_right_causal, sdpa
from kvfuse.paged import to_device_async
from kvfuse.threads import BatchPlan, PagedKVStore, Sequence, batch_plan

__all__ = ["NAME", "KVFuseCache", "register", "attention_forward", "prefill", "decode"]

NAME = "kvfuse"


def _cache_keyword() -> str:
    """The keyword models take their cache by: ``cache`` (transformers >= 5.24), formerly ``past_key_values``."""
    import inspect

    from transformers import LlamaModel

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


_CACHE_KW = _cache_keyword()


@dataclasses.dataclass
class _PagedLayer:
    """What `KVFuseCache.update` returns instead of dense K/V: the layer lives in the paged store."""

    cache: KVFuseCache
    layer: int


@dataclasses.dataclass
class _Step:
    q_len: int
    positions: torch.Tensor  # int64 [B, q_len] expected position ids
    plan: BatchPlan
    layers: set
    checked: bool = False


class KVFuseCache(Cache):
    """A transformers ``Cache`` whose K/V live in a `kvfuse.PagedKVStore`.

    Args:
        store: the paged store (shaped for the model: `PagedKVStore.from_hf`; same dtype/device).
        rows: one live `kvfuse.Sequence` per batch row. New tokens are appended to them in place (their
            pages and the store's pools are modified); a forward of ``q`` tokens appends ``q`` to each.
        hogwild: rows are sibling threads that also see each other's earlier tokens (`kvfuse.batch_plan`).
        config: the model's config; used to check that the model runs ``attn_implementation="kvfuse"``.

    Only ``attn_implementation="kvfuse"`` can read this cache. Beam search, ``crop`` and the other
    batch reshaping methods are not supported (fork threads instead).
    """

    def __init__(self, store: PagedKVStore, rows: list[Sequence], *, hogwild: bool = False, config=None):
        super().__init__(layers=[])
        rows = list(rows)
        if not rows:
            raise ValueError("KVFuseCache needs at least one row")
        if any(r.store is not store for r in rows):
            raise ValueError("KVFuseCache: every row must belong to the given store")
        self.store, self.rows, self.hogwild, self.config = store, rows, hogwild, config
        self._step: _Step | None = None
        self._issued: tuple | None = None  # (tensor, its version, host copy) last returned by position_ids

    # ------------------------------------------------------------------ transformers' Cache API
    def update(self, key_states, value_states, layer_idx, cache_kwargs=None, **kwargs):
        """Append ``key_states``/``value_states`` (``[B, Hkv, q, D]``, keys rotated) of layer
        ``layer_idx`` to the rows' pages. Layer 0 of a forward reserves the rows' new slots and plans
        the batched attention; later layers reuse that."""
        if self.config is not None and getattr(self.config, "_attn_implementation", NAME) != NAME:
            raise ValueError(f"KVFuseCache needs attn_implementation={NAME!r}, the model runs "
                             f"{self.config._attn_implementation!r}")
        b, h, q, d = key_states.shape
        if b != len(self.rows):
            raise ValueError(f"KVFuseCache holds {len(self.rows)} rows, the forward has batch size {b}")
        if (h, d) != (self.store.num_kv_heads, self.store.head_dim):
            raise ValueError(f"KVFuseCache: the store holds {self.store.num_kv_heads} KV heads of "
                             f"{self.store.head_dim}, the model gives {h} of {d}")
        if self._step is None or layer_idx in self._step.layers:
            self._begin(q)
        self._step.layers.add(layer_idx)
        slots = self._slots
        k = key_states.transpose(1, 2).reshape(b * q, h, d)
        v = value_states.transpose(1, 2).reshape(b * q, h, d)
        self.store.write_(layer_idx, slots, k, v)
        marker = _PagedLayer(self, layer_idx)
        return marker, marker

    def _begin(self, q: int):
        """Reserve ``q`` slots per row and plan the step. Host work only: the slots and the plan's
        metadata reach the device in non-blocking copies (no synchronisation per step)."""
        need = sum(r.pages_needed(q) for r in self.rows)
        if need > self.store.num_free:
            raise RuntimeError(f"KVFuseCache: out of pages: this forward needs {need}, {self.store.num_free} free")
        starts = [r.next_position for r in self.rows]
        positions = torch.tensor(starts, dtype=torch.int64)[:, None] + torch.arange(q)
        self._slots = to_device_async(torch.cat([r._host_slots(r._grow(q), q) for r in self.rows]), self.store.device)
        self._step = _Step(q, positions, batch_plan(self.rows, q, hogwild=self.hogwild), set())

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Real tokens of row 0 (pads excluded)."""
        return self.rows[0].num_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return max(r.num_tokens for r in self.rows) + query_length, 0

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
        host = torch.tensor([r.next_position for r in self.rows], dtype=torch.int64)[:, None] + torch.arange(n)
        out = to_device_async(host, self.store.device)
        # a forward given exactly this tensor, unmodified, needs no device-side comparison
        self._issued = (out, out._version, host)
        return out

    def generate_inputs(self, input_ids: torch.Tensor) -> dict:
        """Keyword arguments for ``model.generate`` that continue the rows with ``input_ids``
        (``[B, n]``, new tokens only): the ids, a full-length attention mask, the right position ids
        and this cache. ``generate`` returns the new tokens followed by the generated ones."""
        b, n = input_ids.shape
        mask = torch.ones(b, max(r.num_tokens for r in self.rows) + n, dtype=torch.long, device=input_ids.device)
        return {"input_ids": input_ids, "attention_mask": mask,
                "position_ids": self.position_ids(n).to(input_ids.device), _CACHE_KW: self}

    def _attend(self, query, layer, attention_mask, scaling, kwargs):
        step = self._step
        b, hq, q, d = query.shape
        if not step.checked:
            pos = kwargs.get("position_ids")
            issued = self._issued
            if issued is not None and pos is issued[0] and pos._version == issued[1] and \
                    torch.equal(issued[2], step.positions):
                pos = None  # the tensor of position_ids(), unmodified and still right: no device round trip
            if pos is not None and not torch.equal(pos.to(step.positions.device).expand(b, q), step.positions):
                raise ValueError(f"position_ids {pos.tolist()} do not continue the cache's rows (expected "
                                 f"{step.positions.tolist()}); pass position_ids=cache.position_ids(n)")
            if attention_mask is not None and not _is_bottom_right_causal(attention_mask, q, attention_mask.shape[-1]):
                raise ValueError("KVFuseCache: padding or custom attention masks are not supported; each row is its "
                                 "own paged sequence and its segment graph is the mask")
            step.checked = True
        window = kwargs.get("sliding_window")
        if window is not None and max(r.length for r in self.rows) > window:
            raise NotImplementedError(f"KVFuseCache: sliding-window attention (window {window}) is not supported")
        if query.dtype != self.store.k_cache.dtype:
            raise ValueError(f"KVFuseCache: the model runs in {query.dtype}, "
                             f"the store holds {self.store.k_cache.dtype}")
        qf = query.transpose(1, 2).reshape(b * q, hq, d)
        out = attention(qf, self.store.k_cache[layer], self.store.v_cache[layer], step.plan.block_table,
                        step.plan.plan, sm_scale=scaling)
        return out.view(b, q, hq, d)


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs):
    """The function registered as ``attn_implementation="kvfuse"`` (transformers' attention signature).

    ``query`` ``[B, Hq, q, D]``; ``key``/``value`` ``[B, Hkv, S, D]`` from a transformers cache, or
    the paged layer of a `KVFuseCache`. Returns ``([B, q, Hq, D], None)``.
    """
    if isinstance(key, _PagedLayer):
        return key.cache._attend(query, key.layer, attention_mask, scaling, kwargs), None
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = query.shape[2] > 1 and attention_mask is None and is_causal
    out = sdpa(query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal, scale=scaling,
               enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``attn_implementation="kvfuse"`` with transformers (done on import; idempotent)."""
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


register()


# ---------------------------------------------------------------------- driving a model over sequences
@torch.no_grad()
def prefill(model, seq: Sequence, input_ids: torch.Tensor) -> torch.Tensor:
    """Append ``input_ids`` (``[1, n]``) to ``seq`` through ``model`` (``attn_implementation="kvfuse"``).
    Returns the logits ``[1, n, vocab]``; ``seq`` and its store are modified in place."""
    return decode(model, [seq], input_ids)


@torch.no_grad()
def decode(model, rows: list[Sequence], input_ids: torch.Tensor, *, hogwild: bool = False) -> torch.Tensor:
    """One forward of ``input_ids`` (``[B, q]``, row b continues ``rows[b]``) as ONE batch: every layer
    runs one `kvfuse.attention` call over all rows with their segment masks. Returns logits
    ``[B, q, vocab]``; the rows grow by ``q`` tokens (in place)."""
    rows = list(rows)
    cache = KVFuseCache(rows[0].store, rows, hogwild=hogwild, config=model.config)
    out = model(input_ids=input_ids, position_ids=cache.position_ids(input_ids.shape[1]), use_cache=True,
                **{_CACHE_KW: cache})
    return out.logits
