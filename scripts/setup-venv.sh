#!/usr/bin/env bash
# Create (or bring up to date) the course's virtual environment and register its Jupyter kernel.
#
#   scripts/setup-venv.sh                 # .venv in the repository
#   VENV=/tmp/venv scripts/setup-venv.sh  # somewhere else
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu scripts/setup-venv.sh   # CPU-only torch from PyTorch's index
#
# Steps: python -m venv; torch (the version pinned in environment.yml) first, from TORCH_INDEX_URL when it is set,
# so that pip does not pull a multi-GB CUDA build on a machine without a GPU; then the course package in editable
# mode with its notebook and test extras, and DeepSpeed (built against that torch); then the `python3` Jupyter kernel inside the environment, pointing at
# the environment's own interpreter (papermill, nbval and JupyterLab all start that kernel).
#
# Idempotent and fast when nothing changed: a stamp file in the environment records a hash of pyproject.toml,
# environment.yml, this script and TORCH_INDEX_URL; when it matches, nothing is reinstalled.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-}"
DEEPSPEED_VERSION=0.19.8
STAMP="$VENV/.course-setup-stamp"

say() { printf 'setup-venv: %s\n' "$*"; }
die() { printf 'setup-venv: %s\n' "$*" >&2; exit 1; }

cd "$ROOT"

# The torch pin lives in environment.yml (tests/test_environment.py checks it against pyproject.toml's range).
TORCH_VERSION="$(sed -n 's/^[[:space:]]*-[[:space:]]*torch==\([0-9][0-9.]*\).*$/\1/p' environment.yml | head -n 1)"
[ -n "$TORCH_VERSION" ] || die "environment.yml has no 'torch==X.Y.Z' line in its pip section"

want="$(cat pyproject.toml environment.yml "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)-${TORCH_INDEX_URL}"
if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    say "$VENV is up to date"
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    command -v "$PYTHON" >/dev/null || die "no '$PYTHON' on PATH: install Python 3.10 or newer, or set PYTHON=/path/to/python3"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || die "$("$PYTHON" --version 2>&1) is too old: the course needs Python 3.10 or newer (set PYTHON=...)"
    say "creating $VENV with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$VENV" \
        || die "could not create a virtual environment (on Debian/Ubuntu: apt-get install python3-venv)"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

start=$SECONDS
if [ -n "$TORCH_INDEX_URL" ]; then
    say "installing torch==$TORCH_VERSION from $TORCH_INDEX_URL"
    "${PIP[@]}" install -q "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
else
    say "installing torch==$TORCH_VERSION (set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu for a CPU-only build)"
    "${PIP[@]}" install -q "torch==$TORCH_VERSION"
fi

say "installing the course package (editable) with its notebook and test extras"
"${PIP[@]}" install -q -e "$ROOT[notebooks,test]"

# DeepSpeed for configs/accelerate/deepspeed_zero2.yaml (tests/test_scaleout.py runs it on two CPU processes).
# Its setup.py imports torch, so it builds against the torch installed above (--no-build-isolation); its CPU
# communication kernel is compiled on first use (a C++ compiler and ninja).
# The course runs without it: outside CI a failed install is a warning, and the DeepSpeed tests then say they skip.
say "installing deepspeed==$DEEPSPEED_VERSION (the ZeRO-2 scale-out config)"
if ! "${PIP[@]}" install -q --no-build-isolation "deepspeed==$DEEPSPEED_VERSION"; then
    case "${CI:-}" in
        ""|0|false|False) say "warning: deepspeed did not install; the course runs without it, its scale-out tests skip" ;;
        *) die "deepspeed did not install (CI needs it for tests/test_scaleout.py)" ;;
    esac
fi

say "registering the python3 Jupyter kernel inside $VENV"
"$VENV/bin/python" -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (ipykernel)" >/dev/null

"$VENV/bin/python" -c 'import helpers, torch, transformers, papermill, nbval, nbgrader' \
    || die "the environment was installed but the course package does not import; see the errors above"

echo "$want" > "$STAMP"
say "ready in $((SECONDS - start)) s: $VENV (activate with: source $VENV/bin/activate)"
