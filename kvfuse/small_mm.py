"""Matrix products with few rows (a decode step's projections) on kvfuse's kernel, and the
``torch.compile`` graph pass that routes a compiled forward's to it.

A decode step multiplies T <= 16 rows by each weight of the model: the product is a stream of the
weights, and cuBLAS's few-row kernels stream them well below the read ceiling (the small q / k / v
projections most). `small_mm` computes ``x @ w.T (+ b)`` for up to three weights that share ``x`` in
one launch. `SmallMMPass` rewrites a compiled graph's ``mm`` / ``addmm`` of a few-row input by a
transposed 2-D weight (``nn.Linear``'s ``F.linear``) into `small_mm` calls, grouping the products of
one input (q / k / v, gate / up); `DecodeGraphs` applies it to its compiled forward
(``small_mm=True``, the default).
"""

from __future__ import annotations

import contextlib
import operator

import torch
from torch import Tensor

from kvfuse import _ops
from kvfuse._checks import check_tensor
from kvfuse.dispatch import choose

MAX_ROWS = 16  # the rows the pass routes to small_mm (the Triton kernel's tile)
MAX_GROUPS = 3  # weights per launch
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def small_mm(x: Tensor, weights: list[Tensor] | tuple[Tensor, ...], biases: list[Tensor] | None = None, *,
             backend: str | None = None) -> list[Tensor]:
    """``[x @ w.T + b for each weight w and bias b]``: a few rows of ``x`` through one to three
    weights that share them, in one launch.

    Args:
        x: ``[M, K]`` float16 / bfloat16 / float32 (the Triton kernel takes ``M <= 16`` rows of 16-bit
            floats; other inputs run on torch).
        weights: 1 to 3 contiguous ``[N_g, K]`` tensors of x's dtype and device (``nn.Linear.weight``).
        biases: None, or one contiguous ``[N_g]`` tensor per weight.
        backend: "auto" (default: Triton where it can run, else torch), "triton" or "torch".
    Returns:
        A list of ``[M, N_g]`` tensors in x's dtype (float32 accumulation, one rounding).

    Example:
        >>> import torch
        >>> from kvfuse.small_mm import small_mm
        >>> x, wq, wk = torch.randn(2, 64), torch.randn(64, 64), torch.randn(16, 64)
        >>> q, k = small_mm(x, [wq, wk])
        >>> torch.allclose(k, x @ wk.T, atol=1e-4)
        True
    """
    check_tensor("x", x, ndim=2, dtype=DTYPES)
    if not isinstance(weights, (list, tuple)) or not 1 <= len(weights) <= MAX_GROUPS:
        raise TypeError(f"weights must be a list of 1 to {MAX_GROUPS} tensors, got "
                        f"{len(weights) if isinstance(weights, (list, tuple)) else type(weights).__name__}")
    if biases is not None and (not isinstance(biases, (list, tuple)) or len(biases) != len(weights)):
        raise TypeError(f"biases must be None or a list of one tensor per weight ({len(weights)}), got "
                        f"{len(biases) if isinstance(biases, (list, tuple)) else type(biases).__name__}")
    k = x.shape[1]
    for i, w in enumerate(weights):
        check_tensor(f"weights[{i}]", w, ndim=2, dtype=x.dtype, device=x.device)
        if w.shape[1] != k:
            raise ValueError(f"weights[{i}] must be [N, {k}] (x has {k} columns), got {tuple(w.shape)}")
        if not w.is_contiguous():
            raise ValueError(f"weights[{i}] must be contiguous ([N, K], nn.Linear's layout)")
        if biases is not None:
            check_tensor(f"biases[{i}]", biases[i], ndim=1, dtype=x.dtype, device=x.device)
            if biases[i].shape[0] != w.shape[0] or not biases[i].is_contiguous():
                raise ValueError(f"biases[{i}] must be a contiguous [{w.shape[0]}], got {tuple(biases[i].shape)}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *weights, *(biases or ()))):
        raise ValueError("small_mm has no backward: x, weights and biases must not require grad (call it "
                         "under torch.no_grad(), or use torch.nn.functional.linear)")
    b = choose("small_mm", backend, x=x, weights=weights)
    return _ops.small_mm_op(x, list(weights), list(biases or []), b)


def _val(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _device_ok(device: torch.device) -> bool:
    from kvfuse.triton_kernels._common import interpreting

    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def _eligible(x, w, bias) -> bool:
    """Whether ``mm(x, w.T) (+ bias)`` is a product the Triton kernel computes: static shapes, a few
    16-bit rows with unit stride along K, a contiguous ``[N, K]`` weight of the same dtype and device."""
    xv, wv = _val(x), _val(w)
    if not (isinstance(xv, Tensor) and isinstance(wv, Tensor)) or xv.dim() != 2 or wv.dim() != 2:
        return False
    if not all(isinstance(s, int) for s in (*xv.shape, *xv.stride(), *wv.shape, *wv.stride())):
        return False
    if not 1 <= xv.shape[0] <= MAX_ROWS or xv.shape[1] != wv.shape[1] or xv.stride(1) != 1:
        return False
    if xv.dtype not in (torch.float16, torch.bfloat16) or wv.dtype != xv.dtype or wv.device != xv.device:
        return False
    if not wv.is_contiguous() or not _device_ok(xv.device):
        return False
    if bias is None:
        return True
    bv = _val(bias)
    return (isinstance(bv, Tensor) and tuple(bv.shape) == (wv.shape[0],) and bv.stride() == (1,)
            and bv.dtype == xv.dtype and bv.device == xv.device)


def _parts(node):
    """``(x, weight, bias)`` of a product node (read from its current arguments)."""
    if node.target is torch.ops.aten.addmm.default:
        bias, x, wt = node.args
    else:
        (x, wt), bias = node.args, None
    return x, wt.args[0], bias


def _products(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """Every eligible ``mm(x, permute(w, [1, 0]))`` / ``addmm(bias, x, permute(w, [1, 0]))`` node."""
    aten = torch.ops.aten
    found = []
    for node in graph.nodes:
        if node.op != "call_function" or node.kwargs:
            continue
        if not ((node.target is aten.mm.default and len(node.args) == 2) or
                (node.target is aten.addmm.default and len(node.args) == 3)):
            continue
        wt = node.args[-1]
        if not (isinstance(wt, torch.fx.Node) and wt.target is aten.permute.default and list(wt.args[1]) == [1, 0]):
            continue
        if _eligible(*_parts(node)):
            found.append(node)
    return found


def _source(x: torch.fx.Node):
    """What an input is a view of: the products of one hidden state each reshape it to 2-D themselves."""
    views = (torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default)
    if x.op == "call_function" and x.target in views:
        return x.args[0], tuple(x.args[1])
    return x, None


def rewrite(graph: torch.fx.Graph, backend: str = "triton") -> int:
    """Replace the graph's eligible few-row products by `small_mm` launches (up to three products of
    one input per launch, when their weights are defined before the first of them); returns the
    number of products replaced."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    chunks: list[list[torch.fx.Node]] = []
    open_chunk: dict = {}  # (source of x, has bias) -> the chunk the next product of x may join
    for node in _products(graph):
        x, w, bias = _parts(node)
        key = (_source(x), bias is not None)
        chunk = open_chunk.get(key)
        if chunk and len(chunk) < MAX_GROUPS and order[w] < order[chunk[0]] and \
                (bias is None or order[bias] < order[chunk[0]]):
            chunk.append(node)
        else:
            chunk = open_chunk[key] = [node]
            chunks.append(chunk)
    for chunk in chunks:
        parts = [_parts(node) for node in chunk]  # current arguments: an input may be an earlier chunk's output
        weights = [w for _, w, _ in parts]
        biases = [b for _, _, b in parts if b is not None]
        with graph.inserting_before(chunk[0]):
            call = graph.call_function(torch.ops.kvfuse.small_mm.default, (parts[0][0], weights, biases, backend))
            call.meta["val"] = [node.meta["val"] for node in chunk]
            outs = [graph.call_function(operator.getitem, (call, i)) for i in range(len(chunk))]
        for node, out in zip(chunk, outs):  # erased after the insertions (they are placed before chunk[0])
            out.meta["val"] = node.meta["val"]
            wt = node.args[-1]
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            if not wt.users:
                graph.erase_node(wt)
    return sum(map(len, chunks))


try:
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
except ImportError:  # an older torch: compiled forwards keep their matmuls
    CustomGraphPass = None
try:  # a torch whose post-grad hook takes a list of passes
    from torch._inductor.custom_graph_pass import get_custom_graph_passes
except ImportError:
    get_custom_graph_passes = None


if CustomGraphPass is not None:
    class SmallMMPass(CustomGraphPass):
        """Inductor post-grad pass: `rewrite` (the few-row products to `small_mm`)."""

        def __call__(self, graph: torch.fx.Graph) -> None:
            rewrite(graph)

        def uuid(self):
            from kvfuse.triton_kernels import small_mm as kernel
            from kvfuse.triton_kernels._common import interpreting

            # what the pass does depends on its sources and the op's schema, and on the interpreter (CPU
            # products are routed under it only): a graph cached without it must not be reused with it
            return get_hash_for_files((__file__, kernel.__file__, _ops.__file__)), interpreting()
else:
    SmallMMPass = None


def available() -> bool:
    """Whether the pass can be installed (torch has custom inductor passes, and triton is installed)."""
    from kvfuse.dispatch import reasons_for

    return SmallMMPass is not None and not reasons_for("small_mm", "triton")


@contextlib.contextmanager
def compile_pass(enabled: bool = True):
    """While active, inductor compilations route few-row products to `small_mm`, after any post-grad
    pass already configured (``torch._inductor.config.post_grad_custom_post_pass``; with a torch
    whose hook takes one pass only, an already configured pass is left alone and kvfuse's is not
    added). A no-op when disabled or not `available`. It patches inductor's process-wide config for
    its duration: compilations in other threads meanwhile see it too."""
    if not enabled or not available():
        yield
        return
    import torch._inductor.config as cfg

    current = cfg.post_grad_custom_post_pass
    if current is None:
        passes = SmallMMPass()
    elif get_custom_graph_passes is not None:
        passes = (*get_custom_graph_passes(current), SmallMMPass())
    else:
        passes = current
    with cfg.patch(post_grad_custom_post_pass=passes):
        yield


__all__ = ["small_mm", "rewrite", "compile_pass", "available", "SmallMMPass", "MAX_ROWS"]
