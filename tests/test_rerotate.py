"""rerotate_: values against the float64 oracle, untouched bytes, aliasing, and rejected inputs."""

import pytest
import torch

import kvfuse
from kvfuse.reference import apply_rope
from tests.conftest import TOL, device_for, pool_randn, skip_unless_supported

CFGS = {
    "neox": dict(head_dim=64),
    "interleaved": dict(head_dim=64, interleaved=True),
    "partial": dict(head_dim=64, rotary_dim=16),
    "yarn": dict(head_dim=64, rope_type="yarn", factor=4.0, original_max_position_embeddings=512),
    "d128": dict(head_dim=128, theta=5e5),
    "d256": dict(head_dim=256),
}


def _oracle(k, slots, old, new, cfg):
    """float64 rotation of every listed slot by (new - old)."""
    out = k.double().clone()
    view = kvfuse.paged.slot_view(out)
    ang = (new - old).double().cpu()[:, None] * cfg.inv_freq()
    view[:, slots.long()] = _rot64(view[:, slots.long()], ang.to(k.device), cfg)
    return out


def _rot64(x, ang, cfg):
    c, s = torch.cos(ang)[..., None, :], torch.sin(ang)[..., None, :]
    r = cfg.rotary_dim
    x = x.double()
    if cfg.interleaved:
        x1, x2 = x[..., 0:r:2], x[..., 1:r:2]
        rot = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), -1).flatten(-2)
    else:
        x1, x2 = x[..., : r // 2], x[..., r // 2: r]
        rot = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)
    return torch.cat((rot, x[..., r:]), -1)


@pytest.mark.parametrize("cfg_name", list(CFGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("page_size,num_pages,heads,layers", [
    (16, 6, 2, None), (1, 40, 1, None), (5, 9, 3, None), (16, 4, 2, 3)],
    ids=["ps16", "ps1-1head", "ps5-3heads", "stacked3"])
def test_rerotate_values_and_untouched(backend, cfg_name, dtype, page_size, num_pages, heads, layers):
    dev = device_for(backend)
    cfg = kvfuse.RopeConfig(**CFGS[cfg_name])
    shape = (num_pages, page_size, heads, cfg.head_dim)
    if layers:
        shape = (layers,) + shape
    k = pool_randn(shape, dtype, dev)
    skip_unless_supported("rerotate_", backend, k_cache=k, rotary_dim=cfg.rotary_dim, interleaved=cfg.interleaved)
    total = num_pages * page_size
    n = max(1, total // 2 - 1)  # a partly filled last page, odd counts
    slots = torch.randperm(total, device=dev)[:n]
    old = torch.randint(0, 1 << 20, (n,), device=dev)
    new = old + torch.randint(-(1 << 19), 1 << 19, (n,), device=dev)
    new[0] = 2**31 - 1  # position near the int32 limit
    new = new.clamp(min=0)
    want = _oracle(k, slots, old, new, cfg)
    before = k.clone()
    out = kvfuse.rerotate_(k, slots, old, new, cfg, backend=backend)
    assert out is k
    atol, rtol = TOL[dtype]
    view, wview = kvfuse.paged.slot_view(k), kvfuse.paged.slot_view(want)
    torch.testing.assert_close(view[:, slots.long()].double(), wview[:, slots.long()], atol=atol, rtol=rtol)
    untouched = torch.ones(total, dtype=torch.bool, device=dev)
    untouched[slots.long()] = False
    bview = kvfuse.paged.slot_view(before)
    assert torch.equal(view[:, untouched], bview[:, untouched]), "bytes outside the slots changed"


def test_rerotate_positions_near_1m_roundtrip(backend):
    dev = device_for(backend)
    cfg = kvfuse.RopeConfig(head_dim=64, theta=1e4)
    x = torch.randn(64, 2, 64, dtype=torch.float64, device=dev)
    p = torch.arange(64, device=dev) + 1_000_000
    k = apply_rope(x, p, cfg).float().reshape(4, 16, 2, 64).contiguous()
    skip_unless_supported("rerotate_", backend, k_cache=k, rotary_dim=64, interleaved=False)
    slots = torch.arange(64, device=dev)
    kvfuse.rerotate_(k, slots, p, p + 12345, cfg, backend=backend)
    torch.testing.assert_close(k.reshape(64, 2, 64).double(), apply_rope(x, p + 12345, cfg).double(),
                               atol=1e-4, rtol=1e-4)
    for _ in range(20):  # repeated moves do not drift
        kvfuse.rerotate_(k, slots, p + 12345, p + 777, cfg, backend=backend)
        kvfuse.rerotate_(k, slots, p + 777, p + 12345, cfg, backend=backend)
    torch.testing.assert_close(k.reshape(64, 2, 64).double(), apply_rope(x, p + 12345, cfg).double(),
                               atol=2e-4, rtol=2e-4)


def test_rerotate_empty_is_noop():
    k = torch.randn(2, 4, 1, 16)
    before = k.clone()
    e = torch.empty(0, dtype=torch.int64)
    kvfuse.rerotate_(k, e, e, e, kvfuse.RopeConfig(head_dim=16))
    assert torch.equal(k, before)


def _bad_inputs():
    cfg = kvfuse.RopeConfig(head_dim=16)
    ok = dict(slots=torch.tensor([0, 5, 9]), old_positions=torch.tensor([0, 1, 2]),
              new_positions=torch.tensor([5, 6, 7]), rope=cfg)
    yield "slot out of range", dict(ok, slots=torch.tensor([0, 5, 32])), ValueError, "slots"
    yield "negative slot", dict(ok, slots=torch.tensor([0, -1, 3])), ValueError, "slots"
    yield "duplicate slots", dict(ok, slots=torch.tensor([1, 1, 3])), ValueError, "duplicate"
    yield "float slots", dict(ok, slots=torch.tensor([0.0, 1.0, 2.0])), TypeError, "slots"
    yield "2-D slots", dict(ok, slots=torch.tensor([[0, 1, 2]])), ValueError, "slots"
    yield "length mismatch", dict(ok, new_positions=torch.tensor([1, 2])), ValueError, "new_positions"
    yield "negative position", dict(ok, old_positions=torch.tensor([0, -4, 1])), ValueError, "old_positions"
    yield "position overflow", dict(ok, new_positions=torch.tensor([0, 2**31, 1])), ValueError, "new_positions"
    yield "head_dim mismatch", dict(ok, rope=kvfuse.RopeConfig(head_dim=32)), ValueError, "head_dim"
    yield "not a RopeConfig", dict(ok, rope={"theta": 1e4}), TypeError, "RopeConfig"


@pytest.mark.parametrize("name,kw,exc,match", list(_bad_inputs()), ids=[x[0] for x in _bad_inputs()])
def test_rerotate_rejects_and_leaves_pool_identical(name, kw, exc, match):
    k = torch.randn(4, 8, 2, 16)
    before = k.clone()
    with pytest.raises(exc, match=match):
        kvfuse.rerotate_(k, kw["slots"], kw["old_positions"], kw["new_positions"], kw["rope"])
    assert torch.equal(k, before)


def test_rerotate_rejects_bad_cache():
    cfg = kvfuse.RopeConfig(head_dim=16)
    s = torch.tensor([0])
    with pytest.raises(ValueError, match="k_cache"):
        kvfuse.rerotate_(torch.randn(8, 16), s, s, s, cfg)
    with pytest.raises(TypeError, match="k_cache"):
        kvfuse.rerotate_(torch.randint(0, 3, (2, 4, 1, 16)), s, s, s, cfg)
    with pytest.raises(ValueError, match="contiguous"):
        kvfuse.rerotate_(torch.randn(2, 4, 16, 2).transpose(2, 3), s, s, s, cfg)
