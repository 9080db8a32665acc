#!/usr/bin/env bash
# The test command: sets up (or reuses) the venv, then runs the suite on the pinned ComfyUI host and on every
# ComfyUI root in COMFYUI_PATH (os.pathsep-separated).
#
#   bash tests/run.sh [pytest args]                     # pinned host only
#   COMFYUI_PATH=/path/to/ComfyUI bash tests/run.sh     # pinned host + your ComfyUI
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
py=$(bash "$repo/tests/setup_env.sh")
cd "$repo"
exec "$py" tests/run_suite.py "$@"
