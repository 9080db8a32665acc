"""Pictures of importance maps and partitions (pure torch, no ComfyUI)."""
import pytest
import torch

from merging import (
    ROLE_COLOURS, ImportanceConfig, RandomGridConfig, TokenGrid, TokenRole, importance_partition, importance_picture,
    merge_picture, overlay, quantise_map, random_grid_partition,
)
from merging.preview import heat_colours, roles_on_grid


def test_quantise_map_is_relative_per_sample():
    importance = torch.tensor([[[0.0, 1.0], [2.0, 4.0]], [[10.0, 10.0], [5.0, 0.0]]])
    q = quantise_map(importance)
    assert q.dtype == torch.uint8 and q.device.type == "cpu"
    assert q.tolist() == [[[0, 64], [128, 255]], [[255, 255], [128, 0]]]
    assert quantise_map(torch.zeros(1, 2, 2)).tolist() == [[[0, 0], [0, 0]]]  # an all-zero map stays dark


def test_heat_ramp_gets_brighter_with_importance():
    colours = heat_colours(torch.linspace(0, 1, 50))
    light = colours @ torch.tensor([0.299, 0.587, 0.114])
    assert bool((light[1:] >= light[:-1] - 1e-6).all()) and float(light[0]) < 0.05 and float(light[-1]) > 0.9
    assert torch.equal(heat_colours(torch.tensor([-3.0, 7.0])), heat_colours(torch.tensor([0.0, 1.0])))


def test_merge_picture_shows_roles_where_the_tokens_are():
    grid = TokenGrid(4, 6)
    metric = torch.randn(2, grid.num_tokens, 8, generator=torch.Generator().manual_seed(0))
    part = random_grid_partition(metric, grid, RandomGridConfig(0.5), generator=torch.Generator().manual_seed(1))
    picture = merge_picture(part.roles, grid, 40, 60)  # 10x10 pixels per token
    assert picture.shape == (2, 40, 60, 3)
    for sample in range(2):
        for token in range(grid.num_tokens):
            y, x = divmod(token, grid.width)
            cell = picture[sample, y * 10:(y + 1) * 10, x * 10:(x + 1) * 10]
            expected = torch.tensor(ROLE_COLOURS[TokenRole(int(part.roles[sample, token]))])
            assert torch.allclose(cell, expected.expand_as(cell))


def test_importance_partition_pictures_put_merged_tokens_where_importance_is_low():
    grid = TokenGrid(8, 8)
    importance = torch.arange(64.0).reshape(1, 8, 8)  # importance grows along the rows
    metric = torch.randn(1, 64, 16, generator=torch.Generator().manual_seed(2))
    part = importance_partition(metric, importance.reshape(1, 64), ImportanceConfig(0.5, pool_scale=1.0),
                                generator=torch.Generator().manual_seed(3), grid=grid)
    roles = roles_on_grid(part.roles, grid)[0]
    assert bool((roles[:4] == TokenRole.MERGED).all()) and not bool((roles[4:] == TokenRole.MERGED).any())
    heat = importance_picture(quantise_map(importance), 1, 8, 8)[0]
    light = heat @ torch.tensor([0.299, 0.587, 0.114])
    assert float(light[:4].mean()) < float(light[4:].mean())


def test_no_map_is_grey_and_video_frames_get_a_picture_each():
    assert torch.equal(importance_picture(None, 3, 5, 7), torch.full((3, 5, 7, 3), 0.5))
    grid = TokenGrid(2, 3, frames=4)
    roles = torch.zeros(2, grid.num_tokens, dtype=torch.uint8)
    assert merge_picture(roles, grid, 4, 6).shape == (8, 4, 6, 3)
    with pytest.raises(ValueError, match=r"expected roles of shape \[S, 24\]"):
        roles_on_grid(torch.zeros(2, 23, dtype=torch.uint8), grid)


def test_overlay():
    base, layer = torch.zeros(1, 2, 2, 3), torch.ones(1, 2, 2, 3)
    assert torch.allclose(overlay(base, layer, 0.25), torch.full((1, 2, 2, 3), 0.25))
    assert overlay(None, layer, 0.5) is layer and overlay(base, layer, 1.0) is layer
    with pytest.raises(ValueError, match="opacity"):
        overlay(base, layer, 1.5)
    with pytest.raises(ValueError, match="same shape"):
        overlay(torch.zeros(2, 2, 2, 3), layer, 0.5)
