#!/usr/bin/env bash
# Proportional attention at the UNet attention site (the node's default since it was measured; it needs ComfyUI's
# attention override, so these runs need current ComfyUI): the UNet demo model, cond and uncond in one model call,
# held-out noise seeds 10000+ as in tests/quality_protocol.sh (chosen on seeds 0..63: +9.0 / +5.8 / +1.8 dB for random
# ToMe and +6.9 / +5.5 / +2.0 dB for importance merging at ratio 0.3 / 0.5 / 0.7, euler cfg 4).
# Second part, protect (the 10 % most important tokens stay themselves; chosen on tuning seeds 0..63: importance -
# random ToMe at 0.5 +0.26 -> +0.76 dB with euler cfg 4, +0.58 -> +0.94 with dpmpp_2m cfg 3; at 0.7 no gain).
# Every protect value is named, so the runs do not depend on the node's default (protect auto: 0.1 here up to ratio
# 0.5, 0 at 0.7). In the committed *_protect folders, "itm-cfg" is protect 0 (euler), protect 0.1 at every ratio
# (dpmpp_2m cfg 3) and the final auto (cfg 2): they were written while the default changed.
# Third part, transformer: proportional attention inside whole merged transformer stacks (scope = transformer; chosen
# on tuning seeds 0..63, euler cfg 4: +1.1 / +1.2 dB for importance at ratio 0.3 / 0.5).
#   COMFYUI_PATH=../shared/hosts/comfyui-0.14.1 bash tests/quality_protocol_proportional.sh [samples] [proportional|protect|transformer|all]
#   (~35 min for each of the first two parts at 160, ~20 min for the third)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${ITM_PYTHON_BENCH:-$repo/.venv/bin/python}
n=${1:-160}
part=${2:-all}
out=$repo/tests/results/quality
if [ -z "${COMFYUI_PATH:-}" ]; then echo "set COMFYUI_PATH to a current ComfyUI (the attention override)" >&2; exit 1; fi
bench() { "$py" tests/bench_quality.py --samples "$n" --seed-offset 10000 --chunk 20 --regime joint --no-effnet "$@"; }
plain="proportional_attention=false"
cd "$repo"
if [ "$part" = proportional ] || [ "$part" = all ]; then  # protect=0: these runs were made before protect had an "auto" value
bench --sampler euler --scheduler normal --steps 20 --cfg 4 --ratios 0.3,0.5,0.7 \
  --methods "none,builtin,itm-random,itm-cfg:protect=0,itm-random:$plain,itm-cfg:$plain;protect=0" --out "$out/euler_cfg4_joint_proportional"
bench --sampler dpmpp_2m --scheduler karras --steps 16 --cfg 3 --ratios 0.3,0.5,0.7 \
  --methods "none,builtin,itm-random,itm-cfg:protect=0" --out "$out/dpmpp2m_cfg3_joint_proportional"
bench --sampler dpmpp_2m --scheduler karras --steps 16 --cfg 2 --ratios 0.5,0.7 \
  --methods "none,builtin,itm-random,itm-cfg:protect=0" --out "$out/dpmpp2m_cfg2_joint_proportional"
fi
if [ "$part" = protect ] || [ "$part" = all ]; then
methods="none,itm-random,itm-cfg:protect=0,itm-cfg:protect=0.1"
bench --sampler euler --scheduler normal --steps 20 --cfg 4 --ratios 0.3,0.5,0.7 --methods "$methods" \
  --out "$out/euler_cfg4_joint_protect"
bench --sampler dpmpp_2m --scheduler karras --steps 16 --cfg 3 --ratios 0.3,0.5,0.7 --methods "$methods" \
  --out "$out/dpmpp2m_cfg3_joint_protect"
bench --sampler dpmpp_2m --scheduler karras --steps 16 --cfg 2 --ratios 0.5,0.7 --methods "$methods" \
  --out "$out/dpmpp2m_cfg2_joint_protect"
fi
if [ "$part" = transformer ] || [ "$part" = all ]; then
tr="scope=transformer"
bench --sampler euler --scheduler normal --steps 20 --cfg 4 --ratios 0.3,0.5,0.7 \
  --methods "none,itm-random:$tr,itm-cfg:$tr;protect=0,itm-random:$tr;$plain,itm-cfg:$tr;$plain;protect=0" \
  --out "$out/euler_cfg4_joint_transformer_proportional"
bench --sampler dpmpp_2m --scheduler karras --steps 16 --cfg 3 --ratios 0.5 \
  --methods "none,itm-random:$tr,itm-cfg:$tr;protect=0,itm-random:$tr;$plain,itm-cfg:$tr;$plain;protect=0" \
  --out "$out/dpmpp2m_cfg3_joint_transformer_proportional"
fi
