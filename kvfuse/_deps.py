"""Optional dependencies: import one, or fail saying how to install it."""

from __future__ import annotations

import importlib

INSTALL = {
    "transformers": "pip install 'kvfuse[hf]'",
    "safetensors": "pip install safetensors",
    "triton": "pip install 'kvfuse[triton]'",
    "matplotlib": "pip install matplotlib",
    "flashinfer": "pip install flashinfer-python",
    "flash_attn": "pip install flash-attn --no-build-isolation",
}


def require(module: str, needed_by: str):
    """``module`` imported, or ImportError naming what needs it and the command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{needed_by} needs {module.split('.')[0]} ({e}): {install_hint(module)}") from e


def install_hint(module: str) -> str:
    top = module.split(".")[0]
    return INSTALL.get(top, f"pip install {top}")
