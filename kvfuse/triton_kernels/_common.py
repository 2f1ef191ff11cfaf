"""Small helpers shared by the Triton kernels (launch sizes, interpreter detection)."""

from __future__ import annotations

import functools
import os

import torch
import triton


def interpreting() -> bool:
    """True when kernels run under the Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def elems_per_program(t: torch.Tensor) -> int:
    """Elements of one half-tile a memory-bound program moves: ~16 KB per load on a GPU, small
    under the interpreter so that tests exercise several programs."""
    return 256 if t.device.type == "cpu" else 8192 // max(1, t.element_size() // 2)


def slot_block(n: int, per_slot: int, target: int) -> int:
    """Power-of-two number of slots per program so that ``slots * per_slot`` is about ``target``."""
    bs = max(1, target // per_slot)
    bs = 1 << (bs.bit_length() - 1)
    return max(1, min(bs, triton.next_power_of_2(n)))


@functools.cache
def num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return num_sms(device.index if device.index is not None else torch.cuda.current_device())
