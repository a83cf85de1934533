"""C++ CPU kernels of the cached path, built on first use against the installed torch.

- ``csrc/binary_conv.cpp``: W1A1 convolutions at bit speed -- signs packed 64 per word, XOR + popcount,
  the training form's zero padding and the reference's epilogue.
- ``csrc/elementwise.cpp``: the elementwise halves of every other float32 packed layer in one pass
  each -- the activation codes and folded input ``u = (clamp(round((x - shift) / s + o), qmin, qmax) - z)
  * m`` (float32, as torch computes them) and the float64 epilogue ``float(acc * scale + bias)`` --
  where torch takes five or six passes over the tensor.
- ``csrc/ivit.cpp``: I-ViT's integer softmax, GELU and LayerNorm (``quantizers/ivit.py``) at inference,
  one pass per row with the same int64 arithmetic as the torch functions.

They are compiled against the installed torch **on first use** (torch's ``cpp_extension``, ninja, the
system C++ compiler; about a minute) with ``-march=native`` -- so AVX-512 VPOPCNTDQ where the CPU has
it, the compiler's portable popcount elsewhere; ``ZOO_CPU_KERNEL_MARCH`` sets another ``-march``) -- and
cached under ``$ZOO_CACHE/ext/`` (default ``~/.cache/lowbit-vision-zoo/ext/``), one build per torch
version, source and CPU. Afterwards loading takes milliseconds. ``ZOO_CPU_KERNELS=0`` turns them off
(the torch operations of the cached path run instead); if the build fails, a warning says why once and
the same fallback is taken. Outputs are bit-identical either way (``-ffp-contract=off``: no fused
multiply-add changes a rounding).

The cached CPU path (``cached.py``, i.e. ``backend="cpu"`` and ``"auto"`` on CPU) sends a packed conv
to the binary kernel when both its weights and activations are binary: 1-bit codes with the zero point
1/2 (W' = 2q - 1 = +-1) and sign activations (with ReAct's per-channel threshold, if any), groups = 1,
float32 input; and the affine activations and epilogues of float32 inputs to the elementwise ones
(eager only: inside a torch.compile trace inductor fuses the torch operations itself).
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCES = [Path(__file__).with_name("csrc") / f for f in ("binary_conv.cpp", "elementwise.cpp", "ivit.cpp")]
# ZOO_CPU_KERNEL_MARCH: the -march= of the build (default native; e.g. x86-64-v2 for a portable build
# without AVX-512, or for a cache shared by machines with different CPUs)
MARCH = os.environ.get("ZOO_CPU_KERNEL_MARCH", "native")
CFLAGS = ["-O3", f"-march={MARCH}", "-ffp-contract=off"]
# -fopenmp: at::parallel_for splits the work over torch's OpenMP threads (the libgomp torch loaded); a
# compiler without OpenMP (e.g. Apple clang) gets a single-threaded build instead
OPENMP = ["-fopenmp"]
_state: dict = {}


# glibc's malloc: the fixed thresholds tune_malloc sets (M_MMAP_THRESHOLD: 32 MiB, its largest; M_TRIM_THRESHOLD)
MMAP_THRESHOLD, TRIM_THRESHOLD = 32 << 20, 1 << 30


def tune_malloc() -> bool:
    """Keep glibc's malloc from returning freed heap memory to the system after every forward (once per
    process; Linux with glibc; ``ZOO_MALLOC_TUNE=0`` skips it). With its dynamic defaults, the many
    differently sized temporaries of a quantized forward (codes, integer sums, float64 epilogues) make
    it trim the heap top and mmap / munmap blocks call after call, and every page is faulted in again:
    tens of thousands of page faults per forward of a quantized ViT at batch 64 in one profiling run.
    Fixed thresholds (blocks under 32 MiB from the heap, the heap top trimmed only past 1 GiB free)
    stop that; the cost is that the process keeps freed memory up to its peak for reuse (as with
    jemalloc or tcmalloc, which PyTorch's CPU guides recommend). Returns whether the settings were
    applied. ``zoo.load`` calls it for models that run the cached CPU path."""
    if "malloc" in _state:
        return _state["malloc"]
    _state["malloc"] = False
    if os.environ.get("ZOO_MALLOC_TUNE", "1").lower() in ("0", "false", "off", "no"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        # mallopt(M_TRIM_THRESHOLD = -1, ...), mallopt(M_MMAP_THRESHOLD = -3, ...): 1 on success
        _state["malloc"] = bool(libc.mallopt(-1, TRIM_THRESHOLD)) and bool(libc.mallopt(-3, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to tune
        pass
    return _state["malloc"]


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


def build_dir(flags: list[str] | None = None) -> Path:
    from ..registry import cache_root

    flags = CFLAGS + OPENMP if flags is None else flags
    src = hashlib.sha256(b"".join(f.read_bytes() for f in SOURCES) + " ".join(flags).encode()).hexdigest()[:10]
    return cache_root() / "ext" / f"torch-{torch.__version__}" / f"cpu_kernels-{src}-{_cpu_tag()}"


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

            for extra in (OPENMP, []):  # with OpenMP; without it if that build fails
                d = build_dir(CFLAGS + extra)
                d.mkdir(parents=True, exist_ok=True)
                try:
                    cpp_extension.load(name="zoo_cpu_kernels", sources=[str(f) for f in SOURCES],
                                       extra_cflags=CFLAGS + extra, extra_ldflags=list(extra), build_directory=str(d),
                                       is_python_module=False, verbose=False)
                    break
                except Exception:
                    if not extra:
                        raise
                    log.info("the C++ CPU kernels did not build with %s; trying without", extra)
            _state["ok"] = all(hasattr(torch.ops.zoo_cpu, op)
                               for op in ("binary_conv2d", "binary_conv2d_table", "linear_matches", "affine_input",
                                          "threshold_input", "epilogue", "epilogue_sum", "epilogue_split",
                                          "expanded_epilogue", "logact_levels", "rprelu", "dyadic_exponent",
                                          "ivit_softmax", "ivit_gelu", "ivit_layernorm"))
            if _state["ok"]:
                _register_fakes()
        except Exception as e:  # no compiler, no ninja, a failed build: the float32 path runs instead
            log.warning("the C++ CPU kernels could not be built (%s: %s); packed layers run on the cached "
                        "path's torch operations. Set ZOO_CPU_KERNELS=0 to skip trying.", type(e).__name__,
                        str(e).splitlines()[0] if str(e) else "")
    return _state["ok"]


def ready() -> bool:
    """Eager work can call the kernels: not inside a torch.compile trace (inductor fuses the torch
    operations there itself) nor a TorchScript/ONNX trace (which must record torch operations),
    enabled, and built."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # (ONNX export traces: is_tracing)
        return False
    return enabled() and available()


def _register_fakes() -> None:
    """Output shapes of the ops for torch.compile's tracing (the ops themselves stay opaque calls)."""

    @torch.library.register_fake("zoo_cpu::pack_signs")
    def _pack_signs(x, shift):
        n, c, h, w = x.shape
        return x.new_empty((n, h, w, (c + 63) // 64), dtype=torch.int64)

    def _input(x, u8, ch_last, cl_out):
        out = torch.empty_like(x, dtype=torch.uint8 if u8 else x.dtype)
        return out.contiguous(memory_format=torch.channels_last) if cl_out and x.dim() == 4 and not ch_last else out

    @torch.library.register_fake("zoo_cpu::affine_input")
    def _affine(x, shift, scale, offset, qmin, qmax, z, m, ch_last, u8=False, cl_out=False):
        return _input(x, u8, ch_last, cl_out)

    @torch.library.register_fake("zoo_cpu::threshold_input")
    def _threshold(x, shift, thresholds, z, m, ch_last, u8=False, cl_out=False):
        return _input(x, u8, ch_last, cl_out)

    def _subpixel_shape(acc, c, subpixel):
        return (acc.shape[0], c) + (tuple(subpixel[4:]) if subpixel is not None else tuple(acc.shape[2:]))

    @torch.library.register_fake("zoo_cpu::epilogue")
    def _epilogue(acc, scale, bias, ch_last, nchw=False, subpixel=None):
        if subpixel is not None:
            out = acc.new_empty(_subpixel_shape(acc, acc.shape[1] // (subpixel[0] * subpixel[1]), subpixel))
            return out if nchw else out.contiguous(memory_format=torch.channels_last)
        return acc.new_empty(acc.shape, dtype=torch.float32) if nchw else torch.empty_like(acc, dtype=torch.float32)

    @torch.library.register_fake("zoo_cpu::epilogue_sum")
    def _epilogue_sum(acc, d, scale, bias, nchw=False):
        if acc.dim() == 4:
            n, c, h, w = acc.shape
            out = acc.new_empty((n, c - 1, h, w))
            return out if nchw else out.contiguous(memory_format=torch.channels_last)
        return acc.new_empty(acc.shape[:-1] + (acc.shape[-1] - 1,))

    @torch.library.register_fake("zoo_cpu::epilogue_split")
    def _epilogue_split(acc, m, scale, bias, nchw=False):
        if acc.dim() == 4:
            n, c, h, w = acc.shape
            out = acc.new_empty((n, c // 2, h, w))
            return out if nchw else out.contiguous(memory_format=torch.channels_last)
        return acc.new_empty(acc.shape[:-1] + (acc.shape[-1] // 2,))

    @torch.library.register_fake("zoo_cpu::expanded_epilogue")
    def _expanded_epilogue(acc, c_q, c_1, z_w, z_a, scale, bias, nchw, subpixel=None):
        ca = acc.shape[1] // (subpixel[0] * subpixel[1]) if subpixel is not None else acc.shape[1]
        out = acc.new_empty(_subpixel_shape(acc, ca - 1, subpixel))
        return out if nchw else out.contiguous(memory_format=torch.channels_last)

    @torch.library.register_fake("zoo_cpu::binary_conv2d")
    def _conv(xbits, wbits, c_in, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, scale, bias):
        n, h, w, _ = xbits.shape
        kh, kw = wbits.shape[:2]
        co = scale.shape[0]
        oh = (h + 2 * pad_h - dil_h * (kh - 1) - 1) // stride_h + 1
        ow = (w + 2 * pad_w - dil_w * (kw - 1) - 1) // stride_w + 1
        return xbits.new_empty((n, co, oh, ow), dtype=torch.float32)

    @torch.library.register_fake("zoo_cpu::binary_conv2d_table")
    def _conv_table(xbits, wbits, c_in, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, table, residual, lo, hi,
                    pack_next, shift, linear=None, rprelu=None):
        n, h, w, _ = xbits.shape
        kh, kw = wbits.shape[:2]
        co = table.shape[0]
        oh = (h + 2 * pad_h - dil_h * (kh - 1) - 1) // stride_h + 1
        ow = (w + 2 * pad_w - dil_w * (kw - 1) - 1) // stride_w + 1
        bits = xbits.new_empty((n, oh, ow, (co + 63) // 64) if pack_next else (0,), dtype=torch.int64)
        return xbits.new_empty((n, co, oh, ow), dtype=torch.float32), bits


def affine_input(x: torch.Tensor, shift, scale: float, offset: float, qmin: float, qmax: float, z: float,
                 m: float, ch_last: bool, u8: bool = False, cl_out: bool = False) -> torch.Tensor:
    """(clamp(round((x - shift) / scale + offset), qmin, qmax) - z) * m in float32 (``u8``: as uint8, for
    values in [0, 255]), channels on dim 1 or (``ch_last``) the last dim: the cached path's folded input
    of affine activation codes. A 4-d channels-last x gives a channels-last result; so does any 4-d x
    with ``cl_out`` (the int8 convolutions' input layout)."""
    return torch.ops.zoo_cpu.affine_input(x, shift, scale, offset, qmin, qmax, z, m, ch_last, u8, cl_out)


def threshold_input(x: torch.Tensor, shift, thresholds: torch.Tensor, z: float, m: float, ch_last: bool,
                    u8: bool = False, cl_out: bool = False):
    """(number of thresholds below x - shift - z) * m in float32 or uint8 (N2UQ's codes, as torch.bucketize);
    layouts as in :func:`affine_input`."""
    return torch.ops.zoo_cpu.threshold_input(x, shift, thresholds, z, m, ch_last, u8, cl_out)


def epilogue(acc: torch.Tensor, scale: torch.Tensor, bias, ch_last: bool, nchw: bool = False,
             subpixel=None) -> torch.Tensor:
    """float32(float64(acc) * scale[c] + bias[c]), channels on dim 1 or (``ch_last``) the last dim; a 4-d
    channels-last acc gives a channels-last result, or with ``nchw`` a contiguous one. ``subpixel``:
    acc is a sub-pixel convolution's sums and [sh, sw, oh, ow, ho, wo] says where each output pixel's are
    (``onednn.ConvTranspose.subpixel``)."""
    return torch.ops.zoo_cpu.epilogue(acc, scale, bias, ch_last, nchw, subpixel)


def epilogue_sum(acc: torch.Tensor, d: torch.Tensor, scale: torch.Tensor, bias, nchw: bool = False) -> torch.Tensor:
    """float32((float64(acc[c]) + d[c] * float64(acc[C])) * scale[c] + bias[c]) for acc's C + 1 channels,
    channels last (the last dim or a 4-d channels-last tensor; the result keeps it, or with ``nchw`` is
    contiguous): the epilogue of int8 sums with per-channel shifted weights and, in the last channel,
    the sum of the inputs."""
    return torch.ops.zoo_cpu.epilogue_sum(acc, d, scale, bias, nchw)


def epilogue_split(acc: torch.Tensor, m: int, scale: torch.Tensor, bias, nchw: bool = False) -> torch.Tensor:
    """float32((float64(acc[c]) * m + float64(acc[C + c])) * scale[c] + bias[c]) for acc's 2 C channels,
    channels last (as in :func:`epilogue_sum`): the epilogue of int8 sums with weights split as m H + L."""
    return torch.ops.zoo_cpu.epilogue_split(acc, m, scale, bias, nchw)


def expanded_epilogue(acc: torch.Tensor, c_q, c_1, z_w: torch.Tensor, z_a: float, scale: torch.Tensor, bias,
                      nchw: bool, subpixel=None) -> torch.Tensor:
    """The expanded form's epilogue (``cached._expanded``, muL2Q's real zero points) in one pass over
    int8 convolution sums: acc N x (C + 1) x H x W (sum v q per channel, then sum v), c_q (C x H x W)
    and c_1 (H x W) when z_a != 0; float32(((a - z_w s) - z_a (c_q - z_w c_1)) * scale + bias) in
    float64, in ``_expanded``'s order; contiguous (``nchw``) or channels-last. ``subpixel``: as in
    :func:`epilogue`."""
    return torch.ops.zoo_cpu.expanded_epilogue(acc, c_q, c_1, z_w, z_a, scale, bias, nchw, subpixel)


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


def binary_conv2d_table(xbits, wbits, c_in, stride, padding, dilation, table, residual, lo: float, hi: float,
                        pack_next: bool = False, shift=None, linear=None, rprelu=None):
    """A W1A1 convolution with what follows it in a residual block, in one pass: clamp(table[o][sum + K]
    (+ residual), lo, hi) with K = C_in kh kw (``table[o]``: the values the layers after the convolution give
    each of its integer sums) -> (y, the signs of y - shift packed as :func:`pack_signs` packs them, or an
    empty tensor without ``pack_next``). ``linear`` (4 x C_out float64: scale, bias, alpha, beta): every
    table entry is fma(float32(float64(s) * scale + bias), alpha, beta) in float32 (the caller checked,
    :func:`linear_matches`), computed so instead of looked up. ``rprelu`` (3 x C_out float32: gamma, slope,
    zeta): ReActNet's RPReLU after the add instead of the clamp."""
    return torch.ops.zoo_cpu.binary_conv2d_table(xbits, wbits, c_in, stride[0], stride[1], padding[0], padding[1],
                                                 dilation[0], dilation[1], table, residual, lo, hi, pack_next,
                                                 shift, linear, rprelu)


def linear_matches(table: torch.Tensor, linear: torch.Tensor) -> torch.Tensor:
    """Per output channel: whether fma(float32(float64(s) * scale + bias), alpha, beta) in float32, as
    :func:`binary_conv2d_table` computes it with ``linear`` (4 x C_out: scale, bias, alpha, beta), equals
    table[o][s + K] bit for bit for every s in -K .. K."""
    return torch.ops.zoo_cpu.linear_matches(table, linear)


def logact_levels(x: torch.Tensor, l2: torch.Tensor, k: float, table: torch.Tensor) -> torch.Tensor:
    """The log2 / log-sqrt2 softmax quantizer's inference value from ``l2 = torch.log2(x / s)`` in one
    pass: table[clamp(x > 0 ? round(-k l2) : top, 0, top)] + (x - x) (``quantizers/logq.py``)."""
    return torch.ops.zoo_cpu.logact_levels(x, l2, k, table)


def dyadic_exponent(a: torch.Tensor, umax: float) -> int:
    """The largest e with umax * max_row sum|a| * 2^e < 2^24 if 0 <= e <= 100 and every a * 2^e is
    integer-valued, else -1: then ``a @ b`` for integer-valued b with |b| <= umax is exact in float32
    (``quantizers/attention.py``, ``_certified_float32_product``); two passes over a."""
    return torch.ops.zoo_cpu.dyadic_exponent(a, umax)


def rprelu(x: torch.Tensor, gamma: torch.Tensor, slope: torch.Tensor, zeta: torch.Tensor) -> torch.Tensor | None:
    """ReActNet's RPReLU ``where(y >= 0, y, slope * y) + zeta`` with ``y = x - gamma`` (per channel, dim 1)
    in one C++ pass, the same float32 values; None where it does not run (not eager float32 CPU
    inference with the kernels built): the caller's torch operations then."""
    if x.is_cuda or x.dtype != torch.float32 or x.dim() < 2:
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, gamma, slope, zeta)):
        return None  # (training: the torch form, without building the kernels)
    if not ready():
        return None
    return torch.ops.zoo_cpu.rprelu(x, gamma.detach(), slope.detach(), zeta.detach())


def ivit(op: str, x: torch.Tensor, s: float, *args) -> torch.Tensor | None:
    """I-ViT's integer ``op`` ("softmax", "gelu", "layernorm") over x's last dim in C++ (``csrc/ivit.cpp``),
    or None where it does not run: not eager float32 CPU inference with the kernels built, or a
    non-finite x (the torch functions then give their NaN/inf)."""
    if x.is_cuda or x.dtype != torch.float32 or not x.numel() or not ready():
        return None
    if torch.is_grad_enabled() and x.requires_grad:  # training-time gradients: the torch functions' ste
        return None
    y = getattr(torch.ops.zoo_cpu, f"ivit_{op}")(x.detach(), s, *args)
    return y if y.numel() else None
