"""Token partitions: which tokens stay, which are merged, and into which destination.

Two partitioners share one result type, :class:`Partition`:

* :func:`importance_partition`, the paper's method. The ``M = (N - r) * pool_scale`` most important tokens form a
  pool; ``K = N * dst_fraction`` destinations are drawn from it; every token outside the pool is merged into its most
  similar destination; then the most similar important sources, until ``r`` tokens are merged; the other pool tokens
  stay as independent tokens.
* :func:`random_grid_partition`, ToMe's baseline: one random destination per ``stride_y × stride_x`` cell, the ``r``
  sources most similar to a destination are merged.

Beyond the paper, :class:`ImportanceConfig` can also spread the destinations over the image (``dst_mode="grid"`` /
``"grid_top"``) while the map still decides which tokens are forced, weight the mean of a merged slot by importance
(``weight_power``), add importance affinity to the matching (``affinity``) and protect the most important tokens
(``protect``).

A partition is computed once per sample (all rows of a sample, such as its cond and uncond rows, share it) and then
applied to any number of tensors with :meth:`Partition.merge` and :meth:`Partition.unmerge`, which are a single
index_add / index_select each. Merged sequences are ordered ``[independent tokens; destinations]``.
"""
from __future__ import annotations

import enum
import functools
import math
from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

from .grids import TokenGrid
from .importance import rows_for_samples

DstMode = Literal["random", "top", "evenly", "grid", "grid_top"]
MergeMode = Literal["mean", "prune"]
DST_MODES = ("random", "top", "evenly", "grid", "grid_top")
MERGE_MODES = ("mean", "prune")


class TokenRole(enum.IntEnum):
    """What a partition does with a token (values of :attr:`Partition.roles`)."""

    INDEPENDENT = 0  # kept, attends as itself
    DESTINATION = 1  # kept, and receives merged tokens
    MERGED = 2  # removed; gets its destination's output on unmerge


@dataclass(frozen=True)
class ImportanceConfig:
    """Settings of the importance-based partition (the paper's defaults for SD)."""

    ratio: float
    dst_fraction: float = 0.25
    pool_scale: float = 1.4
    dst_mode: DstMode = "random"
    chunk_size: int = 8192  # source rows per similarity chunk; 0 = no chunking. Same result either way.
    # fraction of all tokens, the most important ones, that are never merged as sources (beyond the paper): they stay
    # independent unless the ratio leaves no other sources to merge
    protect: float = 0.0
    # > 0: merged slots are importance-weighted means, weight = (importance / its mean) ** weight_power, so a slot
    # stays close to its most important token (beyond the paper); 0 = plain mean
    weight_power: float = 0.0
    # > 0: share of the matching similarity that comes from how alike two tokens' importance ranks are (beyond the
    # paper): sources go to destinations of similar importance, not to an important token that only looks alike
    affinity: float = 0.0


@dataclass(frozen=True)
class RandomGridConfig:
    """Settings of ToMe's random 2-D grid partition."""

    ratio: float
    stride_x: int = 2
    stride_y: int = 2
    chunk_size: int = 8192


PartitionConfig = Union[ImportanceConfig, RandomGridConfig]


class MergeSizes(NamedTuple):
    """Token counts of a partition of ``num_tokens`` tokens."""

    num_tokens: int  # N
    num_removed: int  # r: tokens merged away
    num_dst: int  # K
    pool_size: int  # M (importance) or K (random grid)

    @property
    def num_kept(self) -> int:
        return self.num_tokens - self.num_removed


def _check_ratio(ratio: float) -> None:
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and 0.0 <= ratio < 1.0):
        raise ValueError(f"ratio must be in [0, 1), got {ratio!r}")


def max_ratio(config: PartitionConfig) -> float:
    """Largest ratio the other settings allow (before integer rounding); the node's sliders stop here."""
    if isinstance(config, ImportanceConfig):
        return min(1.0 - config.dst_fraction, 1.0 - config.dst_fraction / config.pool_scale)
    return 1.0 - 1.0 / (config.stride_x * config.stride_y)


def plan_sizes(num_tokens: int, config: PartitionConfig, grid: Optional[TokenGrid] = None) -> MergeSizes:
    """Token counts for ``num_tokens`` tokens, or ``ValueError`` naming the parameter that is out of range.

    ``r == 0`` (nothing to merge: ratio 0 or too few tokens) is valid and means identity.
    """
    if num_tokens < 1:
        raise ValueError(f"cannot partition an empty token grid (num_tokens={num_tokens})")
    _check_ratio(config.ratio)
    r = int(num_tokens * config.ratio)
    if isinstance(config, ImportanceConfig):
        if not 0.0 < config.dst_fraction < 1.0:
            raise ValueError(f"dst_fraction must be in (0, 1), got {config.dst_fraction!r}")
        if not config.pool_scale >= 1.0:
            raise ValueError(f"pool_scale must be >= 1, got {config.pool_scale!r}")
        if config.dst_mode not in DST_MODES:
            raise ValueError(f"dst_mode must be one of {DST_MODES}, got {config.dst_mode!r}")
        if not 0.0 <= config.protect < 1.0:
            raise ValueError(f"protect must be in [0, 1), got {config.protect!r}")
        if not 0.0 <= config.affinity < 1.0:
            raise ValueError(f"affinity must be in [0, 1), got {config.affinity!r}")
        k = max(1, int(num_tokens * config.dst_fraction))
        m = min(int((num_tokens - r) * config.pool_scale), num_tokens)
        if r == 0:
            return MergeSizes(num_tokens, 0, k, m)
        limit = f"{max_ratio(config):.3f} for dst_fraction={config.dst_fraction} and pool_scale={config.pool_scale}"
        if r > num_tokens - k:
            raise ValueError(f"ratio={config.ratio} removes more tokens than there are sources; the maximum is {limit}")
        if m < k:
            raise ValueError(f"ratio={config.ratio} leaves a pool smaller than the destinations; the maximum is {limit}")
        return MergeSizes(num_tokens, r, k, m)
    if config.stride_x < 1 or config.stride_y < 1:
        raise ValueError(f"strides must be >= 1, got stride_x={config.stride_x}, stride_y={config.stride_y}")
    if grid is None or grid.num_tokens != num_tokens:
        raise ValueError(f"random_grid_partition needs the token grid of the {num_tokens} tokens, got {grid}")
    k = grid.frames * (grid.height // config.stride_y) * (grid.width // config.stride_x)
    if r == 0:
        return MergeSizes(num_tokens, 0, k, k)
    if k < 1:
        raise ValueError(f"a {grid.height}x{grid.width} grid has no full {config.stride_y}x{config.stride_x} cell")
    if r > num_tokens - k:
        raise ValueError(f"ratio={config.ratio} removes more than the {num_tokens - k} source tokens of this grid; "
                         f"the maximum is {(num_tokens - k) / num_tokens:.3f}")
    return MergeSizes(num_tokens, r, k, k)


@dataclass(frozen=True, eq=False)
class Partition:
    """A computed split of ``N`` tokens into ``N - r`` slots, for every row of a batch.

    Attributes:
        sizes: token counts.
        slot_of_token: [B, N] long, the merged-sequence slot of each token (merged tokens point at their destination).
        kept_tokens: [B, N - r] long, the token held by each slot (independent tokens first, then destinations).
        slot_counts: [B, N - r, 1] float32, how many tokens each slot stands for (for mean merging).
        roles: [S, N] uint8 :class:`TokenRole` per sample (for visualisation).
        row_sample: [B] long, the sample of each batch row.
        token_weights: optional [B, N, 1] float32 weights of a weighted mean merge (None: plain mean), and
        slot_weights: [B, N - r, 1], their sums per slot.
    """

    sizes: MergeSizes
    slot_of_token: Optional[torch.Tensor]
    kept_tokens: Optional[torch.Tensor]
    slot_counts: Optional[torch.Tensor]
    roles: torch.Tensor
    row_sample: torch.Tensor
    token_weights: Optional[torch.Tensor] = None
    slot_weights: Optional[torch.Tensor] = None

    @property
    def is_identity(self) -> bool:
        return self.sizes.num_removed == 0

    def take_rows(self, index: torch.Tensor) -> "Partition":
        """This partition laid out on another batch: row ``i`` of the result is row ``index[i]`` of this one."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.row_sample.device)
        if index.ndim != 1:  # values are not checked here (no host sync); an out-of-range row fails in the indexing
            raise ValueError(f"row index must be 1-D, got shape {tuple(index.shape)}")
        if self.is_identity:
            return Partition(self.sizes, None, None, None, self.roles, self.row_sample[index])
        weighted = self.token_weights is not None
        return Partition(self.sizes, self.slot_of_token[index], self.kept_tokens[index], self.slot_counts[index],
                         self.roles, self.row_sample[index], self.token_weights[index] if weighted else None,
                         self.slot_weights[index] if weighted else None)

    def merge(self, x: torch.Tensor, mode: MergeMode = "mean") -> torch.Tensor:
        """[B, N, C] → [B, N - r, C]: ``mean`` averages each destination with its merged tokens, ``prune`` drops them."""
        if self.is_identity:
            return x
        self._check(x, self.sizes.num_tokens)
        batch, _, channels = x.shape
        if mode == "prune":
            return x.gather(1, self.kept_tokens[:, :, None].expand(batch, -1, channels))
        if mode != "mean":
            raise ValueError(f"merge mode must be one of {MERGE_MODES}, got {mode!r}")
        # rows flattened into one axis: index_add_ / index_select over whole rows of channels are 2-3x faster than
        # scatter_add_ / gather with an index expanded over the channels (CPU, fp32, 5k tokens x 2k channels)
        if self.token_weights is not None:  # weighted mean: a slot leans towards its heavier tokens
            x = x * self.token_weights.to(x.dtype)
            weights = self.slot_weights
        else:
            weights = self.slot_counts
        summed = x.new_zeros(batch * self.sizes.num_kept, channels).index_add_(
            0, self._flat_slots, x.reshape(-1, channels))
        return summed.view(batch, self.sizes.num_kept, channels).div_(weights.to(x.dtype))

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """[B, N - r, C] → [B, N, C]: each token gets its slot's value (merged tokens copy their destination)."""
        if self.is_identity:
            return y
        self._check(y, self.sizes.num_kept)
        batch, _, channels = y.shape
        return y.reshape(-1, channels).index_select(0, self._flat_slots).view(batch, self.sizes.num_tokens, channels)

    @functools.cached_property
    def _flat_slots(self) -> torch.Tensor:
        """[B * N] slot of each token in the rows-flattened merged sequence (row b's slots start at b * (N - r))."""
        rows = self.slot_of_token.shape[0]
        offsets = torch.arange(rows, device=self.slot_of_token.device)[:, None] * self.sizes.num_kept
        return (self.slot_of_token + offsets).reshape(-1)

    def _check(self, x: torch.Tensor, length: int) -> None:
        rows = self.slot_of_token.shape[0]
        if x.ndim != 3 or x.shape[0] != rows or x.shape[1] != length:
            raise ValueError(f"expected a [{rows}, {length}, C] tensor for this partition, got {tuple(x.shape)}")


def importance_partition(
    metric: torch.Tensor,
    importance: torch.Tensor,
    config: ImportanceConfig,
    *,
    row_sample: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    grid: Optional[TokenGrid] = None,
) -> Partition:
    """The paper's importance-guided partition.

    Args:
        metric: [B, N, C] block features; cosine similarity on them picks each source's destination.
        importance: [S, N] (or [S, ...] with N positions, e.g. from :func:`merging.grids.pool_to_grid`), one map per
            sample; higher = more important.
        config: sizes and modes.
        row_sample: [B] long, the sample (row of ``importance``) of each batch row. Default: the batch repeats its
            samples in blocks (``[uncond; cond]``), row ``i`` → sample ``i % S``.
        generator: source of randomness for ``dst_mode="random"`` (default: a fresh generator seeded with 0).
        grid: the token grid; needed for ``dst_mode="grid"``, where the destinations are ToMe's random 2×2 grid
            (spread over the whole image, so unimportant tokens merge into nearby similar ones) instead of members
            of the important pool; the importance map still decides which tokens are forced to merge and which stay.
    """
    batch, num_tokens, _ = _check_metric(metric)
    scores_map = importance.reshape(importance.shape[0], -1)
    if scores_map.shape[1] != num_tokens:
        raise ValueError(f"importance map has {scores_map.shape[1]} positions per sample but the block has {num_tokens} tokens")
    num_samples = scores_map.shape[0]
    sizes = plan_sizes(num_tokens, config)
    row_sample = _resolve_rows(batch, num_samples, row_sample, metric.device)
    device = metric.device
    if sizes.num_removed == 0:
        return _identity(sizes, num_samples, row_sample)
    k, m = sizes.num_dst, sizes.pool_size
    scores_map = scores_map.to(device=device, dtype=torch.float32)
    weights = None
    if config.weight_power > 0:
        relative = scores_map / scores_map.mean(dim=1, keepdim=True).clamp_min(1e-12)
        weights = relative.clamp_min(1e-3).pow(config.weight_power)
    order = torch.argsort(scores_map, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(num_tokens, device=device).expand(num_samples, -1))
    if config.dst_mode in ("grid", "grid_top"):
        if grid is None or grid.num_tokens != num_tokens:
            raise ValueError(f"dst_mode={config.dst_mode!r} needs the token grid of the {num_tokens} tokens, got {grid}")
        if config.dst_mode == "grid":
            dst = _grid_destinations(grid, 2, 2, generator, device).expand(num_samples, -1)
        else:  # the most important token of each 2x2 cell
            dst = _grid_destinations(grid, 2, 2, None, device, scores=scores_map)
        sizes = sizes._replace(num_dst=dst.shape[1])
        if dst.shape[1] < 1 or sizes.num_removed > num_tokens - dst.shape[1]:
            raise ValueError(f"ratio={config.ratio} removes more than the {num_tokens - dst.shape[1]} non-destination "
                             f"tokens of a {grid.height}x{grid.width} grid with 2x2 destination cells")
    elif config.dst_mode == "random":
        # k random members of the pool: every token position draws a key and the pool's k lowest keys win. Keys
        # belong to positions, not to ranks, so a tiny change of the map (float noise between call layouts) that
        # reorders tokens inside the pool changes nothing, and one crossing the pool's edge changes one destination
        keys = torch.rand(num_samples, num_tokens, generator=_generator(generator), device=_gen_device(generator))
        dst = keys.to(device).masked_fill(rank >= m, 2.0).argsort(dim=1)[:, :k]
    elif config.dst_mode == "top":
        dst = order[:, :k]
    else:  # "evenly": evenly spaced through the importance-ranked pool (plan_sizes checked the mode)
        dst = order[:, torch.arange(k, device=device) * m // k]
    terms = _ImportanceTerms(rank, m, int(num_tokens * config.protect), config.affinity, weights)
    return _assemble(metric, dst, sizes, row_sample, config.chunk_size, terms)


def random_grid_partition(
    metric: torch.Tensor,
    grid: TokenGrid,
    config: RandomGridConfig,
    *,
    row_sample: Optional[torch.Tensor] = None,
    num_samples: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> Partition:
    """ToMe's baseline: a random destination in each ``stride_y × stride_x`` cell of every frame, the same for all
    samples; the ``r`` sources most similar to a destination are merged into it. Uses no importance map.

    ``num_samples`` defaults to the batch size (each row its own sample) unless ``row_sample`` says otherwise.
    """
    batch, num_tokens, _ = _check_metric(metric)
    sizes = plan_sizes(num_tokens, config, grid)
    if num_samples is None:
        num_samples = int(row_sample.max()) + 1 if row_sample is not None else batch
    row_sample = _resolve_rows(batch, num_samples, row_sample, metric.device)
    if sizes.num_removed == 0:
        return _identity(sizes, num_samples, row_sample)
    dst = _grid_destinations(grid, config.stride_x, config.stride_y, generator, metric.device).expand(num_samples, -1)
    return _assemble(metric, dst, sizes, row_sample, config.chunk_size, None)


def make_partition(
    metric: torch.Tensor,
    config: PartitionConfig,
    *,
    grid: Optional[TokenGrid] = None,
    importance: Optional[torch.Tensor] = None,
    row_sample: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> Partition:
    """One entry point for both partitioners: the config's type picks the method."""
    if isinstance(config, ImportanceConfig):
        if importance is None:
            raise ValueError("an ImportanceConfig needs an importance map")
        return importance_partition(metric, importance, config, row_sample=row_sample, generator=generator, grid=grid)
    if isinstance(config, RandomGridConfig):
        if grid is None:
            raise ValueError("a RandomGridConfig needs the token grid")
        samples = importance.shape[0] if importance is not None else None
        return random_grid_partition(metric, grid, config, row_sample=row_sample, num_samples=samples, generator=generator)
    raise TypeError(f"unknown partition config {type(config).__name__}")


def tile_token_order(grid: TokenGrid, tiles_y: int, tiles_x: int) -> torch.Tensor:
    """[T, Nt] token indices of each tile (row-major tiles, row-major tokens inside a tile, every frame).

    Tiles are the views of a multi-view image laid out as a ``tiles_y × tiles_x`` grid in one latent (Zero123++).
    Raises ValueError when the token grid does not split into equal tiles.
    """
    if tiles_y < 1 or tiles_x < 1:
        raise ValueError(f"tiles must be >= 1, got {tiles_y}x{tiles_x}")
    if grid.height % tiles_y or grid.width % tiles_x:
        raise ValueError(f"a {grid.height}x{grid.width} token grid does not split into {tiles_y}x{tiles_x} equal tiles")
    th, tw = grid.height // tiles_y, grid.width // tiles_x
    index = torch.arange(grid.num_tokens).reshape(grid.frames, tiles_y, th, tiles_x, tw)
    return index.permute(1, 3, 0, 2, 4).reshape(tiles_y * tiles_x, -1)


def tiled_partition(
    metric: torch.Tensor,
    config: PartitionConfig,
    grid: TokenGrid,
    tiles: tuple,
    *,
    importance: Optional[torch.Tensor] = None,
    row_sample: Optional[torch.Tensor] = None,
    num_samples: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> Partition:
    """A partition that never merges across tiles: each tile of every sample is partitioned on its own (with the
    same config, so each tile loses the same share of tokens) and the results are laid side by side.

    ``tiles`` is ``(tiles_y, tiles_x)``; ``(1, 1)`` is the same as :func:`make_partition`. ``importance`` is [S, N]
    (or [S, ...] with N positions) when ``config`` is an :class:`ImportanceConfig`.
    """
    tiles_y, tiles_x = int(tiles[0]), int(tiles[1])
    batch, num_tokens, channels = _check_metric(metric)
    if grid.num_tokens != num_tokens:
        raise ValueError(f"the token grid has {grid.num_tokens} tokens but the block has {num_tokens}")
    if (tiles_y, tiles_x) == (1, 1):
        if isinstance(config, ImportanceConfig):
            if importance is None:
                raise ValueError("an ImportanceConfig needs an importance map")
            return importance_partition(metric, importance, config, row_sample=row_sample, generator=generator,
                                        grid=grid)
        return random_grid_partition(metric, grid, config, row_sample=row_sample, num_samples=num_samples,
                                     generator=generator)
    device = metric.device
    order = tile_token_order(grid, tiles_y, tiles_x).to(device)  # [T, Nt]
    num_tiles, per_tile = order.shape
    if importance is not None:
        num_samples = importance.shape[0]
    elif num_samples is None:
        num_samples = int(row_sample.max()) + 1 if row_sample is not None else batch
    rows = _resolve_rows(batch, num_samples, row_sample, device)
    tile_ids = torch.arange(num_tiles, device=device)
    sub_metric = metric[:, order.reshape(-1)].reshape(batch * num_tiles, per_tile, channels)
    sub_rows = (rows[:, None] * num_tiles + tile_ids[None, :]).reshape(-1)
    sub_importance = None
    if importance is not None:
        flat = importance.reshape(num_samples, -1).to(device)
        sub_importance = flat[:, order.reshape(-1)].reshape(num_samples * num_tiles, per_tile)
    tile_grid = TokenGrid(grid.height // tiles_y, grid.width // tiles_x, grid.frames)
    if isinstance(config, ImportanceConfig):
        if sub_importance is None:
            raise ValueError("an ImportanceConfig needs an importance map")
        sub = importance_partition(sub_metric, sub_importance, config, row_sample=sub_rows, generator=generator,
                                   grid=tile_grid)
    else:
        sub = random_grid_partition(sub_metric, tile_grid, config, row_sample=sub_rows,
                                    num_samples=num_samples * num_tiles, generator=generator)
    t = sub.sizes
    sizes = MergeSizes(num_tokens, t.num_removed * num_tiles, t.num_dst * num_tiles, t.pool_size * num_tiles)
    roles = torch.empty(num_samples, num_tokens, dtype=torch.uint8, device=device)
    roles[:, order.reshape(-1)] = sub.roles.reshape(num_samples, -1)
    if sub.is_identity:
        return Partition(sizes, None, None, None, roles, rows)
    kept = t.num_kept
    offsets = (tile_ids * kept)[None, :, None]
    slot_of_token = torch.empty(batch, num_tokens, dtype=torch.long, device=device)
    slot_of_token[:, order.reshape(-1)] = (sub.slot_of_token.reshape(batch, num_tiles, per_tile) + offsets).reshape(batch, -1)
    kept_tokens = order[tile_ids[None, :, None], sub.kept_tokens.reshape(batch, num_tiles, kept)].reshape(batch, -1)
    token_weights = slot_weights = None
    if sub.token_weights is not None:
        token_weights = torch.empty(batch, num_tokens, 1, dtype=sub.token_weights.dtype, device=device)
        token_weights[:, order.reshape(-1)] = sub.token_weights.reshape(batch, num_tiles * per_tile, 1)
        slot_weights = sub.slot_weights.reshape(batch, num_tiles * kept, 1)
    return Partition(
        sizes=sizes,
        slot_of_token=slot_of_token,
        kept_tokens=kept_tokens,
        slot_counts=sub.slot_counts.reshape(batch, num_tiles * kept, 1),
        roles=roles,
        row_sample=rows,
        token_weights=token_weights,
        slot_weights=slot_weights,
    )


# --- internals -------------------------------------------------------------------------------------------------------


def _grid_destinations(grid: TokenGrid, sx: int, sy: int, generator: Optional[torch.Generator], device,
                       scores: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[1, K] token indices: one random token in each full ``sy × sx`` cell of every frame; with ``scores`` [S, N],
    [S, K]: the highest-scoring token of each cell, per sample."""
    cells_h, cells_w = grid.height // sy, grid.width // sx
    if scores is None:
        pick = torch.randint(sx * sy, (grid.frames, cells_h, cells_w), generator=_generator(generator),
                             device=_gen_device(generator)).to(device)
    else:
        cells = scores.reshape(-1, grid.frames, grid.height, grid.width)[:, :, :cells_h * sy, :cells_w * sx]
        cells = cells.reshape(-1, grid.frames, cells_h, sy, cells_w, sx).permute(0, 1, 2, 4, 3, 5)
        pick = cells.reshape(-1, grid.frames, cells_h, cells_w, sy * sx).argmax(dim=-1)  # [S, F, ch, cw]
    frame = torch.arange(grid.frames, device=device)[:, None, None]
    row = torch.arange(cells_h, device=device)[None, :, None] * sy + pick // sx
    col = torch.arange(cells_w, device=device)[None, None, :] * sx + pick % sx
    index = (frame * grid.height + row) * grid.width + col
    return index.reshape(1, -1) if scores is None else index.reshape(index.shape[0], -1)


def _check_metric(metric: torch.Tensor) -> tuple:
    if metric.ndim != 3:
        raise ValueError(f"metric must be [B, N, C], got shape {tuple(metric.shape)}")
    return tuple(metric.shape)


def _generator(generator: Optional[torch.Generator]) -> torch.Generator:
    if generator is not None:
        return generator
    fresh = torch.Generator()
    fresh.manual_seed(0)
    return fresh


def _gen_device(generator: Optional[torch.Generator]) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _resolve_rows(batch: int, num_samples: int, row_sample: Optional[torch.Tensor], device) -> torch.Tensor:
    if row_sample is None:
        return rows_for_samples(batch, num_samples, device)
    row_sample = torch.as_tensor(row_sample, device=device, dtype=torch.long)
    if row_sample.shape != (batch,):
        raise ValueError(f"row_sample must have one entry per batch row ({batch}), got shape {tuple(row_sample.shape)}")
    if batch and (int(row_sample.min()) < 0 or int(row_sample.max()) >= num_samples):
        raise ValueError(f"row_sample values must be in [0, {num_samples}), got {row_sample.tolist()}")
    return row_sample


def _identity(sizes: MergeSizes, num_samples: int, row_sample: torch.Tensor) -> Partition:
    roles = torch.zeros(num_samples, sizes.num_tokens, dtype=torch.uint8, device=row_sample.device)
    return Partition(sizes, None, None, None, roles, row_sample)


def _sample_features(metric: torch.Tensor, row_sample: torch.Tensor, num_samples: int) -> torch.Tensor:
    """[S, N, C] unit features per sample: the normalised mean direction of the sample's rows."""
    dtype = metric.dtype if metric.is_cuda else torch.float32
    feats = F.normalize(metric.to(dtype), dim=-1)
    summed = feats.new_zeros((num_samples,) + tuple(feats.shape[1:])).index_add_(0, row_sample, feats)
    return F.normalize(summed, dim=-1)


def _best_match(src: torch.Tensor, dst: torch.Tensor, chunk_size: int) -> tuple:
    """Per source row, the best cosine score over destinations and its index; chunked over sources."""
    step = src.shape[1] if chunk_size <= 0 else chunk_size
    scores, index = [], []
    dst_t = dst.transpose(1, 2)
    for start in range(0, src.shape[1], step):
        best = torch.bmm(src[:, start:start + step], dst_t).max(dim=-1)
        scores.append(best.values)
        index.append(best.indices)
    return torch.cat(scores, 1).float(), torch.cat(index, 1)


class _ImportanceTerms(NamedTuple):
    """What the importance map adds to a matching (all per sample)."""

    rank: torch.Tensor  # [S, N] importance rank of each token (0 = most important)
    pool_size: int  # tokens ranked at or beyond it are forced to merge
    protected: int  # tokens ranked below it are never merged (unless the ratio needs them: then the least important)
    affinity: float  # share of the similarity that comes from alike ranks
    weights: Optional[torch.Tensor]  # [S, N] weights of a weighted mean merge, or None


def _assemble(
    metric: torch.Tensor,
    dst: torch.Tensor,
    sizes: MergeSizes,
    row_sample: torch.Tensor,
    chunk_size: int,
    terms: Optional[_ImportanceTerms],
) -> Partition:
    """Match sources to destinations ``dst`` [S, K] and build the slot layout."""
    num_samples, k = dst.shape
    n, r = sizes.num_tokens, sizes.num_removed
    device = metric.device
    is_dst = torch.zeros(num_samples, n, dtype=torch.bool, device=device).scatter_(1, dst, True)
    src = torch.argsort(is_dst.to(torch.uint8), dim=1, stable=True)[:, : n - k]  # non-destinations, ascending
    feats = _sample_features(metric, row_sample, num_samples)
    if terms is not None and terms.affinity > 0:  # importance affinity: two unit channels of the rank angle
        angle = (1.0 - terms.rank.to(feats.dtype) / max(n - 1, 1)) * (math.pi / 2)
        feats = torch.cat([feats * math.sqrt(1.0 - terms.affinity),
                           math.sqrt(terms.affinity) * torch.stack([angle.cos(), angle.sin()], dim=-1)], dim=-1)
    channels = feats.shape[-1]
    src_feats = feats.gather(1, src[:, :, None].expand(-1, -1, channels))
    dst_feats = feats.gather(1, dst[:, :, None].expand(-1, -1, channels))
    score, match = _best_match(src_feats, dst_feats, chunk_size)
    if terms is not None:  # importance: tokens outside the pool are forced, the most important protected
        src_rank = terms.rank.gather(1, src)
        score = torch.where(src_rank >= terms.pool_size, torch.full_like(score, math.inf), score)
        if terms.protected:  # below every similarity (float32 scores: exact to 4N for millions of tokens); when the
            # ratio needs some of them, the least important go first
            score = torch.where(src_rank < terms.protected, src_rank.to(score.dtype) - 4.0 * n, score)
    by_score = torch.argsort(score, dim=1, descending=True, stable=True)
    merged_pos, indep_pos = by_score[:, :r], by_score[:, r:]
    merged = src.gather(1, merged_pos)
    independent = src.gather(1, indep_pos)
    num_indep = n - k - r
    kept = torch.cat([independent, dst], dim=1)  # [S, N - r]
    slots = torch.arange(n - r, device=device).expand(num_samples, -1)
    slot_of_token = torch.empty(num_samples, n, dtype=torch.long, device=device)
    slot_of_token.scatter_(1, kept, slots).scatter_(1, merged, num_indep + match.gather(1, merged_pos))
    counts = torch.zeros(num_samples, n - r, device=device).scatter_add_(
        1, slot_of_token, torch.ones(num_samples, n, device=device)
    )
    token_weights = slot_weights = None
    if terms is not None and terms.weights is not None:  # [S, N] per-token weights of a weighted mean merge
        token_weights = terms.weights[row_sample][:, :, None]
        slot_weights = torch.zeros(num_samples, n - r, device=device).scatter_add_(1, slot_of_token, terms.weights)
        slot_weights = slot_weights[row_sample][:, :, None]
    roles = torch.full((num_samples, n), int(TokenRole.INDEPENDENT), dtype=torch.uint8, device=device)
    roles.scatter_(1, dst, int(TokenRole.DESTINATION)).scatter_(1, merged, int(TokenRole.MERGED))
    return Partition(
        sizes=sizes,
        slot_of_token=slot_of_token[row_sample],
        kept_tokens=kept[row_sample],
        slot_counts=counts[row_sample][:, :, None],
        roles=roles,
        row_sample=row_sample,
        token_weights=token_weights,
        slot_weights=slot_weights,
    )
