"""What a user chose in a node: validated once, frozen, shared by every run of the patched model."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import FrozenSet, Optional, Tuple

from ..merging import DST_MODES, ImportanceConfig, RandomGridConfig, max_ratio

IMPORTANCE_SOURCES = ("cfg", "random")
LEVEL_CHOICES = ("auto", "auto+1", "0", "1", "2", "0,1", "1,2", "0,1,2")
WARMUP_MODES = ("prune", "merge")
CFG1_MODES = ("random", "force_uncond", "change", "auto")  # appended only: saved workflows store the name
SCOPES = ("attention", "transformer", "queries")  # appended only: saved workflows store the name
PARTITION_REUSE = ("stage", "level", "block")
VIDEO_TOKENS = ("per_frame", "across_frames")  # video DiTs: merge within each latent frame, or across the clip
TILE_CHOICES = ("1x1", "1x2", "2x1", "2x2", "2x3", "3x2", "3x3", "4x4")  # rows x columns of views in one latent
MAX_RATIO = 0.75  # what the default dst_fraction / strides allow; the advanced node checks its own combination
AUTO = -1.0  # weight_power / affinity / protect: the model family's value (MergeRuntime.MERGE_WEIGHTING, .protect_for)
# (weight_power, affinity) that "auto" takes, chosen by the quality benchmarks (README "Quality benchmark", "PixArt",
# "Video fidelity"): importance-weighted slot means on UNets (attention / transformer sites) and image DiTs; plain
# means at the UNet queries site and on PixArt; plain means without importance affinity on video DiTs
DEFAULT_WEIGHTING = (3.0, 0.2)
PLAIN_WEIGHTING = (0.0, 0.2)
VIDEO_WEIGHTING = (0.0, 0.0)


@dataclass(frozen=True)
class MergeSettings:
    ratio: float = 0.5
    importance: str = "cfg"
    start_percent: float = 0.0
    end_percent: float = 1.0
    levels: str = "auto"
    scope: str = "attention"
    dst_fraction: float = 0.25
    pool_scale: float = 1.2  # the paper: 1.4
    dst_mode: str = "grid"  # the quality benchmark's choice (the paper: random); see README "Quality benchmark"
    warmup_mode: str = "merge"  # likewise (the paper: prune)
    # no uncond pass (cfg = 1): change = importance from how the prediction moved, random = plain ToMe; auto = the
    # model family's choice (MergeRuntime.cfg1_mode_for: change on DiTs and at the UNet attention site without
    # proportional attention, random on other UNet settings; tests/cfg1_quality_protocol.sh)
    cfg1_mode: str = "auto"
    merge_cross_attn: bool = False
    seed: int = 0
    tiles: str = "1x1"
    partition_reuse: str = "stage"  # one partition per level and UNet stage (down / middle / up) per model call
    temporal_ratio: float = 0.0  # > 0: the latent batch is a frame sequence; neighbouring frames share queries
    # fraction of tokens, the most important, never merged away; AUTO: the model family's value
    # (MergeRuntime.protect_for: 0.1 at the UNet attention site with proportional attention, 0 elsewhere)
    protect: float = AUTO
    # > 0: importance-weighted mean merging (the paper: 0, plain mean); AUTO: the model family's value (3 on UNets
    # and image DiTs; 0 at the UNet queries site, on PixArt and on video DiTs, where plain means measured better)
    weight_power: float = AUTO
    affinity: float = AUTO  # > 0: matching also prefers destinations of similar importance (the paper: 0); AUTO: 0.2
    # (0 on video DiTs, 0.5 on PixArt)
    video_tokens: str = "per_frame"  # video DiTs: tokens merge within their latent frame, or across the whole clip
    # merged keys count as many times as the tokens they stand for (ToMe's proportional attention): at the attention
    # site about +1 to +2 dB on the image and video DiT demo models, +2 to +9 dB on the UNet demo model; in UNet
    # transformer stacks (scope = transformer) about +1 dB (UNets need ComfyUI's attention override)
    proportional_attention: bool = True

    def __post_init__(self) -> None:
        _choice("importance", self.importance, IMPORTANCE_SOURCES)
        _choice("levels", self.levels, LEVEL_CHOICES)
        _choice("scope", self.scope, SCOPES)
        _choice("dst_mode", self.dst_mode, DST_MODES)
        _choice("warmup_mode", self.warmup_mode, WARMUP_MODES)
        _choice("cfg1_mode", self.cfg1_mode, CFG1_MODES)
        _choice("tiles", self.tiles, TILE_CHOICES)
        _choice("partition_reuse", self.partition_reuse, PARTITION_REUSE)
        _choice("video_tokens", self.video_tokens, VIDEO_TOKENS)
        if not 0.0 <= self.temporal_ratio <= 1.0:
            raise ValueError(f"temporal_ratio must be in [0, 1], got {self.temporal_ratio}")
        if self.temporal_ratio > 0 and self.scope == "transformer":
            raise ValueError("temporal_ratio > 0 needs scope = attention or queries (frames share self-attention queries)")
        if not 0.0 <= self.start_percent <= self.end_percent <= 1.0:
            raise ValueError(
                f"need 0 <= start_percent <= end_percent <= 1, got start_percent={self.start_percent}, "
                f"end_percent={self.end_percent}"
            )
        if not 0.0 < self.dst_fraction < 1.0:
            raise ValueError(f"dst_fraction must be in (0, 1), got {self.dst_fraction}")
        if not (self.protect == AUTO or 0.0 <= self.protect < 1.0):
            raise ValueError(f"protect must be in [0, 1) (or -1 = the model family's value), got {self.protect}")
        if not self.pool_scale >= 1.0:
            raise ValueError(f"pool_scale must be >= 1, got {self.pool_scale}")
        if not (self.weight_power == AUTO or 0.0 <= self.weight_power):
            raise ValueError(f"weight_power must be >= 0 (or -1 = the model family's value), got {self.weight_power}")
        if not (self.affinity == AUTO or 0.0 <= self.affinity < 1.0):
            raise ValueError(f"affinity must be in [0, 1) (or -1 = the model family's value), got {self.affinity}")
        for name, config in (("importance", self.importance_config()), ("random", self.random_config())):
            limit = max_ratio(config)
            if not 0.0 <= self.ratio <= limit + 1e-9:
                extra = (f" with dst_fraction={self.dst_fraction} and pool_scale={self.pool_scale}"
                         if name == "importance" else " with 2x2 random cells (warm-up / random mode)")
                raise ValueError(f"ratio must be in [0, {limit:.3f}]{extra}, got {self.ratio}")

    def weighting(self, family: Tuple[float, float] = DEFAULT_WEIGHTING) -> Tuple[float, float]:
        """(weight_power, affinity): the values the user chose, ``auto`` (:data:`AUTO`) ones taken from ``family``."""
        return (family[0] if self.weight_power == AUTO else self.weight_power,
                family[1] if self.affinity == AUTO else self.affinity)

    def with_weighting(self, family: Tuple[float, float]) -> "MergeSettings":
        """These settings with an ``auto`` weight_power / affinity replaced by a model family's values."""
        weight_power, affinity = self.weighting(family)
        if (weight_power, affinity) == (self.weight_power, self.affinity):
            return self
        return dataclasses.replace(self, weight_power=weight_power, affinity=affinity)

    def with_protect(self, family: float) -> "MergeSettings":
        """These settings with an ``auto`` protect replaced by a model family's value."""
        return dataclasses.replace(self, protect=family) if self.protect == AUTO else self

    def with_cfg1_mode(self, family: str) -> "MergeSettings":
        """These settings with an ``auto`` cfg1_mode replaced by a model family's choice."""
        return dataclasses.replace(self, cfg1_mode=family) if self.cfg1_mode == "auto" else self

    def importance_config(self) -> ImportanceConfig:
        """The partition's settings; a weighting still ``auto`` here (no family resolved it) is
        :data:`DEFAULT_WEIGHTING`."""
        weight_power, affinity = self.weighting()
        protect = 0.0 if self.protect == AUTO else self.protect
        return ImportanceConfig(self.ratio, self.dst_fraction, self.pool_scale, self.dst_mode, protect=protect,
                                weight_power=weight_power, affinity=affinity)

    def random_config(self) -> RandomGridConfig:
        return RandomGridConfig(self.ratio)

    @property
    def tile_grid(self) -> Tuple[int, int]:
        """(rows, columns) of views tiled in one latent; (1, 1) = a single image."""
        rows, cols = self.tiles.split("x")
        return int(rows), int(cols)

    def target_levels(self, auto_level: int) -> FrozenSet[int]:
        """The UNet levels to merge, given the highest-resolution level that has attention."""
        if self.levels == "auto":
            return frozenset({auto_level})
        if self.levels == "auto+1":
            return frozenset({auto_level, auto_level + 1})
        return frozenset(int(part) for part in self.levels.split(","))


def _choice(name: str, value: str, allowed: Tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def sigma_range(model_sampling: Optional[object], start_percent: float, end_percent: float) -> Tuple[float, float]:
    """(sigma_start, sigma_end): merging is active for sigma_end <= sigma <= sigma_start."""
    if model_sampling is None or not hasattr(model_sampling, "percent_to_sigma"):
        return float("inf"), 0.0
    high = model_sampling.percent_to_sigma(start_percent)
    low = model_sampling.percent_to_sigma(end_percent)
    return float(high), float(low)
