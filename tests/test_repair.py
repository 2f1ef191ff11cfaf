"""Repair: recomputing merged tokens in place. Repairing every token of a sequential merge must give the
text merge (one causal pass over the concatenated tokens) exactly; a partial repair touches only the
chosen tokens; CacheBlend's deviation is zero where the merge is already exact; refused calls write
nothing."""

import pytest
import torch

import kvfuse
from kvfuse import repair as policy
from tests.hf_utils import cache_layers, small_config

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("kvfuse.integrations.hf")

PREFIX, THREADS, JOIN = 7, [5, 9, 4], 3
PAGE = 4


def _model(arch="llama", device="cpu"):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(small_config(arch), attn_implementation="kvfuse")
    return model.float().eval().to(device)


def _merged(model, layout, seed=1):
    """Prefix and threads prefilled through kvfuse, merged (on the model's device); returns (store, merged,
    token ids)."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, cfg.vocab_size, (PREFIX,), generator=g)
    threads = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in THREADS]
    dev = model.device
    store = kvfuse.PagedKVStore.from_hf(cfg, num_pages=64, page_size=PAGE, device=dev)
    p = store.sequence()
    hf.prefill(model, p, prefix[None].to(dev))
    forks = kvfuse.fork(p, len(threads))
    for t, ids in zip(forks, threads):
        hf.prefill(model, t, ids[None].to(dev))
    p.release()
    merged = kvfuse.merge(forks, layout=layout)
    return store, merged, torch.cat([prefix] + threads)


def _text(model, ids):
    """K/V of every layer and the model itself, from one causal pass (attn eager)."""
    with torch.no_grad():
        model.set_attn_implementation("eager")
        out = model(ids[None], use_cache=True)
        model.set_attn_implementation("kvfuse")
    return [(k[0].transpose(0, 1), v[0].transpose(0, 1)) for k, v in cache_layers(out.past_key_values)]


def _snapshot(store, seq):
    return store.k_cache.clone(), store.v_cache.clone(), list(store.refcount), list(seq.pages), list(seq.segments)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox"])
def test_repairing_every_token_of_a_sequential_merge_is_the_text_merge(arch):
    model = _model(arch)
    store, merged, ids = _merged(model, "sequential")
    assert merged.positions().tolist() == list(range(ids.numel()))
    before = merged.gather()[0].clone()
    assert hf.repair(model, merged, ids, range(ids.numel())) == ids.numel()
    k, v = merged.gather()
    want = _text(model, ids)
    assert not torch.allclose(before[1], want[1][0], atol=1e-3)  # deeper layers really changed
    for layer, (wk, wv) in enumerate(want):
        torch.testing.assert_close(k[layer], wk, atol=1e-4, rtol=1e-4, msg=f"K of layer {layer}")
        torch.testing.assert_close(v[layer], wv, atol=1e-4, rtol=1e-4, msg=f"V of layer {layer}")
    # and the continuation: the join's logits equal the text model's
    join = torch.randint(0, model.config.vocab_size, (JOIN,), generator=torch.Generator().manual_seed(9))
    got = hf.decode(model, [merged], join[None])
    with torch.no_grad():
        model.set_attn_implementation("eager")
        ref = model(torch.cat([ids, join])[None]).logits[:, -JOIN:]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_partial_repair_touches_only_the_chosen_tokens():
    model = _model()
    store, merged, ids = _merged(model, "sequential")
    k0, v0 = (t.clone() for t in merged.gather())
    chosen = policy.first_tokens(merged, 2)
    assert chosen.tolist() == [12, 13, 21, 22]  # threads 1 and 2 (thread 0 saw all before it)
    hf.repair(model, merged, ids, chosen)
    k1, v1 = merged.gather()
    other = torch.ones(ids.numel(), dtype=torch.bool)
    other[chosen] = False
    assert torch.equal(k1[:, other], k0[:, other]) and torch.equal(v1[:, other], v0[:, other])
    assert not torch.equal(k1[1:, chosen], k0[1:, chosen])
    torch.testing.assert_close(k1[0], k0[0], atol=1e-5, rtol=1e-5)  # layer 0 depends on the token alone


def test_repair_is_the_same_on_every_backend(monkeypatch):
    """The recompute runs kvfuse.attention with scattered queries: torch and the Triton kernel agree."""
    pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("the triton backend needs a GPU or TRITON_INTERPRET=1")
    model = _model(device="cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for backend in ("torch", "triton"):
        monkeypatch.setenv("KVFUSE_BACKEND", backend)
        store, merged, ids = _merged(model, "shared")
        hf.repair(model, merged, ids, policy.union(policy.first_tokens(merged, 3), torch.tensor([0, 15])))
        results.append(merged.gather())
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-5, rtol=1e-5)


def test_kv_deviation_is_zero_where_the_merge_is_exact():
    model = _model()
    store, merged, ids = _merged(model, "sequential")
    snap = _snapshot(store, merged)
    dev = hf.kv_deviation(model, merged, ids, layer=1)
    assert dev.shape == (ids.numel(),)
    exact = PREFIX + THREADS[0]  # the prefix and thread 0 saw everything before them
    assert float(dev[:exact].max()) < 1e-4
    assert float(dev[exact:].min()) > 1e-3
    assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(snap, _snapshot(store,
                                                                                                          merged)))
    top = policy.top_fraction(merged, dev, 0.25)
    assert top.numel() == round(0.25 * ids.numel()) and int(top.min()) >= exact


@pytest.mark.parametrize("bad,err,match", [
    (dict(token_ids=torch.zeros(3, dtype=torch.long)), ValueError, "token_ids holds 3"),
    (dict(token_ids=torch.full((25,), 10_000)), ValueError, "vocab_size"),
    (dict(token_ids=torch.zeros(25)), TypeError, "token_ids"),
    (dict(tokens=[25]), ValueError, r"\[0, num_tokens=25\)"),
    (dict(tokens=[-1]), ValueError, "num_tokens"),
    (dict(tokens=["a"]), TypeError, "tokens"),
])
def test_bad_repair_writes_nothing(bad, err, match):
    model = _model()
    store, merged, ids = _merged(model, "sequential")
    args = dict(token_ids=ids, tokens=[13, 14]) | bad
    snap = _snapshot(store, merged)
    with pytest.raises(err, match=match):
        hf.repair(model, merged, args["token_ids"], args["tokens"])
    after = _snapshot(store, merged)
    assert torch.equal(snap[0], after[0]) and torch.equal(snap[1], after[1]) and snap[2:] == after[2:]


def test_repair_refuses_a_model_that_does_not_match_the_store():
    model = _model()
    store, merged, ids = _merged(model, "sequential")
    other = transformers.AutoModelForCausalLM.from_config(small_config("qwen2"), attn_implementation="kvfuse")
    snap = _snapshot(store, merged)
    with pytest.raises(ValueError, match="store holds"):
        hf.repair(other.float().eval(), merged, ids, [13])
    assert torch.equal(snap[0], store.k_cache) and torch.equal(snap[1], store.v_cache)


def test_policies_validate_their_arguments():
    model = _model()
    _, merged, ids = _merged(model, "shared")
    with pytest.raises(ValueError, match="fraction"):
        policy.top_fraction(merged, torch.zeros(ids.numel()), 1.5)
    with pytest.raises(ValueError, match="scores"):
        policy.top_fraction(merged, torch.zeros(3), 0.1)
    with pytest.raises(ValueError, match="k must be"):
        policy.first_tokens(merged, -1)
