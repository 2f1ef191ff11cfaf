"""DecodeGraphs(compile=True) step, Llama-3-8B-shaped random bf16, 8K prefix: projections on cuBLAS vs small_mm."""
import time, types, json, os, sys, ast
import torch, kvfuse
from kvfuse.bench.common import Ctx
from kvfuse.bench.e2e import build_model
from kvfuse.integrations import hf
from kvfuse.integrations.hf_graphs import DecodeGraphs
from kvfuse.triton_kernels import small_mm as SM
OUT = os.environ.get("OUT", "/tmp")
table = {}
if os.path.exists(f"{OUT}/sweep.json"):
    for r in json.load(open(f"{OUT}/sweep.json")):
        ns = {"qkv": 6144, "o": 4096, "gate_up": 28672, "down": 4096, "lm_head": 128256}[r["shape"]]
        k = 14336 if r["shape"] == "down" else 4096
        table[(r["M"], ns, k)] = ast.literal_eval(r["best"])
heur = SM.config
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
out, ref_logits = {}, {}
def cat(name):
    n = name.lower()
    if "nvjet" in n or "gemm" in n or "splitk" in n or "small_mm" in n: return "gemm"
    if "attn" in n or "merge_splits" in n: return "attention"
    return "other"
def measure(r, T, label):
    th = kvfuse.fork(prefix, T)
    tok = torch.arange(T, device="cuda")[:, None] + 5
    t0 = time.perf_counter()
    first = r.decode(th, tok)[:, -1].float()
    tok = first.argmax(-1, keepdim=True)
    for _ in range(2):
        tok = r.decode(th, tok)[:, -1].argmax(-1, keepdim=True)
    torch.cuda.synchronize(); warm = time.perf_counter() - t0
    err = None
    if T in ref_logits:
        ref = ref_logits[T]; err = float((first - ref).norm() / ref.norm())
        same = float((first.argmax(-1) == ref.argmax(-1)).float().mean())
    else:
        ref_logits[T] = first; same = None
    ts = []
    for _ in range(16):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); tok = r.decode(th, tok)[:, -1].argmax(-1, keepdim=True); b.record(); ts.append((a, b))
    torch.cuda.synchronize()
    ms = sorted(x.elapsed_time(y) for x, y in ts)[8]
    agg, n = {}, 0
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        tok = r.decode(th, tok)[:, -1].argmax(-1, keepdim=True); torch.cuda.synchronize()
    for e in p.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            c = cat(e.name); agg[c] = agg.get(c, 0) + e.device_time_total / 1e3; n += 1
    for t in th: t.release()
    out[f"T{T} {label}"] = dict(ms=ms, warm_s=warm, err=err, argmax_same=same, kernels=n, **agg)
    print(f"T={T} {label:28s} {ms:7.3f} ms/step ({ms/3.81:.2f}x floor) first-logits err vs cublas "
          f"{err if err is None else f'{err:.3g}'} argmax-same {same}  warm {warm:5.1f}s  {n} kernels  "
          + ", ".join(f"{k} {v:.2f}" for k, v in sorted(agg.items())), flush=True)
    json.dump(out, open(f"{OUT}/step.json", "w"), indent=1)
keep = []
for T in (1, 8):
    r = DecodeGraphs(model, store, max_batch=T, compile=True, small_mm=False); measure(r, T, "compiled, cuBLAS"); r.close()
    r = DecodeGraphs(model, store, max_batch=T, compile=True); measure(r, T, "compiled, small_mm"); r.close()
