"""The benchmark CLI on tiny CPU shapes: every subcommand runs, outputs have their fields, --check catches
a wrong provider, a failing provider does not abort the run, bad arguments are usage errors."""

import csv
import importlib.util
import json

import pytest
import torch

from kvfuse import bench
from kvfuse.bench import common, report

FAST = ["--rep-ms", "1", "--quiet", "--device", "cpu"]
TINY = {
    "rerotate": ["--pages", "8", "--page-size", "4", "--kv-heads", "2", "--head-dim", "16"],
    "compose": ["--pages", "16", "--page-size", "4", "--kv-heads", "2", "--head-dim", "16", "--threads", "2"],
    "prefill": ["--prefix", "16", "--threads", "2", "--thread-len", "8", "--q-heads", "4", "--kv-heads", "2",
                "--head-dim", "16", "--page-size", "4"],
    "decode": ["--batch", "2", "--context", "32", "--threads", "2", "--q-heads", "4", "--kv-heads", "2",
               "--head-dim", "16", "--page-size", "4"],
    "e2e": ["--layers", "1", "--q-heads", "2", "--kv-heads", "1", "--head-dim", "16", "--context", "32",
            "--threads", "2", "--page-size", "4"],
    "threads": ["--layers", "1", "--q-heads", "2", "--kv-heads", "1", "--head-dim", "16", "--prefix", "18",
                "--steps", "2", "--threads", "1,3", "--page-size", "4"],
    "repair": ["--layers", "2", "--q-heads", "2", "--kv-heads", "1", "--head-dim", "16", "--context", "64",
               "--threads", "3", "--page-size", "4", "--steps", "1"],
    "generate": ["--layers", "1", "--q-heads", "2", "--kv-heads", "1", "--head-dim", "16", "--context", "24",
                 "--steps", "2", "--page-size", "4"],
    "merge": ["--layers", "2", "--kv-heads", "2", "--head-dim", "16", "--prefix", "10", "--threads", "3",
              "--thread-len", "6", "--page-size", "4"],
    "ceilings": [],
}


def _run(tmp_path, *argv):
    out = tmp_path / "r.json"
    rc = bench.main([*argv, *FAST, "--json", str(out)])
    return rc, json.loads(out.read_text())


@pytest.mark.parametrize("scenario", list(TINY))
def test_every_subcommand_runs(tmp_path, capsys, scenario):
    if scenario in ("e2e", "threads", "repair", "generate"):
        pytest.importorskip("transformers")
    rc, data = _run(tmp_path, scenario, "--check", *TINY[scenario])
    if scenario == "generate":  # every path ran and was checked against sdpa
        rows = data["results"]
        assert [r["provider"] for r in rows] == ["sdpa", "sdpa+static", "kvfuse", "kvfuse+static", "kvfuse+graphs",
                                                 "kvfuse+graphs-compiled"]
        assert all(r["status"] == "ok" and (r["checked"] or r["provider"] == "sdpa") for r in rows)
    assert rc == 0
    text = capsys.readouterr().out
    assert "CPU timings" in text and "| provider | ms (median) | p20 | p80 |" in text
    rows = [r for r in data["results"] if r["scenario"] == scenario]
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok, rows
    assert all(r["ms"] > 0 and r["p20"] <= r["ms"] * 1.0001 + 1e-9 for r in ok)
    bad = [(r["provider"], r["status"], r.get("note")) for r in rows if r["status"] not in ("ok", "skipped")]
    assert not bad, bad
    assert all(r["note"] for r in rows if r["status"] == "skipped")  # every skip says why
    if scenario != "ceilings":
        assert any(r["checked"] for r in ok)


def test_json_and_csv_fields(tmp_path):
    js, cs = tmp_path / "a.json", tmp_path / "a.csv"
    rc = bench.main(["rerotate", *TINY["rerotate"], *FAST, "--providers", "torch,triton", "--json", str(js),
                     "--csv", str(cs)])
    assert rc == 0
    data = json.loads(js.read_text())
    for key in ("gpu", "device", "torch", "triton", "git_commit", "date", "ceilings", "argv"):
        assert key in data["meta"]
    assert data["meta"]["cpu_timings"] is True
    torch_row = next(r for r in data["results"] if r["provider"] == "torch")
    assert set(common.FIELDS) <= set(torch_row)
    assert torch_row["unit"] == "TB/s" and torch_row["value"] > 0 and torch_row["speedup"] == pytest.approx(1.0)
    assert torch_row["bytes"] == 2 * 8 * 4 * 2 * 16 * 4  # 2 x K, fp32 on CPU
    triton_row = next(r for r in data["results"] if r["provider"] == "triton")
    assert triton_row["status"] in ("ok", "skipped")
    with open(cs) as f:
        rows = list(csv.DictReader(f))
    assert set(report.CSV_META) | set(common.FIELDS) <= set(rows[0])
    assert {r["provider"] for r in rows} == {"torch", "triton"}
    assert rows[0]["torch"] and rows[0]["date"]


@pytest.mark.parametrize("scenario", ["rerotate", "compose", "prefill", "decode"])
def test_check_catches_a_wrong_provider(tmp_path, scenario):
    rc, data = _run(tmp_path, scenario, "--check", "--providers", "torch,_wrong", *TINY[scenario])
    assert rc == 1
    rows = data["results"]
    wrong = [r for r in rows if r["provider"] == "_wrong"]
    assert wrong and all(r["status"] == "WRONG" and r["ms"] is None for r in wrong)
    assert all(r["status"] == "ok" for r in rows if r["provider"] == "torch")


def test_without_check_the_wrong_provider_is_timed(tmp_path):
    rc, data = _run(tmp_path, "rerotate", "--providers", "torch,_wrong", *TINY["rerotate"])
    assert rc == 0
    assert {r["status"] for r in data["results"]} == {"ok"}


def test_a_failing_provider_does_not_abort(tmp_path, monkeypatch):
    from kvfuse.bench import rerotate

    original = rerotate.providers

    def with_broken(ctx, rope):
        def make(st):
            raise RuntimeError("boom")

        return original(ctx, rope) + [common.Provider("cuda", "broken", make)]

    monkeypatch.setattr(rerotate, "providers", with_broken)
    rc, data = _run(tmp_path, "rerotate", "--providers", "cuda,torch", *TINY["rerotate"])
    assert rc == 0
    broken = next(r for r in data["results"] if r["label"] == "broken")
    assert broken["status"] == "error" and "boom" in broken["note"]
    assert next(r for r in data["results"] if r["provider"] == "torch")["status"] == "ok"


def test_sweep(tmp_path):
    rc, data = _run(tmp_path, "rerotate", "--providers", "torch", "--sweep", "4,8", "--page-size", "4",
                    "--kv-heads", "1", "--head-dim", "16")
    assert rc == 0
    assert sorted(r["x"] for r in data["results"]) == [4, 8]


def test_plot(tmp_path, capsys):
    png = tmp_path / "p.png"
    argv = ["rerotate", "--providers", "torch", "--sweep", "4,8", "--page-size", "4", "--kv-heads", "1",
            "--head-dim", "16", *FAST, "--plot", str(png)]
    if importlib.util.find_spec("matplotlib") is None:
        with pytest.raises(SystemExit) as e:
            bench.main(argv)
        assert e.value.code == 2 and "--plot needs matplotlib" in capsys.readouterr().err
    else:
        assert bench.main(argv) == 0 and png.stat().st_size > 0


def test_plot_series_draws_every_scenario_that_ran():
    """`all --plot`: a panel per scenario with a measured row; lines through the swept sizes (one per series,
    whatever the label says about the size), bars where one size ran."""
    R = common.Result
    rows = [R("ceilings", "copy", "copy", "copy_", "ok", ms=1.0, unit="TB/s", value=4.0),
            R("ceilings", "matmul", "matmul", "matmul", "ok", ms=2.0, unit="TFLOP/s", value=700.0),
            R("rerotate", "c", "torch", "torch", "ok", ms=3.0, unit="TB/s", value=0.2, x=64),
            R("rerotate", "c", "triton", "kvfuse triton", "ok", ms=0.3, unit="TB/s", value=2.0, x=64),
            R("rerotate", "c", "cuda", "kvfuse cuda", "skipped", note="no GPU", x=64),
            R("decode", "c", "cuda", "kvfuse cuda", "skipped", note="no GPU", x=512)]
    for T in (1, 3):
        rows += [R("threads", f"T={T}", "batched", f"batched: {T} rows", "ok", ms=2.0, unit="tok/s", value=T * 500,
                   x=T, series="batched"),
                 R("threads", f"T={T}", "one-by-one", f"one-by-one: {T} calls", "ok", ms=2.0 * T, unit="tok/s",
                   value=500, x=T, series="one-by-one")]
    panels = report.plot_series(rows)
    assert list(panels) == ["ceilings", "rerotate", "threads"]  # decode measured nothing
    assert panels["ceilings"] == {"unit": "rate", "bars": [("copy_", 4.0, "TB/s"), ("matmul", 700.0, "TFLOP/s")]}
    assert panels["rerotate"]["bars"] == [("torch", 0.2, "TB/s"), ("kvfuse triton", 2.0, "TB/s")]
    assert panels["threads"] == {"unit": "tok/s", "lines": {"batched": [(1, 500), (3, 1500)],
                                                            "one-by-one": [(1, 500), (3, 500)]}}


def test_threads_plot_draws_lines(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("transformers")
    png, js = tmp_path / "t.png", tmp_path / "t.json"
    assert bench.main(["threads", *TINY["threads"], *FAST, "--plot", str(png), "--json", str(js)]) == 0
    assert png.stat().st_size > 0
    results = [common.Result(**r) for r in json.loads(js.read_text())["results"]]
    lines = report.plot_series(results)["threads"]["lines"]
    assert set(lines) == {"graphs", "graphs-compiled", "graphs-rows", "batched", "one-by-one"}
    assert all([x for x, _ in p] == [1, 3] for p in lines.values())


@pytest.mark.parametrize("argv, message", [
    ([], "required"),
    (["nope"], "invalid choice"),
    (["rerotate", "--pages", "0"], "positive integer"),
    (["rerotate", "--pages", "x"], "positive integer"),
    (["rerotate", "--providers", "torch,nope"], "unknown provider"),
    (["rerotate", "--dtype", "int8"], "invalid choice"),
    (["all", "--sweep", "1,2"], "--sweep applies to one scenario"),
    (["decode", "--sweep", "1,a"], "comma-separated positive integers"),
    (["prefill", "--prefix", "-1"], "integer >= 0"),
    (["compose", "--threads", "2,4"], "--threads takes one value for 'compose'"),
    (["all", "--threads", "2,4"], "--threads takes one value for 'all'"),
    (["threads", "--threads", "2,x"], "positive integer or a comma list"),
    (["threads", "--steps", "0"], "positive integer"),
], ids=["no-scenario", "bad-scenario", "zero-pages", "text-pages", "bad-provider", "bad-dtype", "sweep-all",
        "bad-sweep", "negative-prefix", "threads-list-compose", "threads-list-all", "bad-threads", "zero-steps"])
def test_bad_arguments_are_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: kvfuse-bench" in err and message in err


def test_help_lists_scenarios(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("rerotate", "compose", "prefill", "decode", "e2e", "threads", "all", "ceilings", "fidelity",
                 "validate"):
        assert name in out


def test_threads_rows_and_check(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    from kvfuse.bench import threads

    monkeypatch.setattr(threads, "PREFILL_CHUNK", 8)  # the 18-token prefix is prefilled in 3 chunks
    rc, data = _run(tmp_path, "threads", "--check", *TINY["threads"])
    assert rc == 0
    rows = data["results"]
    paths = ["graphs", "graphs-compiled", "graphs-rows", "batched", "one-by-one"]
    assert [(r["x"], r["provider"]) for r in rows] == [(x, p) for x in (1, 3) for p in paths]
    for r in rows:
        assert r["status"] == "ok" and r["unit"] == "tok/s" and r["ms"] > 0
        assert r["value"] == pytest.approx(r["x"] * 1000 / r["ms"])
        assert r["baseline"] == f"one-by-one: {r['x']} hf.decode calls of 1 row per step"
    for g, c, a, b, s in (rows[0:5], rows[5:10]):
        for r in (g, c, a, b):
            assert r["checked"] and r["max_err"] < 1e-4  # fp32 on CPU: the paths agree to rounding
            n = r["x"] * (2 + threads.WARMUP_STEPS)
            assert f"greedy tokens equal {n}/{n}, 0 near ties" in r["note"]
            assert r["speedup"] == pytest.approx(s["ms"] / r["ms"])
        assert "vs the same compiled forward run eagerly: logits normwise error 0 " in c["note"]
        assert "vs the uncompiled static plan (not a pass / fail check)" in c["note"]
        assert s["speedup"] == pytest.approx(1.0) and not s["checked"]
    out = capsys.readouterr().out
    assert "### threads: summary (CPU timings)" in out and "| T | graphs ms/step | graphs-compiled ms/step |" in out


def test_threads_check_catches_a_wrong_batched_path(tmp_path):
    pytest.importorskip("transformers")
    argv = [a if a != "1,3" else "2" for a in TINY["threads"]]
    rc, data = _run(tmp_path, "threads", "--check", "--providers", "_wrong", *argv)
    assert rc == 1
    graphs, compiled, apart, batched, single = data["results"]
    for r in (graphs, compiled, apart, batched):
        assert r["status"] == "WRONG" and r["ms"] is None and "not timed" in r["note"]
    assert single["status"] == "ok" and single["ms"] > 0


def test_e2e_takes_a_list_of_thread_counts():
    from kvfuse.bench import e2e

    ap = bench.build_parser()
    args = ap.parse_args(["e2e", "--threads", "2,4,8", "--context", "64", "--device", "cpu"])
    bench._validate(ap, args)
    ctx = common.Ctx(args, torch.device("cpu"))
    assert e2e.default_cases(ctx) == [(32, 2, 16), (32, 4, 8), (32, 8, 4)]
    args = ap.parse_args(["e2e", "--threads", "2,4", "--sweep", "64,128", "--device", "cpu"])
    bench._validate(ap, args)
    ctx = common.Ctx(args, torch.device("cpu"))
    assert e2e.default_cases(ctx) == [(32, 2, 16), (32, 4, 8), (64, 2, 32), (64, 4, 16)]


def test_git_commit_falls_back_to_the_environment(monkeypatch):
    """KVFUSE_GIT_COMMIT wins when set (a copied tree's .git may be stale); git otherwise."""
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(report.subprocess, "run", no_git)
    monkeypatch.delenv("KVFUSE_GIT_COMMIT", raising=False)
    assert report._git_commit() is None
    monkeypatch.setenv("KVFUSE_GIT_COMMIT", "abc1234")
    assert report._git_commit() == "abc1234"
    assert report.environment(torch.device("cpu"))["git_commit"] == "abc1234"

    class NotARepo:
        returncode, stdout = 128, ""

    monkeypatch.setattr(report.subprocess, "run", lambda *a, **k: NotARepo())
    assert report._git_commit() == "abc1234"

    class Repo:
        returncode, stdout = 0, "f00d\n"

    monkeypatch.setattr(report.subprocess, "run", lambda *a, **k: Repo())
    assert report._git_commit() == "abc1234"  # the environment wins over a .git that may be stale
    monkeypatch.delenv("KVFUSE_GIT_COMMIT")
    assert report._git_commit().startswith("f00d")


def test_all_time_limit_skips_scenarios_not_started(tmp_path, monkeypatch, capsys):
    from kvfuse.bench import ceilings

    monkeypatch.setattr(ceilings, "run", lambda ctx: __import__("time").sleep(1.2))
    out, cs = tmp_path / "all.json", tmp_path / "all.csv"
    rc = bench.main(["all", "--time-limit", "1", *FAST, "--json", str(out), "--csv", str(cs)])
    assert rc == 0
    data = json.loads(out.read_text())
    skipped = {r["scenario"]: r for r in data["results"]}
    assert set(skipped) == set(bench.ALL_ORDER) - {"ceilings"}
    assert all(r["status"] == "skipped" and "--time-limit 1 s" in r["note"] for r in skipped.values())
    assert set(data["meta"]["elapsed_s"]) == {"ceilings"} and data["meta"]["total_s"] >= 1
    text = capsys.readouterr().out
    assert "### threads: **skipped**: not started" in text and "wall time per scenario: ceilings" in text
    with pytest.raises(SystemExit):
        bench.main(["rerotate", "--time-limit", "1"])  # an option of `all` only


def test_rows_record_their_wall_time(tmp_path):
    """Each row's wall time covers its setup, check and timing: at least its measured median."""
    rc, data = _run(tmp_path, "rerotate", "--providers", "torch", *TINY["rerotate"])
    ok = [r for r in data["results"] if r["status"] == "ok"]
    # (wall_s is rounded to 0.01 s)
    assert rc == 0 and ok and all(r["wall_s"] is not None and r["wall_s"] + 0.005 >= r["ms"] / 1000 for r in ok)


def test_threads_reuses_the_model_e2e_kept():
    pytest.importorskip("transformers")
    from kvfuse.bench import e2e

    ap = bench.build_parser()
    args = ap.parse_args(["all", "--device", "cpu"])
    bench._validate(ap, args)
    ctx = common.Ctx(args, torch.device("cpu"))
    m1, cfg1 = e2e.build_model(ctx, 1, 2, 1, 16, keep=True)
    m2, cfg2 = e2e.build_model(ctx, 1, 2, 1, 16, attn_implementation="kvfuse")
    assert m2 is m1 and cfg2 is cfg1 and m1.config._attn_implementation == "kvfuse"
    m3, _ = e2e.build_model(ctx, 2, 2, 1, 16)  # another shape: another model
    assert m3 is not m1


def test_e2e_runs_a_list_of_thread_counts(tmp_path):
    pytest.importorskip("transformers")
    argv = list(TINY["e2e"])
    argv[argv.index("--threads") + 1] = "1,2"
    rc, data = _run(tmp_path, "e2e", "--providers", "sdpa,torch", *argv)
    assert rc == 0
    assert len({r["case"] for r in data["results"]}) == 2
    assert all(r["status"] == "ok" for r in data["results"])


def test_flashinfer_warmup_falls_back_to_lazy_compiles(monkeypatch):
    """Without a usable FlashInfer the warm-up reports why and nothing else changes; on CPU it never starts."""
    import sys

    from kvfuse.bench import warmup

    monkeypatch.setitem(sys.modules, "flashinfer", None)  # import fails
    w = warmup.start(torch.bfloat16, 32, 8, 128, torch.device("cpu"))
    assert w.thread is None and "not run" in w.wait()
    ap = bench.build_parser()
    args = ap.parse_args(["all", "--device", "cpu"])
    bench._validate(ap, args)
    assert bench._start_warmup(common.Ctx(args, torch.device("cpu")), bench.ALL_ORDER) is None


def test_validate_calls_every_kernel_once(capsys):
    """`validate --calls` (what compute-sanitizer runs): every small call on the chosen backends, each compared
    with the torch backend; a backend that cannot run here is skipped with the reason."""
    from kvfuse.bench import validate

    assert bench.main(["validate", "--calls", "--backends", "triton,cuda"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in validate.CALLS:
        for backend in ("triton", "cuda"):
            (line,) = [x for x in lines if x.startswith(f"{name} [{backend}]: ")]
            assert line.split(": ", 1)[1].startswith(("ok (max error", "skipped (")), line


def test_validate_catches_a_wrong_kernel(monkeypatch, capsys):
    from kvfuse.bench import validate

    def off_by_one(backend, dev):  # the "kernel" of every backend but torch is off by one
        return torch.ones(3, device=dev) + (backend != "torch")

    monkeypatch.setattr(validate, "CALLS", {"merge_states": off_by_one})
    assert bench.main(["validate", "--calls", "--backends", "triton"]) == 1
    assert "merge_states [triton]: WRONG (max error 1)" in capsys.readouterr().out


@pytest.mark.parametrize("passing", [True, False], ids=["tests-pass", "a-test-fails"])
def test_validate_runs_the_test_suite(tmp_path, capsys, passing):
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_one.py").write_text(f"def test_one():\n    assert {passing}\n")
    logs = tmp_path / "logs"
    rc = bench.main(["validate", "--tests", str(suite), "--workers", "0", "--log-dir", str(logs)])
    out = capsys.readouterr().out
    assert rc == (0 if passing else 1)
    assert ("1 passed" if passing else "1 failed") in (logs / "pytest.log").read_text()
    if not torch.cuda.is_available():
        assert "## compute-sanitizer: skipped (no CUDA GPU)" in out
