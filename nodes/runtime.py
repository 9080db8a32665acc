"""Family-neutral run bookkeeping: per-run state, CFG importance capture, model-call and step detection.

A model-family adapter (``nodes/unet.py`` for UNets, ``nodes/wan.py`` for WAN) subclasses :class:`MergeRuntime`
and decides where tokens are merged; everything here is the same for every family:

* **Runs.** Per-run state lives in ``model_options["transformer_options"][KEY]``. On current ComfyUI an
  ``OUTER_SAMPLE`` wrapper gives every sampling run a fresh runtime and logs its summary at the end; on hosts without
  wrappers a run is detected when sigma goes up again (the summary is logged when the next run starts).
* **Active range.** ``start_percent`` / ``end_percent`` are turned into sigmas when a run starts, from the model
  sampling of the model *being sampled* (a ModelSampling node placed after the merging node counts), not when the
  node runs.
* **Model calls and steps.** A *forward* is one pass of the diffusion model (the adapter gives a token that is new for
  every pass); a *step* is one model evaluation (on current ComfyUI one call of the guider's ``predict_noise``,
  marked by a ``PREDICT_NOISE`` wrapper; on the 2024 host one sigma), which ComfyUI may spread over several forwards:
  cond and uncond in separate calls when memory is short, context windows, tiled wrappers. Merges are kept per step and
  shared by the forwards of that step that serve other cond chunks, so an image does not depend on how ComfyUI
  batched cond and uncond; a forward that serves a chunk again (the next tile batch or window, an extra SAG pass)
  gets its own merge.
* **Importance.** ``sampler_post_cfg_function`` stores ``|cond - uncond|`` of every evaluation as the map for the next;
  without an uncond pass (cfg = 1) and ``cfg1_mode = change``, ``|denoised - previous denoised|`` instead.
* **Previews.** The adapter reports each step's partitions per merge site (:meth:`MergeRuntime.record`): the map
  the step used and every token's role (of the whole latent, not of an area cond's crop) are kept, small and on the
  CPU, in the run's summary (the two latest runs keep them), for the preview node; a live preview callback (the web
  UI's) gets each merged evaluation when the post-cfg hook closes it.
"""
from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, List, NamedTuple, Optional, Tuple

import torch

from ..merging import Partition, TemporalShare, TokenGrid, importance_map, quantise_map
from .settings import AUTO, DEFAULT_WEIGHTING, MergeSettings, sigma_range

log = logging.getLogger("comfyui_importance_tome")

KEY = "importance_tome"
WRAPPER_KEY = "importance_tome"


@dataclass
class StepPreview:
    """What one model evaluation merged, for pictures: kept on the CPU, one byte per latent position and token."""

    step: int  # index of the model evaluation in its run (0 = first; samplers like heun evaluate twice per step)
    sigma: Optional[float]
    importance: Optional[torch.Tensor] = None  # [S, H, W] / [S, T, H, W] uint8 of the step's map (quantise_map)
    grids: Dict[int, TokenGrid] = field(default_factory=dict)  # merge site (UNet level; WAN: 0) -> its token grid
    roles: Dict[int, Dict[int, torch.Tensor]] = field(default_factory=dict)  # site -> {sample/frame: [N] TokenRole}


PREVIEW_RUNS = 2  # finished runs that keep their step previews (older summaries drop them)


@dataclass
class RunSummary:
    """What one sampling run did; kept (last few runs) on the patched model for inspection and tests."""

    evaluations_with_map: int = 0
    evaluations_without_map: int = 0
    evaluations_inactive: int = 0
    maps_captured: int = 0
    merged_calls: int = 0
    partitions: int = 0  # partitions computed (one per step, merge site and sample layout)
    tokens: Dict[int, Tuple[int, int]] = field(default_factory=dict)  # level -> (N, kept)
    shared: Dict[int, Tuple[int, int]] = field(default_factory=dict)  # level -> (kept, queries computed per frame)
    sigma_bounds: Optional[Tuple[float, float]] = None  # the active range (sigma_start, sigma_end) of this run
    fallbacks: List[str] = field(default_factory=list)
    previews: Dict[int, StepPreview] = field(default_factory=dict)  # evaluation index -> what it merged
    preview_seconds: float = 0.0  # time spent keeping previews and handing them to the live preview

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
    """How one merge site is merged in the current forward."""

    partition: Partition
    mode: str  # "mean" or "prune"
    share: Optional[TemporalShare] = None  # neighbouring frames sharing queries (temporal_ratio > 0)


@dataclass
class StepMerge:
    """A merge computed in this step, per sample, and the cond chunks it has served so far."""

    merge: Optional[LevelMerge]
    served: set


class RunState:
    """Mutable state of one sampling run."""

    def __init__(self, settings: MergeSettings) -> None:
        self.summary = RunSummary()
        self.generator = torch.Generator()
        self.generator.manual_seed(settings.seed)
        self.bounds: Optional[Tuple[float, float]] = None  # (sigma_start, sigma_end), resolved at the first call
        self.map: Optional[torch.Tensor] = None  # [b, H, W] (video DiTs: [b, T, H, W]) from the previous evaluation
        self.no_uncond = False  # the last evaluation had no uncond pass (cfg = 1): no CFG map will come
        self.previous_denoised: Optional[torch.Tensor] = None  # cfg1_mode = change: the last evaluation's prediction
        self.areas: List[Tuple[int, ...]] = []  # area conds seen by the cfg hook: (h, w, y, x)
        self.target_levels: Optional[FrozenSet[int]] = None  # fixed by the run's first attention call ("auto")
        self.last_sigma: Optional[float] = None
        self.step = -1  # index of the current model evaluation in this run
        self.evaluation_started = False  # the guider started a model evaluation (predict_noise wrapper)
        self.forward: object = None  # token of the current forward (the adapter's, compared by identity)
        self.call_active = False
        self.step_merges: Dict[object, StepMerge] = {}  # this step's merges, per site and sample layout
        self.partitions: Dict[object, object] = {}  # this forward's merges (its rows) and data gathered for them
        self.block: Optional[LevelMerge] = None  # merge of the block being run (between patch and output patch)
        self.site_marker: object = None  # the adapter's marker of its last merge-site call (WAN: forward, block)
        self.logged: set = set()


def chunk_ids(extra: dict, count: int) -> FrozenSet:
    """Names of the cond chunks of this forward: ComfyUI's per-cond uuids where it has them (current ComfyUI),
    else (cond index, occurrence) pairs from ``cond_or_uncond`` (2024 host)."""
    uuids = extra.get("uuids")
    if isinstance(uuids, (list, tuple)) and len(uuids) == count and len(set(map(str, uuids))) == count:
        return frozenset(str(u) for u in uuids)
    seen: Dict[int, int] = {}
    ids = []
    for value in list(extra.get("cond_or_uncond") or [])[:count] or [0]:
        ids.append((value, seen.get(value, 0)))
        seen[value] = seen.get(value, 0) + 1
    return frozenset(ids)


class MergeRuntime:
    """Everything the patches need: settings, the active range and the current run's state."""

    # (weight_power, affinity) that an "auto" setting takes on this model family (the quality benchmarks' choice)
    MERGE_WEIGHTING: Tuple[float, float] = DEFAULT_WEIGHTING
    # what cfg1_mode = "auto" takes on this family (cfg 1: no uncond pass). UNets: random ToMe (the change map measured
    # 0.0 to -0.2 dB against it with proportional attention on held-out seeds); DiTs override it with "change"
    CFG1_MODE = "random"

    def __init__(self, settings: MergeSettings, model=None, managed: bool = False,
                 history: Optional[list] = None, live: Optional[Callable] = None) -> None:
        self.settings = settings.with_weighting(self.weighting_for(settings))
        if self.settings.cfg1_mode == "auto":  # resolved only when unset (a family's rule may ask the host)
            self.settings = self.settings.with_cfg1_mode(self.cfg1_mode_for(self.settings))
        if self.settings.protect == AUTO:
            self.settings = self.settings.with_protect(self.protect_for(self.settings))
        # the model whose (possibly object-patched) model_sampling gives the active range when a run starts;
        # a weak reference, so deep copies of model_options (2024 host) never copy the model
        self._model = model if isinstance(model, weakref.ref) else (weakref.ref(model) if model is not None else None)
        self.managed = managed  # True when a host wrapper starts and ends each run
        self.history = history if history is not None else []
        self.live = live  # called with (runtime, StepPreview) at the end of each merged evaluation (web UI preview)
        self.run = RunState(self.settings)

    @classmethod
    def weighting_for(cls, settings: MergeSettings) -> Tuple[float, float]:
        """(weight_power, affinity) that "auto" takes with these settings on this family."""
        return cls.MERGE_WEIGHTING

    @classmethod
    def protect_for(cls, settings: MergeSettings) -> float:
        """The share of most important tokens never merged that "auto" takes with these settings on this family."""
        return 0.0

    @classmethod
    def cfg1_mode_for(cls, settings: MergeSettings) -> str:
        """What ``cfg1_mode = "auto"`` takes with these settings on this family."""
        return cls.CFG1_MODE

    def fresh(self) -> "MergeRuntime":
        """A runtime for one sampling run that shares settings and history with this one."""
        return type(self)(self.settings, self._model, managed=True, history=self.history, live=self.live)

    def __deepcopy__(self, memo) -> "MergeRuntime":
        """The 2024 host deep-copies model options on every ``model.clone()`` (a LoRA or ModelSampling node after
        the merging node, a probe): the copy starts with a fresh run but shares the history, so the runs of every
        clone are the runs of the merging node's model (what the preview node shows)."""
        copy = type(self)(self.settings, self._model, managed=self.managed, history=self.history, live=self.live)
        memo[id(self)] = copy
        return copy

    def summaries(self) -> List[RunSummary]:
        """Runs of this model and its clones, oldest first; the last one may still be running."""
        return [summary for summary in self.history if not summary.empty]

    def start_run(self) -> None:
        """Put the run in the shared history when its first forward starts (kept: the last 8 runs; with step
        previews: the last :data:`PREVIEW_RUNS`)."""
        self.history.append(self.run.summary)
        del self.history[:-8]
        for old in self.history[:-PREVIEW_RUNS]:
            old.previews.clear()

    def finish_run(self) -> None:
        run = self.run
        if not run.summary.empty:
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

    # --- per forward and step -------------------------------------------------------------------------------------

    def _bounds(self) -> Tuple[float, float]:
        """The active sigma range, from the model sampling in force now (during sampling: the sampled model's)."""
        model = self._model() if self._model is not None else None
        sampling = getattr(model, "model_sampling", None)
        return sigma_range(sampling, self.settings.start_percent, self.settings.end_percent)

    def begin_forward(self, extra: dict, forward: object) -> RunState:
        """Bookkeeping at the first merge site of a forward (``forward`` is the adapter's token for it)."""
        run = self.run
        if forward is run.forward and forward is not None:
            return run
        sigmas = extra.get("sigmas")
        sigma = float(sigmas.flatten()[0]) if isinstance(sigmas, torch.Tensor) and sigmas.numel() else None
        # a new model evaluation: the guider's predict_noise started one (current ComfyUI; heun and other second-order
        # samplers evaluate twice per step, the second time at the next step's sigma; an extra SAG pass inside an
        # evaluation is not a new one), or sigma changed (the 2024 host)
        new_step = run.evaluation_started or sigma != run.last_sigma
        run.evaluation_started = False
        if not self.managed and run.last_sigma is not None and sigma is not None and sigma > run.last_sigma * (1 + 1e-4):
            self.finish_run()  # sigma went up: a new sampling run on a host without run wrappers
            run = self.run
            new_step = True
        if run.bounds is None:
            run.bounds = run.summary.sigma_bounds = self._bounds()
            self.start_run()
        run.last_sigma = sigma
        run.forward = forward
        run.partitions = {}
        run.block = None
        start, end = run.bounds
        run.call_active = sigma is None or end <= sigma <= start
        if new_step:
            run.step += 1
            run.step_merges = {}
            if not run.call_active:
                run.summary.evaluations_inactive += 1
            elif run.map is not None and self.settings.importance == "cfg":
                run.summary.evaluations_with_map += 1
            else:
                run.summary.evaluations_without_map += 1
        return run

    def step_merge(self, key: object, chunks: FrozenSet, build: Callable[[], Optional[LevelMerge]]) -> Optional[LevelMerge]:
        """This step's per-sample merge for ``key``, shared with the step's other forwards that serve other cond
        chunks; computed by ``build`` when there is none or when one of ``chunks`` was served already."""
        run = self.run
        entry = run.step_merges.get(key)
        if entry is None or entry.served & chunks:
            entry = run.step_merges[key] = StepMerge(build(), set())
            if entry.merge is not None:
                run.summary.partitions += 1
        entry.served |= chunks
        return entry.merge

    def map_rows(self, samples: int, height: int, width: int, extra: dict) -> Optional[torch.Tensor]:
        """The importance map rows ([B, H, W], or [B, T, H, W]) for a chunk of ``samples`` latents of size
        height×width (an area cond's crop: its part of the map), or None."""
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
            return imap[..., y:y + height, x:x + width]
        self.note(f"size{height}x{width}", "no unique importance map crop for a %dx%d model call (latent %dx%d); "
                  "using random merging for it", height, width, full_h, full_w)
        return None

    def site_merge(self, site: int, grid: TokenGrid, build: Callable[[], Partition], used_map: bool,
                   frames: Optional[List[int]], row_group: Optional[torch.Tensor] = None) -> Optional[LevelMerge]:
        """What every adapter does with a new partition: ``build()`` it (a ValueError leaves the site unmerged, noted),
        skip an identity one (noted), pick the merge mode (the warm-up without a map follows ``warmup_mode``; cfg = 1
        and unusable maps are plain ToMe), keep the site's token counts (the whole latent's, not an area crop's) and
        record the step's picture (``frames`` None: not recorded)."""
        run, settings = self.run, self.settings
        try:
            part = build()
        except ValueError as err:
            self.note(f"small{site}", "merge site %d (%dx%d tokens per frame) is left unmerged: %s", site,
                      grid.height, grid.width, err)
            return None
        if part.is_identity:
            self.note(f"tiny{site}", "merge site %d has only %d tokens: nothing to merge at ratio %.2f", site,
                      grid.num_tokens, settings.ratio)
            return None
        warmup = not used_map and settings.importance == "cfg" and run.map is None and not run.no_uncond
        mode = "prune" if warmup and settings.warmup_mode == "prune" else "mean"
        if part.sizes.num_tokens >= run.summary.tokens.get(site, (0, 0))[0]:
            run.summary.tokens[site] = (part.sizes.num_tokens, part.sizes.num_kept)
        if frames is not None:
            self.record(site, grid, part, frames, used_map=used_map, row_group=row_group)
        return LevelMerge(part, mode)

    def record(self, site: int, grid: TokenGrid, part: Partition, frames: List[int], used_map: bool,
               row_group: Optional[torch.Tensor] = None) -> None:
        """Keep this step's roles at ``site`` for ``frames`` (the samples of the chunk, in order; ``row_group`` maps
        them to the partition's rows when frames share one) and the map the step used. Per frame the first record is
        kept; a larger grid at the same site (the whole latent after an area cond's crop) replaces a smaller one."""
        started = time.perf_counter()
        try:
            self._record(site, grid, part, frames, used_map, row_group)
        finally:
            self.run.summary.preview_seconds += time.perf_counter() - started

    def _record(self, site, grid, part, frames, used_map, row_group) -> None:
        run = self.run
        preview = run.summary.previews.get(run.step)
        if preview is None:
            preview = run.summary.previews[run.step] = StepPreview(run.step, run.last_sigma)
        known = preview.grids.get(site)
        if known is None or grid.num_tokens > known.num_tokens:
            # the largest grid at a site is the whole latent's (an area cond's crop may come first)
            preview.grids[site] = grid
            preview.roles[site] = {}
        elif known != grid:
            return  # a crop of the latent (area conditioning): not what the picture shows
        rows = preview.roles[site]
        if all(frame in rows for frame in frames):
            return
        roles = part.roles if row_group is None else part.roles[row_group]
        roles = roles.cpu()
        for index, frame in enumerate(frames):
            rows.setdefault(frame, roles[index])
        if used_map and preview.importance is None and run.map is not None:
            preview.importance = quantise_map(run.map)

    # --- importance capture ---------------------------------------------------------------------------------------

    def capture(self, args: dict) -> None:
        run = self.run
        preview = run.summary.previews.get(run.step)
        if self.live is not None and preview is not None and preview.roles:
            started = time.perf_counter()
            self.live(self, preview)  # the evaluation's cond chunks and crops have all been recorded
            run.summary.preview_seconds += time.perf_counter() - started
        cond, uncond = args.get("cond_denoised"), args.get("uncond_denoised")
        if not isinstance(cond, torch.Tensor) or not isinstance(uncond, torch.Tensor) or cond.ndim not in (4, 5):
            return  # image latents [B, C, H, W] (UNet video: frames are the batch) or video latents [B, C, T, H, W]
        if self.settings.importance != "cfg":
            return
        # cfg = 1: no uncond pass was computed (current ComfyUI passes None; the 2024 host an all-zero prediction)
        run.no_uncond = args.get("uncond") is None or not bool(uncond.abs().amax() > 0)
        run.areas = [tuple(int(v) for v in c["area"][:4]) for c in (args.get("cond") or []) + (args.get("uncond") or [])
                     if isinstance(c, dict) and c.get("area") is not None and len(c["area"]) >= 4]
        if run.no_uncond and self.settings.cfg1_mode == "change":
            # CFG-free importance: how much each position's denoised prediction moved since the last evaluation
            current = cond.detach().float()
            previous, run.previous_denoised = run.previous_denoised, current
            if previous is None or previous.shape != current.shape:
                run.map = None
                self.note("cfg1change", "no uncond pass (cfg = 1): importance = change of the denoised prediction "
                          "between evaluations (plain ToMe until two evaluations have been seen)")
                return
            run.map = importance_map(current, previous)
        elif run.no_uncond:
            run.map = None
            self.note("cfg1", "no uncond pass (cfg = 1 or a guider without one): merging with the random "
                      "ToMe baseline instead (cfg1_mode on the advanced node: force_uncond computes the uncond "
                      "pass for the map, change uses how the prediction moved; see README \"cfg = 1\")")
            return
        else:
            run.map = importance_map(cond, uncond)
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


def chunk_frames(extra: dict, samples: int) -> List[int]:
    """Which samples (video frames) of the whole latent batch the ``samples`` rows of a chunk are: the context
    window's frames when ComfyUI or AnimateDiff-Evolved runs one, else ``0 .. samples - 1``. The window objects
    outlive the windowed call, so a window is only believed when its length matches and its indices fit its total."""
    window = extra.get("context_window")
    if window is not None and getattr(window, "dim", 0) == 0:
        index = list(getattr(window, "index_list", None) or [])
        total = getattr(window, "total_frames", None)
        if len(index) == samples and (total is None or max(index) < total):
            return [int(i) for i in index]
    params = extra.get("ad_params")
    if isinstance(params, dict) and params.get("sub_idxs") is not None and len(params["sub_idxs"]) == samples:
        full = params.get("full_length")
        if full is None or max(params["sub_idxs"]) < full:
            return [int(i) for i in params["sub_idxs"]]
    return list(range(samples))


def runtime_of(extra: dict) -> Optional[MergeRuntime]:
    runtime = extra.get(KEY) if isinstance(extra, dict) else None
    return runtime if isinstance(runtime, MergeRuntime) else None


class ImportanceCapture:
    """``sampler_post_cfg_function``: keep ``|cond - uncond|`` for the next evaluation; returns denoised unchanged."""

    def __call__(self, args):
        model_options = args.get("model_options") or {}
        runtime = runtime_of(model_options.get("transformer_options", {}))
        if runtime is not None:
            runtime.capture(args)
        return args["denoised"]


def outer_sample_wrapper(executor, *args, **kwargs):
    """Current ComfyUI: a fresh runtime for each sampling run, summary logged at the end."""
    guider = executor.class_obj
    original = guider.model_options
    template = runtime_of(original.get("transformer_options", {}))
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


def predict_noise_wrapper(executor, *args, **kwargs):
    """Current ComfyUI: marks the start of each model evaluation (one call of the guider's predict_noise)."""
    runtime = runtime_of(getattr(executor.class_obj, "model_options", {}).get("transformer_options", {}))
    if runtime is not None:
        runtime.run.evaluation_started = True
    return executor(*args, **kwargs)


def detach(patcher) -> None:
    """Remove what :func:`attach` put on a (cloned) model: the runtime and the capture hook (the wrappers are replaced
    by key when attached again). Adapters remove their own patches besides."""
    post = patcher.model_options.get("sampler_post_cfg_function")
    if post:
        patcher.model_options["sampler_post_cfg_function"] = [f for f in post if not isinstance(f, ImportanceCapture)]
    patcher.model_options.setdefault("transformer_options", {}).pop(KEY, None)


def attach(patched, runtime: MergeRuntime, settings: MergeSettings) -> None:
    """Put ``runtime`` on a cloned model with the capture hook and (current ComfyUI) the per-run wrapper."""
    patched.model_options.setdefault("transformer_options", {})[KEY] = runtime
    # also with importance = random: the hook hands each finished evaluation to the live preview
    settings = runtime.settings  # "auto" values resolved for the model family
    force = settings.importance == "cfg" and settings.cfg1_mode == "force_uncond"
    patched.set_model_sampler_post_cfg_function(ImportanceCapture(), disable_cfg1_optimization=force)
    if force:
        patched.model_options["disable_cfg1_optimization"] = True
    if hasattr(patched, "add_wrapper_with_key"):
        import comfy.patcher_extension  # noqa: PLC0415

        wrappers = comfy.patcher_extension.WrappersMP
        # PREDICT_NOISE came after OUTER_SAMPLE: without it, evaluations are told apart by sigma (as on the 2024 host)
        for kind, wrapper in ((getattr(wrappers, "OUTER_SAMPLE", None), outer_sample_wrapper),
                              (getattr(wrappers, "PREDICT_NOISE", None), predict_noise_wrapper)):
            if kind is None:
                continue
            patched.remove_wrappers_with_key(kind, WRAPPER_KEY)
            patched.add_wrapper_with_key(kind, WRAPPER_KEY, wrapper)
