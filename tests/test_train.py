"""The training CLI: run(cfg) end to end on tiny data, resume, QAT + distillation, and bad input."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module

import zoo
from zoo.train import ConfigError, run


def cfg_for(tmp, root, *overrides):
    data = [] if "data=folder" in overrides else [f"data.root={root}", "data.val_size=32"]
    with initialize_config_module(config_module="zoo.configs", version_base="1.3"):
        return compose("train", overrides=[
            *data, "batch_size=16", "epochs=1",
            f"output_dir={tmp}", "trainer.log_every_n_steps=1", "+model_args.width=4",
            "init_from=null", "+trainer.enable_progress_bar=false", *overrides])


def test_run_float_then_resume_without_lost_steps(tmp_path, tiny_fmnist):
    out = run(cfg_for(tmp_path / "fp", tiny_fmnist, "quant=none"))
    steps_per_epoch = 4  # 64 training images / 16
    assert out["global_step"] == steps_per_epoch
    rel = out["release_dir"]
    cfg = json.loads(open(f"{rel}/config.json").read())
    assert cfg["quant"] is None and 0 <= cfg["metrics"]["test_acc"] <= 1
    assert cfg["metrics"]["test_images"] == 32
    assert "python -m zoo.train" in cfg["train"]["command"]
    assert (tmp_path / "fp" / "checkpoints" / "last.ckpt").is_file()
    assert list((tmp_path / "fp" / "csv").glob("*/metrics.csv"))
    assert list((tmp_path / "fp" / "tb").glob("*/events.*"))
    import torch

    ck = torch.load(tmp_path / "fp" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    before = next(v for k, v in ck["callbacks"].items() if k.startswith("Timer"))["time_elapsed"]["train"]
    resumed = run(cfg_for(tmp_path / "fp", tiny_fmnist, "quant=none", "epochs=2", "ckpt_path=last"))
    assert resumed["global_step"] == 2 * steps_per_epoch
    train = json.loads(open(f"{resumed['release_dir']}/config.json").read())["train"]
    assert train["resumed"] and train["train_seconds"] >= round(before, 1) > 0  # the first part is counted
    # a checkpoint from before the Timer existed: the total is unknown, so none is recorded
    ck["callbacks"] = {k: v for k, v in ck["callbacks"].items() if not k.startswith("Timer")}
    torch.save(ck, tmp_path / "fp" / "checkpoints" / "last.ckpt")
    old = run(cfg_for(tmp_path / "fp", tiny_fmnist, "quant=none", "epochs=2", "ckpt_path=last"))
    train = json.loads(open(f"{old['release_dir']}/config.json").read())["train"]
    assert train["resumed"] and train["train_seconds"] is None
    # QAT from the float release, with distillation, then packed export at 2 bits
    q = run(cfg_for(tmp_path / "q", tiny_fmnist, "quant=lsq", "bits=2", f"init_from={rel}", "distill=0.5"))
    qcfg = json.loads(open(f"{q['release_dir']}/config.json").read())
    assert qcfg["quant"]["weight"] == {"type": "LSQ", "bits": 2, "granularity": "channel", "grad_numel": "sample"}
    assert qcfg["quant"]["overrides"]["stem"]["weight"]["bits"] == 8
    model = zoo.load(q["release_dir"])
    assert model.net.layers[0].conv1.bits == 2
    assert (tmp_path / "q" / "release" / "golden.safetensors").is_file()
    assert "Reproduce" in (tmp_path / "q" / "release" / "README.md").read_text()


def test_run_binary_irnet(tmp_path, tiny_fmnist):
    out = run(cfg_for(tmp_path, tiny_fmnist, "quant=irnet", "bits=1", "limit_train_batches=2"))
    m = zoo.load(out["release_dir"])
    assert m.net.layers[0].conv1.act_mode == "sign" and m.model_args["per_conv_shortcut"] is True


@pytest.mark.parametrize("overrides, match", [
    (["bits=9"], "wbits=9 is not a valid bit width; valid: integers 1..8"),
    (["bits=0"], "valid: integers 1..8"),
    (["arch=resnet99"], "unknown arch 'resnet99'; valid: .*'resnet20'.*'swinir'"),
    (["quant=irnet", "bits=4"], "IRNet supports bits 1..1, got 4"),
    (["quant=lsq", "bits=1"], "LSQ supports bits 2..8"),
    (["task.name=nope"], "unknown task 'nope'; valid: \\['cls', 'det', 'diffusion', 'matting', 'sal', 'sr'\\]"),
    (["data=folder", "data.root=/nonexistent"], "needs /nonexistent/train"),
    (["ckpt_path=last"], "nothing to resume"),
])
def test_run_rejects_bad_config(tmp_path, tiny_fmnist, overrides, match):
    with pytest.raises((ConfigError, FileNotFoundError), match=match):
        run(cfg_for(tmp_path, tiny_fmnist, *overrides))


@pytest.mark.parametrize("args, match", [
    (["bits=9"], "valid: integers 1..8"),
    (["quant=nope"], "quant='nope' is not available; valid: ['binarydm', 'dorefa', "),
    (["task=nope"], "task='nope' is not available; valid: ['cls', 'det', 'diffusion', 'matting', 'sal', 'sr', 'vit']"),
    (["arch=nope"], "unknown arch 'nope'"),
])
def test_cli_exits_nonzero_naming_valid_choices(args, match):
    out = subprocess.run([sys.executable, "-m", "zoo.train", *args], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0
    assert match in out.stderr + out.stdout


def test_two_stage_releases_a_final_stage_epoch(tmp_path, tiny_fmnist):
    out = run(cfg_for(tmp_path, tiny_fmnist, "quant=irnet", "bits=1", "epochs=2", "two_stage=true",
                      "schedule=linear", "optimizer=adam", "lr=1e-3"))
    rows = [ln.split(",") for ln in next((tmp_path / "csv").rglob("metrics.csv")).read_text().splitlines()]
    col = rows[0].index("val/select")
    select = [float(r[col]) for r in rows[1:] if r[col]]
    assert select[0] == float("-inf") and select[1] == out["metrics"]["best_val"]  # stage 1 never selected
    import torch

    best = torch.load(tmp_path / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert best["epoch"] == 1  # the released weights come from the binary-weight stage


def test_seeds_train_each_seed_and_release_the_median(tmp_path, tiny_fmnist, capsys):
    import statistics

    from zoo.seeds import main as seeds_main

    overrides = [f"data.root={tiny_fmnist}", "data.val_size=32", "batch_size=16", "epochs=1",
                 f"output_dir={tmp_path}", "+model_args.width=4", "init_from=null",
                 "+trainer.enable_progress_bar=false", "quant=lsq", "bits=2", "limit_train_batches=2"]
    assert seeds_main(["seeds=[0,1,2]", *overrides]) == 0
    per_seed = {s: json.loads((tmp_path / f"seed{s}" / "release" / "config.json").read_text()) for s in range(3)}
    assert all(c["train"]["command"].endswith(f"seed={s} output_dir={tmp_path}/seed{s}") for s, c in per_seed.items())
    accs = {s: c["metrics"]["test_acc"] for s, c in per_seed.items()}
    rel = json.loads((tmp_path / "release" / "config.json").read_text())
    rec = rel["seeds"]
    assert rec["metric"] == "test_acc" and rec["runs"] == {str(s): c["metrics"] for s, c in per_seed.items()}
    assert rec["mean"]["test_acc"] == pytest.approx(statistics.fmean(accs.values()))
    assert rec["std"]["test_acc"] == pytest.approx(statistics.stdev(accs.values()))
    median = sorted(accs, key=lambda s: (accs[s], s), reverse=True)[1]
    assert rec["selected"] == median and rel["metrics"] == per_seed[median]["metrics"]
    assert rel["train"]["command"] == "python -m zoo.seeds seeds=[0,1,2] " + " ".join(overrides)
    card = (tmp_path / "release" / "README.md").read_text()
    assert "Over 3 seeds" in card and f"seed {median}, the median" in card
    assert zoo.load(tmp_path / "release") is not None
    capsys.readouterr()
    assert seeds_main(["seeds=[0,1,2]", *overrides]) == 0  # a second call reuses every seed
    assert capsys.readouterr().out.count("reusing") == 3


@pytest.mark.parametrize("args, match", [
    (["seeds=[0]", "task=cls"], "at least two distinct seeds"),
    (["seeds=[0,x]"], "not a list of integers"),
    (["seeds=[0,1]", "seed=3"], "zoo.seeds sets seed itself"),
    (["task=cls"], "missing seeds"),
])
def test_seeds_cli_errors(args, match, capsys):
    from zoo.seeds import main as seeds_main

    assert seeds_main(args) == 2
    assert match in capsys.readouterr().err


def _folder(root, classes=("cat", "dog", "owl"), n=6):
    from PIL import Image

    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for k, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 40, (28, 28)) + 70 * k  # brightness ~ class
                Image.fromarray(img.astype(np.uint8)).save(d / f"{i}.png")
    return root


def test_fine_tune_a_quantized_release(tmp_path, tiny_fmnist, caplog):
    """init_from=<quantized release>: its quantization and model arguments are kept unless the
    command sets them, the run gets a name of its own, another number of classes re-initialises only
    the classifier (with a log line), another number of channels is refused naming the layer."""
    import logging


    from zoo.train import validate

    base = run(cfg_for(tmp_path / "q", tiny_fmnist, "quant=lsq", "bits=2", "+model_args.act=hardtanh"),
               overrides=["quant=lsq", "bits=2"])
    rel = base["release_dir"]
    released = json.loads(open(f"{rel}/config.json").read())
    cfg = cfg_for(tmp_path / "ft", tiny_fmnist, f"init_from={rel}")
    task_cls, _, q, model_args = validate(cfg, [f"init_from={rel}"])
    assert q == released["quant"] and cfg.name == "release_ft_fmnist"
    assert model_args["act"] == "hardtanh" and "num_classes" not in model_args  # the data decides it
    # the command chooses another quantization: it wins
    cfg4 = cfg_for(tmp_path / "ft4", tiny_fmnist, f"init_from={rel}", "bits=4")
    assert validate(cfg4, [f"init_from={rel}", "bits=4"])[2]["weight"]["bits"] == 4

    ft = run(cfg_for(tmp_path / "ft", tiny_fmnist, f"init_from={rel}", "limit_train_batches=2"),
             overrides=[f"init_from={rel}"])
    again = zoo.load(ft["release_dir"])
    assert again.quant.to_dict() == released["quant"] and again.model_args["act"] == "hardtanh"

    # a 3-class, 1-channel folder: the classifier starts afresh, the rest comes from the release
    folder = _folder(tmp_path / "imgs")
    ov = ["data=folder", f"data.root={folder}", "data.channels=1", "data.size=[28,28]", f"init_from={rel}"]
    with caplog.at_level(logging.WARNING):
        out = run(cfg_for(tmp_path / "ft3", tiny_fmnist, *ov, "limit_train_batches=1"), overrides=ov)
    assert "layer fc re-initialised (weight (10, 16) in the release, (3, 16) here)" in caplog.text
    m3 = zoo.load(out["release_dir"])
    assert m3.net.fc.weight_shape[0] == 3
    card = (Path(out["release_dir"]) / "README.md").read_text()
    assert f"- **Splits (folder from `{folder}`):** train 18 / validation 18 / test 18 images" in card
    assert "55,000" not in card
    # 3 channels: the first conv does not fit and is named
    ov3 = [o for o in ov if o != "data.channels=1"]
    with pytest.raises(ConfigError, match=r"mismatching layers: stem \(weight \(4, 1, 3, 3\) in the "
                                          r"release, \(4, 3, 3, 3\) here\)"):
        run(cfg_for(tmp_path / "bad", tiny_fmnist, *ov3), overrides=ov3)


@pytest.mark.parametrize("task, arch, contract, preferred, expected", [
    ("cls", "resnet20", {"channels": 1}, "resnet20.fp32_fmnist", "resnet20.fp32_fmnist"),
    ("cls", "resnet20", {"channels": 3}, "resnet20.fp32_fmnist", None),  # RGB folder: none fits
    ("sr", "edsr", {"channels": 3, "scale": 3}, "edsr.fp32_x3", None),  # no x3 model is shipped
    ("sr", "edsr", {"channels": 3, "scale": 2}, "edsr.fp32_x2", "edsr.fp32_x2"),
    ("sal", "unet_r18", {"channels": 3}, "unet_r18.fp32_sal_folder", "unet_r18.fp32_sal_scenes"),
    ("sal", "linknet_r18", {"channels": 3}, "linknet_r18.fp32_sal_folder", "linknet_r18.fp32_sal_scenes"),
])
def test_default_init_from_is_a_shipped_float_model_that_fits(task, arch, contract, preferred, expected, caplog):
    import logging

    from zoo.tasks import get_task
    from zoo.train import default_init

    with caplog.at_level(logging.INFO):
        assert default_init(get_task(task), arch, contract, preferred) == expected
    if expected is None:
        assert "no shipped float" in caplog.text and "training from scratch" in caplog.text
    elif expected != preferred:
        assert f"starting from {expected}" in caplog.text


def test_user_data_release_names_never_collide_with_shipped_ones():
    with initialize_config_module(config_module="zoo.configs", version_base="1.3"):
        names = {tuple(ov): compose("train", overrides=ov).name for ov in (
            ["task=sr", "bits=2", "data=sr_folder", "data.root=/x"], ["task=sr", "bits=2", "scale=2"],
            ["task=sal", "bits=2", "data=sal_folder", "data.root=/x"], ["data=folder", "data.root=/x"])}
    shipped = set(zoo.list_models())
    assert names[("task=sr", "bits=2", "scale=2")] in shipped  # the built-in data: the shipped name
    assert [n for ov, n in names.items() if any("folder" in o for o in ov) and n in shipped] == []
    assert names[("task=sr", "bits=2", "data=sr_folder", "data.root=/x")] == "edsr.quantsr_w2a2_sr_folder_x4"


def test_last_checkpoint_is_written_every_epoch_even_when_validation_gets_worse(tmp_path, tiny_fmnist, monkeypatch):
    """ckpt_path=last must resume from the last epoch, not from the last *improving* one: simulate a
    validation metric that never improves after epoch 0."""
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    orig = ModelCheckpoint.check_monitor_top_k

    def improves_only_in_epoch_0(self, trainer, current=None):
        return orig(self, trainer, current) if trainer.current_epoch == 0 else False

    monkeypatch.setattr(ModelCheckpoint, "check_monitor_top_k", improves_only_in_epoch_0)
    out = run(cfg_for(tmp_path / "fp", tiny_fmnist, "quant=none", "epochs=3"))
    ckpts = tmp_path / "fp" / "checkpoints"
    last = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    best = torch.load(ckpts / "best.ckpt", map_location="cpu", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (2, out["global_step"]) == (2, 12)
    assert best["epoch"] == 0  # the release is still the best validation epoch
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.ckpt", "last.ckpt"]
