#!/usr/bin/env bash
# The video quality protocol behind the README's WAN figures (issue 16): the bundled moving-Fashion-MNIST model
# (ComfyUI's WAN 2.1 class), importance merging vs random ToMe at the same ratio, cond and uncond of a step in ONE
# model call (--regime joint). Nothing was tuned on this model: the node's defaults come from the image protocol
# (tests/quality_protocol.sh, tuning seeds 0..119); these runs use held-out noise seeds 10000+.
#   COMFYUI_PATH=../shared/hosts/comfyui-0.14.1 bash tests/video_quality_protocol.sh [clips]   (~45 min at 48)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${ITM_PYTHON_BENCH:-$repo/.venv/bin/python}
n=${1:-48}
out=$repo/tests/results/quality_video
base=(--samples "$n" --seed-offset 10000 --chunk 16 --regime joint)
common=("${base[@]}" --steps 20 --sampler euler --scheduler simple)
# the euler_cfg4 / euler_cfg1 / explore folders were written before proportional_attention existed (= false), and
# every folder without "plain" in its name when importance merging on WAN used the image models' weighting
# (weighted below; their labels do not show it)
plain="proportional_attention=false"
prop="proportional_attention=true"
weighted="weight_power=3.0;affinity=0.2"
cd "$repo"
# both merge sites (attention only / whole blocks) and spatio-temporal merging; cfg 4, ratio 0.5
"$py" tests/bench_video_quality.py "${common[@]}" --cfg 4 --ratios 0.5 \
  --methods "none,itm-random:$plain,itm-cfg:$plain;$weighted,itm-random:scope=transformer,itm-cfg:scope=transformer;$weighted,itm-random:video_tokens=across_frames;$plain,itm-cfg:video_tokens=across_frames;$plain;$weighted" \
  --out "$out/euler_cfg4"
# proportional attention (the default since it was measured; the attention site): written by
# "--methods none,itm-random,itm-cfg" once the default was on (its md shows that command)
"$py" tests/bench_video_quality.py "${common[@]}" --cfg 4 --ratios 0.5 \
  --methods "none,itm-random:$prop,itm-cfg:$prop;$weighted" --out "$out/euler_cfg4_proportional"
# plain means on video DiTs (weight_power / affinity "auto" = 0 / 0 there since they were measured): ratios 0.3-0.7,
# euler and dpmpp_2m, against random ToMe and against the image models' weighting (3 / 0.2, the earlier default)
"$py" tests/bench_video_quality.py "${common[@]}" --cfg 4 --ratios 0.3,0.5,0.7 \
  --methods "none,itm-random,itm-cfg,itm-cfg:weight_power=3.0;affinity=0.2" --out "$out/euler_cfg4_plain"
"$py" tests/bench_video_quality.py "${base[@]}" --steps 16 --sampler dpmpp_2m --scheduler karras --cfg 3 \
  --ratios 0.5,0.7 --methods "none,itm-random,itm-cfg,itm-cfg:weight_power=3.0;affinity=0.2" \
  --out "$out/dpmpp2m_cfg3_plain"
"$py" tests/bench_video_quality.py "${common[@]}" --cfg 1 --ratios 0.5 \
  --methods "none,itm-random,itm-cfg:cfg1_mode=change" --out "$out/euler_cfg1_plain"
"$py" tests/bench_video_quality.py "${common[@]}" --cfg 4 --ratios 0.5 \
  --methods "none,itm-random:scope=transformer,itm-cfg:scope=transformer,itm-random:video_tokens=across_frames,itm-cfg:video_tokens=across_frames" \
  --out "$out/euler_cfg4_plain_sites"
# cfg 1 (distilled / guidance-free runs): the CFG-free importance source vs random ToMe
"$py" tests/bench_video_quality.py "${common[@]}" --cfg 1 --ratios 0.5 \
  --methods "none,itm-random:$plain,itm-cfg:cfg1_mode=change;$plain;$weighted" --out "$out/euler_cfg1"
# exploration on tuning seeds 0..31 (not held out): the paper's settings and plain means at the attention site
"$py" tests/bench_video_quality.py --samples 32 --seed-offset 0 --chunk 16 --regime joint --steps 20 --sampler euler \
  --scheduler simple --cfg 4 --ratios 0.5 \
  --methods "none,itm-random:$plain,itm-cfg:dst_mode=random;warmup_mode=prune;pool_scale=1.4;weight_power=0.0;affinity=0.0;$plain,itm-cfg:weight_power=0.0;affinity=0.0;$plain" \
  --out "$out/euler_cfg4_explore"
