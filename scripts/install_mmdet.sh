#!/usr/bin/env bash
# Install the optional mmdet path into the active environment (after the README's main install):
#   mmcv 2.1.0 with its compiled CPU ops, mmengine 0.10.7 and mmdet 3.3.0 (the ".[mmdet]" extra).
#
#   bash scripts/install_mmdet.sh            # ~15 min the first time on 2 cores, seconds afterwards
#
# PyPI has mmcv 2.1.0 only as an sdist, and its setup.py asks for C++17 while torch 2.14's headers need
# C++20, so this script downloads the sdist, raises the standard to C++20, builds a wheel against the
# installed torch (--no-build-isolation: the build must see that torch, or it silently builds mmcv
# without ops; setuptools < 81 because setup.py imports pkg_resources) and caches the wheel under
#   ${ZOO_CACHE:-${XDG_CACHE_HOME:-~/.cache}/lowbit-vision-zoo}/wheels/torch-<torch version>/
# (the compiled ops link against that exact torch build). CPU ops only: the build hides any GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

MMCV_VERSION=2.1.0
PY=${PYTHON:-python}
TORCH=$("$PY" -c "import torch; print(torch.__version__)")
CACHE="${ZOO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lowbit-vision-zoo}/wheels/torch-${TORCH}"
mkdir -p "$CACHE"

have_ops() { "$PY" -c "from mmcv.ops import nms" > /dev/null 2>&1; }

wheel=$(ls "$CACHE"/mmcv-${MMCV_VERSION}-*.whl 2> /dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
    echo "building mmcv ${MMCV_VERSION} against torch ${TORCH} (CPU ops; about 15 minutes on 2 cores)"
    "$PY" -m pip install -c constraints.txt "setuptools<81" wheel ninja psutil
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    "$PY" -m pip download --no-deps --no-binary :all: --no-build-isolation -d "$work" "mmcv==${MMCV_VERSION}"
    tar -xzf "$work"/mmcv-${MMCV_VERSION}.tar.gz -C "$work"
    src="$work/mmcv-${MMCV_VERSION}"
    sed -i 's/-std=c++1[47]/-std=c++20/g; s#/std:c++1[47]#/std:c++20#g' "$src/setup.py"
    if ! grep -q -- "-std=c++20" "$src/setup.py" || grep -q -- "-std=c++1[47]" "$src/setup.py"; then
        echo "error: could not raise the C++ standard to C++20 in mmcv's setup.py" >&2
        exit 1
    fi
    MMCV_WITH_OPS=1 FORCE_CUDA=0 CUDA_VISIBLE_DEVICES="" MAX_JOBS=${MAX_JOBS:-2} \
        "$PY" -m pip wheel --no-build-isolation --no-deps -w "$work/dist" "$src"
    built=$(ls "$work"/dist/mmcv-${MMCV_VERSION}-*.whl)
    tmp="$CACHE/.$(basename "$built").part"   # copy then rename: an interrupted copy is never a wheel
    cp "$built" "$tmp" && mv "$tmp" "$CACHE/$(basename "$built")"
    wheel="$CACHE/$(basename "$built")"
else
    echo "using the cached mmcv wheel $wheel"
fi
"$PY" -m pip install --no-deps --force-reinstall "$wheel"
"$PY" -m pip install -c constraints.txt -e ".[mmdet]"
if ! have_ops; then
    echo "error: mmcv is installed but its compiled ops are not (from mmcv.ops import nms failed)" >&2
    "$PY" -c "from mmcv.ops import nms" || true
    exit 1
fi
"$PY" -c "import mmdet, mmcv, mmengine; print('mmdet', mmdet.__version__, 'mmcv', mmcv.__version__, 'mmengine', mmengine.__version__)"
