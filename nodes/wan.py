"""Adapter for ComfyUI's WAN 2.x video DiT (``WanModel``: WAN 2.1 t2v / i2v, WAN 2.2 14B and 5B). Current ComfyUI only.

Tokens are ``(t h w)`` on the ``grid_sizes`` grid that WanModel puts in ``transformer_options``; they merge only inside
their own latent frame (:func:`merging.frame_partition`). Two merge sites (``scope``):

* ``attention`` (default): the self-attention core of every block, through ComfyUI's attention override
  (``transformer_options["optimized_attention_override"]``, ComfyUI >= 0.3.60). WAN applies RoPE to queries and keys
  before that call, so positions travel with the tokens for free, and nothing else in the block (modulation, the
  per-token timesteps of WAN 2.2 5B, cross-attention, the FFN) sees the merged count. The first attention call of
  each block is its self-attention (WAN runs cross-attention second); a call whose query, key and value lengths are
  not the grid's token count is left alone (reference-latent tokens). Another override set before this node (e.g. a
  faster kernel) is kept and called with the merged tokens.
* ``transformer``: every whole block runs on the merged image tokens (:class:`BlockMerge`, a
  ``patches_replace["dit"]`` block replacement), RoPE frequencies and per-token modulation gathered with the tokens.

One partition per step and sample (from the keys, or the input, of the first block), shared by every block and by
cond and uncond whatever the call layout, as for UNets; ``partition_reuse = block`` computes one per block.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..merging import TokenGrid, log_slot_sizes
from .dit import OVERRIDE, ChainedBlock, ChainedOverride, VideoDiTRuntime, has_attention_override, remove_patches
from .runtime import LevelMerge, attach, runtime_of
from .settings import VIDEO_WEIGHTING, MergeSettings



def supports(model) -> bool:
    """True for ComfyUI's WanModel itself (subclasses such as VACE or S2V run other blocks: not yet)."""
    try:
        from comfy.ldm.wan.model import WanModel  # noqa: PLC0415 (absent on the 2024 ComfyUI)
    except ImportError:
        return False
    if not has_attention_override():  # the attention override (and grid_sizes) came with ComfyUI 0.3.60
        return False
    return type(getattr(getattr(model, "model", None), "diffusion_model", None)) is WanModel


class WanRuntime(VideoDiTRuntime):
    """Which attention calls of a WAN forward are merged (the partitions: :class:`nodes.dit.VideoDiTRuntime`)."""

    family = "WAN"
    MERGE_WEIGHTING = VIDEO_WEIGHTING  # the image models' weighting: 1-3.7 dB less faithful on the video demo model

    def plan(self, q, k, v, kwargs: dict, extra: dict) -> Optional[LevelMerge]:
        """The merge for this attention call (``scope = attention``), or None to run it as it is."""
        run = self._forward(extra)
        if run is None:
            return None
        marker, run.site_marker = run.site_marker, (extra, extra["block_index"])
        if marker is not None and marker[0] is extra and marker[1] == extra["block_index"]:
            return None  # the block's second attention call: cross-attention
        if not run.call_active:
            return None
        if kwargs.get("skip_reshape") or kwargs.get("skip_output_reshape") or kwargs.get("mask") is not None:
            self.note("layout", "self-attention called with another tensor layout or a mask; left unmerged")
            return None
        if q.ndim != 3 or k.ndim != 3 or v.ndim != 3 or not q.shape[1] == k.shape[1] == v.shape[1]:
            return self.refuse(q.shape[1], self._grid(extra))
        return self._site_merge("self", k, extra)

    def plan_block(self, x: torch.Tensor, extra: dict) -> Optional[LevelMerge]:
        """The merge of a whole block's image tokens (``scope = transformer``), or None to run it unmerged."""
        run = self._forward(extra)
        if run is None or not run.call_active:
            return None
        if x.ndim != 3:
            return None
        return self._site_merge("block", x, extra)

    def _forward(self, extra: dict):
        """The run, after the forward's bookkeeping, for a call inside a WAN block; None elsewhere."""
        grid_sizes = extra.get("grid_sizes")
        if extra.get("block_index") is None or grid_sizes is None or len(grid_sizes) != 3:
            return None
        return self.begin_forward(extra, extra)  # a forward = one transformer_options dict (a new one per call)

    @staticmethod
    def _grid(extra: dict) -> TokenGrid:
        frames, height, width = (int(n) for n in extra["grid_sizes"])
        return TokenGrid(height, width, frames)

    def _site_merge(self, kind: str, metric: torch.Tensor, extra: dict) -> Optional[LevelMerge]:
        return self.grid_merge(kind, metric, extra, self._grid(extra), extra["block_index"])


class SelfAttentionOverride(ChainedOverride):
    """``optimized_attention_override``: merge q / k / v of WAN self-attention, restore the output's length."""

    def __call__(self, func, *args, **kwargs):
        extra = kwargs.get("transformer_options")
        runtime = runtime_of(extra) if isinstance(extra, dict) else None
        if not isinstance(runtime, WanRuntime) or len(args) < 3:
            return self._call(func, args, kwargs)
        q, k, v = args[:3]
        plan = runtime.plan(q, k, v, kwargs, extra)
        if plan is None:
            return self._call(func, args, kwargs)
        runtime.run.summary.merged_calls += 1
        part = plan.partition
        merged = tuple(part.merge(t, plan.mode) for t in (q, k, v))
        out = self._call_merged(func, merged, tuple(args[3:]), kwargs, runtime, plan,
                                lambda: log_slot_sizes(part.slot_counts))
        return part.unmerge(out)


class BlockMerge(ChainedBlock):
    """``patches_replace["dit"][("double_block", i)]`` (``scope = transformer``): the whole block (self-attention,
    cross-attention, FFN) runs on the merged image tokens, and every token adds its slot's update to its own input:
    ``x + unmerge(block(merge(x)) - merge(x))``. RoPE frequencies and per-token modulation (WAN 2.2 5B) travel with the
    tokens (each slot takes its kept token's); per-frame modulation needs nothing, since slots stay in frame order
    (with ``video_tokens = across_frames`` it is spread over the tokens first, then gathered like per-token data)."""

    def __call__(self, args: dict, extra: dict) -> dict:
        options = args.get("transformer_options") or {}
        runtime = runtime_of(options)
        x = args.get("img")
        plan = runtime.plan_block(x, options) if isinstance(runtime, WanRuntime) and x is not None else None
        if plan is None:
            return self._run_block(args, extra)
        part = plan.partition
        merged = part.merge(x, plan.mode)
        block_args = dict(args, img=merged)
        cache = runtime.run.partitions  # reset every forward: the blocks of a forward share one gather per tensor
        frames = int((options.get("grid_sizes") or (1,))[0])
        for name in ("vec", "pe"):
            value = args.get(name)
            if not isinstance(value, torch.Tensor) or value.ndim < 3:
                continue
            per_frame = (name == "vec" and 1 < value.shape[1] < x.shape[1] and value.shape[1] == frames
                         and part.frames != frames)
            if value.shape[1] != x.shape[1] and not per_frame:
                continue  # one entry for all tokens (or per frame with per-frame merging): nothing to gather
            key = ("gathered", name, id(plan))
            if key not in cache or cache[key][0] is not value:
                # per token: each slot takes its kept token's entry. Per-frame modulation with spatio-temporal
                # merging (frames keep different shares, so WAN's repeat of each frame's entry over L'/T slots would
                # misalign) is first spread over the frame's tokens
                spread = value.repeat_interleave(x.shape[1] // frames, dim=1) if per_frame else value
                cache[key] = (value, part.gather(spread))
            block_args[name] = cache[key][1]
        out = self._run_block(block_args, extra)
        runtime.run.summary.merged_calls += 1
        return dict(out, img=x + part.unmerge(out["img"] - merged))


def apply(model, settings: MergeSettings, live=None):
    """Clone ``model`` and attach importance merging to WAN self-attention. The input model is never modified."""
    patched = model.clone()
    remove_patches(patched, BlockMerge, SelfAttentionOverride)
    attach(patched, WanRuntime(settings, patched.model, live=live), settings)
    options = patched.model_options["transformer_options"]
    if settings.scope == "transformer":
        blocks = options.get("patches_replace", {}).get("dit", {})
        for index in range(len(patched.model.diffusion_model.blocks)):
            previous = blocks.get(("double_block", index))
            patched.set_model_patch_replace(BlockMerge(previous), "dit", "double_block", index)
    else:
        options[OVERRIDE] = SelfAttentionOverride(options.get(OVERRIDE))
    return patched
