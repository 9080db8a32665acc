"""Temporal sharing: neighbouring video frames share the attention queries of tokens that barely change.

Frames are paired (0-1, 2-3, …; with an odd count the last frame leans on the one before it). For a pair, the
``2s`` token slots whose features are most alike in both frames are split between them: each frame computes the
queries of its half and copies the other half's outputs from its partner, so every frame runs attention for
``L - s`` queries (``s = floor(ratio * L / 2)``) against all of its own ``L`` keys and values. Every row of the
batch keeps the same number of queries, so the attention call stays one dense batch.

The slots must mean the same token in both frames: callers give a pair of frames one spatial partition (see
:func:`pair_groups`), or none. Pure torch; no ComfyUI import.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass(frozen=True, eq=False)
class TemporalShare:
    """Which slots each row computes, and where every slot's output comes from.

    Attributes:
        num_slots: L, the sequence length before sharing.
        computed: [B, L - s] long, the slots whose queries a row computes (ascending).
        source: [B, L] long, index into the flattened ``[B * (L - s)]`` outputs that gives each slot its value.
        shared: [B, L] bool, the slots a row copies from its partner (for tests and visualisation).
    """

    num_slots: int
    computed: torch.Tensor
    source: torch.Tensor
    shared: torch.Tensor

    @property
    def num_computed(self) -> int:
        return int(self.computed.shape[1])

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, C] → [B, L - s, C]: the queries a row computes."""
        self._check(x, self.num_slots)
        return x.gather(1, self.computed[:, :, None].expand(-1, -1, x.shape[-1]))

    def fill(self, y: torch.Tensor) -> torch.Tensor:
        """[B, L - s, C] → [B, L, C]: computed slots from the row itself, shared slots from its partner."""
        self._check(y, self.num_computed)
        batch, _, channels = y.shape
        return y.reshape(-1, channels)[self.source.reshape(-1)].reshape(batch, self.num_slots, channels)

    def _check(self, x: torch.Tensor, length: int) -> None:
        rows = self.computed.shape[0]
        if x.ndim != 3 or x.shape[0] != rows or x.shape[1] != length:
            raise ValueError(f"expected a [{rows}, {length}, C] tensor for this temporal share, got {tuple(x.shape)}")


def frame_partners(frames: int) -> torch.Tensor:
    """[frames] long: the partner of each frame (0↔1, 2↔3, …; an odd last frame → the frame before it)."""
    if frames < 2:
        raise ValueError(f"temporal sharing needs at least 2 frames, got {frames}")
    index = torch.arange(frames)
    partner = index ^ 1
    partner[partner >= frames] = frames - 2
    return partner


def pair_groups(frames: int) -> torch.Tensor:
    """[frames] long: the spatial-partition group of each frame, so that every frame shares one with its partner
    (an odd last frame joins the group of the pair before it)."""
    if frames < 2:
        raise ValueError(f"temporal sharing needs at least 2 frames, got {frames}")
    return (torch.arange(frames) // 2).clamp_max(frames // 2 - 1)


def temporal_share(metric: torch.Tensor, ratio: float, frames: int) -> Optional[TemporalShare]:
    """The sharing plan for ``metric`` [B, L, C], whose rows are chunks of ``frames`` consecutive frames
    (row ``i`` is frame ``i % frames``; e.g. ``[uncond frames; cond frames]``). None when nothing is shared.

    Raises ValueError for a ratio outside [0, 1] or a batch that does not split into chunks of ``frames``.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"temporal ratio must be in [0, 1], got {ratio}")
    if metric.ndim != 3:
        raise ValueError(f"metric must be [B, L, C], got shape {tuple(metric.shape)}")
    batch, length, _ = metric.shape
    if frames < 2 or batch % frames:
        raise ValueError(f"a batch of {batch} rows does not split into chunks of {frames} (>= 2) frames")
    skip = int(ratio * length / 2)
    if skip == 0:
        return None
    device = metric.device
    rows = torch.arange(batch, device=device)
    partner = (rows - rows % frames) + frame_partners(frames).to(device)[rows % frames]
    mutual = partner[partner] == rows
    feats = F.normalize(metric.float(), dim=-1)
    similarity = (feats * feats[partner]).sum(-1)  # [B, L], the same for both rows of a mutual pair
    # mutual pairs: the 2s most similar slots, ranked by the pair's leader; the leader computes even ranks
    leader = torch.minimum(rows, partner)
    order = torch.argsort(similarity[leader], dim=1, descending=True, stable=True)[:, :2 * skip]
    is_leader = (rows == leader)[:, None]
    own = torch.arange(2 * skip, device=device)[None, :] % 2 == 1  # odd ranks: the leader skips them
    skipped_rank = torch.where(is_leader, own, ~own)
    shared = torch.zeros(batch, length, dtype=torch.bool, device=device)
    shared.scatter_(1, order, skipped_rank)
    # one-way rows (an odd last frame): the s most similar slots among those its partner computes
    if not bool(mutual.all()):
        lean = (~mutual).nonzero().flatten()
        candidates = similarity[lean].masked_fill(shared[partner[lean]], -float("inf"))
        picks = torch.argsort(candidates, dim=1, descending=True, stable=True)[:, :skip]
        shared[lean] = torch.zeros_like(shared[lean]).scatter_(1, picks, True)
    computed = torch.argsort(shared.to(torch.uint8), dim=1, stable=True)[:, :length - skip]  # ascending kept slots
    kept = length - skip
    position = torch.full((batch, length), -1, dtype=torch.long, device=device)
    position.scatter_(1, computed, torch.arange(kept, device=device).expand(batch, -1))
    own_source = rows[:, None] * kept + position
    partner_source = partner[:, None] * kept + position[partner]
    source = torch.where(shared, partner_source, own_source)
    return TemporalShare(length, computed, source, shared)
