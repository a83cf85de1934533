"""Quantization configuration: frozen, JSON-safe dataclasses.

A quantizer *spec* is a small frozen dataclass (``LSQ(bits=4)``). Its behaviour lives in a
handler registered for that class with :func:`register_quantizer`; adding a quantizer is one
spec class plus one handler, no central if/else. ``QuantConfig.from_dict`` only builds spec
classes that were registered (an allow-list), so a config file can never name arbitrary code.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

CONFIG_VERSION = 1
GRANULARITIES = ("tensor", "channel")
ACT_GRANULARITIES = ("tensor",)
GRAD_NUMELS = ("sample", "batch")
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
        n = getattr(self, "grad_numel", None)
        if n is not None and n not in GRAD_NUMELS:
            raise ValueError(f"{type(self).__name__}.grad_numel must be one of {GRAD_NUMELS}, got {n!r}")

    def to_dict(self) -> dict:
        return {"type": type(self).__name__, **dataclasses.asdict(self)}


def check_act_spec(spec: "QuantSpec | None") -> None:
    """Activation specs are per tensor: the packed integer kernels take one activation scale and
    zero point per layer input (a per-input-channel scale would sit inside the reduction)."""
    g = getattr(spec, "granularity", None)
    if g is not None and g not in ACT_GRANULARITIES:
        raise ValueError(
            f"{type(spec).__name__}(granularity={g!r}) is not supported for activations: the packed "
            f"integer kernels take one activation scale and zero point per tensor; valid for "
            f"activations: granularity in {list(ACT_GRANULARITIES)} (per-channel is for weights)")


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
    """The weight and activation quantizer of one layer (either may be None = float).

    ``act_sites``: how many times the layer is called in one forward of the module that calls it
    (a detection head shared by five FPN levels: 5); each call gets its own activation parameters
    (``zoo.quantizers.sites``). 1, the default, shares one set."""

    weight: QuantSpec | None = None
    act: QuantSpec | None = None
    act_sites: int = 1

    def __post_init__(self):
        check_act_spec(self.act)
        n = self.act_sites
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"act_sites must be an int >= 1, got {n!r}")
        if n > 1 and self.act is None:
            raise ValueError(f"act_sites={n} needs an activation quantizer (act is None)")

    def to_dict(self) -> dict:
        d = {
            "weight": self.weight.to_dict() if self.weight else None,
            "act": self.act.to_dict() if self.act else None,
        }
        if self.act_sites != 1:  # absent for the default, so single-site configs read as before
            d["act_sites"] = self.act_sites
        return d

    @classmethod
    def from_dict(cls, d) -> "LayerQuant | None":
        if d is None:
            return None
        if isinstance(d, LayerQuant):
            return d
        if isinstance(d, QuantSpec):  # shorthand: the same spec for weight and activation
            return cls(weight=d, act=d)
        bad = set(d) - {"weight", "act", "act_sites"}
        if bad:
            raise ValueError(f"LayerQuant has no field(s) {sorted(bad)}; valid: ['act', 'act_sites', 'weight']")
        return cls(weight=spec_from_dict(d.get("weight")), act=spec_from_dict(d.get("act")),
                   act_sites=d.get("act_sites", 1))


@dataclass(frozen=True)
class QuantConfig:
    """What ``zoo.quantize`` does to a model.

    ``overrides`` maps a module-name glob to a :class:`LayerQuant` (or ``None`` to keep the
    layer float); the first matching glob wins.
    ``extra`` carries method options (e.g. ``{"rprelu": True}`` for ReActNet).
    """

    weight: QuantSpec | None = None
    act: QuantSpec | None = None
    overrides: tuple = ()
    version: int = CONFIG_VERSION
    extra: tuple = ()

    def __post_init__(self):
        check_act_spec(self.act)
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
# Each docstring states the forward formula and the gradient convention the handler implements;
# tests/test_quantizer_grads.py checks every one against a formula written out independently.
@dataclass(frozen=True)
class MinMax(QuantSpec):
    """Uniform affine quantizer over the observed [min, max] (0 always representable).

    Weights: range from the current weights (per tensor or per output channel), gradient the plain
    straight-through estimator (1 everywhere). Activations: an EMA (``momentum``) of the batch
    min/max updated in training mode only, frozen in eval; gradient 1 inside the range, 0 outside.
    """

    granularity: str = "tensor"
    momentum: float = 0.1


@dataclass(frozen=True)
class LSQ(QuantSpec):
    """Learned Step Size Quantization (Esser et al., ICLR 2020).

    ``v_hat = round(clip(v / s, -Q_N, Q_P)) * s``; gradient 1 w.r.t. v inside the clip range, 0
    outside; w.r.t. s (LSQ eq. 3) ``round(v/s) - v/s`` inside, ``-Q_N`` / ``Q_P`` outside, times the
    gradient scale ``g = 1/sqrt(N * Q_P)``. Step initialised to ``2 mean|v| / sqrt(Q_P)`` (weights:
    per channel with ``granularity="channel"``; activations: from the first *training* batch, which
    also decides signed [-2^(b-1), 2^(b-1)-1] vs unsigned [0, 2^b-1]). For weights N is the number
    of weights of the layer (per-channel steps too); for activations ``grad_numel`` picks N:
    ``"sample"`` (the paper's N_F, the features of one example; default) or ``"batch"`` (the whole
    batch tensor, as most public LSQ code does).
    """

    granularity: str = "tensor"
    grad_numel: str = "sample"
    MIN_BITS: ClassVar[int] = 2


@dataclass(frozen=True)
class DoReFa(QuantSpec):
    """DoReFa-Net (Zhou et al. 2016). Weights ``2 quant_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1``
    per tensor, gradient through tanh and the max (straight-through only on the rounding).
    ``rescale=True`` is the super-resolution variant of the QuantSR authors' code line: the result is
    multiplied by ``max|tanh(w)|`` (no gradient through that factor), so a layer keeps the magnitude
    of its float weights instead of +-1 (which BatchNorm absorbs in classification nets but nothing
    absorbs in a BN-free SR trunk). Activations clipped to [0, 1] and quantized; gradient 1 on
    [0, 1], 0 outside."""

    rescale: bool = False


@dataclass(frozen=True)
class PACT(QuantSpec):
    """PACT (Choi et al. 2018), activations only: ``y = clip(x, 0, alpha)`` quantized to k bits on
    the step alpha / (2^k - 1). Gradient (PACT eq. 3): w.r.t. x 1 on [0, alpha), else 0; w.r.t.
    alpha 1 where x >= alpha (all of it at x == alpha), else 0."""

    init_alpha: float = 6.0


@dataclass(frozen=True)
class UL2Q(QuantSpec):
    """mu-L2Q (Gong et al., J. Software 2021): standardise, then a Gaussian-optimal mid-rise
    uniform step lambda_k * sigma. Weights: mu, sigma of the current weights; activations: EMA of
    the batch mu, sigma in training mode, frozen in eval. Gradient: straight-through (weights 1
    everywhere; activations 1 inside the representable range, 0 outside)."""

    granularity: str = "tensor"
    momentum: float = 0.1


@dataclass(frozen=True)
class XNOR(QuantSpec):
    """XNOR-Net (Rastegari et al. 2016). Weights ``alpha * sign(w)``, alpha = mean|w| per output
    channel; gradient as the paper writes it, ``dC/dw = dC/dw_b * (1/n + alpha * 1[|w| <= 1])``
    (n = weights per output channel). Activations ``sign(x)`` (sign(0) = +1), gradient 1[|x| <= 1]."""

    bits: int = 1
    MAX_BITS: ClassVar[int] = 1


@dataclass(frozen=True)
class IRNet(QuantSpec):
    """IR-Net (Qin et al., CVPR 2020). Libra-PB weights: per output channel
    ``w_std = (w - mean) / std`` (unbiased std), ``w_b = sign(w_std) * 2^round(log2 mean|w_std|)``
    (the power-of-two scale carries no gradient). EDE backward of sign: ``k t (1 - tanh^2(t x))``,
    through the standardisation to w, with ``t = t_min 10^(p log10(t_max / t_min))`` over the
    training progress p and ``k = max(1/t, 1)``. Activations ``sign(x)`` with the same EDE.

    ``magnitude=True`` takes the power of two of ``mean|w - mean|`` (the balanced weights' own size)
    instead of ``mean|w_std|`` (about 1): the authors' scale relies on a BatchNorm after the conv to
    absorb it, which networks like diffusers' UNet (residual sums, time embeddings) do not have."""

    bits: int = 1
    t_min: float = 0.1
    t_max: float = 10.0
    magnitude: bool = False
    MAX_BITS: ClassVar[int] = 1


@dataclass(frozen=True)
class ReAct(QuantSpec):
    """ReActNet (Liu et al., ECCV 2020). Weights ``alpha * sign(w)`` (alpha = mean|w| per output
    channel, no gradient through alpha), gradient 1[|w| <= 1] as in the authors' code. Activations
    RSign ``sign(x - beta_c)`` with a learnable per-channel threshold and the ApproxSign backward
    ``2 - 2|x - beta|`` for |x - beta| < 1, else 0 (the same, negated, for beta)."""

    bits: int = 1
    MAX_BITS: ClassVar[int] = 1


@dataclass(frozen=True)
class EBB(QuantSpec):
    """BinaryDM's evolvable-basis binarizer (Zheng et al., ICLR 2025), weights only:
    ``sigma1 sign(w) + beta sigma2 sign(w - sigma1 sign(w))`` with learnable per-channel sigma1, sigma2
    (init mean|w| and mean|residual|) and the second basis' weight beta falling linearly from 1 to 0
    at the fraction ``decay_end`` of training (never rising again), after which the weight is
    single-basis 1-bit. Clipped straight-through gradient 1[|x| <= 1] through each sign."""

    bits: int = 1
    decay_end: float = 0.5
    MAX_BITS: ClassVar[int] = 1

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.decay_end <= 1.0:
            raise ValueError(f"EBB.decay_end must be in [0, 1] (a fraction of training), got {self.decay_end!r}")


@dataclass(frozen=True)
class RLQ(QuantSpec):
    """QuantSR's redistribution-driven learnable quantizer (Qin et al., NeurIPS 2023).

    LSQ's forward, step initialisation and step gradient, with the rounding's backward replaced by
    the tanh staircase phi of sharpness ``phi_k`` (the authors' code uses 1); activations add a
    learnable per-input-channel shift tau before quantization. The activation sign is decided on the
    first training batch with the authors' tolerance (signed only if min(x) < -1e-5). ``grad_numel``
    defaults to the authors' convention, ``"batch"``: N of the step gradient scale 1/sqrt(N Q_P) is
    the element count of the whole activation tensor (``"sample"``: of one example, as LSQ)."""

    granularity: str = "tensor"
    phi_k: float = 1.0
    grad_numel: str = "batch"
    MIN_BITS: ClassVar[int] = 2


@dataclass(frozen=True)
class PAMS(QuantSpec):
    """PAMS (Li et al., ECCV 2020). Weights symmetric per tensor on the step max|w| / (2^(b-1) - 1),
    straight-through gradient. Activations ``round(clip(x, -alpha, alpha) / s) * s`` with
    s = alpha / (2^(b-1) - 1), alpha learnable (initialised to max|x| of the first training batch);
    gradient w.r.t. x 1 inside [-alpha, alpha], 0 outside; w.r.t. alpha what autograd gives the
    authors' code (rounding straight-through): ``round(x/s)/(2^(b-1) - 1) - x/alpha`` inside,
    ``sign(x)`` outside."""

    MIN_BITS: ClassVar[int] = 2


@dataclass(frozen=True)
class N2UQ(QuantSpec):
    """N2UQ (Liu et al., CVPR 2022): learnable non-uniform input thresholds with uniform output
    levels, trained with the generalised straight-through estimator (G-STE); weights by the
    entropy-preserving per-channel normalisation (2^b symmetric levels, no zero level). The codes
    stay uniform integers, so packed inference is the usual integer GEMM (activation codes by counting
    thresholds). Formulas and gradients: ``zoo/quantizers/n2uq.py``."""

    MIN_BITS: ClassVar[int] = 2


@dataclass(frozen=True)
class Log2(QuantSpec):
    """Logarithmic quantizer for post-softmax values in [0, 1] (the log2 baseline of the ViT PTQ papers):
    ``q = clamp(round(-log2(x / s)), 0, 2^b - 1)``, value ``s 2^-q``, except the top code 2^b - 1, which
    is 0 (so b bits hold 2^b - 1 powers of two and zero). ``s`` is calibrated (``LogAct.fit``).
    Activations only; gradient 1 on (0, s], 0 elsewhere."""

    MIN_BITS: ClassVar[int] = 2


@dataclass(frozen=True)
class LogSqrt2(QuantSpec):
    """RepQ-ViT's log-sqrt(2) quantizer for post-softmax values: ``q = clamp(round(-2 log2(x / s)), 0,
    2^b - 1)``, value ``s 2^(-q/2)`` (odd codes: ``2^(-(q+1)/2) sqrt 2``), the top code 0. Activations
    only; gradient 1 on (0, s], 0 elsewhere."""

    MIN_BITS: ClassVar[int] = 2


@dataclass(frozen=True)
class MPQ(QuantSpec):
    """APQ-ViT's Matthew-effect preserving quantizer for the softmax output, as the seed writes it:
    ``q = clamp(floor(x / D), 0, 2^b - 1)``, ``D = max(x) / (2^b - 1)`` (max over the calibration
    data), value ``q D``: the large attention values keep their levels, the many small ones fall to 0.
    Activations only; gradient 1 on [0, max], 0 elsewhere."""

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
    "ebb": EBB,
    "rlq": RLQ,
    "pams": PAMS,
    "n2uq": N2UQ,
}
