"""Adapter for ComfyUI's UNet models (SD1.x, SD2.x, SDXL and the UNet-based multi-view models).

How it hooks in (the same on the 2024 host and on current ComfyUI):

* ``attn1_patch`` shortens the self-attention input (queries, keys and values; with ``scope = "queries"`` the
  queries only, as ComfyUI's built-in node does) with a :class:`merging.Partition`; ``attn1_output_patch`` restores
  the full length. With ``merge_cross_attn`` the cross-attention queries get the
  same treatment through ``attn2_patch`` / ``attn2_output_patch``.
* Runs, steps, the active range and the CFG importance capture are family-neutral and live in ``nodes/runtime.py``;
  this module only knows the UNet: which attention calls sit at which level, and where tokens are merged.

With ``scope = "transformer"`` the merge happens once per transformer stack instead: every SpatialTransformer is
object-patched (scoped to the patched model, restored by ComfyUI) with a subclass that runs all its blocks
(self-attention, cross-attention and feed-forward) on the merged tokens and adds each token's share of the update
back to its own full-resolution input (``x + unmerge(blocks(merge(x)) - merge(x))``).

A partition is computed once per level, UNet stage (down / middle / up blocks) and model evaluation, from the first
block of that stage, and reused by the stage's other blocks, so the index work stays off the per-block path
(``partition_reuse``: ``level`` shares one partition between the down and up blocks, ``block`` computes one per block).
It is computed per sample from the first cond chunk of the first UNet pass of the step (ComfyUI puts uncond first) and
laid out on the rows of every pass of that step, so cond and uncond are merged alike whether ComfyUI evaluates them in
one call or in two. The token grid and which tokens are kept come from the importance map either way; what ``stage``
buys is a matching of merged tokens computed on the decoder's own features, which differ from the encoder's.
"""
from __future__ import annotations

import functools
import logging
from typing import Optional, Tuple

import torch

from ..merging import (
    TokenGrid,
    find_unet_level,
    log_slot_sizes,
    pair_groups,
    pool_to_grid,
    temporal_share,
    tiled_partition,
)
from .dit import OVERRIDE, ChainedOverride, has_attention_override, unchain_override
from .runtime import (  # noqa: F401 (KEY: re-exported, the transformer_options key of the runtime)
    KEY, ImportanceCapture, LevelMerge, MergeRuntime, attach, chunk_frames, chunk_ids, detach, runtime_of,
)
from .settings import PLAIN_WEIGHTING, MergeSettings

UNET_PROTECT = 0.1  # protect = "auto" at the UNet attention site with proportional attention ...
UNET_PROTECT_UNTIL = (0.5, 0.7)  # ... up to this ratio, fading linearly to 0 at this one

log = logging.getLogger("comfyui_importance_tome")

TEMPORAL_FLAG = "importance_tome_temporal"  # set in transformer_options inside temporal transformer blocks
STACK_FLAG = "importance_tome_in_stack"  # set while a merged transformer stack runs its blocks


def _proportional(settings: MergeSettings) -> bool:
    """Proportional attention applies: switched on, and ComfyUI has the attention override (0.3.60 or newer)."""
    return settings.proportional_attention and has_attention_override()


class UNetRuntime(MergeRuntime):
    """The UNet adapter: which attention calls are merged (levels, stages) and how a level's partition is built."""

    @classmethod
    def weighting_for(cls, settings: MergeSettings) -> Tuple[float, float]:
        # the queries site: plain means (keys and values keep every token there, so a merged query only has to stand
        # for its group's outputs; held-out demo images: +0.26 to +0.48 dB over weight_power 3)
        return PLAIN_WEIGHTING if settings.scope == "queries" else cls.MERGE_WEIGHTING

    @classmethod
    def protect_for(cls, settings: MergeSettings) -> float:
        # the attention site with proportional attention: the 10 % most important tokens stay themselves up to ratio
        # 0.5, fading to none at 0.7, where only 5 % of the tokens stay independent and keeping the most important
        # ones measured worse than letting similarity choose (held-out demo images, README "Quality benchmark"); not
        # measured without proportional attention (ComfyUI before 0.3.60) or at the other sites
        if settings.scope != "attention" or not _proportional(settings):
            return 0.0
        full, none = UNET_PROTECT_UNTIL
        return round(UNET_PROTECT * min(max((none - settings.ratio) / (none - full), 0.0), 1.0), 4)

    @classmethod
    def cfg1_mode_for(cls, settings: MergeSettings) -> str:
        # cfg 1: the change map at the attention site without proportional attention (ComfyUI before 0.3.60, or
        # switched off), where it was well ahead of random ToMe; random ToMe with proportional attention (the change
        # map level or slightly behind there) and at the other sites (held-out demo images, README "cfg = 1")
        return "change" if settings.scope == "attention" and not _proportional(settings) else cls.CFG1_MODE

    def partition_for(self, n: torch.Tensor, extra: dict) -> Optional[LevelMerge]:
        """The partition (and merge mode) for this block's tokens, or None to leave the block alone."""
        shape = extra.get("original_shape")
        # one UNet pass = one ``original_shape`` list (the UNet's forward makes a new one every time it runs)
        run = self.begin_forward(extra, shape if shape is not None else extra.get("cond_or_uncond"))
        if not run.call_active or extra.get(TEMPORAL_FLAG) or extra.get(STACK_FLAG):
            return None  # temporal attention (frames as tokens), or a block already inside a merged stack
        if shape is None or len(shape) != 4 or n.shape[0] != shape[0]:
            return None  # not a spatial call of a 2-D UNet (e.g. temporal attention): leave it alone
        height, width = int(shape[2]), int(shape[3])
        level = find_unet_level(height, width, n.shape[1])
        if level is None:
            return None
        if run.target_levels is None:  # the first attention call of a forward is the highest-resolution one
            run.target_levels = self.settings.target_levels(level)
            if self.settings.video_tokens != "per_frame":
                self.note("dit-only", "video_tokens applies to video transformers (WAN); ignored on UNet models")
        if level not in run.target_levels:
            return None
        key = self._reuse_key(level, extra)
        if key not in run.partitions:
            run.partitions[key] = self._forward_merge(n, extra, key, level, height, width)
        return run.partitions[key]

    def _reuse_key(self, level: int, extra: dict):
        """Which blocks share one partition: a level (``level``), a level's down or up blocks (``stage``), a block."""
        reuse = self.settings.partition_reuse
        if reuse == "level":
            return level
        block = tuple(extra.get("block") or ())
        if reuse == "stage":
            return level, block[:1]  # ("input",) / ("middle",) / ("output",)
        return level, block, extra.get("block_index")

    def _forward_merge(self, n: torch.Tensor, extra: dict, key, level: int, height: int,
                       width: int) -> Optional[LevelMerge]:
        """This forward's merge: the step's per-sample partition, laid out on this forward's rows."""
        chunks = len(extra.get("cond_or_uncond") or [0]) or 1
        if n.shape[0] % chunks:
            self.note("rows", "batch of %d rows does not split into %d cond chunks; block left unmerged",
                      n.shape[0], chunks)
            return None
        samples = n.shape[0] // chunks
        # per sample, from the first chunk's rows (ComfyUI puts uncond first, in one call or in the first of split
        # calls), so cond and uncond share one partition whatever the call layout
        base = self.step_merge((key, height, width, samples), chunk_ids(extra, chunks),
                               lambda: self._make_partition(n[:samples], extra, level, height, width))
        if base is None:
            return None
        rows = torch.arange(n.shape[0], device=n.device) % samples
        part = base.partition.take_rows(rows)
        share = None
        if self.settings.temporal_ratio > 0 and samples >= 2:
            share = temporal_share(part.merge(n, base.mode), self.settings.temporal_ratio, samples)
            if share is not None:
                self.run.summary.shared[level] = (part.sizes.num_kept, share.num_computed)
        return LevelMerge(part, base.mode, share)

    def _make_partition(self, n: torch.Tensor, extra: dict, level: int, height: int, width: int) -> Optional[LevelMerge]:
        """A partition of one row per sample (``n`` holds one chunk: [samples, N, C])."""
        run, settings = self.run, self.settings
        grid = TokenGrid.for_unet_level(height, width, level)
        samples = n.shape[0]
        use_importance = settings.importance == "cfg" and run.map is not None
        importance = self.map_rows(samples, height, width, extra) if use_importance else None
        temporal = settings.temporal_ratio > 0 and samples >= 2
        if settings.temporal_ratio > 0 and samples < 2:
            self.note("frames", "temporal_ratio needs a batch of 2 or more frames; this model call has %d latent: "
                      "spatial merging only", samples)
        groups, row_sample = samples, None
        if temporal:  # each pair of frames shares one spatial partition, so their slots hold the same tokens
            row_sample = pair_groups(samples).to(n.device)
            groups = int(row_sample.max()) + 1

        def build():
            if importance is None:
                return tiled_partition(n, settings.random_config(), grid, settings.tile_grid, num_samples=groups,
                                       row_sample=row_sample, generator=run.generator)
            scores = pool_to_grid(importance.to(n.device), grid)
            if temporal:
                counts = torch.bincount(row_sample, minlength=groups).to(scores.dtype)
                scores = scores.new_zeros((groups,) + scores.shape[1:]).index_add_(0, row_sample, scores)
                scores = scores / counts.reshape((-1,) + (1,) * (scores.ndim - 1))
            return tiled_partition(n, settings.importance_config(), grid, settings.tile_grid, importance=scores,
                                   row_sample=row_sample, generator=run.generator)

        first = level not in run.summary.tokens
        merge = self.site_merge(level, grid, build, importance is not None, chunk_frames(extra, samples), row_sample)
        if merge is not None and first and not self.managed:
            log.info("Importance Token Merging: merging level %d, %d -> %d tokens (%s); the run's summary is "
                     "logged when the next run starts on this ComfyUI", level, merge.partition.sizes.num_tokens,
                     merge.partition.sizes.num_kept, "importance" if importance is not None else "random/warm-up")
        return merge


class SelfAttnMerge:
    """``attn1_patch``: merge the tokens that enter self-attention."""

    def __call__(self, n, context, value, extra):
        runtime = runtime_of(extra)
        if runtime is None:
            return n, context, value
        plan = runtime.partition_for(n, extra)
        run = runtime.run
        run.block = plan
        if plan is None:
            return n, context, value
        run.summary.merged_calls += 1
        merged = plan.partition.merge(n, plan.mode)
        queries = plan.share.select(merged) if plan.share is not None else merged  # frames share alike queries
        if runtime.settings.scope == "queries":  # keys and values keep every token (the built-in node's site)
            return queries, context, value

        def like_n(t):  # keys/values: shorten them too when they are the block's own tokens (self-attention)
            if t is n:
                return merged
            if isinstance(t, torch.Tensor) and t.ndim == 3 and t.shape[:2] == n.shape[:2]:
                return plan.partition.merge(t, plan.mode)
            return t

        keys, values = like_n(context), like_n(value)
        if keys is not context:  # the next attention call is this self-attention, on merged keys
            run.site_marker = plan  # (proportional attention: :class:`SelfAttentionBias`)
        return queries, keys, values


class SelfAttnUnmerge:
    """``attn1_output_patch``: give every token its slot's attention output (shared slots: the partner frame's)."""

    fill_shared = True

    def __call__(self, n, extra):
        runtime = runtime_of(extra)
        plan = runtime.run.block if runtime is not None else None
        if plan is None:
            return n
        runtime.run.site_marker = None
        if self.fill_shared and plan.share is not None and n.shape[1] == plan.share.num_computed:
            n = plan.share.fill(n)
        if n.shape[1] != plan.partition.sizes.num_kept:
            return n
        return plan.partition.unmerge(n)


class SelfAttentionBias(ChainedOverride):
    """``optimized_attention_override`` (current ComfyUI): proportional attention. The self-attention call on merged
    keys, the one that :class:`SelfAttnMerge` shortened or a block's first in a merged stack (marked with its plan in
    ``run.site_marker``), gets the log of each slot's token count added to its logits, as ToMe does, so a merged
    region keeps its share of attention; every other attention call (cross-attention, unmerged levels, other models)
    runs as it is. An override set before this node is kept and called."""

    def __call__(self, func, *args, **kwargs):
        extra = kwargs.get("transformer_options")
        runtime = runtime_of(extra) if isinstance(extra, dict) else None
        run = runtime.run if isinstance(runtime, UNetRuntime) else None
        plan = run.site_marker if run is not None else None
        if plan is None or len(args) < 4:
            return self._call(func, args, kwargs)
        run.site_marker = None  # only the first attention call after the merge: the block's self-attention
        q, k, v = args[:3]
        if kwargs.get("skip_reshape") or k.ndim != 3 or k.shape[1] != plan.partition.sizes.num_kept:
            return self._call(func, args, kwargs)
        part = plan.partition
        return self._call_merged(func, (q, k, v), tuple(args[3:]), kwargs, runtime, plan,
                                 lambda: log_slot_sizes(part.slot_counts))


class CrossAttnMerge:
    """``attn2_patch``: merge the cross-attention queries with the block's partition."""

    def __call__(self, n, context, value, extra):
        runtime = runtime_of(extra)
        plan = runtime.run.block if runtime is not None else None
        if plan is None or n.shape[1] != plan.partition.sizes.num_tokens:
            return n, context, value
        return plan.partition.merge(n, plan.mode), context, value


class CrossAttnUnmerge(SelfAttnUnmerge):
    """``attn2_output_patch``: restore the full length after cross-attention (every slot was computed)."""

    fill_shared = False


PATCH_TYPES = (SelfAttnMerge, SelfAttnUnmerge, CrossAttnMerge, CrossAttnUnmerge, ImportanceCapture)


@functools.lru_cache(maxsize=None)
def merged_stack_class():
    """A subclass of the host's SpatialTransformer whose blocks run on merged tokens (``scope = "transformer"``)."""
    from comfy.ldm.modules.attention import SpatialTransformer  # noqa: PLC0415 (host module)

    class MergedSpatialTransformer(SpatialTransformer):
        itm_stack = True

        def forward(self, x, context=None, transformer_options={}):  # noqa: B006 (the host's own signature)
            if not isinstance(context, list):
                context = [context] * len(self.transformer_blocks)
            _, _, height, width = x.shape
            transformer_options["activations_shape"] = list(x.shape)
            x_in = x
            x = self.norm(x)
            if not self.use_linear:
                x = self.proj_in(x)
            x = x.movedim(1, 3).flatten(1, 2).contiguous()
            if self.use_linear:
                x = self.proj_in(x)
            runtime = runtime_of(transformer_options)
            plan = runtime.partition_for(x, transformer_options) if runtime is not None else None
            run = runtime.run if plan is not None else None
            if plan is not None:
                run.summary.merged_calls += 1
                full, x = x, plan.partition.merge(x, plan.mode)
                # a copy: the 2024 host's blocks add their updates in place (``x += n``), which would also change
                # the merged input and cancel every update in ``x - merged_in`` below
                merged_in = x.clone()
                transformer_options[STACK_FLAG] = True
            try:
                for index, block in enumerate(self.transformer_blocks):
                    transformer_options["block_index"] = index
                    if run is not None:  # the block's first attention call is its self-attention on merged tokens
                        run.site_marker = plan  # (proportional attention: :class:`SelfAttentionBias`)
                    x = block(x, context=context[index], transformer_options=transformer_options)
            finally:
                transformer_options.pop(STACK_FLAG, None)
                if run is not None:
                    run.site_marker = None
            if plan is not None:
                x = full + plan.partition.unmerge(x - merged_in)
            if self.use_linear:
                x = self.proj_out(x)
            x = x.reshape(x.shape[0], height, width, x.shape[-1]).movedim(3, 1).contiguous()
            if not self.use_linear:
                x = self.proj_out(x)
            return x + x_in

    return MergedSpatialTransformer


@functools.lru_cache(maxsize=None)
def temporal_block_class():
    """A subclass of the host's BasicTransformerBlock that marks its attention calls as temporal.

    Video UNets (SVD, SV3D) run temporal transformer blocks (tokens = frames, batch = positions) right after the
    spatial ones, with the same block ids; current ComfyUI calls the attention patches there too. This marker is the
    only reliable way to tell the two apart (their shapes coincide when a level has as many positions as frames).
    """
    from comfy.ldm.modules.attention import BasicTransformerBlock  # noqa: PLC0415 (host module)

    class TemporalMarkedBlock(BasicTransformerBlock):
        itm_temporal = True

        def forward(self, x, context=None, transformer_options={}):  # noqa: B006 (the host's own signature)
            return super().forward(x, context=context, transformer_options={**transformer_options, TEMPORAL_FLAG: True})

    return TemporalMarkedBlock


def _shared_copy(module, cls):
    """An instance of ``cls`` sharing ``module``'s parameters and submodules (nothing is copied)."""
    wrapper = cls.__new__(cls)
    wrapper.__dict__.update(module.__dict__)
    return wrapper


def _merged_stack(module):
    """A MergedSpatialTransformer sharing ``module``'s parameters and submodules (nothing is copied)."""
    return _shared_copy(module, merged_stack_class())


def supports(model) -> bool:
    return is_unet(model)


def is_unet(model) -> bool:
    """True for models whose diffusion model is ComfyUI's UNetModel (SD1.x/2.x/SDXL/SVD/Zero123 …)."""
    diffusion_model = getattr(getattr(model, "model", None), "diffusion_model", None)
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel  # noqa: PLC0415 (host module)

    return isinstance(diffusion_model, UNetModel)  # subclasses too (not an exact-type check on a live module)


def _remove_ours(patcher) -> None:
    """Drop patches of an earlier Importance Token Merging node so chaining two nodes does not merge twice."""
    model_options = patcher.model_options
    options = model_options.setdefault("transformer_options", {})
    unchain_override(options, SelfAttentionBias)
    patcher.object_patches = {k: v for k, v in patcher.object_patches.items() if not getattr(v, "itm_stack", False)}
    patches = options.get("patches")
    if patches:
        options["patches"] = {name: [p for p in plist if not isinstance(p, PATCH_TYPES)] for name, plist in patches.items()}
    detach(patcher)


def apply(model, settings: MergeSettings, live=None):
    """Clone ``model`` and attach importance merging (``live``: the web UI's preview sender, or None). The input
    model is never modified."""
    patched = model.clone()
    _remove_ours(patched)
    # the active range is resolved from the sampled model's model_sampling when each run starts (a ModelSampling node
    # after this one changes it); the runtime holds the shared BaseModel weakly
    attach(patched, UNetRuntime(settings, patched.model, live=live), settings)
    video_stacks = 0
    for name, module in patched.model.diffusion_model.named_modules():
        time_stack = getattr(module, "time_stack", None)
        if type(module).__name__ == "SpatialVideoTransformer" and time_stack is not None:
            video_stacks += 1
            for index, block in enumerate(time_stack):
                patched.add_object_patch(f"diffusion_model.{name}.time_stack.{index}",
                                         _shared_copy(block, temporal_block_class()))
    if settings.scope == "transformer":
        merged_type = merged_stack_class()
        stack_types = (merged_type.__mro__[1], merged_type)  # not SpatialVideoTransformer or other subclasses
        for name, module in patched.model.diffusion_model.named_modules():
            # the live module is our subclass when an earlier patched model is still loaded with its object patches
            # (a re-queued graph): it shares the original's parameters, so it is wrapped the same way
            if type(module) in stack_types:
                patched.add_object_patch(f"diffusion_model.{name}", _merged_stack(module))
        if video_stacks:  # video transformer stacks keep per-frame spatial merging through the attention patches
            log.info("Importance Token Merging: scope = transformer applies to image transformer stacks; the %d "
                     "video transformer stacks merge their spatial self-attention only", video_stacks)
    if settings.scope in ("attention", "transformer") and settings.proportional_attention:
        if has_attention_override():
            options = patched.model_options["transformer_options"]
            options[OVERRIDE] = SelfAttentionBias(options.get(OVERRIDE))
        else:
            log.info("Importance Token Merging: proportional_attention needs ComfyUI's attention override "
                     "(ComfyUI 0.3.60 or newer); this ComfyUI merges self-attention without it")
    if settings.scope != "transformer" or video_stacks:
        patched.set_model_attn1_patch(SelfAttnMerge())
        patched.set_model_attn1_output_patch(SelfAttnUnmerge())
        if settings.merge_cross_attn:
            patched.set_model_attn2_patch(CrossAttnMerge())
            patched.set_model_attn2_output_patch(CrossAttnUnmerge())
    return patched
