#!/usr/bin/env bash
# Build the sdist and wheel (python -m build, offline), install the wheel into a fresh venv outside the
# repository with the task extras, and load every shipped model from the installed package, comparing
# each with its golden output. The mmdet release also needs `bash scripts/install_mmdet.sh` in that venv.
#
#   bash scripts/check_wheel.sh [WORKDIR]      # default WORKDIR: a new temporary directory
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
work=${1:-$(mktemp -d)}
PY=${PYTHON:-python}
"$PY" - "$repo" "$work/src" <<'PYEOF'
import shutil, sys
shutil.copytree(sys.argv[1], sys.argv[2], ignore=shutil.ignore_patterns(
    ".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "outputs", "lightning_logs"))
PYEOF
"$PY" -m build --no-isolation --outdir "$work/dist" "$work/src"
wheel=$(ls "$work"/dist/*.whl)
echo "wheel: $wheel ($(du -h "$wheel" | cut -f1))"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q -c "$repo/constraints.txt" "${wheel}[sal,det,diffusion,sr]"
"$work/venv/bin/pip" install -q -c "$repo/constraints.txt" --no-build-isolation basicsr==1.4.2
cd "$work"  # not the repository: the package must find its checkpoints inside itself
"$work/venv/bin/python" - <<'PYEOF'
import importlib.util
import torch, zoo
from zoo.cards import read_golden
from zoo.registry import checkpoint_root, resolve_checkpoint
from zoo.tasks import get_task

print("zoo from", zoo.__file__, "\ncheckpoints at", checkpoint_root())
names = zoo.list_models()
failed = []
for n in names:
    if n.startswith("mmdet.") and importlib.util.find_spec("mmdet") is None:
        print(f"{n}: skipped (needs scripts/install_mmdet.sh)")
        continue
    try:
        m = zoo.load(n)
        x, expected = read_golden(resolve_checkpoint(n))
        out = get_task(m.task).golden_output(m, x)
        err = float((out - expected).abs().max() / expected.abs().max())
        assert err <= 1e-4, err
        print(f"{n}: loaded, golden output relative error {err:.1e}")
    except Exception as e:
        failed.append(n)
        print(f"{n}: FAILED {type(e).__name__}: {e}")
print(f"{len(names)} shipped models listed, {len(failed)} failed: {failed}")
raise SystemExit(1 if failed else 0)
PYEOF
