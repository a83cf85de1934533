import os

import numpy as np
import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before Triton is
# first imported (kernels are wrapped at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

FMNIST = "/usr/share/datasets/fashion-mnist"


def has_fmnist() -> bool:
    return os.path.isfile(os.path.join(FMNIST, "t10k-images-idx3-ubyte.gz")) or os.path.isfile(
        os.path.join(FMNIST, "t10k-images-idx3-ubyte"))


needs_fmnist = pytest.mark.skipif(not has_fmnist(), reason="apt-get install -y dataset-fashion-mnist")
# the default saliency data (sal_scenes) and the sal_real photos
needs_scenes = pytest.mark.skipif(
    not (has_fmnist() and os.path.isdir("/usr/share/openclipart/png")
         and os.path.isdir("/usr/share/doc/opencv-doc/examples/data")),
    reason="apt-get install -y dataset-fashion-mnist openclipart-png opencv-doc")


def has_basicsr() -> bool:
    import importlib.util

    return importlib.util.find_spec("basicsr") is not None


needs_basicsr = pytest.mark.skipif(not has_basicsr(), reason=(
    "super-resolution needs basicsr: pip install -c constraints.txt --no-build-isolation basicsr==1.4.2"))


def check_golden(name: str):
    """Load shipped ``name`` as a user would and compare it with its stored golden output;
    returns (output, expected) for task-specific checks."""
    import zoo
    from zoo.cards import read_golden
    from zoo.registry import resolve_checkpoint

    from zoo.tasks import get_task

    model = zoo.load(name)
    x, expected = read_golden(resolve_checkpoint(name))
    out = get_task(model.task).golden_output(model, x)  # model(x), or the task's tensor form of it
    assert out.shape == expected.shape
    assert (out - expected).abs().max() <= 1e-4 * expected.abs().max()
    return out, expected


def check_card(name: str) -> tuple[dict, str]:
    """A shipped release's card against its config.json (its training command, the weights file's
    size) and the task's card images (embedded and present); returns (config, card text) for the task's own
    metric lines."""
    import json

    from zoo.registry import resolve_checkpoint
    from zoo.tasks import get_task

    d = resolve_checkpoint(name)
    cfg = json.loads((d / "config.json").read_text())
    card = (d / "README.md").read_text()
    assert cfg["train"]["command"] in card
    assert cfg["weights"]["bytes"] == (d / "model.safetensors").stat().st_size
    images = [file for file, _, _ in get_task(cfg["task"]).card_images]
    assert images and all(f"]({file})" in card and (d / file).is_file() for file in images)
    return cfg, card


def check_seed_record(cfg: dict, key: str):
    """A ``zoo.seeds`` release: 3 seeds, the released metrics are the median seed's, and the
    recorded mean / sample std are those of the per-seed runs (recomputed here)."""
    import statistics

    s = cfg["seeds"]
    vals = [r[key] for r in s["runs"].values()]
    assert len(vals) == 3 and s["metric"] == key
    assert cfg["metrics"] == s["runs"][str(s["selected"])]
    assert cfg["metrics"][key] == statistics.median(vals)
    assert s["mean"][key] == pytest.approx(statistics.mean(vals), abs=1e-9)
    assert s["std"][key] == pytest.approx(statistics.stdev(vals), abs=1e-9)


@pytest.fixture(scope="module")
def tiny_fmnist(tmp_path_factory):
    from tests.test_data import _write_idx

    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 96), ("t10k", 32)):
        y = rng.integers(0, 10, (n,))
        x = rng.integers(0, 60, (n, 28, 28)) + (y[:, None, None] * 19)  # learnable: brightness ~ label
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", x)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", y)
    return root
