"""Decode attention at the 8B step's shape (1 row, 8K keys, Hq 32, Hkv 8, d 128, page 16) over 4 layer pools."""
import math, torch, kvfuse
import kvfuse.triton_kernels.attention as TA
dev = "cuda"
L, P, page, hkv, hq, d = 4, 8200, 16, 8, 32, 128
pages = -(-P // page)
ks = [torch.randn(pages, page, hkv, d, device=dev, dtype=torch.bfloat16) for _ in range(L)]
vs = [torch.randn(pages, page, hkv, d, device=dev, dtype=torch.bfloat16) for _ in range(L)]
g = kvfuse.SegmentGraph([kvfuse.Segment("p", 8192), kvfuse.Segment("t", 8, ("p",))])
plan = kvfuse.plan(kvfuse.AttentionSpec([g], q_lens=[1], device=dev))
bt = torch.arange(pages, device=dev, dtype=torch.int32)[None]
q = torch.randn(1, hq, d, device=dev, dtype=torch.bfloat16)
TA._kernel = lambda decode, hd: (TA._attn_kernel, dict(num_warps=4, num_stages=3))
for i in range(L):
    kvfuse.attention(q, ks[i], vs[i], bt, plan, backend="triton", check=False)
torch.cuda.synchronize()
for i in range(L):
    kvfuse.attention(q, ks[i], vs[i], bt, plan, backend="triton", check=False)
torch.cuda.synchronize()
