"""The training CLI: run(cfg) end to end on tiny data, resume, QAT + distillation, and bad input."""
import json
import subprocess
import sys

import numpy as np
import pytest
from hydra import compose, initialize_config_module

import zoo
from tests.test_data import _write_idx
from zoo.train import ConfigError, run


@pytest.fixture(scope="module")
def tiny_fmnist(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 96), ("t10k", 32)):
        y = rng.integers(0, 10, (n,))
        x = rng.integers(0, 60, (n, 28, 28)) + (y[:, None, None] * 19)  # learnable: brightness ~ label
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", x)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", y)
    return root


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
    (["task.name=det"], "unknown task 'det'; valid: \\['cls', 'sal', 'sr'\\]"),
    (["data=folder", "data.root=/nonexistent"], "needs /nonexistent/train"),
    (["ckpt_path=last"], "nothing to resume"),
])
def test_run_rejects_bad_config(tmp_path, tiny_fmnist, overrides, match):
    with pytest.raises((ConfigError, FileNotFoundError), match=match):
        run(cfg_for(tmp_path, tiny_fmnist, *overrides))


@pytest.mark.parametrize("args, match", [
    (["bits=9"], "valid: integers 1..8"),
    (["quant=nope"], "Could not find 'quant/nope'"),
    (["task=nope"], "Could not find 'task/nope'"),
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
