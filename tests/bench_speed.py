"""Speed and memory benchmark: this pack vs no merging vs ComfyUI's built-in TomePatchModel.

    .venv/bin/python tests/bench_speed.py [--models sd15@512,sd15@768,sd15@1024,sdxl@1024,sdxl@1536,svd@256:8]
                                          [--ratios 0.3,0.5,0.7] [--reps 3] [--attention default|sdpa]
                                          [--methods none,builtin,itm-cfg,itm-cfg-transformer:levels=auto+1,…]
                                          [--out output/bench]

Real-size architectures (SD1.5: 860M, SDXL: 2.6B, SVD: 1.5B parameters; ``svd@S:F`` = F frames of S×S, the
frames being the latent batch) with random initialised weights, built by ComfyUI's own
classes, on the ComfyUI host of the tests (pinned, or the first root of COMFYUI_PATH), with the attention backend
that host picks. Each measurement is one model evaluation of a cond+uncond batch (batch 1, cfg 5) inside ComfyUI's
own sampler (comfy.sample.sample), after the first step, so importance capture and matching are included. Methods
run interleaved (A B C … A B C …) after a warm-up round; medians with min–max over reps × timed steps.

Also reported, per model:
* a site profile of the unmerged run (forward hooks on the UNet's modules): seconds per evaluation in the
  self-attention kernel, its projections, cross-attention, feed-forward, the rest of each block, the stacks' in/out,
  temporal blocks, ResBlocks and everything else, per UNet level;
* ideal: from that profile, the speed-up if only the merged work shrank and merging cost nothing, per merging site
  (attention scope: kernel × (1 − r)², projections × (1 − r); transformer scope: kernel × (1 − r)², the rest of the
  block × (1 − r); the built-in node: queries only) at the levels each method merges. achieved/ideal = achieved
  saving / ideal saving.
* overheads of this pack (cfg mode): importance capture and matching per step, merge + unmerge per merged call (a block, or a whole transformer stack with scope=transformer).
* peak memory: CUDA max allocated on a GPU; on the CPU the peak resident set size during the timed steps.
Writes <out>/speed_<host>_<device>.md, .csv and .png (speed-up vs ratio).
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import comfy_harness as H  # noqa: E402
from bench_quality import advanced_node, builtin_node, parse_method  # noqa: E402

STEPS = 3  # step 0 warms up (no importance map yet); steps 1.. are timed (--steps)


class PeakRSS:
    """Peak resident set size of this process while active (sampled every 5 ms)."""

    def __init__(self):
        import psutil

        self.process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Timers:
    """Wall-clock totals of a few pack functions, wrapped for the benchmark process only."""

    def __init__(self):
        self.total = {}
        self.calls = {}
        self._undo = []

    def wrap(self, owner, name, key):
        original = getattr(owner, name)
        timers = self

        def timed(*args, **kwargs):
            _sync()
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                _sync()
                timers.total[key] = timers.total.get(key, 0.0) + time.perf_counter() - start
                timers.calls[key] = timers.calls.get(key, 0) + 1

        setattr(owner, name, timed)
        self._undo.append((owner, name, original))

    def restore(self):
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)
        self._undo.clear()

    def reset(self):
        self.total.clear()
        self.calls.clear()


def build(arch, size, device, frames=1):
    if arch == "sd15":
        return H.full_sd15_model(device=device)
    if arch == "svd":
        return H.full_svd_model(frames, size, size, device=device)
    return H.full_sdxl_model(width=size, height=size, device=device)


METHODS = ("none", "builtin", "itm-cfg", "itm-random", "itm-cfg-transformer", "itm-random-transformer",
           "itm-cfg-queries", "itm-random-queries", "itm-cfg-temporal")
SCOPE_SUFFIXES = {"-transformer": "transformer", "-queries": "queries"}  # itm-<importance><suffix>: the node's scope
TEMPORAL_RATIO = 0.5  # itm-cfg-temporal: the advanced node's defaults with this temporal_ratio (--temporal-ratio)


AUTO_LEVEL = {"sd15": 0, "sdxl": 1, "svd": 0}  # the highest-resolution level with attention (levels = auto)


def method_spec(name):
    """'itm-cfg-transformer:levels=auto+1' → ('itm-cfg-transformer', {'levels': 'auto+1'}); options are inputs of
    the node (levels / scope go to the simple node, anything else to the Advanced node with its defaults)."""
    base, options = parse_method(name)
    if base.startswith("itm-"):
        options.setdefault("scope", next((scope for suffix, scope in SCOPE_SUFFIXES.items() if base.endswith(suffix)),
                                         "attention"))
        options.setdefault("levels", "auto")
    return base, options


def merged_levels(arch, levels):
    auto = AUTO_LEVEL[arch]
    if levels == "auto":
        return {auto}
    if levels == "auto+1":
        return {auto, auto + 1}
    return {int(part) for part in levels.split(",")}


def method_models(model, ratios, has_builtin, methods):
    """(name, ratio, patched ModelPatcher) for every method: itm-<importance>[-transformer|-queries][:input=value;…]
    are this pack's node with levels=auto and scope attention (default), transformer or queries unless the options say
    otherwise."""
    import nodes

    simple = nodes.NODE_CLASS_MAPPINGS["ITM_ImportanceTokenMerging"]()
    out = [("none", 0.0, model)] if "none" in methods else []
    for ratio in ratios:
        if has_builtin and "builtin" in methods:
            out.append(("builtin", ratio, builtin_node(model, ratio)))
        for name in methods:
            base, options = method_spec(name)
            importance = base.split("-")[1] if base.startswith("itm-") else None
            if base.endswith("-temporal"):
                out.append((name, ratio, advanced_node(model, ratio=ratio, importance=importance,
                                                       temporal_ratio=TEMPORAL_RATIO, **options)))
            elif base.startswith("itm-") and set(options) <= {"levels", "scope"}:
                (patched,) = simple.patch(model, ratio=ratio, importance=importance, start_percent=0.0,
                                          end_percent=1.0, levels=options["levels"], scope=options["scope"])
                out.append((name, ratio, patched))
            elif base.startswith("itm-"):
                out.append((name, ratio, advanced_node(model, ratio=ratio, importance=importance, **options)))
    return out


def sample_steps(model, positive, negative, latent, steps=None, cfg=5.0):
    """Run the sampler for ``steps`` (default STEPS) steps at ``cfg``; returns the durations of steps 1.. (seconds) and the peak
    memory."""
    import comfy.sample
    import torch

    marks = []

    def callback(step, x0, x, total):
        _sync()
        marks.append(time.perf_counter())

    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:
        comfy.sample.sample(model, noise, steps or STEPS, cfg, "euler", "normal", positive, negative, latent,
                            callback=callback, disable_pbar=True, seed=0)
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else rss.peak
    return [b - a for a, b in zip(marks, marks[1:])], peak


SITES = ("self-attn core", "self-attn proj", "cross-attn", "feed-forward", "block norms", "stack in/out",
         "temporal blocks", "resnets", "other")


def site_profile(model, positive, negative, latent):
    """Where an unmerged evaluation spends its time: seconds per evaluation by (UNet level, site), and the step time.

    Forward hooks on the UNet's own modules (added to this benchmark's model only, removed afterwards) time every
    BasicTransformerBlock and its parts: self-attention core (the attention kernel; attn1 minus its projections),
    self-attention projections (to_q/k/v/out), cross-attention, feed-forward, the block's norms and residual adds (the
    rest of the block); per SpatialTransformer the norm + proj_in/out around the blocks; temporal blocks of video
    models; ResBlocks. "other" is the evaluation time none of these covers (convolutions in/out, down/upsampling,
    time embedding, the sampler's own work)."""
    import math

    import torch

    unet = model.model.diffusion_model
    spent, started, handles, current = {}, {}, [], {"level": None}
    latent_h = latent.shape[-2]
    latent_tokens = latent.shape[-2] * latent.shape[-1]

    def level_of(x):
        if x.ndim == 4:
            return int(round(math.log2(latent_h / x.shape[-2])))
        return int(round(math.log(latent_tokens / x.shape[1], 4)))

    def add(key, seconds):
        spent[key] = spent.get(key, 0.0) + seconds

    def timed(module, key_fn):
        def pre(mod, args):
            _sync()
            started[id(mod)] = time.perf_counter()

        def post(mod, args, output):
            _sync()
            add(key_fn(args[0]), time.perf_counter() - started.pop(id(mod)))

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))

    from comfy.ldm.modules.attention import BasicTransformerBlock, SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    for path, module in unet.named_modules():
        if isinstance(module, BasicTransformerBlock):
            if "time_stack" in path:  # a video model's temporal block: its tokens are frames; the level of its stack
                timed(module, lambda x: (current["level"], "temporal blocks"))
                continue
            timed(module, lambda x: (level_of(x), "block"))
            timed(module.attn1, lambda x: (level_of(x), "attn1"))
            for proj in (module.attn1.to_q, module.attn1.to_k, module.attn1.to_v, module.attn1.to_out):
                timed(proj, lambda x: (level_of(x), "self-attn proj"))
            timed(module.attn2, lambda x: (level_of(x), "cross-attn"))
            timed(module.ff, lambda x: (level_of(x), "feed-forward"))
        elif isinstance(module, SpatialTransformer):
            timed(module, lambda x: (level_of(x), "stack"))
            handles.append(module.register_forward_pre_hook(
                lambda mod, args: current.__setitem__("level", level_of(args[0]))))
        elif isinstance(module, ResBlock) and "time_stack" not in path:
            timed(module, lambda x: (level_of(x), "resnets"))
    try:
        with torch.no_grad():
            steps, _ = sample_steps(model, positive, negative, latent)
    finally:
        for handle in handles:
            handle.remove()
    per_eval = {key: total / STEPS for key, total in spent.items()}  # totals cover every step; steps only timed ones
    step = statistics.median(steps)
    out = {}
    levels = {level for level, _ in per_eval if level is not None}
    for level in levels:
        get = lambda name: per_eval.get((level, name), 0.0)  # noqa: E731
        core = get("attn1") - get("self-attn proj")
        rest = get("block") - get("attn1") - get("cross-attn") - get("feed-forward")
        out[(level, "self-attn core")] = core
        out[(level, "self-attn proj")] = get("self-attn proj")
        out[(level, "cross-attn")] = get("cross-attn")
        out[(level, "feed-forward")] = get("feed-forward")
        out[(level, "block norms")] = rest
        out[(level, "temporal blocks")] = get("temporal blocks")
        out[(level, "stack in/out")] = get("stack") - get("block") - get("temporal blocks")
        out[(level, "resnets")] = get("resnets")
    out[(None, "other")] = step - sum(out.values())
    return out, step


def ideal_saving(profile, levels, ratio, kind):
    """Share of an evaluation an ideal merge would save at these levels: attention scope (tokens merged before
    to_q/k/v, unmerged after to_out: kernel × (1 − (1 − r)²), projections × r), transformer scope (the whole block on
    merged tokens: kernel × (1 − (1 − r)²), the rest of the block × r) or queries only (the built-in node and
    ``scope = queries``: kernel and to_q/to_out × r, approximated as kernel × r + projections × r / 2)."""
    step = sum(profile.values())
    saving = 0.0
    for level in levels:
        get = lambda name: profile.get((level, name), 0.0)  # noqa: E731
        core, proj = get("self-attn core"), get("self-attn proj")
        if kind == "attention":
            saving += core * (1 - (1 - ratio) ** 2) + proj * ratio
        elif kind == "transformer":
            rest = proj + get("cross-attn") + get("feed-forward") + get("block norms")
            saving += core * (1 - (1 - ratio) ** 2) + rest * ratio
        else:
            saving += core * ratio + proj * ratio / 2
    return saving / step


def fmt(values):
    return f"{statistics.median(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def run_model(arch, size, ratios, reps, device, timers, method_names, frames=1):
    import torch

    model, positive, negative = build(arch, size, device, frames)
    latent = torch.zeros(frames, 4, size // 8, size // 8)  # video models: the frames are the latent batch
    import nodes

    has_builtin = "TomePatchModel" in nodes.NODE_CLASS_MAPPINGS
    methods = method_models(model, ratios, has_builtin, method_names)
    times = {(name, ratio): [] for name, ratio, _ in methods}
    peaks = {(name, ratio): 0 for name, ratio, _ in methods}
    overheads = {}
    print(f"[{arch}@{size}] warm-up", flush=True)  # noqa: T201
    sample_steps(model, positive, negative, latent)
    for rep in range(reps):
        for name, ratio, patched in methods:
            timers.reset()
            steps, peak = sample_steps(patched, positive, negative, latent)
            times[(name, ratio)] += steps
            peaks[(name, ratio)] = max(peaks[(name, ratio)], peak)
            if name.startswith("itm-cfg"):
                overheads.setdefault((name, ratio), []).append((dict(timers.total), dict(timers.calls)))
            print(f"[{arch}@{size}] rep {rep + 1}/{reps} {name:>10} r={ratio:.1f}: "  # noqa: T201
                  + ", ".join(f"{s:.2f}s" for s in steps), flush=True)
    profile, profiled_step = site_profile(model, positive, negative, latent)
    del model, methods
    return times, peaks, overheads, profile, profiled_step


def main(argv=None):
    global STEPS, TEMPORAL_RATIO
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="sd15@512,sd15@768")
    parser.add_argument("--ratios", default="0.3,0.5,0.7")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--methods", default="none,builtin,itm-cfg,itm-random,itm-cfg-transformer",
                        help=f"comma-separated, from {','.join(METHODS)}")
    parser.add_argument("--out", default=os.path.join(REPO, "output", "bench"))
    parser.add_argument("--steps", type=int, default=STEPS, help="sampler steps per run; the first is not timed")
    parser.add_argument("--gpu", action="store_true", help="run on the GPU ComfyUI picks (default: CPU)")
    parser.add_argument("--attention", choices=("default", "sdpa"), default="default",
                        help="default: the backend ComfyUI picks (CPU: sub-quadratic); sdpa: PyTorch SDPA "
                             "(--use-pytorch-cross-attention), the kernels GPUs run")
    parser.add_argument("--temporal-ratio", type=float, default=TEMPORAL_RATIO,
                        help="temporal_ratio of the itm-cfg-temporal method (video models: frames share queries)")
    args = parser.parse_args(argv)
    if "none" not in args.methods.split(","):
        args.methods = "none," + args.methods
    STEPS = max(2, args.steps)
    TEMPORAL_RATIO = args.temporal_ratio
    ratios = [float(r) for r in args.ratios.split(",")]

    root = (os.environ.get("COMFYUI_PATH") or "").split(os.pathsep)[0] or H.pinned_host_root()
    extra = ("--use-pytorch-cross-attention",) if args.attention == "sdpa" else ()
    info = H.boot_with_pack(root, REPO, cpu=not args.gpu, extra_args=extra)
    import torch

    device = torch.cuda.get_device_name() if args.gpu and torch.cuda.is_available() else "cpu"
    if device == "cpu":
        import platform

        device = f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()}, fp32)"
    import comfy.ldm.modules.attention as attention_module

    backend = getattr(attention_module.optimized_attention, "__name__", "?")
    unet = H.pack_module("nodes.unet")
    partition_mod = H.pack_module("merging.partition")
    timers = Timers()
    timers.wrap(unet.UNetRuntime, "capture", "capture")
    timers.wrap(unet.UNetRuntime, "_make_partition", "matching")
    timers.wrap(partition_mod.Partition, "merge", "merge")
    timers.wrap(partition_mod.Partition, "unmerge", "unmerge")

    rows, profiles = [], []
    for spec in args.models.split(","):
        arch, size = spec.split("@")
        size, _, frames = size.partition(":")  # svd@256:8 = 8 frames of 256x256
        frames = int(frames or 1)
        times, peaks, overheads, profile, profiled_step = run_model(arch, int(size), ratios, args.reps,
                                                                    None, timers, args.methods.split(","), frames)
        size = f"{size}:{frames}" if frames > 1 else size
        profiles.append((f"{arch}@{size}", profile, profiled_step))
        base = statistics.median(times[("none", 0.0)])  # "none" is always measured
        for (name, ratio), values in times.items():
            med = statistics.median(values)
            builtin = times.get(("builtin", ratio))
            row = {
                "model": f"{arch}@{size}", "method": name, "ratio": ratio, "s_per_eval": fmt(values),
                "median_s": round(med, 4), "speedup_vs_none": round(base / med, 3),
                "speedup_vs_builtin": round(statistics.median(builtin) / med, 3) if builtin and name != "builtin" else "",
                "peak_mem_gib": round(peaks[(name, ratio)] / 2**30, 2),
                "ideal_speedup": "", "achieved_over_ideal": "", "capture_ms_per_step": "",
                "matching_ms_per_step": "", "merge_unmerge_ms_per_call": "", "overhead_share": "",
            }
            if name.startswith("itm") or name == "builtin":
                if name == "builtin":  # ComfyUI's node merges queries at the full-resolution level only
                    kind, levels = "builtin", {0}
                else:
                    _, options = method_spec(name)
                    kind, levels = options["scope"], merged_levels(arch, options["levels"])
                ideal = ideal_saving(profile, levels, ratio, kind)
                achieved_saving = 1 - med / base
                row["ideal_speedup"] = round(1 / (1 - ideal), 3)
                row["achieved_over_ideal"] = round(achieved_saving / ideal, 3) if ideal else ""
            runs = overheads.get((name, ratio))
            if runs:
                steps_timed = STEPS  # the wrapped functions ran on every step of each run
                cap = statistics.median(t.get("capture", 0.0) for t, _ in runs) / steps_timed
                match = statistics.median(t.get("matching", 0.0) for t, _ in runs) / steps_timed
                mu = statistics.median(t.get("merge", 0.0) + t.get("unmerge", 0.0) for t, _ in runs)
                blocks = statistics.median(c.get("unmerge", 0) for _, c in runs) or 1
                row["capture_ms_per_step"] = round(cap * 1000, 2)
                row["matching_ms_per_step"] = round(match * 1000, 2)
                row["merge_unmerge_ms_per_call"] = round(mu / blocks * 1000, 2)
                row["overhead_share"] = round((cap + match) / med, 4)
            rows.append(row)
    timers.restore()
    write_outputs(rows, profiles, args.out, info["host"], device, backend, args)


def profile_lines(profiles, ratios):
    """Markdown: where an unmerged evaluation spends its time, and the ideal speed-up of each merging site."""
    lines = ["", "## Where an unmerged evaluation spends its time", "",
             "Seconds per evaluation (share of the step) from forward hooks on the UNet's modules, one unmerged run "
             "(`site_profile` in tests/bench_speed.py). Level 0 = full latent resolution.", ""]
    for model, profile, step in profiles:
        levels = sorted({level for level, _ in profile if level is not None})
        lines += [f"**{model}** — {step:.3f} s per evaluation", "",
                  "| site | " + " | ".join(f"level {level}" for level in levels) + " | all |",
                  "|---|" + "---|" * (len(levels) + 1)]
        for site in SITES:
            cells = [profile.get((level, site), 0.0) for level in levels]
            if site == "other":
                cells = [0.0] * len(levels)
            total = sum(cells) + (profile.get((None, site), 0.0))
            if not total:
                continue
            lines.append(f"| {site} | " + " | ".join(f"{c:.3f} ({c / step:.1%})" for c in cells)
                         + f" | {total:.3f} ({total / step:.1%}) |")
        arch = model.split("@")[0]
        lines += ["", "Ideal speed-up (nothing but the merged work shrinks, no overhead):", "",
                  "| site | levels | " + " | ".join(f"r={r:g}" for r in ratios) + " |",
                  "|---|---|" + "---|" * len(ratios)]
        for kind, level_sets in (("builtin", ["0"]), ("attention", ["auto", "auto+1"]),
                                 ("transformer", ["auto", "auto+1"]), ("queries", ["auto"])):
            for spec in level_sets:
                levels_used = {0} if kind == "builtin" else merged_levels(arch, spec)
                cells = [1 / (1 - ideal_saving(profile, levels_used, r, kind)) for r in ratios]
                name = "built-in (queries)" if kind == "builtin" else f"{kind} scope"
                lines.append(f"| {name} | {','.join(map(str, sorted(levels_used)))} | "
                             + " | ".join(f"{c:.3f}×" for c in cells) + " |")
        lines.append("")
    return lines


def write_outputs(rows, profiles, out, host, device, backend, args):
    os.makedirs(out, exist_ok=True)
    tag = f"{host.split(' ')[0]}_{'gpu' if args.gpu else 'cpu'}" + ("_sdpa" if args.attention == "sdpa" else "")
    columns = list(rows[0])
    with open(os.path.join(out, f"speed_{tag}.csv"), "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# Speed benchmark — host {host}, device {device}, attention backend `{backend}`", "",
             f"Command: `python tests/bench_speed.py {' '.join(sys.argv[1:])}`",
             f"Seconds per model evaluation (cond+uncond batch), median (min–max) of {args.reps} reps × "
             f"{STEPS - 1} timed steps, interleaved.", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    lines += profile_lines(profiles, ratios=sorted({row["ratio"] for row in rows if row["ratio"]}))
    with open(os.path.join(out, f"speed_{tag}.md"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))  # noqa: T201
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")  # noqa: T201
        return
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for model in dict.fromkeys(r["model"] for r in rows):
        for method, style in (("builtin", ":"), ("itm-cfg", "-"), ("itm-random", "--"),
                              ("itm-cfg-transformer", "-."), ("itm-random-transformer", "-."),
                              ("itm-cfg-queries", (0, (1, 1))), ("itm-random-queries", (0, (1, 1))),
                              ("itm-cfg-temporal", "-")):
            points = [(r["ratio"], r["speedup_vs_none"]) for r in rows if r["model"] == model and r["method"] == method]
            if points:
                axes.plot(*zip(*points), linestyle=style, marker="o", label=f"{model} {method}")
    axes.axhline(1.0, color="grey", linewidth=0.8)
    axes.set_xlabel("merge ratio")
    axes.set_ylabel("speed-up vs no merging")
    axes.set_title(f"{host} — {device}", fontsize=9)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(os.path.join(out, f"speed_{tag}.png"), dpi=120)


if __name__ == "__main__":
    main()
