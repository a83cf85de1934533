"""Super-resolution: data, metrics against basicsr, RLQ / PAMS quantizers, DQA, save/load, the CLI
run and zoo.predict. Models here are tiny (8-16 features) so everything runs in seconds."""
import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from PIL import Image

import zoo
from tests.conftest import needs_basicsr
from zoo.models.sr import DynamicBody, set_depth
from zoo.quantizers import PAMS, RLQ, LayerQuant, QuantConfig, quantize, set_backend, to_packed
from zoo.quantizers.rlq import round_phi
from zoo.datasets import BUILTIN_TEST, BUILTIN_TRAIN, BUILTIN_VAL
from zoo.tasks.sr.data import BuiltinSRData, FolderSRData, PatchDataset, make_pair
from zoo.tasks.sr.metrics import psnr_y, ssim_y

pytestmark = needs_basicsr

CONTRACT = {"channels": 3, "scale": 2, "range": [0.0, 1.0], "size": None}
KEEP_FLOAT = {g: None for g in ("conv_first", "conv_after_body", "upsample*", "conv_last")}


def tiny_edsr(quant=None, dqa=False, scale=2, blocks=3):
    args = {"upscale": scale, "num_feat": 8, "num_block": blocks, "dqa": dqa}
    net = zoo.create_model("edsr", **args)
    if quant is not None:
        quantize(net, quant)
    model = zoo.ZooModel(net, "edsr", args, "sr", {**CONTRACT, "scale": scale}, quant)
    model.train()
    with torch.no_grad():  # initialise data-dependent quantizer state
        model(torch.rand(2, 3, 12, 12))
    return model.eval()


# ----------------------------------------------------------------------------- data
def test_builtin_splits_are_disjoint_and_load():
    assert not set(BUILTIN_TRAIN) & set(BUILTIN_TEST)
    assert not set(BUILTIN_VAL) & set(BUILTIN_TEST)
    assert not set(BUILTIN_TRAIN) & set(BUILTIN_VAL)
    dm = BuiltinSRData(scale=4, train=BUILTIN_TRAIN[:1], val=BUILTIN_VAL[:1], test=BUILTIN_TEST[:1])
    lr, hr = dm.split("test")[0]
    assert lr.dtype == torch.float32 and 0 <= lr.min() and lr.max() <= 1
    assert hr.shape[-2] == 4 * lr.shape[-2] and hr.shape[-1] == 4 * lr.shape[-1]
    with pytest.raises(ValueError, match="more than one split"):
        BuiltinSRData(train=("astronaut",), test=("astronaut",))
    with pytest.raises(ValueError, match="scale=5"):
        BuiltinSRData(scale=5)


def test_make_pair_mod_crops_and_downsamples():
    hr = np.random.default_rng(0).integers(0, 256, (51, 38, 3), dtype=np.uint8)
    lr, hr2 = make_pair(hr, 4)
    assert hr2.shape == (48, 36, 3) and lr.shape == (12, 9, 3) and lr.dtype == np.uint8
    flat = np.full((40, 40, 3), 77, np.uint8)  # bicubic of a constant image is the constant
    assert (make_pair(flat, 2)[0] == 77).all()
    with pytest.raises(ValueError, match="does not match"):
        make_pair(hr, 4, lr=np.zeros((5, 5, 3), np.uint8))


def test_patches_stay_aligned_under_flips_and_rotations():
    rng = np.random.default_rng(1)
    lr = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    hr = np.kron(lr, np.ones((3, 3, 1), np.uint8))  # HR = nearest x3 of LR: survives rot/flip
    ds = PatchDataset([(lr, hr)], scale=3, patch=8, length=40, augment=True, seed=0)
    firsts = set()
    for i in range(len(ds)):
        a, b = ds[i]
        assert a.shape == (3, 8, 8) and b.shape == (3, 24, 24)
        assert torch.equal(b[:, ::3, ::3], a)
        firsts.add(float(a[0, 0, 0]))
    assert len(firsts) > 10  # random positions
    with pytest.raises(ValueError, match="smaller than the patch"):
        PatchDataset([(lr, hr)], scale=3, patch=32, length=1)


def test_folder_data(tmp_path):
    rng = np.random.default_rng(2)
    (tmp_path / "train").mkdir()
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)).save(tmp_path / "train" / f"{i}.png")
    dm = FolderSRData(root=str(tmp_path), scale=2, patch_size=8, batch_size=2, steps_per_epoch=3)
    dm.setup()
    assert len(dm.split("train")) == 3 and len(dm.split("val")) == 1 and len(dm.split("test")) == 1
    assert set(dm.split("test").names).isdisjoint(dm.split("train").names)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 8, 8) and y.shape == (2, 3, 16, 16)
    (tmp_path / "train_lr").mkdir()
    with pytest.raises(FileNotFoundError, match="no LR image"):
        FolderSRData(root=str(tmp_path), scale=2).setup()
    with pytest.raises(FileNotFoundError, match="train"):
        FolderSRData(root=str(tmp_path / "nope")).setup()


# ----------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("border", [0, 4])
def test_psnr_ssim_match_basicsr(border):
    from zoo.models.sr import import_basicsr

    metrics = import_basicsr("metrics")
    rng = np.random.default_rng(3)
    hr = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    sr = np.clip(hr.astype(int) + rng.integers(-20, 21, hr.shape), 0, 255).astype(np.uint8)
    # basicsr takes BGR HWC images
    ref_psnr = metrics.calculate_psnr(sr[..., ::-1], hr[..., ::-1], border, test_y_channel=True)
    ref_ssim = metrics.calculate_ssim(sr[..., ::-1], hr[..., ::-1], border, test_y_channel=True)
    assert psnr_y(sr, hr, border) == pytest.approx(ref_psnr, abs=1e-3)
    assert ssim_y(sr, hr, border) == pytest.approx(ref_ssim, abs=1e-4)
    assert psnr_y(hr, hr, border) == float("inf") and ssim_y(hr, hr, border) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        psnr_y(sr[:-1], hr, border)


# ----------------------------------------------------------------------------- quantizers
def test_round_phi_forward_is_round_and_backward_is_the_tanh_staircase():
    t = torch.tensor([-1.7, -0.5, 0.2, 0.5, 1.49, 2.0, 3.25], requires_grad=True)
    for k in (1.0, 4.0):
        y = round_phi(t, k)
        assert torch.equal(y, torch.round(t.detach()))
        (g,) = torch.autograd.grad(y.sum(), t)
        frac = t.detach() - torch.floor(t.detach())
        expected = k * (1 - torch.tanh(k * (frac - 0.5)) ** 2) / (2 * math.tanh(k / 2))
        assert torch.allclose(g, expected, atol=1e-6)
    # the staircase is continuous at integers: phi(n) = n from both sides
    soft = lambda x, k=2.0: math.floor(x) + math.tanh(k * (x - math.floor(x) - 0.5)) / (2 * math.tanh(k / 2)) + 0.5  # noqa
    assert soft(2.0) == pytest.approx(2.0) and soft(2.0 - 1e-9) == pytest.approx(2.0, abs=1e-6)


@pytest.mark.parametrize("spec", [RLQ(4), RLQ(2), LayerQuant(RLQ(3, granularity="channel"), RLQ(3)), PAMS(2), PAMS(4)])
def test_packed_equals_training_form_and_triton_equals_reference(spec):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(5, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 4, 3, padding=1, stride=2), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 9, 6))
    lq = spec if isinstance(spec, LayerQuant) else LayerQuant(spec, spec)
    quantize(net, QuantConfig(overrides={"*": lq}))
    net.train()
    net(torch.randn(4, 5, 6, 6)).sum().backward()
    with torch.no_grad():
        for m in net.modules():
            if hasattr(m, "tau"):
                m.tau.normal_(0, 0.3)
    net.eval()
    x = torch.randn(3, 5, 6, 6)
    y = net(x)
    packed = to_packed(copy.deepcopy(net))
    ref = packed(x)
    assert (ref - y).abs().max() <= 1e-5 * y.abs().max()
    pytest.importorskip("triton")
    set_backend(packed, "triton")
    assert torch.equal(packed(x), ref)




# ----------------------------------------------------------------------------- DQA
def test_dqa_depth_selects_blocks_by_gate_and_skips_the_rest():
    model = tiny_edsr(dqa=True, blocks=4)
    body = model.net.body
    assert isinstance(body, DynamicBody) and body.depth_choices == [4, 2, 1]
    with torch.no_grad():
        body.gates.copy_(torch.tensor([0.5, 2.0, 1.0, -3.0]))
    calls = []
    for i, blk in enumerate(body):
        blk.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    x = torch.rand(1, 3, 10, 10)
    full = model(x)
    assert sorted(calls) == [0, 1, 2, 3]
    calls.clear()
    assert set_depth(model, 2) == [1, 3]  # the two largest |gate|
    half = model(x)
    assert sorted(calls) == [1, 3] and not torch.allclose(half, full)
    set_depth(model, None)
    assert torch.equal(model(x), full)
    for bad in (0, 5, 1.5, True):
        with pytest.raises(ValueError, match="valid: None"):
            set_depth(model, bad)
    with pytest.raises(ValueError, match="no depth-dynamic"):
        set_depth(tiny_edsr(), 2)


def test_float_weights_load_into_a_dqa_model():
    plain = zoo.create_model("edsr", num_feat=8, num_block=2)
    dqa = zoo.create_model("edsr", num_feat=8, num_block=2, dqa=True)
    dqa.load_state_dict(plain.state_dict(), strict=True)  # gates keep their initial 1
    x = torch.rand(1, 3, 8, 8)
    assert torch.allclose(dqa(x), plain(x), atol=1e-6)


# ----------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("quant,dqa", [
    (None, False),
    (QuantConfig(weight=RLQ(2), act=RLQ(2), overrides=KEEP_FLOAT), True),
    (QuantConfig(weight=RLQ(4), act=RLQ(4), overrides=KEEP_FLOAT), False),
    (QuantConfig(weight=PAMS(2), act=PAMS(2), overrides=KEEP_FLOAT), False),
])
def test_save_load_same_output(tmp_path, quant, dqa):
    torch.manual_seed(0)
    model = tiny_edsr(quant, dqa=dqa)
    x = torch.rand(2, 3, 9, 11)
    from zoo.checkpoint import packed_copy

    expected = packed_copy(model)(x)  # the model as released (a float one holds float16 values)
    zoo.save(model, tmp_path / "ck")
    loaded = zoo.load(tmp_path / "ck")
    out = loaded(x)
    assert out.shape == (2, 3, 18, 22)
    assert (out - expected).abs().max() <= 1e-4 * expected.abs().max()
    if dqa:
        shallow = zoo.load(tmp_path / "ck", depth=1)
        d1 = shallow(x)
        set_depth(model, 1)
        assert (d1 - model(x)).abs().max() <= 1e-4 * expected.abs().max()
        from zoo.tasks.sr.task import evaluate

        res = evaluate(shallow, [(x[:1], torch.rand(1, 3, 18, 22))], progress=False)
        assert set(res) >= {"psnr", "psnr_depth2", "psnr_depth1"}
        assert torch.equal(shallow(x), d1)  # evaluate restored the model's depth


def test_other_archs_build_and_quantize():
    x = torch.rand(1, 3, 16, 16)
    m = zoo.create_model("msrresnet", upscale=2, num_feat=8, num_block=2, dqa=True)
    quantize(m, QuantConfig(weight=RLQ(4), act=RLQ(4), overrides={"conv_first": None, "conv_last": None}))
    assert m(x).shape == (1, 3, 32, 32)
    s = zoo.create_model("swinir", upscale=2, embed_dim=12, depths=(1,), num_heads=(2,), window_size=4,
                         img_size=16)
    quantize(s, QuantConfig(weight=RLQ(4), act=RLQ(4), overrides={"conv_first": None, "conv_last": None}))
    assert s(x).shape == (1, 3, 32, 32)
    assert sum(isinstance(l, zoo.quantizers.QuantLinear) for l in s.modules()) >= 4
    assert s(torch.rand(1, 3, 11, 6)).shape == (1, 3, 22, 12)  # padded to the window size inside
    with pytest.raises(ValueError, match="swinir has none"):
        zoo.create_model("swinir", dqa=True)


# ----------------------------------------------------------------------------- CLI
def sr_cfg(tmp, *overrides):
    with initialize_config_module(config_module="zoo.configs", version_base="1.3"):
        return compose("train", overrides=[
            "task=sr", "bits=2", "scale=2", "epochs=1", "data.steps_per_epoch=2", "batch_size=4",
            "data.patch_size=12", "+model_args.num_feat=8", "+model_args.num_block=2", "init_from=null",
            f"output_dir={tmp}", "trainer.log_every_n_steps=1", "+trainer.enable_progress_bar=false",
            *overrides])


def test_sr_defaults_compose():
    with initialize_config_module(config_module="zoo.configs", version_base="1.3"):
        cfg = compose("train", overrides=["task=sr", "bits=2"])
    assert cfg.quant.name == "rlq" and cfg.data.name == "sr_images" and cfg.arch == "edsr"
    assert cfg.name == "edsr.quantsr_w2a2_x4" and cfg.init_from == "edsr.fp32_x4"
    assert cfg.keep_bits is None and cfg.task.model_args.dqa is True
    with initialize_config_module(config_module="zoo.configs", version_base="1.3"):
        cfg = compose("train", overrides=["task=sr", "bits=2", "quant=dorefa", "scale=2"])
    assert cfg.name == "edsr.dorefa_w2a2_x2" and cfg.task.model_args.dqa is False


def test_run_sr_bits2_end_to_end(tmp_path):
    from zoo.train import run

    out = run(sr_cfg(tmp_path))
    m = out["metrics"]
    assert out["global_step"] == 2
    for k in ("test_psnr", "test_ssim", "test_bicubic_psnr", "test_bicubic_ssim", "test_psnr_depth1"):
        assert k in m and np.isfinite(m[k])
    rel = out["release_dir"]
    loaded = zoo.load(rel)
    assert loaded.task == "sr" and loaded.input_contract["scale"] == 2
    assert loaded.quant.act.bits == 2 and type(loaded.quant.weight).__name__ == "RLQ"

    png = Image.open(Path(rel) / "sample.png")
    assert png.size[0] > 2 * png.size[1]  # three panels side by side
    card = (Path(rel) / "README.md").read_text()
    assert "bicubic" in card and f"{m['test_psnr']:.2f} dB" in card


def test_predict_tiles_match_whole_image_and_cli_writes_pngs(tmp_path):
    from zoo.predict import main
    from zoo.tasks.sr.release import upscale_tiled

    torch.manual_seed(0)
    model = tiny_edsr(QuantConfig(weight=RLQ(4), act=RLQ(4), overrides=KEEP_FLOAT))
    lr = torch.rand(3, 37, 29)
    whole = model(lr[None])[0]
    tiled = upscale_tiled(model, lr, 2, tile=16, overlap=12)
    assert tiled.shape == whole.shape == (3, 74, 58)
    assert (tiled - whole).abs().max() < 1e-5
    zoo.save(model, tmp_path / "ck")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (21, 34, 3), dtype=np.uint8)).save(imgs / "a.png")
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(imgs / "b.jpg")  # grey: read as RGB
    assert main([str(tmp_path / "ck"), str(imgs), "--out", str(tmp_path / "out"), "--tile", "16"]) == 0
    assert Image.open(tmp_path / "out" / "a_x2.png").size == (68, 42)
    assert Image.open(tmp_path / "out" / "b_x2.png").size == (24, 20)
    assert main([str(tmp_path / "ck"), str(tmp_path / "missing.png"), "--out", str(tmp_path / "o2")]) == 2
    assert main([str(tmp_path / "ck"), str(imgs), "--out", str(tmp_path / "o3"), "--depth", "2"]) == 2
