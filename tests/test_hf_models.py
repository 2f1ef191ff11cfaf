"""Every Hugging Face architecture a user would plausibly run: computed exactly by kvfuse, or refused by name.

Each variant is a tiny random-weight config (2 layers, float32, sliding windows shorter than the test
sequences, Gemma 2's soft-cap small enough to bite), compared with the same weights under
``attn_implementation="eager"``:

* ``generate``: ``attn_implementation="kvfuse"`` with transformers' own cache: greedy tokens and logits of a
  batch, and of a batch with left padding.
* ``paged``: `hf.prefill` of a prompt into a `KVFuseCache`, then ``model.generate`` on it: the prefill's
  logits and every generated token's.
* ``threads``: a prefix, `kvfuse.fork` into 3 threads decoded as batches of different lengths with
  `hf.decode`, `kvfuse.merge` (shared layout), a continuation: every logit equals ONE eager forward over
  the composed tokens at the composed positions with the segment mask (windowed on sliding layers).
* ``refusal``: a padding mask and wrong ``position_ids`` on a `KVFuseCache`, and the eager model on one,
  are refused by name.

Every call that writes to a store runs under `_guarded`: when it raises, the store's pools, refcounts,
free list and every `Sequence` must be bit-identical to before. A check a variant cannot do must raise a
``ValueError`` (`UnsupportedModel` is one) whose message names the feature (`Variant.refuse`). Models whose
transformers code does not go through transformers' attention interface (`_attention_code`; it differs
between transformers versions) are refused by transformers itself (a fixed table of attention classes:
``KeyError: 'kvfuse'`` when built) or by kvfuse ("computes attention in its own modeling code").

Tolerance: 2e-5 absolute/relative in float32 (the two paths sum the same products in another order).
"""

import contextlib
import dataclasses
import functools
import sys
import types

import pytest
import torch

import kvfuse

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("kvfuse.integrations.hf")
NAME = hf.NAME

TOL = dict(atol=2e-5, rtol=2e-5)
W = 3  # sliding window (positions): shorter than every test sequence
PAGE = 4
PROMPT, NEW = 7, 4  # generate / paged: prompt tokens, generated tokens
PREFIX, CONT = 5, 3  # threads: prefix tokens, continuation tokens
STEPS = [((0, 1, 2), 2), ((0, 1), 1), ((0, 1, 2), 1), ((0,), 1)]  # (threads decoded together, tokens each)
INIT = 0.2  # weights' std: large enough for peaked attention (a soft-cap, a window, a position that bites)
C = dict(vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
         num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, initializer_range=INIT)
MIXED = dict(sliding_window=W, layer_types=["sliding_attention", "full_attention"])
MOE = dict(num_local_experts=4, num_experts_per_tok=2)


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: the model cache's key
class Variant:
    id: str
    config: str  # the transformers config class
    kwargs: dict
    refuse: dict = dataclasses.field(default_factory=dict)  # check -> (exception type, regex of its message)
    crashes: str = ""  # how a transformers version that cannot run this config at all fails (then skipped)


def _v(id, config, refuse=None, crashes="", **kwargs):
    return Variant(id, config, kwargs, refuse or {}, crashes)


CHECK_NAMES = ("generate", "paged", "threads", "refusal", "graphs")
# graphs: the static decode path compiled by torch.compile as well, for a few variants of different kinds
COMPILED = {"llama", "qwen3_moe", "gemma2-softcap-sliding", "gemma3_text", "phi3-sliding", "gptj", "smollm3-nope"}


def _refused(what, checks=CHECK_NAMES, exc=ValueError):
    return dict.fromkeys(checks, (exc, what))


LLAMA4 = dict(**C, head_dim=16, intermediate_size_mlp=64, num_local_experts=2, num_experts_per_tok=1,
              no_rope_layers=[1, 0])  # layer 1: NoPE
LLAMA4_UNCHUNKED = "its Llama 4 builds chunked masks without attention_chunk_size, even eagerly"
C_MHA = {k: v for k, v in C.items() if k != "num_key_value_heads"}  # models whose configs have no KV head count
FALCON = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
              initializer_range=INIT)
# Falcon builds its attention from a fixed table (`_attention_code`): its eager model on a KVFuseCache is refused
FALCON_REFUSE = {"refusal": (ValueError, "falcon computes attention in its own modeling code")}

VARIANTS = [
    _v("llama", "LlamaConfig", **C),
    _v("llama-llama3", "LlamaConfig", **C, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)),
    _v("llama-linear", "LlamaConfig", **C, rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0)),
    _v("llama-yarn", "LlamaConfig", **C, rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                              original_max_position_embeddings=32)),
    _v("mistral-sliding", "MistralConfig", **C, sliding_window=W),
    _v("mixtral", "MixtralConfig", **C, **MOE),
    _v("qwen2", "Qwen2Config", **C),
    _v("qwen2-sliding", "Qwen2Config", **C, use_sliding_window=True, sliding_window=W, max_window_layers=1),
    _v("qwen2_moe", "Qwen2MoeConfig", **C, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
       shared_expert_intermediate_size=32),
    _v("qwen3", "Qwen3Config", **C, head_dim=16),
    _v("qwen3_moe", "Qwen3MoeConfig", **C, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    _v("gemma", "GemmaConfig", **C, head_dim=16),
    _v("gemma2-softcap-sliding", "Gemma2Config", **C, head_dim=16, query_pre_attn_scalar=16,
       attn_logit_softcapping=3.0, final_logit_softcapping=5.0, **MIXED),
    _v("gemma3_text", "Gemma3TextConfig", **C, head_dim=16, query_pre_attn_scalar=16, **MIXED, rope_parameters=dict(
        sliding_attention=dict(rope_type="default", rope_theta=10000.0),
        full_attention=dict(rope_type="linear", rope_theta=1e6, factor=8.0))),
    _v("cohere", "CohereConfig", **C),
    _v("cohere2-sliding", "Cohere2Config", **C, **MIXED),
    _v("glm", "GlmConfig", **C, head_dim=16),
    _v("glm4", "Glm4Config", **C, head_dim=16),
    _v("phi", "PhiConfig", **C, partial_rotary_factor=0.5),
    _v("phi3-sliding", "Phi3Config", **C, sliding_window=W),
    _v("gpt_neox", "GPTNeoXConfig", **C_MHA, rotary_pct=0.5),
    _v("gpt_neox-stray-kv-heads", "GPTNeoXConfig", **C, rotary_pct=0.5),  # a field GPT-NeoX ignores
    _v("gptj", "GPTJConfig", vocab_size=96, n_positions=128, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
       initializer_range=INIT),
    _v("codegen", "CodeGenConfig", vocab_size=96, n_positions=128, n_ctx=128, n_embd=64, n_layer=2, n_head=4,
       rotary_dim=8, initializer_range=INIT),
    _v("stablelm", "StableLmConfig", **C, partial_rotary_factor=0.25),
    _v("persimmon", "PersimmonConfig", **C_MHA, partial_rotary_factor=0.5,
       refuse=_refused("does not pass position_ids", CHECK_NAMES[1:])),
    _v("starcoder2-sliding", "Starcoder2Config", **C, sliding_window=W),
    _v("olmo", "OlmoConfig", **C),
    _v("olmo2", "Olmo2Config", **C),
    _v("granite", "GraniteConfig", **C, embedding_multiplier=2.0, logits_scaling=4.0, residual_multiplier=0.5,
       attention_multiplier=0.2),
    _v("nemotron", "NemotronConfig", **C, partial_rotary_factor=0.5),
    _v("smollm3-nope", "SmolLM3Config", **C, no_rope_layers=[1, 0]),
    _v("falcon-rope", "FalconConfig", **FALCON, alibi=False, multi_query=False, num_kv_heads=4,
       refuse=FALCON_REFUSE),
    _v("falcon-alibi", "FalconConfig", **FALCON, alibi=True, multi_query=False, num_kv_heads=4,
       refuse={"refusal": (ValueError, "falcon uses ALiBi")}),
    _v("falcon-multi-query", "FalconConfig", **FALCON, alibi=False, multi_query=True, refuse=FALCON_REFUSE),
    _v("falcon-new-arch", "FalconConfig", **FALCON, alibi=False, new_decoder_architecture=True, num_kv_heads=2,
       refuse=FALCON_REFUSE),
    _v("gpt2", "GPT2Config", vocab_size=96, n_positions=128, n_embd=64, n_layer=2, n_head=4, initializer_range=INIT),
    _v("opt", "OPTConfig", vocab_size=96, hidden_size=64, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
       max_position_embeddings=128, word_embed_proj_dim=64, init_std=INIT),
    _v("bloom-alibi", "BloomConfig", vocab_size=96, hidden_size=64, n_layer=2, n_head=4, initializer_range=INIT,
       refuse=_refused("bloom uses ALiBi")),
    _v("mpt-alibi", "MptConfig", vocab_size=96, d_model=64, n_heads=4, n_layers=2, max_seq_len=128,
       initializer_range=INIT, refuse=_refused("mpt uses ALiBi")),
    _v("deepseek_v3-mla", "DeepseekV3Config", **{**C, "num_key_value_heads": 4}, moe_intermediate_size=32,
       n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=None,
       qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, first_k_dense_replace=1,
       refuse=_refused(r"multi-head latent attention \(MLA\)")),
    _v("llama4_text-chunked", "Llama4TextConfig", **LLAMA4, attention_chunk_size=4,
       refuse=_refused("chunked attention")),
    _v("llama4_text-temperature", "Llama4TextConfig", **LLAMA4, attention_chunk_size=None,
       refuse=_refused("attn_temperature_tuning"), crashes=LLAMA4_UNCHUNKED),
    _v("llama4_text-plain", "Llama4TextConfig", **LLAMA4, attention_chunk_size=None, attn_temperature_tuning=False,
       refuse=_refused("does not pass position_ids", CHECK_NAMES[1:]), crashes=LLAMA4_UNCHUNKED),
    _v("gpt_oss-sinks", "GptOssConfig", **C, head_dim=16, **MOE, **MIXED, refuse=_refused("attention sinks")),
]


# ---------------------------------------------------------------------- models
def _config(v: Variant):
    cls = getattr(transformers, v.config, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {v.config}")
    return cls(**v.kwargs)


@functools.cache
def _model(v: Variant, attn: str):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(v), attn_implementation="eager").float().eval()
    model.generation_config.eos_token_id = None  # always generate NEW tokens
    model.generation_config.pad_token_id = 0
    if v.crashes:
        try:
            with torch.no_grad():
                model(torch.ones(1, 2, dtype=torch.long))
        except Exception as e:
            pytest.skip(f"transformers {transformers.__version__}: {v.crashes} ({type(e).__name__}: {e})")
    if attn == "eager":
        return model
    other = transformers.AutoModelForCausalLM.from_config(_config(v), attn_implementation=attn).float().eval()
    other.load_state_dict(model.state_dict())
    other.generation_config = model.generation_config
    return other


def _ids(shape, seed):
    return torch.randint(1, C["vocab_size"], shape, generator=torch.Generator().manual_seed(seed))


def _store(model, num_pages=64):
    store = kvfuse.PagedKVStore.from_hf(model.config, num_pages=num_pages, page_size=PAGE)
    store.k_cache.normal_()  # garbage in unused slots, never zeros
    store.v_cache.normal_()
    return store


# ---------------------------------------------------------------------- a refused call changes nothing
def _snapshot(store, seqs, held_only):
    pools = [store.k_cache.clone(), store.v_cache.clone()]
    if held_only:  # only the slots of the sequences' tokens
        slots = torch.cat([s.host_slots(0, s.length) for s in seqs])
        pools = [p.flatten(1, 2)[:, slots] for p in pools]
    return ([p.view(torch.int32) for p in pools], list(store.refcount), list(store._free),
            [(list(s.pages), list(s.segments), s.released) for s in seqs])


@contextlib.contextmanager
def _guarded(store, seqs, held_only=False):
    """When the block raises, the store and every sequence in ``seqs`` must be bit-identical to before (with
    ``held_only``: the slots no sequence holds may differ)."""
    before = _snapshot(store, seqs, held_only)
    try:
        yield
    except Exception:
        after = _snapshot(store, seqs, held_only)
        assert all(torch.equal(a, b) for a, b in zip(before[0], after[0])), "a refused call changed the pools"
        assert before[1:] == after[1:], "a refused call changed the refcounts, free list or sequences"
        raise


# ---------------------------------------------------------------------- the checks
def check_generate(v: Variant, monkeypatch):
    ref, model = _model(v, "eager"), _model(v, "kvfuse")
    calls = []
    # dense K/V of transformers' cache: torch's SDPA, or kvfuse.sdpa with soft-capping (both counted)
    monkeypatch.setattr(hf, "sdpa", lambda *a, **k: calls.append(1) or kvfuse.sdpa(*a, **k))
    dense = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(hf, "F", types.SimpleNamespace(scaled_dot_product_attention=lambda *a, **k: calls.append(1)
                                                       or dense(*a, **k)))
    ids = _ids((2, PROMPT), 1)
    padded = torch.ones_like(ids)
    padded[0, :3] = 0  # left padding of row 0
    kw = dict(max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True, output_logits=True)
    for mask in (None, padded):
        want = ref.generate(ids, attention_mask=mask, **kw)
        got = model.generate(ids, attention_mask=mask, **kw)
        assert torch.equal(got.sequences, want.sequences)
        torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), **TOL)
    assert calls, "kvfuse's attention was never called"


def check_paged(v: Variant, monkeypatch):
    ref, model = _model(v, "eager"), _model(v, "kvfuse")
    ids = _ids((1, PROMPT), 2)
    kw = dict(max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        want_prefill = ref(ids[:, :-1]).logits
    want = ref.generate(ids, **kw)
    store = _store(model)
    seq = store.sequence()
    with _guarded(store, [seq]):
        logits = hf.prefill(model, seq, ids[:, :-1])
    torch.testing.assert_close(logits, want_prefill, **TOL)
    cache = hf.KVFuseCache(store, [seq], config=model.config)
    with _guarded(store, [seq]):
        got = model.generate(**cache.generate_inputs(ids[:, -1:]), **kw)
    assert torch.equal(got.sequences, want.sequences[:, PROMPT - 1:])
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), **TOL)


def _reference_mask(config, graph):
    """The segment mask as eager attention takes it: one additive 4D mask, or one per layer type."""
    def additive(window=None):
        m = torch.zeros(graph.num_tokens, graph.num_tokens)
        return m.masked_fill_(~graph.dense_mask(window=window), torch.finfo(m.dtype).min)[None, None]

    window = getattr(config, "sliding_window", None)
    types = set(getattr(config, "layer_types", None) or ["sliding_attention" if window else "full_attention"])
    masks = {t: additive(window if t == "sliding_attention" else None) for t in types}
    return masks if len(masks) > 1 else masks.popitem()[1]


def check_threads(v: Variant, monkeypatch):
    ref, model = _model(v, "eager"), _model(v, "kvfuse")
    store = _store(model)
    prefix = store.sequence("prefix")
    prefix_ids = _ids((1, PREFIX), 3)
    with _guarded(store, [prefix]):
        logits = [hf.prefill(model, prefix, prefix_ids)[0]]
    threads = kvfuse.fork(prefix, 3)
    fed, got = [[] for _ in threads], [[] for _ in threads]
    for step, (rows, n) in enumerate(STEPS):
        ids = _ids((len(rows), n), 10 + step)
        with _guarded(store, threads):
            out = hf.decode(model, [threads[i] for i in rows], ids)
        for b, i in enumerate(rows):
            fed[i].append(ids[b])
            got[i].append(out[b])
    assert len({t.num_tokens for t in threads}) == 3  # threads of different lengths
    with _guarded(store, threads):
        merged = kvfuse.merge(threads, layout="shared")
    cont_ids = _ids((1, CONT), 20)
    for part in (cont_ids[:, :2], cont_ids[:, 2:]):  # a chunk of two tokens, then one
        with _guarded(store, [merged]):
            logits.append(hf.decode(model, [merged], part)[0])
    logits[1:1] = [torch.cat(g) for g in got]  # in the composed order: prefix, threads, continuation

    ids = torch.cat([prefix_ids[0], *(torch.cat(f) for f in fed), cont_ids[0]])
    graph = merged.token_graph()
    assert graph.num_tokens == ids.numel()
    with torch.no_grad():
        want = ref(ids[None], position_ids=merged.positions()[None],
                   attention_mask=_reference_mask(model.config, graph)).logits[0]
    torch.testing.assert_close(torch.cat(logits), want, **TOL)


def _has_full_attention(config) -> bool:
    window = getattr(config, "sliding_window", None)
    return window is None or "full_attention" in (getattr(config, "layer_types", None) or ())


def check_refusal(v: Variant, monkeypatch):
    ref, model = _model(v, "eager"), _model(v, "kvfuse")
    store = _store(model)
    seq = store.sequence()
    with _guarded(store, [seq]):
        hf.prefill(model, seq, _ids((1, PROMPT), 4))
    ids = _ids((1, 2), 5)
    cache = hf.KVFuseCache(store, [seq], config=model.config)
    kv = {hf.CACHE_KW: cache}
    # padding inside every layer's window, and (on models with a full-attention layer) outside the sliding ones'
    for pad in [PROMPT - 1] + [0] * _has_full_attention(model.config):
        mask = torch.ones(1, PROMPT + 2, dtype=torch.long)
        mask[0, pad] = 0
        with pytest.raises(ValueError, match="padding"), _guarded(store, [seq]):
            model(ids, attention_mask=mask, position_ids=cache.position_ids(2), **kv)
    with pytest.raises(ValueError, match="position_ids"), _guarded(store, [seq]):
        model(ids, position_ids=cache.position_ids(2) + 1, **kv)
    types = getattr(model.config, "layer_types", None) or []
    if len(set(types)) > 1:
        # one 4D mask for every layer, the first layer's plain pattern: a later layer of another type refuses
        # it, after the earlier layers wrote this step's new slots (which no row then holds)
        q = -PROMPT % PAGE + PAGE + 1  # the step takes two new pages: the free list must be restored in order
        window = W if types[0] == "sliding_attention" else None
        qi, ki = torch.arange(PROMPT, PROMPT + q)[:, None], torch.arange(PROMPT + q)[None]
        mask = ((ki <= qi) & (ki > qi - (window or PROMPT + q)))[None, None]
        with pytest.raises(ValueError, match="custom attention masks"), _guarded(store, [seq], held_only=True):
            model(_ids((1, q), 6), attention_mask=mask, position_ids=cache.position_ids(q), **kv)
    cache = hf.KVFuseCache(store, [seq], config=ref.config)
    with pytest.raises(ValueError, match="attn_implementation"), _guarded(store, [seq]):
        ref(ids, position_ids=cache.position_ids(2), **{hf.CACHE_KW: cache})


def check_refusal_eager(v: Variant, monkeypatch):
    """For models that cannot be built with kvfuse's attention: the eager model on a `KVFuseCache` is refused."""
    ref = _model(v, "eager")
    store = _store(ref)
    seq = store.sequence()
    cache = hf.KVFuseCache(store, [seq], config=ref.config)
    with _guarded(store, [seq]):
        ref(_ids((1, 2), 5), position_ids=cache.position_ids(2), **{hf.CACHE_KW: cache})


def check_graphs(v: Variant, monkeypatch):
    """`DecodeGraphs`' static path (eagerly: the CPU has no CUDA graphs; compiled too for `COMPILED`): three
    threads of a prefilled prefix, four one-token steps, against `hf.decode` one thread at a time (which
    `check_threads` holds to the eager model), to 1e-4: its plan pads every row's keys to the bucket's
    capacity, so float32 matmuls round differently (up to ~3e-5 seen, Nemotron)."""
    from kvfuse.integrations.hf_graphs import DecodeGraphs

    model = _model(v, "kvfuse")
    for compile in (False, True) if v.id in COMPILED else (False,):
        store = _store(model, 96)
        prefix = store.sequence("prefix")
        hf.prefill(model, prefix, _ids((1, PREFIX + 1), 3))
        ref, rows = kvfuse.fork(prefix, 3), kvfuse.fork(prefix, 3)
        runner = DecodeGraphs(model, store, graphs=False, compile=compile)
        for step in range(4):
            ids = _ids((3, 1), 30 + step)
            want = torch.cat([hf.decode(model, [t], ids[i: i + 1]) for i, t in enumerate(ref)])
            with _guarded(store, rows):
                got = runner.decode(rows, ids)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # (its keys padded to the bucket's capacity)
        runner.close()


CHECKS = {"generate": check_generate, "paged": check_paged, "threads": check_threads, "refusal": check_refusal,
          "graphs": check_graphs}


def _attention_code(v: Variant) -> str:
    """How the installed transformers' modeling code of ``v`` runs attention: "interface" (through transformers'
    attention interface, which attn_implementation="kvfuse" plugs into), "table" (it builds its attention from
    a fixed table of classes: a model with another implementation cannot be built) or "own" (in its own code,
    whatever attn_implementation says)."""
    module = sys.modules[type(_model(v, "eager")).__module__]
    if hasattr(module, "ALL_ATTENTION_FUNCTIONS"):
        return "interface"
    return "table" if any(name.endswith("_ATTENTION_CLASSES") for name in vars(module)) else "own"


def _expected(v: Variant, check: str, request):
    """``(exception, regex)`` of the refusal ``check`` must raise on ``v`` with this transformers, or None (exact).
    A model whose installed modeling code computes attention itself is refused by name."""
    code = _attention_code(v)
    if code == "table":
        return v.refuse.get(check, (ValueError, "attn_implementation") if check == "refusal" else (KeyError, NAME))
    if code == "own" and check not in v.refuse:  # hf_config reads the installed modeling code: refused by name
        return ValueError, "own modeling code"
    return v.refuse.get(check)


@pytest.mark.parametrize("check", CHECK_NAMES)
@pytest.mark.parametrize("variant", VARIANTS, ids=[v.id for v in VARIANTS])
def test_model(variant, check, monkeypatch, request):
    table = check == "refusal" and _attention_code(variant) == "table"
    run = check_refusal_eager if table else CHECKS[check]
    refusal = _expected(variant, check, request)
    if refusal is None:
        run(variant, monkeypatch)
        return
    with pytest.raises(refusal[0], match=refusal[1]):
        run(variant, monkeypatch)


@pytest.mark.parametrize("arch", ["bloom-alibi", "mpt-alibi", "llama"])
def test_unsupported_attention_is_refused_at_the_mask(arch, monkeypatch):
    """attn_implementation="kvfuse" refuses what hf_config.unsupported_attention names before any layer runs, at
    the mask: the one kvfuse function that models computing attention in their own code (Bloom, MPT) call."""
    model = _model(next(v for v in VARIANTS if v.id == arch), "kvfuse")
    monkeypatch.setattr(hf, "unsupported_attention", lambda config: [f"{config.model_type} uses a feature X"])
    with pytest.raises(hf.UnsupportedModel, match=f"{model.config.model_type} uses a feature X"):
        model.generate(_ids((1, PROMPT), 7), max_new_tokens=1, do_sample=False)


def test_own_attention_code_is_refused_on_a_kvfuse_cache(monkeypatch):
    """A model that uses the K/V a `KVFuseCache` hands back as tensors (it computes attention in its own code)
    is refused by name at its first use, with the store unchanged, even when hf_config does not name it."""
    model = _model(next(v for v in VARIANTS if v.id == "bloom-alibi"), "kvfuse")
    monkeypatch.setattr(hf, "unsupported_attention", lambda config: [])
    store = _store(model)
    seq = store.sequence()
    with pytest.raises(hf.UnsupportedModel, match="bloom computes attention in its own modeling code"), \
            _guarded(store, [seq]):
        hf.prefill(model, seq, _ids((1, PROMPT), 8))


@pytest.mark.parametrize("use", [lambda t: t.transpose(1, 2), lambda t: t.shape, lambda t: t[:, :, -1:],
                                 lambda t: t * 0.5, lambda t: torch.cat([torch.zeros(1, 1, 1, 16), t], dim=2),
                                 lambda t: torch.zeros(1, 1, 1, 16) @ t],
                         ids=["method", "attribute", "index", "operator", "torch.cat", "matmul"])
def test_kvfuse_cache_keys_refuse_tensor_use(use):
    """What `KVFuseCache.update` hands back is for kvfuse's attention only: used as a tensor, it refuses by name."""
    model = _model(VARIANTS[0], "kvfuse")
    store = _store(model)
    cache = hf.KVFuseCache(store, [store.sequence()], config=model.config)
    key, _ = cache.update(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16), 0)
    with pytest.raises(hf.UnsupportedModel, match="llama computes attention in its own modeling code"):
        use(key)
