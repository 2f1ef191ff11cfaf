"""The ops with check=False read no tensor value: equal to the checked calls, traceable by torch.compile
with fullgraph=True, and (on a GPU) captured in a CUDA graph that replays new tables placed in its inputs."""

import pytest
import torch

import kvfuse
from tests.conftest import TOL, device_for, pool_randn, skip_unless_supported
from tests.test_rerotate import _oracle, _rot64

CFG = kvfuse.RopeConfig(head_dim=64, rotary_dim=32)


def _tol(dtype):
    atol, rtol = TOL[dtype]
    return {"atol": atol, "rtol": rtol}


def _inputs(dev, dtype, n=37, total=96):
    k, v = pool_randn((2, 6, 16, 2, 64), dtype, dev).unbind(0)
    perm = torch.randperm(total, device=dev)
    src, dst = perm[:n], perm[n: 2 * n]
    old = torch.randint(1 << 19, 1 << 20, (n,), device=dev)
    new = old + torch.randint(-(1 << 19), 1 << 19, (n,), device=dev)
    return k.contiguous(), v.contiguous(), src, dst, old, new


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_rerotate_unchecked_equals_checked_and_the_oracle(backend, dtype):
    dev = device_for(backend)
    k, _, slots, _, old, new = _inputs(dev, dtype)
    skip_unless_supported("rerotate_", backend, k_cache=k, rotary_dim=CFG.rotary_dim, interleaved=False)
    a, b = k.clone(), k.clone()
    kvfuse.rerotate_(a, slots, old, new, CFG, backend=backend)
    kvfuse.rerotate_(b, slots, old, new, CFG, backend=backend, check=False)
    torch.testing.assert_close(b, a, **_tol(dtype))
    torch.testing.assert_close(b.double(), _oracle(k, slots, old, new, CFG), **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_copy_rotate_against_the_float64_rotation(backend, dtype):
    dev = device_for(backend)
    k, v, src, dst, old, new = _inputs(dev, dtype)
    skip_unless_supported("compose_copy_", backend, k_cache=k, rotary_dim=CFG.rotary_dim, interleaved=False)
    for check, dst_type in ((True, torch.int64), (False, torch.int64), (True, torch.int32)):
        kk, vv = k.clone(), v.clone()
        kvfuse.copy_rotate_(kk, vv, src, dst.to(dst_type), old, new, CFG, backend=backend, check=check)
        ks, vs = kvfuse.paged.slot_view(k)[0], kvfuse.paged.slot_view(v)[0]
        ang = (new - old).double().cpu()[:, None] * CFG.inv_freq()
        want_k = _rot64(ks[src.long()], ang.to(dev), CFG)
        got_k, got_v = kvfuse.paged.slot_view(kk)[0], kvfuse.paged.slot_view(vv)[0]
        torch.testing.assert_close(got_k[dst.long()].double(), want_k, **_tol(dtype))
        assert torch.equal(got_v[dst.long()], vs[src.long()])
        rest = torch.ones(ks.shape[0], dtype=torch.bool, device=dev)
        rest[dst.long()] = False
        assert torch.equal(got_k[rest], ks[rest]) and torch.equal(got_v[rest], vs[rest])  # nothing else written


def test_copy_rotate_refuses_before_writing():
    k, v, src, dst, old, new = _inputs(torch.device("cpu"), torch.float32)
    before = k.clone(), v.clone()
    bad = [
        (dict(dst_slots=dst[:-1]), "one slot per source slot"),
        (dict(dst_slots=src), "disjoint"),
        (dict(dst_slots=torch.cat([dst[:-1], dst[:1]])), "duplicate"),
        (dict(src_slots=src + 1000), "src_slots must hold slot ids"),
        (dict(new_positions=new[:-1]), "new_positions must have one position per slot"),
        (dict(dst_slots=dst.float()), "dst_slots"),
    ]
    for change, msg in bad:
        args = dict(src_slots=src, dst_slots=dst, old_positions=old, new_positions=new) | change
        with pytest.raises((ValueError, TypeError), match=msg):
            kvfuse.copy_rotate_(k, v, rope=CFG, **args)
        assert torch.equal(k, before[0]) and torch.equal(v, before[1])
    with pytest.raises(ValueError, match="one position per slot"):  # shapes are checked without check too
        kvfuse.rerotate_(k, src, old, new[:-1], CFG, check=False)
    assert torch.equal(k, before[0])


def test_unchecked_refuses_an_unmovable_model_outright():
    rope = kvfuse.ModelRope([CFG, CFG], unmovable="no rotary embedding")
    k = torch.randn(2, 6, 16, 2, 64)
    zero = torch.zeros(3, dtype=torch.long)
    kvfuse.rerotate_(k, torch.arange(3), zero, zero, rope)  # checked: nothing moves, allowed
    with pytest.raises(ValueError, match="no rotary embedding"):
        kvfuse.rerotate_(k, torch.arange(3), zero, zero, rope, check=False)


def test_unchecked_ops_compile_fullgraph():
    k, v, src, dst, old, new = _inputs(torch.device("cpu"), torch.float32)

    def step(k, v, src, dst, old, new):
        kvfuse.rerotate_(k, src, old, new, CFG, check=False, backend="torch")
        kvfuse.copy_rotate_(k, v, src, dst, new, old, CFG, check=False, backend="torch")
        return k, v

    a = step(k.clone(), v.clone(), src, dst, old, new)
    b = torch.compile(step, fullgraph=True, backend="eager")(k.clone(), v.clone(), src, dst, old, new)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_cuda_graph_replays_new_tables():
    """Captured once; the slots and positions placed in its input tensors afterwards are what replays move."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA graphs need a CUDA GPU")
    dev = torch.device("cuda")
    k, v, src, dst, old, new = _inputs(dev, torch.bfloat16)
    ins = [t.clone() for t in (src, dst, old, new)]
    kk, vv = k.clone(), v.clone()
    kvfuse.rerotate_(kk, ins[0], ins[2], ins[3], CFG, check=False)  # compile / autotune before the capture
    kvfuse.copy_rotate_(kk, vv, ins[0], ins[1], ins[2], ins[3], CFG, check=False)
    graph = torch.cuda.CUDAGraph()
    kk, vv = k.clone(), v.clone()
    with torch.cuda.graph(graph):
        kvfuse.rerotate_(kk, ins[0], ins[2], ins[3], CFG, check=False)
        kvfuse.copy_rotate_(kk, vv, ins[0], ins[1], ins[2], ins[3], CFG, check=False)
    for _ in range(3):
        fresh = _inputs(dev, torch.bfloat16)
        for t, f in zip(ins, fresh[2:]):
            t.copy_(f)
        kk.copy_(fresh[0])
        vv.copy_(fresh[1])
        graph.replay()
        a, b = fresh[0].clone(), fresh[1].clone()
        kvfuse.rerotate_(a, *fresh[2:3], *fresh[4:], CFG)
        kvfuse.copy_rotate_(a, b, fresh[2], fresh[3], fresh[4], fresh[5], CFG)
        torch.testing.assert_close(kk, a, **_tol(torch.bfloat16))
        assert torch.equal(vv, b)
