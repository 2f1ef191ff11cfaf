"""The tolerances every comparison with the reference uses: the test suite and ``kvfuse-bench --check``.

``TOL[dtype] = (atol, rtol)``, keyed by the storage dtype of the compared output. bf16 keeps 8 bits of
mantissa (eps 2**-8 = 3.9e-3): one rounding of the output gives up to ~4e-3 relative, and the reference
rounds too, so 1.6e-2 leaves room for the few roundings of attention. fp16 has eps 2**-11 (4.9e-4):
2e-3 is a few roundings. float32 results come from float32 arithmetic inside (eps 1.2e-7) on values of
order 1-10, so 1e-5 leaves room for a few roundings.

    >>> import torch
    >>> from kvfuse.testing import TOL
    >>> TOL[torch.bfloat16]
    (0.016, 0.016)
"""

from __future__ import annotations

import torch

TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

__all__ = ["TOL"]
