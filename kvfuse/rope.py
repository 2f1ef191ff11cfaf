"""RoPE configuration shared by every backend.

`RopeConfig` describes how a model rotated its keys: which dimensions rotate (``rotary_dim``), how
pairs are formed (NeoX "rotate-half" or GPT-J "interleaved"), the base ``theta`` and the frequency
scaling (none / linear / llama3 / YaRN). It produces the inverse frequencies and, for re-rotation, the
small cos/sin tables of a rotation by a position *difference*.

Angles are always computed in float64 from integer position differences, so moving keys by up to
millions of positions loses no accuracy and repeated moves do not drift. The inverse frequencies
themselves are by default rounded to float32 exactly as Hugging Face models compute them, because
those are the frequencies the cached keys were actually rotated with (``inv_freq_dtype="float64"``
gives the exact values instead).

YaRN's attention factor (``attention_scaling``) multiplies cos/sin in the model's *original* rotation.
A re-rotation is a pure rotation R(delta) and never applies it again.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable
from typing import Any

import torch

MAX_POSITION = 2**31 - 1  # positions are int32-representable everywhere (kernels, HF position_ids)


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """How keys were rotated.

    Args:
        head_dim: size of one attention head.
        rotary_dim: leading dimensions of each head that rotate (even, <= head_dim); the rest pass
            through. ``None`` means ``head_dim``.
        theta: RoPE base.
        interleaved: ``False`` for NeoX / Llama "rotate-half" pairs ``(i, i + rotary_dim/2)``,
            ``True`` for GPT-J pairs ``(2i, 2i+1)``.
        rope_type: "default", "linear", "llama3" or "yarn".
        factor: scaling factor (linear, llama3, yarn).
        low_freq_factor, high_freq_factor: llama3 parameters.
        original_max_position_embeddings: llama3 / yarn pre-training context.
        beta_fast, beta_slow, truncate: yarn ramp parameters.
        attention_factor: yarn's cos/sin multiplier; ``None`` derives it from ``factor`` and
            ``mscale``/``mscale_all_dim`` as Hugging Face does.
        inv_freq_dtype: "float32" reproduces the float32 frequency table of Hugging Face models
            bit for bit; "float64" computes it exactly.
        inv_freq_values: the frequencies themselves, overriding the formula (``from_hf_model`` reads
            them off a loaded model, whose buffer may have been rounded, e.g. by ``model.to(bf16)``).

    Every field is type-checked: a wrongly typed value (``theta="1e4"``, ``head_dim=64.0``,
    ``interleaved=1``) raises ``TypeError`` naming the field; a value out of range raises ``ValueError``.
    Numbers are stored as Python ``int`` / ``float`` (numpy scalars are accepted).

    Example:
        >>> cfg = RopeConfig(head_dim=128, theta=500000.0)
        >>> cfg.inv_freq().shape
        torch.Size([64])
    """

    head_dim: int
    rotary_dim: int | None = None
    theta: float = 10000.0
    interleaved: bool = False
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    inv_freq_dtype: str = "float32"
    inv_freq_values: tuple[float, ...] | None = None

    def __post_init__(self):
        _set_int(self, "head_dim")
        if self.rotary_dim is None:
            object.__setattr__(self, "rotary_dim", self.head_dim)
        _set_int(self, "rotary_dim")
        rd = self.rotary_dim
        if rd % 2 or rd > self.head_dim:
            raise ValueError(
                f"RopeConfig.rotary_dim must be an even int in [2, head_dim={self.head_dim}], got {rd!r}"
            )
        for name in ("theta", "factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow"):
            _set_float(self, name)
        for name in ("attention_factor", "mscale", "mscale_all_dim"):
            if getattr(self, name) is not None:
                _set_float(self, name)
        for name in ("interleaved", "truncate"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"RopeConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.rope_type, str) or self.rope_type not in ROPE_TYPES:
            raise ValueError(f"RopeConfig.rope_type must be one of {ROPE_TYPES}, got {self.rope_type!r}")
        if not self.theta > 0:
            raise ValueError(f"RopeConfig.theta must be > 0, got {self.theta!r}")
        if self.rope_type != "default" and not self.factor > 0:
            raise ValueError(f"RopeConfig.factor must be > 0 for rope_type={self.rope_type!r}, got {self.factor!r}")
        omax = self.original_max_position_embeddings
        if omax is not None:
            _set_int(self, "original_max_position_embeddings")
        elif self.rope_type in ("llama3", "yarn"):
            raise ValueError(
                f"RopeConfig.original_max_position_embeddings is required for rope_type={self.rope_type!r}"
            )
        if self.rope_type == "llama3" and self.high_freq_factor == self.low_freq_factor:
            raise ValueError(f"RopeConfig.high_freq_factor must differ from low_freq_factor for rope_type='llama3' "
                             f"(both {self.low_freq_factor})")
        if not isinstance(self.inv_freq_dtype, str) or self.inv_freq_dtype not in ("float32", "float64"):
            raise ValueError(f"RopeConfig.inv_freq_dtype must be 'float32' or 'float64', got {self.inv_freq_dtype!r}")
        if self.inv_freq_values is not None:
            vals = self.inv_freq_values
            if isinstance(vals, torch.Tensor):
                vals = vals.detach().double().cpu().reshape(-1).tolist()
            if isinstance(vals, (str, bytes)) or not hasattr(vals, "__len__"):
                raise TypeError(f"RopeConfig.inv_freq_values must be a sequence of floats or None, got {vals!r}")
            if any(isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x) for x in vals):
                raise TypeError("RopeConfig.inv_freq_values must hold finite real numbers")
            vals = tuple(float(x) for x in vals)
            if len(vals) != rd // 2:
                raise ValueError(f"RopeConfig.inv_freq_values must hold rotary_dim // 2 = {rd // 2} values, "
                                 f"got {len(vals)}")
            object.__setattr__(self, "inv_freq_values", vals)

    # ------------------------------------------------------------------ frequencies
    def inv_freq(self) -> torch.Tensor:
        """Inverse frequencies, float64 tensor of shape ``[rotary_dim // 2]`` (on the CPU, a copy)."""
        return _inv_freq_cached(self).clone()

    @property
    def attention_scaling(self) -> float:
        """Factor the model's own rotation multiplies cos/sin by (1.0 except for YaRN)."""
        if self.rope_type != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return float(self.attention_factor)

        def get_mscale(scale, mscale=1.0):
            return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

        if self.mscale and self.mscale_all_dim:
            return float(get_mscale(self.factor, self.mscale) / get_mscale(self.factor, self.mscale_all_dim))
        return float(get_mscale(self.factor))

    def rotation_tables(self, delta: torch.Tensor, device=None, *, per_token: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """cos/sin tables of the pure rotation by each distinct position difference.

        Args:
            delta: integer tensor of position differences (any shape).
            per_token: one table row per element of ``delta`` instead of per distinct value, computed
                where ``delta`` lives without reading it on the host (capturable in a CUDA graph).
        Returns:
            ``(cos, sin, index)``: float32 ``[U, rotary_dim // 2]`` tables for the ``U`` distinct
            deltas (``U = delta.numel()`` with ``per_token``), and an int32 tensor shaped like ``delta``
            that indexes them.
        """
        if per_token:
            ang = delta.reshape(-1).to(torch.float64)[:, None] * _inv_freq_on(self, delta.device)[None, :]
            index = torch.arange(delta.numel(), dtype=torch.int32, device=delta.device).view(delta.shape)
            cos, sin = torch.cos(ang).float(), torch.sin(ang).float()
            dev = delta.device if device is None else device
            return cos.to(dev), sin.to(dev), index.to(dev)
        uniq, index = torch.unique(delta.to(torch.int64).cpu(), return_inverse=True)
        ang = uniq.to(torch.float64)[:, None] * self.inv_freq()[None, :]
        cos, sin = torch.cos(ang).float(), torch.sin(ang).float()
        dev = delta.device if device is None else device
        return cos.to(dev), sin.to(dev), index.to(device=dev, dtype=torch.int32)

    # ------------------------------------------------------------------ Hugging Face
    @classmethod
    def from_hf(cls, config: Any, **overrides) -> RopeConfig:
        """The one rotation of a Hugging Face model whose layers all rotate alike, from its config
        (``overrides`` replace fields of the result).

        Parsing lives in `kvfuse.integrations.hf_config` (see `kvfuse.ModelRope.from_hf`, which also
        covers per-layer rotation). Raises ``UnsupportedModel`` (a ``ValueError``) naming the model when
        its layers rotate differently (Gemma 3, NoPE layers: use ``kvfuse.ModelRope.from_hf``), when its
        tokens cannot be moved (no rotary embedding, dynamic / longrope scaling), or when kvfuse cannot
        describe its rotation at all.
        """
        from kvfuse.integrations.hf_config import uniform_rope

        return dataclasses.replace(uniform_rope(ModelRope.from_hf(config)), **overrides)

    @classmethod
    def from_hf_model(cls, model: Any, **overrides) -> RopeConfig:
        """Like `from_hf` on ``model.config``, but with the inverse frequencies the loaded model
        really rotates with (its rotary buffer).

        They differ from the config's when the buffer was rounded: ``model.to(torch.bfloat16)``
        casts it to bf16 (HF models loaded with ``dtype=`` keep it in float32), and the model's keys
        are then rotated with those rounded frequencies -- re-rotating them with exact ones would not
        match what the model computes at the new positions.
        """
        from kvfuse.integrations.hf_config import uniform_rope

        return dataclasses.replace(uniform_rope(ModelRope.from_hf_model(model)), **overrides)


@dataclasses.dataclass(frozen=True)
class ModelRope:
    """How every layer of a model rotated its keys.

    ``layers[i]`` is layer ``i``'s `RopeConfig`, or ``None`` for a layer whose keys carry no rotary
    position (a NoPE layer: SmolLM3's ``no_rope_layers``, Cohere2's and Llama 4's full-attention
    layers); moving tokens leaves such a layer's keys as they are. Layers may rotate differently
    (Gemma 3: theta 1e4 on sliding layers, 1e6 with linear scaling on full-attention layers).

    ``unmovable``, when set, says why tokens of this model cannot be moved at all (no rotary
    embedding: GPT-2's learned absolute positions, ALiBi; or scaling whose frequencies depend on the
    current sequence length: dynamic NTK, longrope): every op that would move a token raises it as a
    ``ValueError``; layouts that keep positions ("shared") still work. `ModelRope.from_hf` then gives
    every layer None (there is no one rotation to describe).

    Ops that take a ``rope`` on a layer-stacked pool (``[num_layers, ...]``) accept a `ModelRope`
    with one entry per pool layer, or a single `RopeConfig` that then applies to every layer.

    Example:
        >>> r = ModelRope((RopeConfig(64), None, RopeConfig(64, theta=1e6)), model="example")
        >>> [(a, b, c is not None) for a, b, c in r.runs()]
        [(0, 1, True), (1, 2, False), (2, 3, True)]
    """

    layers: tuple[RopeConfig | None, ...]
    model: str = "this model"
    unmovable: str | None = None

    def __post_init__(self):
        if isinstance(self.layers, RopeConfig) or not hasattr(self.layers, "__len__"):
            raise TypeError(f"ModelRope.layers must be a sequence of RopeConfig | None (one per layer), "
                            f"got {type(self.layers).__name__}; ModelRope.uniform(rope, num_layers) builds one")
        layers = tuple(self.layers)
        if not layers:
            raise ValueError("ModelRope.layers must hold one entry per layer, got none")
        for i, c in enumerate(layers):
            if c is not None and not isinstance(c, RopeConfig):
                raise TypeError(f"ModelRope.layers[{i}] must be a RopeConfig or None, got {type(c).__name__}")
        dims = {c.head_dim for c in layers if c is not None}
        if len(dims) > 1:
            raise ValueError(f"ModelRope: the layers' RopeConfigs disagree on head_dim ({sorted(dims)})")
        if self.unmovable is not None and not isinstance(self.unmovable, str):
            raise TypeError(f"ModelRope.unmovable must be a string (the reason) or None, got {self.unmovable!r}")
        object.__setattr__(self, "layers", layers)

    @classmethod
    def uniform(cls, rope: RopeConfig, num_layers: int, model: str = "this model") -> ModelRope:
        """Every one of ``num_layers`` layers rotates with ``rope``."""
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers <= 0:
            raise ValueError(f"ModelRope.uniform: num_layers must be a positive int, got {num_layers!r}")
        return cls((rope,) * num_layers, model)

    @classmethod
    def from_hf(cls, config: Any) -> ModelRope:
        """The rotation of every layer of a Hugging Face model, from its config (see
        `kvfuse.integrations.hf_config.model_rope`: per-layer-type theta and scaling, NoPE layers,
        unmovable models; ``UnsupportedModel`` for models kvfuse cannot describe, e.g. MLA)."""
        from kvfuse.integrations.hf_config import model_rope

        return model_rope(config)

    @classmethod
    def from_hf_model(cls, model: Any) -> ModelRope:
        """Like `from_hf`, with the inverse frequencies the loaded model really rotates with."""
        from kvfuse.integrations.hf_config import model_rope_of

        return model_rope_of(model)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def head_dim(self) -> int | None:
        """The head_dim of the rotating layers (None when no layer rotates)."""
        return next((c.head_dim for c in self.layers if c is not None), None)

    @property
    def single(self) -> RopeConfig | None:
        """The one `RopeConfig` every layer uses, or None when layers differ (or do not rotate)."""
        first = self.layers[0]
        return first if first is not None and all(c == first for c in self.layers) else None

    def runs(self) -> list[tuple[int, int, RopeConfig | None]]:
        """Maximal runs ``(first_layer, end_layer, config)`` of consecutive layers rotating alike."""
        return list(self._runs)

    @functools.cached_property
    def _runs(self) -> tuple[tuple[int, int, RopeConfig | None], ...]:
        out, start = [], 0
        for i in range(1, len(self.layers) + 1):
            if i == len(self.layers) or self.layers[i] != self.layers[start]:
                out.append((start, i, self.layers[start]))
                start = i
        return tuple(out)

    def check_movable(self) -> None:
        """Raise ``ValueError`` (the reason) if tokens of this model cannot be moved."""
        if self.unmovable is not None:
            raise ValueError(self.unmovable)

    def to_dict(self) -> dict:
        return {"layers": [None if c is None else dataclasses.asdict(c) for c in self.layers],
                "model": self.model, "unmovable": self.unmovable}

    @classmethod
    def from_dict(cls, d: dict) -> ModelRope:
        return cls(tuple(None if c is None else RopeConfig(**{**c, "inv_freq_values": _tuple(c.get("inv_freq_values"))})
                         for c in d["layers"]), d.get("model", "this model"), d.get("unmovable"))


def _tuple(x):
    return None if x is None else tuple(x)


def as_model_rope(rope: RopeConfig | ModelRope | None, num_layers: int, name: str = "rope") -> ModelRope | None:
    """``rope`` as a `ModelRope` of ``num_layers`` layers (a `RopeConfig` applies to every layer)."""
    if rope is None:
        return None
    if isinstance(rope, RopeConfig):
        return ModelRope.uniform(rope, num_layers)
    if not isinstance(rope, ModelRope):
        raise TypeError(f"{name} must be a kvfuse.RopeConfig or kvfuse.ModelRope, got {type(rope).__name__}")
    if rope.num_layers != num_layers:
        raise ValueError(f"{name} describes {rope.num_layers} layers, the pool has {num_layers}")
    return rope

_INV_FREQ_CACHE: dict = {}


def _inv_freq_cached(cfg: RopeConfig) -> torch.Tensor:
    t = _INV_FREQ_CACHE.get(cfg)
    if t is None:
        t = _compute_inv_freq(cfg)
        _INV_FREQ_CACHE[cfg] = t
    return t


def tables_into(cfg: RopeConfig, deltas: list[int], cos: torch.Tensor, sin: torch.Tensor) -> None:
    """The cos/sin rows of `RopeConfig.rotation_tables` for ``deltas`` (distinct ints, sorted: the
    rows it would make), written into float32 ``cos`` / ``sin`` ``[len(deltas), rotary_dim // 2]``."""
    ang = torch.outer(torch.tensor(deltas, dtype=torch.float64), _inv_freq_cached(cfg))
    torch.cos(ang, out=cos)
    torch.sin(ang, out=sin)


_INV_FREQ_ON: dict = {}


def _inv_freq_on(cfg: RopeConfig, device: torch.device) -> torch.Tensor:
    """`RopeConfig.inv_freq` on ``device``, copied there once: a later call (inside a CUDA-graph capture,
    where a copy from the host is not allowed) only reads it."""
    if device.type == "cpu":
        return _inv_freq_cached(cfg)
    key = (cfg, str(device))
    t = _INV_FREQ_ON.get(key)
    if t is None:
        t = _INV_FREQ_ON[key] = _inv_freq_cached(cfg).to(device)
    return t


def _compute_inv_freq(cfg: RopeConfig) -> torch.Tensor:
    """Mirrors the formulas of the Hugging Face RoPE initialisers, in the chosen precision."""
    if cfg.inv_freq_values is not None:
        return torch.tensor(cfg.inv_freq_values, dtype=torch.float64)
    dt = torch.float32 if cfg.inv_freq_dtype == "float32" else torch.float64
    exps = torch.arange(0, cfg.rotary_dim, 2, dtype=torch.int64).to(dt) / cfg.rotary_dim
    return _SCALINGS[cfg.rope_type](cfg, exps).to(torch.float64)


# ---------------------------------------------------------------------- RoPE variants as a table
# One function per scaling type: (config, exponents 2i/rotary_dim in the working dtype) -> inverse frequencies.
# A new type is one function here plus its entry in _SCALINGS; its parameters are RopeConfig fields, which
# kvfuse.integrations.hf_config reads from a Hugging Face config by the same names.


def _default(cfg: RopeConfig, exps: torch.Tensor) -> torch.Tensor:
    return 1.0 / (cfg.theta**exps)


def _linear(cfg: RopeConfig, exps: torch.Tensor) -> torch.Tensor:
    return _default(cfg, exps) / cfg.factor


def _llama3(cfg: RopeConfig, exps: torch.Tensor) -> torch.Tensor:
    inv = _default(cfg, exps)
    omax = cfg.original_max_position_embeddings
    low_wl, high_wl = omax / cfg.low_freq_factor, omax / cfg.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wl, inv / cfg.factor, inv)
    smooth = (omax / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
    smoothed = (1 - smooth) * scaled / cfg.factor + smooth * scaled
    medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
    return torch.where(medium, smoothed, scaled)


def _yarn(cfg: RopeConfig, exps: torch.Tensor) -> torch.Tensor:
    dim = cfg.rotary_dim

    def corr_dim(rot):
        return (dim * math.log(cfg.original_max_position_embeddings / (rot * 2 * math.pi))) / (2 * math.log(cfg.theta))

    low, high = corr_dim(cfg.beta_fast), corr_dim(cfg.beta_slow)
    if cfg.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32).to(exps.dtype) - low) / (high - low), 0, 1)
    extrap = 1 - ramp
    pos_freqs = cfg.theta**exps
    return (1.0 / (cfg.factor * pos_freqs)) * (1 - extrap) + (1.0 / pos_freqs) * extrap


_SCALINGS: dict[str, Callable[[RopeConfig, torch.Tensor], torch.Tensor]] = {
    "default": _default,
    "linear": _linear,
    "llama3": _llama3,
    "yarn": _yarn,
}
ROPE_TYPES = tuple(_SCALINGS)


def _set_int(cfg: RopeConfig, name: str) -> None:
    """Check that field ``name`` is a positive int and store it as a Python int."""
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"RopeConfig.{name} must be an int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"RopeConfig.{name} must be a positive int, got {value!r}")
    object.__setattr__(cfg, name, int(value))


def _set_float(cfg: RopeConfig, name: str) -> None:
    """Check that field ``name`` is a finite real number and store it as a float."""
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"RopeConfig.{name} must be a real number (int or float), got {type(value).__name__} "
                        f"{value!r}")
    if not math.isfinite(value):
        raise ValueError(f"RopeConfig.{name} must be finite, got {value!r}")
    object.__setattr__(cfg, name, float(value))
