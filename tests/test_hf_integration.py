"""attn_implementation="kvfuse" is a drop-in: same greedy generations and logits as eager attention,
with transformers' own cache and with the paged KVFuseCache."""

import subprocess
import sys

import pytest
import torch

import kvfuse
from tests.hf_utils import make_model, small_config

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("kvfuse.integrations.hf")

ARCHS = ["llama", "qwen2", "mistral", "gpt_neox"]
ATOL = RTOL = 2e-5  # float32; the two paths sum the same products in a different order


def _pair(arch):
    ref = make_model(arch)
    model = transformers.AutoModelForCausalLM.from_config(small_config(arch), attn_implementation="kvfuse")
    model.load_state_dict(ref.state_dict())
    return ref, model.float().eval()


def _prompt(cfg, n=9, batch=1, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, n), generator=g)


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_matches_eager(arch, monkeypatch):
    ref, model = _pair(arch)
    assert model.config._attn_implementation == "kvfuse"
    ids = _prompt(ref.config, batch=2)
    kw = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_logits=True)
    want = ref.generate(ids, **kw)
    # transformers' own cache holds dense K/V: every attention is torch's SDPA, none copies them into a pool
    def no_pool(*a, **k):
        raise AssertionError("dense K/V were copied into a paged pool")

    monkeypatch.setattr(kvfuse.compat, "attention", no_pool)
    calls = []
    dense = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or dense(*a, **k))
    got = model.generate(ids, **kw)
    assert len(calls) >= model.config.num_hidden_layers * kw["max_new_tokens"]
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_paged_cache_generate_matches_eager(arch):
    ref, model = _pair(arch)
    ids = _prompt(ref.config)
    want = ref.generate(ids, max_new_tokens=10, do_sample=False)
    store = kvfuse.PagedKVStore.from_hf(model.config, num_pages=32, page_size=4)
    seq = store.sequence()
    logits = hf.prefill(model, seq, ids[:, :-1])
    with torch.no_grad():
        torch.testing.assert_close(logits, ref(ids[:, :-1]).logits, atol=ATOL, rtol=RTOL)
    cache = hf.KVFuseCache(store, [seq], config=model.config)
    got = model.generate(**cache.generate_inputs(ids[:, -1:]), max_new_tokens=10, do_sample=False)
    assert torch.equal(got, want[:, ids.shape[1] - 1:])
    assert seq.num_tokens == ids.shape[1] - 1 + 10  # the last generated token is not fed back


def test_padding_mask_with_transformers_cache_is_honoured():
    ref, model = _pair("llama")
    ids = _prompt(ref.config, batch=2)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding of row 0
    kw = dict(max_new_tokens=6, do_sample=False, attention_mask=mask)
    assert torch.equal(model.generate(ids, **kw), ref.generate(ids, **kw))


def test_paged_cache_rejects_wrong_positions_and_padding():
    _, model = _pair("llama")
    store = kvfuse.PagedKVStore.from_hf(model.config, num_pages=32, page_size=4)
    seq = store.sequence(position=5)  # its first token sits at position 5
    cache = hf.KVFuseCache(store, [seq], config=model.config)
    with pytest.raises(ValueError, match="position_ids"):
        model(torch.tensor([[1, 2]]), past_key_values=cache)  # transformers would count from 0
    seq2 = store.sequence()
    hf.prefill(model, seq2, torch.tensor([[1, 2, 3]]))
    cache = hf.KVFuseCache(store, [seq2], config=model.config)
    with pytest.raises(ValueError, match="padding"):
        model(torch.tensor([[4, 5]]), attention_mask=torch.tensor([[0, 1, 1, 1, 1]]),
              position_ids=cache.position_ids(2), past_key_values=cache)


def test_paged_cache_needs_kvfuse_attention():
    ref, _ = _pair("llama")
    store = kvfuse.PagedKVStore.from_hf(ref.config, num_pages=8, page_size=4)
    cache = hf.KVFuseCache(store, [store.sequence()], config=ref.config)
    with pytest.raises(ValueError, match="attn_implementation"):
        ref(torch.tensor([[1, 2]]), past_key_values=cache)


def test_import_kvfuse_does_not_import_transformers():
    code = "import sys, kvfuse; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_static_cache_forward_compiles_fullgraph_and_matches_eager():
    """cache_implementation="static" compiles the forward: kvfuse's attention function must not break
    the graph (no host reads of tensor values, no planning) and must give sdpa's result."""
    from transformers import StaticCache

    cfg = small_config("llama")
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="kvfuse").eval()
    model.load_state_dict(ref.state_dict())
    ids = _prompt(cfg, batch=2)
    n = ids.shape[1]
    outs = []
    for m, compiled in ((ref, False), (model, True)):
        cache = StaticCache(config=cfg, max_cache_len=n + 4)
        with torch.no_grad():
            out = m(input_ids=ids, use_cache=True, **hf.cache_kwargs(m, cache))
            step = torch.compile(m.forward, fullgraph=True, backend="eager") if compiled else m.forward
            tok = out.logits[:, -1:].argmax(-1)
            mask = torch.ones(2, n + 1, dtype=torch.long)
            outs.append(step(input_ids=tok, position_ids=torch.full((2, 1), n), attention_mask=mask, use_cache=True,
                             **hf.cache_kwargs(m, cache)).logits)
    torch.testing.assert_close(outs[1], outs[0], atol=ATOL, rtol=RTOL)
