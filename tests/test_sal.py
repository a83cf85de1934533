"""Salient-object detection: data (composites and DUTS folders), metrics against hand-computed
cases, smp architectures under quantize(), save/load, the training CLI and zoo.predict."""
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from PIL import Image

import zoo
from zoo import LSQ, UL2Q, DoReFa, QuantConfig, quantize
from zoo.checkpoint import packed_copy
from zoo.quantizers.quantize import quantized_layers
from zoo.tasks.sal.data import CompositeSalData, FolderSalData, composite, pair_files
from zoo.tasks.sal.metrics import SaliencyMeter, f_curve, mae, s_measure

from .conftest import needs_fmnist, needs_scenes

pytest.importorskip("segmentation_models_pytorch")

ARCHS = ["unet_r18", "linknet_r18", "unetpp_r18"]
KEEP8 = {"encoder.conv1": {"weight": {"type": "MinMax", "bits": 8, "granularity": "channel"},
                           "act": {"type": "MinMax", "bits": 8}},
         "segmentation_head.*": {"weight": {"type": "MinMax", "bits": 8, "granularity": "channel"},
                                 "act": {"type": "MinMax", "bits": 8}}}


# ----------------------------------------------------------------------------- composites
def test_composite_mask_is_exactly_the_pasted_pixels():
    grey = torch.full((3, 40, 50), 0.5)  # a flat background: every non-item pixel must stay 0.5
    items = torch.zeros(3, 28, 28, dtype=torch.uint8)
    items[:, 6:22, 8:20] = 200
    for i in range(10):  # (colour jitter leaves a grey background grey)
        img, mask = composite(np.random.default_rng(i), [grey], items, 32, jitter=i % 2 == 1)
        assert img.shape == (3, 32, 32) and mask.shape == (1, 32, 32)
        assert set(mask.unique().tolist()) <= {0.0, 1.0} and mask.sum() > 0
        bg = mask[0] == 0
        assert (img[:, bg] - 0.5).abs().max() < 1e-6  # (resizing a flat crop rounds in the last bit)
        assert ((img[:, ~bg] - 0.5).abs() > 1e-3).any(0).all()  # item pixels took the item's colour


@needs_fmnist
def test_builtin_composites_are_fixed_and_splits_share_nothing():
    dm = CompositeSalData(train_size=20, val_size=4, test_size=6, size=32, seed=3)
    dm.setup()
    assert [len(dm.split(s)) for s in ("train", "val", "test")] == [20, 4, 6]
    a, b = dm.split("test")[5], CompositeSalData(test_size=6, size=32, seed=3).split("test")[5]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # a pure function of (seed, split, i)
    # the run's seed varies the training composites only: every seed is tested on the same images
    other = CompositeSalData(train_size=20, val_size=4, test_size=6, size=32, seed=4)
    for split in ("val", "test"):
        assert all(torch.equal(dm.split(split)[i][0], other.split(split)[i][0]) for i in range(4)), split
    assert not torch.equal(dm.split("train")[5][0], other.split("train")[5][0])
    x, m = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and m.shape == (16, 1, 32, 32) and 0 <= x.min() and x.max() <= 1
    # no foreground item and no background photo is shared between splits
    items = {s: {bytes(t.numpy()) for t in dm.items(s)} for s in ("train", "val", "test")}
    assert not items["train"] & items["val"] and not items["train"] & items["test"]
    assert not items["val"] & items["test"]
    from zoo.datasets import BUILTIN_TEST, BUILTIN_TRAIN, BUILTIN_VAL

    assert not (set(BUILTIN_TRAIN) & set(BUILTIN_TEST)) and not (set(BUILTIN_VAL) & set(BUILTIN_TEST))
    assert not set(BUILTIN_TRAIN) & set(BUILTIN_VAL)


def test_colour_jitter_permutes_channels_and_scales_saturation():
    import itertools

    from zoo.datasets import jitter_colours

    img = 0.5 + 0.1 * (torch.rand(3, 8, 8) - 0.5)  # low saturation: no clamping at x2.5
    out = jitter_colours(img, np.random.default_rng(0))
    grey = img.mean(0, keepdim=True)
    assert torch.allclose(out.mean(0, keepdim=True), grey, atol=1e-6)  # grey level kept
    fits = []
    for perm in itertools.permutations(range(3)):
        d = img[list(perm)] - grey
        k = float((out - grey).flatten() @ d.flatten() / (d.flatten() @ d.flatten()))
        if torch.allclose(out - grey, k * d, atol=1e-6):
            fits.append(k)
    assert len(fits) == 1 and 0.3 <= fits[0] <= 2.5  # one channel order, one saturation factor


def test_size_must_be_a_multiple_of_16():
    with pytest.raises(ValueError, match="data.size=56 must be a multiple of 16"):
        CompositeSalData(size=56)


# ----------------------------------------------------------------------------- DUTS folders
def _write_pairs(folder: Path, stems, size=(20, 30)):
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for s in stems:
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / "images" / f"{s}.jpg")
        m = np.zeros(size, np.uint8)
        m[5:15, 8:20] = 255
        Image.fromarray(m).save(folder / "masks" / f"{s}.png")


def test_folder_pairs_by_stem_and_holds_out_missing_splits(tmp_path):
    _write_pairs(tmp_path, [f"im{i:02d}" for i in range(20)])
    dm = FolderSalData(root=tmp_path, size=16, holdout=0.1, batch_size=4)
    dm.setup()
    names = {s: [p[0].stem for p in dm.split(s).pairs] for s in ("train", "val", "test")}
    assert [len(names[s]) for s in ("train", "val", "test")] == [16, 2, 2]
    assert len(set(sum(names.values(), []))) == 20  # every pair used once
    again = FolderSalData(root=tmp_path, size=16, holdout=0.1, batch_size=4, seed=7)
    again.setup()  # another run seed holds out the same pairs
    assert {s: [p[0].stem for p in again.split(s).pairs] for s in ("val", "test")} == \
        {s: names[s] for s in ("val", "test")}
    x, m = dm.split("val")[0]
    assert x.shape == (3, 16, 16) and m.shape == (1, 16, 16) and set(m.unique().tolist()) == {0.0, 1.0}
    # explicit splits are used as they are
    _write_pairs(tmp_path / "split" / "train", ["a", "b", "c"])
    _write_pairs(tmp_path / "split" / "test", ["d"])
    dm = FolderSalData(root=tmp_path / "split", size=16, holdout=0.34)
    dm.setup()
    assert [p[0].stem for p in dm.split("test").pairs] == ["d"]
    assert len(dm.split("train")) == 2 and len(dm.split("val")) == 1


def test_folder_errors_name_the_bad_files(tmp_path):
    _write_pairs(tmp_path, ["a", "b"])
    (tmp_path / "masks" / "b.png").rename(tmp_path / "masks" / "c.png")
    with pytest.raises(ValueError, match=r"image\(s\) without a mask.*\['b'\].*mask\(s\) without an image.*\['c'\]"):
        pair_files(tmp_path)
    (tmp_path / "masks" / "c.png").rename(tmp_path / "masks" / "b.png")
    for s in "cdefghijk":
        _write_pairs(tmp_path, [s])
    (tmp_path / "images" / "d.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="d.jpg is not a readable image"):
        FolderSalData(root=tmp_path, size=16).setup()
    with pytest.raises(FileNotFoundError, match="masks"):
        pair_files(tmp_path / "images")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        FolderSalData(root=tmp_path / "nope").setup()


# ----------------------------------------------------------------------------- metrics
def test_mae_and_f_curve_by_hand():
    pred = torch.tensor([[0.2, 0.8], [0.5, 1.0]])
    gt = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    assert mae(pred, gt) == pytest.approx((0.2 + 0.2 + 0.5 + 0.0) / 4)
    # gt = [1, 1, 0, 0], codes floor(255 p) = [255, 127, 127, 0]
    f = f_curve(torch.tensor([1.0, 0.5, 0.5, 0.0]), torch.tensor([1.0, 1.0, 0.0, 0.0]))
    fm = lambda p, r: 1.3 * p * r / (0.3 * p + r)  # noqa: E731
    assert f[0] == pytest.approx(fm(2 / 4, 1.0))       # t = 0: everything positive
    assert f[1] == pytest.approx(fm(2 / 3, 1.0)) and f[127] == pytest.approx(fm(2 / 3, 1.0))
    assert f[128] == pytest.approx(fm(1.0, 0.5)) and f[255] == pytest.approx(fm(1.0, 0.5))
    assert float(f.max()) == pytest.approx(0.8125)
    assert torch.all(f_curve(torch.zeros(4), torch.tensor([1.0, 0, 0, 0]))[1:] == 0)  # nothing predicted


def test_s_measure_by_hand():
    # trivial ground truths
    p = torch.tensor([[0.25, 0.5], [0.0, 1.0]])
    assert s_measure(p, torch.zeros(2, 2)) == pytest.approx(1 - 0.4375)
    assert s_measure(p, torch.ones(2, 2)) == pytest.approx(0.4375)
    # a perfect map scores 1
    g = torch.tensor([[0.0, 1, 1, 0], [0, 1, 0, 0]])
    assert s_measure(g, g) == pytest.approx(1.0)
    # 1 x 4 map: gt [0, 1, 1, 0], pred [0, 1, .5, 0]
    # object: fg values [1, .5] -> mean .75, std sqrt(.125); bg (1 - p) values [1, 1] -> 1
    o_fg = 1.5 / (0.75 ** 2 + 1 + 0.125 ** 0.5)
    s_obj = 0.5 * o_fg + 0.5 * 1.0
    # region: centroid column round(2.5) = 3 (MATLAB rounding) -> blocks cols [0, 3) and [3, 4)
    x, y = 0.5, 2 / 3
    sx, sy, sxy = 0.25, 1 / 3, 0.25
    q_left = 4 * x * y * sxy / ((x * x + y * y) * (sx + sy))
    s_reg = 0.75 * q_left + 0.25 * 1.0   # right block: pred 0, gt 0 -> 1
    expected = 0.5 * s_obj + 0.5 * s_reg
    assert s_measure(torch.tensor([[0.0, 1, 0.5, 0]]), torch.tensor([[0.0, 1, 1, 0]])) == pytest.approx(expected)
    assert expected == pytest.approx(0.879286, abs=1e-6)
    with pytest.raises(ValueError, match="one H x W map"):
        s_measure(torch.zeros(2, 3), torch.zeros(3, 2))


def test_meter_averages_over_images():
    gt = torch.zeros(2, 1, 4, 4)
    gt[:, :, 1:3, 1:3] = 1
    pred = torch.stack([gt[0], 1 - gt[1]])  # one perfect, one inverted
    m = SaliencyMeter()
    m.update(pred, gt)
    r = m.compute()
    assert r["images"] == 2 and r["mae"] == pytest.approx(0.5)
    assert r["smeasure"] == pytest.approx((1.0 + s_measure(pred[1], gt[1])) / 2)
    assert r["maxf"] == pytest.approx(float(((f_curve(pred[0], gt[0]) + f_curve(pred[1], gt[1])) / 2).max()))


# ----------------------------------------------------------------------------- models
@pytest.mark.parametrize("arch", ARCHS)
def test_smp_archs_quantize_and_keep_the_float_state_dict_loadable(arch):
    torch.manual_seed(0)
    net = zoo.create_model(arch)
    assert not any(k.startswith(("encoder.layer3", "encoder.layer4")) for k in net.state_dict())
    x = torch.rand(2, 3, 32, 48)
    assert net(x).shape == (2, 1, 32, 48)
    float_sd = {k: v.clone() for k, v in net.state_dict().items()}
    qnet = quantize(zoo.create_model(arch), QuantConfig.from_dict({
        "weight": {"type": "UL2Q", "bits": 2, "granularity": "channel"}, "act": {"type": "UL2Q", "bits": 2},
        "overrides": KEEP8}))
    missing, unexpected = qnet.load_state_dict(float_sd, strict=False)
    assert unexpected == []
    assert all(".wq." in k or ".aq." in k for k in missing), missing[:5]  # only quantizer state is new
    qsd = qnet.state_dict()
    assert all(torch.equal(qsd[k], v) for k, v in float_sd.items())
    layers = quantized_layers(qnet)
    convs = [n for n, m in net.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert sorted(n for n, _ in layers) == sorted(convs)  # every conv (LinkNet: and conv-T) is quantized
    assert dict(layers)["encoder.conv1"].wq.bits == 8 and dict(layers)["segmentation_head.0"].wq.bits == 8
    assert qnet(x).shape == (2, 1, 32, 48)


def test_arch_argument_errors():
    with pytest.raises(ValueError, match="encoder_weights must be None"):
        zoo.create_model("unet_r18", encoder_weights="imagenet")
    with pytest.raises(ValueError, match="encoder_depth=6"):
        zoo.create_model("unet_r18", encoder_depth=6)
    full = zoo.create_model("unet_r34", encoder_depth=5)
    assert any(k.startswith("encoder.layer4") for k in full.state_dict())


def tiny_model(arch, quant):
    from zoo.wrapper import ZooModel

    contract = {"channels": 3, "size": None, "train_size": [32, 32], "range": [0.0, 1.0],
                "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    net = zoo.create_model(arch)
    if quant is not None:
        quantize(net, quant)
    model = ZooModel(net, arch, {}, "sal", contract, quant)
    model.train()
    with torch.no_grad():  # calibrate activation statistics and BN on a few batches
        for _ in range(3):
            model(torch.rand(4, 3, 32, 32))
    return model.eval()


@pytest.mark.parametrize("arch,quant", [
    ("unet_r18", None),
    ("unet_r18", QuantConfig(weight=UL2Q(2), act=UL2Q(2))),
    ("linknet_r18", QuantConfig(weight=UL2Q(4), act=UL2Q(4))),
    ("unetpp_r18", QuantConfig(weight=LSQ(2), act=LSQ(2),
                               overrides={"encoder.conv1": None, "segmentation_head.*": None})),
    ("linknet_r18", QuantConfig(weight=DoReFa(2), act=DoReFa(2))),
])
def test_save_load_same_output(tmp_path, arch, quant):
    torch.manual_seed(0)
    model = tiny_model(arch, quant)
    x = torch.rand(2, 3, 32, 40)
    with torch.no_grad():
        expected = packed_copy(model)(x)
        training_form = model(x)
    zoo.save(model, tmp_path / "ck")
    loaded = zoo.load(tmp_path / "ck")
    with torch.no_grad():
        out = loaded(x)
    assert out.shape == (2, 1, 32, 40)
    assert torch.equal(out, expected)
    # (the packed form equals the training form layer by layer, tests/test_packed.py; through a whole
    # random-init net a float32 rounding tie can flip one activation code and the flip cascades)
    tol = 1e-4 if quant is not None else 1e-2  # a float model's release holds float16 values
    assert (out - training_form).abs().median() < tol * max(training_form.abs().max(), 1.0)
    if quant is not None:  # the packed file really holds 2/4-bit codes
        from zoo.cards import packed_layer_bytes

        sizes = packed_layer_bytes(tmp_path / "ck")
        bits = quant.weight.bits
        assert bits in sizes and sizes[bits][1] / sizes[bits][0] > 32 / bits / 1.6


# ----------------------------------------------------------------------------- CLI
def sal_cfg(tmp, *overrides):
    with initialize_config_module(config_module="zoo.configs", version_base="1.3"):
        return compose("train", overrides=[
            "task=sal", "bits=2", "epochs=1", "batch_size=4", "data.size=32", "data.train_size=8",
            "data.val_size=4", "data.test_size=4", "init_from=null", f"output_dir={tmp}",
            "trainer.log_every_n_steps=1", "+trainer.enable_progress_bar=false", *overrides])


def test_sal_defaults_compose():
    with initialize_config_module(config_module="zoo.configs", version_base="1.3"):
        cfg = compose("train", overrides=["task=sal", "bits=4"])
    assert cfg.quant.name == "ul2q" and cfg.data.name == "sal_scenes" and cfg.arch == "unet_r18"
    assert cfg.name == "unet_r18.ul2q_w4a4_sal_scenes" and cfg.init_from == "unet_r18.fp32_sal_scenes"
    assert cfg.data.size == 128 and cfg.model_args == {} and cfg.task.model_args == {"encoder_depth": 4}
    assert cfg.keep_bits == 8 and list(cfg.task.keep_layers) == ["encoder.conv1", "segmentation_head.*"]
    with initialize_config_module(config_module="zoo.configs", version_base="1.3"):
        cfg = compose("train", overrides=["task=sal", "bits=2", "quant=lsq", "arch=linknet_r18"])
    assert cfg.name == "linknet_r18.lsq_w2a2_sal_scenes"


@needs_scenes
def test_run_sal_two_steps_end_to_end(tmp_path):
    from zoo.train import run

    out = run(sal_cfg(tmp_path))
    m = out["metrics"]
    assert out["global_step"] == 2
    for k in ("test_mae", "test_maxf", "test_smeasure", "test_mae_training_form"):
        assert k in m and np.isfinite(m[k])
    assert m["test_images"] == 4
    assert m["real_images"] == 6 and 0 <= m["real_mae"] <= 1  # sal_real is measured on every release
    rel = Path(out["release_dir"])
    loaded = zoo.load(rel)
    assert loaded.task == "sal" and loaded.quant.weight.bits == 2 and type(loaded.quant.weight).__name__ == "UL2Q"
    assert Image.open(rel / "sample.jpg").size[1] > Image.open(rel / "sample.jpg").size[0]  # one row per sample
    assert (tmp_path / "samples" / "epoch_000.png").is_file()  # the grid of the validation epoch
    card = (rel / "README.md").read_text()
    assert f"MAE {m['test_mae']:.4f}" in card and "2-bit layers" in card and "8-bit layers" in card
    assert f"S-measure {m['real_smeasure']:.4f}" in card and "](real.jpg)" in card and (rel / "real.jpg").is_file()
    csv = next((tmp_path / "csv").rglob("metrics.csv")).read_text().splitlines()[0]
    assert "val/maxf" in csv and "val/smeasure" in csv and "val/mae" in csv


def test_predict_writes_a_mask_and_an_overlay_per_image(tmp_path):
    from zoo.predict import main

    torch.manual_seed(0)
    model = tiny_model("linknet_r18", QuantConfig(weight=UL2Q(4), act=UL2Q(4)))
    zoo.save(model, tmp_path / "ck")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8)).save(imgs / "a.png")
    Image.fromarray(np.zeros((17, 12), np.uint8)).save(imgs / "b.jpg")  # grey: read as RGB
    assert main([str(tmp_path / "ck"), str(imgs), "--out", str(tmp_path / "out")]) == 0
    for stem, size in (("a", (70, 45)), ("b", (12, 17))):
        mask = Image.open(tmp_path / "out" / f"{stem}_mask.png")
        assert mask.size == size and mask.mode == "L"
        over = Image.open(tmp_path / "out" / f"{stem}_overlay.png")
        assert over.size == size and over.mode == "RGB"
    # the mask is the model's own map at the training size, resized back
    a = np.asarray(Image.open(imgs / "a.png"))
    x = torch.nn.functional.interpolate(torch.from_numpy(a.copy()).permute(2, 0, 1)[None].float() / 255,
                                        size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        p = zoo.load(tmp_path / "ck")(x).sigmoid()
    p = torch.nn.functional.interpolate(p, size=(45, 70), mode="bilinear", align_corners=False)[0, 0]
    got = torch.from_numpy(np.asarray(Image.open(tmp_path / "out" / "a_mask.png")).astype(np.float32)) / 255
    assert (got - p).abs().max() <= 1 / 255 + 1e-6
    assert main([str(tmp_path / "ck"), str(tmp_path / "missing.png"), "--out", str(tmp_path / "o2")]) == 2
