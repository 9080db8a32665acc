"""Adapter for ComfyUI's HunyuanVideo (``comfy.ldm.hunyuan_video.model.HunyuanVideo`` with a 3-D patch: HunyuanVideo
t2v / i2v, SkyReels). Current ComfyUI only.

HunyuanVideo runs Flux-style double- and single-stream blocks (:mod:`nodes.joint` does the merging). Image tokens are
``(t h w)`` with a 1×2×2 patch and always come last (a reference latent is prepended to them), so the tail is empty;
the i2v first-frame modulation ranges move with the merged frames. Partitions are per latent frame by default.
"""
from __future__ import annotations

from typing import Optional, Tuple

from ..merging import TokenGrid
from . import joint
from .settings import VIDEO_WEIGHTING, MergeSettings


def supports(model) -> bool:
    """True for ComfyUI's HunyuanVideo with a 3-D patch (video); HunyuanImage's 2-D variant is not supported yet."""
    net = getattr(getattr(model, "model", None), "diffusion_model", None)
    return joint.supports_class(model, "comfy.ldm.hunyuan_video.model", "HunyuanVideo") and \
        len(getattr(net, "patch_size", ())) == 3


class HunyuanRuntime(joint.JointRuntime):
    family = "HunyuanVideo"
    MERGE_WEIGHTING = VIDEO_WEIGHTING  # WAN's (measured there; HunyuanVideo's fidelity is not measured)
    IMAGE_STREAM_HEAD = None  # a reference latent may be prepended to the image stream

    def read_input(self, net, x, args, kwargs) -> Optional[Tuple[TokenGrid, int]]:
        if x.ndim != 5:
            return None
        pt, ph, pw = net.patch_size
        t, h, w = x.shape[2:]
        return TokenGrid((h + ph // 2) // ph, (w + pw // 2) // pw, (t + pt // 2) // pt), 0


def apply(model, settings: MergeSettings, live=None):
    """Clone ``model`` and attach importance merging to HunyuanVideo. The input model is never modified."""
    return joint.apply(model, settings, HunyuanRuntime, live=live)
