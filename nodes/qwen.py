"""Adapter for ComfyUI's Qwen-Image (``comfy.ldm.qwen_image.model.QwenImageTransformer2DModel``: Qwen-Image, the
Edit models, Lightning LoRAs on them). Current ComfyUI only.

Every block is a double-stream block whose joint attention runs over ``cat(txt, img)`` after RoPE, like Flux's
(:mod:`nodes.joint` does the merging). Image tokens are ``(t h w)`` with a 2×2 patch on Qwen-Image's 5-D latent;
edit models' reference latents are appended after them (the tail); text and reference tokens never merge. With the
``index_timestep_zero`` reference method the blocks modulate the reference tokens from an index the block
replacement cannot move, so ``scope = transformer`` leaves those runs unmerged (noted); the attention site is
unaffected.
"""
from __future__ import annotations

from typing import Optional, Tuple

from ..merging import TokenGrid
from . import joint
from .settings import MergeSettings


def supports(model) -> bool:
    """True for ComfyUI's Qwen-Image transformer itself."""
    return joint.supports_class(model, "comfy.ldm.qwen_image.model", "QwenImageTransformer2DModel")


class QwenRuntime(joint.ImageRuntime):
    family = "Qwen-Image"
    BLOCKS = (("double_block", "transformer_blocks"),)

    def read_input(self, net, x, args, kwargs) -> Optional[Tuple[TokenGrid, int]]:
        if x.ndim != 5:
            return None
        patch = net.patch_size
        refs = args[3] if len(args) > 3 else kwargs.get("ref_latents")  # (timestep, context, mask, ref_latents, ...)
        if refs and self.settings.scope == "transformer" and \
                kwargs.get("ref_latents_method", net.default_ref_method) == "index_timestep_zero":
            self.refusal = ("timestep-zero", "reference latents with the index_timestep_zero method: whole blocks "
                            "cannot move the reference tokens' modulation index; left unmerged (scope = attention "
                            "works)")
        tail = sum(ref.shape[-3] * -(-ref.shape[-2] // patch) * -(-ref.shape[-1] // patch) for ref in refs or ())
        return TokenGrid(-(-x.shape[-2] // patch), -(-x.shape[-1] // patch), x.shape[-3]), tail


def apply(model, settings: MergeSettings, live=None):
    """Clone ``model`` and attach importance merging to Qwen-Image. The input model is never modified."""
    return joint.apply(model, settings, QwenRuntime, live=live)
