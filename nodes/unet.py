"""Adapter for ComfyUI's UNet models (SD1.x, SD2.x, SDXL and the UNet-based multi-view models).

How it hooks in (the same on the 2024 host and on current ComfyUI):

* ``attn1_patch`` shortens the self-attention input (queries, keys and values) with a :class:`merging.Partition`;
  ``attn1_output_patch`` restores the full length. With ``merge_cross_attn`` the cross-attention queries get the
  same treatment through ``attn2_patch`` / ``attn2_output_patch``.
* ``sampler_post_cfg_function`` sees the cond and uncond predictions of every model evaluation and stores
  ``|cond - uncond|`` as the importance map for the next evaluation.
* Per-run state lives in ``model_options["transformer_options"][KEY]`` as a :class:`MergeRuntime`. On current
  ComfyUI an ``OUTER_SAMPLE`` wrapper gives every sampling run a fresh one; on hosts without wrappers a run is
  detected when sigma goes up again or the latent size changes.

With ``scope = "transformer"`` the merge happens once per transformer stack instead: every SpatialTransformer is
object-patched (scoped to the patched model, restored by ComfyUI) with a subclass that runs all its blocks
(self-attention, cross-attention and feed-forward) on the merged tokens and adds each token's share of the update
back to its own full-resolution input (``x + unmerge(blocks(merge(x)) - merge(x))``).

A partition is computed once per level, UNet stage (down / middle / up blocks) and model call, from the first block
of that stage, and reused by the stage's other blocks, so the index work stays off the per-block path
(``partition_reuse``: ``level`` shares one partition between the down and up blocks, ``block`` computes one per block).
The token grid and which tokens are kept come from the importance map either way; what ``stage`` buys is a matching
of merged tokens computed on the decoder's own features, which differ from the encoder's.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, NamedTuple, Optional, Tuple

import torch

from ..merging import (
    Partition,
    TemporalShare,
    TokenGrid,
    find_unet_level,
    importance_map,
    pair_groups,
    pool_to_grid,
    temporal_share,
    tiled_partition,
)
from .settings import MergeSettings, sigma_range

log = logging.getLogger("comfyui_importance_tome")

KEY = "importance_tome"
WRAPPER_KEY = "importance_tome"
TEMPORAL_FLAG = "importance_tome_temporal"  # set in transformer_options inside temporal transformer blocks
STACK_FLAG = "importance_tome_in_stack"  # set while a merged transformer stack runs its blocks


@dataclass
class RunSummary:
    """What one sampling run did; kept (last few runs) on the patched model for inspection and tests."""

    evaluations_with_map: int = 0
    evaluations_without_map: int = 0
    evaluations_inactive: int = 0
    maps_captured: int = 0
    merged_calls: int = 0
    tokens: Dict[int, Tuple[int, int]] = field(default_factory=dict)  # level -> (N, kept)
    shared: Dict[int, Tuple[int, int]] = field(default_factory=dict)  # level -> (kept, queries computed per frame)
    fallbacks: List[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.evaluations_with_map or self.evaluations_without_map or self.evaluations_inactive)

    def describe(self) -> str:
        levels = ", ".join(f"level {lvl}: {n} -> {kept} tokens" for lvl, (n, kept) in sorted(self.tokens.items()))
        levels += "".join(f" ({computed} of {kept} queries per frame computed, the rest shared with the partner "
                          f"frame)" for lvl, (kept, computed) in sorted(self.shared.items()))
        return (
            f"{levels or 'no level merged'}; evaluations with importance map {self.evaluations_with_map}, "
            f"without (warm-up/fallback) {self.evaluations_without_map}, outside the active range "
            f"{self.evaluations_inactive}; {self.merged_calls} attention calls merged"
            + (f"; fallbacks: {'; '.join(self.fallbacks)}" if self.fallbacks else "")
        )


class LevelMerge(NamedTuple):
    """How one level is merged in the current model call."""

    partition: Partition
    mode: str  # "mean" or "prune"
    share: Optional[TemporalShare] = None  # neighbouring frames sharing queries (temporal_ratio > 0)


class RunState:
    """Mutable state of one sampling run."""

    def __init__(self, settings: MergeSettings) -> None:
        self.summary = RunSummary()
        self.generator = torch.Generator()
        self.generator.manual_seed(settings.seed)
        self.map: Optional[torch.Tensor] = None  # [b, H, W] from the previous evaluation
        self.no_uncond = False  # the last evaluation had no uncond pass (cfg = 1): no map will come
        self.areas: List[Tuple[int, ...]] = []  # area conds seen by the cfg hook: (h, w, y, x)
        self.target_levels: Optional[FrozenSet[int]] = None  # fixed by the run's first attention call ("auto")
        self.last_sigma: Optional[float] = None
        self.call: Optional[list] = None  # cond_or_uncond list object of the current model call (its identity)
        self.call_active = False
        self.partitions: Dict[object, Optional[LevelMerge]] = {}  # by MergeRuntime._reuse_key
        self.block: Optional[LevelMerge] = None  # merge of the block being run (between patch and output patch)
        self.logged: set = set()


class MergeRuntime:
    """Everything the patches need: settings, the active sigma range and the current run's state."""

    def __init__(self, settings: MergeSettings, sigma_bounds: Tuple[float, float], managed: bool = False,
                 history: Optional[list] = None) -> None:
        self.settings = settings
        self.sigma_start, self.sigma_end = sigma_bounds
        self.managed = managed  # True when a host wrapper starts and ends each run
        self.history = history if history is not None else []
        self.run = RunState(settings)

    def fresh(self) -> "MergeRuntime":
        """A runtime for one sampling run that shares settings and history with this one."""
        return MergeRuntime(self.settings, (self.sigma_start, self.sigma_end), managed=True, history=self.history)

    def summaries(self) -> List[RunSummary]:
        """Finished runs (oldest first), plus the current run on hosts where a run's end is not signalled."""
        current = self.run.summary
        return list(self.history) + ([] if current.empty else [current])

    def finish_run(self) -> None:
        run = self.run
        if not run.summary.empty:
            self.history.append(run.summary)
            del self.history[:-8]
            log.info("Importance Token Merging (%s, ratio %.2f): %s", self.settings.importance, self.settings.ratio,
                     run.summary.describe())
        self.run = RunState(self.settings)

    def note(self, key: str, message: str, *args) -> None:
        """Log a fallback once per run (INFO) and remember it in the summary."""
        if key in self.run.logged:
            return
        self.run.logged.add(key)
        text = message % args if args else message
        self.run.summary.fallbacks.append(text)
        log.info("Importance Token Merging: %s", text)

    # --- per model call -------------------------------------------------------------------------------------------

    def _start_call(self, extra: dict) -> None:
        run = self.run
        sigmas = extra.get("sigmas")
        sigma = float(sigmas.flatten()[0]) if isinstance(sigmas, torch.Tensor) and sigmas.numel() else None
        new_eval = sigma != run.last_sigma
        if not self.managed and run.last_sigma is not None and sigma is not None and sigma > run.last_sigma * (1 + 1e-4):
            self.finish_run()  # sigma went up: a new sampling run on a host without run wrappers
            run = self.run
            new_eval = True
        run.last_sigma = sigma
        run.call = extra.get("cond_or_uncond")
        run.partitions = {}
        run.block = None
        run.call_active = sigma is None or self.sigma_end <= sigma <= self.sigma_start
        if new_eval:
            if not run.call_active:
                run.summary.evaluations_inactive += 1
            elif run.map is not None and self.settings.importance == "cfg":
                run.summary.evaluations_with_map += 1
            else:
                run.summary.evaluations_without_map += 1

    def partition_for(self, n: torch.Tensor, extra: dict) -> Optional[LevelMerge]:
        """The partition (and merge mode) for this block's tokens, or None to leave the block alone."""
        if extra.get("cond_or_uncond") is not self.run.call or self.run.call is None:
            self._start_call(extra)  # may start a new run (new RunState)
        run = self.run
        if not run.call_active or extra.get(TEMPORAL_FLAG) or extra.get(STACK_FLAG):
            return None  # temporal attention (frames as tokens), or a block already inside a merged stack
        shape = extra.get("original_shape")
        if shape is None or len(shape) != 4 or n.shape[0] != shape[0]:
            return None  # not a spatial call of a 2-D UNet (e.g. temporal attention): leave it alone
        height, width = int(shape[2]), int(shape[3])
        level = find_unet_level(height, width, n.shape[1])
        if level is None:
            return None
        if run.target_levels is None:  # the first attention call of a forward is the highest-resolution one
            run.target_levels = self.settings.target_levels(level)
        if level not in run.target_levels:
            return None
        key = self._reuse_key(level, extra)
        if key not in run.partitions:
            run.partitions[key] = self._make_partition(n, extra, level, height, width)
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

    def _make_partition(self, n: torch.Tensor, extra: dict, level: int, height: int, width: int) -> Optional[LevelMerge]:
        run, settings = self.run, self.settings
        grid = TokenGrid.for_unet_level(height, width, level)
        chunks = len(extra.get("cond_or_uncond") or [0]) or 1
        if n.shape[0] % chunks:
            self.note("rows", "batch of %d rows does not split into %d cond chunks; block left unmerged",
                      n.shape[0], chunks)
            return None
        samples = n.shape[0] // chunks
        use_importance = settings.importance == "cfg" and run.map is not None
        importance = self._map_for_chunk(samples, height, width, extra) if use_importance else None
        temporal = settings.temporal_ratio > 0 and samples >= 2
        if settings.temporal_ratio > 0 and samples < 2:
            self.note("frames", "temporal_ratio needs a batch of 2 or more frames; this model call has %d latent: "
                      "spatial merging only", samples)
        groups, row_sample = samples, None
        if temporal:  # each pair of frames shares one spatial partition, so their slots hold the same tokens
            group_of = pair_groups(samples).to(n.device)
            groups = int(group_of.max()) + 1
            row_sample = group_of[torch.arange(n.shape[0], device=n.device) % samples]
        try:
            if importance is not None:
                scores = pool_to_grid(importance.to(n.device), grid)
                if temporal:
                    counts = torch.bincount(group_of, minlength=groups).to(scores.dtype)
                    scores = scores.new_zeros((groups,) + scores.shape[1:]).index_add_(0, group_of, scores)
                    scores = scores / counts.reshape((-1,) + (1,) * (scores.ndim - 1))
                part = tiled_partition(n, settings.importance_config(), grid, settings.tile_grid, importance=scores,
                                       row_sample=row_sample, generator=run.generator)
                mode = "mean"
            else:
                part = tiled_partition(n, settings.random_config(), grid, settings.tile_grid, num_samples=groups,
                                       row_sample=row_sample, generator=run.generator)
                # the warm-up (no map yet) follows warmup_mode; fallbacks (cfg = 1, unusable map) are plain ToMe
                warmup = settings.importance == "cfg" and run.map is None and not run.no_uncond
                mode = "prune" if warmup and settings.warmup_mode == "prune" else "mean"
        except ValueError as err:
            self.note(f"small{level}", "level %d (%dx%d tokens) is left unmerged: %s", level, grid.height, grid.width, err)
            return None
        if part.is_identity:
            self.note(f"tiny{level}", "level %d has only %d tokens: nothing to merge at ratio %.2f",
                      level, grid.num_tokens, settings.ratio)
            return None
        if level not in run.summary.tokens and not self.managed:
            log.info("Importance Token Merging: merging level %d, %d -> %d tokens (%s); the run's summary is "
                     "logged when the next run starts on this ComfyUI", level, part.sizes.num_tokens,
                     part.sizes.num_kept, "importance" if importance is not None else "random/warm-up")
        run.summary.tokens[level] = (part.sizes.num_tokens, part.sizes.num_kept)
        share = temporal_share(part.merge(n, mode), settings.temporal_ratio, samples) if temporal else None
        if share is not None:
            run.summary.shared[level] = (part.sizes.num_kept, share.num_computed)
        return LevelMerge(part, mode, share)

    def _map_for_chunk(self, samples: int, height: int, width: int, extra: dict) -> Optional[torch.Tensor]:
        """The importance map rows for a chunk of ``samples`` latents of size height×width, or None."""
        run = self.run
        imap = run.map
        frames = window_frames(extra, imap.shape[0], samples)
        if frames is not None:  # a context window: the rows of the window's frames, in the window's order
            imap = imap[torch.as_tensor(frames, dtype=torch.long, device=imap.device)]
        if imap.shape[0] != samples:
            self.note("batch", "importance map has %d samples but the model call has %d; using random merging for it",
                      imap.shape[0], samples)
            return None
        if tuple(imap.shape[-2:]) == (height, width):
            return imap
        full_h, full_w = imap.shape[-2:]
        offsets = set()
        for area in run.areas:  # an area cond runs on a crop of the latent: find which one
            h, w, y, x = area[0], area[1], area[2], area[3]
            h, w = min(h, full_h - y), min(w, full_w - x)
            if (h, w) == (height, width):
                offsets.add((y, x))
        if len(offsets) == 1:
            y, x = offsets.pop()
            return imap[:, y:y + height, x:x + width]
        self.note(f"size{height}x{width}", "no unique importance map crop for a %dx%d model call (latent %dx%d); "
                  "using random merging for it", height, width, full_h, full_w)
        return None

    # --- importance capture ---------------------------------------------------------------------------------------

    def capture(self, args: dict) -> None:
        run = self.run
        cond, uncond = args.get("cond_denoised"), args.get("uncond_denoised")
        if not isinstance(cond, torch.Tensor) or not isinstance(uncond, torch.Tensor) or cond.ndim != 4:
            return
        if self.settings.importance != "cfg":
            return
        # cfg = 1: no uncond pass was computed (current ComfyUI passes None; the 2024 host an all-zero prediction)
        run.no_uncond = args.get("uncond") is None or not bool(uncond.abs().amax() > 0)
        if run.no_uncond:
            run.map = None
            self.note("cfg1", "no uncond pass (cfg = 1 or a guider without one): merging with the random "
                      "ToMe baseline instead (set cfg1_mode = force_uncond on the advanced node to compute it)")
            return
        run.map = importance_map(cond, uncond)
        run.areas = [tuple(int(v) for v in c["area"][:4]) for c in (args.get("cond") or []) + (args.get("uncond") or [])
                     if isinstance(c, dict) and c.get("area") is not None and len(c["area"]) >= 4]
        run.summary.maps_captured += 1


def window_frames(extra: dict, full_length: int, samples: int) -> Optional[list]:
    """The frame indices of the context window being computed, when the map (``full_length`` frames) must be sliced.

    Core ComfyUI's context windows put the window in ``transformer_options["context_window"]`` (``index_list``
    along ``dim``; 0 = the latent batch, which is the frame axis of UNet video models); AnimateDiff-Evolved puts
    ``ad_params = {"full_length", "sub_idxs", "context_length"}`` there. Both objects outlive the windowed call, so
    the slice is only taken when the window's length matches the chunk and its full length matches the map.
    """
    window = extra.get("context_window")
    if window is not None and getattr(window, "dim", 0) == 0:
        index = list(getattr(window, "index_list", None) or [])
        total = getattr(window, "total_frames", full_length)
        if index and len(index) == samples and total == full_length and max(index) < full_length:
            return index
    params = extra.get("ad_params")
    if isinstance(params, dict) and params.get("sub_idxs") is not None:
        index = list(params["sub_idxs"])
        if len(index) == samples and params.get("full_length", full_length) == full_length and max(index) < full_length:
            return index
    return None


def _runtime(extra: dict) -> Optional[MergeRuntime]:
    runtime = extra.get(KEY)
    return runtime if isinstance(runtime, MergeRuntime) else None


class SelfAttnMerge:
    """``attn1_patch``: merge the tokens that enter self-attention."""

    def __call__(self, n, context, value, extra):
        runtime = _runtime(extra)
        if runtime is None:
            return n, context, value
        plan = runtime.partition_for(n, extra)
        run = runtime.run
        run.block = plan
        if plan is None:
            return n, context, value
        run.summary.merged_calls += 1
        merged = plan.partition.merge(n, plan.mode)

        def like_n(t):  # keys/values: shorten them too when they are the block's own tokens (self-attention)
            if t is n:
                return merged
            if isinstance(t, torch.Tensor) and t.ndim == 3 and t.shape[:2] == n.shape[:2]:
                return plan.partition.merge(t, plan.mode)
            return t

        queries = plan.share.select(merged) if plan.share is not None else merged  # frames share alike queries
        return queries, like_n(context), like_n(value)


class SelfAttnUnmerge:
    """``attn1_output_patch``: give every token its slot's attention output (shared slots: the partner frame's)."""

    fill_shared = True

    def __call__(self, n, extra):
        runtime = _runtime(extra)
        plan = runtime.run.block if runtime is not None else None
        if plan is None:
            return n
        if self.fill_shared and plan.share is not None and n.shape[1] == plan.share.num_computed:
            n = plan.share.fill(n)
        if n.shape[1] != plan.partition.sizes.num_kept:
            return n
        return plan.partition.unmerge(n)


class CrossAttnMerge:
    """``attn2_patch``: merge the cross-attention queries with the block's partition."""

    def __call__(self, n, context, value, extra):
        runtime = _runtime(extra)
        plan = runtime.run.block if runtime is not None else None
        if plan is None or n.shape[1] != plan.partition.sizes.num_tokens:
            return n, context, value
        return plan.partition.merge(n, plan.mode), context, value


class CrossAttnUnmerge(SelfAttnUnmerge):
    """``attn2_output_patch``: restore the full length after cross-attention (every slot was computed)."""

    fill_shared = False


class ImportanceCapture:
    """``sampler_post_cfg_function``: keep ``|cond - uncond|`` for the next evaluation; returns denoised unchanged."""

    def __call__(self, args):
        model_options = args.get("model_options") or {}
        runtime = _runtime(model_options.get("transformer_options", {}))
        if runtime is not None:
            runtime.capture(args)
        return args["denoised"]


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
            runtime = _runtime(transformer_options)
            plan = runtime.partition_for(x, transformer_options) if runtime is not None else None
            if plan is not None:
                runtime.run.summary.merged_calls += 1
                full, x = x, plan.partition.merge(x, plan.mode)
                merged_in = x
            if plan is not None:
                transformer_options[STACK_FLAG] = True
            try:
                for index, block in enumerate(self.transformer_blocks):
                    transformer_options["block_index"] = index
                    x = block(x, context=context[index], transformer_options=transformer_options)
            finally:
                transformer_options.pop(STACK_FLAG, None)
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


def outer_sample_wrapper(executor, *args, **kwargs):
    """Current ComfyUI: a fresh runtime for each sampling run, summary logged at the end."""
    guider = executor.class_obj
    original = guider.model_options
    template = _runtime(original.get("transformer_options", {}))
    if template is None:
        return executor(*args, **kwargs)
    import comfy.model_patcher  # noqa: PLC0415 (host module, only present inside ComfyUI)

    guider.model_options = comfy.model_patcher.create_model_options_clone(original)
    runtime = guider.model_options["transformer_options"][KEY] = template.fresh()
    try:
        return executor(*args, **kwargs)
    finally:
        runtime.finish_run()
        guider.model_options = original


def is_unet(model) -> bool:
    """True for models whose diffusion model is ComfyUI's UNetModel (SD1.x/2.x/SDXL/SVD/Zero123 …)."""
    diffusion_model = getattr(getattr(model, "model", None), "diffusion_model", None)
    return type(diffusion_model).__name__ == "UNetModel"


def _model_sampling(model):
    getter = getattr(model, "get_model_object", None)
    if getter is not None:
        try:
            return getter("model_sampling")
        except Exception:  # noqa: BLE001 (older hosts or unusual patchers)
            pass
    return getattr(getattr(model, "model", None), "model_sampling", None)


def _remove_ours(patcher) -> None:
    """Drop patches of an earlier Importance Token Merging node so chaining two nodes does not merge twice."""
    model_options = patcher.model_options
    patcher.object_patches = {k: v for k, v in patcher.object_patches.items() if not getattr(v, "itm_stack", False)}
    options = model_options.setdefault("transformer_options", {})
    patches = options.get("patches")
    if patches:
        options["patches"] = {name: [p for p in plist if not isinstance(p, PATCH_TYPES)] for name, plist in patches.items()}
    post = model_options.get("sampler_post_cfg_function")
    if post:
        model_options["sampler_post_cfg_function"] = [f for f in post if not isinstance(f, PATCH_TYPES)]
    options.pop(KEY, None)


def apply(model, settings: MergeSettings):
    """Clone ``model`` and attach importance merging. The input model is never modified."""
    patched = model.clone()
    _remove_ours(patched)
    runtime = MergeRuntime(settings, sigma_range(_model_sampling(model), settings.start_percent, settings.end_percent))
    patched.model_options["transformer_options"][KEY] = runtime
    video_stacks = 0
    for name, module in patched.model.diffusion_model.named_modules():
        time_stack = getattr(module, "time_stack", None)
        if type(module).__name__ == "SpatialVideoTransformer" and time_stack is not None:
            video_stacks += 1
            for index, block in enumerate(time_stack):
                patched.add_object_patch(f"diffusion_model.{name}.time_stack.{index}",
                                         _shared_copy(block, temporal_block_class()))
    if settings.scope == "transformer":
        stack_type = merged_stack_class().__mro__[1]
        for name, module in patched.model.diffusion_model.named_modules():
            if type(module) is stack_type:  # not SpatialVideoTransformer (video models) or other subclasses
                patched.add_object_patch(f"diffusion_model.{name}", _merged_stack(module))
        if video_stacks:  # video transformer stacks keep per-frame spatial merging through the attention patches
            log.info("Importance Token Merging: scope = transformer applies to image transformer stacks; the %d "
                     "video transformer stacks merge their spatial self-attention only", video_stacks)
    if settings.scope != "transformer" or video_stacks:
        patched.set_model_attn1_patch(SelfAttnMerge())
        patched.set_model_attn1_output_patch(SelfAttnUnmerge())
        if settings.merge_cross_attn:
            patched.set_model_attn2_patch(CrossAttnMerge())
            patched.set_model_attn2_output_patch(CrossAttnUnmerge())
    if settings.importance == "cfg":
        force = settings.cfg1_mode == "force_uncond"
        patched.set_model_sampler_post_cfg_function(ImportanceCapture(), disable_cfg1_optimization=force)
        if force:
            patched.model_options["disable_cfg1_optimization"] = True
    if hasattr(patched, "add_wrapper_with_key"):
        import comfy.patcher_extension  # noqa: PLC0415

        patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, outer_sample_wrapper)
    return patched
