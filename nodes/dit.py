"""Family-neutral part of the video DiT adapters (WAN, HunyuanVideo): partitions of ``(t h w)`` image tokens.

An adapter knows where its image tokens are and gives :meth:`VideoDiTRuntime.grid_merge` their features (keys or a
block's input) and the latent token grid; this class builds one partition per step and sample (per latent frame by
default, across the clip with ``video_tokens = across_frames``), from the CFG importance map of the previous step
pooled onto the grid, shares it between the forwards of a step that serve other cond chunks (cond and uncond in
separate calls) and between all blocks of a forward, slices the map for context windows along the frames, and
records the step's picture for the preview node.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch

from ..merging import TokenGrid, attention_with_key_bias, frame_partition, key_bias_mask, pool_to_grid
from .runtime import LevelMerge, MergeRuntime, chunk_ids, detach

SITE = 0  # one merge site per video DiT (the preview's "level")
OVERRIDE = "optimized_attention_override"


class ChainedOverride:
    """Base of the DiT adapters' ``optimized_attention_override``: ComfyUI has one slot, so an override set before
    this node (e.g. a faster kernel) is kept and called, with the merged tokens, by :meth:`_call`."""

    def __init__(self, previous=None) -> None:
        self.previous = previous  # an override set before this node: called with the merged tokens

    def _call(self, func, args, kwargs):
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    def _call_merged(self, func, merged: tuple, rest: tuple, kwargs: dict, runtime, plan: LevelMerge,
                     key_bias: Callable[[], torch.Tensor], heads_first: bool = False, mask_index: Optional[int] = None):
        """The attention on merged ``(q, k, v)`` (``rest``: the positional arguments after them; the mask is
        ``rest[mask_index]``, else ``kwargs["mask"]``). With ``proportional_attention`` and mean merging,
        ``key_bias()`` ([B, Lk]: log of each key's slot size, 0 for unmerged keys) is added to the logits: on the CPU
        through one more channel per head (:func:`merging.attention_with_key_bias`), elsewhere as an additive mask
        combined with the model's own (:func:`merging.key_bias_mask`), so GPU kernels keep their head size. Both are
        built once per forward and partition."""
        part = plan.partition
        if not runtime.settings.proportional_attention or plan.mode != "mean" or part.is_identity:
            return self._call(func, merged + rest, kwargs)
        q, k = merged[:2]
        as_mask = _bias_as_mask(q.device, func)
        if as_mask and getattr(func, "__name__", "") in MASKLESS_KERNELS:
            runtime.note("bias", "proportional attention is off with the %s kernel, which takes no attention mask "
                         "on this device", func.__name__)
            return self._call(func, merged + rest, kwargs)
        mask = (rest[mask_index] if mask_index is not None else kwargs.get("mask")) if as_mask else None
        cache = runtime.run.partitions  # reset every forward: the blocks of a forward share one bias
        key = ("key bias", id(part), k.shape[2 if heads_first else 1], id(mask), q.dtype)
        if key not in cache or cache[key][0] is not part or cache[key][1] is not mask:
            bias = key_bias().to(q.device)
            cache[key] = (part, mask, key_bias_mask(bias, mask, q.dtype) if as_mask else bias)
        addend = cache[key][2]
        if not as_mask:
            heads = rest[0] if rest else kwargs["heads"]  # SD3 passes heads by keyword
            return attention_with_key_bias(lambda *qkv: self._call(func, qkv + rest, kwargs), *merged, heads, addend,
                                           heads_first=heads_first)
        if mask_index is not None:
            return self._call(func, merged + rest[:mask_index] + (addend,) + rest[mask_index + 1:], kwargs)
        return self._call(func, merged + rest, dict(kwargs, mask=addend))


class ChainedBlock:
    """Base of the DiT adapters' block replacements (``patches_replace["dit"]``, ``scope = transformer``): another
    node's replacement of the same block, set before this node, is kept and called with the merged tokens."""

    def __init__(self, previous=None) -> None:
        self.previous = previous  # another node's replacement of this block: called with the merged tokens

    def _run_block(self, args: dict, extra: dict) -> dict:
        if self.previous is not None:
            return self.previous(args, extra)
        return extra["original_block"](args)


# ComfyUI kernels that drop (sage: sageattn ignores attn_mask) or refuse (flash: falls back to SDPA with a warning
# per call) an attention mask: proportional attention is skipped there on GPUs, with a note
MASKLESS_KERNELS = ("attention_sage", "attention3_sage", "attention_flash")


def _bias_as_mask(device: torch.device, func=None) -> bool:
    """Proportional attention's key bias goes to the kernel as a mask (GPUs and other accelerators: their kernels
    keep their head size; PyTorch SDPA on the CPU too, which broadcasts a [B, 1, 1, Lk] mask: about 3 % over the
    unbiased kernel at 2.5k tokens, the extra channel 25 %) or as an extra channel per head (the CPU's other kernels,
    e.g. ComfyUI's default sub-quadratic one, which would expand a mask to full size)."""
    return device.type != "cpu" or getattr(func, "__name__", "") == "attention_pytorch"


def remove_patches(patcher, block_type: type, override_type: type) -> None:
    """Take a DiT adapter's patches off a (cloned) model: its block replacements (``block_type``, keeping another
    node's replacement it wrapped) and its attention override (``override_type``, restoring the one it chained),
    then the runtime and capture hook."""
    options = patcher.model_options.setdefault("transformer_options", {})
    blocks = options.get("patches_replace", {}).get("dit")
    if blocks:
        options["patches_replace"] = dict(options["patches_replace"])
        options["patches_replace"]["dit"] = {key: (p.previous if isinstance(p, block_type) else p)
                                             for key, p in blocks.items()
                                             if not (isinstance(p, block_type) and p.previous is None)}
    unchain_override(options, override_type)
    detach(patcher)


def unchain_override(options: dict, override_type: type) -> None:
    """Take an ``override_type`` attention override (a :class:`ChainedOverride`) out of ``transformer_options``,
    restoring the override it chained."""
    override = options.get(OVERRIDE)
    if isinstance(override, override_type):
        if override.previous is None:
            options.pop(OVERRIDE)
        else:
            options[OVERRIDE] = override.previous


def has_attention_override() -> bool:
    """The host's attention calls take an ``optimized_attention_override`` (ComfyUI 0.3.60 or newer)."""
    from comfy.ldm.modules import attention  # noqa: PLC0415 (host module)

    return hasattr(attention, "wrap_attn")


class VideoDiTRuntime(MergeRuntime):
    """Partitions of a video DiT's image tokens; the adapter subclass decides which calls are merged."""

    family = "video transformers"
    CROSS_ATTN = False  # the family merges cross-attention with merge_cross_attn (PixArt)
    # cfg 1 (Flux, HunyuanVideo, distilled models): the change map was ahead of random ToMe on every DiT demo model
    # (held-out seeds, tests/cfg1_quality_protocol.sh)
    CFG1_MODE = "change"

    def grid_merge(self, kind: str, metric: torch.Tensor, extra: dict, grid: TokenGrid,
                   block_index: Optional[int]) -> Optional[LevelMerge]:
        """This forward's merge of ``metric``'s tokens ([rows, grid tokens, C]) on ``grid``, cached per forward
        (``partition_reuse = block``: per block); None leaves the call unmerged."""
        if metric.shape[1] != grid.num_tokens:
            return self.refuse(metric.shape[1], grid)
        self._fallbacks_once()
        block = None
        if self.settings.partition_reuse == "block":
            if block_index is None:
                self.note("reuse", "partition_reuse = block: this model does not say which block an attention call "
                          "belongs to; one partition per step instead")
            else:  # Flux and HunyuanVideo number double and single blocks from 0 each
                block = (extra.get("block_type"), block_index)
        key = (kind, block, grid.frames, grid.height, grid.width, metric.shape[0])
        run = self.run
        if key not in run.partitions:
            run.partitions[key] = self._forward_merge(metric, extra, grid, key)
        return run.partitions[key]

    def refuse(self, tokens: int, grid: TokenGrid) -> None:
        self.note("tokens", "%d tokens where the latent grid %dx%dx%d has %d (reference tokens?); left unmerged",
                  tokens, grid.frames, grid.height, grid.width, grid.num_tokens)
        return None

    def _fallbacks_once(self) -> None:
        s = self.settings
        ignored = [name for name, used in (("tiles", s.tiles != "1x1"), ("temporal_ratio", s.temporal_ratio > 0),
                                           ("merge_cross_attn", s.merge_cross_attn and not self.CROSS_ATTN)) if used]
        if ignored:
            self.note("unet-only", "%s apply to UNet models only; ignored on %s", ", ".join(ignored), self.family)

    def _forward_merge(self, k: torch.Tensor, extra: dict, grid: TokenGrid, key) -> Optional[LevelMerge]:
        """This forward's merge (``k``: the rows' features, keys or block inputs), from the step's per-sample one."""
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

    @staticmethod
    def _window(extra: dict, grid: TokenGrid) -> Optional[List[int]]:
        """The latent frames of the context window being computed (core context windows along dim 2), or None. The
        window object outlives the windowed call, so it is only believed when its length is this call's."""
        window = extra.get("context_window")
        if window is None or getattr(window, "dim", None) != 2:
            return None
        index = [int(i) for i in (getattr(window, "index_list", None) or [])]
        return index if len(index) == grid.frames else None

    def crop_map(self, imap: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
        """The frames of the CFG map ([B, T, H, W]) that hold the merged tokens (LTX-Video: not its keyframes)."""
        return imap

    def _map_rows(self, samples: int, extra: dict, grid: TokenGrid) -> Optional[torch.Tensor]:
        imap = self.run.map
        if imap is None or imap.ndim != 4:
            return None
        imap = self.crop_map(imap, grid)
        index = self._window(extra, grid)
        if index is not None and max(index) < imap.shape[1]:  # a window: the map's frames of the window, in order
            imap = imap[:, torch.as_tensor(index, dtype=torch.long, device=imap.device)]
        if imap.shape[0] != samples:
            self.note("batch", "importance map has %d samples but the model call has %d; using random merging for it",
                      imap.shape[0], samples)
            return None
        if imap.shape[1] != grid.frames:
            self.note("frames", "importance map has %d latent frames but the model call has %d; using random "
                      "merging for it", imap.shape[1], grid.frames)
            return None
        return imap

    def _make_partition(self, metric: torch.Tensor, extra: dict, grid: TokenGrid) -> Optional[LevelMerge]:
        settings = self.settings
        importance = self._map_rows(metric.shape[0], extra, grid) if settings.importance == "cfg" else None
        across = settings.video_tokens == "across_frames"

        def build():
            if importance is None:
                return frame_partition(metric, grid, settings.random_config(), generator=self.run.generator,
                                       across_frames=across)
            return frame_partition(metric, grid, settings.importance_config(), generator=self.run.generator,
                                   importance=pool_to_grid(importance.to(metric.device), grid), across_frames=across)

        frames = list(range(metric.shape[0]))
        if self._window(extra, grid) is not None:
            self.note("preview", "context windows along the frames: no step pictures for the preview node")
            frames = None
        return self.site_merge(SITE, grid, build, importance is not None, frames)
