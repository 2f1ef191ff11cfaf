"""Backend selection: auto falls back, explicit backends explain themselves, env var honoured."""

import pytest
import torch

import kvfuse
from kvfuse import dispatch


def _args():
    k = torch.randn(2, 4, 1, 16)
    s = torch.tensor([1, 2])
    return k, s, kvfuse.RopeConfig(head_dim=16)


def test_auto_on_cpu_uses_torch():
    k, _, _ = _args()
    assert dispatch.choose("rerotate_", "auto", k_cache=k, rotary_dim=16, interleaved=False) == "torch"


def test_invalid_backend_name():
    k, s, cfg = _args()
    with pytest.raises(ValueError, match="backend must be one of"):
        kvfuse.rerotate_(k, s, s, s, cfg, backend="cudnn")


def test_explicit_unavailable_backend_lists_reasons(monkeypatch):
    k, s, cfg = _args()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(kvfuse.BackendNotSupported, match="cuda: .+") as ei:
        kvfuse.rerotate_(k, s, s, s, cfg, backend="cuda")
    assert "rerotate_" in str(ei.value)


def test_env_var_selects_backend(monkeypatch):
    k, s, cfg = _args()
    monkeypatch.setenv("KVFUSE_BACKEND", "cuda")
    with pytest.raises(kvfuse.BackendNotSupported):
        kvfuse.rerotate_(k, s, s, s, cfg)
    monkeypatch.setenv("KVFUSE_BACKEND", "torch")
    kvfuse.rerotate_(k, s, s, s, cfg)


def test_available_reports_every_backend():
    k, _, _ = _args()
    av = kvfuse.available("rerotate_", k_cache=k, rotary_dim=16, interleaved=False)
    assert set(av) == {"cuda", "triton", "torch"} and av["torch"] == []


def test_ops_are_registered_with_torch_library():
    """torch.ops.kvfuse.* run (the registered ops, as torch.compile sees them), here on the torch backend."""
    k, s, cfg = _args()
    want = k.clone()
    kvfuse.rerotate_(want, s, s, s + 5, cfg, backend="torch")
    cos, sin, idx = cfg.rotation_tables(torch.full_like(s, 5))
    got = k.clone()
    torch.ops.kvfuse.rerotate_(got, s, idx, cos, sin, cfg.rotary_dim, cfg.interleaved, "torch")
    assert torch.equal(got, want) and not torch.equal(got, k)
    for name in ("compose_copy_", "segment_attention", "merge_states"):
        assert isinstance(getattr(torch.ops.kvfuse, name), torch._ops.OpOverloadPacket)


def test_rerotate_under_torch_compile():
    k, s, cfg = _args()
    want = k.clone()
    kvfuse.rerotate_(want, s, s, s + 3, cfg)
    cos, sin, idx = cfg.rotation_tables(torch.full((2,), 3))

    @torch.compile(backend="eager", fullgraph=True)
    def f(kc):
        torch.ops.kvfuse.rerotate_(kc, s, idx, cos, sin, 16, False, "torch")
        return kc

    assert torch.equal(f(k), want)


def test_auto_follows_the_measured_order_per_op(monkeypatch):
    """'auto' tries each op's backends in dispatch.ORDER: the first that can run wins."""
    calls, winner = [], {}

    def fake(op, backend, **inputs):
        calls.append(backend)
        return [] if backend == winner[op] else ["no"]

    monkeypatch.setattr(dispatch, "reasons_for", fake)
    monkeypatch.setattr(dispatch, "_on_cpu", lambda inputs: False)
    for op, order in dispatch.ORDER.items():
        order = order() if callable(order) else order
        for i, b in enumerate(order):  # each backend of the order in turn the first that can run
            calls.clear()
            winner[op] = b
            assert dispatch.choose(op, "auto") == b
            assert calls == list(order[: i + 1])
    assert set(dispatch.ORDER) == set(dispatch.PUBLIC_OPS.values())


def test_attention_order_puts_the_cuda_prefill_first_at_its_head_dims(monkeypatch):
    """Prefill plans (more than 8 queries per sequence) at head_dim 64, 128 or 256 try the CUDA (Hopper)
    kernel first; decode plans and other head dims keep Triton first."""
    calls = []

    def fake(op, backend, **inputs):
        calls.append(backend)
        return []

    monkeypatch.setattr(dispatch, "reasons_for", fake)
    monkeypatch.setattr(dispatch, "_on_cpu", lambda inputs: False)
    g = kvfuse.SegmentGraph.fork_join(prefix=16, threads=[8, 8])
    prefill = kvfuse.plan(kvfuse.AttentionSpec([g]))
    decode = kvfuse.plan(kvfuse.AttentionSpec([g], q_lens=[1]))
    for plan, d, want in ((prefill, 128, "cuda"), (prefill, 64, "cuda"), (prefill, 256, "cuda"),
                          (prefill, 96, "triton"), (prefill, 32, "triton"), (decode, 128, "triton"),
                          (decode, 64, "triton"), (decode, 256, "triton")):
        q = torch.empty(plan.total_q, 4, d)
        assert dispatch.choose("segment_attention", "auto", q=q, plan=plan) == want, (plan.max_q, d)
