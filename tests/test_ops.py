"""The registered torch.library ops: torch.library.opcheck (schema, fake implementations, autograd
registration, AOT dispatch) on every backend that runs here, and kvfuse.attention under
torch.compile(fullgraph=True)."""

import pytest
import torch

import kvfuse
from kvfuse import Segment, SegmentGraph, _ops
from tests.conftest import device_for, skip_unless_supported

# opcheck's own tests; test_aot_dispatch_dynamic needs a compiler toolchain on CPU, the others do not
OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static")


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
    tm = p.tiles(*meta(64, p.max_q), 9) if meta else None
    tiles = (tm.work_seq, tm.work_qtile, tm.kt_indptr, tm.kt_index, tm.kt_full, tm.block_q, tm.block_k) if tm else \
        tuple(torch.empty(0, dtype=torch.int32, device=dev) for _ in range(4)) + \
        (torch.empty(0, dtype=torch.int8, device=dev), 0, 0)
    args = (q, k, v, bt, p.kv_lens, p.qo_indptr, p.token_seg, p.ancestors, p.q_token, p.token_pos, *tiles, 0.125,
            2.0, 9, backend)
    torch.library.opcheck(_ops.segment_attention_op, args, test_utils=OPCHECK)


def test_opcheck_rerotate_and_compose(backend):
    dev = device_for(backend)
    k = torch.randn(2, 6, 4, 2, 32, device=dev)
    v = torch.randn(2, 6, 4, 2, 32, device=dev)
    skip_unless_supported("rerotate_", backend, k_cache=k, rotary_dim=32, interleaved=False)
    cos, sin, idx = kvfuse.RopeConfig(32).rotation_tables(torch.tensor([3, -7, 3]), device=dev)
    slots = torch.tensor([1, 5, 9], device=dev)
    torch.library.opcheck(_ops.rerotate_op, (k, slots, idx, cos, sin, 32, False, backend), test_utils=OPCHECK)
    dst = torch.tensor([12, 13, 14], device=dev)
    torch.library.opcheck(_ops.compose_copy_op, (k, v, slots, dst, idx, cos, sin, 32, False, backend),
                          test_utils=OPCHECK)


def test_opcheck_merge_states(backend):
    dev = device_for(backend)
    va, vb = torch.randn(2, 5, 3, 16, device=dev).unbind(0)
    sa, sb = torch.randn(2, 5, 3, device=dev).unbind(0)
    skip_unless_supported("merge_states", backend, v=va)
    torch.library.opcheck(_ops.merge_states_op, (va, sa, vb, sb, backend), test_utils=OPCHECK)


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
