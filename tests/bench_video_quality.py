"""Video quality benchmark: importance merging vs random ToMe on the bundled video demo models (WAN, LTX-Video,
HunyuanVideo).

    COMFYUI_PATH=../shared/hosts/comfyui-0.14.1 .venv/bin/python tests/bench_video_quality.py \
        [--model wan|ltxv|hunyuan] [--samples 64] [--ratios 0.5] [--methods none,itm-random,itm-cfg] [--steps 20] \
        [--cfg 4] [--sampler euler]

Model: the pack's moving-Fashion-MNIST video model (ComfyUI's WAN 2.1 t2v class, a 4-block WanModel; 4 latent
frames of 16×16 tokens; ``workflows/demo_model/train_video.py``), or with ``--model ltxv`` its LTX-Video twin
(ComfyUI's LTXV class, 4 blocks, patch size 1: 4 latent frames of 16×16 latent pixels = tokens) or with ``--model
hunyuan`` its HunyuanVideo twin (2 double- + 2 single-stream blocks, 4 latent frames of 16×16 tokens), loaded by the
pack's own loaders; current ComfyUI only. Clip i asks for class i mod 10 from noise seed offset+i; every method
samples the same clips with ComfyUI's own sampler (comfy.sample.sample); cond and uncond of a step in one model call
(``--regime joint``, as :mod:`bench_quality`). Methods as in bench_quality (``itm-cfg:scope=transformer``,
``itm-cfg:cfg1_mode=change``).

Metrics against the unmerged clip of the same seed, on the 4 latent frames in model space (gray, [0, 1]):
PSNR over the whole clip and SSIM averaged over frames (mean, 95% interval); frame-to-frame consistency tPSNR = PSNR
of the frame differences x[t+1] − x[t] against the reference's (range 2), i.e. whether the motion is kept; paired
differences of every itm-cfg setting against itm-random at the same ratio and options (95% interval).
Writes <out>/video_quality.md / .csv and a picture (one row per method, clips side by side, frames stacked).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "workflows", "demo_model"))

import comfy_harness as H  # noqa: E402
from bench_quality import force_regime, label, parse_method, patched_model, write_csv  # noqa: E402


def boot_video_demo(weights=None, family="wan"):
    root = (os.environ.get("COMFYUI_PATH") or "").split(os.pathsep)[0] or H.pinned_host_root()
    info = H.boot_with_pack(root, REPO, extra_args=("--use-pytorch-cross-attention",))
    if H.host_kind() != "modern":
        raise SystemExit("the video demo models need a current ComfyUI (WAN, LTX-Video, HunyuanVideo): set COMFYUI_PATH")
    import torch

    torch.set_grad_enabled(False)
    demo = H.pack_module("nodes.demo_model")
    load = {"wan": demo.load_demo_video_model, "ltxv": demo.load_demo_ltxv_model,
            "hunyuan": demo.load_demo_hunyuan_model}[family]
    model, clip, vae, metadata = load(*(weights,) if weights else ())
    return info, demo, model, clip.table, vae, metadata


def generate(model, table, vae, classes, seeds, args):
    """Clips [N, T, S, S] in [0, 1] (latent frames in model space; S = 32 for the WAN and HunyuanVideo demos, 16 for
    the LTX-Video one) for the given classes and noise seeds."""
    import comfy.sample
    import torch

    out = []
    null = table[-1][None, None, :]
    mean, std = vae._stats(torch.device("cpu"))
    size = 16 if args.model == "ltxv" else 32  # latent frames: 32x32 with 2x2 patches, 16x16 with LTX-Video's 1x1
    # LTX-Video's model requires the text encoder's token mask (the class token is real)
    extra = {"attention_mask": torch.ones(1, 1, dtype=torch.long)} if args.model == "ltxv" else {}
    for start in range(0, len(classes), args.chunk):
        cls = classes[start:start + args.chunk]
        noise = torch.stack([torch.randn(vae.latent_channels, args.frames, size, size,
                                         generator=torch.Generator().manual_seed(int(s)))
                             for s in seeds[start:start + args.chunk]])
        positive = [[table[cls][:, None, :].clone(), dict(extra)]]
        negative = [[null.expand(len(cls), -1, -1).clone(), dict(extra)]]
        if args.model == "hunyuan":  # the class embedding is also HunyuanVideo's pooled vector
            positive[0][1]["pooled_output"] = positive[0][0][:, 0].clone()
            negative[0][1]["pooled_output"] = negative[0][0][:, 0].clone()
        sigmas = ltxv_sigmas(args.steps, noise) if args.scheduler == "ltxv" else None
        scheduler = "simple" if sigmas is not None else args.scheduler
        samples = comfy.sample.sample(model, noise, args.steps, args.cfg, args.sampler, scheduler, positive,
                                      negative, torch.zeros_like(noise), denoise=1.0, disable_pbar=True,
                                      seed=int(seeds[start]), sigmas=sigmas)
        gray = ((samples.cpu().float() - mean) / std).mean(dim=1)
        out.append(((gray + 1) / 2).clamp(0, 1))
    return torch.cat(out)


def ltxv_sigmas(steps, noise):
    """The sigmas of ComfyUI's LTXVScheduler node with its defaults (shift from the latent's token count, stretched to
    a terminal sigma of 0.1), as LTX-Video workflows sample."""
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS["LTXVScheduler"]
    result = cls.execute(steps=steps, max_shift=2.05, base_shift=0.95, stretch=True, terminal=0.1,
                         latent={"samples": noise})
    return (result.result if hasattr(result, "result") else result)[0]


def clip_metrics(clips, reference, metrics):
    """(PSNR over the clip, mean SSIM over frames, tPSNR of frame differences), each per clip."""
    n, t = clips.shape[:2]
    psnr = metrics.psnr(clips.flatten(1, 2), reference.flatten(1, 2))
    ssim = metrics.ssim(clips.flatten(0, 1), reference.flatten(0, 1)).view(n, t).mean(1)
    tpsnr = metrics.psnr((clips[:, 1:] - clips[:, :-1]).flatten(1, 2),
                         (reference[:, 1:] - reference[:, :-1]).flatten(1, 2), data_range=2.0)
    return psnr, ssim, tpsnr


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--ratios", default="0.5")
    parser.add_argument("--methods", default="none,itm-random,itm-cfg")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--scheduler", default="simple",
                        help="a KSampler scheduler, or ltxv: the sigmas of ComfyUI's LTXVScheduler node (its defaults)")
    parser.add_argument("--frames", type=int, default=4, help="latent frames (4 = 13 video frames)")
    parser.add_argument("--chunk", type=int, default=8, help="clips per sampler call")
    parser.add_argument("--regime", choices=("joint", "split", "auto"), default="joint")
    parser.add_argument("--seed-offset", type=int, default=0)
    parser.add_argument("--picture-columns", type=int, default=10)
    parser.add_argument("--model", choices=("wan", "ltxv", "hunyuan"), default="wan",
                        help="which video demo model: WAN, LTX-Video or HunyuanVideo architecture")
    parser.add_argument("--weights", help="another video demo checkpoint (default: the bundled one)")
    parser.add_argument("--out", default=os.path.join(REPO, "output", "bench_video"))
    args = parser.parse_args(argv)
    methods = [parse_method(m) for m in args.methods.split(",")]
    if methods[0][0] != "none":
        methods.insert(0, ("none", {}))
    ratios = [float(r) for r in args.ratios.split(",")]

    info, demo, model, table, vae, metadata = boot_video_demo(args.weights, args.model)
    import torch
    from quality import metrics

    classes = torch.arange(args.samples) % 10
    seeds = torch.arange(args.samples) + args.seed_offset
    force_regime(args.regime)
    settings = [("none", {}, 0.0)] + [(n, o, r) for r in ratios for n, o in methods if n != "none"]
    results, per_clip, comparisons, pictures = [], {}, [], {}
    reference = None
    command = "tests/bench_video_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for name, options, ratio in settings:
        tag = label(name, options, ratio)
        start = time.perf_counter()
        clips = generate(patched_model(model, name, options, ratio), table, vae, classes, seeds, args)
        seconds = time.perf_counter() - start
        pictures[tag] = clips[:args.picture_columns]
        if reference is None:
            reference = clips
        row = {"method": name, "options": ";".join(f"{k}={v}" for k, v in options.items()), "ratio": ratio,
               "label": tag, "seconds": round(seconds, 1)}
        if name != "none":
            values = clip_metrics(clips, reference, metrics)
            per_clip[tag] = values
            for key, value in zip(("psnr", "ssim", "tpsnr"), values):
                row[key], row[key + "_ci"] = metrics.mean_ci(value)
            comparisons = paired(results + [row], per_clip, metrics)
        results.append(row)
        write_report(args, info, metadata, command, results, comparisons, pictures)
        print(f"{tag:>40}: {seconds:6.1f}s  PSNR {row.get('psnr', math.inf):6.2f} ± {row.get('psnr_ci', 0):.2f}  "  # noqa: T201
              f"SSIM {row.get('ssim', 1.0):.4f}  tPSNR {row.get('tpsnr', math.inf):6.2f}", flush=True)
    for diff in comparisons:
        print(f"{diff['setting']} - {diff['baseline']}: dPSNR {diff['d_psnr']:+.2f} ± {diff['d_psnr_ci']:.2f}  "  # noqa: T201
              f"dtPSNR {diff['d_tpsnr']:+.2f} ± {diff['d_tpsnr_ci']:.2f}", flush=True)
    return 0


IMPORTANCE_ONLY = {"cfg1_mode", "dst_mode", "pool_scale", "dst_fraction", "weight_power", "affinity", "protect",
                   "warmup_mode"}


def paired(rows, per_clip, metrics):
    """Every itm-cfg setting against itm-random with the same ratio and merge-site options, same clips."""
    out = []
    for row in rows:
        if row["method"] != "itm-cfg":
            continue
        options = dict(item.partition("=")[::2] for item in filter(None, row["options"].split(";")))
        # random merging only depends on where and how tokens merge (scope, video_tokens, seed, ...), not on the
        # importance options: pair with the random run of the same such options
        shared = {k: v for k, v in options.items() if k not in IMPORTANCE_ONLY}
        base = label("itm-random", shared, row["ratio"])
        if base not in per_clip:
            continue
        diff = {"setting": row["label"], "baseline": base}
        for key, a, b in zip(("psnr", "ssim", "tpsnr"), per_clip[row["label"]], per_clip[base]):
            diff["d_" + key], diff["d_" + key + "_ci"] = metrics.mean_ci(a - b)
        out.append(diff)
    return out


def write_report(args, info, metadata, command, results, comparisons, pictures) -> None:
    import json

    import torch
    from PIL import Image

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "video_quality")
    write_csv(stem + ".csv", results)
    if comparisons:
        write_csv(stem + "_paired.csv", comparisons)
    training = json.loads(metadata.get("training", "{}"))
    lines = [f"# Video quality: {info['host']}", "", f"`{command}`", "",
             f"Model: {args.model} video demo model ({training.get('steps', '?')} training steps); {args.samples} clips, "
             f"{args.frames} latent frames, {args.sampler}/{args.scheduler}, {args.steps} steps, cfg {args.cfg}, "
             f"seeds {args.seed_offset}..{args.seed_offset + args.samples - 1}, regime {args.regime}.", "",
             "| setting | s | PSNR dB | SSIM | tPSNR dB |", "|---|---|---|---|---|"]
    for row in results:
        if row["method"] == "none":
            lines.append(f"| {row['label']} | {row['seconds']} | ref | ref | ref |")
            continue
        lines.append(f"| {row['label']} | {row['seconds']} | {row['psnr']:.2f} ± {row['psnr_ci']:.2f} | "
                     f"{row['ssim']:.4f} ± {row['ssim_ci']:.4f} | {row['tpsnr']:.2f} ± {row['tpsnr_ci']:.2f} |")
    if comparisons:
        lines += ["", "Paired (same clips), 95% intervals:", "", "| setting − baseline | ΔPSNR | ΔSSIM | ΔtPSNR |",
                  "|---|---|---|---|"]
        for d in comparisons:
            lines.append(f"| {d['setting']} − {d['baseline']} | {d['d_psnr']:+.2f} ± {d['d_psnr_ci']:.2f} | "
                         f"{d['d_ssim']:+.4f} ± {d['d_ssim_ci']:.4f} | {d['d_tpsnr']:+.2f} ± {d['d_tpsnr_ci']:.2f} |")
    with open(stem + ".md", "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    rows = []
    for clips in pictures.values():  # one row per method: clips side by side, each clip's frames stacked
        rows.append(torch.cat([torch.cat(list(clip), dim=0) for clip in clips], dim=1))
    picture = torch.cat(rows, dim=0)
    Image.fromarray((picture.numpy() * 255).round().astype("uint8")).resize(
        (picture.shape[1] * 2, picture.shape[0] * 2), Image.NEAREST).save(stem + ".png")


if __name__ == "__main__":
    sys.exit(main())
