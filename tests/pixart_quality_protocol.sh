#!/usr/bin/env bash
# PixArt fidelity (issue 17, the paper's DiT): importance merging vs random ToMe on the bundled PixArt-alpha-class demo
# model, same ratio and merge site, cond and uncond in one model call, held-out noise seeds 10000+ (nothing was tuned on
# this model: the node's defaults, and the paper's own settings for comparison). Needs current ComfyUI:
#   COMFYUI_PATH=../shared/hosts/comfyui-0.14.1 bash tests/pixart_quality_protocol.sh [samples]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${ITM_PYTHON_BENCH:-$repo/.venv/bin/python}
n=${1:-100}
out=$repo/tests/results/quality_pixart
common=(--model pixart --samples "$n" --seed-offset 10000 --chunk 20 --regime joint --no-effnet)
# the official code's PixArt settings: random destinations from a pool of exactly the kept tokens, pruning warm-up,
# plain means, cross-attention merged too (its importance pruning of steps 1-3 has no equivalent here)
# the first two runs were written when "auto" weighting was 3 on PixArt (their labels say only itm-cfg)
paper="itm-cfg:dst_mode=random;warmup_mode=prune;pool_scale=1.0;weight_power=0.0;affinity=0.0;merge_cross_attn=true"
cd "$repo"
"$py" tests/bench_quality.py "${common[@]}" --sampler euler --scheduler normal --steps 20 --cfg 4 --ratios 0.5,0.7 \
  --methods "none,itm-random,itm-cfg:weight_power=3.0,$paper,itm-random:scope=transformer,itm-cfg:scope=transformer;weight_power=3.0" \
  --out "$out/euler_cfg4"
"$py" tests/bench_quality.py "${common[@]}" --sampler dpmpp_2m --scheduler karras --steps 16 --cfg 3 --ratios 0.5,0.7 \
  --methods "none,itm-random,itm-cfg:weight_power=3.0,$paper" --out "$out/dpmpp2m_cfg3"
# plain slot means (weight_power "auto" = 0 on PixArt since this was measured) against the weighting (3) used above
for run in "euler --scheduler normal --steps 20 --cfg 4:euler_cfg4_plain" "dpmpp_2m --scheduler karras --steps 16 --cfg 3:dpmpp2m_cfg3_plain"; do
  "$py" tests/bench_quality.py "${common[@]}" --sampler ${run%%:*} --ratios 0.5,0.7 \
    --methods "none,itm-random,itm-cfg:weight_power=3.0,itm-cfg:weight_power=0.0" --out "$out/${run#*:}"
done
