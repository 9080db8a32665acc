"""Video and multi-view UNet workflows through a real ComfyUI: SVD, SV3D, context windows, tiled views.

The video models are tiny SVD / SV3D UNets built by ComfyUI's own classes; conditioning comes from ComfyUI's own
SVD_img2vid_Conditioning / SV3D_Conditioning nodes (with stand-ins for the CLIP vision model and the VAE).
"""
import pytest
import torch

import comfy_harness as H
from graph import Graph, last_run, latent, node_classes, records

SIMPLE = dict(ratio=0.5, importance="cfg", start_percent=0.0, end_percent=1.0, levels="auto", scope="attention")
ADVANCED = dict(SIMPLE, dst_fraction=0.25, pool_scale=1.4, dst_mode="random", warmup_mode="prune",
                cfg1_mode="random", merge_cross_attn=False, merge_seed=0)




@pytest.fixture
def map_log(comfy, monkeypatch):
    """Records every importance-map lookup of the pack: (window frames or None, rows used, the run's full map)."""
    unet = H.pack_module("nodes.unet")
    original = unet.UNetRuntime.map_rows
    log = []

    def recording(self, samples, height, width, extra):
        result = original(self, samples, height, width, extra)
        window = extra.get("context_window")
        frames = list(window.index_list) if window is not None else None
        log.append((frames, None if result is None else result.clone(), self.run.map.clone()))
        return result

    monkeypatch.setattr(unet.UNetRuntime, "map_rows", recording)
    return log


def video_graph(arch="svd", frames=5, size=64, merge=SIMPLE, steps=3, windows=None, advanced=False, cfg=2.5):
    g = Graph()
    tiny = g.add("HostTestTinyVideoModel", arch=arch, seed=0)
    image = g.add("EmptyImage", width=size, height=size, batch_size=1, color=0x7F5030)
    if arch == "svd":
        cond = g.add("SVD_img2vid_Conditioning", clip_vision=tiny[1], init_image=image[0], vae=tiny[2], width=size,
                     height=size, video_frames=frames, motion_bucket_id=127, fps=6, augmentation_level=0.0)
    else:
        cond = g.add("SV3D_Conditioning", clip_vision=tiny[1], init_image=image[0], vae=tiny[2], width=size,
                     height=size, video_frames=frames, elevation=10.0)
    model = g.add("VideoLinearCFGGuidance", model=tiny[0], min_cfg=1.0)[0]
    if windows is not None:
        model = g.add("ContextWindowsManual", model=model, **windows)[0]
    if merge is not None:
        node = "ITM_ImportanceTokenMergingAdvanced" if advanced else "ITM_ImportanceTokenMerging"
        model = g.add(node, "merge", model=model, **merge)[0]
    probe = g.add("HostTestAttnProbe", "probe", model=model)
    sampled = g.add("KSampler", "sampler", model=probe[0], positive=cond[0], negative=cond[1], latent_image=cond[2],
                    seed=3, steps=steps, cfg=cfg, sampler_name="euler", scheduler="karras", denoise=1.0)
    g.add("HostTestLatentStats", "out", samples=sampled[0])
    return g


@pytest.mark.parametrize("arch", ["svd", "sv3d_u", "sv3d_p"])
def test_video_frames_use_their_own_maps(comfy, map_log, arch):
    """Frames are the latent batch: each frame is merged with its own map row (odd frame count, CFG guidance)."""
    frames = 5
    H.run_prompt(video_graph(arch, frames=frames).prompt)
    out = latent()
    assert out.shape == (frames, 4, 8, 8) and torch.isfinite(out).all()
    run = last_run()
    assert run.tokens == {0: (64, 32)} and run.fallbacks == [] and run.maps_captured == 3
    used = [(rows, full) for _, rows, full in map_log if rows is not None]
    assert used, "no importance map was used"
    for rows, full in used:
        assert full.shape[0] == frames and torch.equal(rows, full)  # row f of the chunk = frame f's map
        # the maps really differ per frame, so a frame given another frame's map would be caught
        assert not torch.allclose(full[0], full[1])
    # spatial self-attention at level 0 ran on 32 of 64 tokens for every frame row
    spatial = [r for r in records() if not r["temporal"] and r["original_shape"][-2:] == [8, 8]]
    assert {r["tokens"] for r in spatial} <= {32, 16} and 32 in {r["tokens"] for r in spatial}


def test_temporal_attention_is_left_alone(comfy):
    """16 frames at a 4x4 level: temporal calls (tokens = frames) have the spatial calls' exact shape."""
    H.run_prompt(video_graph("svd", frames=16, size=32).prompt)
    assert torch.isfinite(latent()).all()
    recs = records()
    temporal = [r for r in recs if r["temporal"]]
    spatial_level0 = [r for r in recs if not r["temporal"] and r["original_shape"][-2:] == [4, 4]
                      and r["tokens"] in (8, 16) and r["rows"] == r["original_shape"][0]]
    if H.host_kind() == "modern":
        # current ComfyUI calls the attention patches inside temporal blocks: all of them kept their 16 frames
        assert temporal and {r["tokens"] for r in temporal} == {16}
        assert {r["rows"] for r in temporal} == {2 * 16, 2 * 4}  # batch = (uncond, cond) x positions (4x4, 2x2)
    else:
        assert temporal == []  # the 2024 host does not call attention patches in temporal blocks
    assert spatial_level0 and {r["tokens"] for r in spatial_level0} == {8}


def test_unmerged_video_reference_is_close(comfy):
    H.run_prompt(video_graph("svd", frames=5, merge=None).prompt)
    reference = latent().clone()
    H.run_prompt(video_graph("svd", frames=5).prompt)
    merged = latent().clone()
    relative = float((merged - reference).norm() / reference.norm())
    assert 1e-6 < relative < 0.5, relative


def _context_windows(length, overlap):
    import comfy.context_windows as cw

    return dict(context_length=length, context_overlap=overlap,
                context_schedule=cw.ContextSchedules.STATIC_STANDARD, context_stride=1, closed_loop=False,
                fuse_method=cw.ContextFuseMethods.PYRAMID, dim=0, freenoise=False)


@pytest.mark.parametrize("length,overlap", [(4, 1), (6, 2)])
def test_context_windows_slice_the_map(comfy, map_log, length, overlap):
    """Core context windows: every window is merged with the map rows of its own frames."""
    if "ContextWindowsManual" not in node_classes():
        pytest.skip("context windows exist only in current ComfyUI (not on the 2024 host)")
    frames = 9
    H.run_prompt(video_graph("svd", frames=frames, windows=_context_windows(length, overlap)).prompt)
    assert latent().shape[0] == frames and torch.isfinite(latent()).all()
    windows = [(f, rows, full) for f, rows, full in map_log if f is not None and rows is not None]
    assert len({tuple(f) for f, _, _ in windows}) >= 2, "expected several different windows"
    for frame_list, rows, full in windows:
        assert len(frame_list) == length and full.shape[0] == frames
        assert torch.equal(rows, full[torch.tensor(frame_list)])
    assert last_run().fallbacks == []


def tiled_views_graph(advanced):
    """Zero123++-style 3x2 views in one 96x144 image (latent 18x12: six 6x6 views), merged with the Advanced node's
    ``advanced`` inputs and tiles = 3x2, sampled 3 steps; stats node "out". Returns (graph, merged model, sampled)."""
    g = Graph()
    tiny = g.add("HostTestTinyModel", arch="sd15", seed=0)
    model = g.add("ITM_ImportanceTokenMergingAdvanced", "merge", model=tiny[0], **dict(advanced, tiles="3x2"))[0]
    empty = g.add("EmptyLatentImage", width=96, height=144, batch_size=1)
    sampled = g.add("KSampler", model=model, positive=tiny[1], negative=tiny[2], latent_image=empty[0], seed=1,
                    steps=3, cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    g.add("HostTestLatentStats", "out", samples=sampled[0])
    return g, model, sampled


def test_tiled_views_never_merge_across_tiles(comfy, monkeypatch):
    """Zero123++-style 3x2 views in one latent: with tiles = 3x2 every merge stays inside one view."""
    partition_mod = H.pack_module("merging.partition")
    unet = H.pack_module("nodes.unet")
    seen = []
    original = unet.tiled_partition

    def recording(metric, config, grid, tiles, **kwargs):
        part = original(metric, config, grid, tiles, **kwargs)
        seen.append((grid, tiles, part))
        return part

    monkeypatch.setattr(unet, "tiled_partition", recording)
    H.run_prompt(tiled_views_graph(ADVANCED)[0].prompt)
    assert torch.isfinite(latent()).all()
    assert len(seen) >= 3  # warm-up (random cells) and importance steps, cond and uncond batched
    for grid, tiles, part in seen:
        assert tiles == (3, 2) and (grid.height, grid.width) == (18, 12)
        order = partition_mod.tile_token_order(grid, 3, 2)
        tile_of = torch.empty(grid.num_tokens, dtype=torch.long)
        tile_of[order.reshape(-1)] = torch.arange(6)[:, None].expand(6, order.shape[1]).reshape(-1)
        holder = part.kept_tokens.gather(1, part.slot_of_token)  # the token whose slot each token went to
        assert torch.equal(tile_of[holder], tile_of.expand_as(holder))
        assert part.sizes.num_kept == 6 * 18  # every view lost half of its 36 tokens


def test_tiles_that_do_not_divide_leave_the_level_unmerged(comfy, caplog):
    g = Graph()
    tiny = g.add("HostTestTinyModel", arch="sd15", seed=0)
    model = g.add("ITM_ImportanceTokenMergingAdvanced", "merge", model=tiny[0], **dict(ADVANCED, tiles="3x2"))[0]
    probe = g.add("HostTestAttnProbe", "probe", model=model)
    empty = g.add("EmptyLatentImage", width=80, height=128, batch_size=1)  # latent 16x10: not 3 equal rows
    sampled = g.add("KSampler", model=probe[0], positive=tiny[1], negative=tiny[2], latent_image=empty[0], seed=1,
                    steps=2, cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    g.add("HostTestLatentStats", "out", samples=sampled[0])
    with caplog.at_level("INFO"):
        H.run_prompt(g.prompt)
    assert torch.isfinite(latent()).all()
    assert 160 in {r["tokens"] for r in records()}  # level 0 ran unmerged
    assert any("equal tiles" in m for m in last_run().fallbacks)


@pytest.mark.parametrize("frames", [4, 5])
def test_temporal_sharing(comfy, monkeypatch, frames):
    """temporal_ratio 0.5 on SVD: each frame pair shares one spatial partition, every frame computes 24 of its 32
    merged queries (8 of the 16 most alike slots of a pair computed by each frame), keys/values keep all 32; odd
    frame counts work; the result stays close to spatial-only merging."""
    unet = H.pack_module("nodes.unet")
    plans = []
    original = unet.UNetRuntime._forward_merge

    def recording(self, n, extra, *args):
        plan = original(self, n, extra, *args)
        plans.append(plan)
        return plan

    monkeypatch.setattr(unet.UNetRuntime, "_forward_merge", recording)
    H.run_prompt(video_graph("svd", frames=frames, merge=ADVANCED, advanced=True).prompt)
    spatial_only = latent().clone()
    plans.clear()
    H.run_prompt(video_graph("svd", frames=frames, merge=dict(ADVANCED, temporal_ratio=0.5), advanced=True).prompt)
    shared = latent().clone()
    assert torch.isfinite(shared).all()
    run = last_run()
    assert run.shared == {0: (32, 24)} and run.fallbacks == []
    spatial = [r for r in records() if not r["temporal"] and r["original_shape"][-2:] == [8, 8]]
    assert (24, 32) in {(r["tokens"], r["kv_tokens"]) for r in spatial}
    assert (32, 32) not in {(r["tokens"], r["kv_tokens"]) for r in spatial}
    level0 = [p for p in plans if p is not None and p.partition.sizes.num_tokens == 64]
    assert level0 and all(p.share is not None for p in level0)
    groups = unet.pair_groups(frames)
    for plan in level0:
        slot_of = plan.partition.slot_of_token  # [rows, N]; both frames of a pair hold the same tokens per slot
        row_group = groups[torch.arange(slot_of.shape[0]) % frames]
        for group in row_group.unique().tolist():
            same = slot_of[row_group == group]
            assert (same == same[0]).all()
    relative = float((shared - spatial_only).norm() / spatial_only.norm())
    assert 0 < relative < 0.5, relative


def test_temporal_ratio_needs_frames_and_attention_scope(comfy):
    node = node_classes()["ITM_ImportanceTokenMergingAdvanced"]()
    model, _, _ = H.tiny_sd15_model()
    with pytest.raises(ValueError, match="temporal_ratio > 0 needs scope = attention"):
        node.patch(model, **dict(ADVANCED, scope="transformer", temporal_ratio=0.5))
    with pytest.raises(ValueError, match=r"temporal_ratio must be in \[0, 1\]"):
        node.patch(model, **dict(ADVANCED, temporal_ratio=1.5))
    H.run_prompt(video_graph("svd", frames=1, merge=dict(ADVANCED, temporal_ratio=0.5), advanced=True).prompt)
    assert torch.isfinite(latent()).all()
    assert any("needs a batch of 2 or more frames" in m for m in last_run().fallbacks)
