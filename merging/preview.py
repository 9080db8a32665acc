"""Pictures of what merging does: the importance map and the kept / destination / merged map of a token grid.

Pure torch, images as float [B, H, W, 3] in [0, 1] (ComfyUI's IMAGE layout). Used by the preview node and the live
preview of the web UI; nothing here is on the sampling path except :func:`quantise_map` (one small copy per step).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .grids import TokenGrid
from .partition import TokenRole

# what each role looks like in a merge map (RGB in [0, 1])
ROLE_COLOURS = {
    TokenRole.INDEPENDENT: (0.18, 0.74, 0.38),  # green: kept as itself
    TokenRole.DESTINATION: (1.00, 0.80, 0.10),  # yellow: kept, and other tokens merged into it
    TokenRole.MERGED: (0.20, 0.30, 0.85),  # blue: merged away (gets its destination's output)
}
NO_MAP_GREY = 0.5  # an importance picture of a step that had no map (warm-up, importance = random, cfg = 1)

# an "inferno"-like ramp: black -> purple -> red-orange -> yellow -> near white
_STOPS = torch.tensor([
    [0.00, 0.00, 0.02],
    [0.34, 0.06, 0.43],
    [0.80, 0.22, 0.30],
    [0.99, 0.60, 0.05],
    [0.99, 0.99, 0.75],
])


def quantise_map(importance: torch.Tensor) -> torch.Tensor:
    """[S, ...] float map → uint8 of the same shape on the CPU, 255 = the sample's largest value (a ranking picture:
    only relative importance within a sample is shown)."""
    flat = importance.detach().float().reshape(importance.shape[0], -1)
    top = flat.amax(dim=1, keepdim=True).clamp_min(1e-12)
    return (flat / top * 255).round().clamp(0, 255).to(torch.uint8).reshape(importance.shape).cpu()


def heat_colours(values: torch.Tensor) -> torch.Tensor:
    """[..., H, W] values in [0, 1] → [..., H, W, 3] colours of the ramp (low = dark, high = bright)."""
    stops = _STOPS.to(values.device)
    position = values.float().clamp(0, 1) * (len(stops) - 1)
    low = position.floor().long().clamp(max=len(stops) - 2)
    frac = (position - low).unsqueeze(-1)
    return stops[low] * (1 - frac) + stops[low + 1] * frac


def role_colours(roles: torch.Tensor) -> torch.Tensor:
    """[...] :class:`TokenRole` values → [..., 3] colours."""
    table = torch.zeros(max(int(r) for r in TokenRole) + 1, 3)
    for role, colour in ROLE_COLOURS.items():
        table[int(role)] = torch.tensor(colour)
    return table[roles.long().cpu()]


def roles_on_grid(roles: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
    """[S, N] roles in token order ``(t h w)`` → [S * frames, height, width] (one picture per frame)."""
    if roles.ndim != 2 or roles.shape[1] != grid.num_tokens:
        raise ValueError(f"expected roles of shape [S, {grid.num_tokens}] for a {grid} grid, got {tuple(roles.shape)}")
    return roles.reshape(roles.shape[0] * grid.frames, grid.height, grid.width)


def resize(pictures: torch.Tensor, height: int, width: int, smooth: bool) -> torch.Tensor:
    """[B, h, w, 3] → [B, height, width, 3]; ``smooth`` = bilinear (maps), else nearest (token cells stay crisp)."""
    if tuple(pictures.shape[1:3]) == (height, width):
        return pictures
    x = pictures.permute(0, 3, 1, 2).float()
    if smooth:
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    else:
        x = F.interpolate(x, size=(height, width), mode="nearest")
    return x.permute(0, 2, 3, 1).clamp(0, 1)


def overlay(base: Optional[torch.Tensor], layer: torch.Tensor, opacity: float) -> torch.Tensor:
    """``layer`` drawn over ``base`` (both [B, H, W, 3]) with ``opacity`` (1 = the layer only)."""
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    if base is None or opacity >= 1.0:
        return layer
    if base.shape != layer.shape:
        raise ValueError(f"base {tuple(base.shape)} and layer {tuple(layer.shape)} must have the same shape")
    return (layer * opacity + base.float() * (1 - opacity)).clamp(0, 1)


def importance_picture(quantised: Optional[torch.Tensor], count: int, height: int, width: int) -> torch.Tensor:
    """[S, h, w] uint8 map (from :func:`quantise_map`) → [S, height, width, 3] colours; ``None`` → a grey picture of
    ``count`` frames (no map at that step)."""
    if quantised is None:
        return torch.full((count, height, width, 3), NO_MAP_GREY)
    return resize(heat_colours(quantised.float() / 255), height, width, smooth=True)


def merge_picture(roles: torch.Tensor, grid: TokenGrid, height: int, width: int) -> torch.Tensor:
    """[S, N] roles → [S * frames, height, width, 3] merge map (each token a cell of its colour)."""
    return resize(role_colours(roles_on_grid(roles, grid)), height, width, smooth=False)
