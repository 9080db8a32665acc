#!/usr/bin/env bash
# Image DiT fidelity (issue 17): importance merging vs random ToMe on the bundled Qwen-Image-class demo model, same
# ratio and merge site, cond and uncond in one model call, held-out noise seeds 10000+ (proportional attention was
# chosen on seeds 0-31; everything else comes from the UNet protocol). Methods at the attention site name their
# proportional_attention value, so the figures do not depend on the node's default. The euler_cfg4 and dpmpp2m_cfg3
# folders were written before the setting existed (identical to proportional_attention=false). Needs current ComfyUI:
#   COMFYUI_PATH=../shared/hosts/comfyui-0.14.1 bash tests/dit_quality_protocol.sh [samples]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${ITM_PYTHON_BENCH:-$repo/.venv/bin/python}
n=${1:-100}
out=$repo/tests/results/quality_dit
common=(--model dit --samples "$n" --seed-offset 10000 --chunk 20 --regime joint --no-effnet)
plain="proportional_attention=false"
prop="proportional_attention=true"
cd "$repo"
# without proportional attention: the attention site and whole blocks (proportional attention never applies there)
"$py" tests/bench_quality.py "${common[@]}" --sampler euler --scheduler normal --steps 20 --cfg 4 --ratios 0.5,0.7 \
  --methods "none,itm-random:$plain,itm-cfg:$plain,itm-random:scope=transformer,itm-cfg:scope=transformer" \
  --out "$out/euler_cfg4"
"$py" tests/bench_quality.py "${common[@]}" --sampler dpmpp_2m --scheduler karras --steps 16 --cfg 3 --ratios 0.5,0.7 \
  --methods "none,itm-random:$plain,itm-cfg:$plain" --out "$out/dpmpp2m_cfg3"
# with proportional attention (the default since it was measured; attention site)
"$py" tests/bench_quality.py "${common[@]}" --sampler euler --scheduler normal --steps 20 --cfg 4 --ratios 0.5,0.7 \
  --methods "none,itm-random:$prop,itm-cfg:$prop" --out "$out/euler_cfg4_proportional"
"$py" tests/bench_quality.py "${common[@]}" --sampler dpmpp_2m --scheduler karras --steps 16 --cfg 3 --ratios 0.5,0.7 \
  --methods "none,itm-random:$prop,itm-cfg:$prop" --out "$out/dpmpp2m_cfg3_proportional"
# cfg 1 (no uncond pass): the CFG-free change source vs random ToMe, without and with proportional attention
"$py" tests/bench_quality.py "${common[@]}" --sampler euler --scheduler normal --steps 20 --cfg 1 --ratios 0.5 \
  --methods "none,itm-random:$plain,itm-cfg:cfg1_mode=change;$plain,itm-random:$prop,itm-cfg:cfg1_mode=change;$prop" \
  --out "$out/euler_cfg1"
