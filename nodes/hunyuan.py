"""Adapter for ComfyUI's HunyuanVideo (``comfy.ldm.hunyuan_video.model.HunyuanVideo`` with a 3-D patch: HunyuanVideo
t2v / i2v, SkyReels). Current ComfyUI only.

HunyuanVideo runs Flux-style blocks: double-stream blocks (image and text tokens in separate streams, one joint
attention over ``cat(txt, img)``), then single-stream blocks on ``cat(txt, img)``. Image tokens are ``(t h w)`` with a
1×2×2 patch and always come last (a reference latent is prepended to them); text and reference tokens are never
merged. The token grid comes from the latent: a ``DIFFUSION_MODEL`` wrapper reads
it before every forward. Two merge sites (``scope``):

* ``attention`` (default): inside ComfyUI's attention override, the image part of the joint attention's q / k / v
  (after RoPE, layout ``[B, heads, L, head_dim]``) is merged per latent frame and the output's image part restored;
  the text part and everything outside the attention kernel see every token.
* ``transformer``: whole blocks run on the merged image tokens (``patches_replace["dit"]`` for every double and single
  block): RoPE frequencies of the image part are gathered with the tokens, the attention mask is cut to the merged
  length (its image part is all zeros), the i2v first-frame modulation ranges are moved to the merged frame boundary,
  and every token adds its slot's update to its own input.

Partitions are built like WAN's (:class:`nodes.dit.VideoDiTRuntime`): one per step and sample, per latent frame.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..merging import TokenGrid
from .dit import OVERRIDE, VideoDiTRuntime, remove_patches
from .runtime import KEY, LevelMerge, attach, runtime_of
from .settings import MergeSettings

WRAPPER_KEY = "importance_tome_grid"


def supports(model) -> bool:
    """True for ComfyUI's HunyuanVideo with a 3-D patch (video); HunyuanImage's 2-D variant is not supported yet."""
    try:
        import comfy.patcher_extension  # noqa: PLC0415 (host modules)
        from comfy.ldm.hunyuan_video.model import HunyuanVideo  # noqa: PLC0415
        from comfy.ldm.modules import attention  # noqa: PLC0415
    except ImportError:
        return False
    if not hasattr(attention, "wrap_attn") or not hasattr(comfy.patcher_extension.WrappersMP, "DIFFUSION_MODEL"):
        return False
    net = getattr(getattr(model, "model", None), "diffusion_model", None)
    return type(net) is HunyuanVideo and len(getattr(net, "patch_size", ())) == 3


class HunyuanRuntime(VideoDiTRuntime):
    """Which calls of a HunyuanVideo forward are merged; ``grid`` is the forward's image token grid."""

    family = "HunyuanVideo"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.grid: Optional[TokenGrid] = None  # set by the DIFFUSION_MODEL wrapper for the forward being run

    def _forward(self, extra: dict):
        if self.grid is None or extra.get("block_index") is None or extra.get("block_type") not in ("double", "single"):
            return None  # outside the blocks (the text token refiner), or a forward this wrapper did not see
        run = self.begin_forward(extra, extra)  # a forward = one transformer_options copy (forward_orig makes it)
        return run if run.call_active else None

    def plan(self, tokens: int, metric: Callable[[], torch.Tensor], extra: dict, kind: str) -> Optional[LevelMerge]:
        """The merge of the image tokens (the last ``grid`` tokens of a ``tokens``-long sequence; ``metric()`` gives
        their features), or None to run the call unmerged."""
        if self._forward(extra) is None:
            return None
        grid = self.grid
        if tokens < grid.num_tokens:
            return self.refuse(tokens, grid)
        return self.grid_merge(kind, metric(), extra, grid, extra["block_index"])


def grid_wrapper(executor, x, *args, **kwargs):
    """``DIFFUSION_MODEL`` wrapper: tells the runtime the image token grid of this forward."""
    options = kwargs.get("transformer_options")
    if options is None:
        options = next((a for a in args if isinstance(a, dict) and KEY in a), None)
    runtime = runtime_of(options) if isinstance(options, dict) else None
    if not isinstance(runtime, HunyuanRuntime) or x.ndim != 5:
        return executor(x, *args, **kwargs)
    pt, ph, pw = executor.class_obj.patch_size
    t, h, w = x.shape[2:]
    runtime.grid = TokenGrid((h + ph // 2) // ph, (w + pw // 2) // pw, (t + pt // 2) // pt)
    try:
        return executor(x, *args, **kwargs)
    finally:
        runtime.grid = None


def _mask_for(mask, kept: int, runtime) -> tuple:
    """(usable, the attention mask with its image part, the last tokens, cut to ``kept``); that part must be all
    zeros (HunyuanVideo masks only padded text tokens)."""
    if mask is None:
        return True, None
    before = mask.shape[-1] - runtime.grid.num_tokens if isinstance(mask, torch.Tensor) else -1
    if before < 0 or bool(mask[..., before:].abs().amax() > 0):
        runtime.note("mask", "an attention mask over the image tokens; those calls are left unmerged")
        return False, None
    return True, mask[..., :before + kept]


class JointAttentionOverride:
    """``optimized_attention_override``: merge the image part of HunyuanVideo's joint attention, restore it after."""

    def __init__(self, previous=None) -> None:
        self.previous = previous  # an override set before this node: called with the merged tokens

    def _call(self, func, args, kwargs):
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    def __call__(self, func, *args, **kwargs):
        extra = kwargs.get("transformer_options")
        runtime = runtime_of(extra) if isinstance(extra, dict) else None
        if not isinstance(runtime, HunyuanRuntime) or len(args) < 3 or runtime.grid is None:
            return self._call(func, args, kwargs)
        q, k, v = args[:3]
        if not kwargs.get("skip_reshape") or kwargs.get("skip_output_reshape") or q.ndim != 4 or \
                not q.shape[2] == k.shape[2] == v.shape[2]:
            return self._call(func, args, kwargs)  # not the blocks' joint attention ([B, heads, L, head_dim])
        batch, heads, length, dim = q.shape
        image = runtime.grid.num_tokens
        text = length - image
        plan = runtime.plan(length, lambda: k[:, :, text:].permute(0, 2, 1, 3).reshape(batch, image, heads * dim),
                            extra, "self")
        if plan is None:
            return self._call(func, args, kwargs)
        part = plan.partition
        usable, mask = _mask_for(kwargs.get("mask"), part.sizes.num_kept, runtime)
        if not usable:
            return self._call(func, args, kwargs)

        def merge(t):
            flat = t[:, :, text:].permute(0, 2, 1, 3).reshape(batch, image, heads * dim)
            merged = part.merge(flat, plan.mode).reshape(batch, -1, heads, dim).permute(0, 2, 1, 3)
            return torch.cat([t[:, :, :text], merged], dim=2)

        runtime.run.summary.merged_calls += 1
        call_kwargs = dict(kwargs, mask=mask) if "mask" in kwargs else kwargs
        out = self._call(func, tuple(merge(t) for t in (q, k, v)) + tuple(args[3:]), call_kwargs)  # [B, L', H*D]
        return torch.cat([out[:, :text], part.unmerge(out[:, text:])], dim=1)


class BlockMerge:
    """``patches_replace["dit"]`` for a double or single block (``scope = transformer``): the block runs on the merged
    image tokens (text unmerged), and every image token adds its slot's update to its own input."""

    def __init__(self, kind: str, previous=None) -> None:
        self.kind = kind  # "double_block" or "single_block"
        self.previous = previous  # another node's replacement of this block: called with the merged tokens

    def __call__(self, args: dict, extra: dict) -> dict:
        def run_block(block_args):
            if self.previous is not None:
                return self.previous(block_args, extra)
            return extra["original_block"](block_args)

        options = args.get("transformer_options") or {}
        runtime = runtime_of(options)
        x = args.get("img")
        if not isinstance(runtime, HunyuanRuntime) or runtime.grid is None or not isinstance(x, torch.Tensor):
            return run_block(args)
        double = self.kind == "double_block"
        image = runtime.grid.num_tokens
        before = x.shape[1] - image  # image tokens come last: after the text (single blocks) and any reference latent
        plan = runtime.plan(x.shape[1], lambda: x[:, before:], options, "block") if before >= 0 else None
        if plan is None:
            return run_block(args)
        part = plan.partition
        kept = part.sizes.num_kept
        pe = args.get("pe")  # RoPE over cat(txt, [reference,] img) in both kinds of block: token axis 2
        pe_before = pe.shape[2] - image if isinstance(pe, torch.Tensor) and pe.ndim >= 3 else -1
        usable, mask = _mask_for(args.get("attention_mask"), kept, runtime)
        dims_key = "modulation_dims_img" if double else "modulation_dims"
        dims = _merged_dims(args.get(dims_key), part, runtime, offset=before)
        if not usable or dims is False:
            return run_block(args)
        img = x[:, before:]
        merged = part.merge(img, plan.mode)
        block_args = dict(args, img=torch.cat([x[:, :before], merged], dim=1), attention_mask=mask)
        block_args[dims_key] = dims
        if pe_before >= 0:
            cache = runtime.run.partitions  # reset every forward: the blocks of a forward share one gather
            key = ("gathered", "pe", id(plan))
            if key not in cache or cache[key][0] is not pe:
                moved = part.gather(pe[:, :, pe_before:].transpose(1, 2)).transpose(1, 2)
                cache[key] = (pe, torch.cat([pe[:, :, :pe_before], moved], dim=2))
            block_args["pe"] = cache[key][1]
        out = run_block(block_args)
        runtime.run.summary.merged_calls += 1
        result = out["img"]
        return dict(out, img=torch.cat([result[:, :before], img + part.unmerge(result[:, before:] - merged)], dim=1))


def _merged_dims(dims, part, runtime, offset: int):
    """HunyuanVideo i2v's modulation ranges ``[(start, end, index), ...]`` (token ranges of the block's sequence,
    whose image tokens start at ``offset``) on the merged sequence; None stays None; False: not mappable (a range
    boundary inside a latent frame, or frames that keep different shares), the block then runs unmerged."""
    if not dims:
        return dims
    grid = runtime.grid
    per_frame = grid.height * grid.width
    if part.frames != grid.frames:
        runtime.note("dims", "i2v modulation ranges with video_tokens = across_frames; those blocks run unmerged")
        return False
    kept_per_frame = part.sizes.num_kept // grid.frames

    def move(bound):
        if bound is None or bound <= offset:
            return bound
        image_bound = bound - offset
        if image_bound % per_frame:
            return False
        return offset + image_bound // per_frame * kept_per_frame

    out = []
    for start, end, index in dims:
        new_start, new_end = move(start), move(end)
        if new_start is False or new_end is False:
            runtime.note("dims", "i2v modulation range inside a latent frame; those blocks run unmerged")
            return False
        out.append((new_start, new_end, index))
    return out


def apply(model, settings: MergeSettings, live=None):
    """Clone ``model`` and attach importance merging to HunyuanVideo. The input model is never modified."""
    import comfy.patcher_extension  # noqa: PLC0415 (host module)

    patched = model.clone()
    remove_patches(patched, BlockMerge, JointAttentionOverride)
    attach(patched, HunyuanRuntime(settings, patched.model, live=live), settings)
    kind = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
    patched.remove_wrappers_with_key(kind, WRAPPER_KEY)
    patched.add_wrapper_with_key(kind, WRAPPER_KEY, grid_wrapper)
    options = patched.model_options["transformer_options"]
    if settings.scope == "transformer":
        net = patched.model.diffusion_model
        blocks = options.get("patches_replace", {}).get("dit", {})
        for name, count in (("double_block", len(net.double_blocks)), ("single_block", len(net.single_blocks))):
            for index in range(count):
                patched.set_model_patch_replace(BlockMerge(name, blocks.get((name, index))), "dit", name, index)
    else:
        options[OVERRIDE] = JointAttentionOverride(options.get(OVERRIDE))
    return patched
