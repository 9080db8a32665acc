"""Adapter for ComfyUI's Flux (``comfy.ldm.flux.model.Flux``: Flux.1 dev / schnell / Fill / Kontext, Flux.2).
Current ComfyUI only.

Flux runs double-stream blocks (image and text streams, one joint attention over ``cat(txt, img)``) and then
single-stream blocks on ``cat(txt, img)`` (:mod:`nodes.joint` does the merging). Image tokens are ``(h w)`` with a
2×2 patch; Kontext / Flux.2 reference latents are appended after them (the tail), text comes first: neither is ever
merged. RoPE positions travel with the tokens at the whole-block site. Flux dev and schnell run at cfg 1 (no uncond
pass): their importance then comes from ``cfg1_mode`` (``change``, what ``auto`` takes on DiTs: how much each
position's prediction moved since the previous step; ``random``: plain ToMe).
"""
from __future__ import annotations

from typing import Optional, Tuple

from ..merging import TokenGrid
from . import joint
from .settings import MergeSettings


def supports(model) -> bool:
    """True for ComfyUI's Flux class itself (subclasses such as the Flux ControlNet are other models)."""
    return joint.supports_class(model, "comfy.ldm.flux.model", "Flux")


def _tokens(height: int, width: int, patch: int) -> Tuple[int, int]:
    """Token rows and columns of a latent (Flux pads it up to a multiple of the patch)."""
    return -(-height // patch), -(-width // patch)


class FluxRuntime(joint.ImageRuntime):
    family = "Flux"

    def read_input(self, net, x, args, kwargs) -> Optional[Tuple[TokenGrid, int]]:
        if x.ndim != 4:
            return None
        patch = net.patch_size
        refs = args[4] if len(args) > 4 else kwargs.get("ref_latents")  # (timestep, context, y, guidance, ref_latents)
        tail = 0
        for ref in refs or ():
            rows, cols = _tokens(ref.shape[-2], ref.shape[-1], patch)
            tail += rows * cols
        return TokenGrid(*_tokens(x.shape[-2], x.shape[-1], patch)), tail


def apply(model, settings: MergeSettings, live=None):
    """Clone ``model`` and attach importance merging to Flux. The input model is never modified."""
    return joint.apply(model, settings, FluxRuntime, live=live)
