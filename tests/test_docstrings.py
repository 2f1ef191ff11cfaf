"""Every example in a docstring of the package runs and prints what it says (doctest)."""

import doctest
import importlib
import pkgutil

import pytest

import kvfuse

SKIP = ("kvfuse.bench", "kvfuse.triton_kernels", "kvfuse.backends.cuda", "kvfuse.demo", "kvfuse.fidelity.models")


def _modules():
    for info in pkgutil.walk_packages(kvfuse.__path__, "kvfuse."):
        if not info.name.startswith(SKIP) and info.name != "kvfuse._C":
            yield info.name


@pytest.mark.parametrize("name", sorted(_modules()))
def test_docstring_examples_run(name):
    if name == "kvfuse.integrations.hf":
        pytest.importorskip("transformers")
    mod = importlib.import_module(name)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed"


def test_the_main_modules_have_examples():
    """The operations' modules carry runnable examples (the test above would pass on none)."""
    attempted = 0
    for name in ("kvfuse.rerotate", "kvfuse.compose", "kvfuse.attention", "kvfuse.threads", "kvfuse.memory",
                 "kvfuse.compat", "kvfuse.segments", "kvfuse.rope", "kvfuse.repair"):
        attempted += doctest.testmod(importlib.import_module(name)).attempted
    assert attempted >= 30
