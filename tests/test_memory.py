"""Memory blocks: safetensors round trip, insertion at other positions (exact), mismatch errors."""

import pytest
import torch

import kvfuse
from kvfuse import memory

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
hf = pytest.importorskip("kvfuse.integrations.hf")
from tests.hf_utils import additive_mask, cache_layers, make_model, small_config  # noqa: E402

TOL = dict(atol=2e-5, rtol=2e-5)  # float32: the re-rotation's float64 angle vs the model's float32 angles


def _model(arch="llama"):
    ref = make_model(arch)
    model = transformers.AutoModelForCausalLM.from_config(small_config(arch), attn_implementation="kvfuse")
    model.load_state_dict(ref.state_dict())
    return ref, model.float().eval()


def _block_ids(cfg, n=7):
    return torch.randint(0, cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_round_trip_and_insert_at_another_position(arch, tmp_path):
    ref, model = _model(arch)
    cfg = model.config
    store = kvfuse.PagedKVStore.from_hf(cfg, num_pages=32, page_size=4)
    seq = store.sequence("doc")
    ids = _block_ids(cfg)
    hf.prefill(model, seq, ids)
    ident = memory.model_identity(cfg)
    path = tmp_path / "doc.safetensors"
    memory.save(str(path), seq, identity=ident, metadata={"source": "test"})
    block = memory.load(str(path), identity=ident, rope=store.rope)
    k, v = seq.gather()
    assert torch.equal(block.k, k) and torch.equal(block.v, v) and block.positions.tolist() == list(range(7))
    assert block.metadata == {"source": "test"} and block.identity == ident

    same = memory.insert(store, block)  # where it was saved: bit-identical
    assert torch.equal(same.gather()[0], k)
    moved = memory.insert(store, block, position=300)
    with torch.no_grad():
        want = cache_layers(ref(ids, position_ids=torch.arange(300, 307)[None], use_cache=True).past_key_values)
    got_k, got_v = moved.gather()
    for layer, (wk, wv) in enumerate(want):  # a block moved as a whole is exact at every layer
        torch.testing.assert_close(got_k[layer], wk[0].transpose(0, 1), **TOL)
        torch.testing.assert_close(got_v[layer], wv[0].transpose(0, 1), **TOL)
    assert moved.positions().tolist() == list(range(300, 307))


def test_insert_into_a_sequence_then_continue(tmp_path):
    """prefix | memory (sees nothing of the prefix) | continuation (sees both): the continuation's
    logits equal one masked forward over the three with those positions."""
    ref, model = _model()
    cfg = model.config
    store = kvfuse.PagedKVStore.from_hf(cfg, num_pages=32, page_size=4)
    doc = store.sequence("doc")
    doc_ids = _block_ids(cfg)
    hf.prefill(model, doc, doc_ids)
    memory.save(str(tmp_path / "m.safetensors"), doc, identity="m")
    doc.release()
    block = memory.load(str(tmp_path / "m.safetensors"), identity="m")

    g = torch.Generator().manual_seed(9)
    prefix_ids = torch.randint(0, cfg.vocab_size, (1, 6), generator=g)
    cont_ids = torch.randint(0, cfg.vocab_size, (1, 5), generator=g)
    seq = store.sequence("prefix")
    hf.prefill(model, seq, prefix_ids)
    memory.insert(store, block, into=seq)
    logits = hf.decode(model, [seq], cont_ids)
    graph = seq.token_graph()
    assert [s.length for s in graph.segments] == [6, 7, 5]
    with torch.no_grad():
        want = ref(torch.cat([prefix_ids, doc_ids, cont_ids], 1), position_ids=seq.positions()[None],
                   attention_mask=additive_mask(graph.dense_mask())).logits
    torch.testing.assert_close(logits[0], want[0, 13:], **TOL)


def test_mismatch_errors(tmp_path):
    cfg = small_config("llama")
    store = kvfuse.PagedKVStore.from_hf(cfg, num_pages=8, page_size=4)
    seq = store.sequence()
    seq.append_kv(torch.randn(3, 5, 2, 16), torch.randn(3, 5, 2, 16))
    path = str(tmp_path / "b.safetensors")
    memory.save(path, seq, identity=memory.model_identity(cfg))
    with pytest.raises(ValueError, match="model"):
        memory.load(path, identity=memory.model_identity(small_config("qwen2")))
    other = kvfuse.RopeConfig.from_hf(small_config("qwen2"))  # theta 1e6
    with pytest.raises(ValueError, match="RoPE"):
        memory.load(path, rope=other)
    block = memory.load(path)
    store2 = kvfuse.PagedKVStore(3, 8, 4, 2, 16, rope=other)
    with pytest.raises(ValueError, match="RoPE"):
        memory.insert(store2, block)
    store3 = kvfuse.PagedKVStore(2, 8, 4, 2, 16, rope=store.rope.single)
    with pytest.raises(ValueError, match="layers"):
        memory.insert(store3, block)
    with pytest.raises(ValueError, match="identity|model"):
        memory.insert(store, block, identity="another-model")
    store.alloc(store.num_free)
    with pytest.raises(RuntimeError, match="out of pages"):
        memory.insert(store, block, into=seq)
    assert seq.num_tokens == 5 and len(seq.segments) == 1
    from safetensors.torch import save_file

    save_file({"k": torch.zeros(1)}, str(tmp_path / "x.safetensors"))  # a safetensors file, not a block
    with pytest.raises(ValueError, match="not a kvfuse memory block"):
        memory.load(str(tmp_path / "x.safetensors"))
