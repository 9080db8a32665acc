"""Main job: run an example workflow headlessly through real ComfyUI, with and without importance token merging.

    python workflows/run.py [--workflow workflows/demo_fashion.json] [--out output/demo] [--ratio 0.5]

Default: workflows/demo_fashion.json, the pack's bundled demo model (a class-conditional Fashion-MNIST diffusion
model the pack trained on ComfyUI's own UNet; no checkpoint to download). The workflow (UI JSON, as saved by
ComfyUI) is converted to the API format and executed by ComfyUI's own PromptExecutor on the pinned host (or the
first root in COMFYUI_PATH), once per class and method: no merging (the merging node bypassed), random ToMe
(importance = random) and importance merging (importance = cfg) at the same ratio and seed. It writes
<out>/demo_grid.png, a labelled grid (a column per class, rows per method, plus the importance map that cfg
importance merging used halfway through sampling), the single images, and a timing line per method. Then, since
the demo model is too small for merging to save time, it times one sampling step of a full-size SD1.5 UNet (random
weights, ``--speed-size``, 512² by default, 0 skips it) with no merging, the built-in TomePatchModel and this pack.

Any other workflow (e.g. workflows/sd15_txt2img.json) runs as saved, with and without merging; its checkpoint must
be installed in that ComfyUI's models/checkpoints.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, HERE)

import comfy_harness  # noqa: E402  (test harness: boots ComfyUI in this process)
from ui_format import to_api_prompt  # noqa: E402

log = logging.getLogger("importance_tome.demo")
RECORDER = "ITMDemo_ImportanceRecorder"
METHODS = (("none", "no merging"), ("random", "random ToMe"), ("cfg", "importance (cfg)"))


class ImportanceRecorder:
    """Script-only node (not part of the pack): records |cond − uncond| of every step, as the pack computes it."""

    maps: list = []
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "demo"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    def patch(self, model):
        merging = comfy_harness.pack_module("merging")
        patched = model.clone()

        def record(args):
            uncond = args.get("uncond_denoised")
            if uncond is not None and bool(uncond.abs().amax() > 0):
                ImportanceRecorder.maps.append(merging.importance_map(args["cond_denoised"], uncond).cpu())
            return args["denoised"]

        patched.set_model_sampler_post_cfg_function(record)
        return (patched,)


def _bypass_merging(prompt: dict) -> dict:
    """The same prompt with every ITM_ merging node bypassed (its model input wired straight through)."""
    bypassed = json.loads(json.dumps(prompt))
    merging = {nid: node for nid, node in bypassed.items()
               if node["class_type"].startswith("ITM_ImportanceTokenMerging")}
    for nid, node in merging.items():
        source = node["inputs"]["model"]
        del bypassed[nid]
        for other in bypassed.values():
            for name, value in other["inputs"].items():
                if isinstance(value, list) and value[:1] == [nid]:
                    other["inputs"][name] = source
    return bypassed


def _nodes_of(prompt: dict, class_type: str) -> list:
    return [node for node in prompt.values() if node["class_type"] == class_type]


def _set_prefix(prompt: dict, prefix: str) -> None:
    for node in _nodes_of(prompt, "SaveImage"):
        node["inputs"]["filename_prefix"] = prefix


def _saved_images(ui: dict, out: str) -> list:
    files = []
    for result in ui.values():
        for image in result.get("images", []) if isinstance(result, dict) else []:
            files.append(os.path.join(out, image.get("subfolder", ""), image["filename"]))
    return files


def _insert_recorder(prompt: dict) -> None:
    """Put the recorder between the merging node and the sampler."""
    for nid, node in list(prompt.items()):
        if node["class_type"].startswith("ITM_ImportanceTokenMerging"):
            recorder_id = f"{nid}_recorder"
            prompt[recorder_id] = {"class_type": RECORDER, "inputs": {"model": [nid, 0]}}
            for other_id, other in prompt.items():
                if other_id != recorder_id and other["inputs"].get("model") == [nid, 0]:
                    other["inputs"]["model"] = [recorder_id, 0]


def heat(values):
    """[H, W] in [0, 1] → RGB uint8 array (black → purple → orange → yellow)."""
    import numpy as np

    anchors = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)
    position = np.clip(values, 0, 1) * (len(anchors) - 1)
    low = np.floor(position).astype(int).clip(0, len(anchors) - 2)
    frac = (position - low)[..., None]
    return (anchors[low] * (1 - frac) + anchors[low + 1] * frac).round().astype(np.uint8)


def demo_grid(prompt: dict, args, out: str) -> None:
    import numpy as np
    from PIL import Image, ImageDraw

    demo = comfy_harness.pack_module("nodes.demo_model")
    _insert_recorder(prompt)
    for node in _nodes_of(prompt, "ITM_ImportanceTokenMerging") + _nodes_of(prompt, "ITM_ImportanceTokenMergingAdvanced"):
        node["inputs"]["ratio"] = args.ratio
    for node in _nodes_of(prompt, "EmptyLatentImage"):
        node["inputs"]["batch_size"] = args.show  # only what the grid shows
    positive_id = _nodes_of(prompt, "KSampler")[0]["inputs"]["positive"][0]
    images, maps, timings = {}, {}, {}
    for method, _ in METHODS:
        variant = _bypass_merging(prompt) if method == "none" else json.loads(json.dumps(prompt))
        for node in variant.values():
            if node["class_type"].startswith("ITM_ImportanceTokenMerging"):
                node["inputs"]["importance"] = method
        timings[method] = 0.0
        for index, name in enumerate(demo.CLASSES):
            variant[positive_id]["inputs"]["text"] = name.split("/")[0].lower()
            _set_prefix(variant, f"{method}/{index}")
            ImportanceRecorder.maps = []
            start = time.perf_counter()
            ui = comfy_harness.run_prompt(variant)
            timings[method] += time.perf_counter() - start
            images[(method, index)] = [np.asarray(Image.open(f).convert("L")) for f in sorted(_saved_images(ui, out))]
            if method == "cfg" and ImportanceRecorder.maps:
                maps[index] = ImportanceRecorder.maps[len(ImportanceRecorder.maps) // 2][0].numpy()
        log.info("%-18s %d prompts of %d images: %.1f s", dict(METHODS)[method], len(demo.CLASSES),
                 len(images[(method, 0)]), timings[method])

    show = min(args.show, len(images[("none", 0)]))
    cell, label_w, head_h = 96, 150, 20
    rows = [(title, method, k) for method, title in METHODS for k in range(show)]
    height = head_h + (len(rows) + 1) * cell
    canvas = Image.new("RGB", (label_w + len(demo.CLASSES) * cell, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(demo.CLASSES):
        draw.text((label_w + j * cell + 4, 4), name, fill=(0, 0, 0))
    for i, (title, method, k) in enumerate(rows):
        y = head_h + i * cell
        if k == 0:
            draw.text((4, y + 4), title + (f" r={args.ratio:g}" if method != "none" else ""), fill=(0, 0, 0))
        draw.text((4, y + 20), f"seed {k}", fill=(90, 90, 90))
        for j in range(len(demo.CLASSES)):
            tile = Image.fromarray(images[(method, j)][k]).resize((cell, cell), Image.BILINEAR)
            canvas.paste(tile.convert("RGB"), (label_w + j * cell, y))
    y = head_h + len(rows) * cell
    draw.text((4, y + 4), "importance map", fill=(0, 0, 0))
    draw.text((4, y + 20), "(cfg, mid-sampling, seed 0)", fill=(90, 90, 90))
    for j, imap in maps.items():
        normalised = imap / max(float(imap.max()), 1e-8)
        tile = Image.fromarray(heat(normalised)).resize((cell, cell), Image.NEAREST)
        canvas.paste(tile, (label_w + j * cell, y))
    path = os.path.join(out, "demo_grid.png")
    canvas.save(path)
    log.info("grid: %s", path)
    log.info("timing (all %d classes): no merging %.1f s, random ToMe %.1f s (%.2fx), importance %.1f s (%.2fx)",
             len(demo.CLASSES), timings["none"], timings["random"], timings["none"] / timings["random"],
             timings["cfg"], timings["none"] / timings["cfg"])


def plain_workflow(prompt: dict, out: str) -> None:
    import folder_paths

    available = set(folder_paths.get_filename_list("checkpoints"))
    for node in _nodes_of(prompt, "CheckpointLoaderSimple"):
        if node["inputs"].get("ckpt_name") not in available:
            raise SystemExit(f"checkpoint {node['inputs'].get('ckpt_name')!r} is not installed in this ComfyUI's "
                             "models/checkpoints; the bundled demo runs without --workflow")
    plain = _bypass_merging(prompt)
    _set_prefix(prompt, "merged")
    _set_prefix(plain, "unmerged")
    timings = {}
    for name, variant in (("unmerged", plain), ("merged", prompt)):
        start = time.perf_counter()
        ui = comfy_harness.run_prompt(variant)
        timings[name] = time.perf_counter() - start
        log.info("%s: %s", name, ", ".join(_saved_images(ui, out)))
    log.info("timing (whole prompt): unmerged %.2f s, merged %.2f s, ratio %.2fx", timings["unmerged"],
             timings["merged"], timings["unmerged"] / timings["merged"])


def speed_check(args) -> None:
    """One sampling step of a full-size SD1.5-architecture UNet (860M parameters, random weights, ComfyUI's own
    classes) at ``--speed-size``: no merging, ComfyUI's built-in TomePatchModel and this pack, all at ``--ratio``, on
    the attention backend this ComfyUI runs. The demo model above is too small for merging to save time; this is
    what a real SD1.5 checkpoint's step costs. Each method samples two steps (the first builds the importance map
    and is not timed), in the order none, built-in, pack, then once more in reverse; the medians are compared."""
    import statistics

    import torch

    import bench_speed  # tests/bench_speed.py: the benchmark's own sampler loop and node helpers
    import nodes

    start = time.perf_counter()
    model, positive, negative = comfy_harness.full_sd15_model()
    latent = torch.zeros(1, 4, args.speed_size // 8, args.speed_size // 8)
    pack = nodes.NODE_CLASS_MAPPINGS["ITM_ImportanceTokenMerging"]()
    methods = [("no merging", model)]
    if "TomePatchModel" in nodes.NODE_CLASS_MAPPINGS:
        methods.append((f"built-in TomePatchModel r={args.ratio:g}", bench_speed.builtin_node(model, args.ratio)))
    methods.append((f"this pack r={args.ratio:g}", pack.patch(model, ratio=args.ratio, importance="cfg",
                                                             start_percent=0.0, end_percent=1.0, levels="auto",
                                                             scope="attention")[0]))
    times = {name: [] for name, _ in methods}
    with torch.inference_mode():
        for order in (methods, methods[::-1]):
            for name, patched in order:
                steps, _ = bench_speed.sample_steps(patched, positive, negative, latent, steps=2)
                times[name] += steps
    import comfy.ldm.modules.attention as attention_module
    import comfy.model_management

    base = statistics.median(times["no merging"])
    log.info("speed on a full-size SD1.5 UNet (random weights, %d², cond+uncond batch, attention %s, device %s): one "
             "sampling step, median of 2 interleaved runs (%.0f s in all):", args.speed_size,
             getattr(attention_module.optimized_attention, "__name__", "?"),
             comfy.model_management.get_torch_device(), time.perf_counter() - start)
    for name, values in times.items():
        median = statistics.median(values)
        log.info("  %-32s %6.2f s per step  %.2fx vs no merging", name, median, base / median)
    log.info("(the demo grid's timing above is on the tiny demo model, where merging saves little; on a GPU the "
             "speed-up depends on attention's share of a step there: see README \"Speed benchmark\")")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workflow", default=os.path.join(HERE, "demo_fashion.json"))
    parser.add_argument("--out", default=os.path.join(REPO, "output", "demo"))
    parser.add_argument("--ratio", type=float, default=0.5, help="merge ratio of the demo grid")
    parser.add_argument("--show", type=int, default=2, help="samples per class and method in the demo grid")
    parser.add_argument("--attention", choices=("pytorch", "auto"), default="pytorch",
                        help="pytorch: boot ComfyUI with --use-pytorch-cross-attention (PyTorch's SDPA; on CPU the "
                             "2024 host otherwise picks its much slower sub-quadratic attention); auto: ComfyUI's pick")
    parser.add_argument("--speed-size", type=int, default=512,
                        help="image size of the full-size SD1.5 speed check (one step per method); 0 skips it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    root = (os.environ.get("COMFYUI_PATH") or "").split(os.pathsep)[0] or comfy_harness.pinned_host_root()
    extra = ("--use-pytorch-cross-attention",) if args.attention == "pytorch" else ()
    info = comfy_harness.boot_with_pack(root, REPO, extra_args=extra)
    logging.getLogger().setLevel(logging.INFO)
    import folder_paths
    import nodes

    nodes.NODE_CLASS_MAPPINGS[RECORDER] = ImportanceRecorder
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    folder_paths.set_output_directory(out)
    with open(args.workflow, encoding="utf-8") as handle:
        workflow = json.load(handle)
    prompt = to_api_prompt(workflow, lambda t: nodes.NODE_CLASS_MAPPINGS[t].INPUT_TYPES())
    if not any(node["class_type"].startswith("ITM_ImportanceTokenMerging") for node in prompt.values()):
        raise SystemExit(f"{args.workflow} has no Importance Token Merging node")
    import comfy.ldm.modules.attention as attention_module

    log.info("host %s; workflow %s; attention %s", info["host"], os.path.relpath(args.workflow),
             getattr(attention_module.optimized_attention, "__name__", "?"))
    if _nodes_of(prompt, "ITM_DemoModelLoader"):
        demo_grid(prompt, args, out)
    else:
        plain_workflow(prompt, out)
    if args.speed_size:
        speed_check(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
