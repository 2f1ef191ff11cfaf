"""The registered torch.library ops: torch.library.opcheck (schema, fake implementations, autograd
registration, AOT dispatch) on every backend that runs here, and kvfuse.attention under
torch.compile(fullgraph=True). kvfuse._ops' entry points: plain eager calls run the implementation
directly (no torch._dynamo import, no custom-op dispatch); compiling, tracing and dispatch modes see the
registered ``torch.ops.kvfuse.*`` op."""

import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kvfuse
from kvfuse import Segment, SegmentGraph, _ops
from kvfuse.attention import tile_args
from tests.conftest import device_for, skip_unless_supported

# opcheck's own tests; test_aot_dispatch_dynamic needs a compiler toolchain on CPU, the others do not
OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROPE = kvfuse.RopeConfig(head_dim=16)


def _plan_inputs(dev, dtype):
    g = SegmentGraph([Segment("p", 20), Segment("a", 7, ("p",), 20), Segment("b", 5, ("p",), 20)])
    p = kvfuse.plan(kvfuse.AttentionSpec([g, g], q_lens=[2, 1], device=dev))
    k = torch.randn(9, 4, 2, 64, device=dev).to(dtype)
    v = torch.randn(9, 4, 2, 64, device=dev).to(dtype)
    bt = torch.randperm(9, device=dev)[:8].view(1, 8).repeat(2, 1).to(torch.int32)
    q = torch.randn(p.total_q, 4, 64, device=dev).to(dtype)
    return p, q, k, v, bt


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["f16", "f32"])
def test_opcheck_segment_attention(backend, dtype):
    dev = device_for(backend)
    p, q, k, v, bt = _plan_inputs(dev, dtype)
    skip_unless_supported("segment_attention", backend, q=q, k_cache=k, plan=p)
    meta = kvfuse.dispatch.meta("segment_attention", backend).get("tile_shape")
    tm = p.tiles(*meta(64, p.max_q, q.shape[1] // k.shape[2], itemsize=q.element_size()), 9) if meta else None
    tiles = tile_args(tm, dev)
    args = (q, k, v, bt, p.kv_lens, p.qo_indptr, p.token_seg, p.ancestors, p.q_token, p.token_pos, *tiles, 0.125,
            2.0, 9, backend)
    torch.library.opcheck(_ops.segment_attention_op.op, args, test_utils=OPCHECK)


def test_opcheck_rerotate_and_compose(backend):
    dev = device_for(backend)
    k = torch.randn(2, 6, 4, 2, 32, device=dev)
    v = torch.randn(2, 6, 4, 2, 32, device=dev)
    skip_unless_supported("rerotate_", backend, k_cache=k, rotary_dim=32, interleaved=False)
    cos, sin, idx = kvfuse.RopeConfig(32).rotation_tables(torch.tensor([3, -7, 3]), device=dev)
    slots = torch.tensor([1, 5, 9], device=dev)
    torch.library.opcheck(_ops.rerotate_op.op, (k, slots, idx, cos, sin, 32, False, backend), test_utils=OPCHECK)
    dst = torch.tensor([12, 13, 14], device=dev)
    torch.library.opcheck(_ops.compose_copy_op.op, (k, v, slots, dst, idx, cos, sin, 32, False, backend),
                          test_utils=OPCHECK)


@pytest.mark.parametrize("layer", [-1, 1])
def test_opcheck_write_kv(backend, layer):
    if backend == "cuda":
        pytest.skip("the CUDA backend has no K/V write of its own (the Triton or torch one runs)")
    dev = device_for(backend)
    k_cache, v_cache = torch.randn(2, 6, 4, 2, 32, device=dev), torch.randn(2, 6, 4, 2, 32, device=dev)
    skip_unless_supported("write_kv_", backend, k_cache=k_cache)
    shape = (2, 3, 2, 32) if layer < 0 else (3, 2, 32)
    k, v = torch.randn(shape, device=dev), torch.randn(shape, device=dev)
    slots = torch.tensor([1, 5, 9], device=dev)
    torch.library.opcheck(_ops.write_kv_op.op, (k_cache, v_cache, slots, k, v, layer, backend), test_utils=OPCHECK)


def test_opcheck_merge_states(backend):
    dev = device_for(backend)
    va, vb = torch.randn(2, 5, 3, 16, device=dev).unbind(0)
    sa, sb = torch.randn(2, 5, 3, device=dev).unbind(0)
    skip_unless_supported("merge_states", backend, v=va)
    torch.library.opcheck(_ops.merge_states_op.op, (va, sa, vb, sb, backend), test_utils=OPCHECK)


def test_attention_compiles_with_fullgraph():
    """With check=False (the table validated beforehand) attention traces into one graph and agrees
    with eager; with the default check it says what to do instead of breaking the graph silently."""
    p, q, k, v, bt = _plan_inputs(torch.device("cpu"), torch.float32)
    p.check_block_table(bt, k)

    def f(q, k, v, bt):
        return kvfuse.attention(q, k, v, bt, p, window=9, softcap=3.0, check=False, backend="torch")

    want = f(q, k, v, bt)
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(q, k, v, bt)
    torch.testing.assert_close(got, want)

    def g(q, k, v, bt):
        return kvfuse.attention(q, k, v, bt, p, backend="torch")

    torch._dynamo.reset()
    with pytest.raises(Exception, match="check_block_table"):
        torch.compile(g, fullgraph=True)(q, k, v, bt)


def test_check_block_table_rejects_pages_outside_the_pool():
    p, q, k, v, bt = _plan_inputs(torch.device("cpu"), torch.float32)
    bad = bt.clone()
    bad[1, 0] = 9
    with pytest.raises(ValueError, match="block_table"):
        p.check_block_table(bad, k)


FRESH = """
import sys
import torch
import kvfuse
heavy = ("torch._dynamo", "torch._inductor", "triton", "transformers", "sympy")
print("after import:", [m for m in heavy if m in sys.modules])
k = torch.randn(4, 4, 2, 16)
kvfuse.rerotate_(k, torch.arange(8), torch.arange(8), torch.arange(8) + 5, kvfuse.RopeConfig(head_dim=16))
plan = kvfuse.plan(kvfuse.AttentionSpec([kvfuse.SegmentGraph([kvfuse.Segment("all", 8)])], q_lens=[1]))
kvfuse.attention(torch.randn(1, 2, 16), k, k, torch.tensor([[0, 1]], dtype=torch.int32), plan)
print("after calls:", [m for m in heavy if m in sys.modules])
"""


def test_import_and_first_calls_stay_cheap():
    """A fresh process imports kvfuse and calls rerotate_ and attention on CPU without importing
    torch._dynamo (the custom op's first call does: 2-3 s), triton or transformers."""
    env = {k: v for k, v in os.environ.items() if k not in ("KVFUSE_BACKEND", "PYTHONPATH")}
    env["PYTHONPATH"] = ROOT
    r = subprocess.run([sys.executable, "-c", FRESH], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["after import: []", "after calls: []"], r.stdout


def _args(backend="torch"):
    k = torch.randn(2, 4, 2, 16)
    cos, sin, idx = ROPE.rotation_tables(torch.full((4,), 3))
    return (k, torch.tensor([0, 5, 6, 7]), idx, cos, sin, 16, False, backend)


def _reference(args):
    k = args[0].clone()
    kvfuse.reference.rerotate_(k, *args[1:-1])
    return k


def test_eager_call_is_direct_and_bumps_the_version(monkeypatch):
    def unexpected(*args):
        raise AssertionError("a plain eager call went through the registered op")

    args = _args()
    want = _reference(args)
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, a=(), kw=None):
            seen.append(func)
            return func(*a, **(kw or {}))

    before = args[0]._version
    _ops.rerotate_op(*args)
    assert torch.equal(args[0], want) and args[0]._version > before

    assert not seen
    args = _args()
    want = _reference(args)
    with Record():  # a dispatch mode (make_fx, FakeTensorMode, ...) sees the registered op
        _ops.rerotate_op(*args)
    assert torch.ops.kvfuse.rerotate_.default in seen
    assert torch.equal(args[0], want)


def test_compiled_graph_holds_the_registered_op():
    args = _args()
    want = _reference(args)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    @torch.compile(backend=backend, fullgraph=True)
    def f(k):
        _ops.rerotate_op(k, *args[1:])
        return k

    k = args[0].clone()
    assert torch.equal(f(k), want)
    (gm,) = graphs
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.kvfuse.rerotate_.default in targets or torch.ops.kvfuse.rerotate_ in targets, gm.graph


def test_inputs_that_require_grad_go_through_the_op():
    v_a, v_b = torch.randn(3, 2, 8, requires_grad=True), torch.randn(3, 2, 8)
    s_a, s_b = torch.randn(3, 2), torch.randn(3, 2)
    want_v, want_s = kvfuse.reference.merge_states(v_a.detach(), s_a, v_b, s_b)
    v, s = _ops.merge_states_op(v_a, s_a, v_b, s_b, "torch")
    assert "kvfuse_merge_states" in type(v.grad_fn).__name__  # the registered op ran, not the reference
    torch.testing.assert_close(v, want_v)
    torch.testing.assert_close(s, want_s)
    with torch.no_grad():
        v, _ = _ops.merge_states_op(v_a, s_a, v_b, s_b, "torch")
    torch.testing.assert_close(v, want_v)
