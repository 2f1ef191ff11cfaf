"""Load a llama2.c checkpoint (e.g. the small trained TinyStories models) as a Hugging Face Llama.

llama2.c rotates consecutive pairs (GPT-J / interleaved convention); Hugging Face Llama rotates
halves. The rows of wq and wk are permuted within each head so that the HF model computes exactly
the same function.
"""

from __future__ import annotations

import struct

import torch

from kvfuse._deps import require


def _permute_for_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out_dim, in_dim = w.shape
    hd = out_dim // n_heads
    return w.view(n_heads, hd // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def load_llama2c(path: str):
    """Returns a float32 ``transformers.LlamaForCausalLM`` (eval mode) with the checkpoint's weights."""
    transformers = require("transformers", "kvfuse.checkpoints.load_llama2c")

    with open(path, "rb") as f:
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("<7i", f.read(28))
        data = torch.frombuffer(bytearray(f.read()), dtype=torch.float32)
    shared = vocab > 0
    vocab = abs(vocab)
    hd = dim // n_heads
    kv_dim = n_kv * hd
    off = 0

    def take(*shape):
        nonlocal off
        n = 1
        for s in shape:
            n *= s
        t = data[off: off + n].view(*shape).clone()
        off += n
        return t

    emb = take(vocab, dim)
    rms_att = take(n_layers, dim)
    wq, wk, wv = take(n_layers, dim, dim), take(n_layers, kv_dim, dim), take(n_layers, kv_dim, dim)
    wo = take(n_layers, dim, dim)
    rms_ffn = take(n_layers, dim)
    w1, w2, w3 = take(n_layers, hidden, dim), take(n_layers, dim, hidden), take(n_layers, hidden, dim)
    rms_final = take(dim)
    off += seq_len * hd  # legacy freq_cis tables (real, imag): unused
    cls = emb if shared else take(vocab, dim)

    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=hidden,
                                   num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv,
                                   max_position_embeddings=seq_len, rms_norm_eps=1e-5, rope_theta=10000.0,
                                   tie_word_embeddings=shared)
    model = transformers.LlamaForCausalLM(cfg)
    sd = {"model.embed_tokens.weight": emb, "model.norm.weight": rms_final, "lm_head.weight": cls}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        sd.update({
            p + "input_layernorm.weight": rms_att[i], p + "post_attention_layernorm.weight": rms_ffn[i],
            p + "self_attn.q_proj.weight": _permute_for_rotate_half(wq[i], n_heads),
            p + "self_attn.k_proj.weight": _permute_for_rotate_half(wk[i], n_kv),
            p + "self_attn.v_proj.weight": wv[i], p + "self_attn.o_proj.weight": wo[i],
            p + "mlp.gate_proj.weight": w1[i], p + "mlp.down_proj.weight": w2[i], p + "mlp.up_proj.weight": w3[i],
        })
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or [m for m in missing if "rotary" not in m]:
        raise ValueError(f"llama2.c load: missing {missing}, unexpected {unexpected}")
    return model.float().eval()
