"""Adapter for ComfyUI's WAN 2.x video DiT (``WanModel``: WAN 2.1 t2v / i2v, WAN 2.2 14B and 5B). Current ComfyUI only.

Merge site: the self-attention core of every block, through ComfyUI's attention override
(``transformer_options["optimized_attention_override"]``, ComfyUI >= 0.3.60). WAN applies RoPE to queries and keys
before that call, so positions travel with the tokens for free, and nothing else in the block (modulation, the
per-token timesteps of WAN 2.2 5B, cross-attention, the FFN) sees the merged count. Tokens are ``(t h w)`` on the
``grid_sizes`` grid that WanModel puts in ``transformer_options``; they merge only inside their own latent frame
(:func:`merging.frame_partition`). The first attention call of each block is its self-attention (WAN runs
cross-attention second); a call whose query, key and value lengths are not the grid's token count is left alone
(reference-latent tokens, cross-attention).

One partition per step and sample (computed from the keys of the first block, shared by every block and by cond and
uncond whatever the call layout, as for UNets); ``partition_reuse = block`` computes one per block. Another
attention override set before this node (e.g. a faster kernel) is kept and called with the merged tokens.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from ..merging import TokenGrid, frame_partition, pool_to_grid
from .runtime import KEY, ImportanceCapture, LevelMerge, MergeRuntime, attach, chunk_ids, runtime_of
from .settings import MergeSettings

log = logging.getLogger("comfyui_importance_tome")

OVERRIDE = "optimized_attention_override"
SITE = 0  # one merge site: the self-attention of every block (the preview's "level")


def supports(model) -> bool:
    """True for ComfyUI's WanModel itself (subclasses such as VACE or S2V run other blocks: not yet)."""
    try:
        from comfy.ldm.wan.model import WanModel  # noqa: PLC0415 (host module; absent on the 2024 ComfyUI)
    except ImportError:
        return False
    return type(getattr(getattr(model, "model", None), "diffusion_model", None)) is WanModel


class WanRuntime(MergeRuntime):
    """Which attention calls of a WAN forward are merged, and how a step's per-frame partition is built."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._block_marker = None  # (transformer_options, block_index) of the last attention call

    def plan(self, q, k, v, kwargs: dict, extra: dict) -> Optional[LevelMerge]:
        """The merge for this attention call, or None to run it as it is."""
        block = extra.get("block_index")
        grid_sizes = extra.get("grid_sizes")
        if block is None or grid_sizes is None or len(grid_sizes) != 3:
            return None
        run = self.begin_forward(extra, extra)  # a forward = one transformer_options dict (a new one per call)
        marker, self._block_marker = self._block_marker, (extra, block)
        if marker is not None and marker[0] is extra and marker[1] == block:
            return None  # the block's second attention call: cross-attention
        if not run.call_active:
            return None
        if kwargs.get("skip_reshape") or kwargs.get("skip_output_reshape") or kwargs.get("mask") is not None:
            self.note("layout", "self-attention called with another tensor layout or a mask; left unmerged")
            return None
        frames, height, width = (int(s) for s in grid_sizes)
        grid = TokenGrid(height, width, frames)
        if any(t.ndim != 3 or t.shape[1] != grid.num_tokens for t in (q, k, v)):
            self.note("tokens", "self-attention has %d tokens but the latent grid %dx%dx%d has %d (reference "
                      "tokens?); left unmerged", q.shape[1], frames, height, width, grid.num_tokens)
            return None
        self._fallbacks_once()
        key = ("self", block if self.settings.partition_reuse == "block" else None, frames, height, width, q.shape[0])
        if key not in run.partitions:
            run.partitions[key] = self._forward_merge(k, extra, grid, key)
        return run.partitions[key]

    def _fallbacks_once(self) -> None:
        s = self.settings
        if s.scope == "transformer":
            self.note("scope", "scope = transformer is not available on WAN yet: merging the self-attention only")
        if s.tiles != "1x1" or s.temporal_ratio > 0 or s.merge_cross_attn:
            self.note("unet-only", "tiles, temporal_ratio and merge_cross_attn apply to UNet models; ignored on WAN")

    def _forward_merge(self, k: torch.Tensor, extra: dict, grid: TokenGrid, key) -> Optional[LevelMerge]:
        chunks = len(extra.get("cond_or_uncond") or [0]) or 1
        if k.shape[0] % chunks:
            self.note("rows", "batch of %d rows does not split into %d cond chunks; left unmerged", k.shape[0], chunks)
            return None
        samples = k.shape[0] // chunks
        base = self.step_merge(key[:2] + (grid, samples), chunk_ids(extra, chunks),
                               lambda: self._make_partition(k[:samples], extra, grid))
        if base is None:
            return None
        rows = torch.arange(k.shape[0], device=k.device) % samples
        return LevelMerge(base.partition.take_rows(rows), base.mode)

    def _map_rows(self, samples: int, extra: dict) -> Optional[torch.Tensor]:
        imap = self.run.map
        if imap is None or imap.ndim != 4:
            return None
        window = extra.get("context_window")
        if window is not None and getattr(window, "dim", None) == 2:  # context windows along the latent frames
            index = list(getattr(window, "index_list", None) or [])
            if index and max(index) < imap.shape[1]:
                imap = imap[:, torch.as_tensor(index, dtype=torch.long, device=imap.device)]
        if imap.shape[0] != samples:
            self.note("batch", "importance map has %d samples but the model call has %d; using random merging for it",
                      imap.shape[0], samples)
            return None
        return imap

    def _make_partition(self, metric: torch.Tensor, extra: dict, grid: TokenGrid) -> Optional[LevelMerge]:
        run, settings = self.run, self.settings
        samples = metric.shape[0]
        importance = self._map_rows(samples, extra) if settings.importance == "cfg" else None
        try:
            if importance is not None:
                scores = pool_to_grid(importance.to(metric.device), grid)
                part = frame_partition(metric, grid, settings.importance_config(), importance=scores,
                                       generator=run.generator)
                mode = "mean"
            else:
                part = frame_partition(metric, grid, settings.random_config(), generator=run.generator)
                warmup = settings.importance == "cfg" and run.map is None and not run.no_uncond
                mode = "prune" if warmup and settings.warmup_mode == "prune" else "mean"
        except ValueError as err:
            self.note("small", "the %dx%d token frames are left unmerged: %s", grid.height, grid.width, err)
            return None
        if part.is_identity:
            self.note("tiny", "frames of %d tokens: nothing to merge at ratio %.2f", grid.height * grid.width,
                      settings.ratio)
            return None
        if SITE not in run.summary.tokens and not self.managed:
            log.info("Importance Token Merging: WAN self-attention, %d -> %d tokens", part.sizes.num_tokens,
                     part.sizes.num_kept)
        run.summary.tokens[SITE] = (part.sizes.num_tokens, part.sizes.num_kept)
        self.record(SITE, grid, part, list(range(samples)), used_map=importance is not None)
        return LevelMerge(part, mode)


class SelfAttentionOverride:
    """``optimized_attention_override``: merge q / k / v of WAN self-attention, restore the output's length."""

    def __init__(self, previous=None) -> None:
        self.previous = previous  # an override set before this node: called with the merged tokens

    def _call(self, func, args, kwargs):
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)

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
        out = self._call(func, merged + tuple(args[3:]), kwargs)
        return part.unmerge(out)


def _remove_ours(patcher) -> None:
    options = patcher.model_options.setdefault("transformer_options", {})
    override = options.get(OVERRIDE)
    if isinstance(override, SelfAttentionOverride):
        if override.previous is None:
            options.pop(OVERRIDE)
        else:
            options[OVERRIDE] = override.previous
    post = patcher.model_options.get("sampler_post_cfg_function")
    if post:
        patcher.model_options["sampler_post_cfg_function"] = [f for f in post if not isinstance(f, ImportanceCapture)]
    options.pop(KEY, None)


def apply(model, settings: MergeSettings, live=None):
    """Clone ``model`` and attach importance merging to WAN self-attention. The input model is never modified."""
    patched = model.clone()
    _remove_ours(patched)
    attach(patched, WanRuntime(settings, patched.model, live=live), settings)
    options = patched.model_options["transformer_options"]
    options[OVERRIDE] = SelfAttentionOverride(options.get(OVERRIDE))
    return patched
