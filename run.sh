#!/usr/bin/env bash
# SAM3DSegment developer entry point. Creates or reuses ./.venv, then:
#   ./run.sh demo          segment a sample volume offline, write the result and a montage
#   ./run.sh test          run the whole test suite
#   ./run.sh sam3d ARGS    run the sam3d command line in the project environment
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.sam3d-installed"

ensure_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10), "Python 3.10+ is needed"'
        "$PYTHON" -m venv "$VENV"
    fi
    local want
    want=$(cat pyproject.toml run.sh | sha256sum | cut -d' ' -f1)
    if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
        echo "Installing SAM3DSegment and its dependencies into $VENV (first run takes a few minutes)..."
        "$VENV/bin/python" -m pip install --quiet "setuptools>=64" wheel
        "$VENV/bin/python" -m pip install --quiet "torch>=2.3" "torchvision>=0.18"
        # sam2 builds from source; it needs torch at build time and no CUDA compiler here.
        SAM2_BUILD_CUDA=0 "$VENV/bin/python" -m pip install --quiet --no-build-isolation "sam2>=1.1"
        "$VENV/bin/python" -m pip install --quiet -e ".[test]"
        echo "$want" > "$STAMP"
    fi
}

command="${1:-help}"
shift || true
case "$command" in
    demo)
        ensure_venv
        exec "$VENV/bin/sam3d" demo "$@"
        ;;
    test)
        ensure_venv
        exec "$VENV/bin/python" -m pytest Testing "$@"
        ;;
    sam3d)
        ensure_venv
        exec "$VENV/bin/sam3d" "$@"
        ;;
    *)
        sed -n '2,5p' "$0"
        ;;
esac
