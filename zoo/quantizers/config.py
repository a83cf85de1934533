"""Quantization configuration: frozen, JSON-safe dataclasses.

A quantizer *spec* is a small frozen dataclass (``LSQ(bits=4)``). Its behaviour lives in a
handler registered for that class with :func:`register_quantizer`; adding a quantizer is one
spec class plus one handler, no central if/else. ``QuantConfig.from_dict`` only builds spec
classes that were registered (an allow-list), so a config file can never name arbitrary code.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

CONFIG_VERSION = 1
GRANULARITIES = ("tensor", "channel")
ROLES = ("weight", "act")

# spec class name -> spec class, and spec class -> {role: handler}
_SPECS: dict[str, type] = {}
_HANDLERS: dict[type, dict[str, Callable]] = {}


def register_quantizer(spec_cls: type, role: str):
    """Register ``fn(spec, layer) -> nn.Module`` building the ``role`` quantizer of ``spec_cls``."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")

    def deco(fn):
        _SPECS[spec_cls.__name__] = spec_cls
        _HANDLERS.setdefault(spec_cls, {})[role] = fn
        return fn

    return deco


def quantizer_names(role: str | None = None) -> list[str]:
    return sorted(n for n, c in _SPECS.items() if role is None or role in _HANDLERS[c])


def build_quantizer(spec: "QuantSpec", role: str, layer=None):
    handlers = _HANDLERS.get(type(spec), {})
    if role not in handlers:
        raise ValueError(
            f"{type(spec).__name__} cannot quantize {role}s; quantizers for {role}s: "
            f"{quantizer_names(role)}"
        )
    return handlers[role](spec, layer)


@dataclass(frozen=True)
class QuantSpec:
    """Base of every quantizer spec. ``bits`` is 1..8; subclasses narrow it with MIN/MAX_BITS."""

    bits: int = 8
    MIN_BITS: ClassVar[int] = 1
    MAX_BITS: ClassVar[int] = 8

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise TypeError(f"{type(self).__name__}.bits must be an int, got {self.bits!r}")
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be in 1..8, got {self.bits}")
        if not self.MIN_BITS <= self.bits <= self.MAX_BITS:
            raise ValueError(
                f"{type(self).__name__} supports bits {self.MIN_BITS}..{self.MAX_BITS}, got {self.bits}"
            )
        g = getattr(self, "granularity", None)
        if g is not None and g not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {g!r}")

    def to_dict(self) -> dict:
        return {"type": type(self).__name__, **dataclasses.asdict(self)}


def spec_from_dict(d: Mapping[str, Any] | None) -> QuantSpec | None:
    if d is None:
        return None
    if isinstance(d, QuantSpec):
        return d
    d = dict(d)
    name = d.pop("type", None)
    if name not in _SPECS:
        raise ValueError(f"unknown quantizer {name!r}; valid: {quantizer_names()}")
    cls = _SPECS[name]
    valid = {f.name for f in dataclasses.fields(cls)}
    bad = set(d) - valid
    if bad:
        raise ValueError(f"{name} has no field(s) {sorted(bad)}; valid: {sorted(valid)}")
    return cls(**d)


@dataclass(frozen=True)
class LayerQuant:
    """The weight and activation quantizer of one layer (either may be None = float)."""

    weight: QuantSpec | None = None
    act: QuantSpec | None = None

    def to_dict(self) -> dict:
        return {
            "weight": self.weight.to_dict() if self.weight else None,
            "act": self.act.to_dict() if self.act else None,
        }

    @classmethod
    def from_dict(cls, d) -> "LayerQuant | None":
        if d is None:
            return None
        if isinstance(d, LayerQuant):
            return d
        if isinstance(d, QuantSpec):  # shorthand: the same spec for weight and activation
            return cls(weight=d, act=d)
        return cls(weight=spec_from_dict(d.get("weight")), act=spec_from_dict(d.get("act")))


@dataclass(frozen=True)
class QuantConfig:
    """What ``zoo.quantize`` does to a model.

    ``overrides`` maps a module-name glob to a :class:`LayerQuant` (or ``None`` to keep the
    layer float); the first matching glob wins. ``skip`` lists globs never quantized.
    ``extra`` carries method options (e.g. ``{"rprelu": True}`` for ReActNet).
    """

    weight: QuantSpec | None = None
    act: QuantSpec | None = None
    overrides: tuple = ()
    version: int = CONFIG_VERSION
    extra: tuple = ()

    def __post_init__(self):
        ov = self.overrides
        if isinstance(ov, Mapping):
            ov = tuple(ov.items())
        ov = tuple((str(k), LayerQuant.from_dict(v)) for k, v in ov)
        object.__setattr__(self, "overrides", ov)
        ex = self.extra
        if isinstance(ex, Mapping):
            ex = tuple(sorted(ex.items()))
        object.__setattr__(self, "extra", tuple(ex))
        if self.version != CONFIG_VERSION:
            raise ValueError(f"QuantConfig version {self.version} is not supported (this zoo reads {CONFIG_VERSION})")

    @property
    def options(self) -> dict:
        return dict(self.extra)

    def for_layer(self, name: str) -> LayerQuant | None:
        for pattern, lq in self.overrides:
            if fnmatch.fnmatchcase(name, pattern):
                return lq
        if self.weight is None and self.act is None:
            return None
        return LayerQuant(self.weight, self.act)

    @property
    def is_float(self) -> bool:
        return self.weight is None and self.act is None and not any(v for _, v in self.overrides)

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "weight": self.weight.to_dict() if self.weight else None,
            "act": self.act.to_dict() if self.act else None,
            "overrides": {k: (v.to_dict() if v else None) for k, v in self.overrides},
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantConfig":
        d = dict(d)
        unknown = set(d) - {"version", "weight", "act", "overrides", "extra"}
        if unknown:
            raise ValueError(f"QuantConfig has no field(s) {sorted(unknown)}")
        return cls(
            weight=spec_from_dict(d.get("weight")),
            act=spec_from_dict(d.get("act")),
            overrides={k: LayerQuant.from_dict(v) for k, v in (d.get("overrides") or {}).items()},
            version=d.get("version", CONFIG_VERSION),
            extra=dict(d.get("extra") or {}),
        )


# ----------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class MinMax(QuantSpec):
    """Uniform affine quantizer from the observed min/max (EMA for activations)."""

    granularity: str = "tensor"
    momentum: float = 0.1


@dataclass(frozen=True)
class LSQ(QuantSpec):
    """Learned Step Size Quantization (Esser et al., ICLR 2020)."""

    granularity: str = "tensor"
    MIN_BITS: ClassVar[int] = 2


@dataclass(frozen=True)
class DoReFa(QuantSpec):
    """DoReFa-Net: tanh-normalised weights, activations clipped to [0, 1]."""


@dataclass(frozen=True)
class PACT(QuantSpec):
    """PACT: activations clipped to a learnable alpha (activations only)."""

    init_alpha: float = 6.0


@dataclass(frozen=True)
class UL2Q(QuantSpec):
    """mu-L2Q: standardise, then a Gaussian-optimal mid-rise uniform step lambda_k * sigma."""

    granularity: str = "tensor"
    momentum: float = 0.1


@dataclass(frozen=True)
class XNOR(QuantSpec):
    """Classic binarisation: mean(|w|) * sign(w) per output channel; sign(x) for activations."""

    bits: int = 1
    MAX_BITS: ClassVar[int] = 1


@dataclass(frozen=True)
class IRNet(QuantSpec):
    """IR-Net: Libra-PB weights (balanced, standardised, power-of-two scale) + EDE backward."""

    bits: int = 1
    t_min: float = 0.1
    t_max: float = 10.0
    MAX_BITS: ClassVar[int] = 1


@dataclass(frozen=True)
class ReAct(QuantSpec):
    """ReActNet: RSign activations (learnable per-channel threshold); XNOR-scaled weights."""

    bits: int = 1
    MAX_BITS: ClassVar[int] = 1


@dataclass(frozen=True)
class RLQ(QuantSpec):
    """QuantSR's redistribution-driven learnable quantizer: learnable step (weights, activations)
    and per-channel shift (activations); backward through the tanh-shaped redistribution phi of
    sharpness ``phi_k`` (the authors' code uses 1)."""

    granularity: str = "tensor"
    phi_k: float = 1.0
    MIN_BITS: ClassVar[int] = 2


@dataclass(frozen=True)
class PAMS(QuantSpec):
    """PAMS (Li et al., ECCV 2020): symmetric activations clipped to a learnable max scale alpha;
    weights symmetric with their max |w| as the range."""

    MIN_BITS: ClassVar[int] = 2


# short names used by the CLI (quant=lsq) and the config group
SHORT_NAMES = {
    "minmax": MinMax,
    "lsq": LSQ,
    "dorefa": DoReFa,
    "pact": PACT,
    "ul2q": UL2Q,
    "xnor": XNOR,
    "irnet": IRNet,
    "react": ReAct,
    "rlq": RLQ,
    "pams": PAMS,
}
