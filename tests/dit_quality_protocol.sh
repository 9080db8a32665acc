#!/usr/bin/env bash
# Image DiT fidelity (issue 17): importance merging vs random ToMe on the bundled Qwen-Image-class demo model, same
# ratio and merge site, cond and uncond in one model call, held-out noise seeds 10000+ (nothing is tuned on this
# model: the node's defaults come from the UNet protocol). Needs current ComfyUI:
#   COMFYUI_PATH=../shared/hosts/comfyui-0.14.1 bash tests/dit_quality_protocol.sh [samples]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${ITM_PYTHON_BENCH:-$repo/.venv/bin/python}
n=${1:-120}
out=$repo/tests/results/quality_dit
common=(--model dit --samples "$n" --seed-offset 10000 --chunk 20 --regime joint --no-effnet)
cd "$repo"
"$py" tests/bench_quality.py "${common[@]}" --sampler euler --scheduler normal --steps 20 --cfg 4 --ratios 0.5,0.7 \
  --methods "none,itm-random,itm-cfg,itm-random:scope=transformer,itm-cfg:scope=transformer" --out "$out/euler_cfg4"
"$py" tests/bench_quality.py "${common[@]}" --sampler dpmpp_2m --scheduler karras --steps 16 --cfg 3 --ratios 0.5,0.7 \
  --methods "none,itm-random,itm-cfg" --out "$out/dpmpp2m_cfg3"
"$py" tests/bench_quality.py "${common[@]}" --sampler euler --scheduler normal --steps 20 --cfg 1 --ratios 0.5 \
  --methods "none,itm-random,itm-cfg:cfg1_mode=change" --out "$out/euler_cfg1"
