"""The detection task (zoo/tasks/det): `python -m zoo.train task=det` end to end on tiny data, the
release's call contract and golden pair, save -> load, keep-layers per arch, evaluate(), zoo.predict's
PNG + COCO results JSON, and the release hooks (cards, summary table, benchmark loader)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from PIL import Image
from torch import nn

import zoo
from tests.conftest import needs_fmnist
from zoo.checkpoint import packed_copy
from zoo.models.det import KEEP_LAYERS
from zoo.quantizers.quantize import quantized_layers
from zoo.tasks import get_task
from zoo.tasks.det.task import DetectionTask, evaluate, head_outputs

ARCHS = tuple(KEEP_LAYERS)
SIZE, CLASSES = 64, ["a", "b", "c"]


COMPOSITES = ("data.train_size=8", "data.val_size=4", "data.test_size=4")  # tiny built-in splits


def det_cfg(tmp, *overrides, data=COMPOSITES):
    with initialize_config_module(config_module="zoo.configs", version_base="1.3"):
        return compose("train", overrides=[
            "task=det", "bits=4", "epochs=1", "batch_size=4", f"data.size={SIZE}", *data,
            "limit_train_batches=2", "init_from=null",
            "+model_args.width=8", f"output_dir={tmp}", "trainer.log_every_n_steps=1",
            "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false", *overrides])


def tiny_model(arch="fcos_r18", bits=4, contract=None, quant=(), **kw):
    """A quantized tiny detector (keep layers at 8 bits as the task config says) whose quantizers have
    seen one training batch. ``quant``: more command-line overrides (``per_level_act=true``, ...)."""
    from zoo.train import quant_dict

    torch.manual_seed(0)
    cfg = det_cfg("unused", f"bits={bits}", *quant)
    args = {"num_classes": len(CLASSES), "size": SIZE, "width": 8, **dict(cfg.quant.model_args), **kw}
    net = zoo.create_model(arch, **args)
    qcfg = zoo.QuantConfig.from_dict(quant_dict(cfg))
    zoo.quantize(net, qcfg)
    contract = {"channels": 3, "size": [SIZE, SIZE], "classes": CLASSES, **(contract or {})}
    model = zoo.ZooModel(net, arch, args, "det", contract, qcfg)
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[20.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([2])}]
    model.train()
    model.net(x, targets)  # initialises the quantizers from data
    return model.eval(), x


def check_contract(out, n, num_classes, size=SIZE):
    assert isinstance(out, list) and len(out) == n
    for d in out:
        assert set(d) == {"boxes", "scores", "labels"}
        k = len(d["scores"])
        assert d["boxes"].shape == (k, 4) and d["boxes"].dtype == torch.float32
        assert d["labels"].dtype == torch.int64 and ((d["labels"] >= 0) & (d["labels"] < num_classes)).all()
        assert ((d["scores"] >= 0) & (d["scores"] <= 1)).all()
        assert ((d["boxes"] >= 0) & (d["boxes"] <= size)).all() and (d["boxes"][:, 2:] >= d["boxes"][:, :2]).all()


# ----------------------------------------------------------------------------- config
def test_det_defaults_compose():
    with initialize_config_module(config_module="zoo.configs", version_base="1.3"):
        cfg = compose("train", overrides=["task=det"])
    assert cfg.task.name == "det" and cfg.arch == "fcos_r18" and cfg.data.name == "det_composites"
    assert cfg.quant.name == "lsq" and cfg.name == "fcos_r18.lsq_w4a4_det_composites"
    assert cfg.init_from == "fcos_r18.fp32_det_composites" and cfg.keep_bits == 8
    assert cfg.batch_size == 16 and cfg.optimizer == "adamw" and cfg.data.size == 128
    # the union of every arch's first conv and final cls / box convs
    from zoo.models.mmdet_adapter import KEEP_LAYERS as MMDET_KEEP

    assert set(cfg.task.keep_layers) == {n for names in KEEP_LAYERS.values() for n in names} | set(MMDET_KEEP)
    with initialize_config_module(config_module="zoo.configs", version_base="1.3"):
        cfg = compose("train", overrides=["task=det", "data=coco", "data.root=/x", "arch=retinanet_r18", "bits=8"])
    assert cfg.name == "retinanet_r18.lsq_w8a8_coco" and cfg.data.size == 128


def test_model_args_on_the_command_line_need_no_plus():
    """python -m zoo.train task=det model_args.width=16 (as the task's usage line says) sets the arch's
    argument; an explicit +model_args.x=... is left as the user wrote it."""
    from zoo.train import open_model_args

    argv = ["task=det", "model_args.width=16", "model_args.config=retinanet/x.py", "+model_args.act=hardtanh"]
    assert open_model_args(argv) == ["task=det", "++model_args.width=16", "++model_args.config=retinanet/x.py",
                                     "+model_args.act=hardtanh"]
    with initialize_config_module(config_module="zoo.configs", version_base="1.3"):
        cfg = compose("train", overrides=open_model_args(argv))
    assert dict(cfg.model_args) == {"width": 16, "config": "retinanet/x.py", "act": "hardtanh"}


@pytest.mark.parametrize("arch", ARCHS)
def test_keep_layers_of_each_arch_stay_at_8_bits(arch):
    model, _ = tiny_model(arch)
    layers = dict(quantized_layers(model.net))
    assert set(KEEP_LAYERS[arch]) <= set(layers)
    assert {n for n, m in layers.items() if m.spec.weight.bits == 8} == set(KEEP_LAYERS[arch])
    assert all(m.spec.act.bits == (8 if n in KEEP_LAYERS[arch] else 4) for n, m in layers.items())


def test_task_hooks():
    task = get_task("det")
    assert task is DetectionTask and task.monitor == ("val/map", "max")
    contract = {"channels": 3, "size": [96, 96], "classes": CLASSES}
    assert task.data_model_args(contract) == {"num_classes": 3, "size": 96}
    assert task.contract_fits(contract, {**contract, "size": [128, 128]})
    assert not task.contract_fits(contract, {**contract, "classes": CLASSES[:2]})
    assert not task.contract_fits(contract, {**contract, "channels": 1})
    with pytest.raises(ValueError, match=r"distill=0.5 is not supported for task=det"):
        DetectionTask(arch="fcos_r18", model_args={}, input_contract=contract, distill=0.5)


# ----------------------------------------------------------------------------- train end to end
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from zoo.train import run

    tmp = tmp_path_factory.mktemp("det_run")
    return tmp, run(det_cfg(tmp))


@needs_fmnist
def test_run_det_two_steps_end_to_end(trained):
    tmp, out = trained
    m = out["metrics"]
    assert out["global_step"] == 2
    for k in ("test_map", "test_map50", "test_map75", "test_map_training_form", "best_val"):
        assert k in m and 0 <= m[k] <= 1, k
    assert m["test_images"] == 4
    rel = Path(out["release_dir"])
    cfg = json.loads((rel / "config.json").read_text())
    assert cfg["task"] == "det" and cfg["arch"] == "fcos_r18"
    assert cfg["model_args"] == {"num_classes": 10, "size": SIZE, "width": 8}
    assert cfg["input_contract"]["classes"][0] == "T-shirt/top" and len(cfg["input_contract"]["classes"]) == 10
    from zoo.models.mmdet_adapter import KEEP_LAYERS as MMDET_KEEP

    assert set(cfg["quant"]["overrides"]) == {n for names in KEEP_LAYERS.values() for n in names} | set(MMDET_KEEP)
    assert Image.open(rel / "sample.png").size[1] > Image.open(rel / "sample.png").size[0]  # a row per image
    assert (tmp / "samples" / "epoch_000.png").is_file()
    card = (rel / "README.md").read_text()
    assert f"mAP {m['test_map']:.4f}" in card and "4-bit layers" in card and "8-bit layers" in card
    assert "](sample.png)" in card and "detections.json" in card
    csv = next((tmp / "csv").rglob("metrics.csv")).read_text().splitlines()[0]
    for key in ("val/map", "val/map50", "val/map75", "train/loss_step", "train/classification_step",
                "train/bbox_regression_step", "train/bbox_ctrness_step", "test/map"):
        assert key in csv, key


@needs_fmnist
def test_released_model_follows_the_contract_and_its_golden_pair(trained):
    from zoo.cards import read_golden

    _, out = trained
    rel = Path(out["release_dir"])
    loaded = zoo.load(rel)
    assert loaded.task == "det" and loaded.quant.weight.bits == 4 and not loaded.training
    x, expected = read_golden(rel)
    assert x.shape == (1, 3, SIZE, SIZE)
    with torch.no_grad():
        check_contract(loaded(x), 1, 10)
    got = head_outputs(loaded, x)
    assert got.shape == expected.shape and got.shape[-1] == 10 + 4 + 1  # classes, box, centerness
    assert (got - expected).abs().max() <= 1e-4 * max(expected.abs().max(), 1.0)


@needs_fmnist
def test_summary_table_and_benchmark_loader(trained):
    from zoo.cards import summary_table

    _, out = trained
    rel = Path(out["release_dir"])
    table = summary_table(rel.parent)
    assert "| model | mAP |" in table and f"[{rel.name}]" in table
    loaded = zoo.load(rel)
    loader, desc = DetectionTask.benchmark_loader(loaded, None, 3)
    x, targets = next(iter(loader))
    assert x.shape == (3, 3, SIZE, SIZE) and len(targets) == 3 and f"{SIZE}x{SIZE}" in desc
    assert 0 <= evaluate(loaded, loader, progress=False)["map"] <= 1


@needs_fmnist
def test_fine_tune_the_quantized_release(trained, tmp_path, caplog):
    """init_from=<the quantized release>: its training form is rebuilt and checked against the release on
    the heads' raw outputs (detections are no tensor to compare), then training goes on."""
    import logging

    from zoo.train import run

    _, first = trained
    with caplog.at_level(logging.INFO, logger="zoo.tasks.init_from"):
        out = run(det_cfg(tmp_path, f"init_from={first['release_dir']}", "limit_train_batches=1"))
    assert "training form rebuilt from the packed release" in caplog.text
    assert out["global_step"] == 1 and 0 <= out["metrics"]["test_map"] <= 1


PER_LEVEL = ("per_level_act=true",)
BINARY_BODY = ("quant=irnet_body",)
VARIANTS = [(a, 4, ()) for a in ARCHS] + [("fcos_r18", 4, PER_LEVEL), ("fcos_r18", 1, BINARY_BODY)]


def test_per_level_head_quantizers_from_the_config():
    from zoo.models.det import PER_LEVEL_MODULES, STRIDES
    from zoo.quantizers.sites import MultiSiteAct

    model, x = tiny_model("fcos_r18", quant=PER_LEVEL)
    layers = dict(quantized_layers(model.net))
    per_level = {n for n, m in layers.items() if isinstance(m.aq, MultiSiteAct)}
    # exactly the layers of the modules the head runs once per level, each with one quantizer per level
    assert per_level == {n for n in layers for m in PER_LEVEL_MODULES["fcos_r18"] if n == m or n.startswith(m + ".")}
    assert all(layers[n].aq.num_sites == len(STRIDES) for n in per_level)
    # the keep layers keep their 8-bit MinMax specs, now per level; the rest of the head is LSQ 4-bit
    for n in per_level:
        kind, bits = ("MinMaxAct", 8) if n in KEEP_LAYERS["fcos_r18"] else ("LSQAct", 4)
        assert {type(q).__name__ for q in layers[n].aq.sites} == {kind} and layers[n].aq.bits == bits
    # each level initialised its own step from its own (differently scaled) input
    steps = [float(q.step.detach()) for q in layers["head.classification_head.conv.0"].aq.sites]
    assert len(set(steps)) == len(STRIDES)


def test_per_level_act_names_the_release_and_needs_act_levels():
    from zoo.train import ConfigError, validate

    cfg = det_cfg("unused", *PER_LEVEL, "output_dir=x")
    validate(cfg, ["task=det", "bits=4", *PER_LEVEL])
    assert cfg.name == "fcos_r18.lsq_w4a4_perlevel_det_composites"
    with initialize_config_module(config_module="zoo.configs", version_base="1.3"):
        cls = compose("train", overrides=["task=cls", *PER_LEVEL])
    with pytest.raises(ConfigError, match=r"task=cls has no layers called once per level.*valid: per_level_act=false"):
        validate(cls, ["task=cls", *PER_LEVEL])


def test_binary_body_recipe_quantizes_each_part_as_documented():
    model, x = tiny_model("fcos_r18", bits=1, quant=BINARY_BODY)
    kinds = {n: (type(m.wq).__name__, m.spec.weight.bits, type(m.aq).__name__, m.spec.act.bits)
             for n, m in quantized_layers(model.net)}
    for n, k in kinds.items():
        if n in KEEP_LAYERS["fcos_r18"] or "downsample" in n:
            assert k == ("MinMaxWeight", 8, "MinMaxAct", 8), n
        elif n.startswith("backbone.body."):
            assert k == ("IRNetWeight", 1, "IRNetAct", 1), n
        else:
            assert n.startswith(("backbone.fpn.", "head.")) and k == ("LSQWeight", 4, "LSQAct", 4), n
    assert sum(k[0] == "IRNetWeight" for k in kinds.values()) == 16  # the body's 3x3 convs
    # signed activations in the body (a sign after a ReLU would be constant)
    assert isinstance(model.net.backbone.body.layer1[0].act1, nn.Hardtanh)


# ----------------------------------------------------------------------------- save / load
def save_load_same_detections(model, x, directory, num_classes, k=20):
    """Save ``model`` and load it back: the same head outputs and the same ``k`` detections per image, in
    the same order, as the packed model before saving. Returns (loaded, expected head outputs)."""
    expected_heads = head_outputs(packed_copy(model), x)
    with torch.no_grad():
        expected = packed_copy(model)(x)
    zoo.save(model, directory)
    loaded = zoo.load(directory)
    assert torch.equal(head_outputs(loaded, x), expected_heads)
    with torch.no_grad():
        out = loaded(x)
    check_contract(out, len(x), num_classes, size=x.shape[-1])
    for a, b in zip(out, expected):  # the same computation: the same detections in the same order
        assert len(a["scores"]) == k
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(a[key], b[key]), key
    return loaded, expected_heads


@pytest.mark.parametrize("arch, bits, quant", VARIANTS)
def test_save_load_same_detections(tmp_path, arch, bits, quant):
    model, x = tiny_model(arch, bits=bits, quant=quant, score_thresh=0.0, detections_per_img=20)
    loaded, expected_heads = save_load_same_detections(model, x, tmp_path / "ck", len(CLASSES))
    # the packed form computes the training form's heads to float tolerance
    train_heads = head_outputs(model, x)
    assert (train_heads - expected_heads).abs().median() < 1e-3 * max(train_heads.abs().max(), 1.0)
    # the release rebuilds into the training form (fine-tuning) with every quantizer restored
    from zoo.quantizers.unpack import check_restored, restore_from_packed

    fresh, _ = tiny_model(arch, bits=bits, quant=quant, score_thresh=0.0, detections_per_img=20)
    assert restore_from_packed(fresh.net, loaded.net) == {}
    assert check_restored(fresh.net, loaded.net) == {}


@pytest.mark.parametrize("arch, bits, quant", [("fcos_r18", 4, PER_LEVEL), ("fcos_r18", 1, BINARY_BODY)])
def test_triton_equals_reference_on_a_tiny_detector(arch, bits, quant):
    """Every packed layer through the Triton kernels (interpreted on CPU) against the reference:
    the same head outputs bit for bit, so the same detections."""
    pytest.importorskip("zoo.kernels.triton_lowbit")
    model, x = tiny_model(arch, bits=bits, quant=quant, score_thresh=0.0, detections_per_img=20)
    packed = packed_copy(model)
    x = x[:1]
    zoo.set_backend(packed, "reference")
    ref = head_outputs(packed, x)
    zoo.set_backend(packed, "triton")
    assert torch.equal(head_outputs(packed, x), ref)
    # the kernels really ran (they cache their derived tensors on each layer they computed)
    from zoo.quantizers.packed import PackedLayer

    layers = {n: m for n, m in packed.net.named_modules() if isinstance(m, PackedLayer)}
    ran = {n for n, m in layers.items() if "_kernel_cache" in m.__dict__}
    assert len(ran) >= len(layers) - 1, sorted(set(layers) - ran)
    if quant == PER_LEVEL:  # one cached set of activation parameters per FPN level
        cache = layers["head.classification_head.conv.0"].__dict__["_kernel_cache"]
        assert {"act0", "act1", "act2", "act3", "act4"} <= set(cache)


# ----------------------------------------------------------------------------- evaluate
class Oracle(torch.nn.Module):
    """Answers each batch with its targets, score 1 (or its boxes shifted by ``shift`` pixels)."""

    def __init__(self, batches, shift=0.0):
        super().__init__()
        self.answers = [t for _, ts in batches for t in ts]
        self.shift, self.seen = shift, 0

    def forward(self, x):
        out = []
        for t in self.answers[self.seen:self.seen + len(x)]:
            out.append({"boxes": t["boxes"] + self.shift, "scores": torch.ones(len(t["labels"])),
                        "labels": t["labels"]})
        self.seen += len(x)
        return out


def _batches():
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        targets = []
        for _ in range(2):
            k = int(torch.randint(1, 4, (1,), generator=g))
            xy = torch.rand(k, 2, generator=g) * 40
            wh = 8 + torch.rand(k, 2, generator=g) * 20
            targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(0, 3, (k,), generator=g)})
        batches.append((torch.rand(2, 3, SIZE, SIZE, generator=g), targets))
    return batches


def test_evaluate_perfect_predictions_give_map_1():
    batches = _batches()
    r = evaluate(Oracle(batches), batches, progress=False)
    assert r["map"] == pytest.approx(1.0) and r["map50"] == pytest.approx(1.0) and r["map75"] == pytest.approx(1.0)
    assert r["images"] == 6
    worse = evaluate(Oracle(batches, shift=4.0), batches, progress=False)
    assert worse["map"] < 0.9 and worse["map50"] > worse["map75"]


# ----------------------------------------------------------------------------- zoo.predict
def test_predict_writes_boxes_and_coco_results(tmp_path):
    from pycocotools.coco import COCO

    from zoo.predict import main

    ids = [11, 22, 33]  # a COCO folder's category ids (data=coco records them in the input contract)
    model, _ = tiny_model("fcos_r18", contract={"category_ids": ids}, score_thresh=0.0, detections_per_img=5)
    zoo.save(model, tmp_path / "ck")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (45, 90, 3), dtype=np.uint8)).save(imgs / "000000000042.png")
    Image.fromarray(rng.integers(0, 256, (70, 50), dtype=np.uint8)).save(imgs / "b.jpg")  # grey: read as RGB
    out = tmp_path / "out"
    assert main([str(tmp_path / "ck"), str(imgs), "--out", str(out), "--min-score", "0"]) == 0
    for stem, size in (("000000000042", (90, 45)), ("b", (50, 70))):
        png = Image.open(out / f"{stem}_boxes.png")
        assert png.size == size and png.mode == "RGB"
    res = json.loads((out / "detections.json").read_text())
    assert len(res) == 10 and {r["image_id"] for r in res} == {42, 2}  # numeric stems are COCO ids
    for r in res:
        assert {"image_id", "category_id", "bbox", "score"} <= set(r) and r["category_id"] in ids
        x, y, w, h = r["bbox"]
        W, H = (90, 45) if r["image_id"] == 42 else (50, 70)
        assert 0 <= x and 0 <= y and w >= 0 and h >= 0 and x + w <= W + 0.01 and y + h <= H + 0.01
    # the boxes are the model's at its size, scaled back to the image's own pixels
    a = np.asarray(Image.open(imgs / "000000000042.png"))
    xin = torch.nn.functional.interpolate(torch.from_numpy(a.copy()).permute(2, 0, 1)[None].float() / 255,
                                          size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        d = zoo.load(tmp_path / "ck")(xin.clamp(0, 1))[0]
    b = d["boxes"][0] * torch.tensor([90 / SIZE, 45 / SIZE] * 2)
    first = next(r for r in res if r["image_id"] == 42)
    assert first["bbox"] == pytest.approx([float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])], abs=0.02)
    # pycocotools reads it as detection results for a ground truth of these images
    gt = COCO()
    gt.dataset = {"images": [{"id": 42, "width": 90, "height": 45}, {"id": 2, "width": 50, "height": 70}],
                  "annotations": [], "categories": [{"id": i, "name": n} for i, n in zip(ids, CLASSES)]}
    gt.createIndex()
    assert len(gt.loadRes(str(out / "detections.json")).getAnnIds()) == 10


def test_coco_folder_run_records_classes_and_category_ids(tmp_path):
    from tests.test_det_data import _coco
    from zoo.train import run

    root = _coco(tmp_path, boxes=((2, 3, 10, 5), (20, 0, 20, 20)))  # category ids 7 ("cat") and 3 ("dog")
    out = run(det_cfg(tmp_path / "run", "batch_size=1", "limit_train_batches=1",
                      data=("data=coco", f"data.root={root}", "data.num_workers=0")))
    cfg = json.loads((Path(out["release_dir"]) / "config.json").read_text())
    assert Path(out["release_dir"]).parent.name == "run" and out["global_step"] == 1
    assert cfg["input_contract"]["classes"] == ["dog", "cat"] and cfg["input_contract"]["category_ids"] == [3, 7]
    assert cfg["model_args"]["num_classes"] == 2 and cfg["train"]["data"] == "coco"
    assert "coco: a COCO-format folder, 2 classes (dog, cat)" in (Path(out["release_dir"]) / "README.md").read_text()
