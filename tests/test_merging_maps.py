"""Importance maps and token grids (pure torch)."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from merging import TokenGrid, find_unet_level, importance_map, pool_to_grid, rows_for_samples


def test_importance_map_known_answer():
    cond = torch.zeros(1, 2, 2, 2)
    uncond = torch.zeros(1, 2, 2, 2)
    cond[0, 0, 0, 0] = 3.0
    cond[0, 1, 0, 0] = -1.0
    cond[0, 1, 1, 1] = 4.0
    assert importance_map(cond, uncond).tolist() == [[[2.0, 0.0], [0.0, 2.0]]]
    assert importance_map(cond, uncond, channels=1).tolist() == [[[3.0, 0.0], [0.0, 0.0]]]
    assert importance_map(cond, uncond, channels=slice(1, 2)).tolist() == [[[1.0, 0.0], [0.0, 4.0]]]


def test_importance_map_video_and_dtype():
    cond = torch.randn(2, 4, 3, 5, 6, dtype=torch.bfloat16)
    uncond = torch.randn(2, 4, 3, 5, 6, dtype=torch.bfloat16)
    out = importance_map(cond, uncond)
    assert out.shape == (2, 3, 5, 6) and out.dtype == torch.float32
    torch.testing.assert_close(out, (cond.float() - uncond.float()).abs().mean(1))


def test_importance_ranking_ignores_parametrisation_scale():
    cond, uncond = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    a = importance_map(cond, uncond).flatten(1).argsort(dim=1)
    b = importance_map(cond * 7.5, uncond * 7.5).flatten(1).argsort(dim=1)
    assert torch.equal(a, b)


def test_importance_map_errors():
    with pytest.raises(ValueError, match="same shape"):
        importance_map(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 9))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\] or \[B, C, T, H, W\]"):
        importance_map(torch.zeros(4, 8, 8), torch.zeros(4, 8, 8))
    with pytest.raises(ValueError, match=r"channels must be in \[1, 4\]"):
        importance_map(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), channels=5)


def test_unet_levels_round_up():
    assert TokenGrid.for_unet_level(33, 20, 0) == TokenGrid(33, 20)
    assert TokenGrid.for_unet_level(33, 20, 1) == TokenGrid(17, 10)
    assert TokenGrid.for_unet_level(33, 20, 2) == TokenGrid(9, 5)
    assert TokenGrid.for_unet_level(33, 20, 3) == TokenGrid(5, 3)
    assert find_unet_level(33, 20, 45) == 2
    assert find_unet_level(33, 20, 44) is None


def test_patch_and_video_grids():
    assert TokenGrid.for_patches(65, 64, 2) == TokenGrid(33, 32)
    grid = TokenGrid.for_patches(16, 16, 2, frames=9, temporal_patch=4)
    assert (grid.frames, grid.num_tokens) == (3, 3 * 64)


def test_pool_to_grid_divisible_is_area_average():
    m = torch.rand(2, 16, 12)
    expected = F.avg_pool2d(m[:, None], 4)[:, 0].flatten(1)
    torch.testing.assert_close(pool_to_grid(m, TokenGrid(4, 3)), expected)
    assert torch.equal(pool_to_grid(m, TokenGrid(16, 12)), m.flatten(1))


def test_pool_to_grid_odd_sizes_pad_the_edge():
    m = torch.arange(9.0).reshape(1, 3, 3)  # to 2x2: rows/cols padded by repeating the last one
    out = pool_to_grid(m, TokenGrid(2, 2)).reshape(2, 2)
    assert out.tolist() == [[2.0, 3.5], [6.5, 8.0]]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(0, 4), st.integers(1, 3))
def test_pool_to_grid_any_size(h, w, level, frames):
    grid = TokenGrid.for_unet_level(h, w, level, frames=frames)
    m = torch.rand(2, frames, h, w) if frames > 1 else torch.rand(2, h, w)
    out = pool_to_grid(m, grid)
    assert out.shape == (2, grid.num_tokens)
    assert out.min() >= m.min() - 1e-6 and out.max() <= m.max() + 1e-6


def test_pool_to_grid_upsamples_a_smaller_map():
    m = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    assert pool_to_grid(m, TokenGrid(4, 4)).reshape(4, 4)[0].tolist() == [1.0, 1.0, 2.0, 2.0]


def test_pool_to_grid_errors():
    with pytest.raises(ValueError, match="no frame axis"):
        pool_to_grid(torch.rand(1, 4, 4), TokenGrid(2, 2, frames=2))
    with pytest.raises(ValueError, match=r"\[B, H, W\] or \[B, T, H, W\]"):
        pool_to_grid(torch.rand(4, 4), TokenGrid(2, 2))


def test_rows_for_samples():
    assert rows_for_samples(6, 3).tolist() == [0, 1, 2, 0, 1, 2]
    with pytest.raises(ValueError, match="pass row_sample"):
        rows_for_samples(5, 2)
