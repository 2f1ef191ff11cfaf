"""Reference RoPE: rotate vectors by angles, and apply a model's rotation at given positions."""

from __future__ import annotations

import torch

from kvfuse.rope import RopeConfig


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, interleaved: bool) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` dims of every head. Returns float32.

    x: ``[..., H, D]``; cos/sin: ``[..., rotary_dim // 2]`` (broadcast over heads).
    NeoX pairs are ``(i, i + rotary_dim/2)``; interleaved (GPT-J) pairs are ``(2i, 2i+1)``.
    """
    x = x.float()
    c, s = cos.float()[..., None, :], sin.float()[..., None, :]
    if interleaved:
        x1, x2 = x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2]
        rot = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    else:
        h = rotary_dim // 2
        x1, x2 = x[..., :h], x[..., h:rotary_dim]
        rot = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return torch.cat((rot, x[..., rotary_dim:]), dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, cfg: RopeConfig) -> torch.Tensor:
    """The model's rotation of ``x`` (``[..., H, D]``) at integer ``positions`` (shape ``x.shape[:-2]``),
    including YaRN's attention factor. Angles in float64, products in float32; returns x.dtype."""
    ang = positions.to(torch.float64).cpu()[..., None] * cfg.inv_freq()
    scale = cfg.attention_scaling
    cos = (torch.cos(ang) * scale).float().to(x.device)
    sin = (torch.sin(ang) * scale).float().to(x.device)
    return rotate(x, cos, sin, cfg.rotary_dim, cfg.interleaved).to(x.dtype)
