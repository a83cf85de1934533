"""task=diffusion: the DDPM UNet (diffusers) and its release contract, BinaryDM's LRM (PCA projection and
loss against hand computation), packed == training form, Triton == reference, generate(), the
classifier-feature FD, the data, zoo.predict and a 2-step run(cfg). EBB's numerics are in
test_quantizer_grads.py."""
import copy
import json
import math

import pytest
import torch

import zoo
from tests.conftest import has_fmnist
from zoo.checkpoint import packed_copy
from zoo.quantizers import EBB, LSQ, LayerQuant, MinMax, QuantConfig, XNOR, quantize, set_progress

pytest.importorskip("diffusers")

from zoo.models.diffusion import DiffusionModel, KEEP_LAYERS  # noqa: E402
from zoo.registry import create_model  # noqa: E402
from zoo.tasks.diffusion.lrm import FeatureTap, lrm_loss, pca_projection, project, unet_blocks  # noqa: E402

CONTRACT = {"channels": 1, "size": [8, 8], "mean": [0.5], "std": [0.5], "classes": [], "fd": None}
TINY = dict(in_chans=1, size=8, widths=(8, 16), norm_groups=4, timesteps=50)
KEEP = {g: LayerQuant(MinMax(8, "channel"), MinMax(8)) for g in KEEP_LAYERS}
W1A4 = QuantConfig(weight=EBB(), act=LSQ(4), overrides=KEEP)
XNOR_A4 = QuantConfig(weight=XNOR(), act=LSQ(4), overrides=KEEP)


def tiny(quant=None, seed=0, **kw):
    """A tiny DDPM UNet as a DiffusionModel, quantized with ``quant`` and given one training step
    (quantizers initialised; EBB run to its single basis)."""
    torch.manual_seed(seed)
    net = create_model("ddpm_unet", **{**TINY, **kw})
    model = DiffusionModel(net, "ddpm_unet", {**TINY, **kw}, "diffusion", CONTRACT)
    if quant is not None:
        quantize(model.net, quant)
        model.quant = quant
        model.train()
        model(torch.randn(4, 1, 8, 8), torch.tensor([1, 10, 20, 40])).square().mean().backward()
        set_progress(model.net, 1.0)
    return model.eval()


def test_unet_is_diffusers_with_its_schedule_and_checks_its_inputs():
    from diffusers import DDPMScheduler, UNet2DModel

    model = tiny()
    assert isinstance(model.net.unet, UNet2DModel)
    assert model.net.unet.config.block_out_channels == (8, 16)
    ref = DDPMScheduler(num_train_timesteps=50, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    assert torch.equal(model.net.scheduler("ddpm").alphas_cumprod, ref.alphas_cumprod)
    assert torch.equal(model.net.alphas_cumprod, ref.alphas_cumprod)
    # the training input x_t: images in [0, 1] -> [-1, 1], noised as diffusers' DDPMScheduler.add_noise does
    from zoo.tasks.diffusion.task import noisy

    img, eps, t = torch.rand(3, 1, 8, 8), torch.randn(3, 1, 8, 8), torch.tensor([0, 20, 49])
    torch.testing.assert_close(noisy(model, img, t, eps), ref.add_noise(2 * img - 1, eps, t))
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x, 7), model.net.unet(x, torch.tensor([7, 7, 7])).sample)
    with pytest.raises(ValueError, match=r"N x 1 x 8 x 8"):
        model(torch.randn(3, 3, 8, 8), 7)
    with pytest.raises(ValueError, match="integer timestep"):
        model(x, torch.tensor([1.5, 2.0, 3.0]))
    with pytest.raises(ValueError, match="beta_schedule='cosine' is not valid; valid: .*linear"):
        create_model("ddpm_unet", beta_schedule="cosine")
    with pytest.raises(ValueError, match="scheduler='euler' is not valid; valid: .*ddim"):
        model.generate(2, steps=2, scheduler="euler")
    with pytest.raises(ValueError, match=r"steps=0 is not valid; valid: an integer in 1..50"):
        model.generate(2, steps=0)


def test_quantize_covers_the_unet_and_keeps_the_float_state_dict_loadable():
    model = tiny()
    sd = copy.deepcopy(model.state_dict())
    quantize(model.net, W1A4)
    model.load_state_dict(sd, strict=True)  # the float checkpoint still loads (quantizer state aside)
    layers = {n: m for n, m in model.net.named_modules() if hasattr(m, "wq")}
    float_layers = [n for n, m in tiny().net.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert sorted(layers) == sorted(float_layers)  # every conv and linear, time-embedding projections too
    kept = {n for n, m in layers.items() if type(m.wq).__name__ != "EBBWeight"}
    assert kept == {"unet.conv_in", "unet.conv_out", "unet.time_embedding.linear_1", "unet.time_embedding.linear_2"}


@pytest.mark.parametrize("quant", [W1A4, XNOR_A4], ids=["ebb", "xnor"])
def test_packed_equals_training_form_and_save_load_round_trip(tmp_path, quant):
    model = tiny(quant)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 17, 49])
    with torch.no_grad():
        y = model(x, t)
    packed = packed_copy(model)
    torch.testing.assert_close(packed(x, t), y, rtol=1e-4, atol=1e-4 * float(y.abs().max()))
    zoo.save(model, tmp_path / "ck")
    loaded = zoo.load(tmp_path / "ck")
    assert isinstance(loaded, DiffusionModel)
    assert torch.equal(loaded(x, t), packed(x, t))
    binary = [m for m in loaded.net.modules() if getattr(m, "bits", None) == 1]
    n_layers = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in tiny().net.modules())
    assert len(binary) == n_layers - 4 and all(m.qweight.dtype == torch.uint8 for m in binary)  # all but KEEP
    for m in binary:  # one bit per weight: each output row's codes in ceil(k / 8) bytes
        rows, k = m.weight_shape[0], math.prod(m.weight_shape[1:])
        assert m.qweight.shape == (rows, -(-k // 8))


def test_triton_equals_reference_on_a_tiny_unet():
    pytest.importorskip("zoo.kernels.triton_lowbit")
    packed = packed_copy(tiny(W1A4))
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([5])
    zoo.set_backend(packed, "reference")
    ref = packed(x, t)
    zoo.set_backend(packed, "triton")
    assert torch.equal(packed(x, t), ref)
    from zoo.quantizers.packed import PackedLayer

    layers = [m for m in packed.net.modules() if isinstance(m, PackedLayer)]
    assert sum("_kernel_cache" in m.__dict__ for m in layers) >= len(layers) - 1


def test_generate_is_deterministic_per_seed_and_in_unit_range():
    model = tiny()
    a = model.generate(5, steps=4, seed=3, progress=False, batch_size=2)
    b = model.generate(5, steps=4, seed=3, progress=False, batch_size=2)
    c = model.generate(5, steps=4, seed=4, progress=False, batch_size=2)
    assert a.shape == (5, 1, 8, 8) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0 <= a.min() and a.max() <= 1
    # DDIM (eta 0) from the same start noise: the batch split does not change the images
    assert torch.allclose(model.generate(5, steps=4, seed=3, progress=False, batch_size=5), a, atol=1e-5)
    # written out: x_T ~ N(0, I) from the seed, then DDIM's deterministic (eta 0) update per step:
    # x0 = clip((x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)), x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=50, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                          clip_sample=True)
    sched.set_timesteps(4)
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    abar = sched.alphas_cumprod
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            eps = model.net.unet(x, t.expand(5)).sample
            x0 = ((x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()).clamp(-1, 1)
            prev = sched.timesteps[i + 1] if i + 1 < len(sched.timesteps) else None
            ab_prev = abar[prev] if prev is not None else sched.final_alpha_cumprod
            x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
    torch.testing.assert_close(a, ((x + 1) / 2).clamp(0, 1), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- LRM
def test_pca_projection_finds_the_principal_directions():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    scales = torch.tensor([5.0, 3.0, 2.0, 0.5, 0.2, 0.1], dtype=torch.float64)
    a = torch.randn(4000, 6, generator=g, dtype=torch.float64)
    u, _ = torch.linalg.qr(a - a.mean(0))  # orthonormal, zero-mean columns
    z = u * scales * (4000 - 1) ** 0.5  # covariance exactly diag(scales^2) along q's columns
    v = z @ q.T + torch.tensor([1.0, -2, 0, 3, 0, 1], dtype=torch.float64)  # a mean offset: removed
    feats = v.reshape(40, 10, 10, 6).permute(0, 3, 1, 2).contiguous()  # N x C x H x W
    p = pca_projection(feats, 2)
    assert p.shape == (6, 2)
    for k in range(2):  # the top directions, largest variance first (up to sign)
        assert abs(float(p[:, k] @ q[:, k])) == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError, match="rank=7 is not valid for 6 channels"):
        pca_projection(feats, 7)


def test_lrm_loss_and_its_gradient_by_hand():
    g = torch.Generator().manual_seed(1)
    s = {"a": torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True),
         "b": torch.randn(2, 8, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)}
    t = {"a": torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True),
         "b": torch.randn(2, 8, 2, 2, generator=g, dtype=torch.float64)}
    p = {"a": torch.randn(4, 1, generator=g, dtype=torch.float64), "b": torch.randn(8, 2, generator=g, dtype=torch.float64)}
    loss = lrm_loss(s, t, p)
    expected, grads = 0.0, {}
    for name in p:
        n, c, h, w = s[name].shape
        d = (s[name] - t[name]).detach()
        proj = torch.zeros(n, p[name].shape[1], h, w, dtype=torch.float64)
        for i in range(n):
            for y in range(h):
                for x in range(w):
                    proj[i, :, y, x] = d[i, :, y, x] @ p[name]
        expected += float((proj ** 2).mean())
        grads[name] = 2 / proj.numel() * torch.einsum("nkhw,ck->nchw", proj, p[name])
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-12)
    loss.backward()
    for name in p:
        torch.testing.assert_close(s[name].grad, grads[name])
    assert t["a"].grad is None  # the teacher is a target
    assert torch.equal(project(s["a"], p["a"]), torch.einsum("nchw,ck->nkhw", s["a"], p["a"]))


def test_feature_tap_collects_every_block_output_of_the_unet():
    model = tiny()
    names = unet_blocks(model.net.unet)
    assert names == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
    tap = FeatureTap(model.net.unet, names)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        out, feats = tap.collect(model, x, 3)
        assert torch.equal(out, model(x, 3))
    assert list(feats) == names
    assert feats["down_blocks.0"].shape == (2, 8, 4, 4) and feats["mid_block"].shape == (2, 16, 4, 4)
    assert feats["up_blocks.1"].shape == (2, 8, 8, 8)
    with torch.no_grad():
        model(x, 3)
    assert tap.feats == {}  # nothing kept outside collect()
    with pytest.raises(ValueError, match="no submodule"):
        FeatureTap(model.net.unet, ["down_blocks.9"])


# ----------------------------------------------------------------------------- FD
@pytest.mark.skipif(not has_fmnist(), reason="needs dataset-fashion-mnist")
def test_classifier_fd_is_zero_for_a_set_with_itself_and_grows_with_noise():
    from zoo.tasks.diffusion.data import FashionMNIST32Data
    from zoo.tasks.diffusion.metrics import feature_network, sample_distances

    dm = FashionMNIST32Data(limit_test=300)
    dm.setup()
    real = dm.images("test")
    feats = feature_network("resnet20.fp32_fmnist")
    assert feats.num_features == 64
    g = torch.Generator().manual_seed(0)
    same = sample_distances(real, real, feats)
    assert abs(same["fd"]) < 1e-3  # (KID's unbiased estimate of a set against itself is slightly negative)
    noisy = [sample_distances(real, (real + s * torch.randn(real.shape, generator=g)).clamp(0, 1), feats)
             for s in (0.05, 0.2, 0.5)]
    assert same["fd"] < noisy[0]["fd"] < noisy[1]["fd"] < noisy[2]["fd"]
    assert same["kid"] < noisy[0]["kid"] < noisy[1]["kid"] < noisy[2]["kid"]
    # the features are the classifier's penultimate layer on the centre 28 x 28 (the unpadded image)
    clf = zoo.load("resnet20.fp32_fmnist")
    kept = {}
    clf.net.fc.register_forward_pre_hook(lambda m, a: kept.setdefault("x", a[0]))
    clf(real[:4, :, 2:30, 2:30])
    torch.testing.assert_close(feats(real[:4]), kept["x"].double())


# ----------------------------------------------------------------------------- data
@pytest.mark.skipif(not has_fmnist(), reason="needs dataset-fashion-mnist")
def test_fmnist32_pads_the_items_and_filters_classes():
    from zoo.datasets import load_fmnist
    from zoo.tasks.diffusion.data import FashionMNIST32Data

    dm = FashionMNIST32Data(classes=["Trouser", 7], limit_test=50)
    dm.setup()
    x, y = dm.images("test"), torch.stack([dm.test_set[i][1] for i in range(50)])
    raw, labels = load_fmnist(split="test")
    keep = (labels == 1) | (labels == 7)
    assert torch.equal(x[:, :, 2:30, 2:30], raw[keep][:50].float() / 255)
    assert float(x[:, :, :2].abs().sum() + x[:, :, 30:].abs().sum()) == 0  # black border
    assert torch.equal(y, (labels[keep][:50] == 7).long())  # indices into ["Trouser", "Sneaker"]
    assert dm.input_contract()["classes"] == ["Trouser", "Sneaker"]
    assert dm.input_contract()["fd"] is None
    with pytest.raises(ValueError, match="'Hat' is not a Fashion-MNIST class; valid: indices 0-9 or"):
        FashionMNIST32Data(classes=["Hat"])


def test_folder_data_resizes_centre_crops_and_holds_images_out(tmp_path):
    from PIL import Image

    from zoo.tasks.diffusion.data import FolderDiffusionData

    for i in range(20):
        arr = torch.zeros(40, 60, 3, dtype=torch.uint8)
        arr[:, 20:40] = 255  # a white centre band that the centre crop keeps whole
        (tmp_path / "sub").mkdir(exist_ok=True)
        Image.fromarray(arr.numpy()).save(tmp_path / ("sub" if i % 2 else ".") / f"{i}.png")
    dm = FolderDiffusionData(root=tmp_path, size=20, val_fraction=0.1)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (18, 2, 2)
    x = dm.images("train", 3)
    assert x.shape == (3, 3, 20, 20)  # 40 x 60 -> 20 x 30 -> centre 20 x 20
    assert x[:, :, :, 6:14].min() > 0.9 and x[:, :, :, :3].max() < 0.1 and x[:, :, :, 17:].max() < 0.1
    with pytest.raises(FileNotFoundError, match="not a folder"):
        FolderDiffusionData(root=tmp_path / "nope").setup()


# ----------------------------------------------------------------------------- end to end
@pytest.mark.skipif(not has_fmnist(), reason="needs dataset-fashion-mnist")
def test_run_float_then_binarydm_with_lrm_and_predict(tmp_path):
    from hydra import compose, initialize_config_module

    from zoo.predict import main as predict_main
    from zoo.train import run

    def cfg(*ov):
        with initialize_config_module(config_module="zoo.configs", version_base="1.3"):
            return compose("train", overrides=[
                "task=diffusion", "batch_size=8", "limit_train_batches=2", "limit_val_batches=1",
                "data.limit_test=8", "data.fd_steps=2", "+trainer.enable_progress_bar=false",
                "++model_args.widths=[8,16]", "++model_args.norm_groups=4", *ov])

    fp = run(cfg("quant=none", "init_from=null", "epochs=1", f"output_dir={tmp_path / 'fp'}"))
    fcfg = json.loads(open(f"{fp['release_dir']}/config.json").read())
    assert fcfg["metrics"]["test_fd_samples"] == 8 and fcfg["metrics"]["test_fd_steps"] == 2
    assert fcfg["input_contract"]["fd"] == {"feature": "resnet20.fp32_fmnist", "layer": "fc", "steps": 2}
    bdm = run(cfg("quant=binarydm", "distill=0.5", "epochs=2", f"init_from={fp['release_dir']}",
                  f"output_dir={tmp_path / 'bdm'}"))
    rel = bdm["release_dir"]
    qcfg = json.loads(open(f"{rel}/config.json").read())
    assert qcfg["quant"]["weight"] == {"type": "EBB", "bits": 1, "decay_end": 0.5}
    assert qcfg["quant"]["act"]["bits"] == 4
    import csv

    rows = list(csv.DictReader(open(next((tmp_path / "bdm" / "csv").glob("*/metrics.csv")))))
    assert any(r.get("train/lrm_epoch") for r in rows)  # LRM was part of the loss
    sel = [r["val/select"] for r in rows if r.get("val/select")]
    assert sel[0] == "inf" and sel[-1] != "inf"  # the epoch with a second basis left is never released
    model = zoo.load(rel)
    assert all(getattr(m, "bits", 8) in (1, 4, 8) for m in model.net.modules())
    out = tmp_path / "samples"
    assert predict_main([rel, "--num", "3", "--steps", "2", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["sample_0000.png", "sample_0001.png", "sample_0002.png",
                                                      "samples.png"]
    assert predict_main([rel, "some.png", "--out", str(out)]) == 2  # a generator takes no images
