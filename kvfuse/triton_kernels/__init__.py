"""Triton kernels of kvfuse (installed as ``kvfuse.triton_kernels``)."""
