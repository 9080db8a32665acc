"""Token grids: where a block's tokens sit relative to the latent, and how to bring a latent-sized map onto them."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TokenGrid:
    """A block's tokens laid out as ``frames × height × width``, flattened in that order (``(t h w)``)."""

    height: int
    width: int
    frames: int = 1

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1 or self.frames < 1:
            raise ValueError(f"token grid sizes must be >= 1, got frames={self.frames}, height={self.height}, width={self.width}")

    @property
    def num_tokens(self) -> int:
        return self.frames * self.height * self.width

    @classmethod
    def for_unet_level(cls, latent_height: int, latent_width: int, level: int, frames: int = 1) -> "TokenGrid":
        """Grid of a UNet block ``level`` downsamplings below the latent; each stride-2 step rounds up (``ceil(h/2)``)."""
        if level < 0:
            raise ValueError(f"level must be >= 0, got {level}")
        h, w = latent_height, latent_width
        for _ in range(level):
            h, w = (h + 1) // 2, (w + 1) // 2
        return cls(h, w, frames)

    @classmethod
    def for_patches(
        cls, latent_height: int, latent_width: int, patch: int, frames: int = 1, temporal_patch: int = 1
    ) -> "TokenGrid":
        """Grid of a patchified DiT: the latent is padded up to a multiple of the patch, so sizes round up."""
        if patch < 1 or temporal_patch < 1:
            raise ValueError(f"patch sizes must be >= 1, got patch={patch}, temporal_patch={temporal_patch}")
        return cls(math.ceil(latent_height / patch), math.ceil(latent_width / patch), math.ceil(frames / temporal_patch))


def find_unet_level(latent_height: int, latent_width: int, num_tokens: int, max_level: int = 4) -> Optional[int]:
    """The UNet level whose grid holds exactly ``num_tokens`` tokens, or ``None`` (e.g. a temporal attention call)."""
    for level in range(max_level + 1):
        if TokenGrid.for_unet_level(latent_height, latent_width, level).num_tokens == num_tokens:
            return level
    return None


def pool_to_grid(importance: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
    """Area-pool a latent-sized map onto ``grid`` and flatten it to token order.

    Args:
        importance: [B, H, W] or [B, T, H, W].
        grid: the target grid. Sizes need not divide: the map is edge-padded up to a multiple of the grid (as a
            strided convolution over a padded latent sees it) before averaging; a map smaller than the grid along an
            axis is first repeated (nearest) up to it.

    Returns:
        [B, grid.num_tokens], float32.
    """
    if importance.ndim == 3:
        if grid.frames != 1:
            raise ValueError(f"a [B, H, W] map has no frame axis, but the grid has frames={grid.frames}")
        maps = importance[:, None, None]
    elif importance.ndim == 4:
        maps = importance[:, None]
    else:
        raise ValueError(f"importance must be [B, H, W] or [B, T, H, W], got shape {tuple(importance.shape)}")
    maps = maps.float()
    target = (grid.frames, grid.height, grid.width)
    size = tuple(maps.shape[2:])
    if size == target:
        return maps.reshape(maps.shape[0], -1)
    if any(s < g for s, g in zip(size, target)):
        size = tuple(max(s, g) for s, g in zip(size, target))
        maps = F.interpolate(maps, size=size, mode="nearest-exact")
    factors = tuple(math.ceil(s / g) for s, g in zip(size, target))
    padded = tuple(f * g for f, g in zip(factors, target))
    pad = []
    for s, p in zip(reversed(size), reversed(padded)):
        pad += [0, p - s]
    if any(pad):
        maps = F.pad(maps, pad, mode="replicate")
    pooled = F.avg_pool3d(maps, kernel_size=factors, stride=factors)
    return pooled.reshape(pooled.shape[0], -1)
