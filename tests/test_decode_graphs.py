"""DecodeGraphs (static decode path, CUDA-graph replays on a GPU) against hf.decode, step by step."""

import pytest
import torch

import kvfuse
from kvfuse.static_plan import StaticPlan
from tests.hf_utils import small_config

transformers = pytest.importorskip("transformers")
from kvfuse.integrations import hf  # noqa: E402
from kvfuse.integrations.hf_graphs import DecodeGraphs  # noqa: E402


def _model(arch, device="cpu", dtype=torch.float32, window=None, vocab=None):
    torch.manual_seed(0)
    cfg = small_config(arch)
    if window:
        cfg.sliding_window = window
    if vocab:
        cfg.vocab_size = vocab
    m = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="kvfuse")
    return m.to(device=device, dtype=dtype).eval()


def _setup(model, prefix_len, threads, page_size=4, num_pages=400):
    store = kvfuse.PagedKVStore.from_hf(model.config, num_pages=num_pages, page_size=page_size,
                                        dtype=next(model.parameters()).dtype, device=next(model.parameters()).device)
    prompt = store.sequence()
    ids = torch.randint(0, model.config.vocab_size, (1, prefix_len), device=store.device)
    hf.prefill(model, prompt, ids)
    return store, prompt, kvfuse.fork(prompt, threads), kvfuse.fork(prompt, threads)


def _state(rows):
    return [(list(r.pages), list(r.segments)) for r in rows]


def _assert_same_kv(rows, ref_rows):
    for r, ref in zip(rows, ref_rows):
        for got, want in zip(r.gather(), ref.gather()):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _one_by_one(model, rows, tok):
    return torch.cat([hf.decode(model, [r], tok[i: i + 1]) for i, r in enumerate(rows)])


@pytest.mark.parametrize("layout", ["own", "hogwild", "shared"])
@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_static_path_equals_hf_decode_across_buckets_and_capacity_growth(arch, layout, monkeypatch):
    """3 rows (bucket 4: one padded row), 20 steps from a 246-token prefix: the row capacity (256 tokens)
    is outgrown mid-way. Logits and every row's K/V equal hf.decode's (one row at a time, or the hogwild
    batch); the rows' pages and segments too. "shared": the rows' common prefix is read once (one
    sequence in the plan)."""
    if layout == "shared":
        monkeypatch.setattr(kvfuse.batch, "SHARE_MIN_PREFIX", 1)
    hogwild = layout == "hogwild"
    model = _model(arch)
    store, _, ref_rows, rows = _setup(model, 246, 3)
    runner = DecodeGraphs(model, store, hogwild=hogwild, graphs=False)
    tok = torch.randint(0, model.config.vocab_size, (3, 1))
    for _ in range(20):
        want = hf.decode(model, ref_rows, tok, hogwild=True) if hogwild else _one_by_one(model, ref_rows, tok)
        got = runner.decode(rows, tok)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert [r.num_tokens for r in rows] == [r.num_tokens for r in ref_rows]
        tok = want[:, -1].argmax(-1, keepdim=True)
    key = ("shared" if layout == "shared" else "rows", 4)
    assert list(runner._buckets) == [key] and runner._buckets[key].max_kv == 512  # grew from 256
    _assert_same_kv(rows, ref_rows)


def test_static_path_after_merge_and_with_a_sliding_window():
    """Rows of different shapes (a merged sequence next to a fresh fork) and a sliding window layer."""
    model = _model("mistral", window=7)
    store, prompt, ref_threads, threads = _setup(model, 9, 2)
    tok = torch.randint(0, model.config.vocab_size, (2, 1))
    for _ in range(3):
        hf.decode(model, ref_threads, tok)
        hf.decode(model, threads, tok)
    ref_rows = [kvfuse.merge(ref_threads, layout="sequential"), kvfuse.fork(prompt, 1)[0]]
    rows = [kvfuse.merge(threads, layout="sequential"), kvfuse.fork(prompt, 1)[0]]
    runner = DecodeGraphs(model, store, graphs=False)
    for _ in range(4):
        want = hf.decode(model, ref_rows, tok)
        got = runner.decode(rows, tok)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        tok = want[:, -1].argmax(-1, keepdim=True)


def test_refused_calls_change_nothing():
    model = _model("llama")
    store, _, _, rows = _setup(model, 5, 2, num_pages=8)
    runner = DecodeGraphs(model, store, max_batch=2, graphs=False)
    before, free = _state(rows), store.num_free
    with pytest.raises(ValueError, match=r"input_ids must be an int tensor \[B=2, 1\]"):
        runner.decode(rows, torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, vocab_size=97\)"):
        runner.decode(rows, torch.tensor([[0], [97]]))
    assert _state(rows) == before and store.num_free == free
    with pytest.raises(ValueError, match="max_batch=2"):
        runner.decode(rows + kvfuse.fork(rows[0], 1), torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(kvfuse.OutOfPages):
        while True:  # grow until the store runs dry; the refused step leaves the rows as they were
            before, free = _state(rows), store.num_free
            runner.decode(rows, torch.zeros(2, 1, dtype=torch.long))
    assert _state(rows) == before and store.num_free == free
    with pytest.raises(ValueError, match="attn_implementation='kvfuse'"):
        DecodeGraphs(transformers.AutoModelForCausalLM.from_config(small_config("llama"), attn_implementation="eager"),
                     store)
    runner.close()
    with pytest.raises(RuntimeError, match="closed"):
        runner.decode(rows, torch.zeros(2, 1, dtype=torch.long))


def test_static_plan_load_checks_capacity_before_writing():
    sp = StaticPlan(batch_size=2, q_len=1, max_kv=16, max_segments=2)
    g = kvfuse.SegmentGraph.fork_join(prefix=8, threads=[3])
    sp.load_(kvfuse.plan(kvfuse.AttentionSpec([g, g], q_lens=[1, 1])))
    before = sp.token_seg.clone(), sp.kv_lens.clone()
    long = kvfuse.SegmentGraph.fork_join(prefix=16, threads=[3])
    with pytest.raises(ValueError, match="max_kv=16"):
        sp.load_(kvfuse.plan(kvfuse.AttentionSpec([long, long], q_lens=[1, 1])))
    many = kvfuse.SegmentGraph.fork_join(prefix=4, threads=[1, 1, 1])
    with pytest.raises(ValueError, match="max_segments=2"):
        sp.load_(kvfuse.plan(kvfuse.AttentionSpec([many, many], q_lens=[1, 1])))
    with pytest.raises(ValueError, match="2 rows of 1"):
        sp.load_(kvfuse.plan(kvfuse.AttentionSpec([g], q_lens=[1])))
    assert torch.equal(sp.token_seg, before[0]) and torch.equal(sp.kv_lens, before[1])


@pytest.mark.parametrize("prefix", [200, 300], ids=["rows", "shared"])
def test_cuda_graph_replays_equal_hf_decode(prefix):
    """On a GPU: captured once per bucket, replayed every step; bf16 logits and K/V equal those of
    hf.decode one row at a time (the same kernels run eagerly). A 300-token prefix is read once (shared), a
    200-token one by every row."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA graphs need a CUDA GPU")
    dev = torch.device("cuda")
    model = _model("llama", device=dev, dtype=torch.bfloat16)
    store, _, ref_rows, rows = _setup(model, prefix, 3, page_size=16)
    runner = DecodeGraphs(model, store)
    tok = torch.randint(0, model.config.vocab_size, (3, 1), device=dev)
    for _ in range(20):
        want = _one_by_one(model, ref_rows, tok)
        got = runner.decode(rows, tok)
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
        tok = want[:, -1].argmax(-1, keepdim=True)
    stored = -(-prefix // 16) * 16  # the prefix as the threads share it: padded to a page
    key = ("shared" if stored >= kvfuse.batch.SHARE_MIN_PREFIX else "rows", 4)
    assert list(runner._buckets) == [key] and runner._buckets[key].graph is not None
    for r, ref in zip(rows, ref_rows):
        torch.testing.assert_close(r.gather()[0].float(), ref.gather()[0].float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_compiled_static_path_equals_hf_decode_across_buckets_and_capacity_growth(arch):
    """``compile=True``: the step's forward compiled by torch.compile (inductor). Three rows, then one
    (two buckets, one compiled entry each), over a 246-token prefix whose 256-token row capacity is
    outgrown mid-way (the bucket is made again): float32 logits and the rows' K/V equal hf.decode's
    one row at a time. The compiled graph writes the K/V in place (the pools are not copied)."""
    model = _model(arch)
    store, prompt, ref_rows, rows = _setup(model, 246, 3)
    runner = DecodeGraphs(model, store, graphs=False, compile=True)
    pools = store.k_cache.data_ptr(), store.v_cache.data_ptr()
    for n, steps in ((3, 14), (1, 3)):
        tok = torch.randint(0, model.config.vocab_size, (n, 1))
        for _ in range(steps):
            want = _one_by_one(model, ref_rows[:n], tok)
            got = runner.decode(rows[:n], tok)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            tok = want[:, -1].argmax(-1, keepdim=True)
    assert sorted(runner._buckets) == [("rows", 1), ("rows", 4)] and runner._buckets[("rows", 4)].max_kv == 512
    assert (store.k_cache.data_ptr(), store.v_cache.data_ptr()) == pools
    _assert_same_kv(rows, ref_rows)


# per layer: products, launches (q / k / v in one, with Qwen2's biases; gate / up in one; GPT-NeoX's
# fused q/k/v, output and two MLP products all with a bias, of two different norms); plus the LM head
ROUTED = {"llama": (7, 4), "qwen2": (7, 4), "gpt_neox": (4, 4)}


@pytest.mark.parametrize("arch", sorted(ROUTED))
@pytest.mark.usefixtures("no_compile_caches")  # a cached graph would skip the passes
def test_compiled_step_routes_the_projections_to_small_mm(arch, monkeypatch):
    """bf16, ``compile=True``: the compiled forward's every projection (and the LM head) runs on
    `kvfuse.small_mm`, products of one input grouped into one launch; the logits and K/V stay within
    bf16 rounding of the same runner with ``small_mm=False`` (cuBLAS / torch's matmul) and of
    hf.decode."""
    from kvfuse import small_mm as mod

    if not mod.available() or not (torch.cuda.is_available() or kvfuse.triton_kernels._common.interpreting()):
        pytest.skip("the small_mm pass needs triton on a GPU (or TRITON_INTERPRET=1) and torch's inductor passes")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seen, real = [], mod.rewrite

    def spy(graph, backend="triton"):
        n = real(graph, backend)
        seen.append((n, sum(node.target is torch.ops.kvfuse.small_mm.default for node in graph.nodes)))
        return n

    monkeypatch.setattr(mod, "rewrite", spy)
    # a vocabulary of a multiple of 8: inductor pads the LM head's matmul otherwise (on a GPU), which the
    # pass then leaves to cuBLAS
    model = _model(arch, device=dev, dtype=torch.bfloat16, vocab=128)
    store, prompt, ref_rows, rows = _setup(model, 30, 2, page_size=8)
    plain_rows = kvfuse.fork(prompt, 2)
    torch._dynamo.reset()
    runner = DecodeGraphs(model, store, graphs=False, compile=True)
    plain = DecodeGraphs(model, store, graphs=False, compile=True, small_mm=False)
    tok = torch.randint(0, model.config.vocab_size, (2, 1), device=dev)
    for _ in range(3):
        want = _one_by_one(model, ref_rows, tok)
        base = plain.decode(plain_rows, tok)
        got = runner.decode(rows, tok)
        torch.testing.assert_close(got.float(), base.float(), rtol=5e-2, atol=5e-2)
        torch.testing.assert_close(got.float(), want.float(), rtol=5e-2, atol=5e-2)
        tok = base[:, -1].argmax(-1, keepdim=True)
    layers = model.config.num_hidden_layers
    products, launches = ROUTED[arch]
    assert seen == [(products * layers + 1, launches * layers + 1)]  # the small_mm=False runner: no pass
    for r, ref in zip(rows, plain_rows):
        torch.testing.assert_close(r.gather()[0].float(), ref.gather()[0].float(), rtol=3e-2, atol=3e-2)


def test_compile_argument_is_checked():
    model = _model("llama")
    store, *_ = _setup(model, 8, 1)
    free = store.num_free
    with pytest.raises(TypeError, match="compile must be a bool or a dict"):
        DecodeGraphs(model, store, graphs=False, compile="max-autotune")
    with pytest.raises(TypeError, match="small_mm must be a bool"):
        DecodeGraphs(model, store, graphs=False, compile=True, small_mm="triton")
    assert store.num_free == free  # no scratch page taken


def test_compiled_cuda_graph_replays_equal_the_compiled_eager_step():
    """On a GPU: the compiled forward captured (``compile=True``) replays exactly what the same compiled
    forward computes eagerly (``graphs=False``), and stays within bf16 noise of hf.decode."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA graphs need a CUDA GPU")
    dev = torch.device("cuda")
    model = _model("llama", device=dev, dtype=torch.bfloat16)
    store, prompt, ref_rows, rows = _setup(model, 200, 3, page_size=16)
    eager_rows = kvfuse.fork(prompt, 3)
    runner = DecodeGraphs(model, store, compile=True)
    eager = DecodeGraphs(model, store, compile=True, graphs=False)
    tok = torch.randint(0, model.config.vocab_size, (3, 1), device=dev)
    for _ in range(12):
        want = _one_by_one(model, ref_rows, tok)
        same = eager.decode(eager_rows, tok)
        got = runner.decode(rows, tok)
        assert torch.equal(got, same)
        torch.testing.assert_close(got.float(), want.float(), rtol=5e-2, atol=5e-2)
        tok = same[:, -1].argmax(-1, keepdim=True)
    assert runner._buckets[("rows", 4)].graph is not None


def test_a_model_that_does_not_pass_position_ids_is_refused_and_nothing_changes():
    """A model whose attention does not receive position_ids (Persimmon) cannot show that it rotated the new
    keys where the rows continue: refused by name at the first layer, the rows and pools as before."""
    cfg = getattr(transformers, "PersimmonConfig", None)
    if cfg is None:
        pytest.skip("transformers has no Persimmon")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg(
        vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, partial_rotary_factor=0.5), attn_implementation="kvfuse").eval()
    store = kvfuse.PagedKVStore.from_hf(model.config, num_pages=32, page_size=4)
    rows = [store.sequence() for _ in range(2)]
    L, H, D = store.num_layers, store.num_kv_heads, store.head_dim
    for r in rows:
        r.append_kv(torch.randn(L, 5, H, D), torch.randn(L, 5, H, D))
    before = _state(rows), store.k_cache.clone(), store.v_cache.clone()
    for compile in (False, True):
        runner = DecodeGraphs(model, store, graphs=False, compile=compile)
        with pytest.raises(hf.UnsupportedModel, match="persimmon does not pass position_ids"):
            runner.decode(rows, torch.tensor([[3], [4]]))
        assert _state(rows) == before[0]
        assert torch.equal(store.k_cache, before[1]) and torch.equal(store.v_cache, before[2])
        runner.close()


@pytest.mark.usefixtures("no_compile_caches")
def test_small_mm_on_a_trained_checkpoint(monkeypatch):
    """A trained model (stories260K, a TinyStories Llama: dim 64, GQA 8 / 4 heads, a 172-wide MLP whose
    down projection has a ragged K), bf16, two threads of a 11-token prompt: with ``compile=True`` the
    projections on `kvfuse.small_mm` greedy-decode the same 12 tokens per thread as the same runner
    with ``small_mm=False``, logits within bf16 rounding."""
    import os

    from kvfuse import small_mm as mod
    from kvfuse.checkpoints import load_llama2c
    from tests.test_checkpoint import PATH

    if not os.path.exists(PATH):
        pytest.skip("stories260K.bin not found beside the repository")
    if not mod.available() or not (torch.cuda.is_available() or kvfuse.triton_kernels._common.interpreting()):
        pytest.skip("the small_mm pass needs triton on a GPU (or TRITON_INTERPRET=1) and torch's inductor passes")
    seen, real = [], mod.rewrite
    monkeypatch.setattr(mod, "rewrite", lambda g, backend="triton": seen.append(real(g, backend)) or seen[-1])
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_llama2c(PATH)
    model.config._attn_implementation = "kvfuse"
    model = model.to(device=dev, dtype=torch.bfloat16)
    store = kvfuse.PagedKVStore.from_hf(model.config, num_pages=64, page_size=8, dtype=torch.bfloat16, device=dev)
    prompt = store.sequence()
    hf.prefill(model, prompt, torch.tensor([[1, 461, 401, 378, 455, 473, 456, 435, 299, 362, 409]], device=dev))
    paths = {}
    for small in (True, False):
        torch._dynamo.reset()
        runner = DecodeGraphs(model, store, graphs=False, compile=True, small_mm=small)
        rows = kvfuse.fork(prompt, 2)
        tok = torch.tensor([[278], [365]], device=dev)
        steps = []
        for _ in range(12):
            logits = runner.decode(rows, tok)[:, -1].float()
            tok = logits.argmax(-1, keepdim=True)
            steps.append((logits, tok))
        paths[small] = steps
        runner.close()
        for r in rows:
            r.release()
    assert seen == [7 * model.config.num_hidden_layers + 1]  # every projection and the tied LM head
    for (got, got_tok), (want, want_tok) in zip(paths[True], paths[False]):
        assert torch.equal(got_tok, want_tok)
        assert ((got - want).norm() / want.norm()).item() < 2e-2
