#!/usr/bin/env bash
# Development set-up: a .venv with torch 2.14.1 + torchvision 0.29.1 (ComfyUI needs torchvision), this pack in editable
# mode with its dev extras, the Fashion-MNIST data and chromium from Debian. Safe to run again; it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv/bin/python ] || python3 -m venv .venv
# pipefail makes pip's own failure the function's; the grep only drops a harmless warning.
pip_install() {
  .venv/bin/python -m pip install -q --no-cache-dir --disable-pip-version-check "$@" 2>&1 |
    { grep -v "^WARNING: Location" || true; }
}
# The exact pins matter: any other torch release is a multi-GB download on the project's machines.
if ! .venv/bin/python -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1')" 2>/dev/null; then
  free_gb=$(df -Pk .venv | awk 'NR == 2 { print int($4 / 1048576) }')
  if [ "$free_gb" -lt 8 ]; then
    echo "Free at least 8 GB on the disk holding $PWD and run this again: torch 2.14.1 with torchvision takes about" \
      "6 GB in .venv, and only $free_gb GB is free." >&2
    exit 1
  fi
  pip_install torch==2.14.1 torchvision==0.29.1
fi
pip_install -e '.[dev]'
.venv/bin/python -c "import consistency_solver.solver" # fail here, not in the first test, if the install is broken

# Debian packages: the Fashion-MNIST data, and chromium for the browser test (driven by playwright, never by a
# browser playwright would download).
missing=()
[ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
[ -x /usr/bin/chromium ] || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "note: missing Debian packages ${missing[*]} (apt-get install them; the tests needing them will skip)"
  fi
fi
