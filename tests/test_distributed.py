"""kvfuse.distributed across processes (torch.multiprocessing spawn, gloo on CPU), each result compared
with the single-process composition (kvfuse.attention / kvfuse.compose, torch backend).

Three groups of processes are started (one per fixture, shared by the tests that read it): a join over
3 ranks, transfers between 2 ranks, and transfers from peers that never send or die. Children write
their results (or their traceback) to files; a child that fails, hangs or exits non-zero fails the test.
"""

import dataclasses
import datetime
import math
import os
import socket
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kvfuse
from kvfuse import distributed as kd
from kvfuse.segments import Segment, SegmentGraph

L, PS, HKV, HQ, D = 3, 4, 2, 4, 16
ROPE = kvfuse.ModelRope((kvfuse.RopeConfig(D), None, kvfuse.RopeConfig(D, theta=1e6)), model="test")  # layer 1: NoPE
PROMPT, THREADS = 6, (5, 7, 3)  # thread i lives on rank i in the join
JOIN_CASES = {"decode": (1, 3, (1, 2)), "prefill": (5, 5, (1, 2)), "partial": (2, 4, (1,))}  # q_len, join len, seen


# ---------------------------------------------------------------------- running ranks
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank, world, port, outdir, scenario, barrier):
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=30))
        result = SCENARIOS[scenario](rank, world)
        if barrier:
            dist.barrier()
        torch.save(result, os.path.join(outdir, f"{rank}.pt"))
    except BaseException:
        with open(os.path.join(outdir, f"{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        os._exit(1)
    os._exit(0)  # no process-group teardown: a peer may be gone on purpose


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _run(scenario: str, world: int, *, barrier: bool = True, timeout: float = 60.0) -> list:
    """Run SCENARIOS[scenario] on ``world`` ranks; their results (None for a rank that wrote none)."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as d:
        port = _free_port()
        procs = [ctx.Process(target=_child, args=(r, world, port, d, scenario, barrier)) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        errors = {r: _read(f) for r in range(world) if os.path.exists(f := os.path.join(d, f"{r}.err"))}
        codes = [p.exitcode for p in procs]
        assert not hung and not errors and codes == [0] * world, \
            f"{scenario}: hung ranks {hung}, exit codes {codes}, errors:\n" + "\n".join(
                f"--- rank {r}:\n{e}" for r, e in errors.items())
        return [torch.load(f, weights_only=True) if os.path.exists(f := os.path.join(d, f"{r}.pt")) else None
                for r in range(world)]


# ---------------------------------------------------------------------- data (alike in every process)
def _kv(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, n, HKV, D, generator=g), torch.randn(L, n, HKV, D, generator=g)


def _q(seed: int, n: int):
    return torch.randn(L, n, HQ, D, generator=torch.Generator().manual_seed(seed))


def _store(num_pages=64, **kw):
    args = {"num_layers": L, "num_pages": num_pages, "page_size": PS, "num_kv_heads": HKV, "head_dim": D,
            "rope": ROPE, **kw}
    return kvfuse.PagedKVStore(**args)


def _prompt(store):
    p = store.sequence("prompt")
    p.append_kv(*_kv(1, PROMPT))
    return p


def _error(e: BaseException) -> tuple[str, str]:
    return type(e).__name__, str(e)


def _snapshot(store, seqs) -> dict:
    return {"k": store.k_cache.clone(), "v": store.v_cache.clone(), "free": list(store._free),
            "refcount": list(store.refcount),
            "seqs": [(list(s.pages), [dataclasses.astuple(x) for x in s.segments]) for s in seqs]}


def _same(a: dict, b: dict) -> dict:
    """Which parts of two snapshots are equal (pools bit for bit, free list in order, counts, sequences)."""
    return {"k": torch.equal(a["k"], b["k"]), "v": torch.equal(a["v"], b["v"]), "free": a["free"] == b["free"],
            "refcount": a["refcount"] == b["refcount"], "seqs": a["seqs"] == b["seqs"]}


def _structure(seq) -> list:
    """Segments without names: (length, parent indices, position or None for pads, pad)."""
    index = {s.name: i for i, s in enumerate(seq.segments)}
    return [(s.length, [index[p] for p in s.parents], None if s.pad else s.position, s.pad) for s in seq.segments]


# ---------------------------------------------------------------------- scenarios (run in the children)
def _join_scenario(rank, world):
    store = _store()
    other = store.sequence("other")
    other.append_kv(*_kv(99, 9))  # pages in use, so that each rank's page ids differ from the reference's
    prompt = _prompt(store)  # every rank holds a copy of the prompt; rank 0 contributes it
    (thread,) = kvfuse.fork(prompt, 1)
    thread.append_kv(*_kv(10 + rank, THREADS[rank]))
    own = thread.segments[-1].name
    out = {}
    for case, (q_len, join_len, seen) in JOIN_CASES.items():
        if rank == 0:
            seq = kvfuse.merge([thread], layout="shared", keep_threads=True)
            seq.append_kv(*_kv(20, join_len))
            bt, p = kd.join_plan(seq, q_len, sees=[prompt.segments[0].name, own], holds_query=True)
        else:
            seq = thread
            bt, p = kd.join_plan(seq, q_len, sees=[own] if rank in seen else [])
        q = _q(30, q_len)
        out[case] = [kd.join_attention(q[i], store.k_cache[i], store.v_cache[i], bt, p, dst=0) for i in range(L)]
        if rank == 0:
            seq.release()
    # ranks whose queries differ in shape: every rank raises, naming q_len
    q = _q(30, 2 if rank == 2 else 1)
    try:
        kd.join_attention(q[0], store.k_cache[0], store.v_cache[0], None, None)
        out["mismatch"] = None
    except ValueError as e:
        out["mismatch"] = _error(e)
    # a rank whose own inputs are bad: it raises its error, the others name it
    bt, p = kd.join_plan(thread, 1, sees=[own])
    try:
        kd.join_attention(_q(30, 1)[0], store.k_cache[0], store.v_cache[0], bt, None if rank == 1 else p)
        out["local_error"] = None
    except ValueError as e:
        out["local_error"] = _error(e)
    return out


def _transfer_scenario(rank, world):
    return _sender() if rank == 0 else _receiver()


def _sender():
    store = _store(num_pages=32)
    t0, t1 = kvfuse.fork(_prompt(store), 2)
    t0.append_kv(*_kv(10, 5))
    t1.append_kv(*_kv(11, 3))
    out = {"t0": t0.gather(), "t0_positions": t0.positions(), "t0_structure": _structure(t0),
           "t1": t1.gather(), "t1_structure": _structure(t1)}
    kd.send_sequence(t0, 1)
    out["t0_live_after_copy"] = not t0.released
    kd.send_sequence(t1, 1, timeout=20.0)
    # the single-process oracle of the move: kvfuse.compose of t1's two real segments to positions 100, 106
    src = [kvfuse.SourceSegment(t1.page_table(), PROMPT, 0, 0), kvfuse.SourceSegment(t1.page_table(), 3, 8, PROMPT)]
    new = [100, 100 + PROMPT]
    dst = store.alloc(kvfuse.pages_needed(src, PS, positions=new))
    c = kvfuse.compose(store.k_cache, store.v_cache, src, store.rope, positions=new, dst_pages=dst, backend="torch")
    out["t1_composed"] = (kvfuse.gather_kv(store.k_cache, c.pages, c.length),
                          kvfuse.gather_kv(store.v_cache, c.pages, c.length))
    store.decref(dst)
    for case in ("bad_rope", "bad_page_size", "bad_dtype", "no_pages", "fault"):
        try:
            kd.send_sequence(t0, 1)
            out[case] = None
        except (ValueError, RuntimeError) as e:
            out[case] = _error(e)
    free = store.num_free
    kd.send_sequence(t0, 1, release=True)
    out["released"] = (t0.released, store.num_free - free)
    kd.send_sequence(store.sequence("empty", position=7), 1)
    return out


def _receiver():
    store = _store(num_pages=32)
    other = store.sequence("other")
    other.append_kv(*_kv(99, 9))
    out = {}
    before = _snapshot(store, [other])
    a = kd.recv_sequence(store, 0)
    out["snapshot_detects_a_transfer"] = _same(before, _snapshot(store, [other]))
    out["a"], out["a_positions"], out["a_structure"] = a.gather(), a.positions(), _structure(a)
    out["a_refcounts"] = [store.refcount[p] for p in a.pages]
    a.append_kv(*_kv(12, 2))  # an ordinary sequence of this store: it grows
    out["a_grown"] = a.num_tokens
    b = kd.recv_sequence(store, 0, position=100, timeout=20.0)
    out["b"], out["b_positions"], out["b_structure"] = b.gather(), b.positions(), _structure(b)
    bad = {"bad_rope": _store(rope=kvfuse.ModelRope(ROPE.layers[:2] + (kvfuse.RopeConfig(D, theta=5e5),), "test")),
           "bad_page_size": _store(page_size=2 * PS), "bad_dtype": _store(dtype=torch.float16),
           "no_pages": _store(num_pages=3)}
    for case, st in bad.items():
        keep = st.sequence("kept")
        keep.append_kv(*_kv(98, 4))
        snap = _snapshot(st, [keep])
        try:
            kd.recv_sequence(st, 0)
            out[case] = None
        except (ValueError, RuntimeError) as e:
            out[case] = _error(e)
        out[case + "_unchanged"] = _same(snap, _snapshot(st, [keep]))

    def fail(*args, **kwargs):
        raise RuntimeError("injected write failure")

    snap = _snapshot(store, [other, a, b])
    store.write_ = fail  # the pages are allocated, then writing them fails: they must go back
    try:
        kd.recv_sequence(store, 0)
        out["fault"] = None
    except RuntimeError as e:
        out["fault"] = _error(e)
    del store.write_
    out["fault_unchanged"] = _same(snap, _snapshot(store, [other, a, b]))
    out["moved"] = kd.recv_sequence(store, 0).gather()
    free = store.num_free
    empty = kd.recv_sequence(store, 0, position=20)
    out["empty"] = (empty.pages, _structure(empty), empty.next_position, store.num_free - free)
    return out


def _dead_peer_scenario(rank, world):
    # rank 0 talks to rank 1 on a group of its own: a gloo timeout closes every link of its group only
    transfers, checks = dist.new_group([0, 1]), dist.new_group([0, 1])
    if rank == 1:  # never sends; waits on the other group until rank 0 gave up
        dist.barrier(group=checks)
        return None
    if rank == 2:  # dies after the headers, before the payload
        store = _store()
        t = _prompt(store)
        real_send = kd._Link.send

        def die(self, tensor, name):
            if name == "K":
                os._exit(0)
            real_send(self, tensor, name)

        kd._Link.send = die
        kd.send_sequence(t, 0)
        raise AssertionError("rank 2 should have died")
    store = _store()
    keep = _prompt(store)
    out = {}
    for case, src, group, timeout in (("dies", 2, None, 20.0), ("never_sends", 1, transfers, 1.0)):
        snap = _snapshot(store, [keep])
        start = time.monotonic()
        try:
            kd.recv_sequence(store, src, group=group, timeout=timeout)
            out[case] = None
        except kd.TransferError as e:
            out[case] = _error(e)
        out[case + "_seconds"] = time.monotonic() - start
        out[case + "_unchanged"] = _same(snap, _snapshot(store, [keep]))
    dist.barrier(group=checks)
    out["other_group_works"] = True
    return out


def _graft_scenario(rank, world):
    """Every rank holds the same prompt. Rank 0 forks a thread, decodes it and sends its own part; rank 1
    grafts it onto its prompt next to a thread of its own and merges the two (fork on one rank, merge
    on another). Then the refusals: a prefix on one side only, prefixes of different structure."""
    store = _store(num_pages=40)
    prompt = _prompt(store)
    out = {}
    if rank == 0:
        t0 = kvfuse.fork(prompt, 1)[0]
        t0.append_kv(*_kv(20, 6))
        free = store.num_free
        kd.send_sequence(t0, 1, after=prompt, timeout=20.0)
        out["sent_pages"] = free - store.num_free
        for case in ("one_sided", "other_prompt"):
            try:
                kd.send_sequence(t0, 1, after=prompt, timeout=20.0)
                out[case] = None
            except (ValueError, RuntimeError) as e:
                out[case] = _error(e)
        other = kvfuse.fork(t0, 1)[0]
        try:
            kd.send_sequence(t0, 1, after=other)  # t0 does not continue `other`: refused locally, nothing sent
        except ValueError as e:
            out["not_a_thread"] = _error(e)
        return out
    t1 = kvfuse.fork(prompt, 1)[0]
    t1.append_kv(*_kv(21, 3))
    before = store.num_free
    got = kd.recv_sequence(store, 0, onto=prompt, timeout=20.0)
    out["received_pages"] = before - store.num_free
    out["prompt_refs"] = [store.refcount[p] for p in prompt.pages]
    merged = kvfuse.merge([got, t1], layout="shared")
    out["merged"], out["structure"] = merged.gather(), _structure(merged)
    # the single-process oracle: both threads forked and merged in one store
    ref = _store(num_pages=40)
    rp = _prompt(ref)
    r0, r1 = kvfuse.fork(rp, 2)
    r0.append_kv(*_kv(20, 6))
    r1.append_kv(*_kv(21, 3))
    rm = kvfuse.merge([r0, r1], layout="shared")
    out["want"], out["want_structure"] = rm.gather(), _structure(rm)
    longer = store.sequence("prompt")
    longer.append_kv(*_kv(1, PROMPT + 1))
    snap = _snapshot(store, [merged, prompt, longer])
    try:
        kd.recv_sequence(store, 0, timeout=20.0)  # the sender names a prefix, this side does not
        out["one_sided"] = None
    except (ValueError, RuntimeError) as e:
        out["one_sided"] = _error(e)
    try:
        kd.recv_sequence(store, 0, onto=longer, timeout=20.0)
        out["other_prompt"] = None
    except (ValueError, RuntimeError) as e:
        out["other_prompt"] = _error(e)
    out["unchanged"] = _same(snap, _snapshot(store, [merged, prompt, longer]))
    return out


SCENARIOS = {"join": _join_scenario, "transfer": _transfer_scenario, "dead_peer": _dead_peer_scenario,
             "graft": _graft_scenario}


# ---------------------------------------------------------------------- single-process oracles
def _join_reference(q_len: int, join_len: int, seen: tuple[int, ...]):
    """kvfuse.attention over all threads in one store (shared layout), the join seeing the prompt,
    thread 0 and the threads in ``seen``."""
    store = _store()
    threads = kvfuse.fork(_prompt(store), len(THREADS))
    for i, t in enumerate(threads):
        t.append_kv(*_kv(10 + i, THREADS[i]))
    hidden = {t.segments[-1].name for i, t in enumerate(threads) if i and i not in seen}
    merged = kvfuse.merge(threads, layout="shared")
    merged.append_kv(*_kv(20, join_len))
    graph = SegmentGraph([Segment(s.name, s.length, tuple(p for p in s.parents if p not in hidden), s.position)
                          for s in merged.graph().segments])
    assert len(graph.segments[-1].parents) == 2 + len(seen)
    plan = kvfuse.plan(kvfuse.AttentionSpec([graph], q_lens=[q_len]))
    q = _q(30, q_len)
    return [kvfuse.attention(q[i], store.k_cache[i], store.v_cache[i], merged.page_table()[None], plan,
                             return_lse=True, backend="torch") for i in range(L)]


# ---------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def join_run():
    return _run("join", 3)


@pytest.fixture(scope="module")
def transfer_run():
    return _run("transfer", 2)


@pytest.fixture(scope="module")
def graft_run():
    return _run("graft", 2)


@pytest.fixture(scope="module")
def dead_run():
    return _run("dead_peer", 3, barrier=False)


@pytest.mark.parametrize("case", list(JOIN_CASES))
def test_join_matches_single_process(join_run, case):
    """decode (1 query), prefill (5 queries, causal in the join) and a join that does not see thread 2
    (rank 2 contributes nothing: LSE -inf, zero output) equal the single-process attention."""
    q_len, join_len, seen = JOIN_CASES[case]
    ref = _join_reference(q_len, join_len, seen)
    wrong = _join_reference(q_len, join_len, (2,) if seen != (2,) else (1,))  # a different thread set
    assert join_run[1][case] == [None] * L and join_run[2][case] == [None] * L  # only dst gets the result
    for layer, ((out, lse), (r_out, r_lse), (w_out, _)) in enumerate(zip(join_run[0][case], ref, wrong)):
        assert out.shape == (q_len, HQ, D) and out.dtype == torch.float32, layer
        assert lse.shape == (q_len, HQ) and lse.dtype == torch.float32 and bool(torch.isfinite(lse).all()), layer
        torch.testing.assert_close(out, r_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, r_lse, atol=1e-5, rtol=1e-5)
        assert (out - w_out).abs().max() > 1e-2, "the comparison cannot tell thread sets apart"


def test_join_mismatched_queries_raise_on_every_rank(join_run):
    for rank, res in enumerate(join_run):
        assert res["mismatch"] is not None and res["mismatch"][0] == "ValueError", rank
        assert "q_len" in res["mismatch"][1] and "{0: 1, 1: 1, 2: 2}" in res["mismatch"][1], res["mismatch"]


def test_join_local_error_raises_on_every_rank(join_run):
    assert "give both block_table and plan" in join_run[1]["local_error"][1]
    for rank in (0, 2):
        assert join_run[rank]["local_error"] == ("ValueError", "join_attention: rank(s) [1] rejected their inputs "
                                                               "(see the error there)")


def test_transfer_copy_is_bit_exact(transfer_run):
    snd, rcv = transfer_run
    assert snd["t0_live_after_copy"]
    assert not all(rcv["snapshot_detects_a_transfer"].values())  # the store-unchanged check can fail
    for got, want in zip(rcv["a"], snd["t0"]):
        assert torch.equal(got, want)
    assert torch.equal(rcv["a_positions"], snd["t0_positions"])
    assert rcv["a_structure"] == snd["t0_structure"] == [(PROMPT, [], 0, False), (2, [], None, True),
                                                        (5, [0], PROMPT, False)]
    assert rcv["a_refcounts"] == [1] * 4 and rcv["a_grown"] == PROMPT + 5 + 2


def test_transfer_with_rerotation_matches_compose(transfer_run):
    snd, rcv = transfer_run
    (k, v), (ck, cv), (k_before, v_before) = rcv["b"], snd["t1_composed"], snd["t1"]
    assert torch.equal(k, ck) and torch.equal(v, cv)
    assert torch.equal(v, v_before)  # values do not move
    assert torch.equal(k[1], k_before[1])  # layer 1 is NoPE: its keys do not rotate
    assert (k[0] - k_before[0]).abs().max() > 0.1 and (k[2] - k_before[2]).abs().max() > 1e-3
    assert rcv["b_positions"].tolist() == list(range(100, 100 + PROMPT + 3))
    assert [s[2] for s in rcv["b_structure"]] == [100, None, 100 + PROMPT]


@pytest.mark.parametrize("case,cls,field", [("bad_rope", "ValueError", "rope.layers[2].theta"),
                                            ("bad_page_size", "ValueError", "page_size"),
                                            ("bad_dtype", "ValueError", "dtype"),
                                            ("no_pages", "OutOfPages", "free pages")])
def test_transfer_mismatch_raises_on_both_ranks_and_changes_nothing(transfer_run, case, cls, field):
    snd, rcv = transfer_run
    for role, res in (("sender", snd), ("receiver", rcv)):
        assert res[case] is not None and res[case][0] == cls, (role, res[case])
        assert field in res[case][1] and "nothing was transferred" in res[case][1], (role, res[case])
    assert snd[case][1].split(": ", 1)[1] == rcv[case][1].split(": ", 1)[1]  # the same verdict on both
    assert all(rcv[case + "_unchanged"].values()), rcv[case + "_unchanged"]


def test_transfer_failed_write_returns_the_pages(transfer_run):
    snd, rcv = transfer_run
    assert rcv["fault"] == ("RuntimeError", "injected write failure")
    assert snd["fault"][0] == "TransferError" and "failed to store the sequence" in snd["fault"][1]
    assert all(rcv["fault_unchanged"].values()), rcv["fault_unchanged"]


def test_transfer_release_moves_the_sequence(transfer_run):
    snd, rcv = transfer_run
    assert snd["released"] == (True, 2)  # t0's own 2 pages are free again (the prompt's stay with t1)
    for got, want in zip(rcv["moved"], snd["t0"]):
        assert torch.equal(got, want)


def test_transfer_of_an_empty_sequence(transfer_run):
    assert transfer_run[1]["empty"] == ([], [(0, [], 20, False)], 20, 0)


@pytest.mark.parametrize("case", ["never_sends", "dies"])
def test_dead_peer_gives_a_clear_error_and_changes_nothing(dead_run, case):
    res = dead_run[0]
    assert res[case] is not None and res[case][0] == "TransferError", res[case]
    assert "did not get through" in res[case][1] and "the store is unchanged" in res[case][1], res[case]
    assert all(res[case + "_unchanged"].values()), res[case + "_unchanged"]
    if case == "never_sends":
        assert "the sender's header" in res[case][1] and "1 s" in res[case][1]
        assert 0.9 < res[case + "_seconds"] < 10
        assert dead_run[0]["other_group_works"]  # the timeout closed the transfer group's links only
    else:
        assert "K did not get through" in res[case][1]  # it died after the headers, before the payload


# ---------------------------------------------------------------------- in one process
def test_merge_states_ignores_an_empty_side():
    v = torch.randn(3, HQ, D)
    s = torch.randn(3, HQ)
    empty_v, empty_s = torch.zeros(3, HQ, D), torch.full((3, HQ), -math.inf)
    for got_v, got_s in (kvfuse.merge_states(v, s, empty_v, empty_s, backend="torch"),
                         kvfuse.merge_states(empty_v, empty_s, v, s, backend="torch")):
        torch.testing.assert_close(got_v, v, atol=0, rtol=1e-6)
        torch.testing.assert_close(got_s, s, atol=0, rtol=1e-6)
    both_v, both_s = kvfuse.merge_states(empty_v, empty_s, empty_v, empty_s, backend="torch")
    assert torch.equal(both_v, empty_v) and torch.equal(both_s, empty_s)


def test_join_plan_partition_equals_one_store():
    """join_plan's local plans, merged in one process (what join_attention does without the transport)."""
    q_len, join_len, seen = JOIN_CASES["prefill"]
    parts = []
    for rank in range(len(THREADS)):
        store = _store()
        prompt = _prompt(store)
        (t,) = kvfuse.fork(prompt, 1)
        t.append_kv(*_kv(10 + rank, THREADS[rank]))
        own = t.segments[-1].name
        if rank == 0:
            t = kvfuse.merge([t], layout="shared")
            t.append_kv(*_kv(20, join_len))
            bt, p = kd.join_plan(t, q_len, sees=[prompt.segments[0].name, own], holds_query=True)
        else:
            bt, p = kd.join_plan(t, q_len, sees=[own])
        parts.append(kvfuse.attention(_q(30, q_len)[0], store.k_cache[0], store.v_cache[0], bt, p, return_lse=True))
    out, lse = parts[0]
    for o, s in parts[1:]:
        out, lse = kvfuse.merge_states(out, lse, o, s)
    r_out, r_lse = _join_reference(q_len, join_len, seen)[0]
    torch.testing.assert_close(out, r_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, r_lse, atol=1e-5, rtol=1e-5)


def test_join_plan_validates_names():
    store = _store()
    (t,) = kvfuse.fork(_prompt(store), 1)
    t.append_kv(*_kv(10, 3))
    names = [s.name for s in t.segments]
    with pytest.raises(ValueError, match="not a \\(non-pad\\) segment"):
        kd.join_plan(t, 1, sees=["nope"])
    with pytest.raises(ValueError, match="not a \\(non-pad\\) segment"):
        kd.join_plan(t, 1, sees=[names[1]])  # the pad
    with pytest.raises(ValueError, match="the query segment"):
        kd.join_plan(t, 1, sees=[names[2]], holds_query=True)
    with pytest.raises(ValueError, match="fewer than q_len=4"):
        kd.join_plan(t, 4, sees=[names[0]], holds_query=True)
    with pytest.raises(TypeError, match="list of segment names"):
        kd.join_plan(t, 1, sees=names[0])
    assert kd.join_plan(t, 1, sees=[]) == (None, None)


def test_without_a_process_group_the_error_says_so():
    store = _store()
    with pytest.raises(RuntimeError, match="init_process_group"):
        kd.send_sequence(_prompt(store), 1)
    with pytest.raises(RuntimeError, match="init_process_group"):
        kd.recv_sequence(store, 0)


def test_fork_on_one_rank_merge_on_another(graft_run):
    """The thread forked and decoded on rank 0, sent as its own part only, grafted onto rank 1's copy of
    the prompt and merged with rank 1's own thread: bit-identical to forking and merging in one store."""
    snd, rcv = graft_run
    assert snd["sent_pages"] == 0 and rcv["received_pages"] == 2  # its own pages only, not the prompt's
    assert rcv["structure"] == rcv["want_structure"]
    for got, want in zip(rcv["merged"], rcv["want"]):
        assert torch.equal(got, want)


@pytest.mark.parametrize("case,message", [("one_sided", "one side names a prefix"),
                                          ("other_prompt", "the prefixes differ")])
def test_graft_refusals_on_both_ranks(graft_run, case, message):
    snd, rcv = graft_run
    for res in (snd, rcv):
        assert res[case] is not None and res[case][0] == "ValueError" and message in res[case][1], res[case]
    assert all(rcv["unchanged"].values()), rcv["unchanged"]


def test_graft_needs_a_thread_of_the_prefix(graft_run):
    assert graft_run[0]["not_a_thread"][0] == "ValueError" and "does not continue" in graft_run[0]["not_a_thread"][1]
