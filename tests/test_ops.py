"""kvfuse._ops: plain eager calls run the implementation directly (no torch._dynamo import, no custom-op
dispatch); compiling, tracing and dispatch modes see the registered ``torch.ops.kvfuse.*`` op."""

import os
import subprocess
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kvfuse
from kvfuse import _ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROPE = kvfuse.RopeConfig(head_dim=16)

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
