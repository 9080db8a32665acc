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
              layers=2, record=True):
    """tiny WAN -> [recorder] -> [merging] -> runtime probe -> KSampler -> stats. 64x48, 9 frames: latent 3x6x8,
    tokens 3 frames x 3x4 = 36."""
    g = Graph()
    tiny = g.add("HostTestTinyWanModel", seed=0, layers=layers)
    model = tiny[0]
    if record:
        model = g.add("HostTestAttentionRecorder", "rec", model=model)[0]
    if merge is not None:
        model = g.add("ITM_ImportanceTokenMerging", "merge", model=model, **merge)[0]
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
