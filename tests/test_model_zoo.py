"""Every Hugging Face architecture right or refused: kvfuse's reading of ~45 tiny transformers models.

For each variant a tiny random model (a few layers, hidden 32-64, vocab 100) is built from an explicit
config, and:

(a) rotation. The model runs the same tokens twice, at positions ``p..`` and at ``p + d..``. Its own
    code rotates the keys (its rotary module(s), its apply function, its partial-rotary slicing, its
    NoPE layers), and a uniform shift changes nothing else in a RoPE model, so the keys it caches at
    ``p + d`` are its rotation by ``d`` of the keys at ``p``, on every layer. kvfuse's
    `rerotate_` (torch backend) of the ``p`` keys in a layer-stacked pool, with the `ModelRope` read off
    the model, must equal them to 2e-5 (float32; deeper layers see the float32 rounding of the model's
    two passes, ~1e-6) and leave NoPE layers' bytes untouched. Or: the variant is expected to be
    unmovable / refused, and the message must name the feature.
(b) cache shape. `cache_shape` equals the shapes in the DynamicCache of a real forward pass.
(c) `unsupported_attention` names the features kvfuse's attention cannot compute.
"""

import functools
import warnings
from types import SimpleNamespace

import pytest
import torch

import kvfuse
from kvfuse.integrations.hf_config import (
    UnsupportedModel,
    cache_shape,
    model_rope,
    model_rope_of,
    unsupported_attention,
)

transformers = pytest.importorskip("transformers")
T = transformers
V, H, INTER, L, MAXPOS = 100, 64, 64, 3, 256
TOKENS, P0, DELTA = 7, 3, 29
PAGE = 4


def _kw(**k):
    base = dict(vocab_size=V, hidden_size=H, intermediate_size=INTER, num_hidden_layers=L, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=MAXPOS, pad_token_id=0, bos_token_id=1,
                eos_token_id=2)
    base.update(k)
    return base


def _cfg(cls_name, **k):
    cls = getattr(T, cls_name, None)
    if cls is None:
        pytest.skip(f"transformers {T.__version__} has no {cls_name}")
    return cls(**k)


def _auto(model_type, **k):
    """A llama-shaped config of ``model_type`` (models whose configs take the usual field names)."""
    if model_type not in T.CONFIG_MAPPING:
        pytest.skip(f"transformers {T.__version__} has no model type {model_type!r}")
    return T.AutoConfig.for_model(model_type, **_kw(**{"head_dim": 16, **k}))


# Model types whose tiny llama-shaped config needs nothing else; each is a variant of its own.
LLAMA_SHAPED = ["olmo3", "olmoe", "flex_olmo", "granitemoe", "granitemoeshared", "jetmoe", "ministral", "seed_oss",
                "hunyuan_v1_dense", "hunyuan_v1_moe", "arcee", "apertus", "bitnet", "minimax_m2", "phimoe",
                "solar_open", "doge", "vaultgemma", "cwm", "hyperclovax", "diffllama", "nanochat", "glm4_moe",
                "ernie4_5_moe"]


def _gpt_style(**k):
    return dict(vocab_size=V, pad_token_id=0, bos_token_id=1, eos_token_id=2, **k)


SLIDING_FULL = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
EXACT = "exact"

# name -> (config factory, expectation): EXACT, ("unmovable", words the reason must contain) or
# ("refused", words the UnsupportedModel message must contain).
VARIANTS = {
    "llama": (lambda: _cfg("LlamaConfig", **_kw(rope_theta=5e5)), EXACT),
    "llama-llama3": (lambda: _cfg("LlamaConfig", **_kw(rope_parameters=dict(
        rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))), EXACT),
    "llama-linear": (lambda: _cfg("LlamaConfig", **_kw(rope_parameters=dict(rope_type="linear", rope_theta=1e4,
                                                                            factor=4.0))), EXACT),
    "llama-yarn": (lambda: _cfg("LlamaConfig", **_kw(rope_parameters=dict(
        rope_type="yarn", rope_theta=1e4, factor=4.0, original_max_position_embeddings=64))), EXACT),
    "llama-dynamic": (lambda: _cfg("LlamaConfig", **_kw(rope_parameters=dict(rope_type="dynamic", rope_theta=1e4,
                                                                             factor=2.0))),
                      ("unmovable", ["llama", "dynamic", "sequence length"])),
    "mistral": (lambda: _cfg("MistralConfig", **_kw(head_dim=32, sliding_window=None)), EXACT),
    "mixtral": (lambda: _cfg("MixtralConfig", **_kw(num_local_experts=2, num_experts_per_tok=1)), EXACT),
    "qwen2": (lambda: _cfg("Qwen2Config", **_kw(num_key_value_heads=1, rope_theta=1e6)), EXACT),
    "qwen2_moe": (lambda: _cfg("Qwen2MoeConfig", **_kw(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32,
                                                       shared_expert_intermediate_size=32)), EXACT),
    "qwen3": (lambda: _cfg("Qwen3Config", **_kw(head_dim=24)), EXACT),
    "qwen3_moe": (lambda: _cfg("Qwen3MoeConfig", **_kw(num_experts=2, num_experts_per_tok=1,
                                                       moe_intermediate_size=32)), EXACT),
    "gemma": (lambda: _cfg("GemmaConfig", **_kw(head_dim=16)), EXACT),
    "gemma2": (lambda: _cfg("Gemma2Config", **_kw(head_dim=16, sliding_window=8, query_pre_attn_scalar=16)), EXACT),
    # released Gemma 3: sliding layers theta 1e4, full-attention layers theta 1e6 with linear scaling 8
    "gemma3": (lambda: _cfg("Gemma3TextConfig", **_kw(
        head_dim=16, sliding_window=8, query_pre_attn_scalar=16, num_hidden_layers=4, layer_types=SLIDING_FULL,
        rope_parameters={"sliding_attention": dict(rope_type="default", rope_theta=1e4),
                         "full_attention": dict(rope_type="linear", rope_theta=1e6, factor=8.0)})), EXACT),
    "cohere": (lambda: _cfg("CohereConfig", **_kw()), EXACT),
    "cohere2": (lambda: _cfg("Cohere2Config", **_kw(num_hidden_layers=4, sliding_window=8, layer_types=[
        "sliding_attention", "sliding_attention", "full_attention", "sliding_attention"])), EXACT),
    "cohere2_moe": (lambda: _cfg("Cohere2MoeConfig", **_kw(num_hidden_layers=4, head_dim=16, sliding_window=8)), EXACT),
    "glm": (lambda: _cfg("GlmConfig", **_kw(head_dim=16)), EXACT),
    "glm4": (lambda: _cfg("Glm4Config", **_kw(head_dim=16)), EXACT),
    "helium": (lambda: _cfg("HeliumConfig", **_kw(head_dim=16)), EXACT),
    "ernie4_5": (lambda: _cfg("Ernie4_5Config", **_kw(head_dim=16)), EXACT),
    "phi": (lambda: _cfg("PhiConfig", **_kw()), EXACT),
    "phi3": (lambda: _cfg("Phi3Config", **_kw()), EXACT),
    "phi3-longrope": (lambda: _cfg("Phi3Config", **_kw(original_max_position_embeddings=128, rope_parameters=dict(
        rope_type="longrope", rope_theta=1e4, short_factor=[1.0] * 8, long_factor=[2.0] * 8))),
        ("unmovable", ["phi3", "longrope", "sequence length"])),
    "gpt_neox": (lambda: _cfg("GPTNeoXConfig", **_kw(rotary_pct=0.25)), EXACT),
    "gptj": (lambda: _cfg("GPTJConfig", **_gpt_style(n_embd=H, n_layer=L, n_head=4, rotary_dim=8, n_positions=MAXPOS)),
             EXACT),
    "codegen": (lambda: _cfg("CodeGenConfig", **_gpt_style(n_embd=H, n_layer=L, n_head=4, rotary_dim=8,
                                                          n_positions=MAXPOS, n_ctx=MAXPOS)), EXACT),
    "stablelm": (lambda: _cfg("StableLmConfig", **_kw()), EXACT),
    "persimmon": (lambda: _cfg("PersimmonConfig", **_kw()), EXACT),
    "starcoder2": (lambda: _cfg("Starcoder2Config", **_kw()), EXACT),
    "olmo": (lambda: _cfg("OlmoConfig", **_kw()), EXACT),
    "olmo2": (lambda: _cfg("Olmo2Config", **_kw()), EXACT),
    "granite": (lambda: _cfg("GraniteConfig", **_kw(attention_multiplier=0.5)), EXACT),
    "nemotron": (lambda: _cfg("NemotronConfig", **_kw()), EXACT),
    "smollm3": (lambda: _cfg("SmolLM3Config", **_kw(num_hidden_layers=4, no_rope_layer_interval=2)), EXACT),
    "exaone4": (lambda: _cfg("Exaone4Config", **_kw(num_hidden_layers=4, sliding_window=8, layer_types=[
        "sliding_attention", "sliding_attention", "sliding_attention", "full_attention"])), EXACT),
    "afmoe": (lambda: _cfg("AfmoeConfig", **_kw(head_dim=16, sliding_window=8, num_experts=2, num_experts_per_tok=1,
                                                moe_intermediate_size=32, num_dense_layers=1,
                                                layer_types=["sliding_attention", "full_attention",
                                                             "sliding_attention"])), EXACT),
    "llama4": (lambda: _cfg("Llama4TextConfig", **_kw(
        num_hidden_layers=4, head_dim=16, intermediate_size_mlp=64, num_local_experts=2, no_rope_layer_interval=2,
        attn_temperature_tuning=False, attention_chunk_size=1024)), EXACT),
    "gpt_oss": (lambda: _cfg("GptOssConfig", **_kw(head_dim=16, num_local_experts=2, num_experts_per_tok=1,
                                                   sliding_window=8, layer_types=SLIDING_FULL[:3])), EXACT),
    "falcon": (lambda: _cfg("FalconConfig", **_gpt_style(hidden_size=H, num_hidden_layers=L, num_attention_heads=4,
                                                        new_decoder_architecture=True, num_kv_heads=2)), EXACT),
    "falcon-mqa": (lambda: _cfg("FalconConfig", **_gpt_style(hidden_size=H, num_hidden_layers=L, num_attention_heads=4,
                                                            multi_query=True)), EXACT),
    "falcon-alibi": (lambda: _cfg("FalconConfig", **_gpt_style(hidden_size=H, num_hidden_layers=L,
                                                              num_attention_heads=4, alibi=True, multi_query=False)),
                     ("unmovable", ["falcon", "no rotary embedding", "ALiBi"])),
    "gpt2": (lambda: _cfg("GPT2Config", **_gpt_style(n_embd=H, n_layer=L, n_head=4, n_positions=MAXPOS)),
             ("unmovable", ["gpt2", "no rotary embedding", "learned absolute positions", "layout='shared'"])),
    "gpt_bigcode": (lambda: _cfg("GPTBigCodeConfig", **_gpt_style(n_embd=H, n_layer=L, n_head=4, n_positions=MAXPOS,
                                                                 multi_query=True)),
                    ("unmovable", ["gpt_bigcode", "learned absolute positions"])),
    "opt": (lambda: _cfg("OPTConfig", **_gpt_style(hidden_size=H, num_hidden_layers=L, num_attention_heads=4,
                                                  ffn_dim=INTER, max_position_embeddings=MAXPOS,
                                                  word_embed_proj_dim=H)),
            ("unmovable", ["opt", "learned absolute positions"])),
    "bloom": (lambda: _cfg("BloomConfig", **_gpt_style(hidden_size=H, n_layer=L, n_head=4)),
              ("unmovable", ["bloom", "ALiBi"])),
    "mpt": (lambda: _cfg("MptConfig", **_gpt_style(d_model=H, n_layers=L, n_heads=4, max_seq_len=MAXPOS)),
            ("unmovable", ["mpt", "ALiBi"])),
    "deepseek_v3": (lambda: _cfg("DeepseekV3Config", **_kw(
        num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=16, n_routed_experts=2, num_experts_per_tok=1, moe_intermediate_size=32, first_k_dense_replace=1,
        n_group=1, topk_group=1)), ("refused", ["deepseek_v3", "multi-head latent attention (MLA)"])),
    "deepseek_v2": (lambda: _cfg("DeepseekV2Config", **_kw(
        num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=16, n_routed_experts=2, num_experts_per_tok=1, moe_intermediate_size=32)),
        ("refused", ["deepseek_v2", "multi-head latent attention (MLA)"])),
    "mamba": (lambda: _cfg("MambaConfig", vocab_size=V, hidden_size=H, num_hidden_layers=L, state_size=8),
              ("refused", ["mamba", "state-space"])),
    "jamba": (lambda: _cfg("JambaConfig", **_kw(num_experts=2, attn_layer_period=2, attn_layer_offset=1)),
              ("refused", ["jamba", "state-space"])),
    "falcon_h1": (lambda: _cfg("FalconH1Config", **_kw()), ("refused", ["falcon_h1", "state-space"])),
    "qwen3_next": (lambda: _cfg("Qwen3NextConfig", **_kw(head_dim=16, num_experts=2, num_experts_per_tok=1,
                                                         moe_intermediate_size=32)),
                   ("refused", ["qwen3_next", "linear-attention"])),
    "gemma3n": (lambda: _cfg("Gemma3nTextConfig", **_kw(head_dim=16, num_hidden_layers=4, num_kv_shared_layers=2,
                                                         intermediate_size=[INTER] * 4)),
                ("refused", ["gemma3n", "cross-layer KV sharing"])),
    "t5": (lambda: _cfg("T5Config", vocab_size=V, d_model=H, d_kv=16, d_ff=INTER, num_layers=2, num_heads=4),
           ("refused", ["t5", "encoder-decoder"])),
    "bart": (lambda: _cfg("BartConfig", vocab_size=V, d_model=H, encoder_layers=1, decoder_layers=1,
                          encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=INTER,
                          decoder_ffn_dim=INTER), ("refused", ["bart", "encoder-decoder"])),
}
# mixture-of-experts sizes small enough to build in milliseconds
SMALL_MOE = {
    "solar_open": dict(n_routed_experts=2, num_experts_per_tok=1, moe_intermediate_size=32),
    "glm4_moe": dict(n_routed_experts=2, num_experts_per_tok=1, moe_intermediate_size=32),
    "minimax_m2": dict(num_local_experts=2, num_experts_per_tok=1),
    "ernie4_5_moe": dict(moe_num_experts=2, moe_k=1, moe_intermediate_size=32),
    "olmoe": dict(num_experts=2, num_experts_per_tok=1),
    "phimoe": dict(num_local_experts=2, num_experts_per_tok=1),
}
VARIANTS.update({mt: (lambda mt=mt: _auto(mt, **SMALL_MOE.get(mt, {})), EXACT) for mt in LLAMA_SHAPED})
VARIANTS["exaone_moe"] = (lambda: _auto("exaone_moe", num_hidden_layers=4, sliding_window=8, layer_types=SLIDING_FULL,
                                        num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32), EXACT)
NAMES = list(VARIANTS)
MOVABLE = [n for n in NAMES if VARIANTS[n][1] == EXACT]
HELD = [n for n in NAMES if VARIANTS[n][1] == EXACT or VARIANTS[n][1][0] == "unmovable"]
REFUSED = [n for n in NAMES if VARIANTS[n][1] != EXACT and VARIANTS[n][1][0] == "refused"]


def _config(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return VARIANTS[name][0]()


def _model(name):
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(_config(name), attn_implementation="eager")
    return model.float().eval()


@functools.cache
def _shared_model(name):
    """One model per variant for the tests that do not modify it (building them is most of the time)."""
    return _model(name)


def _cached(model, ids, positions=None):
    """The keys / values the model caches, as [L, T, Hkv, D] (post-rotation keys)."""
    kwargs = {} if positions is None else dict(position_ids=positions[None])
    with torch.no_grad():
        out = model(ids[None], use_cache=True, **kwargs)
    layers = out.past_key_values.layers
    k = torch.stack([lay.keys[0].transpose(0, 1) for lay in layers])
    v = torch.stack([lay.values[0].transpose(0, 1) for lay in layers])
    return k, v


def _assert_names(message, words):
    for w in words:
        assert w in message, f"{w!r} not in {message!r}"


@pytest.mark.parametrize("name", MOVABLE)
def test_rerotation_equals_the_models_own_rotation(name):
    model = _shared_model(name)
    ids = torch.randint(3, V, (TOKENS,), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(TOKENS) + P0
    k_p, _ = _cached(model, ids, pos)
    k_q, _ = _cached(model, ids, pos + DELTA)  # the model's own rotation at p + d
    rope = model_rope_of(model)
    assert rope.unmovable is None and rope.num_layers == k_p.shape[0]
    assert any(c is not None for c in rope.layers)
    # a float32 model rotates with exactly the frequencies its config implies
    from_config = model_rope(model.config)
    for c, c_cfg in zip(rope.layers, from_config.layers):
        assert (c is None) == (c_cfg is None)
        if c is not None:
            assert torch.equal(c.inv_freq(), c_cfg.inv_freq())

    n_layers, n, hkv, d = k_p.shape
    pool = torch.randn(n_layers, 5, PAGE, hkv, d)  # garbage around the sequence, never zeros
    pages = torch.tensor([3, 1])
    kvfuse.write_kv_(pool, pages, 0, k_p)
    before = pool.clone()
    slots = kvfuse.slots_of(pages, 0, n, PAGE)
    out = kvfuse.rerotate_(pool, slots, pos, pos + DELTA, rope, backend="torch")
    assert out is pool
    got = kvfuse.gather_kv(pool, pages, n)
    for layer, c in enumerate(rope.layers):
        torch.testing.assert_close(got[layer], k_q[layer], atol=2e-5, rtol=2e-5, msg=f"{name} layer {layer}")
        if c is None:  # NoPE: not touched, bit for bit (and the model's keys did not move either)
            assert torch.equal(pool[layer], before[layer])
    untouched = torch.ones(pool.shape[1:3], dtype=torch.bool)
    untouched.view(-1)[slots] = False
    assert torch.equal(pool[:, untouched], before[:, untouched])
    # control: the rotation is not the identity, so the comparison above can fail
    moved = [i for i, c in enumerate(rope.layers) if c is not None]
    assert (k_q[moved] - k_p[moved]).abs().max() > 1e-2


@pytest.mark.parametrize("name", HELD)
def test_cache_shape_matches_the_models_cache(name):
    model = _shared_model(name)
    ids = torch.randint(3, V, (TOKENS,), generator=torch.Generator().manual_seed(2))
    k, v = _cached(model, ids)
    assert cache_shape(model.config) == (k.shape[0], k.shape[2], k.shape[3])
    assert v.shape == k.shape
    store = kvfuse.PagedKVStore.from_hf(model.config, num_pages=4, page_size=PAGE, dtype=torch.float32)
    assert store.k_cache.shape == (k.shape[0], 4, PAGE, k.shape[2], k.shape[3])


@pytest.mark.parametrize("name", [n for n in HELD if n not in MOVABLE])
def test_unmovable_models_say_why(name):
    config = _config(name)
    rope = model_rope(config)
    _assert_names(rope.unmovable, VARIANTS[name][1][1])
    assert all(c is None for c in rope.layers)
    pool = torch.randn(rope.num_layers, 2, PAGE, 1, 16)
    before = pool.clone()
    slots = torch.arange(3)
    with pytest.raises(ValueError, match="cannot be moved"):
        kvfuse.rerotate_(pool, slots, slots, slots + 5, rope, backend="torch")
    assert torch.equal(pool, before)
    kvfuse.rerotate_(pool, slots, slots, slots, rope, backend="torch")  # positions kept: fine
    with pytest.raises(UnsupportedModel, match="cannot be moved"):
        kvfuse.RopeConfig.from_hf(config)


@pytest.mark.parametrize("name", REFUSED)
def test_refused_models_name_the_feature(name):
    config = _config(name)
    words = VARIANTS[name][1][1]
    with pytest.raises(UnsupportedModel) as e:
        cache_shape(config)
    _assert_names(str(e.value), words)
    with pytest.raises(UnsupportedModel) as e:
        kvfuse.PagedKVStore.from_hf(config, num_pages=4, page_size=PAGE)
    _assert_names(str(e.value), words)
    assert any(all(w in x for w in words) for x in unsupported_attention(config))


def test_mla_rotation_is_refused_too():
    with pytest.raises(UnsupportedModel, match=r"deepseek_v3 uses multi-head latent attention \(MLA\)"):
        model_rope(_config("deepseek_v3"))


# ---------------------------------------------------------------------- what the configs read to
def test_gemma3_layer_types_rotate_differently():
    rope = model_rope(_config("gemma3"))
    sliding, full = rope.layers[0], rope.layers[1]
    assert (sliding.theta, sliding.rope_type) == (1e4, "default")
    assert (full.theta, full.rope_type, full.factor) == (1e6, "linear", 8.0)
    assert rope.layers == (sliding, full, sliding, full)
    with pytest.raises(UnsupportedModel, match=r"gemma3_text does not rotate every layer alike.*ModelRope\.from_hf"):
        kvfuse.RopeConfig.from_hf(_config("gemma3"))


@pytest.mark.parametrize("name, nope", [("smollm3", [1, 3]), ("cohere2", [2]), ("llama4", [1, 3]),
                                        ("exaone4", [3]), ("exaone_moe", [1, 3]), ("afmoe", [1]),
                                        ("cohere2_moe", [3])])
def test_nope_layers(name, nope):
    rope = model_rope(_config(name))
    assert [i for i, c in enumerate(rope.layers) if c is None] == nope


@pytest.mark.parametrize("name, interleaved, rotary_dim, head_dim", [
    ("llama", False, 16, 16), ("cohere", True, 16, 16), ("glm", True, 8, 16), ("gptj", True, 8, 16),
    ("codegen", True, 8, 16), ("gpt_neox", False, 4, 16), ("phi", False, 8, 16), ("stablelm", False, 4, 16),
    ("persimmon", False, 8, 16), ("nemotron", False, 8, 16), ("llama4", True, 16, 16), ("qwen3", False, 24, 24),
    ("glm4_moe", False, 8, 16), ("ernie4_5_moe", True, 16, 16),
])
def test_pairing_and_partial_rotary(name, interleaved, rotary_dim, head_dim):
    c = next(c for c in model_rope(_config(name)).layers if c is not None)
    assert (c.interleaved, c.rotary_dim, c.head_dim) == (interleaved, rotary_dim, head_dim)


@pytest.mark.parametrize("name, shape", [("falcon", (3, 4, 16)), ("falcon-mqa", (3, 1, 16)),
                                         ("falcon-alibi", (3, 4, 16)), ("gpt_bigcode", (3, 1, 16)),
                                         ("mistral", (3, 2, 32)), ("qwen2", (3, 1, 16))])
def test_cache_shape_of_config(name, shape):
    assert cache_shape(_config(name)) == shape


@pytest.mark.parametrize("name, words", [
    ("gpt_oss", ["gpt_oss uses attention sinks (s_aux)"]),
    ("doge", ["doge uses a dynamic, value-dependent attention mask"]),
    ("llama4", ["llama4_text uses chunked attention (attention_chunk_size=1024)"]),
    ("bloom", ["bloom uses ALiBi position biases", "bloom computes attention in its own modeling code"]),
    ("mpt", ["mpt uses ALiBi position biases"]),
    ("falcon-alibi", ["falcon uses ALiBi position biases"]),
    ("deepseek_v3", ["deepseek_v3 uses multi-head latent attention (MLA)"]),
])
def test_unsupported_attention_names_features(name, words):
    found = unsupported_attention(_config(name))
    for w in words:
        assert any(w in x for x in found), (w, found)


@pytest.mark.parametrize("name", ["llama", "gemma2", "gemma3", "qwen2", "cohere2", "smollm3", "mistral", "glm4"])
def test_unsupported_attention_is_empty_for_plain_models(name):
    """Sliding windows and soft-capping (Gemma 2) are the kernels' business: not listed."""
    assert unsupported_attention(_config(name)) == []


def test_llama4_temperature_tuning_is_named():
    cfg = _cfg("Llama4TextConfig", **_kw(num_hidden_layers=2, head_dim=16, intermediate_size_mlp=64,
                                          num_local_experts=2, attn_temperature_tuning=True))
    assert any("attn_temperature_tuning" in x for x in unsupported_attention(cfg))


# ---------------------------------------------------------------------- the loaded model's buffers
def test_model_rope_of_reads_each_layer_types_rounded_buffer():
    model = _model("gemma3").to(torch.bfloat16)
    rot = model.model.rotary_emb
    rope = model_rope_of(model)
    assert torch.equal(rope.layers[0].inv_freq(), rot.sliding_attention_inv_freq.double())
    assert torch.equal(rope.layers[1].inv_freq(), rot.full_attention_inv_freq.double())
    exact = model_rope(model.config)
    assert not torch.equal(rope.layers[1].inv_freq(), exact.layers[1].inv_freq())


def test_model_rope_of_refuses_a_buffer_it_cannot_explain():
    model = _model("llama")
    model.model.rotary_emb.inv_freq.mul_(1.01)
    with pytest.raises(UnsupportedModel, match="rotary buffer model.rotary_emb.inv_freq"):
        model_rope_of(model)


def test_model_rope_of_checks_the_gptj_table():
    model = _model("gptj")
    assert model_rope_of(model) == model_rope(model.config)
    model.transformer.rotary_emb.embed_positions.mul_(0.5)
    with pytest.raises(UnsupportedModel, match="sin/cos table"):
        model_rope_of(model)


def test_model_rope_of_ignores_unused_rotary_buffers_of_alibi_falcon():
    model = _model("falcon-alibi")
    assert any(n.endswith("inv_freq") for n, _ in model.named_buffers())
    assert "ALiBi" in model_rope_of(model).unmovable


# ---------------------------------------------------------------------- configs kvfuse has not seen
def _plain(**k):
    base = dict(model_type="my_llama", num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                hidden_size=64, max_position_embeddings=256)
    base.update(k)
    return SimpleNamespace(**base)


def test_unknown_model_type_is_read_with_a_warning():
    with pytest.warns(UserWarning, match="not verified model type 'my_llama'"):
        rope = model_rope(_plain(rope_parameters=dict(rope_type="linear", rope_theta=1e5, factor=2.0)))
    assert rope.single == kvfuse.RopeConfig(16, theta=1e5, rope_type="linear", factor=2.0)


@pytest.mark.parametrize("extra, match", [
    (dict(rope_interleave=True, rope_theta=1e4), r"rotary fields \['rope_interleave'\]"),
    (dict(rope_theta=1e4, partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
    (dict(rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=[2, 3, 3])), "mrope_section"),
    (dict(rope_parameters=dict(rope_type="ntk-by-parts", rope_theta=1e4)), "ntk-by-parts"),
    (dict(kv_lora_rank=16, rope_theta=1e4), "my_llama uses multi-head latent attention"),
    (dict(v_head_dim=8, head_dim=16, rope_theta=1e4), r"different head dims \(head_dim=16, v_head_dim=8\)"),
])
def test_unknown_rotary_fields_are_refused_by_name(extra, match):
    with pytest.raises(UnsupportedModel, match=match):
        model_rope(_plain(**extra))


def test_known_model_with_rotary_fields_it_does_not_read_is_refused():
    """A Gemma 3 config from before transformers 5 (rope_local_base_freq) is not silently read as one theta."""
    cfg = _plain(model_type="gemma3_text", rope_theta=1e6, rope_local_base_freq=1e4,
                 layer_types=["sliding_attention", "full_attention"])
    with pytest.raises(UnsupportedModel, match=r"gemma3_text: its config has rotary fields \['rope_local_base_freq'\]"):
        model_rope(cfg)


def test_unknown_model_without_rotary_fields_is_unmovable():
    rope = model_rope(_plain())
    assert "my_llama has no rotary embedding" in rope.unmovable


def test_legacy_rope_scaling_attributes():
    """Configs from before transformers 5 name rope_theta / rope_scaling as attributes."""
    cfg = _plain(model_type="llama", rope_theta=5e5, rope_scaling=dict(type="llama3", factor=8.0,
                                                                        low_freq_factor=1.0, high_freq_factor=4.0,
                                                                        original_max_position_embeddings=64))
    assert model_rope(cfg).single == kvfuse.RopeConfig(16, theta=5e5, rope_type="llama3", factor=8.0,
                                                       original_max_position_embeddings=64)
    neox = SimpleNamespace(model_type="gpt_neox", num_hidden_layers=1, num_attention_heads=4, hidden_size=64,
                           rotary_pct=0.5, rotary_emb_base=1e4)
    assert model_rope(neox).single.rotary_dim == 8


def test_models_that_ignore_partial_rotary_refuse_it_with_scaling():
    cfg = _plain(model_type="llama", rope_parameters=dict(rope_type="linear", rope_theta=1e4, factor=2.0,
                                                          partial_rotary_factor=0.5))
    with pytest.raises(UnsupportedModel, match="rotates the whole head"):
        model_rope(cfg)
    plain = _plain(model_type="llama", rope_parameters=dict(rope_type="default", rope_theta=1e4,
                                                            partial_rotary_factor=0.5))
    assert model_rope(plain).single.rotary_dim == 16  # llama's default rotation ignores it
