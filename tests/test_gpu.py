"""Checks that only a CUDA GPU can run (``pytest -m gpu``; deselected by default, skipped without one).

The interpreted kernel tests (test_kernels_triton.py) also run on a GPU, at small shapes with explicit
tiles. These run what the autotuner picks at the benchmarked layer shapes (split-K included), in fp16
and fp32, against the reference bit for bit, and a packed model captured in a CUDA graph.
"""
import pytest
import torch

import zoo
from zoo.quantizers.packed import PackedConv2d, PackedLinear

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

LAYERS = [("conv", 14, 256, 1), ("conv", 7, 512, 1), ("conv", 7, 512, 8), ("conv", 28, 128, 8),
          ("linear", 0, 4096, 1), ("linear", 0, 4096, 256)]
KINDS = [(8, "affine", "auto"), (4, "affine", "auto"), (2, "affine", "auto"), (1, "sign", "popcount"),
         (1, "sign", "dot")]


def _layer(kind, c, bits, act, kernel):
    g = torch.Generator().manual_seed(bits * 7 + c)
    layer = (PackedConv2d((c, c, 3, 3), bits, act, True, padding=1) if kind == "conv"
             else PackedLinear((c, c), bits, act, True))
    layer.qweight.copy_(torch.randint(0, 256, layer.qweight.shape, generator=g, dtype=torch.uint8))
    layer.w_scale.copy_(torch.rand(c, generator=g) * 0.02 + 0.001)
    layer.w_zero.fill_(0.5 if bits == 1 else 2 ** (bits - 1))
    layer.bias.normal_(generator=g)
    if act == "affine":
        layer.a_scale.fill_(0.05), layer.a_offset.zero_(), layer.a_zero.zero_()
        layer.a_qmin.fill_(-128), layer.a_qmax.fill_(127)
    layer.binary_kernel = kernel
    return layer.cuda()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("bits,act,kernel", KINDS)
@pytest.mark.parametrize("kind,hw,c,batch", LAYERS)
def test_autotuned_kernels_bit_exact_at_benchmark_shapes(kind, hw, c, batch, bits, act, kernel, dtype):
    layer = _layer(kind, c, bits, act, kernel)
    shape = (batch, c, hw, hw) if kind == "conv" else (batch, c)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(batch)).to("cuda", dtype)
    with torch.no_grad():
        layer.backend = "reference"
        y_ref = layer(x)
        layer.backend = "triton"
        for _ in range(3):  # the first call autotunes; later calls reuse the split-K workspace
            y = layer(x)
            diff = (y.float() - y_ref.float()).abs()
            assert torch.equal(y, y_ref), (f"{int((diff > 0).sum())} of {y.numel()} outputs differ, "
                                           f"max {float(diff.max()):.3g}")
    from zoo.kernels.triton_lowbit import split_workspace

    assert not any(t.any() for t in split_workspace(x.device, 1, 1))  # left zeroed


def test_packed_model_in_a_cuda_graph_equals_eager():
    model = zoo.load("resnet20.lsq_w4a4_fmnist", backend="triton", map_location="cuda")
    x = torch.rand(8, 1, 28, 28, device="cuda")
    with torch.no_grad():
        eager = model(x)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            model(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(x)
        x.copy_(torch.rand(8, 1, 28, 28, device="cuda"))
        graph.replay()
        assert torch.equal(out, model(x))
        assert not torch.equal(out, eager)
