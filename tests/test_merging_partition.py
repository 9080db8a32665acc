"""Properties and known answers of merging/ (pure torch; no ComfyUI needed)."""
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from merging import (
    ImportanceConfig,
    RandomGridConfig,
    TokenGrid,
    TokenRole,
    importance_partition,
    make_partition,
    max_ratio,
    plan_sizes,
    random_grid_partition,
    tile_token_order,
    tiled_partition,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _gen(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


@st.composite
def importance_cases(draw):
    h = draw(st.integers(2, 12))
    w = draw(st.integers(2, 12))
    samples = draw(st.integers(1, 3))
    copies = draw(st.integers(1, 2))
    dst_fraction = draw(st.sampled_from([0.1, 0.25, 0.4]))
    pool_scale = draw(st.sampled_from([1.0, 1.2, 1.4, 2.0]))
    ratio = draw(st.floats(0.0, max_ratio(ImportanceConfig(0.0, dst_fraction, pool_scale)) - 0.02))
    mode = draw(st.sampled_from(["random", "top", "evenly"]))
    seed = draw(st.integers(0, 2**16))
    return h, w, samples, copies, ImportanceConfig(ratio, dst_fraction, pool_scale, mode), seed


def _make(h, w, samples, copies, config, seed, channels=6):
    g = _gen(seed)
    metric = torch.randn(samples * copies, h * w, channels, generator=g)
    importance = torch.rand(samples, h, w, generator=g)
    return metric, importance


@settings(max_examples=150, deadline=None)
@given(importance_cases())
def test_merge_unmerge_properties(case):
    h, w, samples, copies, config, seed = case
    n = h * w
    try:
        plan_sizes(n, config)
    except ValueError:  # integer rounding can push a ratio near the limit over it on tiny grids
        assume(False)
    metric, importance = _make(h, w, samples, copies, config, seed)
    part = importance_partition(metric, importance, config, generator=_gen(seed))
    r = int(n * config.ratio)
    assert part.sizes.num_removed == r
    merged = part.merge(metric)
    assert merged.shape == (samples * copies, n - r, metric.shape[-1])
    if r == 0:
        assert merged is metric and part.unmerge(merged) is merged
        return
    # every token is exactly one role, counts add up
    roles = part.roles
    assert (roles == TokenRole.MERGED).sum(1).eq(r).all()
    assert (roles == TokenRole.DESTINATION).sum(1).eq(part.sizes.num_dst).all()
    # unmerge: kept tokens get their own slot's value, merged tokens their destination's
    y = torch.randn(merged.shape, generator=_gen(seed + 1))
    out = part.unmerge(y)
    assert out.shape == metric.shape
    rows = torch.arange(metric.shape[0])[:, None]
    assert torch.equal(out[rows, part.kept_tokens], y)
    slot = part.slot_of_token
    dst_token = part.kept_tokens.gather(1, slot)  # the token that holds each token's slot
    assert torch.equal(out, out[rows, dst_token])
    merged_mask = roles[part.row_sample] == TokenRole.MERGED
    assert (roles[part.row_sample].gather(1, dst_token)[merged_mask] == TokenRole.DESTINATION).all()
    # prune then unmerge restores every kept token exactly
    restored = part.unmerge(part.merge(metric, "prune"))
    kept = ~merged_mask
    assert torch.equal(restored[kept], metric[kept])
    # mean merge: independent tokens unchanged, destinations hold the mean of their group
    mean = part.merge(metric, "mean")
    expected = torch.zeros_like(mean).index_put_((rows.expand_as(slot), slot), metric, accumulate=True)
    expected /= part.slot_counts
    torch.testing.assert_close(mean, expected)
    indep = roles[part.row_sample].gather(1, part.kept_tokens) == TokenRole.INDEPENDENT
    assert torch.equal(mean[indep], metric[rows.expand_as(part.kept_tokens)[indep], part.kept_tokens[indep]])
    # all unimportant tokens (outside the pool) are merged
    order = importance.reshape(samples, -1).argsort(dim=1, descending=True, stable=True)
    outside = order[:, part.sizes.pool_size:]
    assert (roles.gather(1, outside) == TokenRole.MERGED).all()


@settings(max_examples=60, deadline=None)
@given(importance_cases())
def test_pool_scale_one_keeps_exactly_the_most_important(case):
    h, w, samples, copies, config, seed = case
    config = ImportanceConfig(min(config.ratio, 0.7), config.dst_fraction, 1.0, config.dst_mode)
    try:
        plan_sizes(h * w, config)
    except ValueError:
        assume(False)
    metric, importance = _make(h, w, samples, copies, config, seed)
    part = importance_partition(metric, importance, config, generator=_gen(seed))
    n, r = h * w, part.sizes.num_removed
    order = importance.reshape(samples, -1).argsort(dim=1, descending=True)
    expected_kept = torch.zeros(samples, n, dtype=torch.bool).scatter_(1, order[:, : n - r], True)
    assert torch.equal(part.roles != TokenRole.MERGED, expected_kept)


def test_known_answer_top_destination():
    # 4 tokens, importance 4 > 3 > 2 > 1; ratio 0.5 -> r=2, K=1, M=min(int(2*1.4), 4)=2.
    # dst = token 0 (top), pool = {0, 1}: tokens 2 and 3 are unimportant and forced into token 0; token 1 stays.
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [3.0, 0.0], [5.0, 0.0]]])
    importance = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    part = importance_partition(x, importance, ImportanceConfig(0.5, 0.25, 1.4, "top"))
    assert part.sizes == (4, 2, 1, 2)
    assert part.roles.tolist() == [[TokenRole.DESTINATION, TokenRole.INDEPENDENT, TokenRole.MERGED, TokenRole.MERGED]]
    assert part.merge(x).tolist() == [[[0.0, 1.0], [3.0, 0.0]]]
    assert part.merge(x, "prune").tolist() == [[[0.0, 1.0], [1.0, 0.0]]]
    assert part.unmerge(torch.tensor([[[7.0], [9.0]]])).tolist() == [[[9.0], [7.0], [9.0], [9.0]]]


def test_known_answer_similarity_picks_the_important_source():
    # 8 tokens; pool_scale 2 makes every token important (M = 8), so nothing is forced and the r=2 sources most
    # similar to a destination merge. Destinations (top, K=2): tokens 0 and 1. Token 5 is a copy of token 0 and
    # token 6 a near copy of token 1; everything else points elsewhere.
    x = torch.tensor([[[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1],
                       [0, 0, -1, 0], [1, 0, 0, 0], [0.1, 1, 0, 0], [0, 0, 0, -1]]])
    importance = torch.arange(8, 0, -1.0)[None]
    part = importance_partition(x, importance, ImportanceConfig(0.25, 0.25, 2.0, "top"))
    assert part.sizes.num_removed == 2 and part.sizes.pool_size == 8
    assert (part.roles[0] == TokenRole.MERGED).nonzero().flatten().tolist() == [5, 6]
    assert part.slot_of_token[0, 5] == part.slot_of_token[0, 0]
    assert part.slot_of_token[0, 6] == part.slot_of_token[0, 1]


def test_ratio_zero_is_exact_identity():
    x = torch.randn(2, 16, 3)
    for config in (ImportanceConfig(0.0), RandomGridConfig(0.0)):
        part = make_partition(x, config, grid=TokenGrid(4, 4), importance=torch.rand(2, 16))
        assert part.is_identity and part.merge(x) is x and part.unmerge(x) is x


def test_random_baseline_does_not_depend_on_map():
    x = torch.randn(4, 64, 5)
    parts = [
        make_partition(x, RandomGridConfig(0.5), grid=TokenGrid(8, 8), importance=imp, generator=_gen(3))
        for imp in (torch.rand(2, 64), -torch.rand(2, 64) * 100)
    ]
    assert torch.equal(parts[0].slot_of_token, parts[1].slot_of_token)
    assert torch.equal(parts[0].roles, parts[1].roles)


def test_random_grid_one_destination_per_cell():
    grid = TokenGrid(6, 8, frames=2)
    x = torch.randn(2, grid.num_tokens, 4)
    part = random_grid_partition(x, grid, RandomGridConfig(0.5, stride_x=2, stride_y=3), generator=_gen(1))
    dst = (part.roles == TokenRole.DESTINATION).reshape(2, 2, 6, 8)
    cells = dst.reshape(2, 2, 2, 3, 4, 2).sum(dim=(3, 5))
    assert (cells == 1).all()
    assert part.merge(x).shape == (2, grid.num_tokens - int(grid.num_tokens * 0.5), 4)


@pytest.mark.parametrize("config", [ImportanceConfig(0.6), RandomGridConfig(0.6)])
def test_equal_seeds_equal_partitions(config):
    x = torch.randn(2, 100, 8)
    importance = torch.rand(1, 100)
    a, b, c = (make_partition(x, config, grid=TokenGrid(10, 10), importance=importance, generator=_gen(s))
               for s in (5, 5, 6))
    assert torch.equal(a.slot_of_token, b.slot_of_token)
    assert not torch.equal(a.slot_of_token, c.slot_of_token)


def test_global_rng_untouched():
    x, importance = torch.randn(2, 64, 4), torch.rand(1, 64)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    importance_partition(x, importance, ImportanceConfig(0.5))
    random_grid_partition(x, TokenGrid(8, 8), RandomGridConfig(0.5))
    assert torch.equal(before, torch.random.get_rng_state())


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_equals_unchunked(chunk):
    x = torch.randn(3, 144, 16)
    importance = torch.rand(3, 12, 12)
    full = importance_partition(x, importance, ImportanceConfig(0.5, chunk_size=0), generator=_gen(2))
    part = importance_partition(x, importance, ImportanceConfig(0.5, chunk_size=chunk), generator=_gen(2))
    assert torch.equal(full.slot_of_token, part.slot_of_token)
    assert torch.equal(full.merge(x), part.merge(x))


def test_cond_and_uncond_rows_share_the_split():
    # rows as ComfyUI lays them out for 2 samples with cond_or_uncond [1, 0]: [uncond s0, uncond s1, cond s0, cond s1]
    x = torch.randn(4, 81, 8)
    importance = torch.rand(2, 9, 9)
    part = importance_partition(x, importance, ImportanceConfig(0.5))
    assert torch.equal(part.slot_of_token[0], part.slot_of_token[2])
    assert torch.equal(part.slot_of_token[1], part.slot_of_token[3])
    assert not torch.equal(part.slot_of_token[0], part.slot_of_token[1])
    # an explicit row→sample mapping, e.g. 3 rows of which the last two belong to sample 0
    rows = torch.tensor([1, 0, 0])
    part = importance_partition(x[:3], importance, ImportanceConfig(0.5), row_sample=rows)
    assert torch.equal(part.slot_of_token[1], part.slot_of_token[2])
    assert not torch.equal(part.slot_of_token[0], part.slot_of_token[1])


def test_each_sample_follows_its_own_map():
    x = torch.randn(2, 64, 8).expand(2, 64, 8).clone()
    x[1] = x[0]
    importance = torch.stack([torch.arange(64.0), -torch.arange(64.0)])
    part = importance_partition(x, importance, ImportanceConfig(0.5, pool_scale=1.0))
    kept = part.roles != TokenRole.MERGED
    assert kept[0, 32:].all() and not kept[0, :32].any()
    assert kept[1, :32].all() and not kept[1, 32:].any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_and_devices(device, dtype):
    x = torch.randn(2, 256, 32, device=device).to(dtype)
    importance = torch.rand(1, 16, 16, device=device)
    for config in (ImportanceConfig(0.5), RandomGridConfig(0.5)):
        part = make_partition(x, config, grid=TokenGrid(16, 16), importance=importance)
        merged = part.merge(x)
        assert merged.dtype == dtype and merged.device == x.device
        assert torch.isfinite(merged).all()
        out = part.unmerge(merged)
        assert out.dtype == dtype and out.shape == x.shape


def test_bad_parameters_name_the_parameter_and_range():
    x = torch.randn(2, 64, 4)
    with pytest.raises(ValueError, match=r"ratio=0\.8 .*maximum is 0\.750"):
        importance_partition(x, torch.rand(1, 64), ImportanceConfig(0.8))
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\)"):
        plan_sizes(64, ImportanceConfig(1.2))
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\)"):
        plan_sizes(64, ImportanceConfig(float("nan")))
    with pytest.raises(ValueError, match="pool_scale must be >= 1"):
        plan_sizes(64, ImportanceConfig(0.5, pool_scale=0.5))
    with pytest.raises(ValueError, match=r"dst_fraction must be in \(0, 1\)"):
        plan_sizes(64, ImportanceConfig(0.5, dst_fraction=0.0))
    with pytest.raises(ValueError, match="dst_mode must be one of"):
        plan_sizes(64, ImportanceConfig(0.5, dst_mode="bottom"))
    with pytest.raises(ValueError, match="importance map has 63 positions per sample but the block has 64 tokens"):
        importance_partition(x, torch.rand(1, 63), ImportanceConfig(0.5))
    with pytest.raises(ValueError, match="not a whole number of blocks"):
        importance_partition(torch.randn(3, 64, 4), torch.rand(2, 64), ImportanceConfig(0.5))
    with pytest.raises(ValueError, match="empty token grid"):
        plan_sizes(0, ImportanceConfig(0.5))
    with pytest.raises(ValueError, match="token grid sizes must be >= 1"):
        TokenGrid(0, 4)
    with pytest.raises(ValueError, match=r"the maximum is 0\.750"):
        random_grid_partition(x, TokenGrid(8, 8), RandomGridConfig(0.8))
    with pytest.raises(ValueError, match="needs the token grid"):
        random_grid_partition(x, TokenGrid(4, 4), RandomGridConfig(0.5))
    part = importance_partition(x, torch.rand(1, 64), ImportanceConfig(0.5))
    with pytest.raises(ValueError, match=r"expected a \[2, 64, C\] tensor"):
        part.merge(torch.randn(2, 60, 4))
    with pytest.raises(ValueError, match="merge mode must be one of"):
        part.merge(x, "sum")


def test_tiny_grids_are_identity_not_errors():
    # 2 tokens at ratio 0.3: r = int(0.6) = 0 -> nothing to merge
    x = torch.randn(2, 2, 4)
    assert importance_partition(x, torch.rand(1, 2), ImportanceConfig(0.3)).is_identity
    assert random_grid_partition(x, TokenGrid(1, 2), RandomGridConfig(0.3)).is_identity


def test_sizes_match_paper_worked_example():
    # SD2 at 768² (96x96 latent), ratio 0.7, pool_scale 1.4: M = int(2765 * 1.4) = 3870 (float truncation)
    sizes = plan_sizes(9216, ImportanceConfig(0.7))
    assert sizes == (9216, 6451, 2304, 3870)
    assert math.isclose(max_ratio(ImportanceConfig(0.5)), 0.75)


@st.composite
def tiled_cases(draw):
    tiles_y, tiles_x = draw(st.sampled_from([(1, 2), (2, 1), (2, 2), (3, 2), (2, 3)]))
    th, tw = draw(st.integers(2, 6)), draw(st.integers(2, 6))
    frames = draw(st.integers(1, 2))
    samples = draw(st.integers(1, 2))
    random = draw(st.booleans())
    ratio = draw(st.floats(0.05, 0.7))
    seed = draw(st.integers(0, 2**16))
    return tiles_y, tiles_x, th, tw, frames, samples, random, ratio, seed


@settings(max_examples=80, deadline=None)
@given(tiled_cases())
def test_tiled_partitions_never_cross_tiles(case):
    tiles_y, tiles_x, th, tw, frames, samples, random, ratio, seed = case
    grid = TokenGrid(th * tiles_y, tw * tiles_x, frames)
    n = grid.num_tokens
    g = _gen(seed)
    metric = torch.randn(2 * samples, n, 8, generator=g)
    importance = torch.rand(samples, n, generator=g)
    config = RandomGridConfig(ratio) if random else ImportanceConfig(ratio)
    tile_grid = TokenGrid(th, tw, frames)
    try:
        plan_sizes(tile_grid.num_tokens, config, tile_grid)
    except ValueError:
        assume(False)  # a ratio the single tile does not allow
    part = tiled_partition(metric, config, grid, (tiles_y, tiles_x), importance=None if random else importance,
                           num_samples=samples, generator=_gen(seed))
    order = tile_token_order(grid, tiles_y, tiles_x)
    tile_of = torch.empty(n, dtype=torch.long)
    tile_of[order.reshape(-1)] = torch.arange(order.shape[0])[:, None].expand_as(order).reshape(-1)
    if part.is_identity:
        return
    holder = part.kept_tokens.gather(1, part.slot_of_token)
    assert torch.equal(tile_of[holder], tile_of.expand_as(holder))  # every token lands in a slot of its own tile
    slots = torch.arange(part.sizes.num_kept).expand(2 * samples, -1)
    assert torch.equal(part.slot_of_token.gather(1, part.kept_tokens), slots)  # kept tokens hold their own slot
    per_tile = torch.zeros(2 * samples, order.shape[0], dtype=torch.long).scatter_add_(
        1, tile_of[part.kept_tokens], torch.ones_like(part.kept_tokens))
    assert (per_tile == part.sizes.num_kept // order.shape[0]).all()  # each tile keeps the same share
    merged = part.merge(metric)
    assert merged.shape == (2 * samples, part.sizes.num_kept, 8)
    assert torch.allclose(part.merge(torch.ones_like(metric)), torch.ones_like(merged))
    assert part.unmerge(merged).shape == metric.shape
    assert ((part.roles == TokenRole.MERGED).sum(1) == part.sizes.num_removed).all()


def test_tiled_one_by_one_is_the_plain_partition():
    grid = TokenGrid(6, 4)
    metric = torch.randn(2, 24, 8, generator=_gen(1))
    importance = torch.rand(1, 24, generator=_gen(2))
    plain = importance_partition(metric, importance, ImportanceConfig(0.5), generator=_gen(3))
    tiled = tiled_partition(metric, ImportanceConfig(0.5), grid, (1, 1), importance=importance, generator=_gen(3))
    assert torch.equal(plain.slot_of_token, tiled.slot_of_token)


def test_tiles_must_divide_the_grid():
    with pytest.raises(ValueError, match="equal tiles"):
        tile_token_order(TokenGrid(10, 8), 3, 2)


def test_grid_destinations_spread_over_the_image_and_importance_decides_the_rest():
    """dst_mode='grid': one destination per 2x2 cell; the least important tokens are always merged."""
    grid = TokenGrid(8, 8)
    metric = torch.randn(2, 64, 16, generator=_gen(4))
    importance = torch.rand(1, 64, generator=_gen(5))
    config = ImportanceConfig(0.5, dst_mode="grid")
    part = importance_partition(metric, importance, config, generator=_gen(6), grid=grid)
    dst = (part.roles[0] == TokenRole.DESTINATION).reshape(4, 2, 4, 2).permute(0, 2, 1, 3).reshape(16, 4)
    assert torch.equal(dst.sum(1), torch.ones(16, dtype=torch.long))  # exactly one destination per cell
    sizes = part.sizes
    assert sizes.num_dst == 16 and sizes.num_removed == 32
    order = importance[0].argsort(descending=True)
    unimportant = order[sizes.pool_size:]  # outside the pool of the M most important tokens
    merged = part.roles[0] == TokenRole.MERGED
    is_dst = part.roles[0] == TokenRole.DESTINATION
    assert bool((merged[unimportant] | is_dst[unimportant]).all())
    with pytest.raises(ValueError, match="token grid"):
        importance_partition(metric, importance, config, generator=_gen(6))


@pytest.mark.parametrize("dst_mode", ["grid", "random"])
def test_protected_tokens_are_never_merged_while_others_can_be(dst_mode):
    """protect = 0.2: the 20% most important tokens are not merged (kept as independent tokens or destinations);
    with protect = 0 the same inputs merge some of them."""
    grid = TokenGrid(8, 8)
    torch.manual_seed(0)
    metric = torch.randn(2, 64, 16)
    importance = torch.rand(1, 64)
    protected = torch.argsort(importance[0], descending=True)[:int(64 * 0.2)]
    merged_counts = []
    for protect in (0.0, 0.2):
        config = ImportanceConfig(0.5, 0.25, 2.0, dst_mode, protect=protect)
        part = importance_partition(metric, importance, config, generator=_gen(1), grid=grid)
        assert part.sizes.num_removed == 32
        merged_counts.append(int((part.roles[0, protected] == int(TokenRole.MERGED)).sum()))
    assert merged_counts[0] > 0 and merged_counts[1] == 0, merged_counts


def test_protected_tokens_beyond_what_the_ratio_keeps_merge_least_important_first():
    """protect = 0.3 at ratio 0.7 with 2x2 destination cells: only 5 % of the tokens can stay independent, so some
    protected tokens must merge; they are the least important of the protected ones, and the most important ones
    are never merged."""
    grid = TokenGrid(16, 16)
    torch.manual_seed(0)
    metric = torch.randn(1, 256, 16)
    importance = torch.rand(1, 256)
    config = ImportanceConfig(0.7, 0.25, 1.2, "grid", protect=0.3)
    part = importance_partition(metric, importance, config, generator=_gen(2), grid=grid)
    roles = part.roles[0]
    order = torch.argsort(importance[0], descending=True)
    protected = order[:int(256 * 0.3)]
    is_dst = roles == int(TokenRole.DESTINATION)
    independent = (roles == int(TokenRole.INDEPENDENT)).nonzero().flatten()
    assert len(independent) == 256 - 179 - int(is_dst.sum())
    assert set(independent.tolist()) <= set(protected.tolist())  # the kept sources are all protected ones
    rank = torch.empty(256, dtype=torch.long)
    rank[order] = torch.arange(256)
    merged_protected = [int(t) for t in protected if roles[t] == int(TokenRole.MERGED)]
    assert merged_protected and min(rank[merged_protected]) > max(rank[independent])  # least important merged first


def test_protect_out_of_range_is_a_clear_error():
    with pytest.raises(ValueError, match=r"protect must be in \[0, 1\)"):
        plan_sizes(64, ImportanceConfig(0.5, protect=1.0))


def test_importance_weighted_merge_leans_towards_the_important_token():
    """weight_power > 0: a slot is the importance-weighted mean of its tokens; uniform weights = the plain mean;
    tiled partitions carry the weights to the right tokens."""
    grid = TokenGrid(4, 4)
    torch.manual_seed(1)
    x = torch.randn(1, 16, 8)
    importance = torch.rand(1, 16) + 0.1
    plain = importance_partition(x, importance, ImportanceConfig(0.5, 0.25, 2.0, "grid"), generator=_gen(0), grid=grid)
    weighted = importance_partition(x, importance, ImportanceConfig(0.5, 0.25, 2.0, "grid", weight_power=1.0),
                                    generator=_gen(0), grid=grid)
    assert torch.equal(plain.slot_of_token, weighted.slot_of_token)
    slots = weighted.slot_of_token[0]
    w = importance[0] / importance[0].mean()
    expected = torch.stack([(x[0, slots == s] * w[slots == s, None]).sum(0) / w[slots == s].sum()
                            for s in range(weighted.sizes.num_kept)])
    assert torch.allclose(weighted.merge(x)[0], expected, atol=1e-5)
    assert not torch.allclose(plain.merge(x), weighted.merge(x))
    flat = importance_partition(x, torch.ones(1, 16), ImportanceConfig(0.5, 0.25, 2.0, "grid", weight_power=2.0),
                                generator=_gen(0), grid=grid)
    assert torch.allclose(flat.merge(x), importance_partition(x, torch.ones(1, 16), ImportanceConfig(
        0.5, 0.25, 2.0, "grid"), generator=_gen(0), grid=grid).merge(x), atol=1e-6)
    tiled = tiled_partition(x, ImportanceConfig(0.5, 0.25, 2.0, "top", weight_power=1.0), grid, (2, 2),
                            importance=importance, generator=_gen(0))
    order = tile_token_order(grid, 2, 2)
    for tile in range(4):
        tokens = order[tile]
        sub = importance_partition(x[:, tokens], importance[:, tokens], ImportanceConfig(0.5, 0.25, 2.0, "top",
                                   weight_power=1.0), generator=_gen(0), grid=TokenGrid(2, 2))
        assert torch.allclose(tiled.token_weights[0, tokens], sub.token_weights[0], atol=1e-6)
        assert torch.allclose(tiled.merge(x)[0, tile * 2:(tile + 1) * 2], sub.merge(x[:, tokens])[0], atol=1e-5)


def test_grid_top_takes_the_most_important_token_of_each_cell():
    grid = TokenGrid(6, 4)
    metric = torch.randn(2, 24, 8, generator=_gen(1))
    importance = torch.rand(2, 24, generator=_gen(2))
    part = importance_partition(metric, importance, ImportanceConfig(0.5, dst_mode="grid_top"), grid=grid)
    for sample in range(2):
        cells = importance[sample].reshape(3, 2, 2, 2).permute(0, 2, 1, 3).reshape(6, 4)
        index = torch.arange(24).reshape(3, 2, 2, 2).permute(0, 2, 1, 3).reshape(6, 4)
        expected = index[torch.arange(6), cells.argmax(1)]
        dst = torch.nonzero(part.roles[sample] == TokenRole.DESTINATION).flatten()
        assert torch.equal(dst.sort().values, expected.sort().values)


def test_affinity_sends_sources_to_destinations_of_similar_importance():
    """With identical features everywhere, affinity alone picks the destination: the one closest in importance rank."""
    grid = TokenGrid(4, 4)
    metric = torch.ones(1, 16, 4)
    importance = torch.arange(16, dtype=torch.float32)[None]
    part = importance_partition(metric, importance, ImportanceConfig(0.5, 0.25, 2.0, "grid_top", affinity=0.5),
                                grid=grid)
    rank = importance[0].argsort(descending=True).argsort()
    slots = part.slot_of_token[0]
    dst_of_slot = {int(slots[t]): t for t in torch.nonzero(part.roles[0] == TokenRole.DESTINATION).flatten().tolist()}
    dsts = torch.tensor(list(dst_of_slot.values()))
    for token in torch.nonzero(part.roles[0] == TokenRole.MERGED).flatten().tolist():
        chosen = dst_of_slot[int(slots[token])]
        best = (rank[dsts] - rank[token]).abs().min()
        assert (rank[chosen] - rank[token]).abs() == best


def test_random_destinations_do_not_move_when_the_pool_reorders():
    """dst_mode = random draws k members of the important pool. A change of the map that only reorders tokens inside
    the pool (float noise between ComfyUI's call layouts does that) must leave the partition unchanged; a token
    crossing the pool's edge may change at most its own role."""
    torch.manual_seed(0)
    x = torch.randn(2, 256, 16)
    importance = torch.rand(1, 256)
    config = ImportanceConfig(0.5, dst_fraction=0.25, pool_scale=1.4, dst_mode="random")
    base = importance_partition(x, importance, config, generator=_gen(3))
    order = importance[0].argsort(descending=True)
    pool = plan_sizes(256, config).pool_size
    inside = importance.clone()
    inside[0, order[0]], inside[0, order[pool - 1]] = importance[0, order[pool - 1]], importance[0, order[0]]
    reordered = importance_partition(x, inside, config, generator=_gen(3))
    assert torch.equal(base.slot_of_token, reordered.slot_of_token)
    # the same draw, a different pool: the destinations differ, so the test above is not vacuous
    other = importance_partition(x, 1 - importance, config, generator=_gen(3))
    assert not torch.equal(base.slot_of_token, other.slot_of_token)
