"""Adapter for ComfyUI's NextDiT (``comfy.ldm.lumina.model.NextDiT``: Lumina Image 2.0, Z-Image and Z-Image-Turbo).
Current ComfyUI only.

NextDiT refines the text and the image tokens apart (context / noise refiner layers), then runs every main layer on
one joint sequence ``[text][image][padding]`` (Z-Image pads both parts to a multiple of 32 tokens with learned pad
tokens; the image padding is the tail). Only the main layers' joint attention is merged, by :mod:`nodes.joint`'s
attention override: image tokens only, after RoPE; the refiners, text and padding never. NextDiT has no block
replacement hook, so ``scope = transformer`` falls back to the attention site (logged). Z-Image omni runs (reference
latents: several images in one sequence) are left unmerged with a note. Z-Image-Turbo runs at cfg 1: its importance
comes from ``cfg1_mode``.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional, Tuple

from ..merging import TokenGrid
from . import joint
from .settings import MergeSettings

log = logging.getLogger("comfyui_importance_tome")


def supports(model) -> bool:
    """True for ComfyUI's NextDiT itself."""
    return joint.supports_class(model, "comfy.ldm.lumina.model", "NextDiT")


class LuminaRuntime(joint.ImageRuntime):
    family = "Lumina 2 / Z-Image"
    BLOCKS = ()  # no patches_replace["dit"] in NextDiT: the attention site only

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.joint_length = -1  # tokens of the main layers' joint sequence in the forward being run

    def read_input(self, net, x, args, kwargs) -> Optional[Tuple[TokenGrid, int]]:
        if x.ndim != 4:
            return None
        patch = net.patch_size
        grid = TokenGrid(-(-x.shape[-2] // patch), -(-x.shape[-1] // patch))
        multiple = getattr(net, "pad_tokens_multiple", None)
        tail = (-grid.num_tokens) % multiple if multiple else 0  # pad tokens after the image
        context = args[1] if len(args) > 1 else kwargs.get("context")  # (timesteps, context, num_tokens, mask)
        text = context.shape[1] if context is not None else 0
        if multiple:  # Z-Image pads the text too (an empty one to one block of pad tokens)
            text = max(-(-text // multiple), 1) * multiple
        self.joint_length = text + grid.num_tokens + tail  # the main layers' sequence
        if kwargs.get("ref_latents"):
            self.refusal = ("omni", "Z-Image omni (reference latents: several images in one sequence) is left "
                            "unmerged")
        return grid, tail

    def plan(self, tokens, metric, extra, kind, block=None):
        if tokens != self.joint_length and self.refusal is None:
            return None  # a refiner layer (text or image alone; NextDiT leaves block_index set), never merged
        return super().plan(tokens, metric, extra, kind, block)


def apply(model, settings: MergeSettings, live=None):
    """Clone ``model`` and attach importance merging to NextDiT. The input model is never modified."""
    if settings.scope == "transformer":
        log.warning("Importance Token Merging: Lumina 2 / Z-Image have no block replacement hook; scope = transformer "
                    "merges the joint attention instead (scope = attention)")
        settings = dataclasses.replace(settings, scope="attention")
    return joint.apply(model, settings, LuminaRuntime, live=live)
