"""Adapter for ComfyUI's PixArt-α / PixArt-Σ (``comfy.ldm.pixart.pixartms.PixArtMS``), the paper's DiT. Current
ComfyUI only.

A PixArt block runs self-attention over the image tokens (``(h w)``, 2×2 patches; absolute sin-cos positions added
once at the input, no RoPE, so nothing positional travels with the tokens), cross-attention to the T5 text and an
MLP, with per-sample adaLN modulation. ComfyUI hands PixArt's blocks no ``transformer_options`` (``PixArtMS.forward``
drops them), so neither the attention override nor block replacements reach them. The way in is an ``APPLY_MODEL``
wrapper on the patched clone: for the length of one forward it registers PyTorch forward hooks on the blocks it merges
and removes them in a ``finally``; the model's classes, ComfyUI's functions and other clones are never touched.

Sites (``scope``):

* ``attention`` (the paper's): the self-attention's input (the modulated tokens) is merged, attention runs on the
  merged tokens and its output is unmerged before the gate and the residual; with ``merge_cross_attn`` the
  cross-attention's queries too, with the same partition (the paper merges both).
* ``transformer``: the whole block runs on the merged tokens; every token adds its slot's update to its own input.

Blocks (``levels``): ``auto`` = the paper's, the middle half of the stack (blocks 7–20 of PixArt-α's 28);
``auto+1`` = every block. Proportional attention needs the attention kernel, which hooks cannot reach: PixArt runs
without it. Blocks with PixArt-Σ's key/value compression (``sr_ratio > 1``: keys on the 2-D grid) stay unmerged.
"""
from __future__ import annotations

import logging
from typing import List, Optional

import torch

from . import joint
from .runtime import attach, runtime_of
from .settings import PLAIN_WEIGHTING, MergeSettings

log = logging.getLogger("comfyui_importance_tome")

PIXART_AFFINITY = 0.5  # affinity "auto" on PixArt
PAPER_BLOCKS = (7, 21, 28)  # the paper merges blocks [7, 21) of PixArt-α's 28: the same share of other depths


def supports(model) -> bool:
    """True for ComfyUI's PixArtMS itself on a host with APPLY_MODEL wrappers."""
    if not joint.supports_class(model, "comfy.ldm.pixart.pixartms", "PixArtMS"):
        return False
    import comfy.patcher_extension  # noqa: PLC0415 (host module)

    return hasattr(comfy.patcher_extension.WrappersMP, "APPLY_MODEL")


def merged_blocks(depth: int, levels: str) -> List[int]:
    """The blocks merged in a ``depth``-block PixArt: ``auto+1`` every block, otherwise the paper's middle half."""
    if levels == "auto+1":
        return list(range(depth))
    start, end, paper_depth = PAPER_BLOCKS
    return list(range(round(depth * start / paper_depth), round(depth * end / paper_depth)))


class PixArtRuntime(joint.PatchedLatentRuntime):
    family = "PixArt"
    # the paper's plain means (more faithful on the PixArt demo model), with a stronger importance affinity (0.5: held-
    # out demo images, README "PixArt")
    MERGE_WEIGHTING = (PLAIN_WEIGHTING[0], PIXART_AFFINITY)
    BLOCKS = ()
    CROSS_ATTN = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hooked = False  # hooks are on the blocks (a forward inside a forward adds none)
        self.current: Optional[dict] = None  # the forward the hooks serve: its transformer_options (a copy per call)

    def hook(self, net, handles: list) -> None:
        """Register the hooks of ``net``'s merged blocks, appending their handles to ``handles`` as it goes."""
        s = self.settings
        self.hooked = True
        for index in merged_blocks(len(net.blocks), s.levels):
            block = net.blocks[index]
            if getattr(block.attn, "sr_ratio", 1) > 1:
                self.note("kv", "blocks with key/value compression (PixArt-Sigma sr_ratio > 1) are left unmerged")
                continue
            if s.scope == "transformer":
                _merge_around(block, self, "block", index, True, handles)
                continue
            _merge_around(block.attn, self, "self", index, False, handles)
            if s.merge_cross_attn:  # the same partition (same kind and block)
                _merge_around(block.cross_attn, self, "self", index, False, handles)


def _merge_around(module, runtime: PixArtRuntime, kind: str, index: int, residual: bool, handles: list) -> None:
    """Hooks that run ``module`` on merged tokens (its first argument, [B, N, C]) and give back all tokens: the output
    unmerged, or with ``residual`` every token's input plus its slot's update. They act for the forward the runtime
    is serving (``runtime.current``); the partition is refused (noted) when the tokens are not the grid's."""
    flight = []  # (plan, input, merged input) of the calls in progress

    def before(mod, args, kwargs):
        options = runtime.current
        x = args[0] if args else None
        plan = None
        if options is not None and isinstance(x, torch.Tensor) and x.ndim == 3:
            plan = runtime.plan(x.shape[1], lambda: x, options, kind, index)
        if plan is None:
            flight.append(None)
            return None
        merged = plan.partition.merge(x, plan.mode)
        flight.append((plan, x, merged))
        return (merged,) + tuple(args[1:]), kwargs

    def after(mod, args, kwargs, output):
        entry = flight.pop() if flight else None
        if entry is None:
            return None
        plan, x, merged = entry
        runtime.run.summary.merged_calls += 1
        if residual:
            return x + plan.partition.unmerge(output - merged)
        return plan.partition.unmerge(output)

    handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
    handles.append(module.register_forward_hook(after, with_kwargs=True))


def hook_wrapper(executor, x, *args, **kwargs):
    """``APPLY_MODEL`` wrapper: the forward runs with the merging hooks on its blocks (and the grid known). The hooks
    serve a copy of this call's transformer_options, so every call (also several through one options dict) is a
    forward of its own; a forward inside it (another wrapper's) finds the hooks already there and adds none."""
    options = joint.forward_options(args, kwargs)
    runtime = runtime_of(options) if isinstance(options, dict) else None
    net = getattr(executor.class_obj, "diffusion_model", None)
    if not isinstance(runtime, PixArtRuntime) or not hasattr(net, "blocks"):
        return joint.grid_wrapper(executor, x, *args, **kwargs)
    if hasattr(net, "_orig_mod") or "torch.compile" in options.get("wrappers", {}).get("apply_model", {}):
        runtime.note("compile", "PixArt with TorchCompileModel runs unmerged: the compiled graph would be traced "
                     "again for every forward's hooks")
        return joint.grid_wrapper(executor, x, *args, **kwargs)
    outer, hooked = runtime.current, runtime.hooked
    runtime.current = dict(options)
    handles = []
    try:
        if not hooked:
            runtime.hook(net, handles)
        return joint.grid_wrapper(executor, x, *args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
        runtime.current, runtime.hooked = outer, hooked


def apply(model, settings: MergeSettings, live=None):
    """Clone ``model`` and attach importance merging to PixArt. The input model is never modified; merging attached
    by an earlier node is replaced."""
    import comfy.patcher_extension  # noqa: PLC0415 (host module)

    if settings.levels not in ("auto", "auto+1"):
        log.warning("Importance Token Merging: levels = %s names UNet levels; PixArt merges the paper's blocks "
                    "(levels = auto: the middle half of the stack; auto+1: every block)", settings.levels)
    patched = model.clone()
    joint.detach_all(patched)
    attach(patched, PixArtRuntime(settings, patched.model, live=live), settings)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, joint.WRAPPER_KEY, hook_wrapper)
    return patched
