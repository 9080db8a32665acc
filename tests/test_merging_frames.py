"""Per-frame partitions of (t h w) video tokens (pure torch)."""
import pytest
import torch

from merging import (
    FramePartition, ImportanceConfig, RandomGridConfig, TokenGrid, TokenRole, frame_partition, pool_to_grid,
)


def _frame_of(grid):
    return torch.arange(grid.frames).repeat_interleave(grid.height * grid.width)


@pytest.mark.parametrize("config", [ImportanceConfig(0.5, pool_scale=1.2, dst_mode="grid"), RandomGridConfig(0.5)])
def test_tokens_merge_only_inside_their_frame(config):
    grid = TokenGrid(4, 6, frames=3)
    g = torch.Generator().manual_seed(0)
    metric = torch.randn(2, grid.num_tokens, 8, generator=g)
    importance = torch.rand(2, grid.num_tokens, generator=g)
    part = frame_partition(metric, grid, config, importance=importance, generator=torch.Generator().manual_seed(1))
    assert isinstance(part, FramePartition)
    assert part.sizes.num_tokens == 72 and part.sizes.num_kept == 36  # every frame keeps 12 of its 24 tokens
    x = torch.arange(2 * 72, dtype=torch.float32).reshape(2, 72, 1).expand(2, 72, 3).contiguous()
    merged = part.merge(x)
    assert merged.shape == (2, 36, 3)
    # frame t's slots come first-to-last in frame order: slots 12t .. 12t+11 hold frame t's tokens only
    frame = _frame_of(grid).float()
    slot_frame = part.merge(frame[None, :, None].expand(2, 72, 1).contiguous())[..., 0]
    assert torch.equal(slot_frame, torch.arange(3).repeat_interleave(12).float().expand(2, -1))
    restored = part.unmerge(merged)
    assert restored.shape == x.shape
    assert torch.equal(frame[None].expand(2, -1), part.unmerge(slot_frame[..., None])[..., 0])
    roles = part.roles
    assert roles.shape == (2, 72)
    for t in range(3):
        assert int((roles[:, t * 24:(t + 1) * 24] == TokenRole.MERGED).sum()) == 2 * 12


def test_rows_of_cond_and_uncond_share_their_sample_partition():
    grid = TokenGrid(4, 4, frames=2)
    metric = torch.randn(2, grid.num_tokens, 8, generator=torch.Generator().manual_seed(2))
    importance = torch.rand(2, grid.num_tokens, generator=torch.Generator().manual_seed(3))
    part = frame_partition(metric, grid, ImportanceConfig(0.5, dst_mode="top"), importance=importance)
    rows = part.take_rows(torch.tensor([0, 1, 0, 1]))  # [uncond; cond] of two samples
    x = torch.randn(4, 32, 5, generator=torch.Generator().manual_seed(4))
    merged = rows.merge(x)
    torch.testing.assert_close(merged[:2], part.merge(x[:2]))
    torch.testing.assert_close(merged[2:], part.merge(x[2:]))


def test_importance_decides_per_frame():
    """Frame 0 important on the left, frame 1 on the right: each frame merges away its own unimportant half."""
    grid = TokenGrid(2, 4, frames=2)
    latent = torch.zeros(1, 2, 2, 4)
    latent[0, 0, :, :2] = 1.0
    latent[0, 1, :, 2:] = 1.0
    importance = pool_to_grid(latent, grid)
    metric = torch.randn(1, 16, 4, generator=torch.Generator().manual_seed(5))
    part = frame_partition(metric, grid, ImportanceConfig(0.5, pool_scale=1.0, dst_mode="top"), importance=importance)
    roles = part.roles.reshape(2, 2, 4)
    assert bool((roles[0, :, 2:] == TokenRole.MERGED).all()) and bool((roles[1, :, :2] == TokenRole.MERGED).all())


def test_bad_shapes_are_refused():
    grid = TokenGrid(2, 2, frames=2)
    with pytest.raises(ValueError, match="has 8 tokens but the block has 7"):
        frame_partition(torch.randn(1, 7, 4), grid, RandomGridConfig(0.5))
    part = frame_partition(torch.randn(1, 8, 4), TokenGrid(2, 2, frames=2), RandomGridConfig(0.5))
    with pytest.raises(ValueError, match=r"expected a \[B, 8, C\]"):
        part.merge(torch.randn(1, 6, 4))


def test_kept_tokens_and_gather_carry_per_token_data():
    grid = TokenGrid(2, 4, frames=3)
    metric = torch.randn(2, grid.num_tokens, 4, generator=torch.Generator().manual_seed(6))
    part = frame_partition(metric, grid, RandomGridConfig(0.5), generator=torch.Generator().manual_seed(7))
    kept = part.kept_tokens
    assert kept.shape == (2, 12)
    # slots are frame-ordered and hold tokens of their own frame
    assert torch.equal(kept // 8, torch.arange(3).repeat_interleave(4).expand(2, -1))
    positions = torch.arange(24.0).reshape(1, 24, 1, 1).expand(1, 24, 1, 2)  # like RoPE freqs [1, L, 1, d]
    gathered = part.gather(positions)
    assert gathered.shape == (2, 12, 1, 2) and torch.equal(gathered[..., 0, 0], kept.float())
    # prune-merging the token index itself gives the same answer
    index = torch.arange(24.0)[None, :, None].expand(2, 24, 1).contiguous()
    assert torch.equal(part.merge(index, "prune")[..., 0], kept.float())


@pytest.mark.parametrize("config", [RandomGridConfig(0.5),
                                    ImportanceConfig(0.5, dst_fraction=0.25, pool_scale=1.2, dst_mode="grid")])
def test_across_frames_merges_a_static_region_over_time(config):
    """Spatio-temporal merging: two identical frames. A merged token whose twin in the other frame is a destination
    merges into that twin (the most alike destination of the clip); per-frame merging cannot, so it reconstructs the
    clip worse."""
    g = torch.Generator().manual_seed(3)
    frame = torch.randn(1, 16, 8, generator=g)
    x = torch.cat([frame, frame], dim=1)  # [1, 2 frames x 16 tokens, 8]
    grid = TokenGrid(4, 4, frames=2)
    importance = torch.rand(1, 32, generator=g)
    kwargs = dict(importance=importance) if isinstance(config, ImportanceConfig) else {}
    across = frame_partition(x, grid, config, generator=torch.Generator().manual_seed(0), across_frames=True, **kwargs)
    per_frame = frame_partition(x, grid, config, generator=torch.Generator().manual_seed(0), **kwargs)
    assert across.frames == 1 and across.sizes.num_kept == per_frame.sizes.num_kept == 16
    roles = across.roles[0]
    twin = torch.cat([torch.arange(16, 32), torch.arange(16)])
    covered = (roles == TokenRole.MERGED) & (roles[twin] == TokenRole.DESTINATION)
    assert covered.any()
    slot = across.unmerge(torch.arange(16.0)[None, :, None])[0, :, 0].long()  # the slot each token went to
    assert torch.equal(across.kept_tokens[0][slot][covered], twin[covered])
    back = across.unmerge(across.merge(x))
    error_across = float((back - x).square().sum())
    error_per_frame = float((per_frame.unmerge(per_frame.merge(x)) - x).square().sum())
    assert error_across < error_per_frame
