"""Speed and memory benchmark: this pack vs no merging vs ComfyUI's built-in TomePatchModel.

    .venv/bin/python tests/bench_speed.py [--models sd15@512,sd15@768,sd15@1024,sdxl@1024,sdxl@1536,svd@256:8]
                                          [--ratios 0.3,0.5,0.7] [--reps 3] [--out output/bench]

Real-size architectures (SD1.5: 860M, SDXL: 2.6B, SVD: 1.5B parameters; ``svd@S:F`` = F frames of S×S, the
frames being the latent batch) with random initialised weights, built by ComfyUI's own
classes, on the ComfyUI host of the tests (pinned, or the first root of COMFYUI_PATH), with the attention backend
that host picks. Each measurement is one model evaluation of a cond+uncond batch (batch 1, cfg 5) inside ComfyUI's
own sampler (comfy.sample.sample), after the first step, so importance capture and matching are included. Methods
run interleaved (A B C … A B C …) after a warm-up round; medians with min–max over reps × timed steps.

Also reported, per model:
* ideal: from a profile of the unmerged run, the share A of an evaluation spent in self-attention at the levels
  the node merges; if that attention shrank by (1 − r)² and nothing else cost anything, the speed-up would be
  T / (T − A·(1 − (1 − r)²)). achieved/ideal = achieved saving / ideal saving.
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
from bench_quality import advanced_node, builtin_node  # noqa: E402

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
           "itm-cfg-temporal")
TEMPORAL_RATIO = 0.5  # itm-cfg-temporal: the advanced node's defaults with this temporal_ratio (--temporal-ratio)


def method_models(model, ratios, has_builtin, methods):
    """(name, ratio, patched ModelPatcher) for every method: itm-<importance>[-transformer] are this pack's node
    with levels=auto and scope attention (default) or transformer."""
    import nodes

    simple = nodes.NODE_CLASS_MAPPINGS["ITM_ImportanceTokenMerging"]()
    out = [("none", 0.0, model)] if "none" in methods else []
    for ratio in ratios:
        if has_builtin and "builtin" in methods:
            out.append(("builtin", ratio, builtin_node(model, ratio)))
        for name in methods:
            if name.endswith("-temporal"):
                out.append((name, ratio, advanced_node(model, ratio=ratio, importance=name.split("-")[1],
                                                       temporal_ratio=TEMPORAL_RATIO)))
            elif name.startswith("itm-"):
                importance = name.split("-")[1]
                scope = "transformer" if name.endswith("-transformer") else "attention"
                (patched,) = simple.patch(model, ratio=ratio, importance=importance, start_percent=0.0,
                                          end_percent=1.0, levels="auto", scope=scope)
                out.append((name, ratio, patched))
    return out


def sample_steps(model, positive, negative, latent):
    """Run the sampler for STEPS steps; returns the durations of steps 1.. (seconds) and the peak memory."""
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
        comfy.sample.sample(model, noise, STEPS, 5.0, "euler", "normal", positive, negative, latent,
                            callback=callback, disable_pbar=True, seed=0)
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else rss.peak
    return [b - a for a, b in zip(marks, marks[1:])], peak


def attention_profile(model, positive, negative, latent):
    """Share of an unmerged evaluation spent in self-attention (to_q/k/v, attention, to_out) per UNet level."""
    merging = H.pack_module("merging")
    probe = model.clone()
    spent, started = {}, {}

    def before(n, context, value, extra):
        shape = extra["original_shape"]
        level = merging.find_unet_level(shape[-2], shape[-1], n.shape[1])
        _sync()
        started["t"], started["level"] = time.perf_counter(), level
        return n, context, value

    def after(n, extra):
        _sync()
        spent[started["level"]] = spent.get(started["level"], 0.0) + time.perf_counter() - started["t"]
        return n

    probe.set_model_attn1_patch(before)
    probe.set_model_attn1_output_patch(after)
    steps, _ = sample_steps(probe, positive, negative, latent)
    evaluations = STEPS  # attention time accumulates over every step, step time only over the timed ones
    per_eval = {level: total / evaluations for level, total in spent.items()}
    return per_eval, statistics.median(steps)


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
    level = {"sd15": 0, "sdxl": 1, "svd": 0}[arch]  # what levels="auto" merges
    attention, profiled_step = attention_profile(model, positive, negative, latent)
    print(f"[{arch}@{size}] self-attention per evaluation by level: "  # noqa: T201
          + ", ".join(f"level {lvl}: {t:.3f}s ({t / profiled_step:.1%})" for lvl, t in sorted(attention.items())))
    del model, methods
    return times, peaks, overheads, attention.get(level, 0.0), profiled_step


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

    rows = []
    for spec in args.models.split(","):
        arch, size = spec.split("@")
        size, _, frames = size.partition(":")  # svd@256:8 = 8 frames of 256x256
        frames = int(frames or 1)
        times, peaks, overheads, attn, profiled_step = run_model(arch, int(size), ratios, args.reps,
                                                                 None, timers, args.methods.split(","), frames)
        size = f"{size}:{frames}" if frames > 1 else size
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
                attn_share = attn / profiled_step
                ideal_saving = attn_share * (1 - (1 - ratio) ** 2)
                achieved_saving = 1 - med / base
                row["ideal_speedup"] = round(1 / (1 - ideal_saving), 3)
                row["achieved_over_ideal"] = round(achieved_saving / ideal_saving, 3) if ideal_saving else ""
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
        print(f"[{arch}@{size}] self-attention at the merged level: {attn:.3f}s of {profiled_step:.3f}s "  # noqa: T201
              f"per evaluation ({attn / profiled_step:.1%})", flush=True)
    timers.restore()
    write_outputs(rows, args.out, info["host"], device, backend, args)


def write_outputs(rows, out, host, device, backend, args):
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
                              ("itm-cfg-temporal", "-")):
            points = [(r["ratio"], r["speedup_vs_none"]) for r in rows if r["model"] == model and r["method"] == method]
            if points:
                axes.plot(*zip(*points), style, marker="o", label=f"{model} {method}")
    axes.axhline(1.0, color="grey", linewidth=0.8)
    axes.set_xlabel("merge ratio")
    axes.set_ylabel("speed-up vs no merging")
    axes.set_title(f"{host} — {device}", fontsize=9)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(os.path.join(out, f"speed_{tag}.png"), dpi=120)


if __name__ == "__main__":
    main()
