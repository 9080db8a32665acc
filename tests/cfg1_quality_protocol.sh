#!/usr/bin/env bash
# cfg = 1 (no uncond pass: turbo / LCM / distilled models and LoRAs, Flux, HunyuanVideo): the CFG-free importance
# source (cfg1_mode = change, |denoised - previous denoised|) against random ToMe at the same ratio and site, on every
# bundled demo model, cond in one model call, held-out noise seeds 10000+ (cfg1_mode = change was compared on tuning
# seeds 0..63 first: never worse than random ToMe). The node's default cfg1_mode rests on these runs. Current ComfyUI
# (the UNet runs use its attention override, i.e. proportional attention, as users of current ComfyUI get):
#   COMFYUI_PATH=../shared/hosts/comfyui-0.14.1 bash tests/cfg1_quality_protocol.sh [samples] [clips]   (~30 min)
# The UNet without proportional attention (ComfyUI before 0.3.60: the pinned 2024 host, no COMFYUI_PATH):
#   bash tests/cfg1_quality_protocol.sh [samples] 0 pinned   (~8 min)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${ITM_PYTHON_BENCH:-$repo/.venv/bin/python}
n=${1:-160}
clips=${2:-48}
part=${3:-all}
out=$repo/tests/results/quality_cfg1
# protect=0: the committed runs were made before protect had an "auto" value (0.1 on the UNet at ratio 0.5 now)
methods="none,itm-random,itm-cfg:cfg1_mode=change;protect=0"
euler=(--sampler euler --scheduler normal --steps 20)
dpmpp=(--sampler dpmpp_2m --scheduler karras --steps 16)
cd "$repo"
if [ "$part" = pinned ]; then
  if [ -n "${COMFYUI_PATH:-}" ]; then echo "the pinned part runs on the pinned host: unset COMFYUI_PATH" >&2; exit 1; fi
  for s in euler dpmpp; do
    declare -n sampler=$s
    "$py" tests/bench_quality.py --model unet --samples "$n" --seed-offset 10000 --chunk 20 --regime joint \
      --no-effnet "${sampler[@]}" --cfg 1 --ratios 0.5,0.7 --methods "$methods" --out "$out/unet_pinned_${s}"
  done
  exit 0
fi
if [ -z "${COMFYUI_PATH:-}" ]; then echo "set COMFYUI_PATH to a current ComfyUI" >&2; exit 1; fi
for model in unet pixart dit; do
  for s in euler dpmpp; do
    declare -n sampler=$s
    "$py" tests/bench_quality.py --model "$model" --samples "$n" --seed-offset 10000 --chunk 20 --regime joint \
      --no-effnet "${sampler[@]}" --cfg 1 --ratios 0.5,0.7 --methods "$methods" --out "$out/${model}_${s}"
  done
done
"$py" tests/bench_video_quality.py --samples "$clips" --seed-offset 10000 --chunk 16 --regime joint --steps 16 \
  --sampler dpmpp_2m --scheduler karras --cfg 1 --ratios 0.5,0.7 --methods "none,itm-random,itm-cfg:cfg1_mode=change" \
  --out "$out/video_dpmpp"
