"""kvfuse demo: fork a prompt into threads, merge their KV caches, check, and time it.

A small random-weight Llama-shaped model (Hugging Face transformers) prefills a shared prefix and T
threads separately; kvfuse composes the threads' paged caches into one sequence in both layouts.
The composed cache is checked against one masked forward pass over the composed tokens (the
definition of "lossless"), and the merge is timed against that re-prefill.

    python -m kvfuse.demo [--threads 4 --prefix 512 --thread-len 256 --layers 4]

Uses the GPU kernels when a GPU is present, the torch backend otherwise.
"""

from __future__ import annotations

import argparse
import time

import torch

import kvfuse
from kvfuse import Segment, SegmentGraph, SourceSegment
from kvfuse._deps import require


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, dev, reps=3):
    fn()
    _sync(dev)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        _sync(dev)
        best = min(best, time.perf_counter() - t)
    return out, best


def _layers(cache):
    return [(layer.keys, layer.values) for layer in cache.layers] if hasattr(cache, "layers") else list(
        zip(cache.key_cache, cache.value_cache))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--prefix", type=int, default=256)
    ap.add_argument("--thread-len", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--backend", default=None, help="auto (default), cuda, triton or torch")
    args = ap.parse_args(argv)
    transformers = require("transformers", "kvfuse.demo")
    from kvfuse.integrations import hf

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024,
                                   num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2,
                                   max_position_embeddings=1 << 16, rope_theta=500000.0)
    # dtype= keeps the RoPE frequencies in float32 (model.to(bf16) would round them to bf16)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=dtype)
    model = model.to(dev).eval()
    rope = kvfuse.RopeConfig.from_hf_model(model)
    P, T, L = args.prefix, args.threads, args.thread_len
    lens = [L - 7 * i for i in range(T)]  # threads of different lengths
    ids = [torch.randint(0, cfg.vocab_size, (n,), device=dev) for n in [P] + lens]
    d, hkv = cfg.hidden_size // cfg.num_attention_heads, cfg.num_key_value_heads

    # 1. prefill the prefix once and every thread separately (each sees the prefix and itself)
    pool = kvfuse.PagePool(2 * (P + sum(lens)) // args.page_size + 4 * T + 8, args.page_size, hkv, d,
                           num_layers=args.layers, dtype=dtype, device=dev)
    with torch.no_grad():
        out = model(ids[0][None], position_ids=torch.arange(P, device=dev)[None], use_cache=True)
        prefix_kv = _layers(hf.output_cache(out))
        seqs = []
        for kv, n in [(prefix_kv, P)]:
            pages = pool.alloc(pool.pages_for(n))
            kvfuse.write_kv_(pool.k_cache, pages, 0, torch.stack([k[0].transpose(0, 1) for k, _ in kv]))
            kvfuse.write_kv_(pool.v_cache, pages, 0, torch.stack([v[0].transpose(0, 1) for _, v in kv]))
            seqs.append(pages)
        for t, n in enumerate(lens):
            cache = transformers.DynamicCache(config=cfg)
            for i, (k, v) in enumerate(prefix_kv):
                cache.update(k.clone(), v.clone(), i)
            o = model(ids[1 + t][None], position_ids=torch.arange(P, P + n, device=dev)[None],
                      **hf.cache_kwargs(model, cache))
            kv = [(k[:, :, P:], v[:, :, P:]) for k, v in _layers(hf.output_cache(o))]
            pages = pool.alloc(pool.pages_for(n))
            kvfuse.write_kv_(pool.k_cache, pages, 0, torch.stack([k[0].transpose(0, 1) for k, _ in kv]))
            kvfuse.write_kv_(pool.v_cache, pages, 0, torch.stack([v[0].transpose(0, 1) for _, v in kv]))
            seqs.append(pages)

    graph = SegmentGraph([Segment("prefix", P)] + [Segment(f"t{i}", n, ("prefix",)) for i, n in enumerate(lens)])
    all_ids = torch.cat(ids)
    rows = []
    for layout in ("shared", "sequential"):
        segs = [SourceSegment(seqs[0], P)] + [SourceSegment(s, n, position=P) for s, n in zip(seqs[1:], lens)]
        n_dst = kvfuse.pages_needed(segs, args.page_size, layout=layout)
        dst = pool.alloc(n_dst)

        def merge(segs=segs, layout=layout, dst=dst):
            return kvfuse.compose(pool.k_cache, pool.v_cache, segs, rope, layout=layout, dst_pages=dst,
                                  backend=args.backend)

        composed, t_merge = _timed(merge, dev)
        mask = graph.dense_mask().to(dev)
        add = torch.zeros(mask.shape, dtype=dtype, device=dev).masked_fill_(~mask, torch.finfo(dtype).min)

        def reprefill(composed=composed, add=add):
            with torch.no_grad():
                return model(all_ids[None], position_ids=composed.positions[None], attention_mask=add[None, None],
                             use_cache=True)

        ref, t_ref = _timed(reprefill, dev)
        ref_kv = _layers(hf.output_cache(ref))
        got_k = kvfuse.gather_kv(pool.k_cache, composed.pages, composed.length)
        got_v = kvfuse.gather_kv(pool.v_cache, composed.pages, composed.length)
        checked = range(args.layers) if layout == "shared" else [0]  # see README: sequential is exact at layer 0

        def rel(a, b):  # max abs difference relative to the largest reference value
            return (a.float() - b.float()).abs().max().item() / b.float().abs().max().item()

        err = max(max(rel(got_k[i], ref_kv[i][0][0].transpose(0, 1)), rel(got_v[i], ref_kv[i][1][0].transpose(0, 1)))
                  for i in checked)
        # the reference rotates at angles formed in float32 (error ~ position * 2**-24 rad); bf16 adds a
        # few roundings of 2**-8 per layer on both sides
        tol = (1e-5 if dtype == torch.float32 else 2**-6) + 2 * int(composed.positions.max()) * 2**-24
        rows.append((layout, composed.length, t_merge * 1e3, t_ref * 1e3, t_ref / t_merge, len(checked), err, tol))
        pool.free(dst)

    print(f"device: {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'} ({dtype}), model: "
          f"{args.layers} layers, {cfg.num_attention_heads} heads, {hkv} KV heads, head_dim {d}; "
          f"prefix {P}, threads {lens}")
    print("| layout | tokens | merge (ms) | masked re-prefill (ms) | speed-up | layers checked | max rel diff "
          "| tolerance | ok |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    ok = True
    for layout, n, tm, tr, sp, nl, err, tol in rows:
        good = err <= tol
        ok &= good
        print(f"| {layout} | {n} | {tm:.3f} | {tr:.1f} | {sp:.0f}x | {nl} | {err:.2e} | {tol:.1e} "
              f"| {'yes' if good else 'NO'} |")
    if dev.type == "cpu":
        print("(CPU timings with the torch backend; the GPU kernels are timed by kvfuse-bench.)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
