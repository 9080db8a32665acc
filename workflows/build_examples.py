"""Regenerate the example workflows in this folder from the node schemas of a real ComfyUI.

    python workflows/build_examples.py            # pinned host, or COMFYUI_PATH's first root

The JSON files are committed; tests/test_workflows.py checks them against the registered schemas on every host.
"""
from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, HERE)

from ui_format import WorkflowBuilder  # noqa: E402

SD15 = "v1-5-pruned-emaonly.safetensors"
SDXL = "sd_xl_base_1.0.safetensors"
POSITIVE = "a lighthouse on a cliff at sunset, detailed, dramatic clouds"
NEGATIVE = "blurry, low quality"
MERGE = dict(ratio=0.5, importance="cfg", start_percent=0.0, end_percent=1.0, levels="auto", scope="attention")


def schema_from_host():
    import nodes

    def schema(class_type):
        cls = nodes.NODE_CLASS_MAPPINGS[class_type]
        return cls.INPUT_TYPES(), tuple(cls.RETURN_TYPES), tuple(getattr(cls, "RETURN_NAMES", None) or ())

    return schema


def txt2img(schema, ckpt, size, steps, note, hires=False, img2img=False):
    b = WorkflowBuilder(schema)
    loader = b.add("CheckpointLoaderSimple", (40, 180), ckpt_name=ckpt)
    merge = b.add("ITM_ImportanceTokenMerging", (420, 40), **MERGE)
    pos = b.add("CLIPTextEncode", (420, 300), title="Positive", text=POSITIVE)
    neg = b.add("CLIPTextEncode", (420, 520), title="Negative", text=NEGATIVE)
    b.link(loader, 0, merge, "model")
    b.link(loader, 1, pos, "clip")
    b.link(loader, 1, neg, "clip")
    if img2img:
        image = b.add("LoadImage", (40, 520), image="example.png")
        encode = b.add("VAEEncode", (420, 740))
        b.link(image, 0, encode, "pixels")
        b.link(loader, 2, encode, "vae")
        latent_source, denoise = encode, 0.6
    else:
        latent_source = b.add("EmptyLatentImage", (420, 740), width=size, height=size, batch_size=1)
        denoise = 1.0
    sampler = b.add("KSampler", (840, 180), seed=0, steps=steps, cfg=7.0, sampler_name="euler",
                    scheduler="normal", denoise=denoise)
    for source, slot, name in ((merge, 0, "model"), (pos, 0, "positive"), (neg, 0, "negative"),
                               (latent_source, 0, "latent_image")):
        b.link(source, slot, sampler, name)
    last = sampler
    if hires:
        upscale = b.add("LatentUpscaleBy", (1240, 40), upscale_method="nearest-exact", scale_by=1.5)
        second = b.add("KSampler", (1240, 220), title="KSampler (hires pass)", seed=0, steps=steps, cfg=7.0,
                       sampler_name="euler", scheduler="normal", denoise=0.5)
        b.link(sampler, 0, upscale, "samples")
        for source, slot, name in ((merge, 0, "model"), (pos, 0, "positive"), (neg, 0, "negative"),
                                   (upscale, 0, "latent_image")):
            b.link(source, slot, second, name)
        last = second
    decode = b.add("VAEDecode", (1640, 180))
    b.link(last, 0, decode, "samples")
    b.link(loader, 2, decode, "vae")
    save = b.add("SaveImage", (1900, 180), filename_prefix="importance_tome")
    b.link(decode, 0, save, "images")
    return b.workflow(note)


def demo(schema):
    """The main job's workflow: the bundled Fashion-MNIST demo model, no checkpoint needed."""
    b = WorkflowBuilder(schema)
    loader = b.add("ITM_DemoModelLoader", (40, 180))
    merge = b.add("ITM_ImportanceTokenMerging", (420, 40), **MERGE)
    pos = b.add("CLIPTextEncode", (420, 300), title="Positive (a Fashion-MNIST class)", text="sneaker")
    neg = b.add("CLIPTextEncode", (420, 520), title="Negative (empty = unconditional)", text="")
    b.link(loader, 0, merge, "model")
    b.link(loader, 1, pos, "clip")
    b.link(loader, 1, neg, "clip")
    latent = b.add("EmptyLatentImage", (420, 740), width=256, height=256, batch_size=4)
    sampler = b.add("KSampler", (840, 180), seed=0, steps=20, cfg=4.0, sampler_name="euler", scheduler="normal",
                    denoise=1.0)
    for source, slot, name in ((merge, 0, "model"), (pos, 0, "positive"), (neg, 0, "negative"),
                               (latent, 0, "latent_image")):
        b.link(source, slot, sampler, name)
    decode = b.add("VAEDecode", (1240, 180))
    b.link(sampler, 0, decode, "samples")
    b.link(loader, 2, decode, "vae")
    save = b.add("SaveImage", (1500, 180), filename_prefix="importance_tome_demo")
    b.link(decode, 0, save, "images")
    return b.workflow("The pack's bundled demo model (class-conditional Fashion-MNIST, trained by the pack): put a "
                      "class name in the positive prompt (t-shirt, trouser, pullover, dress, coat, sandal, shirt, "
                      "sneaker, bag, ankle boot). 256x256 = one 32x32 latent, 1024 tokens at the merged level.")


def examples(schema):
    return {
        "demo_fashion.json": demo(schema),
        "sd15_txt2img.json": txt2img(schema, SD15, 768, 25, "SD1.5 text to image at 768x768 with importance token "
                                     "merging at ratio 0.5 on the latent-resolution attention blocks."),
        "sdxl_txt2img.json": txt2img(schema, SDXL, 1024, 25, "SDXL text to image at 1024x1024: 'auto' merges the "
                                     "64x64-token attention blocks (SDXL has none at latent resolution)."),
        "sd15_hires_fix.json": txt2img(schema, SD15, 512, 20, "Hires fix: one merged model, two samplers; the "
                                       "second pass at 1.5x runs with its own importance maps.", hires=True),
        "sd15_img2img.json": txt2img(schema, SD15, 512, 25, "img2img at denoise 0.6: put your picture in "
                                     "ComfyUI's input folder as example.png or pick another.", img2img=True),
    }


def main():
    import comfy_harness

    root = (os.environ.get("COMFYUI_PATH") or "").split(os.pathsep)[0] or comfy_harness.pinned_host_root()
    comfy_harness.boot_with_pack(root, REPO)
    for name, workflow in examples(schema_from_host()).items():
        with open(os.path.join(HERE, name), "w", encoding="utf-8") as handle:
            json.dump(workflow, handle, indent=1)
            handle.write("\n")
        print(f"wrote workflows/{name}")  # noqa: T201 (a command-line tool)


if __name__ == "__main__":
    main()
