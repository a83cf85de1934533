"""Compile every Triton kernel variant for a CUDA architecture ahead of time, no GPU needed.

    python -m zoo.kernels.aot --arch 90

Runs Triton's full pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the bundled ptxas) for each
variant the layers can launch and reports what the PTX uses: tensor-core MMAs on s8 operands for
the int8 GEMM and the binary ``dot`` kernel, ``popc`` for the binary ``popcount`` kernel. This is
how CI checks the GPU code path on a machine without a GPU; it cannot run under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import argparse
import sys
import time

I32 = "i32"


def _variants():
    from . import triton_binary as tb
    from . import triton_lowbit as tl_

    work = {"part_ptr": "*i32", "upart_ptr": "*i32", "count_ptr": "*i32"}
    igemm_sig = {"a_ptr": "*i8", "w_ptr": "*u8", "y_ptr": "*fp32", "usum_ptr": "*i32", "bsum_ptr": "*i32",
                 "wzi_ptr": "*i32", "ws_ptr": "*fp32", "wz_ptr": "*fp32", "bias_ptr": "*fp32", **work,
                 "s_a": "fp32"}
    igemm_sig.update({n: I32 for n in ("pa M N K KB C H W OH OW s_n s_c s_h s_w stride_h stride_w "
                                       "pad_h pad_w dil_h dil_w").split()})
    quant_sig = {"x_ptr": "*fp16", "a_ptr": "*i8", "shift_ptr": "*fp32", "numel": I32, "C": I32,
                 "HW": I32, "scale": "fp32", "offset": "fp32", "qmin": "fp32", "qmax": "fp32", "c": "fp32"}
    pack_sig = {"x_ptr": "*fp16", "out_ptr": "*i32", "shift_ptr": "*fp32"}
    pack_sig.update({n: I32 for n in "P C HW CW s_n s_c s_p".split()})
    bin_sig = {"a_ptr": "*i32", "w_ptr": "*i32", "y_ptr": "*fp16", "usum_ptr": "*i32", "ws_ptr": "*fp32",
               "wz_ptr": "*fp32", "bias_ptr": "*fp32", **work, "s_a": "fp32"}
    bin_sig.update({n: I32 for n in ("M N C H W OH OW CW KT stride_h stride_w pad_h pad_w dil_h "
                                     "dil_w").split()})
    out = []
    for sb, kh, relu, raw, centred, split in [(8, 3, False, False, False, 1), (4, 3, True, False, True, 4),
                                              (2, 1, False, False, False, 2), (1, 3, False, True, False, 1)]:
        out.append((f"igemm SB={sb} {kh}x{kh} relu={relu} raw={raw} c={centred:d} sk={split}",
                    tl_._igemm_kernel, igemm_sig,
                    dict(KH=kh, KW=kh, SB=sb, HAS_BIAS=True, RELU=relu, RAW=raw, CENTRED=centred,
                         BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, SPLIT_K=split), "mma"))
    for sign, shift in [(False, False), (False, True), (True, True)]:  # affine+shift: RLQ
        out.append((f"quantize_act sign={sign} shift={shift}", tl_._quant_act_kernel, quant_sig,
                    dict(SIGN=sign, HAS_SHIFT=shift, BLOCK=tl_.QUANT_BLOCK), None))
    out.append(("pack_signs shift=True", tb._pack_signs_kernel, pack_sig,
                dict(HAS_SHIFT=True, BLOCK_P=tb.PACK_BLOCK), None))
    for impl, (bm, bn, bk, sk) in [("popcount", (32, 64, 2, 4)), ("dot", (64, 64, 2, 1))]:
        out.append((f"binary {impl} 3x3 sk={sk}", tb._binary_kernel, bin_sig,
                    dict(KW=3, DOT=impl == "dot", USE_LIBDEVICE=True, HAS_BIAS=True, RELU=False,
                         RAW=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk),
                    "mma" if impl == "dot" else "popc"))
    return out


def compile_all(arch: int = 90) -> list[dict]:
    """Compile each variant for ``sm_<arch>``; one result dict per variant (raises on failure)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .triton_lowbit import INTERPRET

    if INTERPRET:
        raise RuntimeError("unset TRITON_INTERPRET to compile kernels for a GPU")
    results = []
    for name, kernel, sig, consts, expect in _variants():
        t = time.perf_counter()
        src = ASTSource(kernel, {**sig, **{k: "constexpr" for k in consts}}, consts)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"enable_fp_fusion": False})
        ptx = k.asm["ptx"]
        results.append(dict(name=name, seconds=time.perf_counter() - t, cubin_bytes=len(k.asm["cubin"]),
                            shared=k.metadata.shared, expect=expect,
                            s8_mma=any("mma" in ln and ".s8" in ln for ln in ptx.splitlines()),
                            popc="popc.b32" in ptx))
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90")
    args = ap.parse_args(argv)
    bad = 0
    print(f"{'kernel':<48} {'s':>5} {'cubin B':>8} {'smem B':>7}  s8 mma  popc")
    for r in compile_all(args.arch):
        ok = {"mma": r["s8_mma"], "popc": r["popc"], None: True}[r["expect"]]
        bad += not ok
        print(f"{r['name']:<48} {r['seconds']:5.1f} {r['cubin_bytes']:8d} {r['shared']:7d}  "
              f"{str(r['s8_mma']):<6}  {str(r['popc']):<5}{'' if ok else '  <- expected ' + r['expect']}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
