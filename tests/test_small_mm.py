"""kvfuse.small_mm: the few-row products kernel against the reference, its validation, its registered
op, and the inductor pass that routes a compiled forward's projections to it."""

import pytest
import torch

from kvfuse import _ops, reference
from kvfuse.dispatch import BackendNotSupported, reasons_for
from kvfuse.small_mm import rewrite, small_mm
from tests.conftest import device_for, skip_unless_supported
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


@pytest.mark.parametrize("launch", [(8, 512, 4, 3), (32, 512, 4, 4), (64, 256, 4, 4), (64, 256, 4, 3)])
@pytest.mark.parametrize("rows", [1, 5])
def test_the_gpu_launch_configurations_match_the_reference(launch, rows):
    """Each (BN, BK, warps, stages) `config` picks on a GPU, at a depth of two K steps and at a ragged one
    (two steps and 8 more): the multi-step K loop and its masks as the 8B model's shapes run them."""
    from kvfuse.triton_kernels import small_mm as kernel

    dev = device_for("triton")
    bn, bk = launch[:2]
    for k in (2 * bk, 2 * bk + 8):
        x = torch.randn(rows, k, device=dev).to(torch.bfloat16)
        ws = [torch.randn(n, k, device=dev).to(torch.bfloat16) for n in (bn + 3, 1, 2 * bn)]
        skip_unless_supported("small_mm", "triton", x=x, weights=ws)
        for a, b in zip(kernel.small_mm(x, ws, [], launch), reference.small_mm(x, ws, [])):
            _close(a, b)


def test_the_model_shapes_match_the_reference_on_a_gpu():
    """On a GPU, the launch `config` chooses for q / k / v (6144 columns) and o at K = 1024 and a ragged
    1000, one row and eight."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (the interpreter runs the configurations above on small shapes)")
    for k in (1024, 1000):
        for rows in (1, 8):
            x = torch.randn(rows, k, device="cuda").to(torch.bfloat16)
            for ns in ((4096, 1024, 1024), (4096,)):
                ws = [torch.randn(n, k, device="cuda").to(torch.bfloat16) for n in ns]
                for a, b in zip(small_mm(x, ws, backend="triton"), reference.small_mm(x, ws, [])):
                    _close(a, b)


def test_inputs_that_require_grad_are_refused():
    x, w = torch.randn(2, 16), torch.randn(8, 16, requires_grad=True)
    with pytest.raises(ValueError, match="small_mm has no backward"):
        small_mm(x, [w])
    with torch.no_grad():
        _close(small_mm(x, [w])[0], x @ w.detach().T)


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
    return seen


@pytest.mark.usefixtures("no_compile_caches")  # a cached graph would skip the passes
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


def _traced(f, *args):
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(f)(*args)


def _rewritten_equals(f, *args, products: int):
    """`rewrite` on ``f``'s traced graph replaces ``products`` products; the graph stays valid and
    computes what ``f`` does."""
    gm = _traced(f, *args)
    assert rewrite(gm.graph) == products
    gm.graph.lint()
    gm.recompile()
    for got, want in zip(gm(*args), f(*args)):
        _close(got, want)


def test_rewrite_leaves_other_products_alone():
    """Not rewritten: float32, a weight that is not transposed from [N, K], batched matmuls; the one
    eligible product is."""
    dev = device_for("triton")
    bf = dict(device=dev, dtype=torch.bfloat16)
    x, w, w2 = torch.randn(2, 16, **bf), torch.randn(8, 16, **bf), torch.randn(16, 8, **bf)
    a, b = torch.randn(2, 3, 16, **bf), torch.randn(2, 16, 4, **bf)
    skip_unless_supported("small_mm", "triton", x=x, weights=[w])
    _rewritten_equals(lambda x, w, w2, a, b: (x.float() @ w.float().T, x @ w2, torch.bmm(a, b), x @ w.T),
                      x, w, w2, a, b, products=1)


def test_rewrite_keeps_the_graph_in_order():
    """Products of one input whose weight or bias is computed after the first of them stay apart; a
    product feeding another, one weight of two inputs, a strided and an expanded input: the rewritten
    graph is valid and computes what the original does."""
    dev = device_for("triton")
    bf = dict(device=dev, dtype=torch.bfloat16)
    x, y = torch.randn(3, 32, **bf), torch.randn(1, 32, **bf)
    w1, w2, w3 = (torch.randn(n, 32, **bf) for n in (16, 32, 8))
    bias = torch.randn(32, **bf)
    skip_unless_supported("small_mm", "triton", x=x, weights=[w1])

    def late_weight(x, w1, w2, w3, bias):
        h = x @ w1.T
        w_late = w2 * 2  # defined after the first product of x
        return h, x @ w_late.T, torch.addmm(bias * 3, x, w2.T), x @ w3.T

    def chained(x, w1, w2, w3, bias):
        h = x @ w2.T  # [3, 32]
        return (h @ w1.T), torch.addmm(bias, h, w2.T), (h @ w2.T)  # one weight, two inputs

    def strided(x, y, w1):
        return x[:, :16] @ w1[:, :16].contiguous().T, y.expand(4, 32) @ w1.T, x[::2] @ w1.T

    _rewritten_equals(late_weight, x, w1, w2, w3, bias, products=4)
    _rewritten_equals(chained, x, w1, w2, w3, bias, products=4)
    _rewritten_equals(strided, x, y, w1, products=3)


@pytest.mark.usefixtures("no_compile_caches")
def test_compile_pass_runs_after_a_configured_pass(monkeypatch):
    """A post-grad pass already configured still runs, before kvfuse's (which still routes)."""
    dev = device_for("triton")
    from torch._inductor import config as cfg

    from kvfuse.small_mm import available, compile_pass, get_custom_graph_passes

    if not available():
        pytest.skip("the pass needs torch's custom inductor passes and triton")
    from torch._inductor.custom_graph_pass import CustomGraphPass

    ran = []

    class Theirs(CustomGraphPass):
        def __call__(self, graph):
            aten = torch.ops.aten
            ran.append(sum(n.target in (aten.mm.default, aten.addmm.default) for n in graph.nodes))

        def uuid(self):
            return "theirs"

    seen = _spy(monkeypatch)
    m = _Block().to(device=dev, dtype=torch.bfloat16)
    x = torch.randn(3, 1, 64, device=dev).to(torch.bfloat16)
    torch._dynamo.reset()
    with torch.no_grad(), cfg.patch(post_grad_custom_post_pass=Theirs()), compile_pass():
        got = torch.compile(m, fullgraph=True, dynamic=False)(x)
        want = m(x)
    if get_custom_graph_passes is None:  # a torch whose hook takes one pass: theirs only
        assert ran and not seen
    else:
        assert ran == [5] and seen[0][:2] == (5, 3)
    _close(got, want)
