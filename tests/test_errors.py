"""User mistakes end in one line naming the bad value (and the valid choices) and exit code 2, never
a traceback: each case runs the real command line in a subprocess."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest


def cli(module, *args, timeout=300):
    out = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                         timeout=timeout)
    return out.returncode, out.stdout, out.stderr


def one_line_error(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


@pytest.mark.parametrize("args, match", [
    (["quant=nope"], "quant='nope' is not available; valid: ['binarydm', 'dorefa', "),
    (["data=nope"], "data='nope' is not available; valid: ['coco', 'det_composites', 'fmnist', 'fmnist32', 'folder', "),
    (["task=nope"], "task='nope' is not available; valid: ['cls', 'det', 'diffusion', 'matting', 'sal', 'sr', 'vit']"),
    (["epochs=-1"], "epochs=-1 is not valid; valid: an integer >= 1"),
    (["lr=0"], "lr=0 is not valid; valid: a number > 0"),
    (["distill=2"], "distill=2 is not valid; valid: a number in [0, 1]"),
    (["bits=9"], "wbits=9 is not a valid bit width; valid: integers 1..8"),
    (["data=folder", "data.root=/nonexistent"], "/nonexistent/train"),
    (["init_from=/nonexistent/ckpt"], "'/nonexistent/ckpt' is neither a checkpoint directory nor a shipped model"),
    (["task=sr", "init_from=resnet20.lsq_w2a2_fmnist"], "is a task=cls model, not task=sr"),
    (["task=sr", "init_from=swinir.quantsr_w4a4_x4", "arch=edsr"], "is a swinir model but arch=edsr"),
    (["ckpt_path=last", "output_dir=/nonexistent/run"], "nothing to resume"),
    (["trainer.max_epochs=1"], "Could not override 'trainer.max_epochs'. To append to your config use +trainer"),
    (["data=folder"], "data=folder needs data.root=... (e.g. data.root=DIR"),
    (["epochs=three"], "epochs='three' is not valid; valid: an integer >= 1"),
])
def test_train_errors(args, match):
    code, _, err = cli("zoo.train", *args)
    assert code == 2, err
    assert match in one_line_error(err)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("imgs")
    Image.fromarray(np.full((28, 28), 128, np.uint8)).save(d / "good.png")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (d / "notes.jpg").write_text("hello")
    return d


def test_predict_skips_bad_files_reports_them_and_exits_nonzero(images, tmp_path):
    code, out, err = cli("zoo.predict", "resnet20.lsq_w2a2_fmnist", str(images), str(images / "good.png"),
                         "--out", str(tmp_path / "o"), "--device", "cpu")
    assert code == 1 and "Traceback" not in err
    rows = (tmp_path / "o" / "predictions.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith(str(images / "good.png"))  # once, though named twice
    assert f"skipped {images / 'broken.png'}: not a readable image" in err
    assert f"skipped {images / 'notes.jpg'}: not a readable image" in err
    assert "error: 2 of 3 image(s) could not be processed" in err
    assert "knows Fashion-MNIST only" in err  # the model's domain, said up front


@pytest.mark.parametrize("args, match", [
    (["resnet20.nope", "IMG"], "'resnet20.nope' is neither a checkpoint directory nor a shipped model"),
    (["resnet20.lsq_w2a2_fmnist", "/nonexistent.png"], "/nonexistent.png is neither an image file nor a folder"),
    (["resnet20.lsq_w2a2_fmnist", "IMG", "--device", "cuda"],
     "no CUDA GPU is available on this machine; use --device cpu"),
    (["resnet20.lsq_w2a2_fmnist", "IMG", "--device", "tpu"], "--device 'tpu' is not"),
    (["resnet20.lsq_w2a2_fmnist", "IMG", "--backend", "fast"], "backend"),
])
def test_predict_errors(args, match, images, tmp_path):
    import torch

    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    args = [str(images / "good.png") if a == "IMG" else a for a in args]
    code, _, err = cli("zoo.predict", *args, "--out", str(tmp_path / "o"))
    assert code == 2, err
    assert match in one_line_error(err)


def test_images_outside_0_1_are_refused_naming_the_range():
    import torch

    import zoo

    model = zoo.load("resnet20.lsq_w2a2_fmnist")
    with pytest.raises(ValueError, match=r"expected images in \[0, 1\], got values in \[0, 255\] "
                                         r"\(0-255 images: divide by 255\)"):
        model(torch.full((1, 1, 28, 28), 255.0).index_fill_(3, torch.tensor([0]), 0.0))
    with pytest.raises(ValueError, match=r"got values in \[-0.5, 1\]"):
        model(torch.rand(1, 1, 28, 28).clamp(0, 1).index_fill_(2, torch.tensor([0]), -0.5).index_fill_(2, torch.tensor([1]), 1.0))
