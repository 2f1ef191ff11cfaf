"""Small random-weight Hugging Face models and helpers to move their caches in and out of kvfuse."""

import torch

transformers = __import__("pytest").importorskip("transformers")
from transformers import AutoModelForCausalLM, DynamicCache  # noqa: E402


def small_config(arch: str):
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=512)
    if arch == "llama":
        return transformers.LlamaConfig(num_key_value_heads=2, rope_theta=10000.0, **common)
    if arch == "llama3":
        return transformers.LlamaConfig(num_key_value_heads=2, rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=64), **common)
    if arch == "qwen2":
        return transformers.Qwen2Config(num_key_value_heads=1, rope_theta=1e6, **common)
    if arch == "mistral":
        return transformers.MistralConfig(num_key_value_heads=2, sliding_window=None, **common)
    if arch == "gpt_neox":
        return transformers.GPTNeoXConfig(rotary_pct=0.5, use_parallel_residual=True, **common)
    raise KeyError(arch)


def make_model(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(small_config(arch), attn_implementation="eager")
    return model.float().eval()


def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(K, V)] per layer, each [B, Hkv, T, D], post-RoPE keys."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def cache_from(kv: list[tuple[torch.Tensor, torch.Tensor]], config) -> DynamicCache:
    cache = DynamicCache(config=config)
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache


def additive_mask(bool_mask: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """[Q, K] bool (True = may attend) -> [1, 1, Q, K] additive float mask for eager attention."""
    m = torch.zeros(bool_mask.shape, dtype=dtype)
    m.masked_fill_(~bool_mask, torch.finfo(dtype).min)
    return m[None, None]
