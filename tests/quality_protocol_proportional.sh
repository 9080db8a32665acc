#!/usr/bin/env bash
# Proportional attention at the UNet attention site (the node's default since it was measured; it needs ComfyUI's
# attention override, so these runs need current ComfyUI): the UNet demo model, cond and uncond in one model call,
# held-out noise seeds 10000+ as in tests/quality_protocol.sh (chosen on seeds 0..63: +9.0 / +5.8 / +1.8 dB for random
# ToMe and +6.9 / +5.5 / +2.0 dB for importance merging at ratio 0.3 / 0.5 / 0.7, euler cfg 4).
#   COMFYUI_PATH=../shared/hosts/comfyui-0.14.1 bash tests/quality_protocol_proportional.sh [samples]   (~30 min at 160)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${ITM_PYTHON_BENCH:-$repo/.venv/bin/python}
n=${1:-160}
out=$repo/tests/results/quality
if [ -z "${COMFYUI_PATH:-}" ]; then echo "set COMFYUI_PATH to a current ComfyUI (the attention override)" >&2; exit 1; fi
bench() { "$py" tests/bench_quality.py --samples "$n" --seed-offset 10000 --chunk 20 --regime joint --no-effnet "$@"; }
plain="proportional_attention=false"
cd "$repo"
bench --sampler euler --scheduler normal --steps 20 --cfg 4 --ratios 0.3,0.5,0.7 \
  --methods "none,builtin,itm-random,itm-cfg,itm-random:$plain,itm-cfg:$plain" --out "$out/euler_cfg4_joint_proportional"
bench --sampler dpmpp_2m --scheduler karras --steps 16 --cfg 3 --ratios 0.3,0.5,0.7 \
  --methods "none,builtin,itm-random,itm-cfg" --out "$out/dpmpp2m_cfg3_joint_proportional"
bench --sampler dpmpp_2m --scheduler karras --steps 16 --cfg 2 --ratios 0.5,0.7 \
  --methods "none,builtin,itm-random,itm-cfg" --out "$out/dpmpp2m_cfg2_joint_proportional"
