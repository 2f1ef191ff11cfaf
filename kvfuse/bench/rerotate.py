"""Scenario 1: RoPE re-rotation of a paged K cache in place (every slot, a random position delta per page).

Bytes = 2 x K (read + write). Providers: the kvfuse backends through the registered op (the cos/sin
tables are built once, outside the timing; ``--api`` times the public `kvfuse.rerotate_` instead),
torch.compile of the torch reference, and FlashInfer's ``apply_rope_pos_ids_inplace`` on the pool
viewed as one ragged ``[slots, H, D]`` tensor (it needs a query tensor too: a 1-head one is given).
"""

from __future__ import annotations

import torch

from kvfuse import _ops, reference
from kvfuse.bench.common import (
    Case,
    Ctx,
    Provider,
    Reference,
    Skip,
    fmt_bytes,
    generator,
    kvfuse_reasons,
    need_module,
    opt,
    randn,
    sweep,
)
from kvfuse.bench.runner import provider_selection, run_case
from kvfuse.bench.timing import Progress
from kvfuse.rope import RopeConfig

NAME = "rerotate"
X_NAME = "pages"
DEFAULT_PROVIDERS = ("torch", "torch-compile", "triton", "cuda", "flashinfer")
BASELINE = ("flashinfer", "torch-compile", "torch")
MAX_DELTA = 8192


def compile_allowed(ctx: Ctx) -> None:
    """torch.compile on CPU only when asked for by name: its compile time dominates a small CPU run."""
    if ctx.cpu and "torch-compile" not in (ctx.args.providers or ()):
        raise Skip("torch.compile is not run on CPU unless --providers names it (compilation dominates)")


def make_state(ctx: Ctx, pages: int, page: int, hkv: int, d: int, rope: RopeConfig, seed: int = 0) -> dict:
    gen = generator(ctx, seed)
    k = randn((pages, page, hkv, d), ctx, gen)
    n = pages * page
    delta_page = torch.randint(1, MAX_DELTA + 1, (pages,), generator=torch.Generator().manual_seed(seed))
    delta = delta_page.repeat_interleave(page)
    old = torch.arange(n, dtype=torch.int64)
    cos, sin, idx = rope.rotation_tables(delta, device=ctx.device)
    return dict(k=k, slots=torch.arange(n, device=ctx.device), idx=idx, cos=cos, sin=sin,
                old=old.to(ctx.device), new=(old + delta).to(ctx.device),
                slot_delta=delta.to(device=ctx.device, dtype=torch.int32))


def providers(ctx: Ctx, rope: RopeConfig) -> list[Provider]:
    rd = rope.rotary_dim
    out = lambda st, _: st["k"]

    def kvfuse_op(backend):
        def make(st):
            kvfuse_reasons("rerotate_", backend, k_cache=st["k"], rotary_dim=rd, interleaved=False)
            if ctx.args.api:
                import kvfuse

                return lambda: kvfuse.rerotate_(st["k"], st["slots"], st["old"], st["new"], rope, backend=backend)
            return lambda: _ops.rerotate_op(st["k"], st["slots"], st["idx"], st["cos"], st["sin"], rd, False,
                                            backend)

        return make

    compiled = []

    def make_compiled(st):
        compile_allowed(ctx)
        if not compiled:
            compiled.append(torch.compile(reference.rerotate_))
        return lambda: compiled[0](st["k"], st["slots"], st["idx"], st["cos"], st["sin"], rd, False)

    def make_flashinfer(st):
        fi = need_module("flashinfer")
        if ctx.cpu:
            raise Skip("FlashInfer needs a CUDA GPU")
        if rope.rope_type != "default":
            raise Skip("FlashInfer's apply_rope_pos_ids computes plain RoPE only")
        k = st["k"].view(-1, *st["k"].shape[-2:])
        q = torch.randn(k.shape[0], 1, k.shape[-1], device=k.device, dtype=k.dtype)
        return lambda: fi.apply_rope_pos_ids_inplace(q, k, st["slot_delta"], rotary_dim=rd, interleave=False,
                                                     rope_theta=rope.theta)

    api = " (public API)" if ctx.args.api else ""
    return [
        Provider("torch", "torch (kvfuse reference, eager)" + api, kvfuse_op("torch"), output=out),
        Provider("torch-compile", "torch.compile(reference)", make_compiled, output=out),
        Provider("triton", "kvfuse triton" + api, kvfuse_op("triton"), output=out),
        Provider("cuda", "kvfuse cuda" + api, kvfuse_op("cuda"), output=out),
        Provider("flashinfer", "flashinfer apply_rope_pos_ids_inplace", make_flashinfer, output=out,
                 note="ragged view of the pool; also rotates a 1-head q (not counted)"),
    ]


def run(ctx: Ctx) -> None:
    page = opt(ctx, "page_size", 16)
    hkv, d = opt(ctx, "kv_heads", 8, 2), opt(ctx, "head_dim", 128, 64)
    rope = RopeConfig(head_dim=d, theta=1e4)
    provs = provider_selection(ctx, providers(ctx, rope), DEFAULT_PROVIDERS)
    sizes = sweep(ctx, opt(ctx, "pages", 16384, 64))
    prog = Progress(len(sizes) * len(provs), NAME, not ctx.args.quiet)
    rd = rope.rotary_dim
    ref = Reference(lambda st: (reference.rerotate_(st["k"], st["slots"], st["idx"], st["cos"], st["sin"], rd, False),
                                st["k"])[1])
    for pages in sizes:
        state = make_state(ctx, pages, page, hkv, d, rope)
        kb = state["k"].numel() * state["k"].element_size()
        case = Case(NAME, f"pages={pages} page={page} kv_heads={hkv} head_dim={d} {str(ctx.dtype)[6:]}", state,
                    provs, references={"default": ref}, bytes=2 * kb, ceiling="copy", baseline=BASELINE,
                    inplace=True, mutable=("k",), x=pages,
                    header=f"K {fmt_bytes(kb)}, every slot moved by a random delta per page in [1, {MAX_DELTA}], "
                           f"NeoX, theta 1e4; bytes = 2 x K")
        run_case(ctx, case, prog)
        del state, case
