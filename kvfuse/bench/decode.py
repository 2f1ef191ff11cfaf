"""Scenario 4: decode after a merge.

A batch of sequences of ``--context`` tokens in a paged pool (page ids shuffled), one query token each.
Two cases: no mask, and a cross-thread mask (each sequence is a prefix of half the context and T
threads; the decoding token, the last of the last thread, sees the prefix and its own thread only).
TB/s = bytes of the K and V a query must read (the visible tokens) / time.

SDPA and FlexAttention run on contiguous K/V gathered once, outside the timing (SDPA folds the GQA
group into the query length, so K/V are read once). FlashInfer runs on the paged pool; with the
mask it is given only the visible pages (exact when segment boundaries fall on page boundaries).
"""

from __future__ import annotations

import torch

import kvfuse
from kvfuse import reference
from kvfuse.bench.common import Case, Ctx, Provider, Reference, Skip, fmt_bytes, generator, need_module, opt, randn
from kvfuse.bench.prefill import block_mask, compiled_flex, kvfuse_attention
from kvfuse.bench.runner import provider_selection, run_case
from kvfuse.bench.timing import Progress
from kvfuse.segments import Segment, SegmentGraph

NAME = "decode"
X_NAME = "context"
DEFAULT_PROVIDERS = ("torch", "triton", "cuda", "sdpa", "flex", "flashinfer", "flash-attn")
BASELINE = ("flashinfer", "sdpa")


def thread_graph(context: int, threads: int, prefix: int | None) -> SegmentGraph:
    p = context // 2 if prefix is None else prefix
    rest = context - p
    if threads < 1 or rest < threads:
        raise ValueError(f"context {context} with prefix {p} cannot hold {threads} non-empty threads")
    lens = [rest // threads] * (threads - 1)
    lens.append(rest - sum(lens))
    return SegmentGraph.fork_join(p, lens)


def make_state(ctx: Ctx, B: int, C: int, page: int, hq: int, hkv: int, d: int, graph: SegmentGraph,
               seed: int = 0) -> dict:
    gen = generator(ctx, seed)
    pps = -(-C // page)
    k, v = randn((B * pps, page, hkv, d), ctx, gen), randn((B * pps, page, hkv, d), ctx, gen)
    perm = torch.randperm(B * pps, generator=torch.Generator().manual_seed(seed))
    bt = perm.view(B, pps).to(device=ctx.device, dtype=torch.int32)
    plan = kvfuse.plan(kvfuse.AttentionSpec([graph] * B, q_lens=[1] * B, device=ctx.device))
    visible = graph.dense_mask(q_tokens=torch.tensor([C - 1]))[0]  # [C] bool
    return dict(q=randn((B, hq, d), ctx, gen), k=k, v=v, block_table=bt, plan=plan, graph=graph, C=C,
                visible=visible.to(ctx.device), n_visible=int(visible.sum()))


def _contiguous(st):
    """K, V as ``[B, Hkv, C, D]`` (gathered once per case, outside the timing)."""
    if "_kv" not in st:
        C = st["C"]
        out = []
        for name in ("k", "v"):
            c = st[name][st["block_table"].long()]  # [B, pps, page, H, D]
            out.append(c.flatten(1, 2)[:, :C].transpose(1, 2).contiguous())
        st["_kv"] = tuple(out)
    return st["_kv"]


def providers(ctx: Ctx, masked: bool) -> list[Provider]:
    def make_torch(st):
        return kvfuse_attention(ctx, "torch")(st)

    def make_sdpa(st):
        k, v = _contiguous(st)
        B, hq, d = st["q"].shape
        hkv = k.shape[1]
        q = st["q"].view(B, hkv, hq // hkv, d)  # query heads of one KV head share its K/V: the group is the q length
        mask = st["visible"][None, None, None, :] if masked else None
        return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).view(B, hq, d)

    def make_flex(st):
        fn = compiled_flex(ctx)
        k, v = _contiguous(st)
        q = st["q"][:, :, None]
        bm = None
        if masked:
            vis = st["visible"]
            bm = block_mask(ctx, lambda b, h, qi, ki: vis[ki], None, 1, st["C"])
        return lambda: fn(q, k, v, block_mask=bm, enable_gqa=True)

    def make_flashinfer(st):
        fi = need_module("flashinfer")
        if ctx.cpu:
            raise Skip("FlashInfer needs a CUDA GPU")
        page, (B, hq, d), hkv = st["k"].shape[1], st["q"].shape, st["k"].shape[-2]
        g = st["graph"]
        if masked:
            bounds = g.starts.tolist() + [g.num_tokens]
            if any(b % page for b in bounds[:-1]):
                raise Skip("the masked FlashInfer baseline gives it only the visible pages: needs segment "
                           "boundaries on page boundaries")
            vis = st["visible"].cpu().view(-1)
            cols = [i for i in range(-(-st["C"] // page)) if bool(vis[i * page])]
            n_last = int(vis.sum()) - (len(cols) - 1) * page
        else:
            cols = list(range(-(-st["C"] // page)))
            n_last = st["C"] - (len(cols) - 1) * page
        indices = st["block_table"][:, cols].reshape(-1).contiguous()
        indptr = torch.arange(B + 1, dtype=torch.int32, device=ctx.device) * len(cols)
        last = torch.full((B,), n_last, dtype=torch.int32, device=ctx.device)
        ws = torch.empty(128 << 20, dtype=torch.uint8, device=ctx.device)
        w = fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
        w.plan(indptr, indices, last, hq, hkv, d, page, pos_encoding_mode="NONE", q_data_type=st["q"].dtype,
               kv_data_type=st["k"].dtype)
        q, kv = st["q"], (st["k"], st["v"])
        return lambda: w.run(q, kv)

    def make_flash_attn(st):
        fa = need_module("flash_attn")
        if ctx.cpu:
            raise Skip("flash-attn needs a CUDA GPU")
        if masked:
            raise Skip("flash-attn has no segment mask for decode")
        page = st["k"].shape[1]
        if page % 256:
            raise Skip(f"flash-attn's paged KV needs a page size that is a multiple of 256, got {page}")
        B = st["q"].shape[0]
        seqlens = torch.full((B,), st["C"], dtype=torch.int32, device=ctx.device)
        q = st["q"][:, None]
        return lambda: fa.flash_attn_with_kvcache(q, st["k"], st["v"], cache_seqlens=seqlens,
                                                  block_table=st["block_table"])[:, 0]

    flat = lambda st, out: out
    api = " (public API)" if ctx.args.api else ""
    return [
        Provider("torch", "torch (kvfuse reference)" + api, make_torch),
        Provider("triton", "kvfuse triton" + api, kvfuse_attention(ctx, "triton")),
        Provider("cuda", "kvfuse cuda" + api, kvfuse_attention(ctx, "cuda")),
        Provider("sdpa", "sdpa" + (" (bool mask)" if masked else ""), make_sdpa, output=flat,
                 note="contiguous K/V"),
        Provider("flex", "flex (compiled)" if not ctx.cpu else "flex (eager on CPU)", make_flex,
                 output=lambda st, out: out[:, :, 0], note="contiguous K/V"),
        Provider("flashinfer", "flashinfer paged decode", make_flashinfer,
                 note="given the visible pages" if masked else ""),
        Provider("flash-attn", "flash-attn paged (kvcache)", make_flash_attn),
    ]


def run(ctx: Ctx) -> None:
    hq, hkv, d = opt(ctx, "q_heads", 32, 8), opt(ctx, "kv_heads", 8, 2), opt(ctx, "head_dim", 128, 64)
    page, B = opt(ctx, "page_size", 16), opt(ctx, "batch", 32, 2)
    contexts = list(ctx.args.sweep) if ctx.args.sweep else [opt(ctx, "context", 32768, 512)]
    threads = opt(ctx, "threads", 4)
    n_prov = len(provider_selection(ctx, providers(ctx, False), DEFAULT_PROVIDERS))
    prog = Progress(2 * len(contexts) * n_prov, NAME, not ctx.args.quiet)
    dt = str(ctx.dtype)[6:]
    for C in contexts:
        for masked in (False, True):
            graph = thread_graph(C, threads, ctx.args.prefix) if masked else SegmentGraph([Segment("ctx", C)])
            st = make_state(ctx, B, C, page, hq, hkv, d, graph)
            nbytes = 2 * B * st["n_visible"] * hkv * d * st["k"].element_size()

            def ref_fn(s):
                p = s["plan"]
                return reference.segment_attention(s["q"], s["k"], s["v"], s["block_table"], p.kv_lens, p.qo_indptr,
                                                   p.token_seg, p.ancestors, s["q"].shape[-1] ** -0.5)[0]

            what = f"cross-thread mask (prefix {graph.lengths[0]}, {threads} threads)" if masked else "no mask"
            case = Case(NAME, f"{what} B={B} context={C} page={page} Hq={hq} Hkv={hkv} d={d} {dt}", st,
                        provider_selection(ctx, providers(ctx, masked), DEFAULT_PROVIDERS),
                        references={"default": Reference(ref_fn, inplace=False)}, bytes=nbytes, ceiling="read",
                        baseline=BASELINE, x=C, group=f"{C} {masked}", series=", cross-thread mask" if masked else "",
                        header=f"{st['n_visible']} visible tokens per sequence; K+V read {fmt_bytes(nbytes)}")
            run_case(ctx, case, prog)
            del st, case
