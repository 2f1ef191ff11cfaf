"""Scenario 2: compose T threads' paged KV into one sequence.

General path: the threads (tail pages partly filled) are gathered, K rotated to the sequential
layout's positions and V copied, densely into fresh destination pages. Bytes = 2 x (K + V) moved.
Providers: the kvfuse backends through the registered op (slots and cos/sin tables built once,
outside the timing; ``--api`` times the public `kvfuse.compose`), and torch.compile of the reference.

Zero-copy path: the same threads given up, page-aligned, in the shared layout: `kvfuse.compose`
(public API, timed whole) only concatenates page tables. No bytes move; the time is metadata. Each
backend twice: the threads' pages as tensors on the device (O(pages) host work), and as ``range``
runs (O(segments); the checked output reads the page table, built then).
"""

from __future__ import annotations

import torch

import kvfuse
from kvfuse import _ops, reference
from kvfuse.bench.common import Case, Ctx, Provider, Reference, fmt_bytes, generator, kvfuse_reasons, opt, randn, sweep
from kvfuse.bench.rerotate import compile_allowed
from kvfuse.bench.runner import provider_selection, run_case
from kvfuse.bench.timing import Progress
from kvfuse.paged import gather_kv, slots_of
from kvfuse.rope import RopeConfig

NAME = "compose"
X_NAME = "pages"
DEFAULT_PROVIDERS = ("torch", "torch-compile", "triton", "cuda")
BASELINE = ("torch-compile", "torch")


def thread_lengths(src_pages: int, threads: int, page: int, full: bool) -> list[int]:
    """Token counts of the threads that share ``src_pages``; tails partly filled unless ``full``
    (then only the last thread's tail is partial, so that the zero-copy path applies)."""
    per = max(1, src_pages // threads)
    out = []
    for t in range(threads):
        missing = 0 if page == 1 else min(page - 1, page // 2 + t)
        if full and t < threads - 1:
            missing = 0
        out.append(max(1, per * page - missing))
    return out


def make_state(ctx: Ctx, pages: int, page: int, hkv: int, d: int, threads: int, position: int, rope: RopeConfig,
               *, full: bool, seed: int = 0) -> dict:
    gen = generator(ctx, seed)
    k, v = randn((pages, page, hkv, d), ctx, gen), randn((pages, page, hkv, d), ctx, gen)
    per = max(1, (pages // 2) // threads)
    lens = thread_lengths(pages // 2, threads, page, full)
    src = [torch.arange(t * per, (t + 1) * per, device=ctx.device) for t in range(threads)]
    total = sum(lens)
    n_dst = -(-total // page)
    if threads * per + n_dst > pages:
        raise ValueError(f"--pages {pages} is too small for {threads} threads")
    dst = torch.arange(threads * per, threads * per + n_dst, device=ctx.device, dtype=torch.int32)
    starts = [position + sum(lens[:t]) for t in range(threads)]  # sequential layout
    src_slots = torch.cat([slots_of(p, 0, n, page) for p, n in zip(src, lens)])
    dst_slots, off = [], 0
    for n in lens:
        dst_slots.append(slots_of(dst, off, n, page))
        off += n
    deltas = torch.cat([torch.full((n, ), s - position, dtype=torch.int64) for n, s in zip(lens, starts)])
    cos, sin, idx = rope.rotation_tables(deltas, device=ctx.device)
    return dict(k=k, v=v, src=src, lens=lens, position=position, dst=dst, total=total, src_slots=src_slots,
                dst_slots=torch.cat(dst_slots), idx=idx, cos=cos, sin=sin, new_positions=starts)


def _segments(st, give_up=False, runs=False):
    """The threads as `SourceSegment`s: page tensors on the device, or with ``runs`` page ranges."""
    pages = [range(int(p[0]), int(p[-1]) + 1) for p in st["src"]] if runs else st["src"]
    return [kvfuse.SourceSegment(p, n, position=st["position"], give_up=give_up) for p, n in zip(pages, st["lens"])]


def _composed(st, ret):
    pages = ret.pages if isinstance(ret, kvfuse.Composed) else st["dst"]
    return gather_kv(st["k"], pages, st["total"]), gather_kv(st["v"], pages, st["total"])


def _dense(st, new_positions, rope):
    segs = [(p, 0, n, st["position"]) for p, n in zip(st["src"], st["lens"])]
    return reference.compose_dense(st["k"], st["v"], segs, new_positions, rope)


def general_providers(ctx: Ctx, rope: RopeConfig) -> list[Provider]:
    rd = rope.rotary_dim

    def kvfuse_op(backend):
        def make(st):
            kvfuse_reasons("compose_copy_", backend, k_cache=st["k"], rotary_dim=rd, interleaved=False)
            if ctx.args.api:
                return lambda: kvfuse.compose(st["k"], st["v"], _segments(st), rope, dst_pages=st["dst"],
                                              backend=backend)
            return lambda: _ops.compose_copy_op(st["k"], st["v"], st["src_slots"], st["dst_slots"], st["idx"],
                                                st["cos"], st["sin"], rd, False, backend)

        return make

    compiled = []

    def make_compiled(st):
        compile_allowed(ctx)
        if not compiled:
            compiled.append(torch.compile(reference.compose_copy_))
        return lambda: compiled[0](st["k"], st["v"], st["src_slots"], st["dst_slots"], st["idx"], st["cos"],
                                   st["sin"], rd, False)

    api = " (public API)" if ctx.args.api else ""
    return [
        Provider("torch", "torch (kvfuse reference, eager)" + api, kvfuse_op("torch"), output=_composed),
        Provider("torch-compile", "torch.compile(reference)", make_compiled, output=_composed),
        Provider("triton", "kvfuse triton" + api, kvfuse_op("triton"), output=_composed),
        Provider("cuda", "kvfuse cuda" + api, kvfuse_op("cuda"), output=_composed),
    ]


def zero_copy_providers(rope: RopeConfig) -> list[Provider]:
    def api(backend, runs=False):
        def make(st):
            kvfuse_reasons("compose_copy_", backend, k_cache=st["k"], rotary_dim=rope.rotary_dim, interleaved=False)
            segs = _segments(st, give_up=True, runs=True) if runs else None
            return lambda: kvfuse.compose(st["k"], st["v"], segs or _segments(st, give_up=True), rope,
                                          layout="shared", backend=backend)

        return make

    tensors = [Provider(b, f"kvfuse {b} (public API)", api(b), output=_composed, note="page tables only")
               for b in ("torch", "triton", "cuda")]
    runs = [Provider(b, f"kvfuse {b} (public API, page runs)", api(b, runs=True), output=_composed,
                     note="pages as range() runs: O(segments), the page table built only when read")
            for b in ("torch", "triton", "cuda")]
    return tensors + runs


def run(ctx: Ctx) -> None:
    page = opt(ctx, "page_size", 16)
    hkv, d = opt(ctx, "kv_heads", 8, 2), opt(ctx, "head_dim", 128, 64)
    threads, position = opt(ctx, "threads", 4), opt(ctx, "prefix", 0)
    rope = RopeConfig(head_dim=d, theta=1e4)
    general = provider_selection(ctx, general_providers(ctx, rope), DEFAULT_PROVIDERS)
    zero = provider_selection(ctx, zero_copy_providers(rope), ("torch", "triton", "cuda"))
    zero = [p for p in zero if p.name != "_wrong"]
    sizes = sweep(ctx, opt(ctx, "pages", 16384, 64))
    prog = Progress(len(sizes) * (len(general) + len(zero)), NAME, not ctx.args.quiet)
    dt = str(ctx.dtype)[6:]
    for pages in sizes:
        st = make_state(ctx, pages, page, hkv, d, threads, position, rope, full=False)
        moved = 2 * st["total"] * hkv * d * st["k"].element_size()  # K + V
        ref = Reference(lambda s: _dense(s, s["new_positions"], rope), inplace=False)
        run_case(ctx, Case(
            NAME, f"general pages={pages} page={page} threads={threads} kv_heads={hkv} head_dim={d} {dt}", st,
            general, references={"default": ref}, bytes=2 * moved, ceiling="copy", baseline=BASELINE, inplace=True,
            mutable=("k", "v"), x=pages,
            header=f"{threads} threads, {st['total']} tokens (tail pages partly filled), sequential layout, "
                   f"K+V moved {fmt_bytes(moved)}; bytes = 2 x (K + V)"), prog)
        del st
        st = make_state(ctx, pages, page, hkv, d, threads, position, rope, full=True)
        ref = Reference(lambda s: _dense(s, [s["position"]] * len(s["lens"]), rope), inplace=False)
        run_case(ctx, Case(
            NAME, f"zero-copy pages={pages} page={page} threads={threads} kv_heads={hkv} head_dim={d} {dt}", st,
            zero, references={"default": ref}, baseline="torch", x=pages, group=f"zero-copy {pages}", host_timed=True,
            header=f"{threads} threads given up, page-aligned, shared layout, {st['total']} tokens: "
                   "only page tables change (public API timed whole)"), prog)
        del st
