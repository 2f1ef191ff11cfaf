"""Compile FlashInfer's JIT modules for the benchmark's baselines in parallel, before they are first used.

FlashInfer 0.5.3 compiles each kernel family on first use (about 70-100 s each: RoPE, the BSR prefill,
the paged decode). One after the other that is 4-5 minutes of a run. `start` generates the JIT specs
of the modules the ``flashinfer`` providers of ``rerotate``, ``prefill`` and ``decode`` will ask for
(same dtypes, head dim, backend) and builds them with FlashInfer's own ``build_jit_specs``: ONE ninja
invocation, which compiles all of them in parallel (several ninja processes in one JIT directory
would share its dependency log, so no threads of separate builds). It runs in a background thread;
`wait` joins it before the first scenario that uses FlashInfer.

Anything unexpected (FlashInfer not importable, an API that differs, a spec that does not match what
a wrapper will ask for, a build error) only costs the parallelism: a module that is not built here is
compiled lazily on first use, as without the warm-up.
"""

from __future__ import annotations

import threading
import time

import torch


class Warmup:
    def __init__(self):
        self.thread: threading.Thread | None = None
        self.names: list[str] = []
        self.error: str | None = None
        self.seconds: float | None = None
        self.t0 = time.perf_counter()

    def wait(self) -> str:
        """Join the build (once); returns a line for the output."""
        if self.thread is None:
            return f"FlashInfer JIT warm-up: not run ({self.error})" if self.error else ""
        self.thread.join()
        self.thread = None
        what = ", ".join(self.names)
        if self.error:
            return (f"FlashInfer JIT warm-up of {what} failed after {self.seconds:.0f} s ({self.error}); "
                    "modules compile on first use")
        return f"FlashInfer JIT warm-up: {what} built in parallel in {self.seconds:.0f} s"


def specs(dtype: torch.dtype, hq: int, hkv: int, head_dim: int, device: torch.device) -> list:
    """The JIT specs of FlashInfer's rope, BSR prefill (128 x 128 blocks) and paged decode modules as
    the benchmark's wrappers request them (see flashinfer/rope.py, sparse.py, decode.py plan())."""
    from flashinfer.jit import gen_batch_decode_module, gen_batch_prefill_module
    from flashinfer.jit.rope import gen_rope_module
    from flashinfer.utils import PosEncodingMode, determine_attention_backend

    none = PosEncodingMode.NONE.value
    out = [gen_rope_module()]
    # BlockSparseAttentionWrapper.plan: tensor cores when R * group >= 4 (always for R = 128)
    backend = determine_attention_backend(device, none, False, False, dtype, dtype)
    out.append(gen_batch_prefill_module(backend, dtype, dtype, dtype, torch.int32, head_dim, head_dim, none,
                                        False, False, False))
    # BatchDecodeWithPagedKVCacheWrapper.plan (no tensor cores), int32 indptr
    out.append(gen_batch_decode_module(dtype, dtype, dtype, torch.int32, head_dim, head_dim, none, False, False))
    return out


def start(dtype: torch.dtype, hq: int, hkv: int, head_dim: int, device: torch.device) -> Warmup:
    w = Warmup()
    try:
        from flashinfer.jit import build_jit_specs

        todo = [s for s in specs(dtype, hq, hkv, head_dim, device) if not s.is_compiled]
    except Exception as e:  # not importable, or an API this code does not know: lazy compiles
        w.error = f"{type(e).__name__}: {str(e).strip()[:200]}"
        return w
    w.names = [s.name for s in todo]
    if not todo:
        return w

    def build():
        try:
            build_jit_specs(todo, verbose=False)
        except Exception as e:
            w.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
        finally:
            w.seconds = time.perf_counter() - w.t0

    w.thread = threading.Thread(target=build, name="flashinfer-jit-warmup", daemon=True)
    w.thread.start()
    return w
