"""The node classes (ComfyUI's V1 node API, so the 2024 and current hosts both load them).

Node ids are permanent: they are stored in saved workflows. Never rename them.
"""
from __future__ import annotations

import dataclasses
import logging

from . import flux, hunyuan, lumina, ltxv, pixart, qwen, sd3, unet, wan
from .preview import LivePreview, MergePreview
from .settings import (
    AUTO, CFG1_MODES, IMPORTANCE_SOURCES, LEVEL_CHOICES, MAX_RATIO, PARTITION_REUSE, SCOPES, TILE_CHOICES, VIDEO_TOKENS,
    WARMUP_MODES,
    MergeSettings,
)
from ..merging import DST_MODES

log = logging.getLogger("comfyui_importance_tome")

CATEGORY = "model_patches/token_merging"

_MODEL_IN = ("MODEL", {"tooltip": "The diffusion model to speed up: SD1.x, SD2.x, SDXL and other UNet models; on "
                                  "current ComfyUI also WAN 2.x, HunyuanVideo and LTX-Video (per latent frame), "
                                  "Flux, SD3 / SD3.5, "
                                  "Qwen-Image, Z-Image / Lumina 2 and PixArt-α / Σ (image tokens only; text and "
                                  "reference tokens never merge). Other "
                                  "models pass through unchanged with a warning."})
_COMMON = {
    "ratio": ("FLOAT", {
        "default": 0.5, "min": 0.0, "max": MAX_RATIO, "step": 0.05,
        "tooltip": "Fraction of tokens merged away before self-attention at the merged levels (0 = off, max 0.75). "
                   "0.5 halves the tokens; higher is faster and loses more detail.",
    }),
    "importance": (list(IMPORTANCE_SOURCES), {
        "default": "cfg",
        "tooltip": "cfg: keep the tokens where the prompt matters most (|cond - uncond| of the previous step, the "
                   "paper's method; at cfg 1, with no uncond pass: on diffusion transformers how much each position's "
                   "prediction moved since the previous step, on UNets plain ToMe (the moved map too on ComfyUI before "
                   "0.3.60), see cfg1_mode on the Advanced node). random: plain ToMe random merging, for A/B "
                   "comparisons.",
    }),
    "start_percent": ("FLOAT", {
        "default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
        "tooltip": "Start merging at this fraction of the sampling schedule (0 = first step).",
    }),
    "end_percent": ("FLOAT", {
        "default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
        "tooltip": "Stop merging after this fraction of the schedule (1 = last step).",
    }),
    "levels": (list(LEVEL_CHOICES), {
        "default": "auto",
        "tooltip": "UNet levels whose self-attention is merged (0 = latent resolution, 1 = half, ...). auto: the "
                   "highest-resolution level that has attention (level 0 on SD1.x/2.x, level 1 on SDXL). "
                   "auto+1 also merges the next level down. Transformer models (WAN, HunyuanVideo, LTX-Video, "
                   "Flux, SD3, Qwen-Image, Z-Image): not used (every block is merged). PixArt: auto = the paper's "
                   "blocks "
                   "(the middle half: 7-20 of 28), auto+1 = every block.",
    }),
    "scope": (list(SCOPES), {
        "default": "attention",
        "tooltip": "attention: only self-attention runs on merged tokens. queries (UNet models): only the "
                   "self-attention queries merge, keys and values keep every token, as in ComfyUI's built-in "
                   "node: the most faithful of this pack's sites, less speed per ratio (see the README's "
                   "speed-fidelity picture); other models use attention instead. transformer: whole "
                   "transformer stacks (self-attention, cross-attention, feed-forward) run on merged tokens, each "
                   "token keeping its own input: faster (SD1.5 768² with SDPA: 1.41x instead of 1.34x at 0.5), but much "
                   "less faithful (on the UNet demo model 7-8.5 dB further from the unmerged image at ratio "
                   "0.3-0.5); other "
                   "patches inside those blocks then see the merged token count. WAN, HunyuanVideo, LTX-Video, "
                   "Flux, SD3, "
                   "Qwen-Image: attention = the image tokens of each block's self-/joint attention; transformer = "
                   "whole blocks on merged image tokens (Flux 1024²: about 1.9x instead of 1.1-1.15x with SDPA; far "
                   "less faithful on the video demo model, less on the image DiT demo model). Z-Image / Lumina 2 "
                   "have no block hook: attention only. PixArt: attention = its self-attention (queries, keys and "
                   "values), transformer = whole blocks.",
    }),
}
_MODEL_OUT_TOOLTIP = "The model with importance-based token merging; the input model is left unchanged."


_HIDDEN = {"unique_id": "UNIQUE_ID"}  # the node's id in the graph: the live preview is shown on this node


# one per model family: supports(model) -> bool, apply(model, settings, live) -> model
ADAPTERS = (unet, wan, hunyuan, ltxv, flux, sd3, qwen, lumina, pixart)


def _patch(model, settings: MergeSettings, node_id=None):
    adapter = next((a for a in ADAPTERS if a.supports(model)), None)
    if adapter is None:
        name = type(getattr(getattr(model, "model", None), "diffusion_model", getattr(model, "model", model))).__name__
        log.warning("Importance Token Merging: %s models are not supported yet; passing the model through unchanged.",
                    name)
        return (model,)
    if settings.ratio == 0:
        log.info("Importance Token Merging: ratio 0, merging is off; the model passes through unchanged.")
        return (model,)
    if settings.scope == "queries" and adapter is not unet:
        log.warning("Importance Token Merging: scope = queries is a UNet merging site; %s models merge the image "
                    "tokens' queries, keys and values instead (scope = attention)", adapter.__name__.rsplit(".", 1)[-1])
        settings = dataclasses.replace(settings, scope="attention")
    live = LivePreview(node_id) if node_id is not None else None
    return (adapter.apply(model, settings, live=live),)


class ImportanceTokenMerging:
    DESCRIPTION = ("Speeds up sampling by merging similar tokens before self-attention, keeping the tokens that "
                   "classifier-free guidance marks as important (Wu et al., ICCV 2025). While a sampler runs, the node "
                   "shows the latest importance map and merge map in the web UI.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = (_MODEL_OUT_TOOLTIP,)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": _MODEL_IN, **_COMMON}, "hidden": _HIDDEN}

    def patch(self, model, ratio, importance, start_percent, end_percent, levels, scope, unique_id=None):
        return _patch(model, MergeSettings(ratio=ratio, importance=importance, start_percent=start_percent,
                                           end_percent=end_percent, levels=levels, scope=scope), unique_id)


class ImportanceTokenMergingAdvanced(ImportanceTokenMerging):
    DESCRIPTION = ImportanceTokenMerging.DESCRIPTION + " Exposes every setting of the method."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": _MODEL_IN,
            **_COMMON,
            "dst_fraction": ("FLOAT", {
                "default": 0.25, "min": 0.05, "max": 0.5, "step": 0.05,
                "tooltip": "Fraction of tokens that become merge destinations. The ratio can be at most "
                           "1 - dst_fraction / pool_scale.",
            }),
            "pool_scale": ("FLOAT", {
                "default": 1.2, "min": 1.0, "max": 4.0, "step": 0.1,
                "tooltip": "Size of the pool of important tokens, as a multiple of the tokens that survive. 1.0 keeps "
                           "exactly the most important tokens; larger lets similar important tokens merge instead.",
            }),
            "dst_mode": (list(DST_MODES), {
                "default": "grid",
                "tooltip": "Where merged tokens go. grid (default): one random destination per 2x2 cell over the whole "
                           "image, so tokens merge into nearby similar ones; the importance map decides which tokens "
                           "are forced to merge and which stay. grid_top: the most important token of each cell. "
                           "random / top / evenly: destinations drawn from the pool of important tokens (randomly, the "
                           "most important, evenly through the ranking; the paper uses random).",
            }),
            "warmup_mode": (list(WARMUP_MODES), {
                "default": "merge",
                "tooltip": "Steps without an importance map yet (the first step): merge = average merged tokens (plain "
                           "ToMe; closer to the unmerged image in the quality benchmark); prune = drop them and copy "
                           "their destination's output (the paper's warm-up).",
            }),
            "cfg1_mode": (list(CFG1_MODES), {
                "default": "auto",
                "tooltip": "When there is no uncond pass (cfg = 1: turbo/LCM, Flux, distilled video LoRAs), so no "
                           "CFG importance map: change = importance is how much each position's denoised prediction "
                           "moved since the previous step (no extra model pass; plain ToMe for the first two steps); "
                           "random = plain ToMe merging; force_uncond = compute the uncond pass anyway to get the CFG "
                           "map (costs a second model pass per step); auto (default) = change on diffusion "
                           "transformers (Flux, WAN, ...) and on UNets at scope = attention without proportional "
                           "attention (ComfyUI before 0.3.60), random on other UNets (SD1.x / SDXL), as measured. "
                           "Logged once per run.",
            }),
            "merge_cross_attn": ("BOOLEAN", {
                "default": False,
                "tooltip": "Also run cross-attention (text) on the merged tokens: faster, slightly less faithful. "
                           "(Always the case with scope = transformer.) UNet models and PixArt (the paper merges "
                           "PixArt's cross-attention too).",
            }),
            "merge_seed": ("INT", {
                "default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                "tooltip": "Seed for the random choices of the partition (destinations, warm-up cells). The sampler's "
                           "own noise is not affected.",
            }),
        }, "optional": {
            # optional (added in 0.2.0) so that API prompts saved before it still validate
            "tiles": (list(TILE_CHOICES), {
                "default": "1x1",
                "tooltip": "Multi-view images tiled in one latent (Zero123++: 3x2 = 3 rows, 2 columns of views): tokens "
                           "are only merged with tokens of the same view. 1x1 = an ordinary image. The latent must "
                           "split into equal tiles at the merged levels, otherwise those levels stay unmerged.",
            }),
            "partition_reuse": (list(PARTITION_REUSE), {
                "default": "stage",
                "tooltip": "How often the merge partition is recomputed in one model evaluation. stage: once for the "
                           "down blocks and once for the up blocks of each merged level (their features differ; about "
                           "2 dB closer to the unmerged image than level in an earlier quality benchmark). level: "
                           "one partition "
                           "for all blocks of a level (least index work). block: one per transformer block.",
            }),
            "temporal_ratio": ("FLOAT", {
                "default": 0.0, "min": 0.0, "max": 1.0, "step": 0.05,
                "tooltip": "Video only (the latent batch is a sequence of frames: SVD, SV3D, AnimateDiff, vid2vid "
                           "batches): neighbouring frames share the self-attention queries of their most alike tokens, "
                           "so each frame computes 1 - temporal_ratio/2 of its merged queries. 0 = off. Each pair of "
                           "frames then shares one spatial partition (their mean importance). Do not use it on a batch "
                           "of unrelated images. Needs scope = attention or queries.",
            }),
            "protect": ("FLOAT", {
                "default": AUTO, "min": AUTO, "max": 0.9, "step": 0.05,
                "tooltip": "Fraction of all tokens, the most important ones by the importance map, that are never "
                           "merged away (they stay as themselves unless the ratio needs them; then the least "
                           "important of them merge first). 0 = off. Beyond the paper; works with every dst_mode. "
                           "-1 = the model family's value: 0.1 on UNets at scope = attention with proportional "
                           "attention (current ComfyUI) up to ratio 0.5, fading to 0 at 0.7; 0 elsewhere.",
            }),
            "weight_power": ("FLOAT", {
                "default": AUTO, "min": AUTO, "max": 4.0, "step": 0.25,
                "tooltip": "0 = merged tokens are plain averages. > 0: importance-weighted averages (weight = "
                           "(importance / mean importance) ^ weight_power), so each merged slot stays close to its "
                           "most important token. Beyond the paper. -1 = the model family's value: 3 on UNets and "
                           "image transformers, 0 with scope = queries and on PixArt and the video transformers (plain "
                           "means measured more faithful there).",
            }),
            "affinity": ("FLOAT", {
                "default": AUTO, "min": AUTO, "max": 0.95, "step": 0.05,
                "tooltip": "0 = tokens merge into the destination whose features are most alike (ToMe). > 0: that "
                           "share of the similarity comes from how alike the two tokens' importance is, so background "
                           "tokens merge into background and detail into detail. Beyond the paper. -1 = the model "
                           "family's value: 0.2 on UNets and image transformers, 0.5 on PixArt, 0 on the video "
                           "transformers (WAN, HunyuanVideo, LTX-Video).",
            }),
            "video_tokens": (list(VIDEO_TOKENS), {
                "default": "per_frame",
                "tooltip": "Video transformers (WAN, HunyuanVideo, LTX-Video): per_frame = tokens merge only with "
                           "tokens of the "
                           "same latent frame and every frame keeps the same share; across_frames = spatio-temporal "
                           "merging, a token may merge into the most alike destination of any frame (static regions "
                           "merge over time; frames keep different shares). Ignored on UNet models.",
            }),
            "proportional_attention": ("BOOLEAN", {
                "default": True,
                "tooltip": "Each merged token counts as many times as the tokens it stands for in self-attention "
                           "(log of the count added to its attention logits, as in ToMe), so merged regions keep "
                           "their share of attention (next to the text tokens, in joint attention). UNets, scope = "
                           "attention: 2-9 dB closer to the unmerged image on the UNet demo model at ratios 0.3-0.7; "
                           "scope = transformer: about 1 dB (both need ComfyUI 0.3.60 or newer; older ComfyUI merges "
                           "without it, logged). Transformers (Flux, SD3 / SD3.5, Qwen-Image, Z-Image, HunyuanVideo, "
                           "WAN, LTX-Video), scope = attention: about 1-2 dB on the DiT demo models. Ignored with "
                           "scope = queries (keys are not merged), with scope = transformer on transformers (measured "
                           "worse there) and on PixArt, whose attention kernel the node cannot reach.",
            }),
        }, "hidden": _HIDDEN}

    def patch(self, model, ratio, importance, start_percent, end_percent, levels, scope, dst_fraction, pool_scale,
              dst_mode, warmup_mode, cfg1_mode, merge_cross_attn, merge_seed, tiles="1x1",
              partition_reuse="stage", temporal_ratio=0.0, protect=AUTO, weight_power=AUTO,
              affinity=AUTO, video_tokens="per_frame", proportional_attention=True, unique_id=None):
        settings = MergeSettings(ratio=ratio, importance=importance, start_percent=start_percent,
                                 end_percent=end_percent, levels=levels, scope=scope, dst_fraction=dst_fraction,
                                 pool_scale=pool_scale, dst_mode=dst_mode, warmup_mode=warmup_mode, cfg1_mode=cfg1_mode,
                                 merge_cross_attn=merge_cross_attn, seed=merge_seed, tiles=tiles,
                                 partition_reuse=partition_reuse, temporal_ratio=temporal_ratio, protect=protect,
                                 weight_power=weight_power, affinity=affinity, video_tokens=video_tokens,
                                 proportional_attention=proportional_attention)
        return _patch(model, settings, unique_id)


NODE_CLASS_MAPPINGS = {
    "ITM_ImportanceTokenMerging": ImportanceTokenMerging,
    "ITM_ImportanceTokenMergingAdvanced": ImportanceTokenMergingAdvanced,
    "ITM_MergePreview": MergePreview,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ITM_ImportanceTokenMerging": "Importance Token Merging",
    "ITM_ImportanceTokenMergingAdvanced": "Importance Token Merging (Advanced)",
    "ITM_MergePreview": "Token Merging Preview",
}
