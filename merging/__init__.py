"""Importance-based token merging: pure torch, no ComfyUI.

- :mod:`merging.importance`: importance maps from cond/uncond outputs.
- :mod:`merging.grids`: token grids of UNet levels, DiT patches and videos; pooling a map onto them.
- :mod:`merging.partition`: importance-based and random-grid partitions, merge and unmerge.
- :mod:`merging.temporal`: neighbouring video frames sharing the queries of tokens that barely change.
- :mod:`merging.frames`: per-frame merging of video tokens laid out ``(t h w)`` (video DiTs).
- :mod:`merging.proportional`: proportional attention (merged keys weighted by the tokens they stand for).
- :mod:`merging.preview`: pictures of the importance map and of a partition's kept / destination / merged tokens.
"""
from .frames import FramePartition, frame_partition
from .grids import TokenGrid, find_unet_level, pool_to_grid
from .importance import importance_map, rows_for_samples
from .partition import (
    DST_MODES,
    MERGE_MODES,
    ImportanceConfig,
    MergeSizes,
    Partition,
    RandomGridConfig,
    TokenRole,
    importance_partition,
    make_partition,
    max_ratio,
    plan_sizes,
    random_grid_partition,
    tile_token_order,
    tiled_partition,
)
from .proportional import attention_with_key_bias, key_bias_mask, log_slot_sizes, padded_head_size
from .preview import ROLE_COLOURS, importance_picture, merge_picture, overlay, quantise_map
from .temporal import TemporalShare, frame_partners, pair_groups, temporal_share

__all__ = [
    "attention_with_key_bias",
    "key_bias_mask",
    "log_slot_sizes",
    "padded_head_size",
    "DST_MODES",
    "FramePartition",
    "MERGE_MODES",
    "ImportanceConfig",
    "MergeSizes",
    "Partition",
    "RandomGridConfig",
    "ROLE_COLOURS",
    "TokenGrid",
    "TemporalShare",
    "TokenRole",
    "find_unet_level",
    "frame_partition",
    "frame_partners",
    "importance_map",
    "importance_partition",
    "importance_picture",
    "make_partition",
    "merge_picture",
    "overlay",
    "pair_groups",
    "max_ratio",
    "plan_sizes",
    "quantise_map",
    "pool_to_grid",
    "random_grid_partition",
    "rows_for_samples",
    "temporal_share",
    "tile_token_order",
    "tiled_partition",
]
