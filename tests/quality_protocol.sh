#!/usr/bin/env bash
# The quality protocol behind the README's figures (issue: importance merging vs plain ToMe where users run it).
# Settings are chosen on noise seeds 0..119 (--seed-offset 0) and reported here on held-out seeds 10000+.
# Headline: cond and uncond of a step in ONE model call (--regime joint, what users with enough memory get);
# the split layout (separate calls, ComfyUI's low-memory path) is reported beside it.
#   bash tests/quality_protocol.sh [samples]        (about 105 minutes on 2 CPU cores at 160 samples)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${ITM_PYTHON_BENCH:-$repo/.venv/bin/python}
n=${1:-200}
out=$repo/tests/results/quality
old="itm-cfg:dst_mode=top;pool_scale=1.4;weight_power=0.0;affinity=0.0"             # the 0.3.0 defaults
paper="itm-cfg:dst_mode=random;warmup_mode=prune;pool_scale=1.4;weight_power=0.0;affinity=0.0"  # the paper's code
bench() { "$py" tests/bench_quality.py --samples "$n" --seed-offset 10000 --chunk 20 "$@"; }
euler4=(--sampler euler --scheduler normal --steps 20 --cfg 4)
dpmpp3=(--sampler dpmpp_2m --scheduler karras --steps 16 --cfg 3)
dpmpp2=(--sampler dpmpp_2m --scheduler karras --steps 16 --cfg 2)
cd "$repo"
bench --regime joint "${euler4[@]}" --ratios 0.3,0.5,0.7 --methods "none,builtin,itm-random,itm-cfg,$old,$paper" \
  --out "$out/euler_cfg4_joint"
bench --regime joint "${dpmpp3[@]}" --ratios 0.3,0.5,0.7 --methods "none,builtin,itm-random,itm-cfg,$old" --no-effnet \
  --out "$out/dpmpp2m_cfg3_joint"
bench --regime joint "${dpmpp2[@]}" --ratios 0.5,0.7 --methods "none,builtin,itm-random,itm-cfg" --no-effnet \
  --out "$out/dpmpp2m_cfg2_joint"
bench --regime split "${euler4[@]}" --ratios 0.5,0.7 --methods "none,builtin,itm-random,itm-cfg" --no-effnet \
  --out "$out/euler_cfg4_split"
# bigger merging sites (faster, see the speed benchmark): whole transformer stacks, and one level more
bench --regime joint "${euler4[@]}" --ratios 0.3,0.5,0.7 \
  --methods "none,itm-random:scope=transformer,itm-cfg:scope=transformer" --no-effnet --out "$out/euler_cfg4_joint_transformer"
bench --regime joint "${euler4[@]}" --ratios 0.3,0.5 --methods "none,itm-random:levels=auto+1,itm-cfg:levels=auto+1" \
  --no-effnet --out "$out/euler_cfg4_joint_levels"
# queries only (keys and values keep every token: the built-in node's site, scope = queries). First with the attention
# site's importance-weighted means (weight_power 3 / affinity 0.2: what "auto" gave at this site when these folders
# were written, so their labels say only scope=queries), then with plain means (the queries site's "auto" now)
for weighting in "weight_power=3.0;affinity=0.2:" "weight_power=0.0:_plain"; do
  queries="none,builtin,itm-random:scope=queries,itm-cfg:scope=queries;${weighting%%:*}"
  tail=${weighting#*:}
  bench --regime joint "${euler4[@]}" --ratios 0.3,0.5,0.7 --methods "$queries" --out "$out/euler_cfg4_joint_queries$tail"
  bench --regime joint "${dpmpp3[@]}" --ratios 0.3,0.5,0.7 --methods "$queries" --no-effnet \
    --out "$out/dpmpp2m_cfg3_joint_queries$tail"
  bench --regime joint "${dpmpp2[@]}" --ratios 0.5,0.7 --methods "$queries" --no-effnet \
    --out "$out/dpmpp2m_cfg2_joint_queries$tail"
done
