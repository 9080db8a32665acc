"""Adapter for ComfyUI's LTX-Video (``comfy.ldm.lightricks.model.LTXVModel``: LTX-Video 0.9.x, 2B and 13B). Current
ComfyUI only; LTX-2 (the audio-video ``LTXAVModel``) is not supported yet and passes through with the warning.

LTX-Video patchifies with patch size 1, so its tokens are the latent's ``(t h w)`` positions; text enters only by
cross-attention, so the self-attention (``attn1``) sees image tokens only. Keyframe tokens (``LTXVAddGuide``: guide
latents appended after the clip's frames, with their own positions, the ``keyframe_idxs`` input) come last and never
merge: they are the tail of the sequence. Latent positions whose noise mask is negative are dropped by the model
(``grid_mask``); a forward that drops any of the clip's own tokens runs unmerged with a note. Image-to-video
(``LTXVImgToVideo``) sends a noise mask, so timesteps, and with them the modulation, are per token.

The two sites are those of the joint-block families (:mod:`nodes.joint`): ``attention`` merges q / k / v of every
block's self-attention inside ComfyUI's attention override, after RoPE; cross-attention (other key length) is left
alone. ``transformer`` runs whole blocks on the merged tokens, with RoPE (``pe = (cos, sin, split)``, interleaved
[B, L, C] or split [B, heads, L, C]) and per-token modulation ([B, L, 6 C]) gathered with them; the text attention
mask is cross-attention's and needs nothing. Partitions are per latent frame by default, from the CFG map of the
clip's frames (the keyframes' frames of the map are not used).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..merging import TokenGrid
from . import joint
from .runtime import LevelMerge
from .settings import VIDEO_WEIGHTING, MergeSettings


def supports(model) -> bool:
    """True for ComfyUI's LTXVModel itself (LTX-2's audio-video model is another class: not yet)."""
    return joint.supports_class(model, "comfy.ldm.lightricks.model", "LTXVModel")


class LTXVRuntime(joint.JointRuntime):
    family = "LTX-Video"
    MERGE_WEIGHTING = VIDEO_WEIGHTING  # WAN's (measured there; LTX-Video's fidelity is not measured)
    BLOCKS = (("double_block", "transformer_blocks"),)
    BLOCK_INFO = False  # LTX-Video puts no block_index in transformer_options
    BLOCK_MASK_KEYS = ()  # its attention_mask is the text's, for cross-attention: nothing to cut

    KEYFRAMES_ARG = 5  # DIFFUSION_MODEL wrapper arguments: timestep, context, attention_mask, frame_rate,
    # transformer_options, keyframe_idxs (LTXBaseModel.forward passes them positionally)

    def read_input(self, net, x, args, kwargs) -> Optional[Tuple[TokenGrid, int]]:
        if x.ndim != 5:
            return None
        frames, height, width = (int(n) for n in x.shape[2:])
        keyframes = args[self.KEYFRAMES_ARG] if len(args) > self.KEYFRAMES_ARG else kwargs.get("keyframe_idxs")
        if keyframes is None:
            return TokenGrid(height, width, frames), 0
        per_frame = height * width
        guide = int(keyframes.shape[2])  # guide tokens, appended after the clip's frames
        clip = frames * per_frame - guide
        if clip <= 0 or clip % per_frame:
            self.refusal = ("keyframes", "keyframe tokens that are not whole latent frames; left unmerged")
            return TokenGrid(height, width, frames), 0
        tail = guide
        mask = kwargs.get("denoise_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim == 5:
            # the model drops every position whose mask is negative in any channel (LTXVAddGuide with a guide mask)
            try:
                kept = ~(mask[:1] < 0).any(dim=1).expand(1, frames, height, width).reshape(-1)
            except RuntimeError:
                kept = None
            if kept is None or not bool(kept[:clip].all()):
                self.refusal = ("grid mask", "the noise mask drops tokens of the clip's own frames; left unmerged")
                return TokenGrid(height, width, clip // per_frame), 0
            tail = int(kept[clip:].sum())
        return TokenGrid(height, width, clip // per_frame), tail

    def crop_map(self, imap: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
        """The CFG map's frames of the clip: keyframe latents are appended after them."""
        if self.tail and imap.shape[1] > grid.frames:
            return imap[:, :grid.frames]
        return imap

    def block_data(self, args: dict, plan: LevelMerge) -> dict:
        """RoPE ``pe = (cos, sin, split)`` (token axis 1 interleaved, 2 split) and per-token modulation ``vec``
        ([B, L, 6 C]; one entry for all tokens needs nothing) gathered with the merged tokens."""
        out = {}
        pe = args.get("pe")
        if isinstance(pe, (tuple, list)) and len(pe) >= 2 and all(isinstance(t, torch.Tensor) for t in pe[:2]):
            axis = 2 if (len(pe) > 2 and pe[2]) else 1
            if self.image_start(pe[0].shape[axis]) >= 0:
                out["pe"] = (self.gathered(pe[0], axis, plan), self.gathered(pe[1], axis, plan), *pe[2:])
        vec = args.get("vec")
        if isinstance(vec, torch.Tensor) and vec.ndim == 3 and vec.shape[1] > 1 and \
                self.image_start(vec.shape[1]) >= 0:
            out["vec"] = self.gathered(vec, 1, plan)
        return out


def apply(model, settings: MergeSettings, live=None):
    """Clone ``model`` and attach importance merging to LTX-Video. The input model is never modified."""
    return joint.apply(model, settings, LTXVRuntime, live=live)
