#!/usr/bin/env bash
# One-command set-up: a virtual environment in .venv with the project and its pinned torch,
# plus the Fashion-MNIST files. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
    echo "==> creating $VENV with $($PY --version)"
    "$PY" -m venv "$VENV"
fi

# Reinstall only when the dependency files changed since the last successful install.
stamp="$VENV/.capi-install-stamp"
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "==> installing capi-orchestrator and its dependencies (pins from constraints.txt)"
    "$VENV/bin/python" -m pip install -qq --disable-pip-version-check -c constraints.txt -e '.[dev]'
    echo "$want" > "$stamp"
else
    echo "==> python packages up to date"
fi

FMNIST=/usr/share/datasets/fashion-mnist
if [ -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
    echo "==> Fashion-MNIST present in $FMNIST"
elif command -v apt-get >/dev/null 2>&1; then
    echo "==> installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
else
    cat <<TXT
==> Fashion-MNIST not found and apt-get is not available. Put these four files (gzip IDX, as
    published by Zalando Research) in $FMNIST, or in a directory named by CAPI_FASHION_MNIST_DIR:
      train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz
      t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz
TXT
fi
echo "==> done. Try: $VENV/bin/capi --help"
