"""One task, one place: every task lives in its own package and the shared machinery reaches it only
through the task registry, so adding a task touches no shared module but the registry entry."""
import ast
from pathlib import Path

import pytest

import zoo
from zoo.tasks import get_task, register_task, task_names

ROOT = Path(zoo.__file__).resolve().parent
REPO = ROOT.parent
# shared modules: the whole package except the task packages, plus the benchmark scripts
SHARED = sorted(p for p in list(ROOT.rglob("*.py")) + list((REPO / "benchmarks").glob("*.py"))
                if "tasks" not in p.relative_to(REPO).parts[:2] or p.parent == ROOT / "tasks")


def imports(path: Path) -> set[str]:
    """Absolute names of the zoo modules ``path`` imports (relative imports resolved)."""
    rel = path.relative_to(REPO).with_suffix("").parts
    pkg = rel[:-1] if rel[-1] != "__init__" else rel[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = list(pkg[: len(pkg) - node.level + 1]) if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return {m for m in out if m == "zoo" or m.startswith("zoo.")}


def string_constants(path: Path) -> set[str]:
    return {n.value for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def test_every_task_is_a_package_with_its_pieces():
    for name in task_names():
        pkg = ROOT / "tasks" / name
        assert (pkg / "__init__.py").is_file(), pkg
        for part in ("task.py", "data.py", "release.py"):
            assert (pkg / part).is_file(), f"task {name} has no {part}"
        cls = get_task(name)
        assert cls.task_name == name and cls.__module__ == f"zoo.tasks.{name}.task"
        assert (ROOT / "configs" / "task" / f"{name}.yaml").is_file()
        for hook in ("evaluate", "card_lines", "summary_table", "benchmark_loader"):
            assert getattr(cls, hook) is not getattr(zoo.tasks.base.QuantTask, hook), (name, hook)


@pytest.mark.parametrize("name", task_names())
def test_a_task_package_imports_no_other_task(name):
    others = {f"zoo.tasks.{t}" for t in task_names() if t != name}
    for path in (ROOT / "tasks" / name).rglob("*.py"):
        bad = {m for m in imports(path) if any(m == o or m.startswith(o + ".") for o in others)}
        assert not bad, f"{path.relative_to(REPO)} imports another task: {sorted(bad)}"


@pytest.mark.parametrize("path", SHARED, ids=lambda p: str(p.relative_to(REPO)))
def test_shared_modules_know_no_task(path):
    """No shared module imports a task package or names a task: they go through zoo.tasks.get_task."""
    tasks = task_names()
    bad = {m for m in imports(path) for t in tasks if m == f"zoo.tasks.{t}" or m.startswith(f"zoo.tasks.{t}.")}
    assert not bad, f"{path.relative_to(REPO)} imports task packages {sorted(bad)}"
    if path == ROOT / "tasks" / "__init__.py":  # the registry: the one place that lists them
        return
    named = string_constants(path) & set(tasks)
    assert not named, f"{path.relative_to(REPO)} names task(s) {sorted(named)}: a per-task branch"


def test_a_new_task_plugs_in_through_the_registry_alone(tmp_path, monkeypatch):
    """A task defined outside zoo reaches cards and zoo.predict by one register_task call."""
    import json
    import sys

    import torch

    from zoo.cards import card_text, summary_table

    (tmp_path / "toytask.py").write_text(
        "from zoo.tasks.base import QuantTask\n"
        "class ToyTask(QuantTask):\n"
        "    task_name = 'toy'\n"
        "    monitor = ('val/score', 'max')\n"
        "    card_lines = staticmethod(lambda cfg, m, train: [f\"- **Toy score:** {m['test_score']}\"])\n"
        "    @staticmethod\n"
        "    def predict(model, images, out, args):\n"
        "        (out / 'toy.txt').write_text(str(len(images)))\n"
        "        return [out / 'toy.txt']\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    register_task("toy", "toytask:ToyTask")
    try:
        net = zoo.create_model("resnet20", num_classes=3, in_chans=1, width=4)
        model = zoo.ZooModel(net, "resnet20", {"num_classes": 3, "in_chans": 1, "width": 4}, "toy",
                             {"channels": 1, "size": [8, 8]})
        ck = zoo.save(model.eval(), tmp_path / "ck", metrics={"test_score": 0.75})
        assert "**Toy score:** 0.75" in card_text(ck)
        assert "| test_score |" in summary_table(tmp_path) and "0.7500" in summary_table(tmp_path)
        from PIL import Image

        Image.fromarray(torch.zeros(8, 8, dtype=torch.uint8).numpy()).save(tmp_path / "a.png")
        from zoo.predict import main

        assert main([str(ck), str(tmp_path / "a.png"), "--out", str(tmp_path / "out")]) == 0
        assert (tmp_path / "out" / "toy.txt").read_text() == "1"
        assert json.loads((ck / "config.json").read_text())["task"] == "toy"
    finally:
        zoo.tasks._TASKS.pop("toy", None)
        sys.modules.pop("toytask", None)


def test_registry_errors_name_the_valid_tasks():
    with pytest.raises(ValueError, match=r"unknown task 'nope'; valid: \['cls', 'det', 'diffusion', 'matting', 'sal', 'sr'\]"):
        get_task("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_task("sr", "somewhere:Else")
    with pytest.raises(ValueError, match="module:ClassName"):
        register_task("new", "no_colon")
