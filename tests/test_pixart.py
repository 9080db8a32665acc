"""Importance merging on PixArt-alpha / Sigma (ComfyUI's PixArtMS, the paper's DiT), through a real ComfyUI 0.14.1;
skipped on the 2024 host.

The model is a tiny one built with ComfyUI's own class: 4 blocks of width 96, 8x8 patches (PixArt's position
embedding needs latents of at least 33x33), so a 384x256 image (48x32 latent) is 6x4 = 24 tokens; the paper's blocks
(7-20 of 28) are blocks 1 and 2 of 4. ComfyUI gives PixArt's blocks no transformer_options, so the calls are recorded
with forward hooks (HostTestModuleRecorder) and the runtime read from HostTestRuntimeProbe.
"""
import logging

import pytest
import torch

import comfy_harness as H
import graph
from graph import Graph, latent, node_classes

SIMPLE = dict(ratio=0.5, importance="cfg", start_percent=0.0, end_percent=1.0, levels="auto", scope="attention")
ADVANCED = dict(SIMPLE, dst_fraction=0.25, pool_scale=1.2, dst_mode="grid", warmup_mode="merge", cfg1_mode="random",
                merge_cross_attn=False, merge_seed=0)
TOKENS = 24
PAPER = {1, 2}  # the paper's blocks of a 4-block PixArt


@pytest.fixture(autouse=True)
def _modern(comfy):
    if H.host_kind() != "modern":
        pytest.skip("PixArt exists only in current ComfyUI (and merging it needs APPLY_MODEL wrappers)")


def pixart_graph(merge=SIMPLE, advanced=None, batch=1, steps=3, cfg=4.0, seed=3, sampler="euler", depth=4,
                 kv_compress=False, twice=False):
    g = Graph()
    tiny = g.add("HostTestTinyPixArtModel", seed=0, depth=depth, kv_compress=kv_compress)
    model = g.add("HostTestModuleRecorder", "rec", model=tiny[0])[0]
    if advanced is not None:
        model = g.add("ITM_ImportanceTokenMergingAdvanced", "merge", model=model, **advanced)[0]
    elif merge is not None:
        for index in range(2 if twice else 1):
            model = g.add("ITM_ImportanceTokenMerging", f"merge{index}", model=model, **merge)[0]
    model = g.add("HostTestRuntimeProbe", "probe", model=model)[0]
    empty = g.add("EmptyLatentImage", width=384, height=256, batch_size=batch)
    sampled = g.add("KSampler", "sampler", model=model, positive=tiny[1], negative=tiny[2], latent_image=empty[0],
                    seed=seed, steps=steps, cfg=cfg, sampler_name=sampler, scheduler="normal", denoise=1.0)
    g.add("HostTestLatentStats", "out", samples=sampled[0])
    return g


def records():
    return node_classes()["HostTestModuleRecorder"].RECORDS["rec"]


def tokens_by(cls):
    """{block index: set of token counts} of the recorded calls of ``cls``."""
    out = {}
    for r in records():
        if r["cls"] == cls:
            out.setdefault(int(r["name"].split(".")[1]), set()).add(r["tokens"])
    return out


def last_run():
    return graph.last_run("probe", probe="HostTestRuntimeProbe")


def relative(a, b):
    return float((a - b).norm() / b.norm())


def unmerged():
    H.run_prompt(pixart_graph(merge=None).prompt)
    assert tokens_by("AttentionKVCompress") == {b: {TOKENS} for b in range(4)}
    return latent("out").clone()


def test_self_attention_of_the_papers_blocks_runs_on_merged_tokens(comfy):
    """scope = attention (the paper's site): the self-attention of blocks 1-2 (the paper's middle half) sees half of
    the 24 tokens; cross-attention, the MLP and the other blocks see all; the image stays close to the unmerged one;
    the CFG map of step n drives step n + 1; the hooks are gone after the run."""
    reference = unmerged()
    H.run_prompt(pixart_graph().prompt)
    merged = latent("out").clone()
    assert tokens_by("AttentionKVCompress") == {0: {24}, 1: {12}, 2: {12}, 3: {24}}
    assert tokens_by("MultiHeadCrossAttention") == {b: {24} for b in range(4)}
    assert tokens_by("PixArtMSBlock") == {b: {24} for b in range(4)}
    assert {r["rows"] for r in records()} == {2}  # cond and uncond in one call
    assert merged.shape == reference.shape and torch.isfinite(merged).all()
    assert 1e-5 < relative(merged, reference) < 0.6, relative(merged, reference)
    run = last_run()
    assert run.tokens == {0: (TOKENS, TOKENS // 2)} and run.fallbacks == [] and run.merged_calls == 3 * 2
    assert run.maps_captured == 3 and run.evaluations_with_map == 2 and run.partitions == 3
    net = node_classes()["HostTestRuntimeProbe"].RUNTIMES["probe"]._model().diffusion_model
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())


def test_cross_attention_and_every_block(comfy):
    """merge_cross_attn merges the cross-attention's queries with the self-attention's partition; levels = auto+1
    merges every block."""
    H.run_prompt(pixart_graph(advanced=dict(ADVANCED, merge_cross_attn=True)).prompt)
    assert tokens_by("MultiHeadCrossAttention") == {0: {24}, 1: {12}, 2: {12}, 3: {24}}
    assert last_run().merged_calls == 3 * 4 and last_run().fallbacks == []
    H.run_prompt(pixart_graph(merge=dict(SIMPLE, levels="auto+1")).prompt)
    assert tokens_by("AttentionKVCompress") == {b: {12} for b in range(4)}


def test_whole_blocks_run_on_merged_tokens(comfy):
    """scope = transformer: blocks 1-2 run on 12 tokens throughout (self-, cross-attention, MLP), each token keeping
    its own input; the image differs from the attention site's and stays finite and near the unmerged one."""
    reference = unmerged()
    H.run_prompt(pixart_graph(merge=dict(SIMPLE, scope="transformer")).prompt)
    blocks = latent("out").clone()
    for cls in ("PixArtMSBlock", "AttentionKVCompress", "MultiHeadCrossAttention"):
        assert tokens_by(cls) == {0: {24}, 1: {12}, 2: {12}, 3: {24}}, cls
    assert last_run().merged_calls == 3 * 2
    assert 1e-5 < relative(blocks, reference) < 0.8, relative(blocks, reference)
    H.run_prompt(pixart_graph().prompt)
    assert relative(blocks, latent("out")) > 1e-5


@pytest.mark.parametrize("scope", ["attention", "transformer"])
def test_joint_and_split_calls_give_the_same_image(comfy, monkeypatch, scope):
    """cond and uncond in separate model calls give the same image as one call: one partition per step and sample.
    (The random-weight model's latents reach about 4e3; unmerged, the two layouts differ by 6e-7 of that.)"""
    merge = dict(SIMPLE, scope=scope)
    H.run_prompt(pixart_graph(merge=merge, batch=2).prompt)
    joint = latent("out").clone()
    import comfy.model_management as mm

    monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: (1, 1) if torch_free_too else 1)
    H.run_prompt(pixart_graph(merge=merge, batch=2).prompt)
    assert {r["rows"] for r in records()} == {2}  # two samples; cond and uncond now in separate calls
    assert relative(latent("out"), joint) < 1e-5, relative(latent("out"), joint)


def test_importance_decides_the_partition(comfy):
    """cfg and random importance give different images; random captures no map. (On this random-weight model
    merging moves the latent by about 2e-3 of its norm, and the two partitions' images differ by about 9e-6 of it;
    the runs are deterministic.)"""
    H.run_prompt(pixart_graph(steps=4).prompt)
    cfg = latent("out").clone()
    H.run_prompt(pixart_graph(merge=dict(SIMPLE, importance="random"), steps=4).prompt)
    run = last_run()
    assert run.maps_captured == 0 and run.evaluations_without_map == 4 and run.tokens == {0: (TOKENS, TOKENS // 2)}
    assert relative(cfg, latent("out")) > 2e-6


def test_a_second_node_replaces_the_first(comfy):
    """Two merging nodes in a row (or a re-queued graph) merge once, with the last node's settings."""
    H.run_prompt(pixart_graph(merge=dict(SIMPLE, ratio=0.25), twice=False).prompt)
    H.run_prompt(pixart_graph(twice=True).prompt)
    assert tokens_by("AttentionKVCompress") == {0: {24}, 1: {12}, 2: {12}, 3: {24}}
    assert last_run().merged_calls == 3 * 2


def test_kv_compressed_blocks_get_no_hooks_with_a_note(comfy):
    """PixArt-Sigma's key/value compression reshapes keys onto the 2-D grid, which merged tokens no longer fill: those
    blocks get no hooks (noted). (ComfyUI 0.14.1's PixArtMS cannot run such blocks itself: it passes them the latent
    size instead of the token grid, so this is checked on the hook installation.)"""
    pixart = H.pack_module("nodes.pixart")
    settings = H.pack_module("nodes.settings").MergeSettings(levels="auto+1")
    model = H.tiny_pixart_model(kv_compress=True)[0]
    runtime = pixart.PixArtRuntime(settings, model.model)
    handles = runtime.hook(model.model.diffusion_model, {})
    try:
        hooked = [i for i, b in enumerate(model.model.diffusion_model.blocks) if b.attn._forward_pre_hooks]
        assert hooked == [2, 3] and len(handles) == 4
        assert any("key/value compression" in f for f in runtime.run.summary.fallbacks)
    finally:
        for handle in handles:
            handle.remove()


def test_unet_levels_fall_back_to_the_papers_blocks_with_a_warning(comfy, caplog):
    with caplog.at_level(logging.WARNING, logger="comfyui_importance_tome"):
        H.run_prompt(pixart_graph(merge=dict(SIMPLE, levels="0,1")).prompt)
    assert tokens_by("AttentionKVCompress") == {0: {24}, 1: {12}, 2: {12}, 3: {24}}
    assert any("names UNet levels" in r.getMessage() for r in caplog.records)
