"""The llama2.c loader: the converted HF model computes what llama2.c's own forward computes."""

import math
import os
import struct

import pytest
import torch

pytest.importorskip("transformers")
from kvfuse.checkpoints import load_llama2c  # noqa: E402

PATH = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "models", "stories260K.bin")
if not os.path.exists(PATH):
    PATH = os.path.join(os.path.dirname(__file__), "..", "shared", "models", "stories260K.bin")


def _llama2c_forward(path, ids):
    """llama2.c's forward, written from its format description: interleaved RoPE on the raw weights."""
    with open(path, "rb") as f:
        dim, hidden, n_layers, n_heads, n_kv, vocab, _ = struct.unpack("<7i", f.read(28))
        data = torch.frombuffer(bytearray(f.read()), dtype=torch.float32)
    hd, off = dim // n_heads, 0

    def take(*shape):
        nonlocal off
        n = math.prod(shape)
        off += n
        return data[off - n: off].view(*shape)

    emb, ra = take(vocab, dim), take(n_layers, dim)
    wq, wk, wv = take(n_layers, dim, dim), take(n_layers, n_kv * hd, dim), take(n_layers, n_kv * hd, dim)
    wo, rf = take(n_layers, dim, dim), take(n_layers, dim)
    w1, w2, w3 = take(n_layers, hidden, dim), take(n_layers, dim, hidden), take(n_layers, hidden, dim)
    rfin = take(dim)

    def rms(x, w):
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-5) * w

    def rope(x, pos):
        ang = pos[:, None].float() / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        c, s = torch.cos(ang)[:, None], torch.sin(ang)[:, None]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), -1).flatten(-2)

    t = len(ids)
    x, pos = emb[ids], torch.arange(t)
    causal = torch.ones(t, t).triu(1).bool()
    for i in range(n_layers):
        h = rms(x, ra[i])
        q = rope((h @ wq[i].T).view(t, n_heads, hd), pos)
        k = rope((h @ wk[i].T).view(t, n_kv, hd), pos).repeat_interleave(n_heads // n_kv, 1)
        v = (h @ wv[i].T).view(t, n_kv, hd).repeat_interleave(n_heads // n_kv, 1)
        sc = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        o = torch.einsum("hqk,khd->qhd", sc.masked_fill(causal, -1e30).softmax(-1), v).reshape(t, dim)
        x = x + o @ wo[i].T
        h = rms(x, rf[i])
        x = x + (torch.nn.functional.silu(h @ w1[i].T) * (h @ w3[i].T)) @ w2[i].T
    return rms(x, rfin) @ emb.T


@pytest.mark.skipif(not os.path.exists(PATH), reason="stories260K.bin not found beside the repository")
def test_llama2c_loader_matches_native_forward():
    ids = torch.tensor([1, 461, 401, 378, 455, 473, 456, 435, 299, 362, 409])
    model = load_llama2c(PATH)
    with torch.no_grad():
        got = model(ids[None]).logits[0]
    torch.testing.assert_close(got, _llama2c_forward(PATH, ids), atol=1e-4, rtol=1e-4)
