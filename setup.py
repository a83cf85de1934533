"""Build hook: the wheel carries the shipped checkpoints.

The repository keeps them in ``checkpoints/<task>/<arch>.<tag>/`` (next to ``zoo/``); a built wheel
(``pip install .``, ``python -m build``) puts a copy at ``zoo/checkpoints/`` inside the package, where
``zoo.registry.checkpoint_root()`` finds them once installed. An editable install reads the
repository's folder directly. Everything else is in ``pyproject.toml``; the sdist carries
``checkpoints/`` through ``MANIFEST.in``.
"""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithCheckpoints(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the repository's checkpoints/ in place
        src = Path(__file__).resolve().parent / "checkpoints"
        dst = Path(self.build_lib) / "zoo" / "checkpoints"
        if not src.is_dir():
            raise SystemExit(f"error: {src} is missing: the wheel must carry the shipped checkpoints")
        if dst.exists():
            shutil.rmtree(dst)  # a stale copy from an earlier build must not leak into this one
        for cfg in sorted(src.glob("*/*/config.json")):  # one folder per release, its files as they are
            shutil.copytree(cfg.parent, dst / cfg.parent.relative_to(src),
                            ignore=shutil.ignore_patterns(".*", "__pycache__"))


setup(cmdclass={"build_py": BuildWithCheckpoints})
