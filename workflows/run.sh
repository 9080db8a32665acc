#!/usr/bin/env bash
# The main job: runs an example workflow headlessly through real ComfyUI (the pinned host unless COMFYUI_PATH),
# with and without importance token merging, and writes both images plus a timing line.
#   bash workflows/run.sh [--workflow workflows/sd15_txt2img.json] [--out output/demo] [--size 384] [--steps 10]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
py=$(bash "$repo/tests/setup_env.sh")
cd "$repo"
exec "$py" workflows/run.py "$@"
