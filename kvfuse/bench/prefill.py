"""Scenario 3: block-sparse cross-thread prefill.

A shared prefix of P tokens and T threads of L tokens each, all prefilled in one call: a thread token
sees the prefix and the causal past of its own thread. Effective TFLOP/s = 4 * head_dim * Hq *
(visible query-key pairs, `AttentionPlan.visible_pairs`) / time. Dense causal rows (SDPA FA2 / cuDNN,
flash-attn) compute more pairs than needed and count every causal pair: an efficiency ceiling, not
the same function, so they are not checked.

``--check`` compares the last query rows (the last thread: it must not see the other threads) at full
size with the torch reference; small cases are checked whole.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch

import kvfuse
from kvfuse import _ops, reference
from kvfuse.attention import tile_args
from kvfuse.bench.common import (
    Case,
    Ctx,
    Provider,
    Reference,
    Skip,
    dense_mask,
    fmt_bytes,
    generator,
    kvfuse_reasons,
    need_module,
    opt,
    randn,
)
from kvfuse.bench.runner import provider_selection, run_case
from kvfuse.bench.timing import Progress, free_bytes
from kvfuse.dispatch import meta
from kvfuse.segments import SegmentGraph

NAME = "prefill"
X_NAME = "thread_len"
DEFAULT_PROVIDERS = ("torch", "triton", "cuda", "flex", "sdpa", "flashinfer", "flash-attn")
BASELINE = ("flashinfer", "flex")
CHECK_ROWS = 256
FULL_CHECK_TOKENS = 2048


def kvfuse_attention(ctx: Ctx, backend: str, out_rows=None) -> Callable:
    """``make`` of a kvfuse backend: the registered op with the plan's tile map built once, outside the
    timing (``--api``: the public `kvfuse.attention`, with its validation)."""

    def make(st):
        q, k, v, bt, plan = st["q"], st["k"], st["v"], st["block_table"], st["plan"]
        kvfuse_reasons("segment_attention", backend, q=q, k_cache=k, plan=plan)
        scale = 1.0 / math.sqrt(q.shape[-1])
        if ctx.args.api:
            return lambda: kvfuse.attention(q, k, v, bt, plan, backend=backend)
        tile_shape = meta("segment_attention", backend).get("tile_shape")
        shape = (tile_shape(q.shape[-1], plan.max_q, q.shape[1] // k.shape[2], itemsize=q.element_size())
                 if tile_shape else None)
        tm = tile_args(plan.tiles(*shape) if shape else None, q.device)
        return lambda: _ops.segment_attention_op(q, k, v, bt, plan.kv_lens, plan.qo_indptr, plan.token_seg,
                                                 plan.ancestors, plan.q_token, plan.token_pos, *tm, scale, 0.0, 0,
                                                 backend)[0]

    return make


def reference_fits(ctx: Ctx, hq: int, q_rows: int, kv: int) -> None:
    need = 4 * hq * q_rows * kv * 4  # float32 scores, probabilities and temporaries
    if need > free_bytes(ctx.device) // 2:
        raise Skip(f"the reference materialises {hq}x{q_rows}x{kv} float32 scores (~{fmt_bytes(need)}); too big")


def _flex():
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception as e:
        raise Skip(f"torch.nn.attention.flex_attention is not available ({e})") from None
    return flex_attention, create_block_mask


_COMPILED = {}


def compiled_flex(ctx: Ctx):
    flex_attention, _ = _flex()
    if ctx.cpu:  # eager on CPU: FlexAttention's unfused path (it warns that it is unfused; we say so in the label)
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex_attention
    if "flex" not in _COMPILED:
        _COMPILED["flex"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["flex"]


def block_mask(ctx: Ctx, mask_mod, b, q_len, kv_len, block=128):
    _, create_block_mask = _flex()
    try:
        return create_block_mask(mask_mod, b, None, q_len, kv_len, device=ctx.device, BLOCK_SIZE=block,
                                 _compile=not ctx.cpu)
    except TypeError:
        return create_block_mask(mask_mod, b, None, q_len, kv_len, device=ctx.device, BLOCK_SIZE=block)


def make_state(ctx: Ctx, P: int, T: int, L: int, hq: int, hkv: int, d: int, page: int, seed: int = 0) -> dict:
    graph = SegmentGraph.fork_join(P, [L] * T)
    n = graph.num_tokens
    plan = kvfuse.plan(kvfuse.AttentionSpec([graph], device=ctx.device))
    pages = -(-n // page)
    gen = generator(ctx, seed)
    k, v = randn((pages, page, hkv, d), ctx, gen), randn((pages, page, hkv, d), ctx, gen)
    q = randn((n, hq, d), ctx, gen)
    qc = n if n <= FULL_CHECK_TOKENS else min(n, CHECK_ROWS)
    return dict(q=q, k=k, v=v, block_table=torch.arange(pages, dtype=torch.int32, device=ctx.device)[None],
                plan=plan, graph=graph, n=n, qc=qc, P=P, T=T, L=L)


def _flat(st, name):
    c = st[name]
    return c.view(-1, *c.shape[-2:])[: st["n"]]


def _rows(st, out):  # [N, Hq, D] -> the checked rows
    return out[-st["qc"]:]


def _bhnd_rows(st, out):  # [1, Hq, N, D] -> the checked rows
    return out[0].transpose(0, 1)[-st["qc"]:]


def providers(ctx: Ctx, causal_flops: float) -> list[Provider]:
    def make_torch(st):
        reference_fits(ctx, st["q"].shape[1], st["n"], st["n"])
        return kvfuse_attention(ctx, "torch")(st)

    def make_flex(st):
        n = st["n"]
        fn = compiled_flex(ctx)
        seg, anc = st["plan"].token_seg[0, :n].long(), st["plan"].ancestors[0].bool()

        def mask_mod(b, h, qi, ki):
            sq, sk = seg[qi], seg[ki]
            return anc[sq, sk] | ((sq == sk) & (ki <= qi))

        bm = block_mask(ctx, mask_mod, 1, n, n)
        q = st["q"].transpose(0, 1)[None]
        k, v = (_flat(st, x).transpose(0, 1)[None] for x in ("k", "v"))
        return lambda: fn(q, k, v, block_mask=bm, enable_gqa=True)

    def sdpa_inputs(st):
        g = st["q"].shape[1] // st["k"].shape[-2]
        q = st["q"].transpose(0, 1)[None]
        k, v = (_flat(st, x).repeat_interleave(g, dim=1).transpose(0, 1)[None] for x in ("k", "v"))
        return q, k, v

    def make_sdpa_causal(backend_name):
        def make(st):
            from torch.nn.attention import SDPBackend, sdpa_kernel

            if ctx.cpu and backend_name:
                raise Skip(f"SDPA's {backend_name} backend needs a CUDA GPU")
            q, k, v = sdpa_inputs(st)
            be = getattr(SDPBackend, backend_name or "MATH")

            def fn():
                if backend_name is None:
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
                with sdpa_kernel(be):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

            return fn

        return make

    def make_sdpa_mask(st):
        n = st["n"]
        need = 3 * n * n * st["q"].element_size()
        if need > free_bytes(ctx.device) // 3:
            raise Skip(f"the dense {n}x{n} mask and its bias need ~{fmt_bytes(need)}; does not fit")
        q, k, v = sdpa_inputs(st)
        mask = dense_mask(st["graph"], ctx.device)[None, None]
        return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def make_flashinfer(st):
        fi = need_module("flashinfer")
        if ctx.cpu:
            raise Skip("FlashInfer needs a CUDA GPU")
        R = 128
        if st["P"] % R or st["L"] % R:
            raise Skip(f"the BSR baseline needs segment boundaries on multiples of {R} (causal + block sparsity)")
        kinds = st["plan"].tiles(R, R).kinds[0] != 0
        indptr = torch.cat([torch.zeros(1, dtype=torch.int64), kinds.sum(1).cumsum(0)]).to(torch.int32)
        indices = kinds.nonzero()[:, 1].to(torch.int32)
        n, (hq, d), hkv = st["n"], st["q"].shape[1:], st["k"].shape[-2]
        ws = torch.empty(128 << 20, dtype=torch.uint8, device=ctx.device)
        w = fi.BlockSparseAttentionWrapper(ws)
        w.plan(indptr.to(ctx.device), indices.to(ctx.device), n, n, R, R, hq, hkv, d, causal=True,
               q_data_type=st["q"].dtype, kv_data_type=st["k"].dtype)
        q, k, v = st["q"], _flat(st, "k"), _flat(st, "v")
        return lambda: w.run(q, k, v)

    def make_flash_attn(st):
        fa = need_module("flash_attn")
        if ctx.cpu:
            raise Skip("flash-attn needs a CUDA GPU")
        q, k, v = st["q"][None], _flat(st, "k")[None], _flat(st, "v")[None]
        return lambda: fa.flash_attn_func(q, k, v, causal=True)

    dense = "dense causal: more pairs than needed, TFLOP/s per causal pair"
    api = " (public API)" if ctx.args.api else ""
    provs = [
        Provider("torch", "torch (kvfuse reference)" + api, make_torch, output=_rows),
        Provider("triton", "kvfuse triton" + api, kvfuse_attention(ctx, "triton"), output=_rows),
        Provider("cuda", "kvfuse cuda" + api, kvfuse_attention(ctx, "cuda"), output=_rows),
        Provider("flex", "flex (compiled, BlockMask 128)" if not ctx.cpu else "flex (eager on CPU)", make_flex,
                 output=_bhnd_rows, note="contiguous K/V"),
        Provider("sdpa", "sdpa (dense bool mask)", make_sdpa_mask, output=_bhnd_rows, note="contiguous K/V"),
    ]
    if ctx.cpu:
        provs.append(Provider("sdpa", "sdpa (dense causal)", make_sdpa_causal(None), ref=None, flops=causal_flops,
                              note=dense))
    else:
        provs += [Provider("sdpa", f"sdpa {lbl} (dense causal)", make_sdpa_causal(be), ref=None, flops=causal_flops,
                           note=dense) for lbl, be in (("FA2", "FLASH_ATTENTION"), ("cuDNN", "CUDNN_ATTENTION"))]
    provs += [
        Provider("flashinfer", "flashinfer BSR 128x128 (causal)", make_flashinfer, output=_rows),
        Provider("flash-attn", "flash-attn (dense causal)", make_flash_attn, ref=None, flops=causal_flops,
                 note=dense),
    ]
    return provs


def default_cases(ctx: Ctx) -> list[tuple[int, int, int]]:
    a = ctx.args
    if a.sweep:
        return [(a.prefix or L, a.threads or 4, L) for L in a.sweep]
    if a.prefix or a.threads or a.thread_len:
        base = (64, 2, 32) if ctx.cpu else (4096, 4, 4096)
        return [(a.prefix or base[0], a.threads or base[1], a.thread_len or base[2])]
    return [(64, 2, 32)] if ctx.cpu else [(4096, 4, 4096), (8192, 8, 8192)]


def run(ctx: Ctx) -> None:
    hq, hkv, d = opt(ctx, "q_heads", 32, 8), opt(ctx, "kv_heads", 8, 2), opt(ctx, "head_dim", 128, 64)
    page = opt(ctx, "page_size", 16)
    cases = default_cases(ctx)
    n_prov = len(provider_selection(ctx, providers(ctx, 0), DEFAULT_PROVIDERS))
    prog = Progress(len(cases) * n_prov, NAME, not ctx.args.quiet)
    for P, T, L in cases:
        st = make_state(ctx, P, T, L, hq, hkv, d, page)
        n = st["n"]
        flops = 4 * d * hq * st["plan"].visible_pairs()
        provs = provider_selection(ctx, providers(ctx, 4 * d * hq * n * (n + 1) / 2), DEFAULT_PROVIDERS)
        qc = st["qc"]
        sub = kvfuse.plan(kvfuse.AttentionSpec([st["graph"]], q_lens=[qc], device=ctx.device))

        def ref_fn(s, sub=sub, qc=qc):
            return reference.segment_attention(s["q"][-qc:], s["k"], s["v"], s["block_table"], sub.kv_lens,
                                               sub.qo_indptr, sub.token_seg, sub.ancestors,
                                               1.0 / math.sqrt(s["q"].shape[-1]))[0]

        what = "all rows" if qc == n else f"the last {qc} query rows"
        ref = Reference(ref_fn, inplace=False, note=f"checked on {what}")
        case = Case(NAME, f"P={P} T={T} L={L} Hq={hq} Hkv={hkv} d={d} {str(ctx.dtype)[6:]}", st, provs,
                    references={"default": ref}, flops=flops, ceiling="matmul", baseline=BASELINE, x=L,
                    header=f"{n} tokens, {st['plan'].visible_pairs():,} visible pairs "
                           f"({st['plan'].visible_pairs() / (n * (n + 1) / 2):.2f} of causal); "
                           "effective TFLOP/s = 4 d Hq pairs / time")
        run_case(ctx, case, prog)
        del st, case, sub
