"""Test-only V1 custom nodes, loaded next to the pack by the tests (ComfyUI a28a9dc8 and 0.14.1).

HostTestTinyModel  -> MODEL, CONDITIONING(+), CONDITIONING(-)   (tiny SD1.5/SDXL UNet built by comfy_harness.py)
HostTestFullSD15   -> MODEL, CONDITIONING(+), CONDITIONING(-)   (full-width SD1.5 UNet, random weights, built once)
HostTestLatentStats   OUTPUT_NODE: returns {"ui": {"latent_stats": [...]}} and keeps the latent in LAST[unique_id]
HostTestImageStats    OUTPUT_NODE: keeps an IMAGE batch in LAST[unique_id]
HostTestImageCodec -> VAE                                        (the demo model's grey-image codec, for VAEDecode)
"""
import importlib.util
import os
import sys


def _boot():
    mod = sys.modules.get("comfy_harness")
    if mod is None:  # not imported by the tests' conftest: load ../comfy_harness.py next to this pack
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "comfy_harness.py")
        spec = importlib.util.spec_from_file_location("comfy_harness", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["comfy_harness"] = mod
        spec.loader.exec_module(mod)
    return mod


class HostTestTinyModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "arch": (["sd15", "sdxl", "sd15_inpaint", "sdxl_refiner", "zero123"],),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
        }}

    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("model", "positive", "negative")
    FUNCTION = "build"
    CATEGORY = "testing/host"

    def build(self, arch, seed):
        b = _boot()
        if arch == "sd15_inpaint":
            return b.tiny_sd15_model(seed=seed, in_channels=9)
        if arch == "sdxl_refiner":
            return b.tiny_sdxl_refiner_model(seed=seed)
        if arch == "zero123":
            return b.tiny_zero123_model(seed=seed)
        fn = b.tiny_sd15_model if arch == "sd15" else b.tiny_sdxl_model
        return fn(seed=seed)


class HostTestLatentStats:
    LAST = {}  # unique_id -> latent tensor (cpu clone); read via nodes.NODE_CLASS_MAPPINGS["HostTestLatentStats"].LAST

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ()
    FUNCTION = "stats"
    OUTPUT_NODE = True
    CATEGORY = "testing/host"

    def stats(self, samples, unique_id=None):
        import torch
        x = samples["samples"].detach().float().cpu().clone()
        HostTestLatentStats.LAST[str(unique_id)] = x
        s = {"shape": list(x.shape), "finite": bool(torch.isfinite(x).all()),
             "mean": float(x.mean()), "std": float(x.std()), "absmax": float(x.abs().max())}
        return {"ui": {"latent_stats": [s]}}


class HostTestImageStats:
    LAST = {}  # unique_id -> IMAGE tensor (cpu clone)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ()
    FUNCTION = "keep"
    OUTPUT_NODE = True
    CATEGORY = "testing/host"

    def keep(self, images, unique_id=None):
        HostTestImageStats.LAST[str(unique_id)] = images.detach().float().cpu().clone()
        return {"ui": {"image_shape": [list(images.shape)]}}


class HostTestImageCodec:
    """A VAE stand-in (the demo model's: 4 latent channels -> one grey image, 8x the latent size) for VAEDecode."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "build"
    CATEGORY = "testing/host"

    def build(self):
        return (_boot().pack_module("nodes.demo_model").DemoImageCodec(),)


NODE_CLASS_MAPPINGS = {"HostTestTinyModel": HostTestTinyModel, "HostTestLatentStats": HostTestLatentStats,
                       "HostTestImageStats": HostTestImageStats, "HostTestImageCodec": HostTestImageCodec}
NODE_DISPLAY_NAME_MAPPINGS = {"HostTestTinyModel": "Host test: tiny model", "HostTestLatentStats": "Host test: latent stats"}


class _ModelProbe:
    """MODEL -> MODEL test nodes that look at (or patch) the model on its way to the sampler."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "probe"
    CATEGORY = "testing/host"


class HostTestAttnProbe(_ModelProbe):
    """MODEL -> MODEL: appends an attn1_patch (after any earlier ones) that records what self-attention receives.

    RECORDS[unique_id] is a list of dicts: block, block_index, tokens (after earlier patches), original_shape, rows,
    cond_or_uncond. RUNTIMES[unique_id] keeps the importance-merging runtime found on the model, if any.
    """

    RECORDS = {}
    RUNTIMES = {}

    def probe(self, model, unique_id=None):
        records = HostTestAttnProbe.RECORDS.setdefault(str(unique_id), [])
        records.clear()

        def recorder(n, context, value, extra):
            shape = extra.get("original_shape")
            records.append({
                "temporal": bool(extra.get("importance_tome_temporal")),
                "block": tuple(extra.get("block") or ()), "block_index": extra.get("block_index"),
                "tokens": int(n.shape[1]), "rows": int(n.shape[0]), "kv_tokens": int(context.shape[1]),
                "original_shape": list(shape) if shape is not None else None,
                "cond_or_uncond": list(extra.get("cond_or_uncond") or []),
            })
            return n, context, value

        m = model.clone()
        m.set_model_attn1_patch(recorder)
        HostTestAttnProbe.RUNTIMES[str(unique_id)] = m.model_options.get("transformer_options", {}).get("importance_tome")
        return (m,)


class HostTestTinyControlNet:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})}}

    RETURN_TYPES = ("CONTROL_NET",)
    FUNCTION = "build"
    CATEGORY = "testing/host"

    def build(self, seed):
        return (_boot().tiny_controlnet(seed),)


class HostTestTinyVideoModel:
    """A tiny SVD / SV3D model with stand-ins for the CLIP vision model and the VAE (for the core conditioning nodes)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"arch": (["svd", "sv3d_u", "sv3d_p"],),
                             "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})}}

    RETURN_TYPES = ("MODEL", "CLIP_VISION", "VAE")
    FUNCTION = "build"
    CATEGORY = "testing/host"

    def build(self, arch, seed):
        b = _boot()
        return b.tiny_video_model(arch, seed=seed), b.StandInClipVision(seed=seed), b.pack_module("nodes.demo_model").DemoImageCodec()


class HostTestFullSD15:
    """A full-width SD1.5 UNet (860M parameters, random weights; comfy_harness.full_sd15_model), e.g. for AnimateDiff
    motion modules, which have SD1.5's real channel widths. Built once per seed and process (slow on CPU); the same
    ModelPatcher is returned on every call, downstream nodes clone it."""

    CACHE = {}

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})}}

    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("model", "positive", "negative")
    FUNCTION = "build"
    CATEGORY = "testing/host"

    def build(self, seed):
        if seed not in HostTestFullSD15.CACHE:
            HostTestFullSD15.CACHE[seed] = _boot().full_sd15_model(seed=seed)
        return HostTestFullSD15.CACHE[seed]


class HostTestTiledWrapper:
    """MODEL -> MODEL: a ``model_function_wrapper`` that runs the UNet on non-overlapping ``tile``×``tile`` latent
    tiles, ``per_batch`` tiles per UNet pass, with the same transformer_options for every pass (as
    ComfyUI-TiledDiffusion's MultiDiffusion does). Rows of a pass are chunk-major: [chunk 0: tiles; chunk 1: tiles]."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "tile": ("INT", {"default": 16, "min": 8, "max": 64, "step": 8}),
                             "per_batch": ("INT", {"default": 4, "min": 1, "max": 64})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "wrap"
    CATEGORY = "testing/host"

    def wrap(self, model, tile, per_batch):
        import torch

        def wrapper(apply_model, args):
            x, t, c = args["input"], args["timestep"], args["c"]
            rows = x.shape[0]
            chunks = len(args.get("cond_or_uncond") or [0]) or 1
            per_chunk = rows // chunks
            spots = [(y, z) for y in range(0, x.shape[2], tile) for z in range(0, x.shape[3], tile)]
            out = torch.zeros_like(x)
            for start in range(0, len(spots), per_batch):
                group = spots[start:start + per_batch]

                def tiles_of(v):  # [rows, ...] -> chunk-major [chunks * len(group) * per_chunk, ...]
                    parts = []
                    for k in range(chunks):
                        block = v[k * per_chunk:(k + 1) * per_chunk]
                        parts += [block[:, :, y:y + tile, z:z + tile] if v.ndim == 4 else block for (y, z) in group]
                    return torch.cat(parts)

                xb = tiles_of(x)
                cb = {k: (tiles_of(v) if isinstance(v, torch.Tensor) and v.shape[:1] == (rows,) else v)
                      for k, v in c.items()}
                yb = apply_model(xb, tiles_of(t), **cb)
                i = 0
                for k in range(chunks):
                    for (y, z) in group:
                        out[k * per_chunk:(k + 1) * per_chunk, :, y:y + tile, z:z + tile] = yb[i:i + per_chunk]
                        i += per_chunk
            return out

        m = model.clone()
        m.set_model_unet_function_wrapper(wrapper)
        return (m,)


class HostTestTinyWanModel:
    """A tiny WAN 2.1 t2v model (ComfyUI's WanModel) with two text conditionings; current ComfyUI only."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                             "layers": ("INT", {"default": 2, "min": 1, "max": 40})},
                "optional": {"model_type": (["t2v", "i2v"], {"default": "t2v"})}}

    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING")
    FUNCTION = "build"
    CATEGORY = "testing/host"

    def build(self, seed, layers, model_type="t2v"):
        return _boot().tiny_wan_model(seed=seed, layers=layers, model_type=model_type)


class HostTestTinyHunyuanModel:
    """A tiny HunyuanVideo t2v model (ComfyUI's own class) with two conditionings; current ComfyUI only."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                             "double": ("INT", {"default": 2, "min": 0, "max": 40}),
                             "single": ("INT", {"default": 2, "min": 0, "max": 40})}}

    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING")
    FUNCTION = "build"
    CATEGORY = "testing/host"

    def build(self, seed, double, single):
        return _boot().tiny_hunyuan_model(seed=seed, double=double, single=single)


class HostTestTinyLTXVModel:
    """A tiny LTX-Video model (ComfyUI's own LTXVModel) with two conditionings; current ComfyUI only."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                             "layers": ("INT", {"default": 2, "min": 1, "max": 48}),
                             "rope": (["interleaved", "split"],)}}

    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING")
    FUNCTION = "build"
    CATEGORY = "testing/host"

    def build(self, seed, layers, rope):
        return _boot().tiny_ltxv_model(seed=seed, layers=layers, rope=rope)


class HostTestTinyFluxModel:
    """A tiny Flux.1 model (ComfyUI's own class; dev with guidance, or schnell) with two conditionings; current
    ComfyUI only."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                             "double": ("INT", {"default": 2, "min": 0, "max": 40}),
                             "single": ("INT", {"default": 2, "min": 0, "max": 40})},
                "optional": {"guidance": ("BOOLEAN", {"default": True})}}

    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING")
    FUNCTION = "build"
    CATEGORY = "testing/host"

    def build(self, seed, double, single, guidance=True):
        return _boot().tiny_flux_model(seed=seed, double=double, single=single, guidance=guidance)


class HostTestTinySD3Model:
    """A tiny SD3.5-style MMDiT (ComfyUI's own class; block 0 has the image-only attn2) with two conditionings;
    current ComfyUI only."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                             "depth": ("INT", {"default": 2, "min": 1, "max": 40})}}

    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING")
    FUNCTION = "build"
    CATEGORY = "testing/host"

    def build(self, seed, depth):
        return _boot().tiny_sd3_model(seed=seed, depth=depth)


class HostTestTinyQwenModel:
    """A tiny Qwen-Image model (ComfyUI's own class) with two conditionings; current ComfyUI only."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                             "layers": ("INT", {"default": 2, "min": 1, "max": 60})}}

    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING")
    FUNCTION = "build"
    CATEGORY = "testing/host"

    def build(self, seed, layers):
        return _boot().tiny_qwen_model(seed=seed, layers=layers)


class HostTestTinyLuminaModel:
    """A tiny Z-Image (zimage=True) or Lumina 2 model (ComfyUI's NextDiT) with two conditionings; current ComfyUI
    only."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                             "layers": ("INT", {"default": 2, "min": 1, "max": 60}),
                             "zimage": ("BOOLEAN", {"default": True})}}

    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING")
    FUNCTION = "build"
    CATEGORY = "testing/host"

    def build(self, seed, layers, zimage):
        return _boot().tiny_lumina_model(seed=seed, layers=layers, zimage=zimage)


class HostTestTinyPixArtModel:
    """A tiny PixArt-alpha model (ComfyUI's PixArtMS, 24 tokens at 384x256) with two conditionings; current ComfyUI
    only. kv_compress: PixArt-Sigma's key/value compression in blocks 0 and 1."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                             "depth": ("INT", {"default": 4, "min": 1, "max": 28}),
                             "kv_compress": ("BOOLEAN", {"default": False})}}

    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING")
    FUNCTION = "build"
    CATEGORY = "testing/host"

    def build(self, seed, depth, kv_compress):
        return _boot().tiny_pixart_model(seed=seed, depth=depth, kv_compress=kv_compress)


class HostTestModuleRecorder(_ModelProbe):
    """MODEL -> MODEL: while each forward runs (an APPLY_MODEL wrapper on the clone), forward hooks on the diffusion
    model's submodules record what every call of the named classes received: RECORDS[unique_id] is a list of dicts
    (name = the module's path, cls, tokens = its first argument's dim 1, rows). For models whose attention calls
    carry no transformer_options (PixArt)."""

    RECORDS = {}
    CLASSES = ("AttentionKVCompress", "MultiHeadCrossAttention", "PixArtMSBlock")

    def probe(self, model, unique_id=None):
        import comfy.patcher_extension

        records = HostTestModuleRecorder.RECORDS.setdefault(str(unique_id), [])
        records.clear()

        def wrapper(executor, *args, **kwargs):
            net = executor.class_obj.diffusion_model
            handles = []
            for name, module in net.named_modules():
                if type(module).__name__ in HostTestModuleRecorder.CLASSES:
                    def record(mod, args, output, name=name):
                        records.append({"name": name, "cls": type(mod).__name__, "tokens": int(args[0].shape[1]),
                                        "rows": int(args[0].shape[0])})
                    handles.append(module.register_forward_hook(record))
            try:
                return executor(*args, **kwargs)
            finally:
                for handle in handles:
                    handle.remove()

        m = model.clone()
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "host_test_recorder", wrapper)
        return (m,)


class HostTestAttentionRecorder(_ModelProbe):
    """MODEL -> MODEL: sets ComfyUI's attention override (current ComfyUI) to one that records every attention call
    (q / k / v token counts, rows, block_index, channels per head and head 0's last q / k channel) and runs it
    unchanged. Put it before a node that chains overrides to see what the attention kernel finally receives. RECORDS[unique_id] is the list of calls."""

    RECORDS = {}

    def probe(self, model, unique_id=None):
        records = HostTestAttentionRecorder.RECORDS.setdefault(str(unique_id), [])
        records.clear()

        def recorder(func, *args, **kwargs):
            extra = kwargs.get("transformer_options") or {}
            q, k, v = args[:3]
            axis = 2 if kwargs.get("skip_reshape") else 1  # [B, heads, L, D] or [B, L, heads * D]
            heads = args[3] if len(args) > 3 else kwargs.get("heads", 1)

            def last_channel(t):  # head 0's last channel per token: [rows, L] (a key bias channel shows up here)
                t = t if axis == 2 else t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)
                return t[:, 0, :, -1].detach().float().cpu()

            records.append({"q": int(q.shape[1]), "k": int(k.shape[1]), "v": int(v.shape[1]), "rows": int(q.shape[0]),
                            "length": int(q.shape[axis]), "block_index": extra.get("block_index"),
                            "block_type": extra.get("block_type"), "grid_sizes": extra.get("grid_sizes"),
                            "head": int(q.shape[-1] if axis == 2 else q.shape[-1] // heads),
                            "q_last": last_channel(q), "k_last": last_channel(k),
                            "mask": (args[4] if len(args) > 4 else kwargs.get("mask")) is not None})
            out = func(*args, **kwargs)
            records[-1]["out"] = int(out.shape[1])
            return out

        m = model.clone()
        m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = recorder
        return (m,)


class HostTestRuntimeProbe(_ModelProbe):
    """MODEL -> the same MODEL: keeps the importance-merging runtime found on it in RUNTIMES[unique_id]."""

    RUNTIMES = {}

    def probe(self, model, unique_id=None):
        options = model.model_options.get("transformer_options", {})
        HostTestRuntimeProbe.RUNTIMES[str(unique_id)] = options.get("importance_tome")
        return (model,)


class HostTestVideoCodec:
    """A video VAE stand-in for VAEDecode: [B, C, T, H, W] latents -> [B, time (T - 1) + 1, space H, space W, 3] grey
    frames (causal time compression: the first frame alone, then ``time`` frames per latent frame; WAN: 4 and 8 with
    16 channels, the default; LTX-Video: 8 and 32 with 128 channels)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"optional": {"time": ("INT", {"default": 4, "min": 1, "max": 16}),
                             "space": ("INT", {"default": 8, "min": 1, "max": 64}),
                             "channels": ("INT", {"default": 16, "min": 1, "max": 256})}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "build"
    CATEGORY = "testing/host"

    class Codec:
        output_channels = 3

        def __init__(self, time: int = 4, space: int = 8, channels: int = 16):
            self.time, self.space = time, space
            self.latent_channels = channels
            self.downscale_ratio = self.upscale_ratio = space

        def spacial_compression_decode(self):
            return self.space

        def temporal_compression_decode(self):
            return self.time

        def encode(self, pixels):
            """[F, H, W, 3] frames -> [1, C, 1 + (F - 1) // time, H / space, W / space] (frames 0, time, 2 time, ...
            pooled)."""
            import torch.nn.functional as F

            grey = pixels[0::self.time, ..., :3].float().mean(dim=-1)[None]
            pooled = F.avg_pool2d(grey, self.space) * 2 - 1
            return pooled[:, None].expand(-1, self.latent_channels, -1, -1, -1).contiguous()

        def decode(self, samples):
            import torch
            import torch.nn.functional as F

            b, _, t, h, w = samples.shape
            grey = ((samples.float().mean(dim=1) + 1) / 2).clamp(0, 1)  # [B, T, H, W]
            index = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(self.time * (t - 1)) // self.time + 1])
            frames = F.interpolate(grey[:, index], scale_factor=self.space, mode="nearest")
            return frames[..., None].expand(-1, -1, -1, -1, 3).contiguous()

    def build(self, time=4, space=8, channels=16):
        return (HostTestVideoCodec.Codec(time, space, channels),)


NODE_CLASS_MAPPINGS["HostTestVideoCodec"] = HostTestVideoCodec
NODE_CLASS_MAPPINGS["HostTestTinyWanModel"] = HostTestTinyWanModel
NODE_CLASS_MAPPINGS["HostTestTinyHunyuanModel"] = HostTestTinyHunyuanModel
NODE_CLASS_MAPPINGS["HostTestTinyLTXVModel"] = HostTestTinyLTXVModel
NODE_CLASS_MAPPINGS["HostTestTinyFluxModel"] = HostTestTinyFluxModel
NODE_CLASS_MAPPINGS["HostTestTinySD3Model"] = HostTestTinySD3Model
NODE_CLASS_MAPPINGS["HostTestTinyQwenModel"] = HostTestTinyQwenModel
NODE_CLASS_MAPPINGS["HostTestTinyLuminaModel"] = HostTestTinyLuminaModel
NODE_CLASS_MAPPINGS["HostTestTinyPixArtModel"] = HostTestTinyPixArtModel
NODE_CLASS_MAPPINGS["HostTestModuleRecorder"] = HostTestModuleRecorder
NODE_CLASS_MAPPINGS["HostTestAttentionRecorder"] = HostTestAttentionRecorder
NODE_CLASS_MAPPINGS["HostTestRuntimeProbe"] = HostTestRuntimeProbe
NODE_CLASS_MAPPINGS["HostTestAttnProbe"] = HostTestAttnProbe
NODE_CLASS_MAPPINGS["HostTestTiledWrapper"] = HostTestTiledWrapper
NODE_CLASS_MAPPINGS["HostTestFullSD15"] = HostTestFullSD15
NODE_CLASS_MAPPINGS["HostTestTinyVideoModel"] = HostTestTinyVideoModel
NODE_CLASS_MAPPINGS["HostTestTinyControlNet"] = HostTestTinyControlNet
NODE_DISPLAY_NAME_MAPPINGS["HostTestAttnProbe"] = "Host test: attention probe"
