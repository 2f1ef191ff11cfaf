"""CPU: one DecodeGraphs step of a random bf16 Llama, eager and compiled, against the same weights in float32
(`OMP_NUM_THREADS=1 python precision_cpu.py`)."""
import torch, transformers, kvfuse, copy
from kvfuse.integrations import hf
from kvfuse.integrations.hf_graphs import DecodeGraphs
torch.manual_seed(0)
cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=24,
                               num_attention_heads=8, num_key_value_heads=2, rope_theta=5e5)
m32 = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="kvfuse", dtype=torch.float32).eval()
m16 = copy.deepcopy(m32).to(torch.bfloat16)
ids = torch.randint(0, 512, (1, 200))
res = {}
for name, m, dt, comp in (("fp32", m32, torch.float32, False), ("bf16 eager", m16, torch.bfloat16, False), ("bf16 compiled", m16, torch.bfloat16, True)):
    store = kvfuse.PagedKVStore.from_hf(cfg, num_pages=128, page_size=16, dtype=dt)
    p = store.sequence(); hf.prefill(m, p, ids)
    r = DecodeGraphs(m, store, graphs=False, compile=comp)
    th = kvfuse.fork(p, 2)
    res[name] = r.decode(th, torch.tensor([[3], [4]]))[:, -1].double()
for n in ("bf16 eager", "bf16 compiled"):
    print(n, "vs fp32", float((res[n] - res["fp32"]).norm() / res["fp32"].norm()))
print("compiled vs eager", float((res["bf16 compiled"] - res["bf16 eager"]).norm() / res["bf16 eager"].norm()))
