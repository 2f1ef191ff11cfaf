"""Every missing optional dependency fails with the command that installs it (each import is blocked by a
``None`` entry in ``sys.modules``, which makes importing it raise ImportError)."""

import json
import os
import subprocess
import sys

import pytest
import torch

import kvfuse
from kvfuse import bench, memory
from kvfuse.bench import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _store_with_a_sequence():
    store = kvfuse.PagedKVStore(num_layers=1, num_pages=4, page_size=4, num_kv_heads=1, head_dim=8,
                                rope=kvfuse.RopeConfig(head_dim=8))
    seq = store.sequence()
    seq.append_kv(torch.randn(1, 3, 1, 8), torch.randn(1, 3, 1, 8))
    return seq


def test_memory_blocks_need_safetensors(monkeypatch, tmp_path):
    seq = _store_with_a_sequence()
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    path = str(tmp_path / "block.safetensors")
    with pytest.raises(ImportError, match=r"kvfuse.memory.save needs safetensors .*: pip install safetensors$"):
        memory.save(path, seq, identity="m")
    with pytest.raises(ImportError, match=r"kvfuse.memory.load needs safetensors .*: pip install safetensors$"):
        memory.load(path)


def test_checkpoints_and_demo_need_transformers(monkeypatch, tmp_path):
    from kvfuse import checkpoints, demo

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"load_llama2c needs transformers .*: pip install 'kvfuse\[hf\]'$"):
        checkpoints.load_llama2c(str(tmp_path / "missing.bin"))
    with pytest.raises(ImportError, match=r"kvfuse.demo needs transformers .*: pip install 'kvfuse\[hf\]'$"):
        demo.main([])


@pytest.mark.parametrize("module, hint", [("flashinfer", "pip install flashinfer-python"),
                                          ("flash_attn", "pip install flash-attn --no-build-isolation")])
def test_bench_providers_say_how_to_install_them(monkeypatch, module, hint):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(common.Skip, match=f"{module} is not importable .*{hint}"):
        common.need_module(module)


WITHOUT_TRANSFORMERS = """
import json, sys
sys.modules["transformers"] = None
from kvfuse import bench
rc = bench.main(["e2e", "--device", "cpu", "--quiet", "--rep-ms", "1", "--json", sys.argv[1]])
print("e2e", rc, json.dumps(json.load(open(sys.argv[1]))["results"]))
try:
    bench.main(["fidelity", "--device", "cpu"])
except SystemExit as e:
    print("fidelity", e.code)
"""


def test_bench_runs_without_transformers(tmp_path):
    """The CLI builds its parser without transformers; e2e is skipped and fidelity refused, both with the
    hint (a fresh process: this one has transformers and kvfuse.integrations.hf imported)."""
    r = subprocess.run([sys.executable, "-c", WITHOUT_TRANSFORMERS, str(tmp_path / "e2e.json")], cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = {line.split(" ", 1)[0]: line.split(" ", 2)[1:] for line in r.stdout.splitlines()
             if line.startswith(("e2e ", "fidelity "))}
    rc, rows = lines["e2e"]
    assert rc == "1"  # nothing was measured
    (row,) = json.loads(rows)
    assert row["status"] == "skipped" and "pip install 'kvfuse[hf]'" in row["note"]
    assert lines["fidelity"] == ["2"]
    assert "kvfuse-bench fidelity: error: " in r.stderr and "pip install 'kvfuse[hf]'" in r.stderr


def test_plot_needs_matplotlib(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as e:
        bench.main(["rerotate", "--device", "cpu", "--plot", "p.png"])
    assert e.value.code == 2 and "--plot needs matplotlib (pip install matplotlib)" in capsys.readouterr().err
