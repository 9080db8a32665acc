"""Importance merging on WAN 2.x (ComfyUI's WanModel), through a real ComfyUI 0.14.1; skipped on the 2024 host.

The models are tiny WAN 2.1 t2v models built with ComfyUI's own classes (2 blocks, width 64); latents come from
ComfyUI's EmptyHunyuanLatentVideo ([B, 16, T, H/8, W/8]), sampling from KSampler.
"""
import pytest
import torch

import comfy_harness as H
import graph
from graph import Graph, latent, node_classes

SIMPLE = dict(ratio=0.5, importance="cfg", start_percent=0.0, end_percent=1.0, levels="auto", scope="attention")


@pytest.fixture(autouse=True)
def _modern(comfy):
    if H.host_kind() != "modern":
        pytest.skip("WAN models exist only in current ComfyUI (not on the 2024 host)")


def wan_graph(merge=SIMPLE, width=64, height=48, length=9, batch=1, steps=3, cfg=5.0, seed=3, sampler="euler",
              layers=2, record=True, node="ITM_ImportanceTokenMerging"):
    """tiny WAN -> [recorder] -> [merging] -> runtime probe -> KSampler -> stats. 64x48, 9 frames: latent 3x6x8,
    tokens 3 frames x 3x4 = 36."""
    g = Graph()
    tiny = g.add("HostTestTinyWanModel", seed=0, layers=layers)
    model = tiny[0]
    if record:
        model = g.add("HostTestAttentionRecorder", "rec", model=model)[0]
    if merge is not None:
        model = g.add(node, "merge", model=model, **merge)[0]
    model = g.add("HostTestRuntimeProbe", "probe", model=model)[0]
    empty = g.add("EmptyHunyuanLatentVideo", width=width, height=height, length=length, batch_size=batch)
    sampled = g.add("KSampler", "sampler", model=model, positive=tiny[1], negative=tiny[2], latent_image=empty[0],
                    seed=seed, steps=steps, cfg=cfg, sampler_name=sampler, scheduler="normal", denoise=1.0)
    g.add("HostTestLatentStats", "out", samples=sampled[0])
    return g


def calls():
    return node_classes()["HostTestAttentionRecorder"].RECORDS["rec"]


def last_run():
    return graph.last_run("probe", probe="HostTestRuntimeProbe")


def test_self_attention_runs_on_merged_tokens_per_frame(comfy):
    """Self-attention (first call of each block) gets half of each frame's tokens; cross-attention is untouched."""
    H.run_prompt(wan_graph(merge=None).prompt)
    reference = latent("out").clone()
    full = calls()
    assert {(c["q"], c["k"]) for c in full if c["q"] == c["k"]} == {(36, 36)}
    H.run_prompt(wan_graph().prompt)
    merged = latent("out").clone()
    assert merged.shape == reference.shape == (1, 16, 3, 6, 8) and torch.isfinite(merged).all()
    relative = float((merged - reference).norm() / reference.norm())
    assert 1e-5 < relative < 0.5, relative
    seen = calls()
    self_calls = [c for c in seen if c["q"] == c["k"]]
    cross_calls = [c for c in seen if c["q"] != c["k"]]
    assert {(c["q"], c["k"], c["v"], c["out"]) for c in self_calls} == {(18, 18, 18, 18)}  # 3 frames x 6 of 12
    assert {c["q"] for c in cross_calls} == {36} and {c["k"] for c in cross_calls} == {16}  # text: 16 tokens
    assert len(self_calls) == len(cross_calls) == 3 * 2  # 3 steps (cond+uncond in one call) x 2 blocks
    run = last_run()
    assert run.tokens == {0: (36, 18)} and run.fallbacks == []
    assert run.maps_captured == 3 and run.evaluations_with_map == 2 and run.evaluations_without_map == 1


def test_importance_map_is_used_and_random_is_plain_tome(comfy):
    H.run_prompt(wan_graph(steps=4).prompt)
    run = last_run()
    assert run.maps_captured == 4 and run.partitions == 4  # one partition per step, shared by both blocks
    last = run.previews[3]
    assert last.importance is not None and last.importance.shape == (1, 3, 6, 8)
    H.run_prompt(wan_graph(merge=dict(SIMPLE, importance="random"), steps=4).prompt)
    run = last_run()
    assert run.maps_captured == 0 and run.evaluations_without_map == 4 and run.tokens == {0: (36, 18)}


ADVANCED = dict(SIMPLE, dst_fraction=0.25, pool_scale=1.2, dst_mode="grid", warmup_mode="merge", cfg1_mode="random",
                merge_cross_attn=False, merge_seed=0)


def test_video_dits_merge_with_plain_means_by_default(comfy):
    """weight_power / affinity "auto" (-1, the defaults) are 0 / 0 on video DiTs (plain means: the importance weighting
    of the image models measured worse on the video demo model) and 3 / 0.2 elsewhere; a chosen value is kept."""
    settings = H.pack_module("nodes.settings")
    wan, unet = H.pack_module("nodes.wan"), H.pack_module("nodes.unet")
    auto = settings.MergeSettings()
    assert (auto.weight_power, auto.affinity) == (settings.AUTO, settings.AUTO)
    assert (wan.WanRuntime(auto).settings.weight_power, wan.WanRuntime(auto).settings.affinity) == (0.0, 0.0)
    assert (unet.UNetRuntime(auto).settings.weight_power, unet.UNetRuntime(auto).settings.affinity) == (3.0, 0.2)
    chosen = settings.MergeSettings(weight_power=2.0, affinity=0.0)
    assert (wan.WanRuntime(chosen).settings.weight_power, wan.WanRuntime(chosen).settings.affinity) == (2.0, 0.0)
    with pytest.raises(ValueError, match="weight_power"):
        settings.MergeSettings(weight_power=-0.5)

    videos = {}
    for name, node, merge in (("simple", "ITM_ImportanceTokenMerging", SIMPLE),
                              ("advanced auto", "ITM_ImportanceTokenMergingAdvanced", ADVANCED),
                              ("plain", "ITM_ImportanceTokenMergingAdvanced",
                               dict(ADVANCED, weight_power=0.0, affinity=0.0)),
                              ("weighted", "ITM_ImportanceTokenMergingAdvanced",
                               dict(ADVANCED, weight_power=3.0, affinity=0.2))):
        H.run_prompt(wan_graph(merge=merge, node=node, steps=4).prompt)
        assert last_run().evaluations_with_map == 3
        videos[name] = latent("out").clone()
    assert torch.equal(videos["simple"], videos["plain"]) and torch.equal(videos["advanced auto"], videos["plain"])
    assert float((videos["weighted"] - videos["plain"]).abs().max()) > 1e-5  # the weighting does act here


@pytest.mark.parametrize("batch", [1, 2])
def test_joint_and_split_cond_uncond_calls_agree(comfy, monkeypatch, batch):
    """cond and uncond in one call or in two (as when memory is short): the same video within float noise."""
    from test_call_layout import _force_split

    H.run_prompt(wan_graph(batch=batch, steps=4).prompt)
    joint, joint_rows = latent("out").clone(), {c["rows"] for c in calls()}
    _force_split(monkeypatch)
    H.run_prompt(wan_graph(batch=batch, steps=4).prompt)
    split, split_rows = latent("out").clone(), {c["rows"] for c in calls()}
    assert joint_rows == {2 * batch} and split_rows == {batch}  # the layouts really differ
    assert last_run().partitions == 4  # the cond call reused the uncond call's partition
    assert torch.allclose(joint, split, atol=1e-4, rtol=1e-4), float((joint - split).abs().max())


def test_another_attention_override_is_kept(comfy):
    """An override set before the merging node (here the recorder) still runs, on the merged tokens."""
    H.run_prompt(wan_graph().prompt)
    assert calls() and {c["q"] for c in calls() if c["q"] == c["k"]} == {18}


def test_preview_shows_every_decoded_frame(comfy):
    """9 decoded frames from 3 latent frames (WAN's 1 + 4 + 4): each shows its latent frame's merge map."""
    from test_preview_node import BLUE, colour_share, pictures, preview_graph

    g = wan_graph(batch=2, steps=3)
    decoded = g.add("VAEDecode", "decode", samples=["sampler", 0], vae=g.add("HostTestVideoCodec")[0])[0]
    preview_graph(g, ["merge", 0], decoded)
    H.run_prompt(g.prompt)
    merge, importance = pictures("merge_map"), pictures("importance")
    assert merge.shape == importance.shape == (18, 48, 64, 3)
    for frame in range(18):
        assert colour_share(merge[frame], BLUE) == pytest.approx(0.5)
    # frames 1-4 come from latent frame 1, 5-8 from latent frame 2: the same pictures within a group
    assert torch.equal(merge[1], merge[4]) and torch.equal(merge[5], merge[8]) and torch.equal(merge[10], merge[13])
    assert not torch.equal(merge[0], merge[1]) or not torch.equal(merge[1], merge[5])
    assert not torch.equal(importance[0], importance[9])  # each sample its own map


def test_scope_transformer_runs_whole_blocks_on_merged_tokens(comfy):
    """Self- and cross-attention both see the merged 18 image tokens; RoPE freqs travel with them; the video stays
    close to the unmerged one."""
    H.run_prompt(wan_graph(merge=None, steps=4).prompt)
    reference = latent("out").clone()
    H.run_prompt(wan_graph(merge=dict(SIMPLE, scope="transformer"), steps=4).prompt)
    merged = latent("out").clone()
    assert torch.isfinite(merged).all()
    relative = float((merged - reference).norm() / reference.norm())
    assert 1e-5 < relative < 0.5, relative
    seen = calls()
    assert {c["q"] for c in seen} == {18}  # self (18 x 18) and cross (18 x 16 text tokens) attention
    assert {c["k"] for c in seen} == {18, 16}
    run = last_run()
    assert run.tokens == {0: (36, 18)} and run.merged_calls == 4 * 2 and run.fallbacks == []


def test_scope_transformer_keeps_another_nodes_block_replacement(comfy):
    """A block replacement set before this node (another pack's) is called inside ours, on the merged tokens, when a
    real KSampler runs; applying the node again (a re-queued graph) keeps it chained once, and the plain node's
    attention scope puts it back unchanged."""
    import comfy.sample

    wan = H.pack_module("nodes.wan")
    node = node_classes()["ITM_ImportanceTokenMerging"]()
    model, positive, negative = H.tiny_wan_model(seed=0)
    seen = []

    def other(args, extra):  # another node's replacement of block 0: records the tokens it gets
        seen.append(args["img"].shape[1])
        return extra["original_block"](args)

    base = model.clone()
    base.set_model_patch_replace(other, "dit", "double_block", 0)
    (first,) = node.patch(base, **dict(SIMPLE, scope="transformer"))
    (again,) = node.patch(first, **dict(SIMPLE, scope="transformer", ratio=0.25))
    blocks = again.model_options["transformer_options"]["patches_replace"]["dit"]
    assert isinstance(blocks[("double_block", 0)], wan.BlockMerge) and blocks[("double_block", 0)].previous is other
    assert isinstance(blocks[("double_block", 1)], wan.BlockMerge) and blocks[("double_block", 1)].previous is None
    noise = torch.randn(1, 16, 3, 6, 8, generator=torch.Generator().manual_seed(0))
    out = comfy.sample.sample(again, noise, 2, 5.0, "euler", "normal", positive, negative, torch.zeros_like(noise),
                              disable_pbar=True, seed=0)
    assert torch.isfinite(out).all()
    assert seen == [27, 27]  # 2 steps, cond + uncond in one call: 36 tokens, 3 frames x 3 of 12 merged at 0.25
    (back,) = node.patch(again, **SIMPLE)
    assert back.model_options["transformer_options"]["patches_replace"]["dit"][("double_block", 0)] is other


def test_scope_transformer_with_per_token_data_gathers_it(comfy):
    """The block replacement gathers per-token tensors (RoPE freqs [1, L, ...], per-token modulation [B, L, 6, D])."""
    wan = H.pack_module("nodes.wan")
    merging = H.pack_module("merging")
    grid = merging.TokenGrid(2, 4, frames=2)
    metric = torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(0))
    part = merging.frame_partition(metric, grid, merging.RandomGridConfig(0.5))
    seen = {}

    def original(args):
        seen.update(args)
        return {"img": args["img"] + 1.0}

    class Runtime(wan.WanRuntime):
        def plan_block(self, x, extra):
            return wan.LevelMerge(part, "mean")

    settings = H.pack_module("nodes.settings").MergeSettings(scope="transformer")
    runtime = Runtime(settings)
    x = torch.randn(1, 16, 8)
    freqs = torch.arange(16.0).reshape(1, 16, 1, 1)
    vec = torch.arange(16.0).reshape(1, 16, 1, 1).expand(1, 16, 6, 8)
    out = wan.BlockMerge()({"img": x, "pe": freqs, "vec": vec, "txt": None,
                            "transformer_options": {"importance_tome": runtime}}, {"original_block": original})
    kept = part.kept_tokens.float()
    assert torch.equal(seen["pe"][:, :, 0, 0], kept) and torch.equal(seen["vec"][:, :, 0, 0], kept)
    assert seen["img"].shape == (1, 8, 8)
    torch.testing.assert_close(out["img"], x + 1.0)  # every token got its slot's update (+1)


def test_scope_transformer_across_frames_spreads_per_frame_modulation(comfy):
    """Spatio-temporal merging: frames keep different shares, so per-frame modulation [B, T, 6, D] is spread over the
    frame's tokens and gathered: every slot gets the entry of its kept token's frame."""
    wan = H.pack_module("nodes.wan")
    merging = H.pack_module("merging")
    grid = merging.TokenGrid(2, 4, frames=2)
    metric = torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(1))
    part = merging.frame_partition(metric, grid, merging.RandomGridConfig(0.5), across_frames=True)
    assert part.frames == 1 and part.sizes.num_tokens == 16 and part.sizes.num_kept == 8
    seen = {}

    def original(args):
        seen.update(args)
        return {"img": args["img"]}

    class Runtime(wan.WanRuntime):
        def plan_block(self, x, extra):
            return wan.LevelMerge(part, "mean")

    runtime = Runtime(H.pack_module("nodes.settings").MergeSettings(scope="transformer",
                                                                    video_tokens="across_frames"))
    vec = torch.tensor([10.0, 20.0]).reshape(1, 2, 1, 1).expand(1, 2, 6, 8)  # one entry per latent frame
    wan.BlockMerge()({"img": torch.randn(1, 16, 8), "vec": vec, "pe": None, "txt": None,
                      "transformer_options": {"importance_tome": runtime, "grid_sizes": (2, 2, 4)}},
                     {"original_block": original})
    frame_of_slot = torch.div(part.kept_tokens, 8, rounding_mode="floor")
    assert seen["vec"].shape == (1, 8, 6, 8)
    assert torch.equal(seen["vec"][0, :, 0, 0], (10.0 + 10.0 * frame_of_slot[0]).float())


@pytest.mark.parametrize("scope", ["attention", "transformer"])
def test_video_tokens_across_frames_merges_the_clip_as_a_whole(comfy, scope):
    """video_tokens = across_frames on the Advanced node: the clip keeps half its tokens in all, frames may keep
    different shares, and the result differs from per-frame merging."""
    advanced = dict(SIMPLE, scope=scope, dst_fraction=0.25, pool_scale=1.2, dst_mode="grid", warmup_mode="merge",
                    cfg1_mode="random", merge_cross_attn=False, merge_seed=0)
    results = {}
    for tokens in ("per_frame", "across_frames"):
        g = wan_graph(merge=None, steps=3)
        g.prompt["probe"]["inputs"]["model"] = g.add("ITM_ImportanceTokenMergingAdvanced", "merge", model=["rec", 0],
                                                     video_tokens=tokens, **advanced)[0]
        H.run_prompt(g.prompt)
        results[tokens] = latent("out").clone()
        run = last_run()
        assert run.tokens == {0: (36, 18)} and run.maps_captured == 3 and run.fallbacks == []
        roles = run.previews[2].roles[0][0].reshape(3, 12)  # sample 0: 3 latent frames x 12 tokens
        kept_per_frame = (roles != 2).sum(1)  # TokenRole 2 = merged away
        assert int(kept_per_frame.sum()) == 18
        if tokens == "per_frame":
            assert kept_per_frame.tolist() == [6, 6, 6]
    assert torch.isfinite(results["across_frames"]).all()
    assert float((results["across_frames"] - results["per_frame"]).abs().max()) > 1e-6


def test_cfg_one_change_mode_on_wan(comfy):
    """Distilled / cfg 1 WAN runs: importance from how each token's denoised prediction moved since the previous
    evaluation ([B, C, T, H, W] -> per-frame map), no uncond pass, used from the third evaluation on."""
    advanced = dict(SIMPLE, dst_fraction=0.25, pool_scale=1.2, dst_mode="grid", warmup_mode="merge",
                    cfg1_mode="change", merge_cross_attn=False, merge_seed=0)
    g = wan_graph(merge=None, steps=4, cfg=1.0)
    g.prompt["probe"]["inputs"]["model"] = g.add("ITM_ImportanceTokenMergingAdvanced", "merge",
                                                 model=["rec", 0], **advanced)[0]
    H.run_prompt(g.prompt)
    changed = latent("out").clone()
    run = last_run()
    assert run.maps_captured == 3 and run.evaluations_with_map == 2 and run.tokens == {0: (36, 18)}
    assert run.previews[3].importance.shape == (1, 3, 6, 8)
    self_calls = [c for c in calls() if c["q"] == c["k"]]
    assert {c["q"] for c in self_calls} == {18} and len(self_calls) == 4 * 2  # one (cond only) call per step
    H.run_prompt(wan_graph(merge=dict(SIMPLE, importance="random"), steps=4, cfg=1.0).prompt)
    assert float((changed - latent("out")).abs().max()) > 1e-6


def test_image_to_video_merges_the_video_tokens(comfy):
    """WAN i2v (WanImageToVideo: the start image's latent and mask are concatenated as 20 extra input channels, the
    image cross-attention runs beside the text one): self-attention merges half of each frame, both cross-attention
    calls see every token."""
    def i2v_graph(merge):
        g = Graph()
        tiny = g.add("HostTestTinyWanModel", seed=0, layers=2, model_type="i2v")
        model = g.add("HostTestAttentionRecorder", "rec", model=tiny[0])[0]
        if merge is not None:
            model = g.add("ITM_ImportanceTokenMerging", "merge", model=model, **merge)[0]
        model = g.add("HostTestRuntimeProbe", "probe", model=model)[0]
        image = g.add("EmptyImage", width=64, height=48, batch_size=1, color=0x808080)
        codec = g.add("HostTestVideoCodec")
        i2v = g.add("WanImageToVideo", positive=tiny[1], negative=tiny[2], vae=codec[0], width=64, height=48,
                    length=9, batch_size=1, start_image=image[0])
        sampled = g.add("KSampler", model=model, positive=i2v[0], negative=i2v[1], latent_image=i2v[2], seed=3,
                        steps=3, cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0)
        g.add("HostTestLatentStats", "out", samples=sampled[0])
        return g

    H.run_prompt(i2v_graph(None).prompt)
    reference = latent("out").clone()
    H.run_prompt(i2v_graph(SIMPLE).prompt)
    merged = latent("out").clone()
    assert merged.shape == reference.shape == (1, 16, 3, 6, 8)
    relative = float((merged - reference).norm() / reference.norm())
    assert 1e-5 < relative < 0.5, relative
    seen = calls()
    self_calls = [c for c in seen if c["q"] == c["k"] == 18]
    assert len(self_calls) == 3 * 2 and all(c["rows"] == 2 for c in self_calls)
    assert not [c for c in seen if c["q"] == c["k"] == 36]  # no unmerged self-attention left
    cross = [c for c in seen if c["q"] != c["k"]]
    assert len(cross) == 2 * 3 * 2 and {c["q"] for c in cross} == {36}  # text + image cross-attention, all tokens
    run = last_run()
    assert run.tokens == {0: (36, 18)} and run.maps_captured == 3 and run.fallbacks == []


def test_context_windows_along_the_frames_merge_each_window_with_its_frames_map(comfy):
    """WanContextWindowsManual (windows of 3 latent frames along dim 2 over a 6-frame latent): every window's
    self-attention runs merged (3 frames x 6 of 12 tokens), with the importance map rows of the window's frames."""
    g = wan_graph(length=21, steps=3)
    g.prompt["probe"]["inputs"]["model"] = g.add(
        "WanContextWindowsManual", model=["merge", 0], context_length=9, context_overlap=5,
        context_schedule="standard_static", context_stride=1, closed_loop=False, fuse_method="pyramid",
        freenoise=False)[0]
    H.run_prompt(g.prompt)
    out = latent("out")
    assert out.shape == (1, 16, 6, 6, 8) and torch.isfinite(out).all()
    self_calls = [c for c in calls() if c["q"] == c["k"]]
    assert self_calls and {c["q"] for c in self_calls} == {18}  # 3 frames x 6 of 12 tokens per window
    run = last_run()
    assert run.maps_captured == 3 and run.evaluations_with_map == 2
    assert run.tokens == {0: (36, 18)}
    assert [f for f in run.fallbacks if "importance map" in f] == []  # the map rows matched every window
    assert any("context windows" in f for f in run.fallbacks)  # no step pictures (said once)


@pytest.mark.parametrize("cache", ["EasyCache", "LazyCache"])
@pytest.mark.parametrize("scope", ["attention", "transformer"])
def test_composes_with_core_step_caching(comfy, cache, scope):
    """ComfyUI's EasyCache / LazyCache skip model passes whose input barely changed and reuse a cached output: runs
    with merging and caching finish, the passes that do run are merged, and the result stays close to caching alone."""
    def graph_with_cache(merge):
        g = wan_graph(merge=None, steps=8, record=False)
        model = g.add(cache, "cache", model=["1", 0], reuse_threshold=0.3, start_percent=0.15, end_percent=0.95,
                      verbose=False)[0]
        if merge is not None:
            model = g.add("ITM_ImportanceTokenMerging", "merge", model=model, **merge)[0]
        g.prompt["probe"]["inputs"]["model"] = model
        return g

    H.run_prompt(graph_with_cache(None).prompt)
    cached = latent("out").clone()
    H.run_prompt(graph_with_cache(dict(SIMPLE, scope=scope)).prompt)
    both = latent("out").clone()
    assert torch.isfinite(both).all()
    relative = float((both - cached).norm() / cached.norm())
    assert relative < 0.5, relative
    run = last_run()
    assert run.tokens == {0: (36, 18)} and run.merged_calls > 0 and run.maps_captured >= 1


def test_proportional_attention_on_wan_self_attention(comfy, monkeypatch):
    """WAN self-attention with proportional attention (the default): one more channel per head carries log(slot size)
    on the keys (each frame's 6 slots stand for its 12 tokens; the channel form pinned, as on the CPU);
    cross-attention keeps its width; switching it off on the Advanced node gives plain merged attention and another
    image."""
    H.pin_bias_form(monkeypatch, False)
    H.run_prompt(wan_graph().prompt)
    default = latent("out").clone()
    heads = {c["head"] for c in calls() if c["q"] != c["k"]}
    assert len(heads) == 1
    head = heads.pop()
    self_calls = [c for c in calls() if c["q"] == c["k"]]
    assert {c["head"] for c in self_calls} == {head + 1}
    for c in self_calls:
        assert torch.equal(c["q_last"], torch.ones_like(c["q_last"]))
        sizes = (c["k_last"] / (head + 1) ** 0.5).exp()
        assert sizes.min() > 0.999
        torch.testing.assert_close(sizes.reshape(c["rows"], 3, 6).sum(-1), torch.full((c["rows"], 3), 12.0))
    advanced = dict(SIMPLE, dst_fraction=0.25, pool_scale=1.2, dst_mode="grid", warmup_mode="merge",
                    cfg1_mode="random", merge_cross_attn=False, merge_seed=0, proportional_attention=False)
    g = wan_graph(merge=None)
    g.prompt["probe"]["inputs"]["model"] = g.add("ITM_ImportanceTokenMergingAdvanced", "merge", model=["rec", 0],
                                                 **advanced)[0]
    H.run_prompt(g.prompt)
    assert {c["head"] for c in calls() if c["q"] == c["k"]} == {head}
    assert float((latent("out") - default).norm() / default.norm()) > 1e-5
