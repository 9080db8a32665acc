"""The pack's bundled demo model: a small class-conditional Fashion-MNIST diffusion model on ComfyUI's own UNet.

No pretrained diffusion weights ship with ComfyUI, so the pack carries a model it trained itself
(``workflows/demo_model/train.py``; how it was made is stored in the weights' metadata and in
``workflows/demo_model/README.md``). The loader node returns what a checkpoint loader returns:

* MODEL: ComfyUI's SD1.5 model class (eps prediction, SD's 1000-step schedule) with a small UNet
  (:data:`DEMO_UNET`: self-attention at the full 32×32 = 1024-token level and at 16×16), so samplers, CFG, this
  pack's patches and the built-in TomePatchModel all run on it unchanged;
* CLIP: a text encoder that recognises one Fashion-MNIST class name in the prompt ("sneaker", "a bag", …) and
  returns that class's learned embedding; an empty prompt gives the unconditional (null class) embedding;
* VAE: the model's 4 latent channels hold one grayscale garment (32×32 latent = 256×256 image), decoded by
  averaging the channels and upscaling 8×; encoding does the reverse, so img2img and inpainting work too.
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

log = logging.getLogger("comfyui_importance_tome")

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = os.path.join(PACK_ROOT, "workflows", "demo_model", "fashion_unet.safetensors")
VIDEO_WEIGHTS = os.path.join(PACK_ROOT, "workflows", "demo_model", "fashion_wan.safetensors")
DIT_WEIGHTS = os.path.join(PACK_ROOT, "workflows", "demo_model", "fashion_qwen.safetensors")
PIXART_WEIGHTS = os.path.join(PACK_ROOT, "workflows", "demo_model", "fashion_pixart.safetensors")
LTXV_WEIGHTS = os.path.join(PACK_ROOT, "workflows", "demo_model", "fashion_ltxv.safetensors")
HUNYUAN_WEIGHTS = os.path.join(PACK_ROOT, "workflows", "demo_model", "fashion_hunyuan.safetensors")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
NULL_CLASS = len(CLASSES)
CONTEXT_DIM = 64
DEMO_UNET = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
    "num_res_blocks": [1, 1, 1], "channel_mult": [1, 2, 2], "transformer_depth": [1, 1, 0],
    "transformer_depth_output": [1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1, "num_heads": 1,
    "num_head_channels": -1, "context_dim": CONTEXT_DIM, "use_spatial_transformer": True, "legacy": False,
    "use_linear_in_transformer": False, "adm_in_channels": None, "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
# the video demo model: ComfyUI's WAN 2.1 text-to-video class with a small WanModel (16-channel latent, patch
# 1x2x2, so a 256x256 clip's 32x32 latent frames are 16x16 = 256 tokens each)
DEMO_WAN = {
    "image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "text_len": 512, "in_dim": 16,
    "dim": 128, "ffn_dim": 384, "freq_dim": 256, "text_dim": CONTEXT_DIM, "out_dim": 16, "num_heads": 4,
    "num_layers": 4, "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6,
}
# the LTX-Video-architecture video demo model: ComfyUI's LTXV class (patch size 1, text by cross-attention, RoPE over
# fractional (time, y, x) positions, per-token modulation) with 4 blocks of width 128; its 128-channel latent holds
# the grayscale frame in every channel (LTX-Video's latent format does not rescale), so a 512x512, 25-frame
# EmptyLTXVLatentVideo is 4 latent frames of 16x16 = 256 tokens each, like the WAN demo's
DEMO_LTXV = {
    "image_model": "ltxv", "in_channels": 128, "num_attention_heads": 4, "attention_head_dim": 32,
    "cross_attention_dim": 128, "caption_channels": CONTEXT_DIM, "num_layers": 4,
}
# the HunyuanVideo-architecture video demo model: ComfyUI's HunyuanVideo class (Flux-style double- and single-stream
# blocks over [image, text] with 3-D RoPE, a token refiner on the text, patch 1x2x2) with 2 + 2 blocks of width 128;
# plain CFG instead of HunyuanVideo's guidance embedding (the demo is trained with the class dropped); its 16-channel
# latent holds the grayscale frame / HunyuanVideo's latent scale, so a 256x256, 13-frame EmptyHunyuanLatentVideo is
# 4 latent frames of 16x16 tokens, like the WAN demo's
DEMO_HUNYUAN = {
    "image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16, "vec_in_dim": CONTEXT_DIM,
    "context_in_dim": CONTEXT_DIM, "hidden_size": 128, "mlp_ratio": 3.0, "num_heads": 4, "depth": 2,
    "depth_single_blocks": 2, "axes_dim": [8, 12, 12], "theta": 256, "patch_size": [1, 2, 2], "qkv_bias": True,
    "guidance_embed": False, "byt5": False, "meanflow": False, "use_cond_type_embedding": False,
    "vision_in_dim": None, "meanflow_sum": False,
}
# the image DiT demo model: ComfyUI's Qwen-Image class (joint attention over text + image tokens after RoPE, like
# Flux's, whose blocks cannot be trained through ComfyUI's code: they add in place) with 6 blocks of width 128; a
# 256x256 image is a [16, 1, 32, 32] latent = 16x16 = 256 image tokens (2x2 patch) next to 1 text token (the class)
DEMO_QWEN = {
    "image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 6,
    "attention_head_dim": 32, "num_attention_heads": 4, "joint_attention_dim": CONTEXT_DIM,
    "axes_dims_rope": [8, 12, 12],
}
# the PixArt demo model: ComfyUI's PixArt-alpha class (the paper's DiT: self-attention over image tokens, cross-
# attention to the text, absolute positions added once) with 8 blocks of width 128, v-prediction; its latent is the
# UNet demo's SD1.5 layout at 40x40 (a 320x320 image; the 32x32 garment scaled by 1.25) with PixArt's 2x2 patch, so an
# image is 20x20 = 400 tokens (PixArt's position embedding needs a latent of at least 33x33)
DEMO_PIXART = {
    "image_model": "pixart_alpha", "input_size": 40, "patch_size": 2, "in_channels": 4, "hidden_size": 128,
    "depth": 8, "num_heads": 4, "mlp_ratio": 3.0, "class_dropout_prob": 0.0, "pred_sigma": False,
    "learn_sigma": False, "caption_channels": CONTEXT_DIM, "model_max_length": 1, "micro_condition": False,
    "pe_interpolation": None,
}
# words that name a class in a prompt (longest match wins, so "t-shirt" is not read as "shirt")
_ALIASES = {
    "t-shirt": 0, "t shirt": 0, "tshirt": 0, "top": 0, "trousers": 1, "trouser": 1, "pants": 1, "jeans": 1,
    "pullover": 2, "sweater": 2, "jumper": 2, "dress": 3, "coat": 4, "jacket": 4, "sandals": 5, "sandal": 5,
    "shirt": 6, "sneakers": 7, "sneaker": 7, "trainer": 7, "bag": 8, "handbag": 8, "ankle boot": 9, "boots": 9,
    "boot": 9,
}


def class_index(text: str) -> Optional[int]:
    """The class a prompt names (None for an empty prompt). Raises ValueError when it names none."""
    words = " ".join(re.findall(r"[a-z]+(?:-[a-z]+)?", text.lower()))
    if not words:
        return None
    for alias in sorted(_ALIASES, key=len, reverse=True):
        if re.search(rf"\b{re.escape(alias)}\b", words):
            return _ALIASES[alias]
    raise ValueError(
        f"the demo model knows the Fashion-MNIST classes only ({', '.join(CLASSES)}); the prompt {text!r} names "
        "none of them (an empty prompt gives the unconditional embedding)")


class DemoTextEncoder:
    """CLIP stand-in: prompt → the learned embedding of the class it names, [1, 1, CONTEXT_DIM]; ``token_mask``: the
    conditioning also carries the text encoder's token mask (LTX-Video's model requires one; the token is real)."""

    def __init__(self, table: torch.Tensor, token_mask: bool = False) -> None:
        self.table = table.float()
        self.token_mask = token_mask

    def tokenize(self, text, **_):
        return text

    def _embed(self, text: str) -> Tuple[torch.Tensor, torch.Tensor]:
        index = class_index(text)
        row = self.table[NULL_CLASS if index is None else index]
        return row.reshape(1, 1, -1).clone(), row.reshape(1, -1).clone()

    def _extra(self, pooled: torch.Tensor) -> dict:
        extra = {"pooled_output": pooled}
        if self.token_mask:
            extra["attention_mask"] = torch.ones(1, 1, dtype=torch.long)
        return extra

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        cond, pooled = self._embed(tokens)
        if return_dict:
            return {"cond": cond, **self._extra(pooled)}
        return (cond, pooled) if return_pooled else cond

    def encode_from_tokens_scheduled(self, tokens, **_):
        cond, pooled = self._embed(tokens)
        return [[cond, self._extra(pooled)]]

    def clone(self):
        return DemoTextEncoder(self.table, self.token_mask)


class DemoImageCodec:
    """VAE stand-in: the 4 latent channels carry one grayscale image, in [-1, 1] in model space (ComfyUI's SD1.5 latent
    format: the latent is model space / 0.18215); images are 8× the latent size."""

    downscale_ratio = 8
    upscale_ratio = 8
    latent_channels = 4
    output_channels = 3

    def spacial_compression_decode(self):
        return 8

    def spacial_compression_encode(self):
        return 8

    @staticmethod
    def _scale() -> float:
        import comfy.latent_formats  # noqa: PLC0415 (host module)

        return comfy.latent_formats.SD15().scale_factor

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        model_space = samples.float().cpu() * self._scale()
        gray = ((model_space.mean(dim=1, keepdim=True) + 1.0) / 2.0).clamp(0, 1)
        up = F.interpolate(gray, scale_factor=8, mode="bilinear", align_corners=False).clamp(0, 1)
        return up[:, 0, :, :, None].expand(-1, -1, -1, 3).contiguous()

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[1] % 8 or pixels.shape[2] % 8:
            raise ValueError(f"the demo model's images must be multiples of 8 pixels, got {tuple(pixels.shape[1:3])}")
        gray = pixels[..., :3].float().mean(dim=-1)[:, None]
        small = F.avg_pool2d(gray, 8) * 2.0 - 1.0
        return (small / self._scale()).expand(-1, 4, -1, -1).contiguous()


class DemoVideoCodec:
    """Video VAE stand-in for the video demo model, with WAN's layout: [B, 16, T, H, W] latents <-> 1 + 4 (T - 1)
    frames of 8x the size. In model space (after ComfyUI's Wan21 latent format) every channel holds the grayscale
    frame in [-1, 1], so the latent stores ``mean_c + std_c * gray``. Decoding shows latent frame 0 as the first
    frame and blends each next latent frame in over 4 frames; encoding reads frames 0, 4, 8, ..."""

    downscale_ratio = 8
    upscale_ratio = 8
    latent_channels = 16
    latent_dim = 3
    output_channels = 3
    frames_per_latent = 4

    def spacial_compression_decode(self):
        return self.upscale_ratio

    def spacial_compression_encode(self):
        return self.downscale_ratio

    def temporal_compression_decode(self):
        return self.frames_per_latent

    def temporal_compression_encode(self):
        return self.frames_per_latent

    @classmethod
    def _stats(cls, device):
        """(mean, std) per channel, [1, C, 1, 1, 1]: the latent stores ``mean + std * gray``."""
        import comfy.latent_formats  # noqa: PLC0415 (host module)

        fmt = comfy.latent_formats.Wan21()
        return (fmt.latents_mean.to(device).view(1, 16, 1, 1, 1).float(),
                fmt.latents_std.to(device).view(1, 16, 1, 1, 1).float())

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        c, t = self.latent_channels, self.frames_per_latent
        if samples.ndim != 5 or samples.shape[1] != c:
            raise ValueError(f"the video demo model decodes [B, {c}, T, H, W] latents, got {tuple(samples.shape)}")
        mean, std = self._stats(samples.device)
        gray = (((samples.float() - mean) / std).mean(dim=1) + 1.0) / 2.0  # [B, T, H, W]
        frames = [gray[:, :1]]
        for k in range(1, gray.shape[1]):
            weights = torch.arange(1, t + 1, dtype=gray.dtype, device=gray.device).view(1, t, 1, 1) / t
            frames.append(gray[:, k - 1:k] * (1 - weights) + gray[:, k:k + 1] * weights)
        video = torch.cat(frames, dim=1).clamp(0, 1).cpu()
        up = F.interpolate(video, scale_factor=self.upscale_ratio, mode="bilinear", align_corners=False).clamp(0, 1)
        return up[..., None].expand(-1, -1, -1, -1, 3).contiguous()

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.ndim == 5:  # [B, F, H, W, C]: one clip per batch entry
            return torch.cat([self.encode(clip) for clip in pixels])
        r = self.downscale_ratio
        if pixels.shape[1] % r or pixels.shape[2] % r:
            raise ValueError(f"the demo model's frames must be multiples of {r} pixels, got {tuple(pixels.shape[1:3])}")
        frames = pixels[0::self.frames_per_latent, ..., :3].float().mean(dim=-1)[None]  # [1, T, H, W]: 0, t, 2t, ...
        gray = F.avg_pool2d(frames, r) * 2.0 - 1.0
        mean, std = self._stats(gray.device)
        return (mean + std * gray[:, None]).contiguous()


class DemoLTXVCodec(DemoVideoCodec):
    """Video VAE stand-in for the LTX-Video demo model, with LTX-Video's layout: [B, 128, T, H, W] latents <-> 1 +
    8 (T - 1) frames of 32x the size; LTX-Video's latent format does not rescale, so every channel holds the grayscale
    frame in [-1, 1] as it is."""

    downscale_ratio = 32
    upscale_ratio = 32
    latent_channels = 128
    frames_per_latent = 8

    @classmethod
    def _stats(cls, device):
        return (torch.zeros(1, cls.latent_channels, 1, 1, 1, device=device),
                torch.ones(1, cls.latent_channels, 1, 1, 1, device=device))


class DemoHunyuanCodec(DemoVideoCodec):
    """Video VAE stand-in for the HunyuanVideo demo model: WAN's layout (HunyuanVideo's VAE also compresses 8x in
    space and 4x in time, 16 channels); HunyuanVideo's latent format multiplies by its scale on the way in, so the
    latent stores ``gray / scale`` in every channel."""

    @classmethod
    def _stats(cls, device):
        import comfy.latent_formats  # noqa: PLC0415 (host module)

        shape = (1, cls.latent_channels, 1, 1, 1)
        scale = float(comfy.latent_formats.HunyuanVideo.scale_factor)
        return torch.zeros(shape, device=device), torch.full(shape, 1.0 / scale, device=device)


def read_weights(path: str = WEIGHTS):
    """(UNet state dict, class table [11, CONTEXT_DIM], metadata dict) from the bundled safetensors file."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"demo model weights not found at {path}: run workflows/demo_model/train.py")
    tensors = {}
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
        for key in handle.keys():
            tensors[key] = handle.get_tensor(key)
    prefix = "diffusion_model."
    net = {k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)}
    return net, tensors["class_embedding.weight"].float(), metadata


def training_runs(metadata: dict) -> list:
    """The training runs of a weights file, oldest first (a file fine-tuned with train.py --init keeps its earlier
    runs under "earlier")."""
    training = json.loads(metadata.get("training", "{}"))
    return training.get("earlier", []) + [training]


def training_steps(metadata: dict) -> int:
    """Training steps of a weights file, over all its runs (0 when the file does not say)."""
    return sum(run.get("steps", 0) for run in training_runs(metadata))


def _patcher(config, state: Optional[dict], load_device):
    """A ComfyUI ModelPatcher of ``config``'s model in fp32 on the CPU; weights from ``state`` (strict) when given."""
    import comfy.model_management  # noqa: PLC0415 (host modules)
    import comfy.model_patcher  # noqa: PLC0415

    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "", device=torch.device("cpu"))
    if state is not None:
        model.diffusion_model.load_state_dict(state, strict=True)
    model.eval()
    load = load_device if load_device is not None else comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=load, offload_device=torch.device("cpu"))


def build_unet_patcher(unet_state: Optional[dict] = None, load_device=None, prediction: str = "eps"):
    """A ComfyUI ModelPatcher for the demo architecture (SD1.5 class; ``prediction`` "v" makes it v-predicting, as
    SD2.x-768 is); weights from ``unet_state`` (strict) when given."""
    import comfy.supported_models  # noqa: PLC0415 (host module)

    if prediction not in ("eps", "v"):
        raise ValueError(f"demo model prediction must be 'eps' or 'v', got {prediction!r}")
    config_class = comfy.supported_models.SD15
    if prediction == "v":
        import comfy.model_base  # noqa: PLC0415 (host module)

        class VPredictionSD15(comfy.supported_models.SD15):
            def model_type(self, state_dict, prefix=""):
                return comfy.model_base.ModelType.V_PREDICTION

        config_class = VPredictionSD15
    config = config_class(dict(DEMO_UNET, dtype=torch.float32))
    for key in ("num_heads", "num_head_channels"):  # SD15's unet_extra_config is merged in; the demo's layout wins
        config.unet_config[key] = DEMO_UNET[key]
    return _patcher(config, unet_state, load_device)


def build_wan_patcher(state: Optional[dict] = None, load_device=None):
    """A ComfyUI ModelPatcher for the video demo architecture (WAN 2.1 t2v class, :data:`DEMO_WAN`)."""
    import comfy.supported_models  # noqa: PLC0415 (host module)

    if not hasattr(comfy.supported_models, "WAN21_T2V"):
        raise RuntimeError("the video demo model needs a ComfyUI with WAN models (0.3.30 or later)")
    config = comfy.supported_models.WAN21_T2V(dict(DEMO_WAN))
    return _patcher(config, state, load_device)


def build_ltxv_patcher(state: Optional[dict] = None, load_device=None):
    """A ComfyUI ModelPatcher for the LTX-Video demo architecture (LTXV class, :data:`DEMO_LTXV`)."""
    import comfy.supported_models  # noqa: PLC0415 (host module)

    if not hasattr(comfy.supported_models, "LTXV"):
        raise RuntimeError("the LTX-Video demo model needs a ComfyUI with LTX-Video models (0.3.10 or later)")
    return _patcher(comfy.supported_models.LTXV(dict(DEMO_LTXV)), state, load_device)


def build_hunyuan_patcher(state: Optional[dict] = None, load_device=None):
    """A ComfyUI ModelPatcher for the HunyuanVideo demo architecture (HunyuanVideo class, :data:`DEMO_HUNYUAN`)."""
    import comfy.supported_models  # noqa: PLC0415 (host module)

    if not hasattr(comfy.supported_models, "HunyuanVideo"):
        raise RuntimeError("the HunyuanVideo demo model needs a ComfyUI with HunyuanVideo models (0.3.10 or later)")
    return _patcher(comfy.supported_models.HunyuanVideo(dict(DEMO_HUNYUAN)), state, load_device)


def build_qwen_patcher(state: Optional[dict] = None, load_device=None):
    """A ComfyUI ModelPatcher for the image DiT demo architecture (Qwen-Image class, :data:`DEMO_QWEN`)."""
    import comfy.supported_models  # noqa: PLC0415 (host module)

    if not hasattr(comfy.supported_models, "QwenImage"):
        raise RuntimeError("the DiT demo model needs a ComfyUI with Qwen-Image models (0.3.49 or later)")
    config = comfy.supported_models.QwenImage(dict(DEMO_QWEN))
    return _patcher(config, state, load_device)


def build_pixart_patcher(state: Optional[dict] = None, load_device=None):
    """A ComfyUI ModelPatcher for the PixArt demo architecture (PixArt-alpha class, :data:`DEMO_PIXART`), with
    v-prediction (a first eps-predicting try with 4x4 patches on a 64x64 latent stayed speckled after 45 CPU minutes
    of training)."""
    import comfy.supported_models  # noqa: PLC0415 (host module)

    if not hasattr(comfy.supported_models, "PixArtAlpha"):
        raise RuntimeError("the PixArt demo model needs a ComfyUI with PixArt models (0.3.7 or later)")
    import comfy.model_base  # noqa: PLC0415 (host module)

    class VPredictionPixArt(comfy.supported_models.PixArtAlpha):
        def get_model(self, state_dict, prefix="", device=None):
            return comfy.model_base.PixArt(self, model_type=comfy.model_base.ModelType.V_PREDICTION,
                                           device=device).eval()

    return _patcher(VPredictionPixArt(dict(DEMO_PIXART)), state, load_device)


def load_demo_model(path: str = WEIGHTS):
    """(MODEL, CLIP stand-in, VAE stand-in, metadata) of the bundled demo model."""
    unet, table, metadata = read_weights(path)
    patcher = build_unet_patcher(unet, prediction=metadata.get("prediction", "eps"))
    return patcher, DemoTextEncoder(table), DemoImageCodec(), metadata


def load_demo_video_model(path: str = VIDEO_WEIGHTS):
    """(MODEL, CLIP stand-in, VAE stand-in, metadata) of the bundled video demo model (current ComfyUI only)."""
    net, table, metadata = read_weights(path)
    return build_wan_patcher(net), DemoTextEncoder(table), DemoVideoCodec(), metadata


def load_demo_ltxv_model(path: str = LTXV_WEIGHTS):
    """(MODEL, CLIP stand-in, VAE stand-in, metadata) of the bundled LTX-Video demo model (current ComfyUI only)."""
    net, table, metadata = read_weights(path)
    return build_ltxv_patcher(net), DemoTextEncoder(table, token_mask=True), DemoLTXVCodec(), metadata


def load_demo_hunyuan_model(path: str = HUNYUAN_WEIGHTS):
    """(MODEL, CLIP stand-in, VAE stand-in, metadata) of the bundled HunyuanVideo demo model (current ComfyUI only)."""
    net, table, metadata = read_weights(path)
    return build_hunyuan_patcher(net), DemoTextEncoder(table), DemoHunyuanCodec(), metadata


def load_demo_dit_model(path: str = DIT_WEIGHTS):
    """(MODEL, CLIP stand-in, VAE stand-in, metadata) of the bundled image DiT demo model (current ComfyUI only)."""
    net, table, metadata = read_weights(path)
    return build_qwen_patcher(net), DemoTextEncoder(table), DemoVideoCodec(), metadata  # Qwen-Image's VAE is WAN's


def load_demo_pixart_model(path: str = PIXART_WEIGHTS):
    """(MODEL, CLIP stand-in, VAE stand-in, metadata) of the bundled PixArt demo model (current ComfyUI only)."""
    net, table, metadata = read_weights(path)
    return build_pixart_patcher(net), DemoTextEncoder(table), DemoImageCodec(), metadata


class _DemoLoader:
    """A loader node for one of the bundled demo models: ``_load()`` gives (MODEL, CLIP, VAE, metadata)."""

    CATEGORY = "model_patches/token_merging/demo"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    RETURN_NAMES = ("model", "clip", "vae")
    FUNCTION = "load"
    WHAT = "demo model"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    @staticmethod
    def _load():
        raise NotImplementedError

    def load(self):
        model, clip, vae, metadata = self._load()
        runs = training_runs(metadata)
        steps = training_steps(metadata) or "?"
        prediction = f", {metadata['prediction']} prediction" if "prediction" in metadata else ""
        log.info("Importance Token Merging: %s loaded (%s steps of training in %d run(s)%s, %s)", self.WHAT, steps,
                 len(runs), prediction, metadata.get("format", "unknown format"))
        return model, clip, vae


class DemoModelLoader(_DemoLoader):
    """Loads the bundled Fashion-MNIST demo model, so the pack can be tried without downloading a checkpoint."""

    DESCRIPTION = (
        "Loads the small class-conditional Fashion-MNIST diffusion model that ships with this pack (trained by the "
        "pack on ComfyUI's own UNet, ~1.5M parameters). Prompts name a class: T-shirt/top, trouser, pullover, dress, "
        "coat, sandal, shirt, sneaker, bag, ankle boot; leave the negative prompt empty. Use a 256x256 latent "
        "(one 28x28 garment, padded to 32x32, per latent), cfg about 3-5. For trying the merging nodes, not for art.")
    OUTPUT_TOOLTIPS = (
        "The demo diffusion model (SD1.5 model class, small UNet with attention at 32x32 and 16x16 tokens).",
        "Text encoder that maps a prompt naming a Fashion-MNIST class to that class's embedding.",
        "Decoder/encoder between the 4-channel 32x32 latent and a 256x256 grayscale image.",
    )
    WHAT = "demo model"
    _load = staticmethod(load_demo_model)


class DemoVideoModelLoader(_DemoLoader):
    """Loads the bundled moving-Fashion-MNIST video model (WAN 2.1 architecture), so the pack's WAN support can be
    tried without downloading a checkpoint."""

    DESCRIPTION = (
        "Loads the small class-conditional video model that ships with this pack: ComfyUI's own WAN 2.1 model class "
        "with a 4-block WanModel (~1.1M parameters) trained by the pack on moving Fashion-MNIST (a garment sliding "
        "over a dark background). Prompts name a class (T-shirt/top, trouser, pullover, dress, coat, sandal, shirt, "
        "sneaker, bag, ankle boot); leave the negative prompt empty. Use EmptyHunyuanLatentVideo at 256x256 with 13 "
        "frames (4 latent frames of 16x16 tokens), cfg about 3-5. Needs a ComfyUI with WAN models.")
    OUTPUT_TOOLTIPS = (
        "The video demo model (WAN 2.1 text-to-video class, flow matching, a small WanModel).",
        "Text encoder that maps a prompt naming a Fashion-MNIST class to that class's embedding.",
        "Decoder/encoder between the 16-channel WAN-layout latent and 256x256 grayscale frames (1 + 4 per latent "
        "frame after the first).",
    )
    WHAT = "video demo model"
    _load = staticmethod(load_demo_video_model)


class DemoLTXVModelLoader(_DemoLoader):
    """Loads the bundled moving-Fashion-MNIST video model on LTX-Video's architecture, so the pack's LTX-Video support
    can be tried without downloading a checkpoint."""

    DESCRIPTION = (
        "Loads the small class-conditional video model that ships with this pack on ComfyUI's own LTX-Video model "
        "class (4 blocks of width 128, patch size 1, ~1.3M parameters), trained by the pack on moving Fashion-MNIST "
        "(a garment sliding over a dark background). Prompts name a class (T-shirt/top, trouser, pullover, dress, "
        "coat, sandal, shirt, sneaker, bag, ankle boot); leave the negative prompt empty. Use EmptyLTXVLatentVideo at "
        "512x512 with 25 frames (4 latent frames of 16x16 tokens), cfg about 3-5. Needs a ComfyUI with LTX-Video "
        "models.")
    OUTPUT_TOOLTIPS = (
        "The LTX-Video demo model (LTXV class, flow matching, a small LTXVModel).",
        "Text encoder that maps a prompt naming a Fashion-MNIST class to that class's embedding (with a token mask, "
        "as LTX-Video's model needs).",
        "Decoder/encoder between the 128-channel LTX-Video-layout latent and 512x512 grayscale frames (1 + 8 per "
        "latent frame after the first).",
    )
    WHAT = "LTX-Video demo model"
    _load = staticmethod(load_demo_ltxv_model)


class DemoHunyuanModelLoader(_DemoLoader):
    """Loads the bundled moving-Fashion-MNIST video model on HunyuanVideo's architecture, so the pack's HunyuanVideo
    support can be tried without downloading a checkpoint."""

    DESCRIPTION = (
        "Loads the small class-conditional video model that ships with this pack on ComfyUI's own HunyuanVideo model "
        "class (2 double- and 2 single-stream blocks of width 128, ~2.2M parameters; plain CFG instead of "
        "HunyuanVideo's guidance embedding), trained by the pack on moving Fashion-MNIST (a garment sliding over a "
        "dark background). Prompts name a class (T-shirt/top, trouser, pullover, dress, coat, sandal, shirt, sneaker, "
        "bag, ankle boot); leave the negative prompt empty. Use EmptyHunyuanLatentVideo at 256x256 with 13 frames (4 "
        "latent frames of 16x16 tokens), cfg about 3-5. Needs a ComfyUI with HunyuanVideo models.")
    OUTPUT_TOOLTIPS = (
        "The HunyuanVideo demo model (HunyuanVideo class, flow matching, a small HunyuanVideo transformer).",
        "Text encoder that maps a prompt naming a Fashion-MNIST class to that class's embedding (also its pooled "
        "vector).",
        "Decoder/encoder between the 16-channel HunyuanVideo-layout latent and 256x256 grayscale frames (1 + 4 per "
        "latent frame after the first).",
    )
    WHAT = "HunyuanVideo demo model"
    _load = staticmethod(load_demo_hunyuan_model)


class DemoDiTModelLoader(_DemoLoader):
    """Loads the bundled Fashion-MNIST image DiT (Qwen-Image architecture), so the pack's DiT support can be tried
    without downloading a checkpoint."""

    DESCRIPTION = (
        "Loads the small class-conditional image model that ships with this pack: ComfyUI's own Qwen-Image model "
        "class with 6 joint-attention blocks of width 128, trained by the pack on Fashion-MNIST. Prompts name a "
        "class (T-shirt/top, trouser, pullover, dress, coat, sandal, shirt, sneaker, bag, ankle boot); leave the "
        "negative prompt empty. Use EmptySD3LatentImage at 256x256 (16x16 image tokens), cfg about 3-5. Needs a "
        "ComfyUI with Qwen-Image models.")
    OUTPUT_TOOLTIPS = (
        "The DiT demo model (Qwen-Image class, flow matching, a small transformer with joint text-image attention).",
        "Text encoder that maps a prompt naming a Fashion-MNIST class to that class's embedding.",
        "Decoder/encoder between the 16-channel WAN-layout latent (Qwen-Image's) and a 256x256 grayscale image.",
    )
    WHAT = "DiT demo model"
    _load = staticmethod(load_demo_dit_model)
