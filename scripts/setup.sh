#!/usr/bin/env bash
# Development set-up: a .venv with torch 2.14.1 + torchvision 0.29.1 (ComfyUI needs torchvision), this pack in editable
# mode with its dev extras, and the Fashion-MNIST data from Debian. Safe to run again; it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv/bin/python ] || python3 -m venv .venv
pip_install() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
# The exact pins matter: any other torch release is a multi-GB download on the project's machines.
.venv/bin/python -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1')" 2>/dev/null ||
  pip_install torch==2.14.1 torchvision==0.29.1
pip_install -e '.[dev]'
.venv/bin/python -c "import consistency_solver.solver" # fail here, not in the first test, if the install is broken

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "note: Fashion-MNIST is missing; install the Debian package dataset-fashion-mnist (tests needing it will skip)"
  fi
fi
