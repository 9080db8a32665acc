"""Seeing what merging does: the Token Merging Preview node and the live preview sent to the web UI.

* :class:`MergePreview` (``ITM_MergePreview``) turns the step previews that the merging runtime keeps for the latest
  sampling run of a model into two IMAGE batches (importance map; kept / destination / merged tokens), one picture
  per sampled image or video frame, drawn over the decoded images.
* :class:`LivePreview` is attached by the merging nodes: while a sampler runs, it sends each finished model
  evaluation's pictures (first image of the batch) to the web UI as a ComfyUI server message (``send_sync``,
  which only queues the message for the server's event loop), at most every ``interval`` seconds plus one trailing
  message for the last step.
  ``web/importance_tome.js`` shows them on the merging node. The picture is drawn and encoded on another thread;
  the sampling thread only takes a snapshot of the step's first frame. Without a running ComfyUI server (scripts,
  tests) it does nothing.
"""
from __future__ import annotations

import base64
import io
import logging
import sys
import threading
import time
from typing import Optional

import numpy as np
import torch

from ..merging import TokenRole, importance_picture, merge_picture, overlay
from .runtime import StepPreview, runtime_of

log = logging.getLogger("comfyui_importance_tome")

EVENT = "importance_tome.preview"  # the server message the web extension listens to
SITE_CHOICES = ("first", "0", "1", "2", "3")


def prompt_server():
    """ComfyUI's running PromptServer, or None (no server: a script or a test booted ComfyUI without one). Looked up,
    never imported: importing ``server`` outside a running ComfyUI would start its aiohttp machinery."""
    module = sys.modules.get("server")
    return getattr(getattr(module, "PromptServer", None), "instance", None)


def preview_pictures(preview: StepPreview, site: int, height: int, width: int, frames=None):
    """(importance, merge map) pictures, [F, height, width, 3] each, of ``frames`` (default: every recorded one);
    video latents ([S, T, ...] maps, grids with T frames) give T pictures per sample, sample-major."""
    rows = preview.roles[site]
    frames = sorted(rows) if frames is None else list(frames)
    grid = preview.grids[site]
    merge = merge_picture(torch.stack([rows[f] for f in frames]), grid, height, width)
    quantised = preview.importance
    if quantised is not None:
        if max(frames) >= quantised.shape[0]:
            quantised = None  # the map does not cover these frames (cannot happen for a map of the same latent)
        else:
            quantised = quantised[torch.as_tensor(frames)]
            quantised = quantised.reshape(-1, *quantised.shape[-2:])  # [S, T, H, W] -> [S * T, H, W]
            if quantised.shape[0] != merge.shape[0]:
                quantised = None
    return importance_picture(quantised, merge.shape[0], height, width), merge


def decoded_frame_index(pictures_per_sample: int, latent_frames: int) -> Optional[torch.Tensor]:
    """For video VAEs that compress time causally (first frame alone, then ``c`` frames per latent frame: WAN,
    HunyuanVideo c = 4, LTX-Video c = 8): the latent frame of every decoded frame, or None if the counts do not fit."""
    if latent_frames < 2 or pictures_per_sample <= latent_frames or (pictures_per_sample - 1) % (latent_frames - 1):
        return None
    per = (pictures_per_sample - 1) // (latent_frames - 1)
    index = torch.zeros(pictures_per_sample, dtype=torch.long)
    index[1:] = torch.arange(pictures_per_sample - 1) // per + 1
    return index


class LivePreview:
    """Sends a step's pictures to the merging node in the web UI (see the module docstring)."""

    def __init__(self, node_id: str, interval: float = 0.25, size: int = 160) -> None:
        self.node_id = str(node_id)
        self.interval = interval
        self.size = size  # long side of each picture, in pixels
        self._lock = threading.Lock()
        self._last = 0.0
        self._pending = None
        self._timer: Optional[threading.Timer] = None
        self._sequence = 0  # messages handed over, in step order
        self._sent = 0  # the newest message sent

    def __deepcopy__(self, memo):  # model options may be deep-copied (2024 host): one sender per node
        return self

    def __call__(self, runtime, preview: StepPreview) -> None:
        if prompt_server() is None:
            return
        # a snapshot of the first frame of the first merge site now; drawn and sent on another thread
        client = getattr(prompt_server(), "client_id", None)
        if client is None:
            return  # a prompt queued without a client (the API): nobody to show it to
        site = min(preview.roles)
        frame = min(preview.roles[site])
        row = preview.roles[site][frame]
        tokens, kept = int(row.numel()), int((row != TokenRole.MERGED).sum())
        quantised = preview.importance
        snapshot = StepPreview(preview.step, preview.sigma,
                               None if quantised is None else quantised[frame:frame + 1],
                               {site: preview.grids[site]}, {site: {0: preview.roles[site][frame]}})
        with self._lock:
            self._sequence += 1
            message = (self._sequence, snapshot, site, tokens, kept, client)
            now = time.monotonic()
            if now - self._last < self.interval:
                self._pending = message  # sent by the trailing timer unless a newer step replaces it
                if self._timer is None:
                    self._timer = threading.Timer(self.interval - (now - self._last), self._flush)
                    self._timer.daemon = True
                    self._timer.start()
                return
            self._last = now
            self._pending = None  # this newer step supersedes a pending one (a due timer then sends nothing)
        # drawn and encoded off the sampling thread: the sampler only pays for the snapshot above
        threading.Thread(target=self._send, args=message, daemon=True, name="itm-live-preview").start()

    def _flush(self) -> None:
        with self._lock:
            message, self._pending, self._timer = self._pending, None, None
            self._last = time.monotonic()
        if message is not None:
            self._send(*message)

    def _send(self, sequence: int, preview: StepPreview, site: int, tokens: int, kept: int, client) -> None:
        server = prompt_server()
        if server is None:
            return
        with self._lock:
            if sequence <= self._sent:
                return  # a newer step was sent already (threads may finish out of order)
            self._sent = sequence
        try:
            grid = preview.grids[site]
            scale = max(1, self.size // max(grid.height, grid.width))
            importance, merge = preview_pictures(preview, site, grid.height * scale, grid.width * scale)
            gap = torch.ones(1, grid.height * scale, max(2, scale // 2), 3)
            picture = torch.cat([importance, gap, merge], dim=2)[0]
            buffer = io.BytesIO()
            from PIL import Image  # noqa: PLC0415 (ComfyUI's own dependency)

            Image.fromarray((picture.numpy() * 255).round().astype(np.uint8)).save(buffer, format="PNG")
            data = {
                "node": self.node_id,
                "image": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"),
                "step": preview.step,
                "site": site,
                "tokens": tokens,
                "kept": kept,
                "has_map": preview.importance is not None,
            }
            server.send_sync(EVENT, data, client)
        except Exception as err:  # a preview must never stop sampling
            log.warning("Importance Token Merging: live preview not sent (%s: %s)", type(err).__name__, err)


class MergePreview:
    DESCRIPTION = ("Shows what Importance Token Merging did in the latest sampling run of a model: the importance "
                   "map the merge used and which tokens were kept, received merges or were merged away, at one step, "
                   "one picture per image or video frame, drawn over the decoded images.")
    CATEGORY = "model_patches/token_merging"
    RETURN_TYPES = ("IMAGE", "IMAGE")
    RETURN_NAMES = ("importance", "merge_map")
    OUTPUT_TOOLTIPS = (
        "The importance map (|cond - uncond| of the previous step, bright = important; at cfg 1 on diffusion "
        "transformers how much the prediction moved) over each image; grey where the step had no map (the first "
        "step, the first two at cfg 1 on diffusion transformers, every step at cfg 1 on UNets or with importance = "
        "random).",
        "Each token of the merged level over each image: green = kept as itself, yellow = kept and other tokens "
        "merged into it, blue = merged away (it gets its destination's result).",
    )
    FUNCTION = "preview"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The MODEL output of an Importance Token Merging node, the one your sampler "
                                           "uses."}),
            "images": ("IMAGE", {"tooltip": "The images (or video frames) decoded from that sampler's output: the maps "
                                            "are drawn over them, at their size, and the preview runs after them."}),
            "step": ("INT", {"default": -1, "min": -10000, "max": 10000,
                             "tooltip": "Which model evaluation of the run to show: 0 = the first, -1 = the last one "
                                        "that merged, -2 the one before, ... (samplers like heun evaluate the model "
                                        "twice per step). A step outside the active range shows the nearest "
                                        "merged one."}),
            "level": (list(SITE_CHOICES), {"default": "first",
                                           "tooltip": "The UNet level whose tokens are shown: first = the highest-"
                                                      "resolution merged level (WAN has one: first)."}),
            "opacity": ("FLOAT", {"default": 0.6, "min": 0.0, "max": 1.0, "step": 0.05,
                                  "tooltip": "How strongly the maps cover the images: 1 = the maps only, 0 = the "
                                             "images only."}),
        }}

    def preview(self, model, images, step, level, opacity):
        runtime = runtime_of(getattr(model, "model_options", {}).get("transformer_options", {}))
        if runtime is None:
            raise ValueError("Token Merging Preview: this model has no Importance Token Merging on it. Connect the "
                             "MODEL output of an Importance Token Merging node (the one your sampler uses); at ratio 0 "
                             "or on a model the pack does not support, that node passes the model through unmerged.")
        runs = [summary for summary in runtime.summaries() if summary.previews]
        if not runs:
            raise ValueError("Token Merging Preview: no sampling run of this model has merged tokens yet. Connect "
                             "'images' to the images decoded from the sampler that uses this model (so the preview "
                             "runs after it); the log says why a run merged nothing (active range, latent too small).")
        previews = runs[-1].previews
        chosen = self._pick(sorted(previews), step)
        preview = previews[chosen]
        site = min(preview.roles) if level == "first" else int(level)
        if site not in preview.roles:
            raise ValueError(f"Token Merging Preview: level {site} was not merged at step {chosen}; merged levels: "
                             f"{sorted(preview.roles)}")
        frames = sorted(preview.roles[site])
        latent_frames = preview.grids[site].frames
        pictures = len(frames) * latent_frames
        count = images.shape[0] if images.ndim == 4 else None
        expand = None
        if count is not None and count != pictures and count % len(frames) == 0:
            expand = decoded_frame_index(count // len(frames), latent_frames)  # decoded video frames
        if count is None or (count != pictures and expand is None):
            raise ValueError(f"Token Merging Preview: 'images' holds {count if count is not None else '?'} pictures "
                             f"but the run sampled {pictures} latents (images / video frames); connect the images "
                             f"decoded from this model's sampler")
        height, width = int(images.shape[1]), int(images.shape[2])
        base = images[..., :3].float().cpu()
        importance, merge = preview_pictures(preview, site, height, width, frames)
        if expand is not None:  # every decoded frame shows its latent frame's pictures
            rows = (torch.arange(len(frames))[:, None] * latent_frames + expand[None]).reshape(-1)
            importance, merge = importance[rows], merge[rows]
        return overlay(base, importance, opacity), overlay(base, merge, opacity)

    @staticmethod
    def _pick(steps, step: int) -> int:
        if step < 0:
            return steps[max(step, -len(steps))]
        if step in steps:
            return step
        nearest = min(steps, key=lambda s: (abs(s - step), s))
        log.info("Token Merging Preview: step %d did not merge (outside the active range or past the run's end); "
                 "showing step %d", step, nearest)
        return nearest
