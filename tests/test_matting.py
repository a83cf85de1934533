"""Video matting (BiMatting): compositing, splits, the metrics on hand cases, SAB's sparse 3x3 against
dense times mask (float, training-form and packed), the recurrent state (streaming equals the whole
clip), packed equals training form, Triton equals the reference, the operation count against torch's
FLOP counter, the losses by hand, a 2-step run(cfg) and zoo.predict on a generated video."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import zoo
from tests.conftest import needs_scenes
from zoo.checkpoint import packed_copy
from zoo.models.matting import KEEP_LAYERS, MattingModel, SABlock, _match, clamp01, gather_patches, sparse_conv
from zoo.quantizers import QuantConfig, quantize
from zoo.quantizers.binary import ReAct
from zoo.quantizers.config import LayerQuant
from zoo.registry import create_model
from zoo.tasks.matting import metrics as M
from zoo.tasks.matting.data import VIDEOS, composite, strands_rgba
from zoo.tasks.matting.task import coherence, laplacian_loss

TINY = {"widths": [8, 16, 16, 32], "dec": [16, 8, 8, 8, 8]}
CONTRACT = {"channels": 3, "size": None, "train_size": [32, 32], "frames": 4, "range": [0.0, 1.0],
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
W1A1 = QuantConfig(weight=ReAct(1), act=ReAct(1), overrides={g: LayerQuant(None, None) for g in KEEP_LAYERS})


def tiny(arch="bimatting_small", quant=None, seed=0, **kw):
    """A tiny matting model with BatchNorm statistics from a few training-mode forwards."""
    torch.manual_seed(seed)
    args = {**TINY, **({"act": "rprelu"} if quant else {}), **kw}
    model = MattingModel(create_model(arch, **args), arch, args, "matting", CONTRACT)
    if quant is not None:
        quantize(model.net, quant)
        model.quant = quant
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(2, 2, 3, 32, 32))
    for m in model.modules():  # a coarse alpha in the uncertain band somewhere, not everywhere
        if isinstance(m, torch.nn.Conv2d) and m is model.net.decoder.coarse:
            torch.nn.init.normal_(m.weight, 0, 2.0)
            torch.nn.init.constant_(m.bias, 0.5)
    return model.eval()


# ---------------------------------------------------------------------- data
def test_composite_is_the_over_operator_and_the_matting_equation():
    g = torch.Generator().manual_seed(0)
    bg = torch.rand(2, 3, 6, 6, generator=g)
    a1, a2 = torch.rand(2, 1, 6, 6, generator=g), torch.rand(2, 1, 6, 6, generator=g)
    a1[0, 0, 0, 0], a2[0, 0, 0, 0] = 0.0, 0.0  # a pixel no layer covers
    f1, f2 = torch.rand(2, 3, 6, 6, generator=g), torch.rand(2, 3, 6, 6, generator=g)
    clip, alpha, fgr = composite([torch.cat([a1 * f1, a1], 1), torch.cat([a2 * f2, a2], 1)], bg)
    # layer 1 over layer 2 over the background, written out
    expect = a1 * f1 + (1 - a1) * (a2 * f2 + (1 - a2) * bg)
    torch.testing.assert_close(clip, expect, rtol=0, atol=1e-6)
    torch.testing.assert_close(alpha, a1 + (1 - a1) * a2, rtol=0, atol=1e-6)
    torch.testing.assert_close(clip, alpha * fgr + (1 - alpha) * bg, rtol=0, atol=1e-6)
    assert torch.equal(clip[0, :, 0, 0], bg[0, :, 0, 0]) and fgr[0, :, 0, 0].abs().sum() == 0


def test_strand_alpha_is_the_exact_covered_fraction_of_a_4x_grid():
    rgba = strands_rgba(np.random.default_rng(3), 24)
    a = rgba[3]
    assert rgba.shape == (4, 24, 24)
    assert torch.equal(a * 16, (a * 16).round())  # multiples of 1/16: a 4x4 box of binary subpixels
    assert ((a > 0) & (a < 1)).any() and (a == 0).any()


def test_videos_and_clipart_splits_are_disjoint():
    names = [set(v) for v in VIDEOS.values()]
    assert all(not (a & b) for i, a in enumerate(names) for b in names[i + 1:])


@needs_scenes
def test_builtin_clips_shapes_ranges_and_split_sources():
    from zoo.sources import clipart_files
    from zoo.tasks.matting.data import CompositeMattingData

    dm = CompositeMattingData(size=32, frames=3, eval_frames=5, train_size=4, val_size=2, test_size=2)
    x, a, f = dm.split("train")[1]
    assert x.shape == (3, 3, 32, 32) and a.shape == (3, 1, 32, 32) and f.shape == (3, 3, 32, 32)
    assert dm.split("test")[0][0].shape[0] == 5
    for t in (x, a, f):
        assert t.min() >= 0 and t.max() <= 1
    assert torch.equal(dm.split("test")[1][1], dm.split("test")[1][1])  # a pure function of the index
    files = clipart_files()
    assert not (set(files["train"]) & set(files["test"])) and not (set(files["val"]) & set(files["test"]))


def test_videomatte_folder_composites_its_clips_over_its_backgrounds(tmp_path):
    from PIL import Image

    from zoo.tasks.matting.data import VideoMatteData, _split_of

    rng = np.random.default_rng(0)
    clips = [f"clip{i}" for i in range(12)]
    for c in clips:
        for sub in ("fgr", "pha"):
            (tmp_path / sub / c).mkdir(parents=True)
        for f in range(3):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "fgr" / c / f"{f:04d}.png")
            Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8)).save(tmp_path / "pha" / c / f"{f:04d}.png")
    (tmp_path / "bgr").mkdir()
    Image.fromarray(np.full((30, 30, 3), 200, np.uint8)).save(tmp_path / "bgr" / "plain.png")
    dm = VideoMatteData(root=tmp_path, size=16, frames=2, eval_frames=3, train_size=3, val_size=2, test_size=2)
    x, a, f = dm.split("train")[0]
    assert x.shape == (2, 3, 16, 16) and a.shape == (2, 1, 16, 16) and f.shape == (2, 3, 16, 16)
    bg = torch.full_like(f, 200 / 255)
    torch.testing.assert_close(x, a * f + (1 - a) * bg, rtol=0, atol=1e-5)
    assert dm.split("test")[0][0].shape[0] == 3
    assert {_split_of(c) for c in clips} >= {"train"}
    (tmp_path / "pha" / clips[0] / "0001.png").unlink()
    with pytest.raises(FileNotFoundError, match="alpha frames missing for clip clip0"):
        VideoMatteData(root=tmp_path).setup()
    with pytest.raises(FileNotFoundError, match="bgr"):
        VideoMatteData(root=tmp_path / "nothing").setup()


# ---------------------------------------------------------------------- metrics
def test_mad_mse_on_a_constant_offset_and_perfect_prediction():
    g = np.random.default_rng(0).random((2, 16, 16))
    assert M.clip_metrics(g, g) == {"mad": 0.0, "mse": 0.0, "grad": 0.0, "conn": 0.0, "dtssd": 0.0}
    p = np.clip(g, 0.2, 0.8) + 0.1
    r = M.clip_metrics(p, np.clip(g, 0.2, 0.8))
    assert r["mad"] == pytest.approx(100.0) and r["mse"] == pytest.approx(10.0)
    assert r["grad"] == pytest.approx(0.0, abs=1e-12) and r["dtssd"] == pytest.approx(0.0, abs=1e-9)


def test_grad_on_a_shifted_edge_against_an_explicit_gaussian_derivative():
    g = np.zeros((20, 40))
    g[:, 20:] = 1.0
    p = np.zeros((20, 40))
    p[:, 21:] = 1.0
    s = 1.4
    r = int(4 * s + 0.5)
    k = np.arange(-r, r + 1)
    d = -k / s ** 2 * np.exp(-k ** 2 / (2 * s * s)) / np.exp(-k ** 2 / (2 * s * s)).sum()

    def mag(a):  # the edge varies along x only: |d/dx|, replicate padding
        row = np.pad(a[0], r, mode="edge")
        return np.abs(np.array([np.dot(row[i:i + 2 * r + 1], d[::-1]) for i in range(a.shape[1])]))

    expect = g.shape[0] * ((mag(p) - mag(g)) ** 2).sum() / 1e3  # every row alike
    assert M.grad(p, g) == pytest.approx(expect, rel=1e-9)
    assert M.grad(p, g) > 0


@pytest.mark.parametrize("value, conn", [(0.35, 0.7e-3), (0.6, 0.4e-3), (0.95, 0.0)])
def test_conn_by_hand(value, conn):
    # a 4x4 opaque square; the prediction lowers one pixel of it to ``value``: that pixel leaves the
    # largest component at threshold ceil(value); l = that - 0.1; phi(g) = 1 - (1 - l) when >= 0.15
    g = np.zeros((8, 8))
    g[2:6, 2:6] = 1.0
    p = g.copy()
    p[3, 3] = value
    assert M.conn(p, g) == pytest.approx(conn, abs=1e-12)


def test_conn_counts_a_disconnected_island():
    g = np.zeros((8, 8))
    g[1:4, 1:4] = 1.0
    g[6, 6] = 1.0  # an island: never in the largest component, l = 0 from the first threshold
    p = g.copy()
    # the island pixel: l = 0, d = 1 for both -> phi = 0 for both; now predict it 0.5: d = 0.5 -> phi 0.5
    p[6, 6] = 0.5
    assert M.conn(p, g) == pytest.approx(0.5e-3, abs=1e-12)


def test_dtssd_of_a_flickering_prediction():
    g = np.full((5, 8, 8), 0.3)
    p = g.copy()
    p[1::2] += 0.2  # flickers by 0.2 every frame
    assert M.dtssd(p, g) == pytest.approx(20.0)
    assert M.dtssd(g + 0.1, g) == pytest.approx(0.0, abs=1e-9)  # a steady offset does not flicker
    meter = M.MattingMeter(full=False)
    clips = torch.from_numpy(np.stack([p, g]))[:, :, None].float()
    meter.update(clips, torch.from_numpy(np.stack([g, g]))[:, :, None].float())
    out = meter.compute()
    assert out["dtssd"] == pytest.approx(10.0, rel=1e-5)  # the mean over the two clips
    assert out["mad"] == pytest.approx((0.2 * 2 / 5 * 1e3) / 2, rel=1e-5)


# ---------------------------------------------------------------------- losses
def test_coherence_and_laplacian_losses_by_hand():
    p = torch.zeros(1, 3, 1, 4, 4)
    g = torch.zeros(1, 3, 1, 4, 4)
    p[:, 1] = 0.5  # differences +0.5, -0.5
    assert coherence(p, g).item() == pytest.approx(0.25)
    assert coherence(p[:, :1], g[:, :1]).item() == 0.0
    c = torch.full((2, 1, 8, 8), 0.3)  # a constant offset lives only in the coarsest level
    assert laplacian_loss(c, torch.zeros_like(c)).item() == pytest.approx(4 * 0.3 / 3)
    # its gradient: only the coarsest level (2x2 after two poolings, weight 2^2 / 3 levels) sees a constant;
    # L1 averages 2 x 2 x 2 = 8 entries, each a mean of 16 pixels: 4/3 * 1/8 * 1/16 = 1/96 per pixel
    x = c.clone().requires_grad_(True)
    laplacian_loss(x, torch.zeros_like(x)).backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 1 / 96), rtol=1e-6, atol=0)


# ---------------------------------------------------------------------- model
def test_clamp01_clamps_forward_and_passes_the_gradient_straight_through():
    x = torch.tensor([-0.5, 0.25, 1.5], requires_grad=True)
    y = clamp01(x)
    assert torch.equal(y.detach(), torch.tensor([0.0, 0.25, 1.0]))
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 2.0, 3.0]))  # a plain clamp gives 0 at -0.5 and 1.5
    assert torch.equal(clamp01(torch.tensor([2.0])), torch.tensor([1.0]))


def test_shortcut_channel_matching():
    x = torch.arange(8.0).view(1, 4, 1, 2)
    assert torch.equal(_match(x, 8), torch.cat([x, x], 1))
    torch.testing.assert_close(_match(x, 2), (x[:, :2] + x[:, 2:]) / 2)
    with pytest.raises(ValueError, match="cannot match"):
        _match(x, 3)


def test_sbb_widens_then_shrinks_with_a_skip():
    net = create_model("bimatting_small", **TINY)
    sbb = net.encoder.stages[0][1]
    assert sbb.up.conv1.out_channels == 2 * sbb.up.conv1.in_channels == sbb.dn.conv1.in_channels
    assert sbb.dn.conv1.out_channels == sbb.up.conv1.in_channels
    plain = create_model("rvm_small", **TINY).encoder.stages[0][1]
    assert plain.conv1.in_channels == plain.conv1.out_channels  # the plain stage keeps its width
    sbb.eval()
    for m in sbb.modules():  # every conv off: each block is act(act(x) + x) with ReLU -> 2x, dn(up(x)) + x -> 5x
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.zeros_(m.weight)
    x = torch.rand(1, 16, 4, 4)
    # up: act3(0 + x) = x; act1(0 + match(x, 32)) = [x, x]; dn: [x, x] -> x -> mean of halves = x; + x
    torch.testing.assert_close(sbb(x), 2 * x)


@pytest.mark.parametrize("form", ["float", "training", "packed"])
def test_sab_sparse_3x3_equals_dense_times_mask(form):
    torch.manual_seed(0)
    blk = SABlock(6, 5, "rprelu" if form != "float" else "relu")
    if form != "float":
        blk = torch.nn.Sequential(blk)
        quantize(blk, QuantConfig(weight=ReAct(1), act=ReAct(1)))
        blk = blk[0]
    blk.train()
    blk(torch.randn(2, 6, 8, 8), torch.ones(2, 1, 8, 8))  # BatchNorm statistics
    blk.eval()
    if form == "packed":
        from zoo.quantizers.packed import to_packed

        to_packed(blk)
        assert type(blk.conv3).__name__ == "PackedConv2d"
    x = torch.randn(2, 6, 8, 8)
    mask = (torch.rand(2, 1, 8, 8) < 0.3).float()
    blk.sparse = False
    dense = blk(x, mask)
    blk.sparse = True
    blk.active = blk.total = 0
    sparse = blk(x, mask)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
    assert blk.density == pytest.approx(float(mask.mean()))
    # the gathered patches are F.unfold's columns at those positions
    n_idx, p_idx = (mask.reshape(2, -1) > 0).nonzero(as_tuple=True)
    torch.testing.assert_close(gather_patches(x, n_idx, p_idx), F.unfold(x, 3, padding=1)[n_idx, :, p_idx],
                               rtol=0, atol=0)
    # the 3x3 branch alone, at the selected positions, against the dense conv
    n_idx, p_idx = (mask.reshape(2, -1) > 0).nonzero(as_tuple=True)
    full = blk.conv3(x).flatten(2).transpose(1, 2)[n_idx, p_idx]
    torch.testing.assert_close(sparse_conv(blk.conv3, x, n_idx, p_idx), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["rvm_small", "bimatting_small"])
def test_streaming_frame_by_frame_equals_the_whole_clip(arch):
    model = tiny(arch)
    clip = torch.rand(2, 4, 3, 32, 32)
    with torch.no_grad():
        whole, fgr = model(clip, fgr=True)
        model.reset()
        steps = [model.step(clip[:, t]) for t in range(4)]
        cold = model(clip[:, 3:])  # the last frame without the state of the first three
    torch.testing.assert_close(torch.stack(steps, 1), whole, rtol=1e-5, atol=1e-6)
    assert (cold - whole[:, 3:]).abs().max() > 1e-4  # the state carries information across frames
    assert whole.shape == (2, 4, 1, 32, 32) and fgr.shape == (2, 4, 3, 32, 32)
    assert whole.min() >= 0 and whole.max() <= 1


def test_model_checks_its_inputs():
    model = tiny("rvm_small")
    with pytest.raises(ValueError, match="N x T x 3 x H x W"):
        model(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="multiple of 16"):
        model(torch.rand(1, 2, 3, 40, 32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model(torch.rand(1, 2, 3, 32, 32) * 255)


def test_packed_equals_training_form_and_save_load_round_trip(tmp_path):
    model = tiny("bimatting_small", W1A1)
    clip = torch.rand(1, 3, 3, 32, 32)
    with torch.no_grad():
        y = model(clip)
    packed = packed_copy(model)
    with torch.no_grad():
        yp = packed(clip)
    # binary activations: a sum that lands on 0 in one form and not the other flips a sign, so compare
    # the bulk of the pixels tightly
    close = ((yp - y).abs() < 1e-4).float().mean()
    assert close > 0.98, float(close)
    zoo.save(model, tmp_path / "ck")
    loaded = zoo.load(tmp_path / "ck")
    assert isinstance(loaded, MattingModel)
    with torch.no_grad():
        assert torch.equal(loaded(clip), packed(clip))
    binary = [m for m in loaded.net.modules() if getattr(m, "bits", None) == 1]
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in create_model("bimatting_small", **TINY).modules())
    assert len(binary) == convs - len(KEEP_LAYERS)


def test_triton_equals_reference_on_a_tiny_matting_net():
    pytest.importorskip("zoo.kernels.triton_lowbit")
    packed = packed_copy(tiny("rvm_small", W1A1, widths=[8, 16, 16, 32]))
    clip = torch.rand(1, 1, 3, 16, 16)
    zoo.set_backend(packed, "reference")
    with torch.no_grad():
        ref = packed(clip)
        zoo.set_backend(packed, "triton")
        assert torch.equal(packed(clip), ref)


def test_operation_count_against_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from zoo.tasks.matting.release import operations

    clip = torch.rand(1, 2, 3, 32, 32)
    for arch in ("rvm_small", "bimatting_small"):  # float: every conv (SAB's as its sparse matmul) is a FLOP
        model = tiny(arch)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(clip)
        ops = operations(model, clip)
        assert ops["bops"] == 0
        assert ops["flops"] == pytest.approx(counter.get_total_flops() / 2 / 2, rel=1e-9)  # 2 per MAC, 2 frames
    binary = tiny("bimatting_small", W1A1)
    ob = operations(binary, clip)
    keep = operations(tiny("bimatting_small"), clip)
    assert 0 < ob["flops"] < keep["flops"] and ob["ops"] == pytest.approx(ob["flops"] + ob["bops"] / 64)


# ---------------------------------------------------------------------- run and predict
@needs_scenes
def test_run_two_steps_then_predict_a_video(tmp_path):
    import cv2
    from hydra import compose, initialize_config_module

    from zoo.predict import main as predict_main
    from zoo.train import run

    with initialize_config_module(config_module="zoo.configs", version_base="1.3"):
        cfg = compose("train", overrides=[
            "task=matting", "arch=bimatting_small", "quant=react", "bits=1", "init_from=null", "epochs=1",
            "batch_size=2", "limit_train_batches=2", "data.size=32", "data.frames=2", "data.eval_frames=3",
            "data.train_size=4", "data.val_size=2", "data.test_size=2", "+trainer.enable_progress_bar=false",
            f"++model_args.widths={TINY['widths']}", f"++model_args.dec={TINY['dec']}",
            f"output_dir={tmp_path / 'run'}"])
    res = run(cfg)
    rel = res["release_dir"]
    conf = json.loads(open(f"{rel}/config.json").read())
    m = conf["metrics"]
    assert res["global_step"] == 2 and m["test_clips"] == 2
    assert 0 <= m["test_sab_density"] <= 1 and m["test_ops"] > 0
    assert math.isfinite(m["test_mad"]) and (tmp_path / "run" / "release" / "sample.png").is_file()
    video = tmp_path / "clip.avi"
    wr = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (48, 40))
    for i in range(5):
        wr.write(np.full((40, 48, 3), 40 * i, np.uint8))
    wr.release()
    out = tmp_path / "matte"
    assert predict_main([rel, str(video), "--out", str(out), "--device", "cpu"]) == 0
    alphas = sorted((out / "alpha").iterdir())
    assert len(alphas) == 5 and (out / "composite.mp4").stat().st_size > 0
    from PIL import Image

    assert Image.open(alphas[0]).size == (48, 40)
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), 60 * i, np.uint8)).save(frames / f"{i:03d}.png")
    assert predict_main([rel, str(frames), "--out", str(tmp_path / "m2"), "--side", "16"]) == 0
    assert len(list((tmp_path / "m2" / "alpha").iterdir())) == 3
    assert predict_main([rel, str(video), "--out", str(out), "--side", "20"]) == 2  # not a multiple of 16
    assert predict_main([rel, str(video), str(video), "--out", str(out)]) == 2  # one video at a time
    broken = tmp_path / "broken.avi"
    broken.write_bytes(b"not a video")
    assert predict_main([rel, str(broken), "--out", str(tmp_path / "m3")]) == 1  # named and skipped
    assert predict_main([rel, str(tmp_path / "run" / "release" / "sample.png"), "--out", str(out)]) == 2
