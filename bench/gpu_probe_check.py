"""Does a failed argument check inside kvfuse._C raise a Python error (ValueError) on this machine?

(TORCH_CHECK's ostream formatting of numbers crashed the process on the H200 image; the extension's
checks now build their messages without ostreams: see csrc/torch_utils.h.)

    python3 bench/gpu_probe_check.py          # prints 'raised ValueError: ...' for each probe, or crashes
"""

import kvfuse._C as C
import torch

dev = torch.device("cuda", 0)
k = torch.randn(4, 16, 2, 64, device=dev, dtype=torch.bfloat16)
v = torch.randn_like(k)
slots = torch.arange(8, device=dev, dtype=torch.int32)
idx = torch.zeros(8, device=dev, dtype=torch.int32)
cos = torch.ones(1, 16, device=dev)  # wrong width: rotary_dim 64 needs 32 columns
sin = torch.zeros(1, 16, device=dev)
probes = {
    "rerotate_ wrong table width": lambda: C.rerotate_(k, slots, idx, cos, sin, 64, False),
    "compose_copy_ wrong table width": lambda: C.compose_copy_(k, v, slots, slots + 8, idx, cos, sin, 64, False),
    "rerotate_ cpu slots": lambda: C.rerotate_(k, slots.cpu(), idx, cos, sin, 64, False),
}
for name, fn in probes.items():
    try:
        fn()
        print(f"{name}: NO ERROR (unexpected)", flush=True)
    except (ValueError, RuntimeError) as e:
        print(f"{name}: raised {type(e).__name__}: {str(e).splitlines()[0]}", flush=True)
print("probe done")
