"""The mmdet path (arch=mmdet, zoo/models/mmdet_adapter.py): an mmdet detector from a bundled config,
behind torchvision's detection contract, quantized, trained and released by task=det. Marked `mmdet`;
skipped with the reason when mmdet (with a compiled mmcv) is not installed: bash scripts/install_mmdet.sh."""
import math

import pytest
import torch

import zoo

pytestmark = pytest.mark.mmdet
try:
    import mmdet  # noqa: F401
    from mmcv.ops import nms  # noqa: F401
except ImportError as e:  # a module-level skip names what is missing and how to get it
    pytest.skip(f"mmdet path not installed ({e}): bash scripts/install_mmdet.sh", allow_module_level=True)

from zoo.models.mmdet_adapter import ACT_LEVELS, KEEP_LAYERS, bundled_configs  # noqa: E402
from zoo.quantizers.quantize import quantized_layers  # noqa: E402

SIZE, NUM_CLASSES = 64, 3
CONFIG = "retinanet/retinanet_r18_fpn_1x_coco.py"


def tiny(**kw):
    torch.manual_seed(0)
    return zoo.create_model("mmdet", config=CONFIG, num_classes=NUM_CLASSES, size=SIZE, width=8, **kw)


def batch():
    torch.manual_seed(1)
    x = torch.rand(2, 3, SIZE, SIZE)
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    return x, targets


def test_bundled_config_builds_narrow_and_from_scratch():
    assert CONFIG in bundled_configs("retinanet")
    net = tiny()
    det = net.detector
    assert type(det).__name__ == "RetinaNet" and det.bbox_head.num_classes == NUM_CLASSES
    assert det.backbone.conv1.out_channels == 8 and det.neck.fpn_convs[0].conv.out_channels == 16
    assert det.backbone.frozen_stages == -1 and not det.backbone.norm_eval
    # images go through mmdet's own preprocessor, normalised as the torchvision detectors are (ImageNet)
    assert type(det.data_preprocessor).__name__ == "DetDataPreprocessor"
    x = torch.rand(2, 3, SIZE, SIZE)
    inputs, samples = net.eval()._preprocess(x)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(inputs, (x - mean) / std, atol=1e-5)
    assert samples[0].batch_input_shape == (SIZE, SIZE) and samples[0].img_shape == (SIZE, SIZE)
    # mmdet's initialisation ran: the focal-loss prior on the class bias, -log((1 - 0.01) / 0.01)
    assert torch.allclose(det.bbox_head.retina_cls.bias, torch.full_like(det.bbox_head.retina_cls.bias, -4.59512), atol=1e-4)


def test_unknown_config_names_valid_ones():
    with pytest.raises(ValueError, match=r"config='retinanet/nope.py' is not a config bundled in mmdet.*valid: .*retinanet_r18"):
        zoo.create_model("mmdet", config="retinanet/nope.py")


def test_contract_and_losses_reach_every_parameter():
    net = tiny(score_thresh=0.0, detections_per_img=7)
    x, targets = batch()
    losses = net.train()(x, targets)
    assert set(losses) == {"loss_cls", "loss_bbox"} and all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    with torch.no_grad():
        out = net.eval()(x)
    assert len(out) == 2
    for d in out:
        k = len(d["scores"])
        assert 0 < k <= 7 and d["boxes"].shape == (k, 4) and d["labels"].dtype == torch.int64
        assert ((d["labels"] >= 0) & (d["labels"] < NUM_CLASSES)).all()
        assert (d["boxes"] >= 0).all() and (d["boxes"] <= SIZE).all()


def test_quantize_covers_backbone_neck_and_head_with_per_level_sites():
    from zoo.quantizers.sites import MultiSiteAct

    net = tiny()
    lsq = zoo.LayerQuant(zoo.LSQ(4), zoo.LSQ(4), act_sites=5)
    keep = {n: zoo.LayerQuant(zoo.MinMax(8), zoo.MinMax(8)) for n in KEEP_LAYERS}
    zoo.quantize(net, zoo.QuantConfig(weight=zoo.LSQ(4), act=zoo.LSQ(4), overrides={**keep, **dict.fromkeys(ACT_LEVELS, lsq)}))
    layers = dict(quantized_layers(net))
    assert not [n for n, m in net.named_modules() if type(m) is torch.nn.Conv2d]
    assert any(n.startswith("detector.backbone.") for n in layers) and any(n.startswith("detector.neck.") for n in layers)
    assert layers["detector.backbone.conv1"].spec.weight.bits == 8
    assert isinstance(layers["detector.bbox_head.cls_convs.0.conv"].aq, MultiSiteAct)
    x, targets = batch()
    sum(net.train()(x, targets).values()).backward()  # five calls per head forward: no site error


def test_save_load_same_detections_and_heads(tmp_path):
    """An mmdet RetinaNet quantized W4A4 with per-level head sites: save -> load gives the same head
    outputs and the same detections, and the packed form computes the training form's heads."""
    from tests.test_det_task import save_load_same_detections
    from zoo.tasks.det.task import head_outputs

    net = tiny(score_thresh=0.0, detections_per_img=20)
    lsq = zoo.LayerQuant(zoo.LSQ(4, "channel"), zoo.LSQ(4), act_sites=5)
    keep = {n: zoo.LayerQuant(zoo.MinMax(8, "channel"), zoo.MinMax(8)) for n in KEEP_LAYERS}
    q = zoo.QuantConfig(weight=zoo.LSQ(4, "channel"), act=zoo.LSQ(4), overrides={**dict.fromkeys(ACT_LEVELS, lsq), **keep})
    zoo.quantize(net, q)
    x, targets = batch()
    net.train()(x, targets)  # the quantizers see data
    args = {"config": CONFIG, "num_classes": NUM_CLASSES, "size": SIZE, "width": 8, "score_thresh": 0.0,
            "detections_per_img": 20}
    model = zoo.ZooModel(net, "mmdet", args, "det", {"channels": 3, "size": [SIZE, SIZE], "classes": list("abc")}, q).eval()
    _, expected_heads = save_load_same_detections(model, x, tmp_path / "ck", NUM_CLASSES)
    # N x anchors x (classes + 4): 9 anchors per position over P3-P7 of a 64 px image
    positions = sum(math.ceil(SIZE / s) ** 2 for s in (8, 16, 32, 64, 128))  # P7 of 64 px: 1 x 1
    assert expected_heads.shape == (2, 9 * positions, NUM_CLASSES + 4)
    train_heads = head_outputs(model, x)
    assert (train_heads - expected_heads).abs().median() < 1e-3 * max(train_heads.abs().max(), 1.0)


def test_train_release_and_reload_through_the_det_task(tmp_path):
    """python -m zoo.train task=det arch=mmdet per_level_act=true, two steps on tiny built-in splits:
    a release that loads by itself, follows the contract and matches its golden pair."""
    from tests.test_det_task import det_cfg
    from zoo.cards import read_golden
    from zoo.tasks.det.task import head_outputs
    from zoo.train import run

    cfg = det_cfg(tmp_path, "arch=mmdet", "per_level_act=true")
    out = run(cfg)
    rel = out["release_dir"]
    assert out["global_step"] == 2
    loaded = zoo.load(rel)
    assert loaded.arch == "mmdet" and loaded.net.detector.bbox_head.num_classes == 10
    q = loaded.quant.to_dict()["overrides"]
    assert q["detector.backbone.conv1"]["weight"]["bits"] == 8 and q["detector.bbox_head.cls_convs.*"]["act_sites"] == 5
    x, expected = read_golden(rel)
    assert (head_outputs(loaded, x) - expected).abs().max() <= 1e-4 * max(expected.abs().max(), 1.0)
    with torch.no_grad():
        dets = loaded(x)
    assert len(dets) == len(x) and all(d["labels"].dtype == torch.int64 for d in dets)
    assert 0 <= out["metrics"]["test_map"] <= 1
