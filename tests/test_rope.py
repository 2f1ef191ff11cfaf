"""RopeConfig against Hugging Face models' own rotary embeddings, and the RoPE algebra."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvfuse import ModelRope, RopeConfig
from kvfuse.integrations.hf_config import UnsupportedModel
from kvfuse.reference import apply_rope, rotate

transformers = pytest.importorskip("transformers")


def _llama_like(cls_name, **kw):
    cfg_cls = getattr(transformers, cls_name)
    base = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                num_hidden_layers=1, vocab_size=32, max_position_embeddings=4096)
    base.update(kw)
    return cfg_cls(**base)


HF_CONFIGS = {
    "llama": lambda: _llama_like("LlamaConfig", rope_theta=500000.0),
    "llama3": lambda: _llama_like("LlamaConfig", rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=256)),
    "llama-linear": lambda: _llama_like("LlamaConfig",
                                        rope_parameters=dict(rope_type="linear", rope_theta=1e4, factor=4.0)),
    "llama-yarn": lambda: _llama_like("LlamaConfig", rope_parameters=dict(
        rope_type="yarn", rope_theta=1e4, factor=4.0, original_max_position_embeddings=1024)),
    "mistral": lambda: _llama_like("MistralConfig", rope_theta=1e6, head_dim=32, hidden_size=96, num_attention_heads=3,
                                   num_key_value_heads=1),
    "qwen2": lambda: _llama_like("Qwen2Config", rope_theta=1e6),
    "qwen2-yarn": lambda: _llama_like("Qwen2Config", rope_parameters=dict(
        rope_type="yarn", rope_theta=1e6, factor=4.0, original_max_position_embeddings=1024, mscale=1.0,
        mscale_all_dim=0.5)),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(hidden_size=64, num_attention_heads=4, intermediate_size=64,
                                                   num_hidden_layers=1, vocab_size=32, rotary_pct=0.25),
}


def _hf_rotary(cfg):
    mod = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "gpt_neox": "gpt_neox"}[cfg.model_type]
    m = __import__(f"transformers.models.{mod}.modeling_{mod}", fromlist=["x"])
    cls = [getattr(m, n) for n in dir(m) if n.endswith("RotaryEmbedding")][0]
    return cls(cfg), m.apply_rotary_pos_emb


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_from_hf_matches_model_inv_freq(name):
    hf_cfg = HF_CONFIGS[name]()
    cfg = RopeConfig.from_hf(hf_cfg)
    rot, _ = _hf_rotary(hf_cfg)
    assert cfg.inv_freq().shape == rot.inv_freq.shape
    # bit-identical to the float32 table the model rotates with
    assert torch.equal(cfg.inv_freq().float(), rot.inv_freq.float())
    assert cfg.attention_scaling == pytest.approx(float(rot.attention_scaling), rel=1e-12)


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_apply_rope_matches_model(name):
    hf_cfg = HF_CONFIGS[name]()
    cfg = RopeConfig.from_hf(hf_cfg)
    rot, apply = _hf_rotary(hf_cfg)
    pos = torch.randint(0, 2000, (1, 7))
    x = torch.randn(1, 3, 7, cfg.head_dim)  # HF layout [B, H, T, D]
    cos, sin = rot(x, pos)
    if hf_cfg.model_type == "gpt_neox":
        ref, _ = apply(x, x, cos, sin)
        ref = torch.cat([ref, x[..., cfg.rotary_dim:]], -1) if ref.shape[-1] < cfg.head_dim else ref
    else:
        ref, _ = apply(x, x, cos, sin)
    ours = apply_rope(x.transpose(1, 2), pos.expand(1, 7), cfg).transpose(1, 2)
    # HF computes angles in float32 (error ~ pos * 2**-24 rad); ours in float64
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)


def test_from_hf_gptj_interleaved():
    hf_cfg = transformers.GPTJConfig(n_embd=64, n_head=4, rotary_dim=8, n_layer=1, vocab_size=32)
    cfg = RopeConfig.from_hf(hf_cfg)
    assert cfg.interleaved and cfg.rotary_dim == 8 and cfg.head_dim == 16
    from transformers.models.gptj import modeling_gptj as m

    table = m.create_sinusoidal_positions(64, 8)  # [pos, sin | cos]
    pos = torch.tensor([[3, 17, 40]])
    sincos = table[pos]
    sin, cos = torch.split(sincos, 4, dim=-1)
    x = torch.randn(1, 3, 2, 16)  # GPT-J layout [B, T, H, D]
    ref_rot = m.apply_rotary_pos_emb(x[..., :8], sin, cos)
    ref = torch.cat([ref_rot, x[..., 8:]], -1)
    torch.testing.assert_close(apply_rope(x, pos, cfg), ref, atol=2e-5, rtol=1e-5)


def test_from_hf_rejects_unsupported_scaling():
    hf_cfg = _llama_like("LlamaConfig", rope_parameters=dict(rope_type="dynamic", rope_theta=1e4, factor=2.0))
    with pytest.raises(ValueError, match="llama uses RoPE rope_type='dynamic'.*cannot be moved"):
        RopeConfig.from_hf(hf_cfg)


def test_from_hf_delegates_to_hf_config():
    """RopeConfig.from_hf is the uniform case of ModelRope.from_hf; overrides replace fields."""
    hf_cfg = HF_CONFIGS["llama3"]()
    rope = ModelRope.from_hf(hf_cfg)
    assert rope.num_layers == 1 and RopeConfig.from_hf(hf_cfg) == rope.single
    assert RopeConfig.from_hf(hf_cfg, inv_freq_dtype="float64").inv_freq_dtype == "float64"
    with pytest.raises(TypeError):
        RopeConfig.from_hf(hf_cfg, no_such_field=1)


def test_from_hf_refuses_models_whose_layers_differ():
    hf_cfg = transformers.SmolLM3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                        intermediate_size=64, num_hidden_layers=4, vocab_size=32, pad_token_id=0,
                                        bos_token_id=1, eos_token_id=2)
    with pytest.raises(UnsupportedModel, match=r"smollm3 does not rotate every layer alike \(NoPE.*ModelRope\.from_hf"):
        RopeConfig.from_hf(hf_cfg)
    assert ModelRope.from_hf(hf_cfg).layers[3] is None


def test_from_hf_refuses_models_without_rotary_embedding():
    hf_cfg = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=32)
    with pytest.raises(UnsupportedModel, match="gpt2 has no rotary embedding"):
        RopeConfig.from_hf(hf_cfg)


@pytest.mark.parametrize("kw, match", [
    (dict(head_dim=64, rotary_dim=7), "rotary_dim"),
    (dict(head_dim=64, rotary_dim=128), "rotary_dim"),
    (dict(head_dim=64, theta=0.0), "theta"),
    (dict(head_dim=64, rope_type="ntk"), "rope_type"),
    (dict(head_dim=64, rope_type="llama3", factor=8.0), "original_max_position_embeddings"),
])
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        RopeConfig(**kw)


@pytest.mark.parametrize("field, value, expected", [
    ("head_dim", 64.0, "an int"), ("head_dim", "64", "an int"), ("head_dim", True, "an int"),
    ("rotary_dim", 32.0, "an int"), ("theta", "1e4", "a real number"), ("theta", None, "a real number"),
    ("theta", True, "a real number"), ("interleaved", 1, "a bool"), ("interleaved", "yes", "a bool"),
    ("factor", "8", "a real number"), ("low_freq_factor", None, "a real number"),
    ("high_freq_factor", [4.0], "a real number"), ("original_max_position_embeddings", 64.0, "an int"),
    ("beta_fast", "32", "a real number"), ("beta_slow", None, "a real number"), ("truncate", 0, "a bool"),
    ("attention_factor", "1.2", "a real number"), ("mscale", "1", "a real number"),
    ("mscale_all_dim", [1], "a real number"), ("inv_freq_values", "abc", "a sequence of floats"),
    ("inv_freq_values", 1.0, "a sequence of floats"), ("inv_freq_values", ("a",) * 32, "finite real numbers"),
])
def test_wrongly_typed_fields_raise_type_error_naming_the_field(field, value, expected):
    with pytest.raises(TypeError, match=rf"RopeConfig\.{field} must .*{expected}"):
        RopeConfig(**{"head_dim": 64, field: value})


@pytest.mark.parametrize("kw, match", [
    (dict(rope_type=3), "rope_type must be one of"), (dict(inv_freq_dtype=32), "inv_freq_dtype"),
    (dict(head_dim=0), "head_dim must be a positive int"), (dict(theta=float("inf")), "theta must be finite"),
    (dict(rope_type="llama3", factor=8.0, original_max_position_embeddings=64, low_freq_factor=2.0,
          high_freq_factor=2.0), "high_freq_factor must differ"),
])
def test_wrong_values_raise_value_error_naming_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        RopeConfig(**{"head_dim": 64, **kw})


def test_numbers_are_normalised():
    """ints and numpy scalars are accepted and stored as Python numbers: equal configs compare equal."""
    np = pytest.importorskip("numpy")
    a = RopeConfig(head_dim=np.int64(64), theta=10000, factor=np.float32(2.0), rope_type="linear")
    b = RopeConfig(head_dim=64, theta=10000.0, factor=2.0, rope_type="linear")
    assert a == b and hash(a) == hash(b) and type(a.head_dim) is int and type(a.theta) is float


CFGS = [
    RopeConfig(head_dim=32),
    RopeConfig(head_dim=32, interleaved=True),
    RopeConfig(head_dim=32, rotary_dim=8),
    RopeConfig(head_dim=32, rope_type="yarn", factor=4.0, original_max_position_embeddings=64),
    RopeConfig(head_dim=32, rope_type="llama3", factor=8.0, original_max_position_embeddings=64),
]
IDS = ["neox", "interleaved", "partial", "yarn", "llama3"]


def _rot(x, delta, cfg):
    cos, sin, idx = cfg.rotation_tables(torch.as_tensor(delta).reshape(-1).expand(x.shape[0]))
    return rotate(x, cos[idx.long()], sin[idx.long()], cfg.rotary_dim, cfg.interleaved)


pos_st = st.integers(0, 2**20)


@settings(max_examples=25, deadline=None)
@given(a=pos_st, b=pos_st, c=pos_st, i=st.integers(0, len(CFGS) - 1))
def test_rotation_composes(a, b, c, i):
    cfg = CFGS[i]
    x = torch.randn(4, 2, 32, dtype=torch.float64)
    two_step = _rot(_rot(x, b - a, cfg).double(), c - b, cfg)
    torch.testing.assert_close(two_step.double(), _rot(x, c - a, cfg).double(), atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(d=st.integers(-2**20, 2**20), i=st.integers(0, len(CFGS) - 1))
def test_rotation_inverse(d, i):
    cfg = CFGS[i]
    x = torch.randn(4, 2, 32, dtype=torch.float64)
    torch.testing.assert_close(_rot(_rot(x, d, cfg).double(), -d, cfg).double(), x, atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(p=st.integers(0, 2**20), d=st.integers(0, 2**20), i=st.integers(0, len(CFGS) - 1))
def test_apply_then_rerotate_equals_apply_at_new_position(p, d, i):
    """apply_rope(x, p + d) == rerotate(apply_rope(x, p), d) -- YaRN's factor is applied once."""
    cfg = CFGS[i]
    x = torch.randn(3, 2, 32, dtype=torch.float64)
    pos = torch.full((3,), p)
    moved = _rot(apply_rope(x, pos, cfg), d, cfg)
    torch.testing.assert_close(moved.double(), apply_rope(x, pos + d, cfg).double(), atol=1e-5, rtol=1e-5)


def test_large_positions_keep_precision():
    """A move of ~1M positions is exact to float32 rounding: the angle is formed in float64."""
    cfg = RopeConfig(head_dim=64, theta=1e4)
    x = torch.randn(5, 1, 64, dtype=torch.float64)
    p, d = 1_000_003, 999_999
    got = _rot(apply_rope(x, torch.full((5,), p), cfg), d, cfg).double()
    want = apply_rope(x, torch.full((5,), p + d), cfg).double()
    assert (got - want).abs().max() < 1e-5


def test_from_hf_model_uses_the_models_rounded_frequencies():
    """model.to(bf16) rounds HF's inv_freq buffer; re-rotation must use what the model rotates with."""
    hf_cfg = HF_CONFIGS["llama"]()
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg).to(torch.bfloat16)
    exact = RopeConfig.from_hf(hf_cfg)
    actual = RopeConfig.from_hf_model(model)
    buf = model.model.rotary_emb.inv_freq
    assert buf.dtype == torch.bfloat16 and not torch.equal(exact.inv_freq(), actual.inv_freq())
    assert torch.equal(actual.inv_freq(), buf.double())
    # a model loaded with dtype= keeps float32 frequencies: from_hf_model then equals from_hf
    m32 = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16)
    assert torch.equal(RopeConfig.from_hf_model(m32).inv_freq(), exact.inv_freq())


def test_inv_freq_values_validation():
    with pytest.raises(ValueError, match="inv_freq_values"):
        RopeConfig(head_dim=8, inv_freq_values=(1.0, 0.5))
