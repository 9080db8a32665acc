"""Temporal sharing benchmark (fidelity): spatial-only merging vs spatial + temporal sharing on frame sequences.

    .venv/bin/python tests/bench_temporal.py [--videos 32] [--frames 8] [--ratio 0.5] [--temporal 0.5,1.0]
                                             [--denoise 0.6] [--steps 20] [--out output/bench]

No video model with trained weights exists here, so the frame sequences are vid2vid-style batches on the bundled
demo model: video v pans a real Fashion-MNIST test image of class v mod 10 by one pixel per frame; the frames are
encoded (the demo codec), noised with one noise draw shared by all frames of the video (seed v) and denoised with
ComfyUI's own sampler (--chunk videos per call, their frames one after another in the latent batch) (img2img at --denoise, cfg 4, class prompt, null-class negative). Every method sees the same
frames and noise. Fidelity = PSNR/SSIM of each frame to the unmerged output (mean ± 95% interval); flicker = mean
absolute difference between consecutive output frames after undoing the pan (lower = steadier; the unmerged value
is the reference). Speed on a real-size video UNet comes from tests/bench_speed.py (svd@S:F, method itm-cfg-temporal).
Writes <out>/temporal_<host>.md and .csv.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "workflows", "demo_model"))

from bench_quality import boot_demo, patched_model  # noqa: E402


def pan_videos(videos: int, frames: int):
    """(uint8 frames [V, F, 28, 28], classes [V]): test image k of class v mod 10, shifted right f pixels in frame f."""
    import torch
    from fashion_data import load_images

    images, labels = load_images("test")
    classes = torch.arange(videos) % 10
    out = []
    for v in range(videos):
        image = images[(labels == classes[v]).nonzero().flatten()[v // 10]]
        shifted = [torch.nn.functional.pad(image, (f, 0))[:, :28] for f in range(frames)]
        out.append(torch.stack(shifted))
    return torch.stack(out), classes


def flicker(frames):
    """Mean |frame f+1 shifted back one pixel − frame f| over the overlapping columns, per video ([V] tensor)."""
    return (frames[:, 1:, :, 1:] - frames[:, :-1, :, :-1]).abs().flatten(1).mean(1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=32)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--temporal", default="0.5,1.0", help="temporal_ratio values to compare with 0")
    parser.add_argument("--denoise", type=float, default=0.6)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--chunk", type=int, default=8, help="videos per sampler call")
    parser.add_argument("--out", default=os.path.join(REPO, "output", "bench"))
    args = parser.parse_args(argv)
    if args.frames % 2:
        parser.error("--frames must be even: several videos share a sampler call and frame pairs must not cross them")

    info, _, model, table, _ = boot_demo()
    import comfy.sample
    import torch
    from fashion_data import to_image, to_latent
    from quality import metrics

    videos, classes = pan_videos(args.videos, args.frames)

    settings = [("none", {}), ("itm-cfg", {})]
    settings += [("itm-cfg", {"temporal_ratio": float(t)}) for t in args.temporal.split(",")]
    rows, reference = [], None
    for name, options in settings:
        patched = patched_model(model, name, options, args.ratio)
        start = time.perf_counter()
        outputs = []
        for first in range(0, args.videos, args.chunk):  # several videos per sampler call: [video, frame] rows
            chunk = range(first, min(first + args.chunk, args.videos))
            latent = model.model.process_latent_out(to_latent(videos[first:chunk.stop].flatten(0, 1)))
            noise = torch.cat([torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(v))
                               .expand(args.frames, -1, -1, -1) for v in chunk])
            cond = table[classes[first:chunk.stop]].repeat_interleave(args.frames, 0)[:, None, :]
            positive = [[cond.clone(), {}]]
            negative = [[table[-1][None, None, :].expand(len(cond), -1, -1).clone(), {}]]
            samples = comfy.sample.sample(patched, noise, args.steps, args.cfg, "euler", "normal", positive, negative,
                                          latent, denoise=args.denoise, disable_pbar=True, seed=first)
            outputs.append(to_image(model.model.process_latent_in(samples)).reshape(len(chunk), args.frames, 32, 32))
        seconds = time.perf_counter() - start
        frames = torch.cat(outputs)  # [V, F, 32, 32]
        if reference is None:
            reference = frames
        tag = name if name == "none" else f"{name}@{args.ratio:g}" + (
            f" + temporal {options['temporal_ratio']:g}" if options else " (spatial only)")
        row = {"setting": tag, "seconds": round(seconds, 1)}
        flat, ref = frames.flatten(0, 1), reference.flatten(0, 1)
        if name != "none":
            row["psnr"], row["psnr_ci"] = metrics.mean_ci(metrics.psnr(flat, ref))
            row["ssim"], row["ssim_ci"] = metrics.mean_ci(metrics.ssim(flat, ref))
        row["flicker"], row["flicker_ci"] = metrics.mean_ci(flicker(frames))
        rows.append(row)
        print(f"{tag:>40}: {seconds:6.1f}s  PSNR {row.get('psnr', float('inf')):6.2f} ± {row.get('psnr_ci', 0):.2f}  "  # noqa: T201
              f"SSIM {row.get('ssim', 1.0):.4f}  flicker {row['flicker']:.4f} ± {row['flicker_ci']:.4f}", flush=True)
    write(args, info["host"], rows, argv)
    return 0


def write(args, host, rows, argv):
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"temporal_{host.split(' ')[0]}")
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(stem + ".csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    command = "tests/bench_temporal.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"# Temporal sharing benchmark: demo model, host {host}", "", f"`{command.strip()}`", "",
             f"{args.videos} panning videos × {args.frames} frames (img2img, denoise {args.denoise}, euler "
             f"{args.steps} steps, cfg {args.cfg}; one noise draw per video). PSNR/SSIM: each frame against the "
             "unmerged output (mean ± 95% interval). Flicker: mean |Δ| between consecutive frames after undoing "
             "the 1-pixel pan (lower = steadier).", "",
             "| setting | PSNR (dB) | SSIM | flicker | time (s, CPU) |", "|---|---|---|---|---|"]
    for row in rows:
        psnr = f"{row['psnr']:.2f} ± {row['psnr_ci']:.2f}" if "psnr" in row else "—"
        ssim = f"{row['ssim']:.4f} ± {row['ssim_ci']:.4f}" if "ssim" in row else "—"
        lines.append(f"| {row['setting']} | {psnr} | {ssim} | {row['flicker']:.4f} ± {row['flicker_ci']:.4f} | "
                     f"{row['seconds']} |")
    with open(stem + ".md", "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
