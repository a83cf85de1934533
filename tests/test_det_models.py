"""The detection architectures (zoo/models/det.py): torchvision FCOS / RetinaNet on a narrow
ResNet-18 + FPN. Tiny nets (size 64, width 8) so each test runs in about a second on CPU."""
import pytest
import torch
from torch import nn

import zoo
from zoo.models.det import KEEP_LAYERS, PER_LEVEL_MODULES, STRIDES
from zoo.quantizers.quantize import quantized_layers

ARCHS = ("fcos_r18", "retinanet_r18")
LOSSES = {"fcos_r18": {"classification", "bbox_regression", "bbox_ctrness"},
          "retinanet_r18": {"classification", "bbox_regression"}}
SIZE, NUM_CLASSES = 64, 5


def tiny(arch, **kw):
    torch.manual_seed(0)
    return zoo.create_model(arch, num_classes=NUM_CLASSES, size=SIZE, width=8, **kw)


def batch():
    torch.manual_seed(1)
    x = torch.rand(2, 3, SIZE, SIZE)
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [35.0, 30.0, 60.0, 62.0]]),
                "labels": torch.tensor([0, NUM_CLASSES - 1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]  # no objects
    return x, targets


def check_detections(out, n, max_k):
    assert isinstance(out, list) and len(out) == n
    for d in out:
        assert set(d) == {"boxes", "scores", "labels"}
        k = len(d["scores"])
        assert 0 < k <= max_k
        assert d["boxes"].shape == (k, 4) and d["boxes"].dtype == torch.float32
        assert d["scores"].shape == (k,) and d["scores"].dtype == torch.float32
        assert d["labels"].shape == (k,) and d["labels"].dtype == torch.int64
        b = d["boxes"]
        assert (b >= 0).all() and (b[:, [0, 2]] <= SIZE).all() and (b[:, [1, 3]] <= SIZE).all()
        assert (b[:, 2:] >= b[:, :2]).all()  # xyxy
        assert ((d["labels"] >= 0) & (d["labels"] < NUM_CLASSES)).all()
        assert ((d["scores"] >= 0) & (d["scores"] <= 1)).all()
        assert (d["scores"][:-1] >= d["scores"][1:]).all()  # best first


@pytest.mark.parametrize("arch", ARCHS)
def test_eval_output_contract(arch):
    model = tiny(arch, score_thresh=0.0, detections_per_img=20).eval()
    with torch.no_grad():
        out = model(batch()[0])  # a N x 3 x H x W tensor, not a list
    check_detections(out, 2, 20)


@pytest.mark.parametrize("arch", ARCHS)
def test_train_losses_reach_every_parameter(arch):
    model = tiny(arch).train()
    x, targets = batch()
    losses = model(x, targets)
    assert set(losses) == LOSSES[arch]
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert {n.split(".")[0] for n, _ in params} == {"backbone", "head"}
    no_grad = [n for n, p in params if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.any()]
    assert not no_grad, no_grad
    # BatchNorm in the backbone (trained from scratch), GroupNorm in the head
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.body.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.head.modules())


@pytest.mark.parametrize("arch", ARCHS)
def test_score_thresh_and_detections_per_img_are_honoured(arch):
    model = tiny(arch, score_thresh=0.0, detections_per_img=3).eval()
    assert (model.score_thresh, model.detections_per_img, model.nms_thresh) == (0.0, 3, 0.5)
    assert model.transform.min_size == (SIZE,) and model.transform.max_size == SIZE
    x = batch()[0]
    with torch.no_grad():
        out = model(x)
    assert [len(d["boxes"]) for d in out] == [3, 3]
    thr = float(out[0]["scores"][1])  # between the best and the third score of image 0
    strict = tiny(arch, score_thresh=thr, detections_per_img=3).eval()
    strict.load_state_dict(model.state_dict())
    with torch.no_grad():
        out = strict(x)
    assert 1 <= len(out[0]["scores"]) <= 2 and (out[0]["scores"] > thr).all()
    assert all((d["scores"] > thr).all() for d in out)


@pytest.mark.parametrize("arch", ARCHS)
def test_head_modules_run_once_per_fpn_level(arch):
    model = tiny(arch).eval()
    calls = dict.fromkeys(PER_LEVEL_MODULES[arch], 0)
    for name in PER_LEVEL_MODULES[arch]:
        model.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: calls.__setitem__(name, calls[name] + 1))
    with torch.no_grad():
        model(batch()[0])
    assert calls == {n: len(STRIDES) for n in calls}


BODY = ["backbone.body.conv1"] + [f"backbone.body.layer{s}.{b}.conv{c}" for s in (1, 2, 3, 4)
                                  for b in (0, 1) for c in (1, 2)] \
    + [f"backbone.body.layer{s}.0.downsample.0" for s in (2, 3, 4)]
FPN = ["backbone.fpn.inner_blocks.0.0", "backbone.fpn.inner_blocks.1.0", "backbone.fpn.inner_blocks.2.0",
       "backbone.fpn.layer_blocks.0.0", "backbone.fpn.layer_blocks.1.0", "backbone.fpn.layer_blocks.2.0",
       "backbone.fpn.extra_blocks.p6", "backbone.fpn.extra_blocks.p7"]
HEAD = {
    "fcos_r18": [f"head.{branch}.conv.{i}" for branch in ("classification_head", "regression_head")
                 for i in (0, 3, 6, 9)]
    + ["head.classification_head.cls_logits", "head.regression_head.bbox_reg", "head.regression_head.bbox_ctrness"],
    "retinanet_r18": [f"head.{branch}.conv.{i}.0" for branch in ("classification_head", "regression_head")
                      for i in range(4)]
    + ["head.classification_head.cls_logits", "head.regression_head.bbox_reg"],
}


@pytest.mark.parametrize("arch", ARCHS)
def test_quantize_covers_backbone_fpn_and_head(arch):
    model = tiny(arch, score_thresh=0.0)
    float_sd = {k: v.clone() for k, v in model.state_dict().items()}
    assert [n for n in KEEP_LAYERS[arch] if not isinstance(model.get_submodule(n), nn.Conv2d)] == []
    keep = {n: zoo.LayerQuant(zoo.LSQ(8), zoo.LSQ(8)) for n in KEEP_LAYERS[arch]}
    zoo.quantize(model, zoo.QuantConfig(weight=zoo.LSQ(4), act=zoo.LSQ(4), overrides=keep))
    layers = dict(quantized_layers(model))
    assert sorted(layers) == sorted(BODY + FPN + HEAD[arch])
    assert not [n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]  # nothing left float
    assert {n for n, m in layers.items() if m.spec.weight.bits == 8} == set(KEEP_LAYERS[arch])
    assert all(m.spec.act.bits == (8 if n in KEEP_LAYERS[arch] else 4) for n, m in layers.items())
    # the float state dict still loads (the quantizer state is extra), and the quantized net trains and runs
    model.load_state_dict(float_sd)
    x, targets = batch()
    losses = model.train()(x, targets)
    assert set(losses) == LOSSES[arch] and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    with torch.no_grad():
        check_detections(model.eval()(x), 2, 100)


@pytest.mark.parametrize("kwargs, match", [
    ({"size": 0}, "size must be an int >= 32, got 0"),
    ({"width": "8"}, "width must be an int >= 1, got '8'"),
    ({"num_classes": 0}, "num_classes must be an int >= 1, got 0"),
    ({"score_thresh": 1.5}, r"score_thresh must be a number in \[0, 1\], got 1.5"),
    ({"detections_per_img": 0}, "detections_per_img must be an int >= 1, got 0"),
    ({"min_size": 800}, r"argument\(s\) \['min_size'\] are set by the factory"),
    ({"weights_backbone": "DEFAULT"}, r"argument\(s\) \['weights_backbone'\] are set by the factory"),
])
@pytest.mark.parametrize("arch", ARCHS)
def test_bad_arguments_name_the_value(arch, kwargs, match):
    with pytest.raises(ValueError, match=match):
        zoo.create_model(arch, **kwargs)


def test_registered_and_unknown_arch_is_named():
    assert {"fcos_r18", "retinanet_r18"} <= set(zoo.list_archs())
    with pytest.raises(ValueError, match=r"unknown architecture 'fcos_r99'; valid: .*'fcos_r18'.*'retinanet_r18'"):
        zoo.create_model("fcos_r99.w4a4")
