"""DecodeGraphs step (8K prefix, T=1 / 8): plain vs compiled, decode split counts, write kernels, max-autotune."""
import time, types, json, os, sys
import torch, kvfuse
from kvfuse.bench.common import Ctx
from kvfuse.bench.e2e import build_model
from kvfuse.integrations import hf
from kvfuse.integrations.hf_graphs import DecodeGraphs
import kvfuse.triton_kernels.attention as TA
import kvfuse.dispatch as D
args = types.SimpleNamespace(dtype="bf16")
ctx = Ctx(args, torch.device("cuda"))
model, cfg = build_model(ctx, 32, 32, 8, 128, attn_implementation="kvfuse")
P = 8192
store = kvfuse.PagedKVStore.from_hf(cfg, P // 16 + 400, 16, dtype=torch.bfloat16, device="cuda")
prefix = store.sequence("prefix")
ids = torch.randint(0, cfg.vocab_size, (1, P), generator=torch.Generator().manual_seed(0)).cuda()
for s in range(0, P, 4096):
    hf.prefill(model, prefix, ids[:, s:s + 4096])
torch.cuda.synchronize()
out = {}
ref_logits = {}
firsts = {}
old_graphs = []
def cat(name):
    n = name.lower()
    if "nvjet" in n or "gemm" in n or "splitk" in n or "mm" in n and "triton" in n: return "gemm"
    if "attn" in n or "merge_splits" in n: return "attention"
    return "other"
def measure(r, T, label, prof=True):
    th = kvfuse.fork(prefix, T)
    tok = torch.arange(T, device="cuda")[:, None] + 5
    t0 = time.perf_counter()
    first = r.decode(th, tok)[:, -1].float()
    tok = first.argmax(-1, keepdim=True)
    for _ in range(2):
        tok = r.decode(th, tok)[:, -1].argmax(-1, keepdim=True)
    torch.cuda.synchronize(); warm = time.perf_counter() - t0
    firsts[f"T{T} {label}"] = first
    err = None
    if T in ref_logits:
        ref = ref_logits[T]; err = float((first - ref).norm() / ref.norm())
    else:
        ref_logits[T] = first
    ts = []
    for _ in range(12):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); tok = r.decode(th, tok)[:, -1].argmax(-1, keepdim=True); b.record(); ts.append((a, b))
    torch.cuda.synchronize()
    ms = sorted(x.elapsed_time(y) for x, y in ts)[6]
    agg, n = {}, 0
    if prof:
        from torch.profiler import profile, ProfilerActivity
        with profile(activities=[ProfilerActivity.CUDA]) as p:
            tok = r.decode(th, tok)[:, -1].argmax(-1, keepdim=True); torch.cuda.synchronize()
        for e in p.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                c = cat(e.name); agg[c] = agg.get(c, 0) + e.device_time_total / 1e3; n += 1
    for t in th: t.release()
    out[f"T{T} {label}"] = dict(ms=ms, warm_s=warm, err=err, kernels=n, **agg)
    print(f"T={T} {label:34s} {ms:7.3f} ms/step  first-logits err {err if err is None else f'{err:.2g}'}  "
          f"warm {warm:5.1f}s  {n} kernels  " + ", ".join(f"{k} {v:.2f}" for k, v in agg.items()), flush=True)
    json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "diag.json"), "w"), indent=1)
orig_splits = TA.num_splits
def splits_with(min_tiles):
    def f(work, hkv, max_tiles, device):
        want = -(-8 * TA.sm_count(device) // max(1, work * hkv))
        n = int(max(1, min(want, max_tiles // min_tiles, 64)))
        return 1 << (n.bit_length() - 1)
    return f
for T in (1, 8):
    r = DecodeGraphs(model, store, max_batch=T); measure(r, T, "plain (write: triton)"); r.close()
    r = DecodeGraphs(model, store, max_batch=T, compile=True); measure(r, T, "compiled")
    for mt in (4, 2, 1):
        TA.num_splits = splits_with(mt)
        for bk in r._buckets.values(): old_graphs.append(bk.graph); bk.graph = None
        measure(r, T, f"compiled, min {mt} key tiles per split")
    TA.num_splits = orig_splits
    r.close()
D.ORDER["write_kv_"] = ("torch",)
r = DecodeGraphs(model, store, max_batch=1, compile=True); measure(r, 1, "compiled, write: torch"); r.close()
D.ORDER["write_kv_"] = ("triton", "torch")
# fp32 reference of the first step (T=1): the same weights upcast, its own fp32 store and prefill
import copy
m32 = copy.deepcopy(model).float()
s32 = kvfuse.PagedKVStore.from_hf(cfg, P // 16 + 40, 16, dtype=torch.float32, device="cuda")
p32 = s32.sequence("prefix")
for s in range(0, P, 4096):
    hf.prefill(m32, p32, ids[:, s:s + 4096])
th = kvfuse.fork(p32, 1)
l32 = hf.decode(m32, th, torch.tensor([[5]], device="cuda"))[:, -1].double()
for k, v in firsts.items():
    if k.startswith("T1 "):
        e = float((v.double() - l32).norm() / l32.norm())
        out[k]["err_vs_fp32"] = e
        print(f"{k:40s} first logits vs fp32: {e:.3g}", flush=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "diag.json"), "w"), indent=1)
del m32, s32, p32, th
torch.cuda.empty_cache()
r = DecodeGraphs(model, store, max_batch=1, compile={"mode": "max-autotune-no-cudagraphs"})
measure(r, 1, "compiled max-autotune-no-cudagraphs"); r.close()
