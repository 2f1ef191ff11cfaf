"""What kvfuse needs to know about a Hugging Face model, read from its config (or the loaded model).

* `model_rope` / `model_rope_of`: the rotation of every layer (`kvfuse.ModelRope`).
* `cache_shape`: the shape of what the model caches per layer (layers, KV heads, head_dim).

Models kvfuse cannot handle exactly are refused by name (`UnsupportedModel`), never run silently wrong.
This module imports nothing from transformers: it reads configs by attribute.
"""

from __future__ import annotations

from typing import Any

from kvfuse.rope import ModelRope, RopeConfig

__all__ = ["UnsupportedModel", "model_rope", "model_rope_of", "cache_shape", "unsupported_attention"]


class UnsupportedModel(ValueError):
    """A model (or one of its features) that kvfuse cannot run exactly; the message names it."""


def _model_type(config: Any) -> str:
    return getattr(config, "model_type", "") or type(config).__name__


def cache_shape(config: Any) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` of the K/V the model caches per layer."""
    n_heads = config.num_attention_heads
    hkv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return config.num_hidden_layers, hkv, head_dim


def model_rope(config: Any) -> ModelRope:
    """The rotation of every layer of the model described by ``config``."""
    num_layers = cache_shape(config)[0]
    return ModelRope.uniform(RopeConfig.from_hf(config), num_layers, _model_type(config))


def model_rope_of(model: Any) -> ModelRope:
    """`model_rope` of ``model.config``, with the inverse frequencies the loaded model rotates with."""
    num_layers = cache_shape(model.config)[0]
    return ModelRope.uniform(RopeConfig.from_hf_model(model), num_layers, _model_type(model.config))


def unsupported_attention(config: Any) -> list[str]:
    """The attention features of this model that kvfuse's attention cannot compute (empty: none)."""
    return []
