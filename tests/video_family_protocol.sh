#!/usr/bin/env bash
# The video quality protocol for the LTX-Video and HunyuanVideo demo models (issue 16): importance merging vs random
# ToMe at the same ratio with the node's defaults (chosen on the WAN demo, nothing tuned on these models), cond and
# uncond of a step in ONE model call (--regime joint), held-out noise seeds 10000+; the attention site at three
# ratios with euler, dpmpp_2m at 0.5 / 0.7, cfg 1 with the CFG-free `change` source, and whole blocks at 0.5.
#   COMFYUI_PATH=../shared/hosts/comfyui-0.14.1 bash tests/video_family_protocol.sh ltxv|hunyuan [clips] [runs]
# runs: any of "euler dpmpp cfg1 blocks" (default: all four; each writes its own folder)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${ITM_PYTHON_BENCH:-$repo/.venv/bin/python}
model=${1:?"which demo model: ltxv or hunyuan"}
n=${2:-48}
runs=" ${3:-euler dpmpp cfg1 blocks} "
out=$repo/tests/results/quality_video_$model
base=(--model "$model" --samples "$n" --seed-offset 10000 --chunk 16 --regime joint)
euler=("${base[@]}" --steps 20 --sampler euler --scheduler simple)
cd "$repo"
if [[ $runs == *" euler "* ]]; then
  "$py" tests/bench_video_quality.py "${euler[@]}" --cfg 4 --ratios 0.3,0.5,0.7 --methods "none,itm-random,itm-cfg" \
    --out "$out/euler_cfg4"
fi
if [[ $runs == *" dpmpp "* ]]; then
  "$py" tests/bench_video_quality.py "${base[@]}" --steps 16 --sampler dpmpp_2m --scheduler karras --cfg 3 \
    --ratios 0.5,0.7 --methods "none,itm-random,itm-cfg" --out "$out/dpmpp2m_cfg3"
fi
if [[ $runs == *" cfg1 "* ]]; then
  "$py" tests/bench_video_quality.py "${euler[@]}" --cfg 1 --ratios 0.5 \
    --methods "none,itm-random,itm-cfg:cfg1_mode=change" --out "$out/euler_cfg1"
fi
if [[ $runs == *" blocks "* ]]; then
  "$py" tests/bench_video_quality.py "${euler[@]}" --cfg 4 --ratios 0.5 \
    --methods "none,itm-random:scope=transformer,itm-cfg:scope=transformer" --out "$out/euler_cfg4_blocks"
fi
