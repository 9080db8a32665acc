"""Regenerate the example workflows in this folder from the node schemas of a real ComfyUI.

    python workflows/build_examples.py            # pinned host, or COMFYUI_PATH's first root
    COMFYUI_PATH=../shared/hosts/comfyui-0.14.1 ITM_ADE_PATH=/path/to/ComfyUI-AnimateDiff-Evolved \
        python workflows/build_examples.py        # also writes sd15_animatediff.json

The JSON files are committed; tests/test_workflows.py checks them against the registered schemas on every host.

sd15_animatediff.json uses the nodes of ComfyUI-AnimateDiff-Evolved (ADE), a third-party pack that registers them
only when it is loaded: it is written only when ``ITM_ADE_PATH`` names a work tree of ADE (loaded into the host as a
custom node; ADE needs current ComfyUI, so COMFYUI_PATH too). Without it the committed file is left as it is.
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
WAN_MERGE = dict(MERGE)  # attention site: whole blocks are faster but far less faithful (README "Video DiTs")
# workflows whose core node types exist only in current ComfyUI: written only when booted on one (COMFYUI_PATH),
# skipped with a reason by tests/test_workflows.py on the 2024 host
CURRENT_ONLY = ("demo_video.json", "wan21_t2v.json", "wan22_i2v.json", "hunyuan_t2v.json", "flux_dev_t2i.json",
                "demo_dit.json", "sd35_t2i.json", "qwen_image_t2i.json", "zimage_turbo_t2i.json",
                "pixart_sigma_t2i.json", "ltxv_t2v.json")
FLUX_MERGE = dict(MERGE, scope="transformer")  # README "Image DiTs": attention is a small share of a Flux block
WAN_NEGATIVE = "static, blurry, low quality, distorted, still picture, worst quality, jpeg artifacts"


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


def sample_decode_save(b, model, positive, negative, latent, vae, prefix, **sampler):
    """KSampler → VAEDecode → SaveImage; every source is a (node, output slot) pair."""
    sampler = b.add("KSampler", (840, 180), **dict(dict(seed=0, sampler_name="euler", scheduler="normal",
                                                        denoise=1.0), **sampler))
    for (source, slot), name in ((model, "model"), (positive, "positive"), (negative, "negative"),
                                 (latent, "latent_image")):
        b.link(source, slot, sampler, name)
    decode = b.add("VAEDecode", (1240, 180))
    b.link(sampler, 0, decode, "samples")
    b.link(vae[0], vae[1], decode, "vae")
    save = b.add("SaveImage", (1500, 180), filename_prefix=prefix)
    b.link(decode, 0, save, "images")


def demo_model_nodes(b, prompt, x, y):
    """The demo model's loader, the merging node and the two prompts (the class name; empty = unconditional), linked;
    ``y`` = rows of the merging node and the prompts in column ``x``."""
    loader = b.add("ITM_DemoModelLoader", (40, 180))
    merge = b.add("ITM_ImportanceTokenMerging", (x, y[0]), **MERGE)
    pos = b.add("CLIPTextEncode", (x, y[1]), title="Positive (a Fashion-MNIST class)", text=prompt)
    neg = b.add("CLIPTextEncode", (x, y[2]), title="Negative (empty = unconditional)", text="")
    b.link(loader, 0, merge, "model")
    b.link(loader, 1, pos, "clip")
    b.link(loader, 1, neg, "clip")
    return loader, merge, pos, neg


def demo(schema):
    """The main job's workflow: the bundled Fashion-MNIST demo model, no checkpoint needed."""
    b = WorkflowBuilder(schema)
    loader, merge, pos, neg = demo_model_nodes(b, "sneaker", x=420, y=(40, 300, 520))
    latent = b.add("EmptyLatentImage", (420, 740), width=256, height=256, batch_size=4)
    sample_decode_save(b, (merge, 0), (pos, 0), (neg, 0), (latent, 0), (loader, 2), "importance_tome_demo",
                       steps=20, cfg=4.0)
    return b.workflow("The pack's bundled demo model (class-conditional Fashion-MNIST, trained by the pack): put a "
                      "class name in the positive prompt (t-shirt, trouser, pullover, dress, coat, sandal, shirt, "
                      "sneaker, bag, ankle boot). 256x256 = one 32x32 latent, 1024 tokens at the merged level.")


def demo_preview(schema):
    """The demo with the Token Merging Preview node: what was merged, over the sampled images."""
    b = WorkflowBuilder(schema)
    loader, merge, pos, neg = demo_model_nodes(b, "ankle boot", x=380, y=(40, 470, 700))
    latent = b.add("EmptyLatentImage", (40, 460), width=256, height=256, batch_size=2)
    sampler = b.add("KSampler", (760, 40), seed=0, steps=20, cfg=4.0, sampler_name="euler", scheduler="normal",
                    denoise=1.0)
    for (source, slot), name in (((merge, 0), "model"), ((pos, 0), "positive"), ((neg, 0), "negative"),
                                 ((latent, 0), "latent_image")):
        b.link(source, slot, sampler, name)
    decode = b.add("VAEDecode", (760, 340))
    b.link(sampler, 0, decode, "samples")
    b.link(loader, 2, decode, "vae")
    preview = b.add("ITM_MergePreview", (760, 460), step=-1, level="first", opacity=0.6)
    b.link(merge, 0, preview, "model")
    b.link(decode, 0, preview, "images")
    for slot, (x, title) in enumerate(((1100, "Importance map (last step)"), (1420, "Merge map (last step)"))):
        shown = b.add("PreviewImage", (x, 40), title=title)
        b.link(preview, slot, shown, "images")
    save = b.add("SaveImage", (1100, 420), filename_prefix="importance_tome_demo")
    b.link(decode, 0, save, "images")
    return b.workflow("The demo model with the Token Merging Preview: the importance map (bright = where the prompt "
                      "matters) and the merge map (green kept, yellow destination, blue merged away) of the last step, "
                      "over the sampled images. While the sampler runs, the merging node shows the latest step live.")


def video(schema, kind):
    """Image-to-video (SVD), orbit views (SV3D) and novel views (Stable Zero123): frames or views are the latent
    batch, each merged with its own importance map."""
    b = WorkflowBuilder(schema)
    ckpt = {"svd": "svd_xt.safetensors", "sv3d": "sv3d_u.safetensors", "zero123": "stable_zero123.ckpt"}[kind]
    loader = b.add("ImageOnlyCheckpointLoader", (40, 180), ckpt_name=ckpt)
    image = b.add("LoadImage", (40, 460), image="example.png")
    if kind == "svd":
        cond = b.add("SVD_img2vid_Conditioning", (420, 300), width=1024, height=576, video_frames=25,
                     motion_bucket_id=127, fps=6, augmentation_level=0.0)
        guided = b.add("VideoLinearCFGGuidance", (420, 40), min_cfg=1.0)
        b.link(loader, 0, guided, "model")
        model_source, cfg, steps, size = guided, 2.5, 20, None
    elif kind == "sv3d":
        cond = b.add("SV3D_Conditioning", (420, 300), width=576, height=576, video_frames=21, elevation=0.0)
        guided = b.add("VideoTriangleCFGGuidance", (420, 40), min_cfg=1.0)
        b.link(loader, 0, guided, "model")
        model_source, cfg, steps, size = guided, 2.5, 20, None
    else:
        cond = b.add("StableZero123_Conditioning_Batched", (420, 300), width=256, height=256, batch_size=4,
                     elevation=0.0, azimuth=0.0, elevation_batch_increment=0.0, azimuth_batch_increment=90.0)
        model_source, cfg, steps = loader, 4.0, 30
    b.link(loader, 1, cond, "clip_vision")
    b.link(image, 0, cond, "init_image")
    b.link(loader, 2, cond, "vae")
    merge = b.add("ITM_ImportanceTokenMerging", (840, 40), **MERGE)
    b.link(model_source, 0, merge, "model")
    sampler = b.add("KSampler", (840, 300), seed=0, steps=steps, cfg=cfg, sampler_name="euler",
                    scheduler="karras" if kind != "zero123" else "normal", denoise=1.0)
    b.link(merge, 0, sampler, "model")
    b.link(cond, 0, sampler, "positive")
    b.link(cond, 1, sampler, "negative")
    b.link(cond, 2, sampler, "latent_image")
    decode = b.add("VAEDecode", (1240, 300))
    b.link(sampler, 0, decode, "samples")
    b.link(loader, 2, decode, "vae")
    save = b.add("SaveImage", (1500, 300), filename_prefix=f"importance_tome_{kind}")  # one PNG per frame / view
    b.link(decode, 0, save, "images")
    notes = {
        "svd": "Stable Video Diffusion image to video (25 frames at 1024x576): every frame is merged with its own "
               "importance map; temporal attention is left alone. Put your image in ComfyUI's input folder.",
        "sv3d": "SV3D orbit (21 views at 576x576): each view of the orbit is merged with its own importance map.",
        "zero123": "Stable Zero123 novel views (4 views, 90 degrees apart): each view is a latent of the batch and is "
                   "merged with its own map. For Zero123++-style tiled views in one image use the Advanced node's "
                   "tiles input (3x2).",
    }
    return b.workflow(notes[kind])


def demo_transformer(schema, loader_type, prompt, latent, scheduler, shown_title):
    """A bundled demo transformer (video or image DiT): loader → merging node → KSampler → decode, with the Token
    Merging Preview's merge map; ``latent`` = (node type, inputs). Returns (builder, decoded images node)."""
    b = WorkflowBuilder(schema)
    loader = b.add(loader_type, (40, 180))
    merge = b.add("ITM_ImportanceTokenMerging", (380, 40), **MERGE)
    pos = b.add("CLIPTextEncode", (380, 470), title="Positive (a Fashion-MNIST class)", text=prompt)
    neg = b.add("CLIPTextEncode", (380, 700), title="Negative (empty = unconditional)", text="")
    b.link(loader, 0, merge, "model")
    b.link(loader, 1, pos, "clip")
    b.link(loader, 1, neg, "clip")
    empty = b.add(latent[0], (40, 460), **latent[1])
    sampler = b.add("KSampler", (760, 40), seed=0, steps=20, cfg=4.0, sampler_name="euler", scheduler=scheduler,
                    denoise=1.0)
    for (source, slot), name in (((merge, 0), "model"), ((pos, 0), "positive"), ((neg, 0), "negative"),
                                 ((empty, 0), "latent_image")):
        b.link(source, slot, sampler, name)
    decode = b.add("VAEDecode", (760, 340))
    b.link(sampler, 0, decode, "samples")
    b.link(loader, 2, decode, "vae")
    preview = b.add("ITM_MergePreview", (760, 460), step=-1, level="first", opacity=0.6)
    b.link(merge, 0, preview, "model")
    b.link(decode, 0, preview, "images")
    shown = b.add("PreviewImage", (1100, 460), title=shown_title)
    b.link(preview, 1, shown, "images")
    return b, decode


def demo_video(schema):
    """The bundled moving-Fashion-MNIST video model (WAN 2.1 architecture): the WAN adapter without a download."""
    b, decode = demo_transformer(schema, "ITM_DemoVideoModelLoader", "trouser", (
        "EmptyHunyuanLatentVideo", dict(width=256, height=256, length=13, batch_size=2)), "simple",
        "Merge map per frame (last step)")
    save = b.add("SaveAnimatedWEBP", (1100, 40), filename_prefix="importance_tome_demo_video", fps=8.0,
                 lossless=False, quality=90, method="default")
    b.link(decode, 0, save, "images")
    return b.workflow("The pack's bundled video model (WAN 2.1 architecture, trained by the pack on moving "
                      "Fashion-MNIST): name a class in the positive prompt. 256x256, 13 frames = 4 latent frames of "
                      "16x16 tokens; each frame's tokens are merged within the frame, whole WAN blocks at a time. "
                      "Needs current ComfyUI.")


def wan_models(b, unet, shift_x, y):
    """UNETLoader → ModelSamplingSD3 (shift 8) → merging node; returns the merging node."""
    loader = b.add("UNETLoader", (40, y), unet_name=unet, weight_dtype="default")
    shift = b.add("ModelSamplingSD3", (shift_x, y), shift=8.0)
    merge = b.add("ITM_ImportanceTokenMerging", (shift_x + 340, y), **WAN_MERGE)
    b.link(loader, 0, shift, "model")
    b.link(shift, 0, merge, "model")
    return merge


def wan_text(b, y):
    clip = b.add("CLIPLoader", (40, y), clip_name="umt5_xxl_fp8_e4m3fn_scaled.safetensors", type="wan",
                 device="default")
    vae = b.add("VAELoader", (40, y + 200), vae_name="wan_2.1_vae.safetensors")
    pos = b.add("CLIPTextEncode", (420, y), title="Positive",
                text="a red fox trotting through fresh snow in a pine forest, morning light, slow tracking shot")
    neg = b.add("CLIPTextEncode", (420, y + 220), title="Negative", text=WAN_NEGATIVE)
    b.link(clip, 0, pos, "clip")
    b.link(clip, 0, neg, "clip")
    return vae, pos, neg


def decode_video(b, latent_source, vae, x, prefix, fps=16.0, vae_slot=0):
    """VAEDecode → CreateVideo → SaveVideo (``vae_slot``: the VAE output of ``vae``, 2 for a checkpoint loader)."""
    decode = b.add("VAEDecode", (x, 300))
    b.link(latent_source, 0, decode, "samples")
    b.link(vae, vae_slot, decode, "vae")
    video = b.add("CreateVideo", (x + 260, 300), fps=fps)
    b.link(decode, 0, video, "images")
    save = b.add("SaveVideo", (x + 520, 300), filename_prefix=prefix, format="auto", codec="auto")
    b.link(video, 0, save, "video")


def demo_dit(schema):
    """The bundled Fashion-MNIST image DiT (Qwen-Image architecture): the image-DiT adapters without a download."""
    b, decode = demo_transformer(schema, "ITM_DemoDiTModelLoader", "ankle boot", (
        "EmptySD3LatentImage", dict(width=256, height=256, batch_size=4)), "normal", "Merge map (last step)")
    save = b.add("SaveImage", (1100, 40), filename_prefix="importance_tome_demo_dit")
    b.link(decode, 0, save, "images")
    return b.workflow("The pack's bundled image DiT (ComfyUI's Qwen-Image class, trained by the pack on "
                      "Fashion-MNIST): name a class in the positive prompt. 256x256 = 16x16 image tokens next to one "
                      "text token; the image part of every block's joint attention is merged. Needs current ComfyUI.")


def wan21_t2v(schema):
    """WAN 2.1 text to video (1.3B, 832x480, 33 frames), the merging node after the model's shift."""
    b = WorkflowBuilder(schema)
    merge = wan_models(b, "wan2.1_t2v_1.3B_fp16.safetensors", 420, 40)
    vae, pos, neg = wan_text(b, 300)
    latent = b.add("EmptyHunyuanLatentVideo", (420, 760), width=832, height=480, length=33, batch_size=1)
    sampler = b.add("KSampler", (1180, 40), seed=0, steps=30, cfg=6.0, sampler_name="uni_pc", scheduler="simple",
                    denoise=1.0)
    for source, name in ((merge, "model"), (pos, "positive"), (neg, "negative"), (latent, "latent_image")):
        b.link(source, 0, sampler, name)
    decode_video(b, sampler, vae, 1180, "importance_tome_wan21")
    return b.workflow("WAN 2.1 text to video (1.3B, 832x480, 33 frames = 9 latent frames of 52x30 tokens): each "
                      "latent frame's tokens are merged within the frame, in the self-attention of every block, with "
                      "the importance map of the previous step. Models: the Comfy-Org WAN 2.1 repackaged files.")


def wan22_i2v(schema):
    """WAN 2.2 14B image to video: high-noise and low-noise models, each with its own merging node."""
    b = WorkflowBuilder(schema)
    high = wan_models(b, "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors", 420, 40)
    low = wan_models(b, "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors", 420, 1000)
    vae, pos, neg = wan_text(b, 300)
    image = b.add("LoadImage", (40, 760), image="example.png")
    i2v = b.add("WanImageToVideo", (420, 760), width=640, height=640, length=81, batch_size=1)
    b.link(pos, 0, i2v, "positive")
    b.link(neg, 0, i2v, "negative")
    b.link(vae, 0, i2v, "vae")
    b.link(image, 0, i2v, "start_image")
    first = b.add("KSamplerAdvanced", (1180, 40), add_noise="enable", noise_seed=0, steps=20, cfg=3.5,
                  sampler_name="euler", scheduler="simple", start_at_step=0, end_at_step=10,
                  return_with_leftover_noise="enable")
    second = b.add("KSamplerAdvanced", (1180, 700), add_noise="disable", noise_seed=0, steps=20, cfg=3.5,
                   sampler_name="euler", scheduler="simple", start_at_step=10, end_at_step=10000,
                   return_with_leftover_noise="disable")
    b.link(high, 0, first, "model")
    b.link(low, 0, second, "model")
    for sampler in (first, second):
        b.link(i2v, 0, sampler, "positive")
        b.link(i2v, 1, sampler, "negative")
    b.link(i2v, 2, first, "latent_image")
    b.link(first, 0, second, "latent_image")
    decode_video(b, second, vae, 1580, "importance_tome_wan22_i2v")
    return b.workflow("WAN 2.2 14B image to video (640x640, 81 frames): the high-noise model samples steps 0-10, "
                      "the low-noise model 10-20; each has its own merging node (the low-noise pass starts with one "
                      "warm-up step, then uses its own importance maps). Put your image in ComfyUI's input folder "
                      "as example.png.")


def ltxv_t2v(schema):
    """LTX-Video text to video (2B v0.9.5, 768x512, 97 frames) with ComfyUI's custom sampler and LTXV scheduler."""
    b = WorkflowBuilder(schema)
    loader = b.add("CheckpointLoaderSimple", (40, 40), ckpt_name="ltx-video-2b-v0.9.5.safetensors")
    merge = b.add("ITM_ImportanceTokenMerging", (420, 40), **WAN_MERGE)
    b.link(loader, 0, merge, "model")
    clip = b.add("CLIPLoader", (40, 300), clip_name="t5xxl_fp16.safetensors", type="ltxv", device="default")
    pos = b.add("CLIPTextEncode", (420, 300), title="Positive",
                text="a red fox trotting through fresh snow in a pine forest, morning light, slow tracking shot")
    neg = b.add("CLIPTextEncode", (420, 520), title="Negative",
                text="low quality, worst quality, deformed, distorted, disfigured, motion smear, motion artifacts, "
                     "fused fingers, bad anatomy, weird hand, ugly")
    for text in (pos, neg):
        b.link(clip, 0, text, "clip")
    conditioning = b.add("LTXVConditioning", (800, 300), frame_rate=24.0)
    b.link(pos, 0, conditioning, "positive")
    b.link(neg, 0, conditioning, "negative")
    latent = b.add("EmptyLTXVLatentVideo", (800, 520), width=768, height=512, length=97, batch_size=1)
    schedule = b.add("LTXVScheduler", (800, 40), steps=30, max_shift=2.05, base_shift=0.95, stretch=True,
                     terminal=0.1)
    b.link(latent, 0, schedule, "latent")
    sampler = b.add("KSamplerSelect", (800, 760), sampler_name="euler")
    run = b.add("SamplerCustom", (1180, 40), add_noise=True, noise_seed=0, cfg=3.0)
    for source, slot, name in ((merge, 0, "model"), (conditioning, 0, "positive"), (conditioning, 1, "negative"),
                               (sampler, 0, "sampler"), (schedule, 0, "sigmas"), (latent, 0, "latent_image")):
        b.link(source, slot, run, name)
    decode_video(b, run, loader, 1180, "importance_tome_ltxv", fps=24.0, vae_slot=2)
    return b.workflow("LTX-Video text to video (2B v0.9.5, 768x512, 97 frames = 13 latent frames of 24x16 tokens) at "
                      "cfg 3: the self-attention of every block runs on merged tokens, per latent frame, with the "
                      "importance map of the previous step; text tokens never merge. Models: Lightricks' "
                      "ltx-video-2b-v0.9.5 checkpoint and the T5-XXL text encoder.")


def hunyuan_t2v(schema):
    """HunyuanVideo text to video (848x480, 73 frames) with ComfyUI's custom sampler nodes, cfg 1 + FluxGuidance."""
    b = WorkflowBuilder(schema)
    loader = b.add("UNETLoader", (40, 40), unet_name="hunyuan_video_t2v_720p_bf16.safetensors", weight_dtype="default")
    merge = b.add("ITM_ImportanceTokenMerging", (420, 40), **MERGE)
    b.link(loader, 0, merge, "model")
    clip = b.add("DualCLIPLoader", (40, 300), clip_name1="clip_l.safetensors",
                 clip_name2="llava_llama3_fp8_scaled.safetensors", type="hunyuan_video", device="default")
    vae = b.add("VAELoader", (40, 520), vae_name="hunyuan_video_vae_bf16.safetensors")
    text = b.add("CLIPTextEncode", (420, 300), title="Prompt",
                 text="a red fox trotting through fresh snow in a pine forest, morning light, slow tracking shot")
    b.link(clip, 0, text, "clip")
    guidance = b.add("FluxGuidance", (420, 540), guidance=6.0)
    b.link(text, 0, guidance, "conditioning")
    guider = b.add("BasicGuider", (800, 40))
    b.link(merge, 0, guider, "model")
    b.link(guidance, 0, guider, "conditioning")
    noise = b.add("RandomNoise", (800, 200), noise_seed=0)
    sampler = b.add("KSamplerSelect", (800, 340), sampler_name="euler")
    schedule = b.add("BasicScheduler", (800, 460), scheduler="simple", steps=20, denoise=1.0)
    b.link(merge, 0, schedule, "model")
    latent = b.add("EmptyHunyuanLatentVideo", (800, 640), width=848, height=480, length=73, batch_size=1)
    run = b.add("SamplerCustomAdvanced", (1180, 40))
    for source, name in ((noise, "noise"), (guider, "guider"), (sampler, "sampler"), (schedule, "sigmas"),
                         (latent, "latent_image")):
        b.link(source, 0, run, name)
    decode = b.add("VAEDecodeTiled", (1180, 400), tile_size=256, overlap=64, temporal_size=64, temporal_overlap=8)
    b.link(run, 0, decode, "samples")
    b.link(vae, 0, decode, "vae")
    video = b.add("CreateVideo", (1440, 400), fps=24.0)
    b.link(decode, 0, video, "images")
    save = b.add("SaveVideo", (1700, 400), filename_prefix="importance_tome_hunyuan", format="auto", codec="auto")
    b.link(video, 0, save, "video")
    return b.workflow("HunyuanVideo text to video (848x480, 73 frames = 19 latent frames of 53x30 tokens) with "
                      "ComfyUI's custom sampler; guidance-distilled, so cfg 1 with FluxGuidance. Without an uncond "
                      "pass there is no CFG importance map: the node merges with its cfg = 1 source (see README). The "
                      "joint attention's image tokens are merged per latent frame; text tokens never.")


def flux_dev_t2i(schema):
    """Flux.1 dev text to image (1024x1024), cfg 1 + FluxGuidance as ComfyUI's own example runs it."""
    b = WorkflowBuilder(schema)
    loader = b.add("UNETLoader", (40, 40), unet_name="flux1-dev.safetensors", weight_dtype="default")
    merge = b.add("ITM_ImportanceTokenMerging", (420, 40), **FLUX_MERGE)
    b.link(loader, 0, merge, "model")
    clip = b.add("DualCLIPLoader", (40, 300), clip_name1="clip_l.safetensors", clip_name2="t5xxl_fp16.safetensors",
                 type="flux", device="default")
    vae = b.add("VAELoader", (40, 520), vae_name="ae.safetensors")
    text = b.add("CLIPTextEncode", (420, 300), title="Prompt",
                 text="a cozy reading nook by a rainy window, warm lamp light, watercolor illustration")
    b.link(clip, 0, text, "clip")
    guidance = b.add("FluxGuidance", (420, 540), guidance=3.5)
    b.link(text, 0, guidance, "conditioning")
    negative = b.add("ConditioningZeroOut", (420, 700))
    b.link(text, 0, negative, "conditioning")
    latent = b.add("EmptySD3LatentImage", (420, 820), width=1024, height=1024, batch_size=1)
    sample_decode_save(b, (merge, 0), (guidance, 0), (negative, 0), (latent, 0), (vae, 0), "importance_tome_flux",
                       steps=20, cfg=1.0, sampler_name="euler", scheduler="simple")
    return b.workflow("Flux.1 dev text to image (1024x1024 = 64x64 image tokens + 512 text tokens): whole double- "
                      "and single-stream blocks run on half of the image tokens; text tokens are never merged. "
                      "Guidance-distilled, so cfg 1 with FluxGuidance: without an uncond pass there is no CFG "
                      "importance map; importance is how much each position's prediction moved since the previous "
                      "step (cfg1_mode auto = change on DiTs; see README). Models: flux1-dev, clip_l, t5xxl_fp16, ae.")


def prompt_pair(b, clip, y, negative):
    """Positive and negative CLIPTextEncode at rows ``y`` = (positive, negative), both on ``clip``."""
    pos = b.add("CLIPTextEncode", (420, y[0]), title="Positive", text=POSITIVE)
    neg = b.add("CLIPTextEncode", (420, y[1]), title="Negative", text=negative)
    b.link(clip, 0, pos, "clip")
    b.link(clip, 0, neg, "clip")
    return pos, neg


def shifted_unet(b, unet_name, shift, merge):
    """UNETLoader → ModelSamplingAuraFlow → the merging node (Qwen-Image, Z-Image)."""
    loader = b.add("UNETLoader", (40, 40), unet_name=unet_name, weight_dtype="default")
    sampling = b.add("ModelSamplingAuraFlow", (420, 40), shift=shift)
    b.link(loader, 0, sampling, "model")
    node = b.add("ITM_ImportanceTokenMerging", (420, 180), **merge)
    b.link(sampling, 0, node, "model")
    return node


def sd35_t2i(schema):
    """SD3.5 large text to image (1024x1024) with its three text encoders, cfg 4.5: the CFG importance map."""
    b = WorkflowBuilder(schema)
    loader = b.add("CheckpointLoaderSimple", (40, 40), ckpt_name="sd3.5_large.safetensors")
    merge = b.add("ITM_ImportanceTokenMerging", (420, 40), **FLUX_MERGE)
    b.link(loader, 0, merge, "model")
    clip = b.add("TripleCLIPLoader", (40, 300), clip_name1="clip_l.safetensors", clip_name2="clip_g.safetensors",
                 clip_name3="t5xxl_fp16.safetensors")
    pos, neg = prompt_pair(b, clip, (300, 520), NEGATIVE)
    latent = b.add("EmptySD3LatentImage", (420, 740), width=1024, height=1024, batch_size=1)
    sample_decode_save(b, (merge, 0), (pos, 0), (neg, 0), (latent, 0), (loader, 2), "importance_tome_sd35",
                       steps=28, cfg=4.5, sampler_name="euler", scheduler="sgm_uniform")
    return b.workflow("SD3.5 large text to image (1024x1024 = 64x64 image tokens + 154 text tokens): whole MMDiT "
                      "blocks run on half of the image tokens, chosen by the CFG importance map of the previous step; "
                      "text tokens are never merged. Models: sd3.5_large, clip_l, clip_g, t5xxl_fp16.")


def qwen_image_t2i(schema):
    """Qwen-Image text to image (1328x1328), cfg 2.5: the CFG importance map."""
    b = WorkflowBuilder(schema)
    merge = shifted_unet(b, "qwen_image_fp8_e4m3fn.safetensors", 3.1, FLUX_MERGE)
    clip = b.add("CLIPLoader", (40, 300), clip_name="qwen_2.5_vl_7b_fp8_scaled.safetensors", type="qwen_image",
                 device="default")
    vae = b.add("VAELoader", (40, 520), vae_name="qwen_image_vae.safetensors")
    pos, neg = prompt_pair(b, clip, (400, 620), "")
    latent = b.add("EmptySD3LatentImage", (420, 840), width=1328, height=1328, batch_size=1)
    sample_decode_save(b, (merge, 0), (pos, 0), (neg, 0), (latent, 0), (vae, 0), "importance_tome_qwen_image",
                       steps=20, cfg=2.5, sampler_name="euler", scheduler="simple")
    return b.workflow("Qwen-Image text to image (1328x1328 = 83x83 image tokens): whole blocks run on half of the "
                      "image tokens, chosen by the CFG importance map of the previous step; text tokens are never "
                      "merged. For Qwen-Image-Lightning (cfg 1) see cfg1_mode in the README. Models: "
                      "qwen_image_fp8_e4m3fn, qwen_2.5_vl_7b_fp8_scaled, qwen_image_vae.")


def zimage_turbo_t2i(schema):
    """Z-Image-Turbo text to image (1024x1024), 8 steps at cfg 1 as ComfyUI's own example runs it."""
    b = WorkflowBuilder(schema)
    merge = shifted_unet(b, "z_image_turbo_bf16.safetensors", 3.0, MERGE)
    clip = b.add("CLIPLoader", (40, 300), clip_name="qwen_3_4b.safetensors", type="lumina2", device="default")
    vae = b.add("VAELoader", (40, 520), vae_name="ae.safetensors")
    pos = b.add("CLIPTextEncode", (420, 400), title="Prompt", text=POSITIVE)
    b.link(clip, 0, pos, "clip")
    negative = b.add("ConditioningZeroOut", (420, 620))
    b.link(pos, 0, negative, "conditioning")
    latent = b.add("EmptySD3LatentImage", (420, 760), width=1024, height=1024, batch_size=1)
    sample_decode_save(b, (merge, 0), (pos, 0), (negative, 0), (latent, 0), (vae, 0), "importance_tome_zimage",
                       steps=8, cfg=1.0, sampler_name="res_multistep", scheduler="simple")
    return b.workflow("Z-Image-Turbo text to image (1024x1024 = 64x64 image tokens): the image tokens of every main "
                      "layer's joint attention are merged (Z-Image has no block hook, so attention only); text and "
                      "pad tokens never. Distilled, so cfg 1: without an uncond pass, importance is how much each "
                      "position's prediction moved since the previous step (cfg1_mode auto = change on DiTs; see "
                      "README). Models: z_image_turbo_bf16, qwen_3_4b, ae.")


def pixart_sigma_t2i(schema):
    """PixArt-Σ text to image (1024x1024), cfg 4.5: the paper's DiT, merged at the paper's site and blocks."""
    b = WorkflowBuilder(schema)
    loader = b.add("UNETLoader", (40, 40), unet_name="PixArt-Sigma-XL-2-1024-MS.pth", weight_dtype="default")
    merge = b.add("ITM_ImportanceTokenMerging", (420, 40), **MERGE)
    b.link(loader, 0, merge, "model")
    clip = b.add("CLIPLoader", (40, 300), clip_name="t5xxl_fp16.safetensors", type="pixart", device="default")
    vae = b.add("VAELoader", (40, 520), vae_name="sdxl_vae.safetensors")
    pos, neg = prompt_pair(b, clip, (400, 620), NEGATIVE)
    latent = b.add("EmptyLatentImage", (420, 840), width=1024, height=1024, batch_size=1)
    sample_decode_save(b, (merge, 0), (pos, 0), (neg, 0), (latent, 0), (vae, 0), "importance_tome_pixart_sigma",
                       steps=20, cfg=4.5, sampler_name="euler", scheduler="normal")
    return b.workflow("PixArt-Sigma text to image (1024x1024 = 64x64 image tokens), the paper's DiT: the "
                      "self-attention of the middle half of the blocks (levels = auto: 7-20 of 28) runs on half of "
                      "the tokens, chosen by the CFG importance map of the previous step. Models: "
                      "PixArt-Sigma-XL-2-1024-MS, t5xxl_fp16, sdxl_vae.")


def animatediff(schema):
    """SD1.5 + AnimateDiff-Evolved: 32 frames in context windows of 16; every window is merged with the importance
    map rows of its own frames."""
    b = WorkflowBuilder(schema)
    loader = b.add("CheckpointLoaderSimple", (40, 180), ckpt_name=SD15)
    motion = b.add("ADE_LoadAnimateDiffModel", (40, 420), model_name="mm_sd_v15_v2.ckpt")
    apply = b.add("ADE_ApplyAnimateDiffModelSimple", (40, 560))
    b.link(motion, 0, apply, "motion_model")
    context = b.add("ADE_StandardUniformContextOptions", (40, 720), context_length=16, context_stride=1,
                    context_overlap=4)
    evolved = b.add("ADE_UseEvolvedSampling", (420, 40), beta_schedule="autoselect")
    b.link(loader, 0, evolved, "model")
    b.link(apply, 0, evolved, "m_models")
    b.link(context, 0, evolved, "context_options")
    merge = b.add("ITM_ImportanceTokenMerging", (420, 220), **MERGE)
    b.link(evolved, 0, merge, "model")
    pos = b.add("CLIPTextEncode", (420, 480), title="Positive", text="waves crashing on a rocky shore, sunset, "
                "cinematic, detailed")
    neg = b.add("CLIPTextEncode", (420, 700), title="Negative", text=NEGATIVE)
    b.link(loader, 1, pos, "clip")
    b.link(loader, 1, neg, "clip")
    latent = b.add("EmptyLatentImage", (420, 920), width=512, height=512, batch_size=32)
    sample_decode_save(b, (merge, 0), (pos, 0), (neg, 0), (latent, 0), (loader, 2), "importance_tome_animatediff",
                       steps=20, cfg=7.0)
    return b.workflow("AnimateDiff (ComfyUI-AnimateDiff-Evolved, with an SD1.5 motion model in "
                      "models/animatediff_models): 32 frames at 512x512 sampled in context windows of 16 frames "
                      "(overlap 4). Frames are the latent batch: each window's frames are merged with their own rows "
                      "of the importance map; the motion modules' temporal attention is left alone.")


def load_animatediff(path):
    """Load ADE from the work tree ``path`` into the booted host; ADE registers (and creates) folders under
    ComfyUI's models directory on import, which is pointed at a temporary folder meanwhile."""
    import shutil
    import tempfile

    import comfy_harness
    import folder_paths

    models_dir = folder_paths.models_dir
    folder_paths.models_dir = tempfile.mkdtemp(prefix="itm-ade-models-")
    try:
        return comfy_harness.load_pack(path)
    finally:
        shutil.rmtree(folder_paths.models_dir, ignore_errors=True)
        folder_paths.models_dir = models_dir


def examples(schema, animatediff_nodes=False, current=True):
    extra = {"sd15_animatediff.json": animatediff(schema)} if animatediff_nodes else {}
    if current:
        extra.update({"demo_video.json": demo_video(schema), "wan21_t2v.json": wan21_t2v(schema),
                      "wan22_i2v.json": wan22_i2v(schema), "hunyuan_t2v.json": hunyuan_t2v(schema),
                      "ltxv_t2v.json": ltxv_t2v(schema),
                      "flux_dev_t2i.json": flux_dev_t2i(schema), "demo_dit.json": demo_dit(schema),
                      "sd35_t2i.json": sd35_t2i(schema), "qwen_image_t2i.json": qwen_image_t2i(schema),
                      "zimage_turbo_t2i.json": zimage_turbo_t2i(schema),
                      "pixart_sigma_t2i.json": pixart_sigma_t2i(schema)})
    return {
        **extra,
        "svd_img2vid.json": video(schema, "svd"),
        "sv3d_orbit.json": video(schema, "sv3d"),
        "stable_zero123.json": video(schema, "zero123"),
        "demo_fashion.json": demo(schema),
        "demo_preview.json": demo_preview(schema),
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
    ade = os.environ.get("ITM_ADE_PATH")
    if ade:
        load_animatediff(ade)
    else:
        print("ITM_ADE_PATH is not set: sd15_animatediff.json is left as it is")  # noqa: T201
    current = comfy_harness.host_kind() == "modern"
    if not current:
        print(f"the 2024 host has no WAN nodes: {', '.join(CURRENT_ONLY)} are left as they are")  # noqa: T201
    for name, workflow in examples(schema_from_host(), animatediff_nodes=bool(ade), current=current).items():
        with open(os.path.join(HERE, name), "w", encoding="utf-8") as handle:
            json.dump(workflow, handle, indent=1)
            handle.write("\n")
        print(f"wrote workflows/{name}")  # noqa: T201 (a command-line tool)


if __name__ == "__main__":
    main()
