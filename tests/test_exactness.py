"""The definition of "lossless": a composed cache equals the cache of one masked forward pass.

For each architecture, a shared prefix and three threads of different lengths are prefilled
separately (each thread sees the prefix and itself), their caches are moved into a kvfuse paged pool
and composed. The reference is ONE forward pass of the same model over the composed token sequence
with the segment graph as a custom 4D attention mask and the composed position ids.

* "shared" layout (threads keep their positions): every layer's K and V, and the logits of a
  continuation of several tokens decoded from the composed cache, agree.
* "sequential" layout (thread i moved after thread i-1 by re-rotation): the re-rotation itself is
  exact -- layer 0's K and V (which depend on the token alone) agree, and so does everything of the
  first thread, which does not move. Deeper layers of the moved threads do NOT equal a forward pass at
  the new positions, and cannot: their hidden states were computed while attending to the prefix at
  the old distance, which a single position id per token cannot express. `test_sequential_layout_
  deeper_layers_differ` measures that gap, so this limit stays visible.

Tolerance: 2e-5 absolute/relative in float32. The two computations differ only in float32 rounding:
the reference rotates keys at angles formed in float32 (error ~ position * 6e-8 rad, positions < 64
here), kvfuse re-rotates by a float64 angle; and the reference's attention sums over masked-out
(exactly zero-weight) keys in a different order. Both are ~1e-6 relative on values of order 1.
"""

import pytest
import torch

import kvfuse
from kvfuse import Segment, SegmentGraph, SourceSegment
from tests.hf_utils import additive_mask, cache_from, cache_layers, make_model

ARCHS = ["llama", "llama3", "qwen2", "mistral", "gpt_neox"]
PREFIX, THREADS, CONT = 11, [5, 9, 3], 4
PAGE = 4


def _prefill_threads(model, prefix_ids, thread_ids):
    """Prefix once, then each thread separately on a copy of the prefix cache."""
    with torch.no_grad():
        out = model(prefix_ids[None], position_ids=torch.arange(PREFIX)[None], use_cache=True)
        prefix_kv = [(k.clone(), v.clone()) for k, v in cache_layers(out.past_key_values)]
        threads_kv = []
        for ids in thread_ids:
            cache = cache_from([(k.clone(), v.clone()) for k, v in prefix_kv], model.config)
            pos = torch.arange(PREFIX, PREFIX + ids.numel())[None]
            out = model(ids[None], position_ids=pos, past_key_values=cache, use_cache=True)
            threads_kv.append([(k[:, :, PREFIX:], v[:, :, PREFIX:]) for k, v in cache_layers(out.past_key_values)])
    return prefix_kv, threads_kv


def _to_pool(prefix_kv, threads_kv, n_layers, hkv, d):
    """A layer-stacked pool holding the prefix and every thread in their own pages."""
    pool = kvfuse.PagePool(64, PAGE, hkv, d, num_layers=n_layers)
    pool.k_cache.normal_()  # garbage in unused slots, never zeros
    pool.v_cache.normal_()
    seqs = []
    for kv in [prefix_kv] + threads_kv:
        n = kv[0][0].shape[2]
        pages = pool.alloc(max(1, pool.pages_for(n)))
        k = torch.stack([lk[0].transpose(0, 1) for lk, _ in kv])  # [L, n, H, D]
        v = torch.stack([lv[0].transpose(0, 1) for _, lv in kv])
        kvfuse.write_kv_(pool.k_cache, pages, 0, k)
        kvfuse.write_kv_(pool.v_cache, pages, 0, v)
        seqs.append((pages, n))
    return pool, seqs


@pytest.mark.parametrize("layout", ["sequential", "shared"])
@pytest.mark.parametrize("arch", ARCHS)
def test_composed_cache_equals_masked_forward(arch, layout):
    _compose_and_compare(arch, layout)


def _compose_and_compare(arch, layout):
    model = make_model(arch)
    cfg = model.config
    rope = kvfuse.RopeConfig.from_hf(cfg)
    n_layers, hkv = cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    d = cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator().manual_seed(1)
    prefix_ids = torch.randint(0, cfg.vocab_size, (PREFIX,), generator=g)
    thread_ids = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in THREADS]
    cont_ids = torch.randint(0, cfg.vocab_size, (CONT,), generator=g)

    prefix_kv, threads_kv = _prefill_threads(model, prefix_ids, thread_ids)
    pool, seqs = _to_pool(prefix_kv, threads_kv, n_layers, hkv, d)
    segs = [SourceSegment(seqs[0][0], PREFIX, position=0)]
    segs += [SourceSegment(p, n, position=PREFIX, give_up=True) for p, n in seqs[1:]]
    composed = kvfuse.compose(pool.k_cache, pool.v_cache, segs, rope, layout=layout, dst_pages=pool)

    # the reference: one masked forward over the composed token sequence and the continuation
    graph = SegmentGraph([Segment("prefix", PREFIX)]
                         + [Segment(f"t{i}", n, ("prefix",)) for i, n in enumerate(THREADS)]
                         + [Segment("cont", CONT, ("prefix", "t0", "t1", "t2"))])
    cont_start = int(composed.positions.max()) + 1
    positions = torch.cat([composed.positions, torch.arange(cont_start, cont_start + CONT)])
    ids = torch.cat([prefix_ids, *thread_ids, cont_ids])
    with torch.no_grad():
        ref = model(ids[None], position_ids=positions[None], attention_mask=additive_mask(graph.dense_mask()),
                    use_cache=True)
    ref_kv = cache_layers(ref.past_key_values)

    n = composed.length
    got_k = kvfuse.gather_kv(pool.k_cache, composed.pages, n)  # [L, n, H, D]
    got_v = kvfuse.gather_kv(pool.v_cache, composed.pages, n)
    if layout == "sequential":  # exact: layer 0 everywhere, every layer up to the end of the first thread
        first = PREFIX + THREADS[0]
        for layer, (rk, rv) in enumerate(ref_kv):
            stop = n if layer == 0 else first
            torch.testing.assert_close(got_k[layer, :stop], rk[0, :, :stop].transpose(0, 1), atol=2e-5, rtol=2e-5)
            torch.testing.assert_close(got_v[layer, :stop], rv[0, :, :stop].transpose(0, 1), atol=2e-5, rtol=2e-5)
        return
    for layer, (rk, rv) in enumerate(ref_kv):
        torch.testing.assert_close(got_k[layer], rk[0, :, :n].transpose(0, 1), atol=2e-5, rtol=2e-5,
                                   msg=f"layer {layer} K")
        torch.testing.assert_close(got_v[layer], rv[0, :, :n].transpose(0, 1), atol=2e-5, rtol=2e-5,
                                   msg=f"layer {layer} V")

    # continue from the composed cache: the continuation sees everything, so no mask is needed
    cache = cache_from([(got_k[i].transpose(0, 1)[None], got_v[i].transpose(0, 1)[None]) for i in range(n_layers)],
                       cfg)
    with torch.no_grad():
        out = model(cont_ids[None], position_ids=positions[n:][None], past_key_values=cache, use_cache=True)
    torch.testing.assert_close(out.logits[0], ref.logits[0, n:], atol=2e-5, rtol=2e-5)
    # and kvfuse's own segment attention over the paged pool reproduces the reference's layer-0 output
    # through the plan (all tokens as queries, the graph's mask)
    p = kvfuse.plan(kvfuse.AttentionSpec([SegmentGraph(graph.segments[:-1])]))
    q = torch.randn(n, cfg.num_attention_heads, d)
    table = composed.pages[None].to(torch.int32)
    k0, v0 = pool.k_cache[0], pool.v_cache[0]
    got = kvfuse.attention(q, k0, v0, table, p)
    m = SegmentGraph(graph.segments[:-1]).dense_mask()
    kk = got_k[0].repeat_interleave(cfg.num_attention_heads // hkv, 1).transpose(0, 1)
    vv = got_v[0].repeat_interleave(cfg.num_attention_heads // hkv, 1).transpose(0, 1)
    want = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), kk, vv, attn_mask=m)
    torch.testing.assert_close(got, want.transpose(0, 1), atol=2e-5, rtol=2e-5)


def test_naive_concatenation_is_not_exact():
    """Control: skipping the re-rotation (sequential layout) visibly breaks equality, so the test above can fail."""
    model = make_model("llama")
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    prefix_ids = torch.randint(0, cfg.vocab_size, (PREFIX,), generator=g)
    thread_ids = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in THREADS]
    prefix_kv, threads_kv = _prefill_threads(model, prefix_ids, thread_ids)
    graph = SegmentGraph([Segment("prefix", PREFIX)]
                         + [Segment(f"t{i}", n, ("prefix",)) for i, n in enumerate(THREADS)])
    positions = torch.arange(graph.num_tokens)
    with torch.no_grad():
        ref = model(torch.cat([prefix_ids, *thread_ids])[None], position_ids=positions[None],
                    attention_mask=additive_mask(graph.dense_mask()), use_cache=True)
    naive_k1 = threads_kv[1][0][0]  # thread 1 rotated at PREFIX.., but it belongs at PREFIX + 5..
    ref_k1 = cache_layers(ref.past_key_values)[0][0][:, :, PREFIX + 5: PREFIX + 14]
    assert (naive_k1 - ref_k1).abs().max() > 1e-2


def test_sequential_layout_deeper_layers_differ():
    """The inherent gap of the sequential layout: a moved thread's layer-1 keys differ from a forward
    pass at the new positions by far more than rounding (so the exact claims above are not vacuous)."""
    model = make_model("llama")
    cfg = model.config
    rope = kvfuse.RopeConfig.from_hf(cfg)
    g = torch.Generator().manual_seed(1)
    prefix_ids = torch.randint(0, cfg.vocab_size, (PREFIX,), generator=g)
    thread_ids = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in THREADS]
    prefix_kv, threads_kv = _prefill_threads(model, prefix_ids, thread_ids)
    d = cfg.hidden_size // cfg.num_attention_heads
    pool, seqs = _to_pool(prefix_kv, threads_kv, cfg.num_hidden_layers, cfg.num_key_value_heads, d)
    segs = [SourceSegment(seqs[0][0], PREFIX, position=0)]
    segs += [SourceSegment(p, n, position=PREFIX, give_up=True) for p, n in seqs[1:]]
    composed = kvfuse.compose(pool.k_cache, pool.v_cache, segs, rope, layout="sequential", dst_pages=pool)
    graph = SegmentGraph([Segment("prefix", PREFIX)] + [Segment(f"t{i}", n, ("prefix",))
                                                         for i, n in enumerate(THREADS)])
    with torch.no_grad():
        ref = model(torch.cat([prefix_ids, *thread_ids])[None], position_ids=composed.positions[None],
                    attention_mask=additive_mask(graph.dense_mask()), use_cache=True)
    got_k1 = kvfuse.gather_kv(pool.k_cache, composed.pages, composed.length)[1]
    ref_k1 = cache_layers(ref.past_key_values)[1][0][0].transpose(0, 1)
    moved = slice(PREFIX + THREADS[0], composed.length)
    assert (got_k1[moved] - ref_k1[moved]).abs().max() > 1e-3
