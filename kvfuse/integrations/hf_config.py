"""What kvfuse needs to know about a Hugging Face model, read from its config (or the loaded model).

* `model_rope` / `model_rope_of`: the rotation of every layer (`kvfuse.ModelRope`): pairing (NeoX halves
  or GPT-J interleaved), partial rotary, theta and scaling per layer type, NoPE layers, and models whose
  tokens cannot be moved (no rotary embedding; scaling that depends on the current sequence length).
* `cache_shape`: ``(num_layers, num_kv_heads, head_dim)`` of what the model caches per layer.
* `unsupported_attention`: the attention features of a model that kvfuse's attention cannot compute.

A config does not say everything: how pairs are formed, whether ``partial_rotary_factor`` is honoured
and which layers skip the rotation live in each model's code. `_FAMILIES` records that per model type
(read off transformers 5.24's modeling code; every entry is checked against the model's own rotation by
``tests/test_model_zoo.py``). A model type not in it is read from its standard fields with NeoX pairs
over the whole head, with a warning saying so; rotary-looking fields kvfuse does not understand make it
refuse by name. Models kvfuse cannot handle exactly are refused (`UnsupportedModel`), never run wrong.

This module imports nothing from transformers: it reads configs by attribute, so it also takes the
older ``rope_theta`` / ``rope_scaling`` attributes and plain objects with the same fields.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable
from typing import Any

import torch

from kvfuse.rope import ROPE_TYPES, ModelRope, RopeConfig

__all__ = ["UnsupportedModel", "cache_shape", "model_rope", "model_rope_of", "uniform_rope", "unsupported_attention"]


class UnsupportedModel(ValueError):
    """A model (or one of its features) that kvfuse cannot run exactly; the message names it."""


# ---------------------------------------------------------------------- reading a config
def _text_config(config: Any) -> Any:
    """The decoder's config of a composite (multimodal) config; the config itself otherwise."""
    text = getattr(config, "text_config", None)
    if text is not None and _attr(config, "num_hidden_layers", "n_layer", "num_layers", "n_layers") is None:
        return text
    return config


def _attr(config: Any, *names: str, default=None):
    """The first of ``names`` that ``config`` sets to something other than None."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _model_type(config: Any) -> str:
    return getattr(config, "model_type", "") or type(config).__name__


def _num_layers(config: Any) -> int:
    n = _attr(config, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
    if n is None:
        raise UnsupportedModel(f"{_model_type(config)}: its config names no layer count (num_hidden_layers)")
    return int(n)


def _num_heads(config: Any) -> int:
    n = _attr(config, "num_attention_heads", "n_head", "num_heads", "n_heads")
    if n is None:
        raise UnsupportedModel(f"{_model_type(config)}: its config names no head count (num_attention_heads)")
    return int(n)


def _hidden_size(config: Any) -> int:
    return int(_attr(config, "hidden_size", "n_embd", "d_model"))


def _layer_types(config: Any, n: int) -> list[str | None]:
    types = getattr(config, "layer_types", None)
    if types is None:
        return [None] * n
    if len(types) != n:
        raise UnsupportedModel(f"{_model_type(config)}: layer_types has {len(types)} entries for {n} layers")
    return list(types)


# ---------------------------------------------------------------------- what configs do not say
def _no_rope_layers(config: Any, i: int, layer_type: str | None) -> bool:
    """SmolLM3 / Llama 4: ``no_rope_layers[i]`` is 1 where layer ``i`` rotates (0: a NoPE layer)."""
    flags = getattr(config, "no_rope_layers", None)
    if flags is None:
        return bool((i + 1) % getattr(config, "no_rope_layer_interval", 4))
    return bool(flags[i])


def _sliding_rotates(config: Any, i: int, layer_type: str | None) -> bool:
    """Cohere 2: only sliding-window layers rotate; full-attention layers are NoPE."""
    return layer_type == "sliding_attention" and getattr(config, "sliding_window", None) is not None


def _cohere2_moe_rotates(config: Any, i: int, layer_type: str | None) -> bool:
    """Cohere 2 MoE: like Cohere 2, plus leading dense layers when they all slide ("force_rope")."""
    mlp = getattr(config, "mlp_layer_types", None) or ()
    forced = i < len(mlp) and mlp[i] == "dense" and getattr(config, "prefix_dense_sliding_window_pattern", None) == 1
    return _sliding_rotates(config, i, layer_type) or forced


def _exaone4_rotates(config: Any, i: int, layer_type: str | None) -> bool:
    """EXAONE 4: with a sliding window, full-attention layers are NoPE ("global NoPE")."""
    return getattr(config, "sliding_window", None) is None or layer_type == "sliding_attention"


def _local_rotates(config: Any, i: int, layer_type: str | None) -> bool:
    """AFMoE: only sliding-window ("local") layers rotate."""
    return layer_type == "sliding_attention"


def _falcon_kv_heads(config: Any) -> int:
    """Falcon: the new decoder architecture broadcasts its KV groups to every head before caching;
    the old one caches one head under multi-query attention, else one per head."""
    if getattr(config, "new_decoder_architecture", False):
        return _num_heads(config)
    if getattr(config, "multi_query", True):
        return 1
    return int(_attr(config, "num_kv_heads", default=_num_heads(config)))


def _all_heads(config: Any) -> int:
    """Models with one KV head per query head, whatever ``num_key_value_heads`` says."""
    return _num_heads(config)


def _multi_query_kv_heads(config: Any) -> int:
    return 1 if getattr(config, "multi_query", False) else _num_heads(config)


def _falcon_no_rotary(config: Any) -> str | None:
    return "ALiBi position biases" if getattr(config, "alibi", False) else None


def _mpt_no_rotary(config: Any) -> str:
    attn = getattr(config, "attn_config", None)
    alibi = attn.get("alibi", True) if isinstance(attn, dict) else getattr(attn, "alibi", True)
    return "ALiBi position biases" if alibi else "learned absolute positions"


@dataclasses.dataclass(frozen=True)
class _Family:
    """What a model type's own code does that its config does not say.

    interleaved: the model pairs dims (2i, 2i+1) (GPT-J) instead of NeoX halves (i, i + rotary_dim/2).
    partial: where the rotary dims come from: "ignored" (the whole head rotates, whatever
        ``partial_rotary_factor`` says), "factor" (``int(head_dim * partial_rotary_factor)``, leading
        dims), "rotary_dim" (``config.rotary_dim``, GPT-J).
    default_partial: ``partial_rotary_factor`` of a config that does not set it (older configs).
    head_dim: "config" (``config.head_dim``, else hidden // heads) or "hidden" (always hidden // heads).
    theta: a base the model's code uses whatever its config says (GPT-J, CodeGen: 10000).
    rotates: ``(config, layer, layer_type) -> bool``, False on the model's NoPE layers.
    kv_heads: ``config -> int``, the KV heads the model caches (default ``num_key_value_heads``).
    no_rotary: ``config -> str | None``: what the model encodes positions with, when not RoPE.
    own_attention: the model computes attention in its own code, not through transformers' interface.
    negative_angles: the model rotates by ``-position * inv_freq`` (NanoChat's ``rotate_half`` returns
        ``(x2, -x1)``); kvfuse then rotates with negated frequencies (``inv_freq_values``).
    fields: rotary-looking config fields this family's rules read (beyond those read for every model).
    """

    interleaved: bool = False
    partial: str = "ignored"
    default_partial: float = 1.0
    head_dim: str = "config"
    theta: float | None = None
    rotates: Callable[[Any, int, str | None], bool] | None = None
    kv_heads: Callable[[Any], int] | None = None
    no_rotary: Callable[[Any], str | None] | None = None
    own_attention: bool = False
    negative_angles: bool = False
    fields: tuple[str, ...] = ()


_NEOX = _Family()
_NO_ROPE_FIELDS = ("no_rope_layers", "no_rope_layer_interval")
_LEARNED = _Family(no_rotary=lambda c: "learned absolute positions")
_FAMILIES: dict[str, _Family] = {
    # NeoX halves over the whole head (partial_rotary_factor ignored)
    **dict.fromkeys(("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
                     "gemma3_text", "starcoder2", "olmo", "olmo2", "olmo3", "olmoe", "flex_olmo", "granite",
                     "granitemoe", "granitemoeshared", "gpt_oss", "jetmoe", "ministral", "seed_oss",
                     "hunyuan_v1_dense", "hunyuan_v1_moe", "arcee", "apertus", "bitnet", "minimax_m2", "phimoe",
                     "solar_open", "doge", "vaultgemma", "cwm", "hyperclovax", "diffllama"), _NEOX),
    "nanochat": _Family(negative_angles=True),
    "falcon": _Family(head_dim="hidden", kv_heads=_falcon_kv_heads, no_rotary=_falcon_no_rotary, own_attention=True),
    "smollm3": _Family(rotates=_no_rope_layers, fields=_NO_ROPE_FIELDS),
    "exaone4": _Family(rotates=_exaone4_rotates),
    "exaone_moe": _Family(rotates=_exaone4_rotates),
    "afmoe": _Family(rotates=_local_rotates),
    # NeoX halves over the leading int(head_dim * partial_rotary_factor) dims
    "phi": _Family(partial="factor", default_partial=0.5),
    "phi3": _Family(partial="factor"),
    "gpt_neox": _Family(partial="factor", default_partial=0.25, head_dim="hidden", kv_heads=_all_heads),
    "stablelm": _Family(partial="factor", default_partial=0.25, head_dim="hidden"),
    "persimmon": _Family(partial="factor", default_partial=0.5, head_dim="hidden", kv_heads=_all_heads),
    "nemotron": _Family(partial="factor", default_partial=0.5),
    "glm4_moe": _Family(partial="factor", default_partial=0.5),
    # GPT-J interleaved pairs
    "cohere": _Family(interleaved=True),
    "cohere2": _Family(interleaved=True, rotates=_sliding_rotates),
    "cohere2_moe": _Family(interleaved=True, rotates=_cohere2_moe_rotates),
    "helium": _Family(interleaved=True),
    "ernie4_5": _Family(interleaved=True),
    "ernie4_5_moe": _Family(interleaved=True),
    "llama4_text": _Family(interleaved=True, rotates=_no_rope_layers, fields=_NO_ROPE_FIELDS),
    "glm": _Family(interleaved=True, partial="factor", default_partial=0.5),
    "glm4": _Family(interleaved=True, partial="factor", default_partial=0.5),
    "gptj": _Family(interleaved=True, partial="rotary_dim", head_dim="hidden", theta=10000.0, kv_heads=_all_heads,
                    fields=("rotary_dim",)),
    "codegen": _Family(interleaved=True, partial="rotary_dim", head_dim="hidden", theta=10000.0,
                       kv_heads=_all_heads, fields=("rotary_dim",)),
    # no rotary embedding
    "gpt2": _Family(no_rotary=lambda c: "learned absolute positions", kv_heads=_all_heads),
    "gpt_bigcode": _Family(no_rotary=lambda c: "learned absolute positions", kv_heads=_multi_query_kv_heads),
    "gpt_neo": _Family(no_rotary=lambda c: "learned absolute positions", own_attention=True),
    "opt": _LEARNED,
    "biogpt": _LEARNED,
    "xglm": _Family(no_rotary=lambda c: "sinusoidal absolute positions", own_attention=True),
    "bloom": _Family(no_rotary=lambda c: "ALiBi position biases", own_attention=True, kv_heads=_all_heads),
    "mpt": _Family(no_rotary=_mpt_no_rotary, own_attention=True, kv_heads=_all_heads),
}

# Layer types whose K/V kvfuse holds: attention over a (possibly windowed or chunked) causal past.
_ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")

# Models with layers that keep a recurrent state instead of (or next to) a K/V cache.
_RECURRENT = {
    **dict.fromkeys(("mamba", "mamba2", "falcon_mamba"), "state-space (Mamba) layers"),
    **dict.fromkeys(("jamba", "bamba", "zamba", "zamba2", "falcon_h1", "nemotron_h", "granitemoehybrid", "plamo2"),
                    "state-space (Mamba) layers next to attention"),
    **dict.fromkeys(("qwen3_next", "qwen3_5", "qwen3_5_moe", "olmo_hybrid", "kimi_linear"),
                    "linear-attention (delta-rule) layers next to attention"),
    "minimax": "lightning (linear) attention layers next to softmax attention",
    **dict.fromkeys(("lfm2", "lfm2_moe"), "short-convolution layers next to attention"),
    "recurrent_gemma": "recurrent (RG-LRU) layers next to local attention",
    "rwkv": "RWKV recurrent layers",
    "xlstm": "xLSTM recurrent layers",
}
_RECURRENT_FIELDS = ("mamba_d_state", "ssm_state_size", "linear_num_value_heads", "hybrid_override_pattern",
                     "layers_block_type", "attn_layer_period", "conv_L_cache", "linear_attn_config")

_MLA_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32", "minicpm3", "longcat_flash", "glm4_moe_lite", "youtu")
# Attention computations of one model type that kvfuse's kernels do not do (read off the modeling code).
_ATTENTION_FEATURES = {
    **dict.fromkeys(("gpt_oss", "openai_privacy_filter", "mimo_v2_flash"), "attention sinks (s_aux)"),
    "doge": "a dynamic, value-dependent attention mask (dynamic mask attention)",
}

# rope_parameters keys kvfuse understands (RopeConfig fields by their Hugging Face names, plus bookkeeping).
_SCALING_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
                   "beta_fast", "beta_slow", "truncate", "attention_factor", "mscale", "mscale_all_dim")
_ROPE_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor", *_SCALING_FIELDS}
# Config attributes about rotation that kvfuse reads for any model; others with "rope" or "rotary" in their
# name make a model refuse, unless its family reads them (_Family.fields).
_ROPE_ATTRS = {"rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor", "rotary_pct",
               "rotary_emb_base", "default_theta", "ignore_keys_at_rope_validation"}

# Scaling whose frequencies depend on the length of the current forward pass: a key rotated at position p
# in one pass is not the key the model would have at p + d in another.
_UNMOVABLE_SCALING = {
    "dynamic": "dynamic NTK scaling (its frequencies depend on the current sequence length)",
    "longrope": "longrope scaling (short or long factors, chosen by the current sequence length)",
}


def _family(config: Any) -> tuple[_Family, bool]:
    """(family, known) of a config's model type."""
    fam = _FAMILIES.get(_model_type(config))
    return (fam, True) if fam is not None else (_NEOX, False)


def _head_dim(config: Any, fam: _Family) -> int:
    if fam.head_dim == "hidden":
        return _hidden_size(config) // _num_heads(config)
    return int(_attr(config, "head_dim", default=_hidden_size(config) // _num_heads(config)))


# ---------------------------------------------------------------------- features kvfuse cannot hold
def _mla(config: Any) -> str | None:
    """``"<model> uses multi-head latent attention (MLA) (...)"`` when the model's K and V are not one head_dim."""
    mt = _model_type(config)
    fields = {k: getattr(config, k, None) for k in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim")}
    v, qk = fields["v_head_dim"], _attr(config, "qk_head_dim", "head_dim")
    shown = ", ".join(f"{k}={x}" for k, x in fields.items() if x is not None)
    if mt in _MLA_TYPES or fields["kv_lora_rank"] is not None or fields["qk_rope_head_dim"] is not None:
        return f"{mt} uses multi-head latent attention (MLA)" + (f" ({shown})" if shown else "")
    if v is not None and qk is not None and v != qk:
        return f"{mt} caches K and V of different head dims (head_dim={qk}, {shown}), as multi-head latent " \
               f"attention (MLA) does"
    return None


def _cache_refusals(config: Any) -> list[str]:
    """Why kvfuse's paged store cannot hold this model's cache (empty when it can)."""
    mt = _model_type(config)
    out = []
    if getattr(config, "is_encoder_decoder", False):
        out.append(f"{mt} is an encoder-decoder model (its decoder also cross-attends to encoder states)")
    mla = _mla(config)
    if mla:
        out.append(mla)
    if mt in _RECURRENT:
        out.append(f"{mt} is a linear-attention / state-space hybrid ({_RECURRENT[mt]})")
    else:
        types = sorted({t for t in (getattr(config, "layer_types", None) or ()) if t not in _ATTENTION_LAYER_TYPES})
        fields = [f for f in _RECURRENT_FIELDS if getattr(config, f, None) is not None]
        if types or fields:
            what = ", ".join([f"layer_types {types}"] * bool(types) + fields)
            out.append(f"{mt} is a linear-attention / state-space hybrid or has layers kvfuse does not hold ({what})")
    shared = _attr(config, "num_kv_shared_layers", "cla_share_factor")
    if shared or getattr(config, "use_cla", False):
        out.append(f"{mt} shares K/V across layers (cross-layer KV sharing: num_kv_shared_layers={shared})")
    if getattr(config, "global_head_dim", None) not in (None, getattr(config, "head_dim", None)):
        out.append(f"{mt} caches a different head_dim on some layers (global_head_dim={config.global_head_dim})")
    return out


def cache_shape(config: Any) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` of the K/V a Hugging Face model caches per layer.

    This is what the model stores, not what its config names: Falcon's old multi-query architecture
    caches one KV head, its new decoder architecture one per query head; models whose attention always
    uses ``hidden_size // num_attention_heads`` ignore a ``head_dim`` field. A composite (multimodal)
    config describes its text decoder.

    Raises:
        UnsupportedModel: naming the model and the feature, for models whose cache is not one K and one V
            of one shape per layer: multi-head latent attention (MLA: DeepSeek-V2/V3, ...), linear-attention /
            state-space hybrids (Mamba, Jamba, Falcon-H1, Qwen3-Next, ...), cross-layer KV sharing
            (Gemma 3n, ...), encoder-decoders.
    """
    config = _text_config(config)
    refusals = _cache_refusals(config)
    if refusals:
        raise UnsupportedModel("; ".join(refusals) + ": kvfuse's paged store cannot hold its cache")
    fam, _ = _family(config)
    heads = _num_heads(config)
    hkv = fam.kv_heads(config) if fam.kv_heads else int(_attr(config, "num_key_value_heads", default=heads))
    return _num_layers(config), hkv, _head_dim(config, fam)


def unsupported_attention(config: Any) -> list[str]:
    """The attention features of this model that kvfuse's attention cannot compute, each a short phrase
    naming the feature and the model (empty when kvfuse can run its attention).

    Sliding windows and attention-logit soft-capping are not listed (kvfuse's kernels take them), nor are
    the softmax scales models pass to the attention function (Granite's multiplier, Gemma's
    ``query_pre_attn_scalar``). Cache layouts kvfuse cannot hold (MLA, recurrent layers, cross-layer KV
    sharing, encoder-decoders) are listed as well; `cache_shape` raises for them.
    """
    config = _text_config(config)
    mt = _model_type(config)
    fam, _ = _family(config)
    out = _cache_refusals(config)
    if mt in _ATTENTION_FEATURES:
        out.append(f"{mt} uses {_ATTENTION_FEATURES[mt]}")
    chunk = getattr(config, "attention_chunk_size", None)
    if chunk is not None and "chunked_attention" in (getattr(config, "layer_types", None) or ("chunked_attention",)):
        out.append(f"{mt} uses chunked attention (attention_chunk_size={chunk})")
    if fam.no_rotary and fam.no_rotary(config) == "ALiBi position biases":
        out.append(f"{mt} uses ALiBi position biases")
    if fam.own_attention:
        out.append(f"{mt} computes attention in its own modeling code, not through transformers' attention interface")
    if getattr(config, "use_bidirectional_attention", False):
        out.append(f"{mt} uses bidirectional (non-causal) attention (use_bidirectional_attention=True)")
    if getattr(config, "add_cross_attention", False):
        out.append(f"{mt} has cross-attention layers (add_cross_attention=True)")
    if mt == "llama4_text" and getattr(config, "attn_temperature_tuning", False):
        out.append(f"{mt} scales the queries of its NoPE layers by their index in the cache (attn_temperature_tuning)")
    return out


# ---------------------------------------------------------------------- rotation
def _rope_parameters(config: Any, layer_types: list[str | None]) -> tuple[dict | None, dict[str, dict | None] | None]:
    """``(flat, by_layer_type)``: the model's RoPE parameters, one dict for every layer or one per layer type
    (transformers 5 nests ``rope_parameters`` by layer type, e.g. Gemma 3). Older configs (``rope_theta``,
    ``rope_scaling``, ``partial_rotary_factor`` attributes) are read as transformers 5 would convert them."""
    rp = getattr(config, "rope_parameters", None)
    if isinstance(rp, dict) and rp:
        labels = getattr(config, "_rope_type_labels", None) or [t for t in layer_types if t is not None]
        nested = [k for k in rp if k in labels]
        if nested:
            return None, {k: rp[k] for k in nested}
        return dict(rp), None
    if rp is not None and not isinstance(rp, dict):
        raise UnsupportedModel(f"{_model_type(config)}: rope_parameters must be a dict, got {type(rp).__name__}")
    params = dict(getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", _attr(config, "rope_theta", "rotary_emb_base"))
    prf = _attr(config, "partial_rotary_factor", "rotary_pct")
    if prf is not None:
        params.setdefault("partial_rotary_factor", prf)
    if params.get("rope_type", params.get("type")) in ("llama3", "yarn", "longrope"):
        omax = getattr(config, "original_max_position_embeddings", None)  # transformers prefers the attribute
        if omax is not None:
            params["original_max_position_embeddings"] = omax
    return {k: v for k, v in params.items() if v is not None}, None


def _rotary_dim(config: Any, fam: _Family, known: bool, params: dict, head_dim: int, rope_type: str) -> int:
    mt = _model_type(config)
    prf = params.get("partial_rotary_factor")
    if fam.partial == "rotary_dim":
        rd = getattr(config, "rotary_dim", None)
        if rd is None:  # the model then builds a table over hidden_size, which fits no head
            raise UnsupportedModel(f"{mt} with rotary_dim=None: its rotation table does not fit its heads")
        return int(rd)
    if fam.partial == "factor":
        return int(head_dim * (fam.default_partial if prf is None else prf))
    if prf is not None and prf != 1:
        if not known:
            raise UnsupportedModel(f"{mt}: kvfuse does not know whether this model type honours "
                                   f"partial_rotary_factor={prf} (an unverified model type)")
        if rope_type != "default":  # transformers' scaled initialisers honour it, this model's attention does not
            raise UnsupportedModel(f"{mt}: partial_rotary_factor={prf} with rope_type={rope_type!r} gives "
                                   f"frequencies for part of the head, but {mt} rotates the whole head")
    return head_dim


def _layer_rope(config: Any, fam: _Family, known: bool, params: dict, head_dim: int,
                nested: bool) -> RopeConfig | str:
    """The `RopeConfig` of one set of HF RoPE parameters, or the reason its rotation cannot be moved."""
    mt = _model_type(config)
    if not isinstance(params, dict):
        raise UnsupportedModel(f"{mt}: rope_parameters entries must be dicts, got {type(params).__name__}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in _UNMOVABLE_SCALING:
        return (f"{mt} uses RoPE rope_type={rope_type!r}, {_UNMOVABLE_SCALING[rope_type]}: its tokens cannot be "
                f"moved exactly; layout='shared' still works")
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModel(f"{mt}: RoPE rope_type={rope_type!r} is not one kvfuse knows (it knows {ROPE_TYPES} "
                               f"and refuses {tuple(_UNMOVABLE_SCALING)})")
    unknown = sorted(set(params) - _ROPE_KEYS)
    if unknown:
        raise UnsupportedModel(f"{mt}: rope_parameters holds {unknown}, which kvfuse does not understand")
    theta = fam.theta or params.get("rope_theta") or _attr(config, "rope_theta", default=10000.0)
    kw: dict = dict(head_dim=head_dim, rotary_dim=_rotary_dim(config, fam, known, params, head_dim, rope_type),
                    theta=theta, interleaved=fam.interleaved)
    if rope_type != "default":
        kw.update({k: params[k] for k in _SCALING_FIELDS if params.get(k) is not None}, rope_type=rope_type)
        if rope_type in ("llama3", "yarn") and "original_max_position_embeddings" not in kw:
            kw["original_max_position_embeddings"] = _attr(config, "original_max_position_embeddings",
                                                           "max_position_embeddings")
        if rope_type == "yarn":
            if "factor" not in kw:  # DeepSeek-style configs: the ratio of the two context lengths
                kw["factor"] = config.max_position_embeddings / kw["original_max_position_embeddings"]
            kw["beta_fast"] = params.get("beta_fast") or 32.0  # transformers: `or` (0 means the default)
            kw["beta_slow"] = params.get("beta_slow") or 1.0
            if nested:  # transformers reads `truncate` off the top level of rope_parameters, never per layer type
                kw["truncate"] = True
    try:
        rope = RopeConfig(**kw)
    except (TypeError, ValueError) as e:
        raise UnsupportedModel(f"{mt}: its RoPE parameters do not make a valid rotation: {e}") from e
    if fam.negative_angles:
        rope = dataclasses.replace(rope, inv_freq_values=tuple((-rope.inv_freq()).tolist()))
    return rope


def _unknown_rope_fields(config: Any, fam: _Family) -> list[str]:
    names = getattr(config, "__dict__", {})
    return sorted(n for n in names if re.search("rope|rotary", n, re.I) and n not in _ROPE_ATTRS
                  and n not in fam.fields and not n.startswith("_") and getattr(config, n) is not None)


def model_rope(config: Any) -> ModelRope:
    """The rotation of every layer of the Hugging Face model described by ``config`` (a
    ``PretrainedConfig``, or any object with the same fields).

    Returns a `ModelRope` whose ``layers[i]`` is layer ``i``'s `RopeConfig` (pairing, partial rotary,
    theta and scaling of its layer type) or None for a NoPE layer. Its ``unmovable`` is set, and every
    layer None, when tokens cannot be moved exactly: no rotary embedding (GPT-2, OPT, Bloom, MPT, Falcon
    with ALiBi), or scaling that depends on the current sequence length ("dynamic" NTK, "longrope").

    What a caller can get wrong: the rotation comes from the config alone; a model whose rotary buffer
    was rounded (``model.to(torch.bfloat16)``) rotates with other frequencies: use `model_rope_of`.

    Raises:
        UnsupportedModel: naming the model and what kvfuse does not understand: multi-head latent
            attention (its rotary dims are not the leading dims of one head), unknown RoPE types or
            parameters, rotary-looking fields of an unverified model type.

    Warns:
        UserWarning: for a model type kvfuse has not verified, read as NeoX pairs over the whole head.
    """
    config = _text_config(config)
    mt = _model_type(config)
    n = _num_layers(config)
    mla = _mla(config)
    if mla:
        raise UnsupportedModel(f"{mla}: its rotary dims are the trailing dims of a separate key part, which a "
                               f"RopeConfig cannot describe")
    fam, known = _family(config)
    unknown_fields = _unknown_rope_fields(config, fam)
    if unknown_fields:
        raise UnsupportedModel(f"{mt}: its config has rotary fields {unknown_fields} that kvfuse does not understand"
                               + ("" if known else " (an unverified model type)"))
    what = fam.no_rotary(config) if fam.no_rotary else None
    if what is None and not known and not any(_attr(config, a) for a in ("rope_parameters", "rope_scaling",
                                                                           "rope_theta", "partial_rotary_factor")):
        what = "no rotary field in its config"
    if what is not None:
        return ModelRope((None,) * n, mt, unmovable=f"{mt} has no rotary embedding ({what}): its tokens cannot be "
                                                    f"moved; layout='shared' still works")
    types = _layer_types(config, n)
    flat, by_type = _rope_parameters(config, types)
    head_dim = _head_dim(config, fam)
    made: dict[int, RopeConfig | str] = {}
    layers: list[RopeConfig | None] = []
    unmovable = None
    for i, lt in enumerate(types):
        if fam.rotates is not None and not fam.rotates(config, i, lt):
            layers.append(None)
            continue
        if by_type is not None:
            if lt not in by_type:
                raise UnsupportedModel(f"{mt}: layer {i} is a {lt!r} layer, which rope_parameters has no entry for")
            params = by_type[lt]
        else:
            params = flat
        if params is None:  # transformers' convention for a NoPE layer type
            layers.append(None)
            continue
        if id(params) not in made:
            made[id(params)] = _layer_rope(config, fam, known, params, head_dim, by_type is not None)
        rope = made[id(params)]
        if isinstance(rope, str):
            unmovable = unmovable or rope
            rope = None
        layers.append(rope)
    if unmovable is not None:
        return ModelRope((None,) * n, mt, unmovable=unmovable)
    if not known and any(c is not None for c in layers):
        warnings.warn(f"kvfuse has not verified model type {mt!r}: it reads its rotation as NeoX rotate-half pairs "
                      f"over the whole head, on every layer; check it against the model before moving tokens",
                      UserWarning, stacklevel=2)
    return ModelRope(tuple(layers), mt)


def uniform_rope(rope: ModelRope) -> RopeConfig:
    """The one `RopeConfig` every layer of ``rope`` uses (what `RopeConfig.from_hf` returns).

    Raises:
        UnsupportedModel: the model's tokens cannot be moved (the reason), or its layers rotate
            differently (NoPE layers, per-layer-type theta): use ``kvfuse.ModelRope.from_hf``.
    """
    if rope.unmovable is not None:
        raise UnsupportedModel(rope.unmovable)
    if rope.single is None:
        kinds = sorted({"NoPE" if c is None else f"theta={c.theta:g} {c.rope_type}" for c in rope.layers})
        raise UnsupportedModel(f"{rope.model} does not rotate every layer alike ({', '.join(kinds)}): a RopeConfig "
                               f"describes one rotation; use kvfuse.ModelRope.from_hf(config) (one per layer)")
    return rope.single


# ---------------------------------------------------------------------- the loaded model
_BUFFER = re.compile(r"(?:^|\.)(?:(?P<prefix>[A-Za-z0-9_]+?)_)?inv_freq$")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _rotary_buffers(model: Any, types: list[str | None]) -> dict:
    """The inverse-frequency buffers a loaded model rotates with: ``{key: (name, tensor)}`` with key a
    layer index (a rotary module inside layer i), a layer type (Gemma 3's ``full_attention_inv_freq``)
    or None (one module for every layer). Copies kept for resets (``original_inv_freq``) are skipped."""
    found: dict = {}
    for name, buf in model.named_buffers():
        m = _BUFFER.search(name)
        if m is None:
            continue
        prefix = m.group("prefix")
        layer = _LAYER.search(name)
        if layer is not None and prefix is None:
            key = int(layer.group(1))
        elif prefix in types and prefix is not None:
            key = prefix
        elif prefix is None:
            key = None
        else:  # original_inv_freq, long_inv_freq, ... and names kvfuse does not know
            continue
        if key in found and not torch.equal(found[key][1], buf):
            raise UnsupportedModel(f"{_model_type(model.config)}: several rotary buffers ({found[key][0]}, {name}) "
                                   f"hold different frequencies; kvfuse cannot tell which rotation the model uses")
        found.setdefault(key, (name, buf))
    return found


def _checked_values(mt: str, name: str, buf: torch.Tensor, rope: RopeConfig, sign: float) -> tuple[float, ...]:
    """The frequencies in ``buf`` (times ``sign``: -1 where the model rotates by negative angles) after
    checking that they are ``rope``'s, up to the buffer's rounding."""
    want = rope.inv_freq()
    got = buf.detach().double().cpu().reshape(-1) * sign
    if got.shape != want.shape:
        raise UnsupportedModel(f"{mt}: its rotary buffer {name} holds {got.numel()} frequencies, its config "
                               f"implies {want.numel()} (rotary_dim {rope.rotary_dim})")
    # float32 buffers may differ by a few ulp (computed on another device); bf16/fp16 ones are rounded.
    eps = 4 * 2.0**-24 if buf.dtype in (torch.float32, torch.float64) else torch.finfo(buf.dtype).eps
    rel = float(((got - want).abs() / want.abs().clamp_min(1e-30)).max())
    if rel > eps:
        raise UnsupportedModel(f"{mt}: its rotary buffer {name} ({buf.dtype}) differs from the frequencies its config "
                               f"implies by up to {rel:.2e} (relative); kvfuse cannot explain the difference")
    return tuple(got.tolist())


def _check_sincos_table(mt: str, name: str, table: torch.Tensor, rope: RopeConfig) -> None:
    """GPT-J / CodeGen keep a ``[positions, sin | cos]`` table instead of frequencies: check it is the
    table of ``rope``'s frequencies (up to the table's rounding)."""
    inv = rope.inv_freq().float()
    ang = torch.arange(table.shape[0], dtype=torch.int64).float()[:, None] * inv
    want = torch.cat((torch.sin(ang), torch.cos(ang)), dim=1)
    atol = 1e-5 if table.dtype in (torch.float32, torch.float64) else torch.finfo(table.dtype).eps
    if want.shape != table.shape or not torch.allclose(table.detach().float().cpu(), want, atol=atol, rtol=0):
        raise UnsupportedModel(f"{mt}: its sin/cos table {name} is not the table of the rotation its config implies")


def model_rope_of(model: Any) -> ModelRope:
    """`model_rope` of ``model.config``, with the inverse frequencies the loaded model rotates with.

    Every rotating layer takes the frequencies of its rotary buffer (one module for every layer, one per
    layer type such as Gemma 3's ``full_attention_inv_freq`` / ``sliding_attention_inv_freq``, or one per
    layer) as ``inv_freq_values``. They differ from the config's when the buffer was rounded:
    ``model.to(torch.bfloat16)`` casts it to bf16 (loading with ``dtype=`` keeps it in float32), and the
    model's keys are then rotated with those rounded frequencies. GPT-J / CodeGen keep a sin/cos table
    instead; it is checked against the config and the config's frequencies are kept (a rounded table is
    not an exact rotation, so moved keys then match the model only to the table's precision).

    Raises:
        UnsupportedModel: what `model_rope` raises; a buffer whose frequencies differ from the config's by
            more than the buffer's rounding, or several buffers for one layer that disagree.
    """
    rope = model_rope(model.config)
    if rope.unmovable is not None or all(c is None for c in rope.layers):
        return rope
    config = _text_config(model.config)
    mt = rope.model
    types = _layer_types(config, rope.num_layers)
    bufs = _rotary_buffers(model, types)
    tables = [(n, b) for n, b in model.named_buffers() if n.endswith("embed_positions") and b.dim() == 2]
    fam, _ = _family(config)
    layers = []
    for i, c in enumerate(rope.layers):
        hit = (bufs.get(i) or bufs.get(types[i]) or bufs.get(None)) if c is not None else None
        if hit is not None:
            sign = -1.0 if fam.negative_angles else 1.0
            c = dataclasses.replace(c, inv_freq_values=_checked_values(mt, hit[0], hit[1], c, sign))
        elif c is not None and tables and fam.partial == "rotary_dim":
            _check_sincos_table(mt, tables[0][0], tables[0][1], c)
        layers.append(c)
    return ModelRope(tuple(layers), mt)

