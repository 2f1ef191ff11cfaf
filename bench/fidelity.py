"""How far is a continuation from a composed cache from the masked re-prefill of the same text?

Uses a small *trained* checkpoint (llama2.c TinyStories 260K, ../shared/models/stories260K.bin), where
random weights could not tell: a prefix and T threads are sampled from the model, each thread is
prefilled separately (seeing the prefix and itself), the caches are merged, and a continuation of C
tokens is scored teacher-forced against the reference -- ONE forward pass over the composed text with
the segment mask and the composed positions. Variants:

* shared: kvfuse.compose, layout="shared" (threads keep their positions)  -> exact by construction
* sequential: kvfuse.compose, layout="sequential" (threads moved after each other by re-rotation)
* naive: concatenated caches without re-rotation, continuation at sequential positions (the bug
  kvfuse's re-rotation fixes)

    python bench/fidelity.py [--checkpoint PATH] [--prefix 64 --threads 3 --thread-len 48 --cont 16 --trials 5]
"""

from __future__ import annotations

import argparse
import os

import torch

import kvfuse
from kvfuse import Segment, SegmentGraph, SourceSegment
from kvfuse.checkpoints import load_llama2c

DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "models", "stories260K.bin")


def _layers(cache):
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cache(kv, cfg):
    import transformers

    c = transformers.DynamicCache(config=cfg)
    for i, (k, v) in enumerate(kv):
        c.update(k, v, i)
    return c


def _sample(model, ids, n, gen):
    with torch.no_grad():
        for _ in range(n):
            logits = model(ids[None]).logits[0, -1]
            ids = torch.cat([ids, torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)])
    return ids


def trial(model, rope, P, lens, C, gen):
    cfg = model.config
    prefix = _sample(model, torch.tensor([1]), P - 1, gen)
    threads = [_sample(model, prefix, n, gen)[P:] for n in lens]
    with torch.no_grad():
        out = model(prefix[None], use_cache=True)
        pkv = [(k.clone(), v.clone()) for k, v in _layers(out.past_key_values)]
        tkv = []
        for t in threads:
            o = model(t[None], position_ids=torch.arange(P, P + t.numel())[None],
                      past_key_values=_cache([(k.clone(), v.clone()) for k, v in pkv], cfg))
            tkv.append([(k[:, :, P:], v[:, :, P:]) for k, v in _layers(o.past_key_values)])
    L, hkv, d = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    graph = SegmentGraph([Segment("prefix", P)] + [Segment(f"t{i}", n, ("prefix",)) for i, n in enumerate(lens)]
                         + [Segment("cont", C, ("prefix",) + tuple(f"t{i}" for i in range(len(lens))))])
    mask = graph.dense_mask()
    add = torch.zeros(mask.shape).masked_fill_(~mask, torch.finfo(torch.float32).min)[None, None]
    text = torch.cat([prefix, *threads])
    results = {}
    for variant in ("shared", "sequential", "naive"):
        pool = kvfuse.PagePool(4 * (graph.num_tokens // 4 + 8), 4, hkv, d, num_layers=L)
        seqs = []
        for kv, n in [(pkv, P)] + list(zip(tkv, lens)):
            pages = pool.alloc(pool.pages_for(n))
            kvfuse.write_kv_(pool.k_cache, pages, 0, torch.stack([k[0].transpose(0, 1) for k, _ in kv]))
            kvfuse.write_kv_(pool.v_cache, pages, 0, torch.stack([v[0].transpose(0, 1) for _, v in kv]))
            seqs.append(pages)
        segs = [SourceSegment(seqs[0], P)] + [SourceSegment(s, n, position=P, give_up=True)
                                              for s, n in zip(seqs[1:], lens)]
        layout = "shared" if variant == "shared" else "sequential"
        if variant == "naive":  # concatenate without moving any key
            comp = kvfuse.compose(pool.k_cache, pool.v_cache, segs, rope, positions=[0] + [P] * len(lens),
                                  dst_pages=pool)
            comp.positions = torch.arange(comp.length)
        else:
            comp = kvfuse.compose(pool.k_cache, pool.v_cache, segs, rope, layout=layout, dst_pages=pool)
        n = comp.length
        c0 = int(comp.positions.max()) + 1
        positions = torch.cat([comp.positions, torch.arange(c0, c0 + C)])
        with torch.no_grad():
            # the continuation tokens: greedy from the reference of this layout's positions
            ref_pos = positions
            cont = []
            ids = text
            for _ in range(C):
                m = SegmentGraph(graph.segments[:-1] + [Segment("cont", len(cont) + 1, graph.segments[-1].parents)])
                dm = m.dense_mask()
                a = torch.zeros(dm.shape).masked_fill_(~dm, torch.finfo(torch.float32).min)[None, None]
                lg = model(torch.cat([ids, torch.tensor(cont + [0])])[None],
                           position_ids=ref_pos[: n + len(cont) + 1][None], attention_mask=a).logits[0, -1]
                cont.append(int(lg.argmax()))
            cont = torch.tensor(cont)
            ref = model(torch.cat([text, cont])[None], position_ids=ref_pos[None], attention_mask=add).logits[0, n:]
            kk = kvfuse.gather_kv(pool.k_cache, comp.pages, n)
            vv = kvfuse.gather_kv(pool.v_cache, comp.pages, n)
            cache = _cache([(kk[i].transpose(0, 1)[None], vv[i].transpose(0, 1)[None]) for i in range(L)], cfg)
            got = model(cont[None], position_ids=positions[n:][None], past_key_values=cache).logits[0]
        lp_ref, lp_got = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
        kl = (lp_ref.exp() * (lp_ref - lp_got)).sum(-1).mean().item()
        top1 = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
        results[variant] = (kl, top1, (ref - got).abs().max().item())
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description="continuation fidelity of composed caches on a trained checkpoint")
    ap.add_argument("--checkpoint", default=DEFAULT)
    ap.add_argument("--prefix", type=int, default=64)
    ap.add_argument("--threads", type=int, default=3)
    ap.add_argument("--thread-len", type=int, default=48)
    ap.add_argument("--cont", type=int, default=16)
    ap.add_argument("--trials", type=int, default=5)
    args = ap.parse_args(argv)
    model = load_llama2c(args.checkpoint)
    rope = kvfuse.RopeConfig.from_hf(model.config)
    gen = torch.Generator().manual_seed(0)
    lens = [args.thread_len - 5 * i for i in range(args.threads)]
    acc = {}
    for _ in range(args.trials):
        for k, v in trial(model, rope, args.prefix, lens, args.cont, gen).items():
            acc.setdefault(k, []).append(v)
    print(f"stories260K, prefix {args.prefix}, threads {lens}, continuation {args.cont}, {args.trials} trials")
    print("| variant | mean KL(ref || composed) (nats) | top-1 agreement | max abs logit diff |")
    print("| --- | --- | --- | --- |")
    for k, rows in acc.items():
        kl = sum(r[0] for r in rows) / len(rows)
        t1 = sum(r[1] for r in rows) / len(rows)
        mx = max(r[2] for r in rows)
        print(f"| {k} | {kl:.2e} | {t1:.3f} | {mx:.2e} |")


if __name__ == "__main__":
    main()
