"""Adapter for ComfyUI's SD3 / SD3.5 MMDiT (``comfy.ldm.modules.diffusionmodules.mmdit``: SD3 medium, SD3.5
medium / large / large turbo). Current ComfyUI only.

Every joint block runs one attention over ``cat(context, x)`` (:mod:`nodes.joint` merges the image part; the text, and
the register tokens prepended to it, never merge); SD3.5 medium adds an image-only self-attention ``attn2`` in some
blocks, merged the same way. Positions are an absolute embedding added once at the input, so nothing positional
travels with the tokens. MMDiT gives its blocks no block index and has no ``DIFFUSION_MODEL`` wrapper: the grid comes
from an ``APPLY_MODEL`` wrapper and each block replacement knows its own index. Attention runs in ComfyUI's
``[B, L, heads * head_dim]`` layout.
"""
from __future__ import annotations

from . import joint
from .settings import MergeSettings


def supports(model) -> bool:
    """True for ComfyUI's SD3 model (the MMDiT class it builds; other MMDiT users such as ControlNets are not) on a
    host with APPLY_MODEL wrappers."""
    if not joint.supports_class(model, "comfy.ldm.modules.diffusionmodules.mmdit", "OpenAISignatureMMDITWrapper"):
        return False  # (checks the host's hooks first: the 2024 host has no comfy.patcher_extension)
    import comfy.patcher_extension  # noqa: PLC0415 (host module)

    return hasattr(comfy.patcher_extension.WrappersMP, "APPLY_MODEL")


class MMDiTRuntime(joint.PatchedLatentRuntime):
    family = "SD3"
    BLOCKS = (("double_block", "joint_blocks"),)


def apply(model, settings: MergeSettings, live=None):
    """Clone ``model`` and attach importance merging to SD3's MMDiT. The input model is never modified."""
    return joint.apply(model, settings, MMDiTRuntime, live=live)
