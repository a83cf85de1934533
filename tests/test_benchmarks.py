"""The benchmark scripts run end to end (``--smoke``: tiny shapes, one run each) and refuse to
produce numbers without a GPU, so they cannot rot between GPU sessions."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script, *args, env=None):
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=900, cwd=BENCH.parent, env=env)


def test_kernels_benchmark_smoke():
    out = _run("kernels.py", "--smoke")
    assert out.returncode == 0, out.stderr[-3000:]
    table = [ln for ln in out.stdout.splitlines() if ln.startswith("| ")]
    assert len(table) == 2 * (1 + 2)  # eager and graph tables: header + one conv + one linear row
    assert "W1A1 dot" in table[0] and "W4A8 ref" in table[0] and "not evaluated in a smoke run" in out.stdout
    # every kernel's output equals the reference backend's on the benchmarked input
    assert table[0].rstrip(" |").endswith("not bit-exact vs reference")
    assert all(row.rstrip(" |").endswith("| none") for row in table[1:3]), table


def test_ptq_benchmark_runs_and_saves_its_table(tmp_path, tiny_fmnist):
    out = _run("ptq.py", "--calib", "real", "--seeds", "0", "1", "--out", str(tmp_path), "--runs",
               str(tmp_path / "runs"), f"data.root={tiny_fmnist}", "data.val_size=32", "calib.n=8", "bits=8")
    assert out.returncode == 0, out.stderr[-3000:]
    table = (tmp_path / "ptq_cls_w8a8_real.md").read_text()
    rows = [ln for ln in table.splitlines() if ln.startswith("| real |")]
    assert len(rows) == 3  # two runs and their mean ± std
    accs = [float(r.split("|")[3]) for r in rows[:2]]
    mean = float(rows[2].split("|")[3])
    assert mean == pytest.approx(sum(accs) / 2, abs=1e-4)
    import zoo

    assert zoo.load(tmp_path / "runs" / "real_s0" / "release").quant is not None


def test_mixed_benchmark_runs_and_saves_its_table(tmp_path, tiny_fmnist):
    out = _run("mixed.py", "--methods", "htq", "direct", "--seeds", "0", "1", "--out", str(tmp_path), "--runs",
               str(tmp_path / "runs"), f"data.root={tiny_fmnist}", "data.val_size=32", "calib.n=16",
               "abits_choices=[4,8]")
    assert out.returncode == 0, out.stderr[-3000:]
    table = (tmp_path / "mixed_cls_w3a4.md").read_text()
    assert (tmp_path / "mixed_cls_w3a4.png").is_file()
    rows = {r.split("|")[1].strip(): r.split("|") for r in table.splitlines()
            if r.startswith(("| uniform", "| htq mixed", "| direct mixed"))}
    assert list(rows) == ["uniform W3A4", "htq mixed", "direct mixed"]
    for r in rows.values():  # two runs, their mean
        seeds = [float(v) for v in r[8].split()]
        assert len(seeds) == 2 and float(r[6]) == pytest.approx(sum(seeds) / 2, abs=1e-4)
    # the mixed configurations fit the uniform configuration's nominal size
    assert all(int(r[3].replace(",", "")) <= int(rows["uniform W3A4"][3].replace(",", "")) for r in rows.values())
    assert len([ln for ln in table.splitlines() if ln.startswith("| htq vs direct |")]) == 4 + 2


def test_own_arch_benchmark_finds_the_models_whose_architecture_differs(tmp_path):
    """ReAct's ResNet-20 (RPReLU, per-conv shortcuts) differs from the float release's; LSQ's does not."""
    out = _run("own_arch.py", "--task", "cls", "--batch", "2", "--reps", "1", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    table = (tmp_path / next(p.name for p in tmp_path.glob("own_arch_*.md"))).read_text()
    rows = {r.split("|")[1].strip(): r.split("|") for r in table.splitlines() if r.startswith("| resnet20.")}
    assert "resnet20.react_w1a1_fmnist" in rows and "resnet20.lsq_w4a4_fmnist" not in rows
    release, own = float(rows["resnet20.react_w1a1_fmnist"][3]), rows["resnet20.react_w1a1_fmnist"][4]
    ratio = float(own.split("(")[1].split("x")[0])  # printed from unrounded times: within rounding
    assert ratio == pytest.approx(float(own.split()[0]) / release, abs=0.03)


@pytest.mark.slow
def test_model_benchmark_smoke():
    out = _run("model.py", "--smoke")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "triton (popcount)" in out.stdout and "resnet20.lsq_w4a4_fmnist" in out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
@pytest.mark.parametrize("script", ["kernels.py", "model.py"])
def test_benchmarks_need_a_gpu_for_real_numbers(script):
    out = _run(script)
    assert out.returncode == 2 and "needs a CUDA device" in out.stderr


def test_sr_checkpoints_benchmark_on_a_user_folder(tmp_path):
    """Every shipped SR model is evaluated on photos of the user's (here: two small ones)."""
    from tests.conftest import has_basicsr

    if not has_basicsr():
        pytest.skip("needs basicsr")
    import numpy as np
    from PIL import Image

    import zoo

    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    out = _run("checkpoints.py", "--task", "sr", "--data", str(tmp_path), "--out", str(tmp_path / "t.md"))
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [ln for ln in out.stdout.splitlines() if ln.startswith("| [edsr") or ln.startswith("| [swinir")]
    assert len(rows) == len(zoo.list_models(task="sr")) > 0
    assert "2 images from" in out.stdout
    assert (tmp_path / "t.md").read_text().strip() == out.stdout.strip()
    import re

    links = [m.group(1) for r in rows for m in [re.search(r"\]\(([^)]+)\)", r)]]
    assert len(links) == len(rows)  # relative to the saved table's folder, so they work where it is read
    assert all(not Path(link).is_absolute() and (tmp_path / link).is_file() for link in links), links


def test_sal_checkpoints_benchmark_on_a_user_folder(tmp_path):
    """Every shipped saliency model is evaluated on a DUTS-style folder of the user's."""
    pytest.importorskip("segmentation_models_pytorch")
    import numpy as np
    from PIL import Image

    import zoo

    if not zoo.list_models(task="sal"):
        pytest.skip("no saliency checkpoints shipped")
    rng = np.random.default_rng(0)
    (tmp_path / "d" / "images").mkdir(parents=True)
    (tmp_path / "d" / "masks").mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(tmp_path / "d" / "images" / f"{i}.jpg")
        Image.fromarray((rng.random((40, 52)) > 0.5).astype(np.uint8) * 255).save(tmp_path / "d" / "masks" / f"{i}.png")
    out = _run("checkpoints.py", "--task", "sal", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "t.md"))
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [ln for ln in out.stdout.splitlines() if ln.startswith("| [") and "_sal_scenes" in ln]
    assert len(rows) == len(zoo.list_models(task="sal"))
    assert "2 image/mask pairs from" in out.stdout  # every model evaluated on the user's two pairs
    assert (tmp_path / "t.md").read_text().strip() == out.stdout.strip()


def test_generate_benchmark_smoke():
    pytest.importorskip("diffusers")
    out = _run("generate.py", "--smoke")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [ln for ln in out.stdout.splitlines() if ln.startswith("| tiny")]
    assert len(rows) == 2 and "| float |" in rows[0] and "| packed |" in rows[1]
    assert rows[0].rstrip(" |").endswith("1.00x") and "nothing saved" in out.stdout


def test_cpu_benchmark_smoke(tmp_path):
    import os

    out = _run("cpu.py", "--smoke", "--task", "cls", "--layers",
               env={**os.environ, "ZOO_CACHE": str(tmp_path)})  # ONNX exports, the C++ kernel's build
    assert out.returncode == 0, out.stderr[-3000:]
    timing, memory = out.stdout.split("## Peak memory of one forward")
    rows = [ln for ln in timing.splitlines() if ln.startswith("| resnet20.")]
    assert len(rows) == 1 and "| 1 |" in rows[0]
    assert "reference ms (/FP32)" in out.stdout and "cpu ms (/FP32)" in out.stdout
    mem = [ln for ln in memory.splitlines() if ln.startswith("| resnet20.")]
    assert len(mem) == 1 and all(float(v) >= 0 for v in mem[0].strip("| ").split(" | ")[2:5])
    layers = [ln for ln in out.stdout.splitlines() if ln.startswith("| resnet20 stage 1 |")]
    assert len(layers) == 1 and "| 16x28x28 | 64 |" in layers[0] and "x) |" in layers[0]
