"""The built distributions carry the shipped checkpoints (``setup.py`` copies ``checkpoints/`` into
the wheel's ``zoo/checkpoints/``, ``MANIFEST.in`` puts it in the sdist), and an installed package finds
them there. Builds sdist -> wheel as ``python -m build`` does, offline (``--no-isolation``), from a
copy of the source tree; nothing is installed."""
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import zoo
from zoo.registry import checkpoint_root, resolve_checkpoint

ROOT = Path(__file__).resolve().parents[1]
NOT_SOURCE = (".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
              "outputs", "lightning_logs", ".whl", ".gl")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    pytest.importorskip("build", reason="the dev extra's `build` package builds the distributions")
    tmp = tmp_path_factory.mktemp("dist")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    r = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp / "dist"), str(src)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    wheel, = (tmp / "dist").glob("*.whl")
    sdist, = (tmp / "dist").glob("*.tar.gz")
    return wheel, sdist


def _release_files(name: str) -> dict[str, int]:
    d = resolve_checkpoint(name)
    return {f.name: f.stat().st_size for f in d.iterdir() if f.is_file() and not f.name.startswith(".")}


def test_the_wheel_carries_every_shipped_checkpoint(built):
    wheel, _ = built
    with zipfile.ZipFile(wheel) as z:
        sizes = {i.filename: i.file_size for i in z.infolist()}
    names = zoo.list_models()
    assert len(names) >= 50
    for name in names:
        d = resolve_checkpoint(name)
        prefix = f"zoo/checkpoints/{d.parent.name}/{d.name}/"
        inside = {k[len(prefix):]: v for k, v in sizes.items() if k.startswith(prefix)}
        assert inside == _release_files(name), name  # every file, byte for byte in size
    # the code and its configs too, and nothing of the repository besides the package
    for f in ROOT.joinpath("zoo").rglob("*"):
        if f.suffix in (".py", ".yaml", ".cpp") and "__pycache__" not in f.parts:
            assert f.relative_to(ROOT).as_posix() in sizes, f
    assert not [k for k in sizes if not k.startswith(("zoo/", "lowbit_vision_zoo-"))]


def test_the_sdist_carries_the_checkpoints_for_its_wheel(built):
    _, sdist = built
    with tarfile.open(sdist) as t:
        files = {m.name.split("/", 1)[1] for m in t.getmembers() if m.isfile()}
    for name in zoo.list_models():
        d = resolve_checkpoint(name)
        for f in _release_files(name):
            assert f"checkpoints/{d.parent.name}/{d.name}/{f}" in files
    assert {"setup.py", "MANIFEST.in", "pyproject.toml"} <= files


def test_the_readme_states_the_wheels_size(built):
    wheel, _ = built
    text = (ROOT / "README.md").read_text()
    m = re.search(r"wheel is ([\d.]+) MB", text)
    assert m, "the README states the wheel's size as 'wheel is <n> MB'"
    assert abs(float(m.group(1)) - wheel.stat().st_size / 1e6) <= 0.05 * wheel.stat().st_size / 1e6


def test_an_installed_package_finds_the_checkpoints_inside_it(tmp_path, monkeypatch):
    """checkpoint_root(): $ZOO_CHECKPOINTS, else zoo/checkpoints next to the installed modules, else the
    repository's checkpoints/ (this checkout)."""
    import zoo.registry as registry

    monkeypatch.delenv("ZOO_CHECKPOINTS", raising=False)
    assert checkpoint_root() == ROOT / "checkpoints"
    site = tmp_path / "site-packages" / "zoo"  # the module as an installed wheel lays it out
    site.mkdir(parents=True)
    monkeypatch.setattr(registry, "__file__", str(site / "registry.py"))
    assert checkpoint_root() == site.parent / "checkpoints"  # no packaged copy: the folder beside the package
    (site / "checkpoints" / "cls").mkdir(parents=True)
    assert checkpoint_root() == site / "checkpoints"
    monkeypatch.setenv("ZOO_CHECKPOINTS", str(tmp_path / "mine"))
    assert checkpoint_root() == tmp_path / "mine"


CHECKPOINT_BUDGET = 100e6  # DESIGN.md: checkpoints/ stays well under 100 MB (it ships inside the wheel)


def test_the_shipped_checkpoints_stay_under_their_budget():
    """Every file of every release counts (weights, goldens, cards, images); a new release must make room."""
    files = [f for f in (ROOT / "checkpoints").rglob("*") if f.is_file() and not f.name.startswith(".")]
    total = sum(f.stat().st_size for f in files)
    biggest = sorted(files, key=lambda f: f.stat().st_size)[-3:]
    assert total <= CHECKPOINT_BUDGET, (f"checkpoints/ holds {total / 1e6:.1f} MB > {CHECKPOINT_BUDGET / 1e6:.0f} MB; "
                                        f"largest files: {[str(f.relative_to(ROOT)) for f in biggest]}")
