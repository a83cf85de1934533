"""Packed models under torch.compile on CPU: no graph breaks in the quantized layers (dynamo's own
account, ``torch._dynamo.explain``) for one shipped model of each kind of packed layer, and a compiled
model's outputs equal to eager ones bit for bit."""
import pytest
import torch
from torch import nn

import zoo
from zoo.cards import read_golden
from zoo.kernels import cached
from zoo.registry import resolve_checkpoint

# one shipped model per path through zoo/kernels/cached.py
KINDS = {
    "resnet20.lsq_w4a4_fmnist": "folded, float32 sums",
    "resnet20.ptq_w8a8_fmnist": "folded, 8-bit (float32 sums under the rows' L1 bound)",
    "vit_tiny_p4.ptq_w8a8_fmnist": "ViT: quantized attention matmuls (integer sums) and softmax",
    "vit_tiny_p4.repq_w4a4_fmnist": "ViT: log-sqrt2 softmax quantizer",
    "resnet20.irnet_w1a1_fmnist": "W1A1 through the C++ kernel",
    "resnet20.react_w1a1_fmnist": "W1A1 with RSign thresholds",
    "resnet20.n2uq_w2a2_fmnist": "N2UQ threshold activations",
    "unet_r18.ul2q_w4a4_sal_scenes": "muL2Q expanded form",
    "linknet_r18.ul2q_w2a2_sal_scenes": "muL2Q transposed convs",
}


def _explain(model, *args):
    torch._dynamo.reset()
    with torch.no_grad():
        ex = torch._dynamo.explain(model)(*args)
    torch._dynamo.reset()
    return ex


@pytest.mark.parametrize("name", list(KINDS))
def test_shipped_models_trace_without_graph_breaks(name):
    if name not in zoo.list_models():
        pytest.skip(f"{name} is not shipped")
    model = zoo.load(name)
    x = read_golden(resolve_checkpoint(name))[0][:2]
    ex = _explain(model, x)
    reasons = [f"{b.reason[:120]} at {b.user_stack[-1].filename}:{b.user_stack[-1].lineno}"
               for b in ex.break_reasons if b.user_stack]
    assert ex.graph_break_count == 0 and ex.graph_count == 1, (KINDS[name], reasons)


def test_a_plan_missing_at_trace_time_breaks_the_graph_and_is_built():
    """Without zoo.load's prepare (a model packed by hand, never called), the trace builds the plan
    itself: correct, but with graph breaks; cached.prepare removes them."""
    torch.manual_seed(0)
    net = zoo.quantize(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)), zoo.QuantConfig(weight=zoo.LSQ(4), act=zoo.LSQ(4)))
    net.train()(torch.randn(4, 3, 6, 6))
    net = zoo.to_packed(net.eval())
    x = torch.randn(2, 3, 6, 6)
    assert _explain(net, x).graph_break_count > 0
    cached.clear(net)
    cached.prepare(net)
    assert _explain(net, x).graph_break_count == 0


def test_compiled_equals_eager_bit_for_bit():
    """A real inductor compile (C++ codegen) of a small packed network with a float32 folded conv, a W1A1
    conv through the C++ kernel, a float64 8-bit conv, a muL2Q transposed conv and a linear layer."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 128, 3, padding=1)
            self.b = nn.Conv2d(128, 128, 3, padding=1, bias=False)
            self.c = nn.Conv2d(128, 8, 3, padding=1)  # K = 1152, positive weights: 8-bit sums pass 2^24
            self.d = nn.ConvTranspose2d(8, 4, 2, stride=2)
            self.e = nn.Linear(4 * 12 * 12, 5)

        def forward(self, x):
            x = torch.relu(self.a(x))
            x = self.b(x) + x
            x = self.d(torch.relu(self.c(x)))
            return self.e(x.flatten(1))

    net = Net()
    with torch.no_grad():
        net.c.weight.uniform_(0.5, 1.0)  # rows' L1 norms large enough for the float64 plan
    cfg = zoo.QuantConfig(weight=zoo.LSQ(4), act=zoo.LSQ(4), overrides={
        "b": zoo.LayerQuant(zoo.IRNet(1), zoo.IRNet(1)), "c": zoo.LayerQuant(zoo.MinMax(8), zoo.MinMax(8)),
        "d": zoo.LayerQuant(zoo.UL2Q(2), zoo.UL2Q(2))})
    zoo.quantize(net, cfg)
    net.train()
    for _ in range(3):
        net(torch.randn(8, 3, 6, 6))
    net = zoo.to_packed(net.eval())
    cached.prepare(net)
    kinds = {n: next(iter(m.__dict__["_cpu_cache"]["plans"].values()))[1] for n, m in net.named_children()}
    assert kinds["a"].w.dtype == torch.float32 and kinds["b"].bits is not None
    assert kinds["c"].w.dtype == torch.float64 and kinds["d"].kind == "expanded"
    x = torch.randn(4, 3, 6, 6)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = net(x)
        compiled = torch.compile(net)(x)
    torch._dynamo.reset()
    assert torch.equal(compiled, eager), (compiled - eager).abs().max()
