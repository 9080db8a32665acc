"""Per-frame merging of video tokens laid out ``(t h w)`` (video DiTs such as WAN): tokens only merge with tokens of
the same latent frame, and every frame loses the same share (or, as an option, spatio-temporal merging of the whole
clip: ``frame_partition(..., across_frames=True)``).

A :class:`FramePartition` wraps an ordinary :class:`~merging.partition.Partition` whose rows are single frames
(``sample * frames + t``) and applies it to ``[B, frames * N, C]`` sequences by viewing them as
``[B * frames, N, C]``: one scatter / gather per merge or unmerge, no copy beyond that.
"""
from __future__ import annotations

from typing import Optional

import torch

from .grids import TokenGrid
from .partition import (
    ImportanceConfig,
    MergeMode,
    MergeSizes,
    Partition,
    RandomGridConfig,
    importance_partition,
    random_grid_partition,
)


class FramePartition:
    """A partition of each frame's tokens, applied to whole ``(t h w)`` sequences (duck-types :class:`Partition`)."""

    def __init__(self, frame_part: Partition, frames: int) -> None:
        if frames < 1:
            raise ValueError(f"frames must be >= 1, got {frames}")
        self.frame_part = frame_part
        self.frames = frames
        s = frame_part.sizes
        self.sizes = MergeSizes(s.num_tokens * frames, s.num_removed * frames, s.num_dst * frames, s.pool_size * frames)

    @property
    def is_identity(self) -> bool:
        return self.frame_part.is_identity

    @property
    def roles(self) -> torch.Tensor:
        """[S, frames * N] :class:`~merging.partition.TokenRole` per sample, in ``(t h w)`` order."""
        roles = self.frame_part.roles
        return roles.reshape(roles.shape[0] // self.frames, -1)

    @property
    def kept_tokens(self) -> Optional[torch.Tensor]:
        """[B, frames * (N - r)] long: the token (index in the whole ``(t h w)`` sequence) each slot stands for (its
        kept token: a destination or an independent one), frame by frame; None for an identity partition."""
        kept = self.frame_part.kept_tokens
        if kept is None:
            return None
        rows, per_frame = kept.shape
        offsets = torch.arange(self.frames, device=kept.device) * self.frame_part.sizes.num_tokens
        return (kept.reshape(rows // self.frames, self.frames, per_frame) + offsets[None, :, None]).reshape(
            rows // self.frames, -1)

    @property
    def slot_counts(self) -> Optional[torch.Tensor]:
        """[B, frames * (N - r), 1] float32: how many tokens each slot of a merged sequence stands for."""
        counts = self.frame_part.slot_counts
        if counts is None:
            return None
        return counts.reshape(counts.shape[0] // self.frames, -1, 1)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Per-token data that travels with the tokens (RoPE frequencies, per-token modulation): [B or 1, frames * N,
        ...] → [B, frames * (N - r), ...], each slot taking its kept token's entry."""
        kept = self.kept_tokens
        if kept is None:
            return t
        if t.shape[1] != self.sizes.num_tokens:
            raise ValueError(f"expected {self.sizes.num_tokens} tokens along dim 1, got {tuple(t.shape)}")
        batch = kept.shape[0]
        if t.shape[0] == 1 and batch > 1:
            t = t.expand(batch, *t.shape[1:])
        index = kept.reshape(batch, -1, *([1] * (t.ndim - 2))).expand(batch, kept.shape[1], *t.shape[2:])
        return t.gather(1, index)

    def take_rows(self, index: torch.Tensor) -> "FramePartition":
        """This partition on another batch: row ``i`` of the result is (sample) row ``index[i]`` of this one."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.frame_part.row_sample.device)
        frames = torch.arange(self.frames, device=index.device)
        return FramePartition(self.frame_part.take_rows((index[:, None] * self.frames + frames).reshape(-1)),
                              self.frames)

    def merge(self, x: torch.Tensor, mode: MergeMode = "mean") -> torch.Tensor:
        """[B, frames * N, C] → [B, frames * (N - r), C]."""
        if self.is_identity:
            return x
        batch, length, channels = self._check(x, self.sizes.num_tokens)
        merged = self.frame_part.merge(x.reshape(batch * self.frames, length // self.frames, channels), mode)
        return merged.reshape(batch, -1, channels)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """[B, frames * (N - r), C] → [B, frames * N, C]."""
        if self.is_identity:
            return y
        batch, length, channels = self._check(y, self.sizes.num_kept)
        restored = self.frame_part.unmerge(y.reshape(batch * self.frames, length // self.frames, channels))
        return restored.reshape(batch, -1, channels)

    def _check(self, x: torch.Tensor, length: int):
        if x.ndim != 3 or x.shape[1] != length:
            raise ValueError(f"expected a [B, {length}, C] tensor for this partition, got {tuple(x.shape)}")
        return x.shape


def frame_partition(
    metric: torch.Tensor,
    grid: TokenGrid,
    config,
    *,
    importance: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    across_frames: bool = False,
) -> FramePartition:
    """Partition every frame of each sample on its own (or, ``across_frames``, each sample's whole video at once).

    Args:
        metric: [S, frames * N, C] features of one row per sample, tokens in ``(t h w)`` order of ``grid``.
        grid: the token grid (``frames × height × width``).
        config: :class:`ImportanceConfig` (needs ``importance``) or :class:`RandomGridConfig`.
        importance: [S, frames * N] map on the grid (e.g. :func:`merging.grids.pool_to_grid`).
        across_frames: spatio-temporal merging: the frames are stacked into one ``(frames * height) × width`` grid,
            so destinations are spread over every frame and a token may merge into a destination of any frame (the
            most alike one); frames then keep different numbers of tokens. The result has ``frames == 1``.
    """
    samples, length, channels = metric.shape
    if length != grid.num_tokens:
        raise ValueError(f"the token grid {grid} has {grid.num_tokens} tokens but the block has {length}")
    if across_frames:
        per_frame, frames = TokenGrid(grid.frames * grid.height, grid.width), 1
    else:
        per_frame, frames = TokenGrid(grid.height, grid.width), grid.frames
    rows = metric.reshape(samples * frames, per_frame.num_tokens, channels)
    if isinstance(config, ImportanceConfig):
        if importance is None:
            raise ValueError("an ImportanceConfig needs an importance map")
        scores = importance.reshape(samples * frames, per_frame.num_tokens)
        part = importance_partition(rows, scores, config, generator=generator, grid=per_frame)
    elif isinstance(config, RandomGridConfig):
        part = random_grid_partition(rows, per_frame, config, generator=generator)
    else:
        raise TypeError(f"unknown partition config {type(config).__name__}")
    return FramePartition(part, frames)
