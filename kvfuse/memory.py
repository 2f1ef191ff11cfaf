"""KV "memory blocks": save a segment's K/V to safetensors, load it later, insert it at any position.

A block holds the K/V of all layers of some tokens (``[num_layers, n, num_kv_heads, head_dim]``, keys
rotated at the block's positions), those positions, the `RopeConfig` and a model identity string.
Loading checks the identity and RoPE config; inserting re-rotates a copy of the block's keys to the
new positions with `kvfuse.rerotate_` (float64 angles from the position differences) and writes it
into fresh pages of a `PagedKVStore`.

What an insertion means: the inserted tokens see what they saw when they were encoded (nothing of
the sequence they are inserted into: their segment has no parents), and later tokens see them. A block
encoded on its own and moved as a whole keeps all of its internal distances, so it is exactly the
cache a masked forward pass would give it at the new positions, at every layer.

Example:
    >>> import tempfile, os, torch, kvfuse
    >>> from kvfuse import memory
    >>> rope = kvfuse.RopeConfig(head_dim=8)
    >>> store = kvfuse.PagedKVStore(2, 16, 4, 1, 8, rope=rope)
    >>> seq = store.sequence(); _ = seq.append_kv(torch.randn(2, 5, 1, 8), torch.randn(2, 5, 1, 8))
    >>> path = os.path.join(tempfile.mkdtemp(), "block.safetensors")
    >>> memory.save(path, seq, identity="my-model")
    >>> block = memory.load(path, identity="my-model")
    >>> moved = memory.insert(store, block, position=1000)
    >>> moved.positions()[:2].tolist()
    [1000, 1001]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import torch

from kvfuse._checks import ANY_FLOAT, check_finite, check_instance, check_int, check_tensor
from kvfuse._deps import require
from kvfuse.paged import OutOfPages
from kvfuse.rerotate import check_positions, rerotate_
from kvfuse.rope import MAX_POSITION, ModelRope, RopeConfig, as_model_rope
from kvfuse.store import PagedKVStore, PagedSequence, SegmentInfo

__all__ = ["MemoryBlock", "model_identity", "save", "load", "insert"]

FORMAT = "kvfuse-memory-1"
_VOLATILE = {"transformers_version", "_name_or_path", "_attn_implementation", "_attn_implementation_internal",
             "dtype", "torch_dtype", "architectures", "use_cache", "output_attentions", "output_hidden_states"}


@dataclasses.dataclass
class MemoryBlock:
    """A saved segment: ``k``/``v`` ``[num_layers, n, num_kv_heads, head_dim]`` (keys rotated at
    ``positions``, int64 ``[n]``), the model's rotation (`ModelRope`), the model identity and
    free-form metadata."""

    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor
    rope: ModelRope
    identity: str
    metadata: dict

    @property
    def num_tokens(self) -> int:
        return self.k.shape[1]


def model_identity(config) -> str:
    """A short identity of a Hugging Face config: ``"<model_type>-<sha256 of the config>"``, ignoring
    fields that do not change the computation (versions, names, dtype, attention implementation).
    Two checkpoints with the same config share it: add a weights tag of your own if that matters."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    d = {k: v for k, v in d.items() if k not in _VOLATILE}
    digest = hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{d.get('model_type', 'model')}-{digest}"


def save(path: str, seq: PagedSequence, *, identity: str, segment: str | None = None,
         metadata: dict | None = None) -> None:
    """Write the real tokens of ``seq`` (or only its segment named ``segment``) to ``path`` (safetensors).

    Args:
        seq: a live `kvfuse.PagedSequence`; its store must carry a `RopeConfig`. Not modified.
        identity: the model identity (`model_identity`), checked again on `load`/`insert`.
        metadata: extra string-convertible entries stored in the file header.
    """
    save_file = require("safetensors.torch", "kvfuse.memory.save").save_file

    if seq.store.rope is None:
        raise ValueError("save: the sequence's store has no RopeConfig (PagedKVStore(..., rope=...))")
    k, v = seq.gather()
    positions = seq.positions()
    if segment is not None:
        real = [s for s in seq.segments if not s.pad]
        if segment not in [s.name for s in real]:
            raise ValueError(f"save: no segment {segment!r} in {seq}")
        start = 0
        for s in real:
            if s.name == segment:
                break
            start += s.length
        n = next(s.length for s in real if s.name == segment)
        k, v, positions = k[:, start:start + n], v[:, start:start + n], positions[start:start + n]
    header = {"format": FORMAT, "identity": str(identity), "rope": json.dumps(seq.store.rope.to_dict()),
              "metadata": json.dumps(metadata or {}, default=str)}
    save_file({"k": k.contiguous().cpu(), "v": v.contiguous().cpu(), "positions": positions.contiguous().cpu()},
              path, metadata=header)


def load(path: str, *, identity: str | None = None, rope: RopeConfig | None = None, device="cpu") -> MemoryBlock:
    """Read a block written by `save`. ``identity`` / ``rope``, when given, must match the file's
    (``ValueError`` otherwise, naming both)."""
    safe_open = require("safetensors", "kvfuse.memory.load").safe_open

    with safe_open(path, framework="pt", device=str(device)) as f:
        header = f.metadata() or {}
        if header.get("format") != FORMAT:
            raise ValueError(f"{path} is not a kvfuse memory block (format {header.get('format')!r})")
        tensors = {name: f.get_tensor(name) for name in ("k", "v", "positions")}
    rope_d = json.loads(header["rope"])
    block_rope = ModelRope.from_dict(rope_d) if "layers" in rope_d else \
        ModelRope.uniform(RopeConfig(**rope_d), tensors["k"].shape[0])  # files written before per-layer rotation
    block = MemoryBlock(tensors["k"], tensors["v"], tensors["positions"], block_rope, header["identity"],
                        json.loads(header.get("metadata", "{}")))
    _check(block, identity, rope)
    return block


def _check(block: MemoryBlock, identity, rope) -> None:
    if identity is not None and identity != block.identity:
        raise ValueError(f"memory block of model {block.identity!r} cannot be used with model {identity!r}")
    if rope is not None and as_model_rope(rope, block.rope.num_layers) != block.rope:
        raise ValueError(f"memory block RoPE config {block.rope} does not match {rope}")


def insert(store: PagedKVStore, block: MemoryBlock, *, into: PagedSequence | None = None, position: int | None = None,
           identity: str | None = None, name: str = "memory") -> PagedSequence:
    """Insert ``block`` into ``store`` at RoPE positions ``position, position + 1, ...``.

    The block's keys are re-rotated from their saved positions (`kvfuse.rerotate_`, on a copy in the
    store's dtype) and written to fresh pages. With ``into=None`` it becomes a new `PagedSequence` (default
    position: where it was saved), usable as a prefix to `kvfuse.fork` or to continue. With ``into`` it
    is appended to that sequence as a segment that sees nothing of it, at ``position`` (default
    ``into.next_position``), and a new empty continuation segment that sees both is opened; ``into``
    is modified and returned.

    Raises:
        ValueError, TypeError: bad arguments (``into`` of another store, a position that is not an int
            or overflows, block K/V or positions of the wrong shape or dtype, non-finite K/V), or the
            RoPE config, identity or K/V shape of the block do not match the store.
        OutOfPages: the store is out of pages.
        Nothing has changed when it raises.
    """
    check_instance("store", store, PagedKVStore)
    check_instance("block", block, MemoryBlock)
    if into is not None:
        check_instance("into", into, PagedSequence)
        if into.store is not store:
            raise ValueError("insert: into belongs to another store than store")
        into.check_live()
    if position is not None:
        position = check_int("position", position, lo=0, hi=MAX_POSITION)
    check_instance("name", name, str)
    if store.rope is None or store.rope != block.rope:
        raise ValueError(f"memory block RoPE config {block.rope} does not match the store's {store.rope}")
    _check(block, identity, None)
    for what, t in (("block.k", block.k), ("block.v", block.v)):
        check_tensor(what, t, ndim=4, dtype=ANY_FLOAT)
    if block.v.shape != block.k.shape:
        raise ValueError(f"block.k and block.v must have the same shape, got {list(block.k.shape)} and "
                         f"{list(block.v.shape)}")
    want = (store.num_layers, store.num_kv_heads, store.head_dim)
    got = (block.k.shape[0], block.k.shape[2], block.k.shape[3])
    if got != want:
        raise ValueError(f"memory block K/V has (layers, kv heads, head_dim) = {got}, the store {want}")
    n = block.num_tokens
    check_positions("block.positions", block.positions, n)
    check_finite("block.k", block.k)
    check_finite("block.v", block.v)
    if into is None:
        start = int(block.positions[0]) if position is None and n else (position or 0)
    else:
        start = into.next_position if position is None else position
    if start + n - 1 > MAX_POSITION:
        raise ValueError(f"insert: positions [{start}, {start + n}) overflow [0, {MAX_POSITION}]")
    new_pos = torch.arange(start, start + n, dtype=torch.int64)
    if not torch.equal(new_pos, block.positions.cpu().long()):
        store.rope.check_movable()
    need = store.pages_for(n)  # with into, the block starts on a fresh page: no shared page is written
    if need > store.num_free:
        raise OutOfPages(f"insert: out of pages ({need} needed, {store.num_free} free)")
    k = block.k.to(store.device, store.k_cache.dtype, copy=True)
    if n:  # the copy as a one-page pool; a backend that cannot run raises before the store changes
        dev = store.device
        rerotate_(k.unsqueeze(1), torch.arange(n, device=dev), block.positions.to(dev), new_pos.to(dev), store.rope)

    # everything is checked: nothing below raises
    if into is None:
        seq = store.sequence(name, position=start)
        slots = seq.reserve(n)
    else:
        seq = into
        pad = -seq.length % store.page_size
        seen = [s.name for s in seq.segments if not s.pad]
        if pad:
            seq.segments.append(SegmentInfo(store.unique_name("pad"), pad, (), 0, pad=True))
        seq.segments.append(SegmentInfo(store.unique_name(name), 0, (), start))
        slots = seq.reserve(n)
        seq.segments.append(SegmentInfo(store.unique_name("after-" + name), 0,
                                        (seen[-1], seq.segments[-1].name) if seen else (seq.segments[-1].name,),
                                        start + n))
    store.write_(None, slots, k, block.v.to(store.device))
    return seq
