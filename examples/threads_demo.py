"""Fork a prompt into threads, decode them in parallel (one batch), merge them and continue.

A small random-weight Llama-shaped model runs with ``attn_implementation="kvfuse"`` on a paged KV store.
Every step prints what it cost; the merge is compared with re-encoding the composed tokens (the masked
re-prefill a system without kvfuse would run). CPU by default, the GPU when one is present.

    python examples/threads_demo.py [--threads 4 --prompt 256 --steps 32 --layout shared]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import transformers

import kvfuse
from kvfuse.integrations import hf


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(dev, fn):
    _sync(dev)
    t = time.perf_counter()
    out = fn()
    _sync(dev)
    return out, (time.perf_counter() - t) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--steps", type=int, default=32, help="tokens decoded per thread, then after the merge")
    ap.add_argument("--layout", choices=["shared", "sequential"], default="shared")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args(argv)

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512,
                                   num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2,
                                   max_position_embeddings=1 << 14)
    # dtype= keeps the RoPE frequency buffer in float32 (model.to(bf16) would round it to bf16)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="kvfuse", dtype=dtype)
    model = model.to(dev).eval()
    T, P, N = args.threads, args.prompt, args.steps
    pages = 2 * (P + T * N + N) // args.page_size + 4 * T + 16
    store = kvfuse.PagedKVStore.from_hf(cfg, num_pages=pages, page_size=args.page_size, dtype=dtype, device=dev)
    prompt_ids = torch.randint(0, cfg.vocab_size, (1, P), device=dev)
    rows = []

    prompt = store.sequence("prompt")
    logits, ms = timed(dev, lambda: hf.prefill(model, prompt, prompt_ids))
    rows.append(("prefill prompt", f"{P} tokens", ms))

    threads, ms = timed(dev, lambda: kvfuse.fork(prompt, T))
    rows.append(("fork", f"{T} threads, {store.num_free} pages free, 0 copied", ms))

    tok = torch.randint(0, cfg.vocab_size, (T, 1), device=dev)  # a different first token per thread
    step_ms, fed = [], []
    for _ in range(N):
        logits, ms = timed(dev, lambda tok=tok: hf.decode(model, threads, tok))
        step_ms.append(ms)
        fed.append(tok)
        tok = logits[:, -1].argmax(-1, keepdim=True)
    rows.append(("decode threads (batched)", f"{T} x {N} tokens, {sum(step_ms) / N:.2f} ms/step", sum(step_ms)))

    free = store.num_free
    merged, ms = timed(dev, lambda: kvfuse.merge(threads, args.layout))
    prompt.release()
    rows.append((f"merge ({args.layout})", f"{merged.num_tokens} tokens, {free - store.num_free} pages copied", ms))

    # what the merge replaces: one forward over the composed tokens with the segment mask
    ids = torch.cat([prompt_ids[0], torch.cat(fed, 1).flatten()])[None]
    mask = merged.token_graph().dense_mask()[: ids.shape[1], : ids.shape[1]].to(dev)
    add = torch.zeros(mask.shape, dtype=dtype, device=dev).masked_fill_(~mask, torch.finfo(dtype).min)
    eager_cfg = copy.deepcopy(cfg)  # from_config sets the attention implementation on the config it is given
    eager = transformers.AutoModelForCausalLM.from_config(eager_cfg, attn_implementation="eager", dtype=dtype)
    eager = eager.to(dev).eval()
    eager.load_state_dict(model.state_dict())
    with torch.no_grad():
        _, ms = timed(dev, lambda: eager(ids, position_ids=merged.positions()[None, : ids.shape[1]].to(dev),
                                         attention_mask=add[None, None]))
    rows.append(("  (masked re-prefill instead)", f"{ids.shape[1]} tokens", ms))

    cache = hf.KVFuseCache(store, [merged], config=model.config)
    out, ms = timed(dev, lambda: model.generate(**cache.generate_inputs(tok[:1]), max_new_tokens=N, do_sample=False))
    rows.append(("continue (model.generate)", f"{N} tokens", ms))

    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"device: {name} ({dtype}); model: {args.layers} layers, 8 heads, 2 KV heads, head_dim 32; "
          f"page size {args.page_size}")
    print("| step | what | ms |")
    print("| --- | --- | --- |")
    for step, what, ms in rows:
        print(f"| {step} | {what} | {ms:.1f} |")
    print(f"continuation: {out[0, 1:].tolist()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
