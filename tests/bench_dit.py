"""Speed benchmark of importance merging on DiTs (WAN 2.1, HunyuanVideo, Flux): no merging vs random ToMe vs importance.

    COMFYUI_PATH=../shared/hosts/comfyui-0.14.1 .venv/bin/python tests/bench_dit.py \\
        [--models wan@832x480x17,wan@832x480x33,hunyuan@848x480x17,flux@1024x1024] [--layers 2] \\
        [--ratios 0.3,0.5,0.7] [--reps 2] [--cfg 5] [--attention default|sdpa] [--out output/bench]

Blocks at their real width, random initialised weights, built by ComfyUI's own classes (current ComfyUI only):
WAN 2.1 1.3B (dim 1536, 12 heads, FFN 8960, 512 text tokens of width 4096; the real model has 30 blocks), LTX-Video
2B (``ltxv@WxHxF``: 32 heads of 64, 128 text tokens of width 4096; 28 blocks in the real model; latents compressed
8x in time and 32x in space, patch 1) and
HunyuanVideo (hidden 3072, 24 heads, MLP ×4, 256 text tokens of width 4096, pooled 768; the real model has 20
double-stream and 40 single-stream blocks: ``--layers`` n gives n of each) and Flux.1 dev (hidden 3072, 24 heads,
MLP ×4, 512 T5 tokens of width 4096, pooled 768; 19 double and 38 single blocks in the real model; ``flux@WxH``
specs have no frame count), SD3.5 large (width 2432, 38 heads, 154 text tokens of width 4096, pooled 2048; 38
joint blocks in the real model; ``sd3@WxH``), Qwen-Image (``qwen@WxH``), Z-Image (``zimage@WxH``, attention site
only) and PixArt-alpha XL/2 (``pixart@WxH``; the paper's blocks: the middle half of ``--layers``). A CPU run uses
``--layers`` of them (default 2): every block does the same work, so the speed-up of the blocks is the model's (patch embedding and head
are a fraction of a percent). Each measurement is one model evaluation (a cond+uncond batch; one row at ``--cfg 1``,
where the importance rows use ``cfg1_mode = change``) inside ComfyUI's own sampler after the first step (importance
capture and matching included); methods run interleaved after a warm-up round; medians with min–max over reps ×
timed steps.

Also reported: the share of an unmerged evaluation spent in the self-attention kernel (timed through ComfyUI's
attention override) and the ideal speed-up of each site, with L = T + I text and image tokens in the kernel (WAN:
T = 0, its text enters by cross-attention) and L' = T + (1 − r) I: attention, kernel × (1 − (L'/L)²); transformer
(whole blocks, ``--scopes attention,transformer``), that plus the rest × r I / L, an upper bound since the rest also
holds the embeddings and the head; achieved / ideal.
Writes <out>/speed_<families>_<host>_cpu[_sdpa].md and .csv.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import bench_speed  # noqa: E402
import comfy_harness as H  # noqa: E402

WAN_13B = dict(dim=1536, heads=12, ffn_dim=8960, text_dim=4096)


def build_wan(layers: int, seed: int = 0):
    import torch
    import comfy.supported_models

    config = H.wan_config(layers=layers, **WAN_13B)
    model = H._build(comfy.supported_models.WAN21_T2V, config, seed)
    g = torch.Generator().manual_seed(seed + 1)
    positive = [[torch.randn(1, 512, WAN_13B["text_dim"], generator=g), {}]]
    negative = [[torch.randn(1, 512, WAN_13B["text_dim"], generator=g), {}]]
    return model, positive, negative


HUNYUAN = dict(hidden=3072, heads=24, text_dim=4096, pooled_dim=768)


def build_hunyuan(layers: int, seed: int = 0):
    import torch
    import comfy.supported_models

    config = H.hunyuan_config(double=layers, single=layers, **HUNYUAN)
    config["mlp_ratio"], config["axes_dim"] = 4.0, [16, 56, 56]
    model = H._build(comfy.supported_models.HunyuanVideo, config, seed)
    g = torch.Generator().manual_seed(seed + 1)
    conds = [[[torch.randn(1, 256, HUNYUAN["text_dim"], generator=g),
               {"pooled_output": torch.randn(1, HUNYUAN["pooled_dim"], generator=g)}]] for _ in range(2)]
    return model, conds[0], conds[1]


FLUX_DEV = dict(hidden=3072, heads=24, text_dim=4096, pooled_dim=768)


def build_flux(layers: int, seed: int = 0):
    import torch
    import comfy.supported_models

    config = H.flux_config(double=layers, single=layers, **FLUX_DEV)
    config["mlp_ratio"], config["axes_dim"] = 4.0, [16, 56, 56]
    model = H._build(comfy.supported_models.Flux, config, seed)
    g = torch.Generator().manual_seed(seed + 1)
    conds = [[[torch.randn(1, 512, FLUX_DEV["text_dim"], generator=g),
               {"pooled_output": torch.randn(1, FLUX_DEV["pooled_dim"], generator=g), "guidance": 3.5}]]
             for _ in range(2)]
    return model, conds[0], conds[1]


def build_sd3(layers: int, seed: int = 0):
    """SD3.5 large blocks: depth 38 sets the width (64 x 38 = 2432, 38 heads); ``layers`` of its 38 joint blocks."""
    import torch
    import comfy.supported_models

    config = H.sd3_config(depth=38, text_dim=4096, pooled_dim=2048, attn2_layers=(), pos_embed_max_size=192,
                          num_blocks=layers)
    model = H._build(comfy.supported_models.SD3, config, seed)
    g = torch.Generator().manual_seed(seed + 1)
    conds = [[[torch.randn(1, 154, 4096, generator=g), {"pooled_output": torch.randn(1, 2048, generator=g)}]]
             for _ in range(2)]  # CLIP-L/G (77) + T5 (77) tokens
    return model, conds[0], conds[1]


def build_qwen(layers: int, seed: int = 0):
    """Qwen-Image blocks (width 3072 = 24 heads of 128, text width 3584; 60 blocks in the real model) with 256
    text tokens (the prompt's length varies; 256 is a long prompt with the chat template)."""
    import torch
    import comfy.supported_models
    config = H.qwen_config(layers=layers, heads=24, head_dim=128, text_dim=3584)
    config["axes_dims_rope"] = [16, 56, 56]
    model = H._build(comfy.supported_models.QwenImage, config, seed)
    g = torch.Generator().manual_seed(seed + 1)
    conds = [[[torch.randn(1, 256, 3584, generator=g), {}]] for _ in range(2)]
    return model, conds[0], conds[1]


def build_zimage(layers: int, seed: int = 0):
    """Z-Image main layers (width 3840 = 30 heads of 128, text width 2560, FFN 10240; 30 main layers in the real
    model) with 128 text tokens (a multiple of 32, as Z-Image pads them). The 2 + 2 refiner layers of the real model
    (text alone, image alone; never merged) are left out, so the timed layers all do the same work."""
    import torch
    import comfy.supported_models
    config = H.lumina_config(layers=layers, heads=30, head_dim=128, text_dim=2560, zimage=True)
    config.update(n_refiner_layers=0, multiple_of=256, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])
    model = H._build(comfy.supported_models.ZImage, config, seed)
    g = torch.Generator().manual_seed(seed + 1)
    conds = [[[torch.randn(1, 128, 2560, generator=g), {}]] for _ in range(2)]
    return model, conds[0], conds[1]


def build_pixart(layers: int, seed: int = 0):
    """PixArt-alpha XL/2 blocks (width 1152, 16 heads, MLP x4, 120 T5 tokens of width 4096, micro-conditions; 28
    blocks in the real model, of which the paper merges 7-20: ``levels = auto`` merges the same share of ``layers``)."""
    import torch
    import comfy.supported_models
    config = H.pixart_config(depth=layers, hidden=1152, heads=16, patch=2, text_dim=4096, text_tokens=120)
    config.update(mlp_ratio=4.0, input_size=128, pe_interpolation=2.0)
    model = H._build(comfy.supported_models.PixArtAlpha, config, seed)
    g = torch.Generator().manual_seed(seed + 1)
    conds = [[[torch.randn(1, 120, 4096, generator=g), {}]] for _ in range(2)]
    return model, conds[0], conds[1]


LTXV_2B = dict(heads=32, head_dim=64, text_dim=4096)


def build_ltxv(layers: int, seed: int = 0):
    import torch
    import comfy.supported_models

    config = H.ltxv_config(layers=layers, **LTXV_2B)
    model = H._build(comfy.supported_models.LTXV, config, seed)
    g = torch.Generator().manual_seed(seed + 1)
    conds = [[[torch.randn(1, 128, LTXV_2B["text_dim"], generator=g),
               {"attention_mask": torch.ones(1, 128, dtype=torch.long)}]] for _ in range(2)]
    return model, conds[0], conds[1]


BUILDERS = {"wan": build_wan, "ltxv": build_ltxv, "hunyuan": build_hunyuan, "flux": build_flux, "sd3": build_sd3,
            "qwen": build_qwen,
            "zimage": build_zimage, "pixart": build_pixart}
# latents [1, C, H/8, W/8]: model specs are arch@WxH
IMAGE_MODELS = {"flux": 16, "sd3": 16, "qwen": 16, "zimage": 16, "pixart": 4}
# text tokens in the self-attention (never merged; PixArt's text enters by cross-attention)
TEXT_TOKENS = {"wan": 0, "ltxv": 0, "hunyuan": 256, "flux": 512, "sd3": 154, "qwen": 256, "zimage": 128, "pixart": 0}


def pixart_kernel_share(model, positive, negative, latent, cfg=5.0):
    """:func:`kernel_share` for PixArt, whose attention calls carry no transformer_options: the self-attention
    kernel calls (``skip_reshape``; cross-attention's are not) are timed by wrapping the PixArt blocks module's
    ``optimized_attention`` for these two evaluations only (benchmark process, restored after)."""
    import comfy.ldm.pixart.blocks as blocks

    spent = {"kernel": 0.0}
    original = blocks.optimized_attention

    def timing(*args, **kwargs):
        start = time.perf_counter()
        out = original(*args, **kwargs)
        if kwargs.get("skip_reshape"):
            spent["kernel"] += time.perf_counter() - start
        return out

    blocks.optimized_attention = timing
    try:
        start = time.perf_counter()
        bench_speed.sample_steps(model, positive, negative, latent, steps=2, cfg=cfg)
        return spent["kernel"], time.perf_counter() - start
    finally:
        blocks.optimized_attention = original


def kernel_share(model, positive, negative, latent, cfg=5.0):
    """Seconds in the self-attention kernel (the first attention call of each block; in models that do not say
    which block a call belongs to, SD3 and LTX-Video, every call whose queries and keys have the same length) and in
    total, over two unmerged evaluations."""
    spent = {"kernel": 0.0}
    seen = {"key": None}

    def timing(func, *args, **kwargs):
        extra = kwargs.get("transformer_options") or {}
        key = (id(extra), extra.get("block_type"), extra.get("block_index"))
        first, seen["key"] = key != seen["key"], key
        if extra.get("block_index") is None:
            axis = 2 if kwargs.get("skip_reshape") else 1
            first = args[0].shape[axis] == args[1].shape[axis]
        start = time.perf_counter()
        out = func(*args, **kwargs)
        if first:
            spent["kernel"] += time.perf_counter() - start
        return out

    timed = model.clone()
    timed.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = timing
    start = time.perf_counter()
    bench_speed.sample_steps(timed, positive, negative, latent, steps=2, cfg=cfg)
    return spent["kernel"], time.perf_counter() - start


# PixArt's attention site also runs the self-attention's q / k / v and output projections (4 C² per token) on merged
# tokens: their share of a block's non-kernel work (q / k / v / out 4 C², cross-attention q / out 2 C² + keys and
# values of 120 text tokens, MLP 8 C²), counted in multiply-adds
PIXART_PROJECTIONS = 4 / (4 + 2 + 8)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="wan@832x480x17")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--ratios", default="0.5")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="sampler steps per run; the first is not timed")
    parser.add_argument("--cfg", type=float, default=5.0,
                        help="cfg scale (1: one row per evaluation, as Flux dev / distilled video models run)")
    parser.add_argument("--attention", choices=("default", "sdpa"), default="default")
    parser.add_argument("--variants", default="",
                        help="node settings compared in the same interleaved runs, 'label:key=value;key=value' "
                             "separated by commas (the Advanced node's inputs), e.g. "
                             "'prop:proportional_attention=true,plain:proportional_attention=false'; "
                             "default: the simple node's defaults")
    parser.add_argument("--scopes", default="attention",
                        help="merge sites: attention (self-attention kernel), transformer (whole blocks)")
    parser.add_argument("--out", default=os.path.join(REPO, "output", "bench"))
    args = parser.parse_args(argv)
    root = (os.environ.get("COMFYUI_PATH") or "").split(os.pathsep)[0]
    if not root:
        print("video DiTs need current ComfyUI: set COMFYUI_PATH", file=sys.stderr)  # noqa: T201
        return 1
    extra = ("--use-pytorch-cross-attention",) if args.attention == "sdpa" else ()
    info = H.boot_with_pack(root, REPO, cpu=True, extra_args=extra)
    import platform

    import torch
    import comfy.ldm.modules.attention as attention_module
    import nodes

    device = f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()}, fp32)"
    backend = getattr(attention_module.optimized_attention, "__name__", "?")
    node = nodes.NODE_CLASS_MAPPINGS["ITM_ImportanceTokenMerging"]()
    advanced = nodes.NODE_CLASS_MAPPINGS["ITM_ImportanceTokenMergingAdvanced"]()
    spec = advanced.INPUT_TYPES()
    advanced_defaults = {name: (options[1]["default"] if len(options) > 1 and "default" in options[1]
                                else options[0][0])
                         for group in ("required", "optional") for name, options in spec.get(group, {}).items()
                         if name != "model"}
    ratios = [float(r) for r in args.ratios.split(",")]
    variants = [("", {})]
    if args.variants:
        variants = []
        for item in args.variants.split(","):
            label, _, settings = item.partition(":")
            overrides = {}
            for pair in filter(None, settings.split(";")):
                key, value = pair.split("=", 1)
                kind = type(advanced_defaults[key])
                overrides[key] = value.lower() == "true" if kind is bool else kind(value)
            variants.append((label, overrides))
    rows = []
    for spec in args.models.split(","):
        arch, size = spec.split("@")
        if arch in IMAGE_MODELS:
            width, height = (int(v) for v in size.split("x"))
            latent = torch.zeros(1, IMAGE_MODELS[arch], height // 8, width // 8)
            if arch == "qwen":  # Qwen-Image's latent has a frame axis
                latent = latent[:, :, None]
        elif arch == "ltxv":  # 128 channels, 8x time and 32x space compression, patch 1
            width, height, length = (int(v) for v in size.split("x"))
            latent = torch.zeros(1, 128, (length - 1) // 8 + 1, height // 32, width // 32)
        else:
            width, height, length = (int(v) for v in size.split("x"))
            latent = torch.zeros(1, 16, (length - 1) // 4 + 1, height // 8, width // 8)
        tokens = latent[0, 0].numel() // (1 if arch == "ltxv" else 4)  # 2x2 patches (per frame); LTX-Video: 1
        model, positive, negative = BUILDERS[arch](args.layers)
        methods = [("none", 0.0, model)]
        levels = {}  # (method, ratio) -> its levels setting (PixArt: which blocks merge)
        for ratio in ratios:
            for scope in args.scopes.split(","):
                for importance in ("random", "cfg"):
                    for label, overrides in variants:
                        settings = dict(ratio=ratio, importance=importance, start_percent=0.0, end_percent=1.0,
                                        levels="auto", scope=scope)
                        if args.cfg == 1.0 and importance == "cfg":  # no uncond pass: the CFG-free source
                            overrides = dict(overrides, cfg1_mode="change")
                        if overrides:
                            inputs = dict(advanced_defaults, **dict(settings, **overrides))
                            (patched,) = advanced.patch(model, **inputs)
                        else:
                            (patched,) = node.patch(model, **settings)
                        suffix = ("-transformer" if scope == "transformer" else "") + (f"[{label}]" if label else "")
                        methods.append((f"itm-{importance}{suffix}", ratio, patched))
                        levels[methods[-1][:2]] = overrides.get("levels", settings["levels"])
        label = f"{arch}@{size} ({args.layers} blocks, {tokens} tokens)"
        print(f"[{label}] warm-up", flush=True)  # noqa: T201
        bench_speed.sample_steps(model, positive, negative, latent, steps=2, cfg=args.cfg)
        times = {(name, ratio): [] for name, ratio, _ in methods}
        for rep in range(args.reps):
            for name, ratio, patched in methods:
                steps, _ = bench_speed.sample_steps(patched, positive, negative, latent, steps=args.steps, cfg=args.cfg)
                times[(name, ratio)] += steps
                print(f"[{label}] rep {rep + 1}/{args.reps} {name:>10} r={ratio:.1f}: "  # noqa: T201
                      + ", ".join(f"{s:.2f}s" for s in steps), flush=True)
        kernel, total = (pixart_kernel_share if arch == "pixart" else kernel_share)(model, positive, negative, latent,
                                                                                  cfg=args.cfg)
        share = kernel / total if total else 0.0
        base = statistics.median(times[("none", 0.0)])
        for (name, ratio), values in times.items():
            med = statistics.median(values)
            if name == "none":
                ideal = 0.0
            else:  # the kernel scales with L^2, L = text + image tokens; only image tokens merge
                text = TEXT_TOKENS[arch]
                kernel_saving = 1 - ((text + (1 - ratio) * tokens) / (text + tokens)) ** 2
                ideal = share * kernel_saving
                if "-transformer" in name:  # upper bound: everything but the kernel counted as block work
                    ideal += (1 - share) * ratio * tokens / (text + tokens)
                elif arch == "pixart":  # PixArt's attention site merges before the q / k / v projections too
                    ideal += (1 - share) * ratio * PIXART_PROJECTIONS
                if arch == "pixart":  # only the merged blocks save
                    merged = H.pack_module("nodes.pixart").merged_blocks(args.layers, levels[(name, ratio)])
                    ideal *= len(merged) / args.layers
            rows.append({
                "model": f"{arch}@{size}", "blocks": args.layers, "tokens": tokens, "method": name, "ratio": ratio,
                "s_per_eval": bench_speed.fmt(values), "median_s": round(med, 3),
                "speedup_vs_none": round(base / med, 3),
                "ideal_speedup": round(1 / (1 - ideal), 3) if ideal else "",
                "achieved_over_ideal": round((1 - med / base) / ideal, 3) if ideal else "",
                "kernel_share": round(share, 3),
            })
        del model, methods
    os.makedirs(args.out, exist_ok=True)
    family = "_".join(sorted({spec.split("@")[0] for spec in args.models.split(",")}))
    stem = os.path.join(args.out, f"speed_{family}_{info['host'].split(' ')[0]}_cpu"
                        + ("_sdpa" if args.attention == "sdpa" else ""))
    with open(stem + ".csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# Video DiT speed: {info['host']}, {device}, attention {backend}", "",
             f"`{' '.join(['tests/bench_dit.py'] + (argv if argv is not None else sys.argv[1:]))}`", "",
             "| model | method | ratio | s / eval (median, min–max) | speed-up | ideal of the site | "
             "achieved / ideal | kernel share |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} ({r['blocks']} blocks, {r['tokens']} tokens) | {r['method']} | {r['ratio']} | "
                     f"{r['s_per_eval']} | {r['speedup_vs_none']}× | {r['ideal_speedup']} | "
                     f"{r['achieved_over_ideal']} | {r['kernel_share']} |")
    with open(stem + ".md", "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
