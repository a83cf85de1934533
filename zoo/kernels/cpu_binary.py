"""W1A1 convolutions at bit speed on the CPU: a C++ kernel (``csrc/binary_conv.cpp``) with the signs
packed 64 per word, XOR + popcount, the training form's zero padding and the reference's epilogue.

It is compiled against the installed torch **on first use** (torch's ``cpp_extension``, ninja, the
system C++ compiler; about a minute) with ``-march=native`` -- so AVX-512 VPOPCNTDQ where the CPU has
it, the compiler's portable popcount elsewhere; ``ZOO_CPU_KERNEL_MARCH`` sets another ``-march``) -- and
cached under ``$ZOO_CACHE/ext/`` (default
``~/.cache/lowbit-vision-zoo/ext/``), one build per torch version, source and CPU. Afterwards loading
takes milliseconds. ``ZOO_CPU_KERNELS=0`` turns it off (the cached float32 path runs those layers);
if the build fails, a warning says why once and the same fallback is taken.

The cached CPU path (``cached.conv2d``, i.e. ``backend="cpu"`` and ``"auto"`` on CPU) sends a packed
conv here when both its weights and activations are binary: 1-bit codes with the zero point 1/2 (W' =
2q - 1 = +-1) and sign activations (with ReAct's per-channel threshold, if any), groups = 1, float32
input. Outputs equal the reference's bit for bit: the integer sums are exact and the epilogue is the
same float64 multiply and add.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("csrc") / "binary_conv.cpp"
# ZOO_CPU_KERNEL_MARCH: the -march= of the build (default native; e.g. x86-64-v2 for a portable build
# without AVX-512, or for a cache shared by machines with different CPUs)
MARCH = os.environ.get("ZOO_CPU_KERNEL_MARCH", "native")
CFLAGS = ["-O3", f"-march={MARCH}", "-ffp-contract=off"]
_state: dict = {}


def _cpu_tag() -> str:
    """A short fingerprint of this CPU's model and instruction-set flags (-march=native builds differ)."""
    info = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                info += line
            if line == "":
                break
    except OSError:
        import platform

        info = platform.processor() + platform.machine()
    return hashlib.sha256(info.encode()).hexdigest()[:10]


def build_dir() -> Path:
    from ..registry import cache_root

    src = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()[:10]
    return cache_root() / "ext" / f"torch-{torch.__version__}" / f"binary_conv-{src}-{_cpu_tag()}"


def enabled() -> bool:
    return os.environ.get("ZOO_CPU_KERNELS", "1").lower() not in ("0", "false", "off", "no")


def available() -> bool:
    """Whether the kernel is built and loaded (building it on the first call); False, with one
    warning, when it cannot be built, and False without building when ZOO_CPU_KERNELS=0."""
    if not enabled():
        return False
    if "ok" not in _state:
        _state["ok"] = False
        try:
            quiet = logging.getLogger("torch.utils.cpp_extension")
            level = quiet.level
            quiet.setLevel(logging.ERROR)  # its import warns "No CUDA runtime is found": irrelevant here
            try:
                from torch.utils import cpp_extension
            finally:
                quiet.setLevel(level)

            d = build_dir()
            d.mkdir(parents=True, exist_ok=True)
            cpp_extension.load(name="zoo_cpu_binary", sources=[str(SOURCE)], extra_cflags=CFLAGS,
                               build_directory=str(d), is_python_module=False, verbose=False)
            _state["ok"] = hasattr(torch.ops.zoo_cpu, "binary_conv2d")
            if _state["ok"]:
                _register_fakes()
        except Exception as e:  # no compiler, no ninja, a failed build: the float32 path runs instead
            log.warning("the CPU binary-conv kernel could not be built (%s: %s); binary layers run on the "
                        "cached float32 path. Set ZOO_CPU_KERNELS=0 to skip trying.", type(e).__name__,
                        str(e).splitlines()[0] if str(e) else "")
    return _state["ok"]


def _register_fakes() -> None:
    """Output shapes of the ops for torch.compile's tracing (the ops themselves stay opaque calls)."""

    @torch.library.register_fake("zoo_cpu::pack_signs")
    def _pack_signs(x, shift):
        n, c, h, w = x.shape
        return x.new_empty((n, h, w, (c + 63) // 64), dtype=torch.int64)

    @torch.library.register_fake("zoo_cpu::binary_conv2d")
    def _conv(xbits, wbits, c_in, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, scale, bias):
        n, h, w, _ = xbits.shape
        kh, kw = wbits.shape[:2]
        co = scale.shape[0]
        oh = (h + 2 * pad_h - dil_h * (kh - 1) - 1) // stride_h + 1
        ow = (w + 2 * pad_w - dil_w * (kw - 1) - 1) // stride_w + 1
        return xbits.new_empty((n, co, oh, ow), dtype=torch.float32)


def pack_signs(x: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
    """N x C x H x W float32 -> N x H x W x ceil(C/64) int64 words; bit c is 1 where x - shift >= 0."""
    return torch.ops.zoo_cpu.pack_signs(x, shift)


def pack_weight_signs(q: torch.Tensor) -> torch.Tensor:
    """C_out x C_in x kh x kw 1-bit codes (uint8) -> kh x kw x ceil(C_in/64) x roundup(C_out, 32) int64 words
    (the padding output channels are 0; ``binary_conv2d`` takes C_out from its scales)."""
    return torch.ops.zoo_cpu.pack_weight_signs(q)


def binary_conv2d(xbits, wbits, c_in, stride, padding, dilation, scale, bias) -> torch.Tensor:
    """float32(float64(sum u*w) * scale + bias) over each window of the packed signs (zero padding)."""
    return torch.ops.zoo_cpu.binary_conv2d(xbits, wbits, c_in, stride[0], stride[1], padding[0], padding[1],
                                           dilation[0], dilation[1], scale, bias)
