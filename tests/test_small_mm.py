"""kvfuse.small_mm: the few-row products kernel against the reference, its validation, its registered
op, and the inductor pass that routes a compiled forward's projections to it."""

import pytest
import torch

from kvfuse import _ops, reference
from kvfuse.dispatch import BackendNotSupported, reasons_for
from kvfuse.small_mm import rewrite, small_mm
from tests.conftest import device_for, no_compile_caches, skip_unless_supported
from tests.test_ops import OPCHECK


def _close(got, want):
    # one rounding of a float32 sum each: at most about one ulp of the output dtype apart
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2 * want.float().abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("k", [96, 100])  # a multiple of the K step, and one with a ragged last step
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_matches_the_reference(dtype, rows, k, bias):
    """One to three weights of odd widths (1, 37, 48 columns: ragged last column blocks) in one launch."""
    dev = device_for("triton")
    x = torch.randn(rows, k, device=dev).to(dtype)
    ws = [torch.randn(n, k, device=dev).to(dtype) for n in (37, 1, 48)]
    bs = [torch.randn(w.shape[0], device=dev).to(dtype) for w in ws]
    skip_unless_supported("small_mm", "triton", x=x, weights=ws)
    for g in (1, 2, 3):
        got = small_mm(x, ws[:g], bs[:g] if bias else None, backend="triton")
        want = reference.small_mm(x, ws[:g], bs[:g] if bias else [])
        assert [tuple(y.shape) for y in got] == [(rows, w.shape[0]) for w in ws[:g]]
        for a, b in zip(got, want):
            assert a.dtype == dtype
            _close(a, b)


def test_kernel_reads_a_strided_input_and_no_rows():
    dev = device_for("triton")
    base = torch.randn(4, 80, device=dev).to(torch.bfloat16)
    x = base[:, :64]  # rows strided by 80, unit stride along K
    w = torch.randn(40, 64, device=dev).to(torch.bfloat16)
    skip_unless_supported("small_mm", "triton", x=x, weights=[w])
    _close(small_mm(x, [w], backend="triton")[0], reference.small_mm(x, [w], [])[0])
    empty = small_mm(x[:0], [w], backend="triton")[0]
    assert empty.shape == (0, 40)


@pytest.mark.parametrize("call, err, match", [
    (lambda x, w: small_mm(x[0], [w]), ValueError, "x must have 2 dims"),
    (lambda x, w: small_mm(x.long(), [w]), TypeError, "x must have dtype"),
    (lambda x, w: small_mm(x, w), TypeError, "weights must be a list of 1 to 3"),
    (lambda x, w: small_mm(x, [w] * 4), TypeError, "weights must be a list of 1 to 3"),
    (lambda x, w: small_mm(x, [w.half()]), TypeError, r"weights\[0\] must have dtype"),
    (lambda x, w: small_mm(x, [w[:, :8]]), ValueError, r"weights\[0\] must be \[N, 16\]"),
    (lambda x, w: small_mm(x, [w.t().contiguous().t()]), ValueError, r"weights\[0\] must be contiguous"),
    (lambda x, w: small_mm(x, [w, w], [torch.zeros(24)]), TypeError, "one tensor per weight"),
    (lambda x, w: small_mm(x, [w], [torch.zeros(5)]), ValueError, r"biases\[0\] must be a contiguous \[24\]"),
    (lambda x, w: small_mm(x, [w], [torch.zeros(24, dtype=torch.float64)]), TypeError, r"biases\[0\] must have dtype"),
])
def test_bad_arguments_are_refused_by_name(call, err, match):
    x, w = torch.randn(2, 16), torch.randn(24, 16)
    with pytest.raises(err, match=match):
        call(x, w)


def test_the_triton_kernel_refuses_what_it_does_not_compute():
    x = torch.randn(17, 16, dtype=torch.bfloat16)
    w = torch.randn(8, 16, dtype=torch.bfloat16)
    why = " ".join(reasons_for("small_mm", "triton", x=x, weights=[w]) +
                   reasons_for("small_mm", "triton", x=x.float(), weights=[w.float()]))
    if "failed to load" not in why:
        assert "17 rows, the kernel takes at most 16" in why and "not float16/bfloat16" in why
    with pytest.raises(BackendNotSupported):
        small_mm(x.float(), [w.float()], backend="triton")
    _close(small_mm(x, [w])[0], x.float() @ w.float().T)  # "auto" runs it on torch


def test_opcheck_small_mm(backend):
    dev = device_for(backend)
    dtype = torch.float32 if backend == "torch" else torch.bfloat16
    x = torch.randn(3, 32, device=dev).to(dtype)
    ws = [torch.randn(n, 32, device=dev).to(dtype) for n in (16, 8)]
    skip_unless_supported("small_mm", backend, x=x, weights=ws)
    torch.library.opcheck(_ops.small_mm_op.op, (x, ws, [], backend), test_utils=OPCHECK)
    torch.library.opcheck(_ops.small_mm_op.op, (x, ws, [torch.randn(16, device=dev).to(dtype),
                                                        torch.randn(8, device=dev).to(dtype)], backend),
                          test_utils=OPCHECK)


class _Block(torch.nn.Module):
    """q / k / v of one input, an output projection with a bias, then one more: five products, three
    launches."""

    def __init__(self, qkv_bias: bool = False):
        super().__init__()
        self.q = torch.nn.Linear(64, 64, bias=qkv_bias)
        self.k = torch.nn.Linear(64, 16, bias=qkv_bias)
        self.v = torch.nn.Linear(64, 16, bias=qkv_bias)
        self.o = torch.nn.Linear(64, 64)
        self.up = torch.nn.Linear(64, 96, bias=False)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        h = self.o(torch.nn.functional.silu(q) + k.repeat(1, 1, 4) * v.repeat(1, 1, 4))
        return self.up(h)


def _spy(monkeypatch):
    from kvfuse import small_mm as mod

    seen = []
    real = mod.rewrite

    def spy(graph, backend="triton"):
        launches_before = sum(n.target is torch.ops.kvfuse.small_mm.default for n in graph.nodes)
        n = real(graph, backend)
        launches = sum(n.target is torch.ops.kvfuse.small_mm.default for n in graph.nodes) - launches_before
        seen.append((n, launches, sum(n.target is torch.ops.aten.mm.default for n in graph.nodes)))
        return n

    monkeypatch.setattr(mod, "rewrite", spy)
    no_compile_caches(monkeypatch)  # a cached graph would skip the passes
    return seen


@pytest.mark.parametrize("rows, routed, qkv_bias", [(3, True, False), (3, True, True), (17, False, False)])
def test_the_compile_pass_routes_few_row_projections(rows, routed, qkv_bias, monkeypatch):
    """torch.compile with `compile_pass`: five ``nn.Linear`` products of 3 rows become three launches
    (q / k / v grouped, with or without their biases), and the result is the eager module's; at 17
    rows nothing is rewritten."""
    dev = device_for("triton")
    from kvfuse.small_mm import available, compile_pass

    if not available():
        pytest.skip("the pass needs torch's custom inductor passes and triton")
    seen = _spy(monkeypatch)
    torch.manual_seed(0)
    m = _Block(qkv_bias).to(device=dev, dtype=torch.bfloat16)
    x = torch.randn(rows, 1, 64, device=dev).to(torch.bfloat16)
    torch._dynamo.reset()
    with torch.no_grad():
        want = m(x)
        with compile_pass():
            got = torch.compile(m, fullgraph=True, dynamic=False)(x)
    assert seen and seen[0][:2] == ((5, 3) if routed else (0, 0))
    _close(got, want)


def test_rewrite_leaves_other_products_alone():
    """Not rewritten: float32, a weight that is not transposed from [N, K], batched matmuls."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x, w, w2, a, b):
        return x.float() @ w.float().T, x @ w2, torch.bmm(a, b)

    with FakeTensorMode():
        args = (torch.empty(2, 16, dtype=torch.bfloat16), torch.empty(8, 16, dtype=torch.bfloat16),
                torch.empty(16, 8, dtype=torch.bfloat16), torch.empty(2, 3, 16, dtype=torch.bfloat16),
                torch.empty(2, 16, 4, dtype=torch.bfloat16))
        gm = make_fx(f, tracing_mode="fake")(*args)
    assert rewrite(gm.graph) == 0
