"""Scenario 5, end to end: merging T threads' KV caches versus re-prefilling the composed text.

A Llama-3-8B-shaped Hugging Face ``transformers`` model with random weights (SDPA attention) prefills
a shared prefix and T threads separately (each thread sees the prefix and itself); their caches go
into one layer-stacked kvfuse pool. Then, in the same run:

* ``sdpa``: the model re-prefills the composed token sequence with the segment mask (a 4D additive
  mask) and the composed positions: what merging by text costs.
* kvfuse ``compose`` (public API, all layers at once), per backend, in the shared layout (threads
  keep their positions: page tables only) and in the sequential layout (threads given up, moved after
  one another by re-rotating their keys in place; TB/s counts 2 x K of the moved tokens).

``--check``: the shared-layout cache must equal the masked re-prefill's on a few layers (normwise,
to bf16 tolerance: the two computations round differently); the sequential layout is compared with
the reference composition (`kvfuse.reference.compose_dense`) on the same layers.
"""

from __future__ import annotations

import torch

import kvfuse
from kvfuse import reference
from kvfuse.bench.common import (
    Case,
    Ctx,
    Provider,
    Reference,
    Skip,
    dense_mask,
    fmt_bytes,
    hf_or_skip,
    model_shape,
    opt,
    thread_counts,
)
from kvfuse.bench.runner import provider_selection, run_case
from kvfuse.bench.timing import Progress
from kvfuse.paged import gather_kv
from kvfuse.segments import SegmentGraph

NAME = "e2e"
X_NAME = "context"
DEFAULT_PROVIDERS = ("sdpa", "torch", "triton", "cuda")
NORM_TOL = {torch.bfloat16: 5e-2, torch.float16: 2e-2, torch.float32: 1e-4}


def build_model(ctx: Ctx, layers: int, hq: int, hkv: int, d: int, attn_implementation: str = "sdpa",
                keep: bool = False):
    """A Llama-3-8B-shaped random-weight model (tiny vocab and MLP on CPU), created in ``ctx.dtype`` with
    ``dtype=`` (``model.to(bf16)`` would round the float32 RoPE frequency buffer to bf16). ``keep``: hold
    it in ``ctx.models`` so that a later scenario of the run with the same shape reuses it (switching
    ``attn_implementation``; the weights are the same seed anyway) instead of building another."""
    import transformers

    key = (layers, hq, hkv, d, ctx.dtype, str(ctx.device))
    if key in ctx.models:  # built by an earlier scenario of this run (e2e, then threads in `all`)
        model, cfg = ctx.models[key]
        model.set_attn_implementation(attn_implementation)
        return model, cfg
    cpu = ctx.cpu
    cfg = transformers.LlamaConfig(
        vocab_size=1000 if cpu else 128256, hidden_size=hq * d, intermediate_size=2 * hq * d if cpu else 14336,
        num_hidden_layers=layers, num_attention_heads=hq, num_key_value_heads=hkv, head_dim=d,
        max_position_embeddings=1 << 17, rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device(ctx.device):
        try:
            model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation,
                                                                  dtype=ctx.dtype)
        except TypeError:
            model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation,
                                                                  torch_dtype=ctx.dtype)
    model = model.to(ctx.device).eval()
    if keep:
        ctx.models[key] = (model, cfg)
    return model, cfg


def _layers(cache):
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def make_state(ctx: Ctx, model, cfg, P: int, T: int, L: int, page: int, seed: int = 0) -> dict:
    import transformers

    from kvfuse.integrations import hf

    dev, base = ctx.device, model.model
    gen = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).to(dev) for n in [P] + [L] * T]
    n_layers, hkv, d = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    src_pages = -(-P // page) + T * -(-L // page)
    pool = kvfuse.PagePool(src_pages + -(-(P + T * L) // page) + 1, page, hkv, d, num_layers=n_layers,
                           dtype=ctx.dtype, device=dev)
    pool.k_cache.normal_()  # never zeros in unused slots
    pool.v_cache.normal_()

    def put(kv, n):
        pages = pool.alloc(pool.pages_for(n))
        kvfuse.write_kv_(pool.k_cache, pages, 0, torch.stack([k[0].transpose(0, 1) for k, _ in kv]))
        kvfuse.write_kv_(pool.v_cache, pages, 0, torch.stack([v[0].transpose(0, 1) for _, v in kv]))
        return pages

    with torch.no_grad():
        out = base(ids[0][None], position_ids=torch.arange(P, device=dev)[None], use_cache=True)
        prefix_kv = _layers(hf.output_cache(out))
        del out
        seqs = [put(prefix_kv, P)]
        for t in range(T):
            cache = transformers.DynamicCache(config=cfg)
            for i, (k, v) in enumerate(prefix_kv):
                cache.update(k.clone(), v.clone(), i)
            o = base(ids[1 + t][None], position_ids=torch.arange(P, P + L, device=dev)[None], use_cache=True,
                     **hf.cache_kwargs(base, cache))
            seqs.append(put([(k[:, :, P:], v[:, :, P:]) for k, v in _layers(hf.output_cache(o))], L))
            del o, cache
        del prefix_kv
    graph = SegmentGraph.fork_join(P, [L] * T)
    mask = dense_mask(graph, dev)
    add = torch.zeros(mask.shape, dtype=ctx.dtype, device=dev).masked_fill_(~mask, torch.finfo(ctx.dtype).min)
    del mask
    positions = torch.cat([torch.arange(P)] + [torch.arange(P, P + L)] * T).to(dev)
    checked = sorted({0, n_layers // 2, n_layers - 1})
    dst = pool.alloc(pool.num_free)  # spare pages: used only where a segment cannot keep its pages
    # the page lists on the host, as a serving engine keeps them: compose then reads nothing back
    return dict(k=pool.k_cache, v=pool.v_cache, seqs=seqs, host_seqs=[p.cpu() for p in seqs], dst=dst.cpu(),
                P=P, T=T, L=L, n=P + T * L,
                ids=torch.cat(ids)[None], positions=positions[None], mask=add[None, None],
                model=model, checked=checked)


def _segments(st, give_up):
    segs = [kvfuse.SourceSegment(st["host_seqs"][0], st["P"], position=0)]
    return segs + [kvfuse.SourceSegment(p, st["L"], position=st["P"], give_up=give_up)
                   for p in st["host_seqs"][1:]]


def _composed(st, composed):
    idx = st["checked"]
    return (gather_kv(st["k"][idx], composed.pages, composed.length),
            gather_kv(st["v"][idx], composed.pages, composed.length))


def _reprefill_kv(st):
    from kvfuse.integrations import hf

    with torch.no_grad():
        out = st["model"].model(st["ids"], position_ids=st["positions"], attention_mask=st["mask"], use_cache=True)
    kv = _layers(hf.output_cache(out))
    return (torch.stack([kv[i][0][0].transpose(0, 1) for i in st["checked"]]),
            torch.stack([kv[i][1][0].transpose(0, 1) for i in st["checked"]]))


def _sequential_ref(st, rope):
    idx = st["checked"]
    P, L = st["P"], st["L"]
    segs = [(st["seqs"][0], 0, P, 0)] + [(p, 0, L, P) for p in st["seqs"][1:]]
    new = [0] + [P + i * L for i in range(st["T"])]
    return reference.compose_dense(st["k"][idx], st["v"][idx], segs, new, rope)


def providers(ctx: Ctx, rope, moved_bytes: float) -> list[Provider]:
    def make_reprefill(st):
        base = st["model"].model

        def fn():
            with torch.no_grad():
                return base(st["ids"], position_ids=st["positions"], attention_mask=st["mask"], use_cache=True)

        return fn

    def merge(backend, layout):
        def make(st):
            from kvfuse.dispatch import reasons_for

            why = reasons_for("rerotate_", backend, k_cache=st["k"], rotary_dim=rope.rotary_dim, interleaved=False)
            if why:
                raise Skip("; ".join(why))
            def fn():  # with the composed page table on the device (built on first read), as attention needs it
                out = kvfuse.compose(st["k"], st["v"], _segments(st, True), rope, layout=layout,
                                     dst_pages=st["dst"], backend=backend)
                _ = out.pages
                return out

            return fn

        return make

    provs = [Provider("sdpa", "re-prefill (transformers sdpa, segment mask)", make_reprefill, ref=None,
                      note="the text-merge baseline; the reference of the shared-layout check")]
    for b in ("torch", "triton", "cuda"):
        provs.append(Provider(b, f"kvfuse {b} compose, shared layout", merge(b, "shared"), output=_composed,
                              ref="shared", bytes=0, note="page tables only"))
        provs.append(Provider(b, f"kvfuse {b} compose, sequential layout", merge(b, "sequential"), output=_composed,
                              ref="sequential", bytes=moved_bytes, note="threads given up, keys re-rotated in place"))
    return provs


def default_cases(ctx: Ctx) -> list[tuple[int, int, int]]:
    a = ctx.args
    counts = thread_counts(ctx, (2,) if ctx.cpu else (4,))
    if a.prefix is not None and a.thread_len:
        return [(a.prefix, T, a.thread_len) for T in counts]
    contexts = a.sweep or ([a.context] if a.context else ([128] if ctx.cpu else [8192, 32768]))
    out = []
    for c in contexts:
        P = a.prefix if a.prefix is not None else c // 2
        out += [(P, T, a.thread_len or max(1, (c - P) // T)) for T in counts]
    return out


def run(ctx: Ctx) -> None:
    if hf_or_skip(ctx, NAME, "sdpa", "re-prefill") is None:
        return
    layers, hq, hkv, d = model_shape(ctx)
    page = opt(ctx, "page_size", 16)
    cases = default_cases(ctx)
    n_prov = len(provider_selection(ctx, providers(ctx, None, 0), DEFAULT_PROVIDERS))
    prog = Progress(len(cases) * n_prov, NAME, not ctx.args.quiet)
    keep = ctx.args.command == "all"  # the threads scenario comes next and builds the same model
    model, cfg = build_model(ctx, layers, hq, hkv, d, keep=keep)
    rope = kvfuse.RopeConfig.from_hf(cfg)
    try:
        for P, T, L in cases:
            st = make_state(ctx, model, cfg, P, T, L, page)
            moved = 2 * layers * (T - 1) * L * hkv * d * st["k"].element_size()  # read + write K of moved threads
            refs = {"shared": Reference(_reprefill_kv, inplace=False, normwise=NORM_TOL.get(ctx.dtype, 5e-2),
                                        note=f"vs the masked re-prefill on layers {st['checked']}"),
                    "sequential": Reference(lambda s: _sequential_ref(s, rope), inplace=False,
                                            note=f"vs the reference composition on layers {st['checked']}")}
            n = st["n"]
            case = Case(NAME, f"{n} tokens: prefix {P} + {T} threads x {L}, {layers} layers, {str(ctx.dtype)[6:]}",
                        st, provider_selection(ctx, providers(ctx, rope, moved), DEFAULT_PROVIDERS),
                        references=refs, ceiling="copy", baseline="sdpa", inplace=True, mutable=("k", "v"), x=n,
                        series=f", T={T}",
                        header=f"Llama-3-8B-shaped random weights ({layers} layers, hidden {hq * d}, {hq}/{hkv} "
                               f"heads, d {d}); sequential layout moves {fmt_bytes(moved / 2)} of K")
            run_case(ctx, case, prog)
            del st, case
    finally:
        del model
