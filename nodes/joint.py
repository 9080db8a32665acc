"""Family-neutral part of the adapters for Flux-style transformers (Flux, HunyuanVideo): double-stream blocks (image
and text tokens in separate streams, one joint attention) and single-stream blocks (one joint sequence).

Every joint sequence these models build is ``[text][before][image][tail]``: the image tokens are the ``grid`` tokens
that end ``tail`` tokens before the end (Flux appends reference latents, Kontext: ``tail`` = their tokens; HunyuanVideo
prepends one, ``tail`` = 0). Only image tokens merge; text and reference tokens never do. A family's runtime reads the
grid and the tail from the diffusion model's input (:meth:`JointRuntime.read_input`, called by a ``DIFFUSION_MODEL``
wrapper before every forward). Two merge sites (``scope``):

* ``attention``: inside ComfyUI's attention override, the image part of every block's joint attention q / k / v
  (after RoPE, ``[B, heads, L, head_dim]``) is merged and the output's image part restored; text, reference tokens and
  everything outside the attention kernel see every token.
* ``transformer``: every double and single block runs on the merged image tokens (``patches_replace["dit"]``): RoPE
  frequencies of the image part are gathered with the tokens, the attention mask is cut to the merged length (its
  image part must be all zeros), HunyuanVideo i2v's modulation ranges move to the merged frame boundaries, and every
  image token adds its slot's update to its own input.

Partitions: :class:`nodes.dit.VideoDiTRuntime` (one per step and sample; per latent frame for video).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from ..merging import TokenGrid, log_slot_sizes
from .dit import OVERRIDE, ChainedBlock, ChainedOverride, VideoDiTRuntime, has_attention_override, remove_patches
from .runtime import KEY, LevelMerge, attach, runtime_of
from .settings import MergeSettings

WRAPPER_KEY = "importance_tome_grid"


class JointRuntime(VideoDiTRuntime):
    """Which calls of a Flux-style forward are merged; ``grid`` / ``tail`` describe the forward being run."""

    # (block replacement name, the diffusion model's block list): the blocks merged with scope = transformer
    BLOCKS = (("double_block", "double_blocks"), ("single_block", "single_blocks"))
    WRAPPER = "DIFFUSION_MODEL"  # the wrapper kind that sees the latent (APPLY_MODEL: executor.class_obj is BaseModel)
    BLOCK_INFO = True  # the model puts block_type / block_index in transformer_options (SD3's MMDiT does not)
    IMAGE_STREAM_HEAD: Optional[int] = 0  # tokens before the image part of a double block's image stream (None: varies)
    BLOCK_MASK_KEYS = ("attn_mask", "attention_mask")  # block arguments holding a mask over the joint sequence

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.grid: Optional[TokenGrid] = None  # image token grid of the forward being run (set by the wrapper)
        self.tail = 0  # tokens after the image part of every joint sequence (appended reference latents)
        self.latent_size: Optional[Tuple[int, int]] = None  # the call's latent (H, W): image families' map crops
        self.refusal: Optional[Tuple[str, str]] = None  # (note key, text): this forward runs unmerged (read_input)

    def read_input(self, net, x: torch.Tensor, args: tuple, kwargs: dict) -> Optional[Tuple[TokenGrid, int]]:
        """(image token grid, tokens after the image part) of a forward of ``net`` on ``x``, or None (not merged,
        not counted). To run a forward unmerged with a note, set ``self.refusal`` and return the layout."""
        raise NotImplementedError

    def block_data(self, args: dict, plan: LevelMerge) -> dict:
        """The block arguments besides the tokens that must travel with the merged image tokens
        (``scope = transformer``): here RoPE over the whole joint sequence (``pe``, token axis 2), its image part
        gathered (each slot takes its kept token's). Gathered once per forward and partition."""
        pe = args.get("pe")
        if not isinstance(pe, torch.Tensor) or pe.ndim < 3 or self.image_start(pe.shape[2]) < 0:
            return {}
        return {"pe": self.gathered(pe, 2, plan)}

    def gathered(self, t: torch.Tensor, axis: int, plan: LevelMerge) -> torch.Tensor:
        """``t`` ([..., sequence, ...] along ``axis``, covering the whole sequence) with its image part gathered
        with the merged tokens, cached per forward, tensor and partition (the blocks of a forward share one)."""
        cache = self.run.partitions  # reset every forward
        key = ("gathered", id(t), axis, id(plan))
        if key not in cache or cache[key][0] is not t:
            start, image = self.image_start(t.shape[axis]), self.grid.num_tokens
            moved = plan.partition.gather(t.narrow(axis, start, image).transpose(1, axis)).transpose(1, axis)
            cache[key] = (t, torch.cat([t.narrow(axis, 0, start), moved,
                                        t.narrow(axis, start + image, t.shape[axis] - start - image)], dim=axis))
        return cache[key][1]

    def image_start(self, length: int) -> int:
        """Where the image tokens start in a ``length``-token sequence (< 0: too short to hold them)."""
        return length - self.tail - self.grid.num_tokens

    def _forward(self, extra: dict):
        if self.grid is None:
            return None  # a forward this runtime's wrapper did not see
        if self.BLOCK_INFO and (extra.get("block_index") is None
                                or extra.get("block_type") not in ("double", "single")):
            return None  # outside the blocks (e.g. HunyuanVideo's text token refiner)
        # a forward = one transformer_options dict (Flux / HunyuanVideo copy it per forward, ComfyUI per model call)
        run = self.begin_forward(extra, extra)
        return run if run.call_active else None

    def plan(self, tokens: int, metric: Callable[[], torch.Tensor], extra: dict, kind: str,
             block: Optional[int] = None) -> Optional[LevelMerge]:
        """The merge of the image tokens of a ``tokens``-long sequence (``metric()`` gives their features) in block
        ``block`` (default: transformer_options' block_index), or None to run the call unmerged."""
        if self._forward(extra) is None:
            return None
        if self.refusal is not None:
            self.note(*self.refusal)
            return None
        if self.image_start(tokens) < 0:
            return self.refuse(tokens, self.grid)
        return self.grid_merge(kind, metric(), extra, self.grid, extra.get("block_index") if block is None else block)


class ImageRuntime(JointRuntime):
    """A joint-block family of image models: the CFG map is [B, H, W] ([B, C, H, W] latents) or [B, T, H, W]
    (Qwen-Image's 5-D latent), and a model call on an area cond's crop takes the crop of it."""

    def _map_rows(self, samples: int, extra: dict, grid: TokenGrid) -> Optional[torch.Tensor]:
        imap = self.run.map
        if imap is None or imap.ndim not in (3, 4) or self.latent_size is None:
            return None
        rows = self.map_rows(samples, self.latent_size[0], self.latent_size[1], extra)
        if rows is None or rows.ndim == 3:
            return None if rows is None else rows[:, None]  # [B, 1, H, W]: one frame
        if rows.shape[1] != grid.frames:
            self.note("frames", "importance map has %d latent frames but the model call has %d; using random "
                      "merging for it", rows.shape[1], grid.frames)
            return None
        return rows


class PatchedLatentRuntime(ImageRuntime):
    """An image family seen through an ``APPLY_MODEL`` wrapper (``model`` is the BaseModel): [B, C, H, W] latents cut
    into ``diffusion_model.patch_size`` patches, nothing after the image tokens, no block info in transformer_options
    (SD3's MMDiT, PixArt)."""

    WRAPPER = "APPLY_MODEL"
    BLOCK_INFO = False

    def read_input(self, model, x, args, kwargs) -> Optional[Tuple[TokenGrid, int]]:
        net = getattr(model, "diffusion_model", None)
        if x.ndim != 4 or net is None:
            return None
        patch = net.patch_size
        return TokenGrid(-(-x.shape[-2] // patch), -(-x.shape[-1] // patch)), 0


def grid_wrapper(executor, x, *args, **kwargs):
    """``DIFFUSION_MODEL`` / ``APPLY_MODEL`` wrapper: tells the runtime the image token grid and tail of this
    forward."""
    options = forward_options(args, kwargs)
    runtime = runtime_of(options) if isinstance(options, dict) else None
    if not isinstance(runtime, JointRuntime):
        return executor(x, *args, **kwargs)
    outer = runtime.grid, runtime.tail, runtime.latent_size, runtime.refusal  # a forward inside a forward
    runtime.refusal = None  # read_input may refuse this forward (and only this one)
    layout = runtime.read_input(executor.class_obj, x, args, kwargs)
    if layout is None:
        runtime.refusal = outer[3]
        return executor(x, *args, **kwargs)
    runtime.grid, runtime.tail = layout
    runtime.latent_size = tuple(x.shape[-2:])
    try:
        return executor(x, *args, **kwargs)
    finally:
        runtime.grid, runtime.tail, runtime.latent_size, runtime.refusal = outer


def forward_options(args: tuple, kwargs: dict) -> Optional[dict]:
    """The transformer_options of a wrapped forward (a keyword, or APPLY_MODEL's positional dict)."""
    options = kwargs.get("transformer_options")
    if options is None:
        options = next((a for a in args if isinstance(a, dict) and KEY in a), None)
    return options


def _cut(t: torch.Tensor, dim: int, start: int, image: int, kept: int) -> torch.Tensor:
    """``t`` along ``dim`` with its image part ``[start, start + image)`` cut to its first ``kept`` entries."""
    head = t.narrow(dim, 0, start + kept)
    rest = t.shape[dim] - start - image
    return torch.cat([head, t.narrow(dim, start + image, rest)], dim=dim) if rest else head


def _mask_for(mask, kept: int, runtime: JointRuntime) -> tuple:
    """(usable, the attention mask on the merged sequence). The mask covers the whole joint sequence along its last
    axis (and its second-last, when square); its image part must be all zeros (masks of padded text or reference
    tokens), else the call runs unmerged (noted): a regional mask over image tokens cannot follow merged slots.
    Checked and cut once per forward and mask (the blocks of a forward share it)."""
    if mask is None:
        return True, None
    cache = runtime.run.partitions  # reset every forward
    key = ("mask", id(mask), kept)
    if key not in cache or cache[key][0] is not mask:
        cache[key] = (mask, _check_and_cut(mask, kept, runtime))
    return cache[key][1]


def _check_and_cut(mask, kept: int, runtime: JointRuntime) -> tuple:
    image = runtime.grid.num_tokens
    length = mask.shape[-1] if isinstance(mask, torch.Tensor) else 0
    start = runtime.image_start(length)
    square = isinstance(mask, torch.Tensor) and mask.ndim >= 2 and mask.shape[-2] == length
    if start < 0 or bool(mask[..., start:start + image].abs().amax() > 0) or \
            (square and bool(mask[..., start:start + image, :].abs().amax() > 0)):
        runtime.note("mask", "an attention mask over the image tokens; those calls are left unmerged")
        return False, None
    mask = _cut(mask, -1, start, image, kept)
    return True, (_cut(mask, -2, start, image, kept) if square else mask)


class JointAttentionOverride(ChainedOverride):
    """``optimized_attention_override``: merge the image part of a joint attention, restore it after."""

    def __call__(self, func, *args, **kwargs):
        extra = kwargs.get("transformer_options")
        runtime = runtime_of(extra) if isinstance(extra, dict) else None
        if not isinstance(runtime, JointRuntime) or len(args) < 3 or runtime.grid is None:
            return self._call(func, args, kwargs)
        q, k, v = args[:3]
        split = bool(kwargs.get("skip_reshape"))  # [B, heads, L, head_dim] (Flux, HunyuanVideo); else [B, L, C] (SD3)
        axis = 2 if split else 1
        if kwargs.get("skip_output_reshape") or q.ndim != (4 if split else 3) or k.ndim != q.ndim or \
                not q.shape[axis] == k.shape[axis] == v.shape[axis]:
            return self._call(func, args, kwargs)  # not a block's joint attention
        length = q.shape[axis]
        image = runtime.grid.num_tokens
        start = runtime.image_start(length)
        end = start + image

        def tokens(t):  # the image part as [B, image, C] (SD3 hands over v as [B, L, heads, head_dim])
            if not split:
                return t[:, start:end].reshape(t.shape[0], image, -1)
            return t[:, :, start:end].permute(0, 2, 1, 3).reshape(t.shape[0], image, t.shape[1] * t.shape[3])

        plan = runtime.plan(length, lambda: tokens(k), extra, "self")
        if plan is None:
            return self._call(func, args, kwargs)
        part = plan.partition
        kept = part.sizes.num_kept
        positional = "mask" not in kwargs and len(args) > 4  # Qwen-Image passes the mask after heads
        usable, mask = _mask_for(args[4] if positional else kwargs.get("mask"), kept, runtime)
        if not usable:
            return self._call(func, args, kwargs)

        def merge(t):
            merged = part.merge(tokens(t), plan.mode)
            if split:
                merged = merged.reshape(t.shape[0], -1, t.shape[1], t.shape[3]).permute(0, 2, 1, 3)
            else:
                merged = merged.reshape(t.shape[0], -1, *t.shape[2:])
            return torch.cat([t.narrow(axis, 0, start), merged, t.narrow(axis, end, length - end)], dim=axis)

        runtime.run.summary.merged_calls += 1
        call_kwargs = dict(kwargs, mask=mask) if "mask" in kwargs else kwargs
        rest = (args[3], mask) + tuple(args[5:]) if positional else tuple(args[3:])
        out = self._call_merged(func, tuple(merge(t) for t in (q, k, v)), rest, call_kwargs, runtime, plan,
                                lambda: _key_bias(part, start, length - image + kept), heads_first=split,
                                mask_index=1 if positional else None)
        # out: [B, L', H*D]
        return torch.cat([out[:, :start], part.unmerge(out[:, start:start + kept]), out[:, start + kept:]], dim=1)


def _key_bias(part, start: int, length: int) -> torch.Tensor:
    """[B, length] logit bias of a merged joint sequence whose image slots start at ``start``: log of each slot's
    token count there, 0 for text and reference tokens (proportional attention)."""
    sizes = log_slot_sizes(part.slot_counts)
    return torch.cat([sizes.new_zeros(sizes.shape[0], start), sizes,
                      sizes.new_zeros(sizes.shape[0], length - start - sizes.shape[1])], dim=1)


class BlockMerge(ChainedBlock):
    """``patches_replace["dit"]`` for a double or single block (``scope = transformer``): the block runs on the merged
    image tokens (text and reference tokens unmerged), and every image token adds its slot's update to its input."""

    def __init__(self, kind: str, previous=None, index: Optional[int] = None) -> None:
        super().__init__(previous)
        self.kind = kind  # "double_block" or "single_block"
        self.index = index  # the block's index (SD3 does not put it in transformer_options)

    def __call__(self, args: dict, extra: dict) -> dict:
        options = args.get("transformer_options") or {}
        runtime = runtime_of(options)
        x = args.get("img")
        if not isinstance(runtime, JointRuntime) or runtime.grid is None or not isinstance(x, torch.Tensor):
            return self._run_block(args, extra)
        image = runtime.grid.num_tokens
        start = runtime.image_start(x.shape[1])  # double blocks: the image stream; single blocks: after the text
        end = start + image
        head = runtime.IMAGE_STREAM_HEAD
        if self.kind == "double_block" and head is not None and 0 <= start != head:
            runtime.note("stream", "the image stream has %d tokens where %d image + %d reference tokens were expected "
                         "(another node added tokens?); left unmerged", x.shape[1], image, runtime.tail)
            return self._run_block(args, extra)
        plan = runtime.plan(x.shape[1], lambda: x[:, start:end], options, "block", self.index) if start >= 0 else None
        if plan is None:
            return self._run_block(args, extra)
        part = plan.partition
        kept = part.sizes.num_kept
        block_args = dict(args)
        for key in runtime.BLOCK_MASK_KEYS:
            if args.get(key) is not None:
                usable, block_args[key] = _mask_for(args[key], kept, runtime)
                if not usable:
                    return self._run_block(args, extra)
        dims_key = "modulation_dims_img" if self.kind == "double_block" else "modulation_dims"
        if args.get(dims_key):
            block_args[dims_key] = _merged_dims(args[dims_key], part, runtime, offset=start)
            if block_args[dims_key] is False:
                return self._run_block(args, extra)
        img = x[:, start:end]
        merged = part.merge(img, plan.mode)
        block_args["img"] = torch.cat([x[:, :start], merged, x[:, end:]], dim=1)
        block_args.update(runtime.block_data(args, plan))
        out = self._run_block(block_args, extra)
        runtime.run.summary.merged_calls += 1
        result = out["img"]
        restored = img + part.unmerge(result[:, start:start + kept] - merged)
        return dict(out, img=torch.cat([result[:, :start], restored, result[:, start + kept:]], dim=1))


def _merged_dims(dims, part, runtime: JointRuntime, offset: int):
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
        if image_bound >= grid.num_tokens:  # in the tail: shifted by the tokens merged away
            return bound - grid.num_tokens + part.sizes.num_kept
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


def apply(model, settings: MergeSettings, runtime_type: type, live=None):
    """Clone ``model`` and attach importance merging with a :class:`JointRuntime` subclass. The input model is never
    modified; merging attached by an earlier node is replaced."""
    import comfy.patcher_extension  # noqa: PLC0415 (host module)

    patched = model.clone()
    detach_all(patched)
    attach(patched, runtime_type(settings, patched.model, live=live), settings)
    patched.add_wrapper_with_key(getattr(comfy.patcher_extension.WrappersMP, runtime_type.WRAPPER), WRAPPER_KEY,
                                 grid_wrapper)
    options = patched.model_options["transformer_options"]
    if settings.scope == "transformer":
        net = patched.model.diffusion_model
        blocks = options.get("patches_replace", {}).get("dit", {})
        for name, attribute in runtime_type.BLOCKS:
            for index in range(len(getattr(net, attribute))):
                patched.set_model_patch_replace(BlockMerge(name, blocks.get((name, index)), index), "dit", name,
                                                index)
    else:
        options[OVERRIDE] = JointAttentionOverride(options.get(OVERRIDE))
    return patched


def detach_all(patched) -> None:
    """Take every joint-family patch off a clone: block replacements, attention override, runtime and wrappers (the
    PixArt adapter's too: they share the wrapper key)."""
    import comfy.patcher_extension  # noqa: PLC0415 (host module)

    remove_patches(patched, BlockMerge, JointAttentionOverride)
    for kind in ("DIFFUSION_MODEL", "APPLY_MODEL"):
        patched.remove_wrappers_with_key(getattr(comfy.patcher_extension.WrappersMP, kind), WRAPPER_KEY)


def supports_class(model, module: str, name: str) -> bool:
    """True when ``model``'s diffusion model is exactly the host class ``module.name`` (subclasses are other models)
    and the host has the hooks the joint-block adapters use."""
    if not has_joint_hooks():
        return False
    try:
        import importlib  # noqa: PLC0415

        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return False
    return type(getattr(getattr(model, "model", None), "diffusion_model", None)) is cls


def has_joint_hooks() -> bool:
    """The host has the attention override (ComfyUI >= 0.3.60) and DIFFUSION_MODEL wrappers."""
    if not has_attention_override():  # the 2024 host: no override, no comfy.patcher_extension either
        return False
    import comfy.patcher_extension  # noqa: PLC0415 (host module)

    return hasattr(comfy.patcher_extension.WrappersMP, "DIFFUSION_MODEL")
