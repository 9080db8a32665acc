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
    run = last_run()
    assert run.merged_calls == 3 * 4 and run.fallbacks == []
    assert run.partitions == 3  # one per step: self- and cross-attention of both blocks share it
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
    assert last_run().merged_calls == 3 * 2
    graph.force_split_calls(monkeypatch)  # cond and uncond in separate model calls from here on
    H.run_prompt(pixart_graph(merge=merge, batch=2).prompt)
    assert {r["rows"] for r in records()} == {2}  # two samples; cond and uncond now in separate calls
    assert last_run().merged_calls == 3 * 2 * 2  # each block twice per step now: the cond call and the uncond call
    assert relative(latent("out"), joint) < 1e-5, relative(latent("out"), joint)


def test_auto_weighting_is_plain_means(comfy):
    """weight_power "auto" (the default) is 0 on PixArt: plain slot means, which measured more faithful there than
    the image models' weighting (3); affinity "auto" is 0.5 there (0.2 elsewhere). Explicit values are kept and do
    change the image."""
    images = {}
    for name, kwargs in (("simple", dict(merge=SIMPLE)),
                         ("plain", dict(advanced=dict(ADVANCED, weight_power=0.0, affinity=0.5))),
                         ("weighted", dict(advanced=dict(ADVANCED, weight_power=3.0, affinity=0.5))),
                         ("affinity", dict(advanced=dict(ADVANCED, weight_power=0.0, affinity=0.2)))):
        H.run_prompt(pixart_graph(steps=4, **kwargs).prompt)
        assert last_run().evaluations_with_map == 3
        images[name] = latent("out").clone()
    assert torch.equal(images["simple"], images["plain"])
    assert float((images["weighted"] - images["plain"]).abs().max()) > 1e-6
    assert float((images["affinity"] - images["plain"]).abs().max()) > 1e-6


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
    """Two merging nodes in a row (or a re-queued graph) merge once, with the last node's settings: one wrapper, one
    capture hook, one runtime on the model."""
    nodes = H.pack_module("nodes.image_nodes")
    model = H.tiny_pixart_model()[0]
    (first,) = nodes.ImportanceTokenMerging().patch(model, **dict(SIMPLE, ratio=0.25))
    (second,) = nodes.ImportanceTokenMerging().patch(first, **SIMPLE)
    runtime = H.pack_module("nodes.runtime")
    assert len(second.wrappers["apply_model"][H.pack_module("nodes.joint").WRAPPER_KEY]) == 1
    assert sum(isinstance(f, runtime.ImportanceCapture) for f in second.model_options["sampler_post_cfg_function"]) == 1
    assert second.model_options["transformer_options"][runtime.KEY].settings.ratio == 0.5
    assert not model.model_options.get("sampler_post_cfg_function")  # the input model is untouched
    H.run_prompt(pixart_graph(twice=True).prompt)
    assert tokens_by("AttentionKVCompress") == {0: {24}, 1: {12}, 2: {12}, 3: {24}}
    assert last_run().merged_calls == 3 * 2 and last_run().maps_captured == 3


def test_hooks_are_removed_when_a_forward_fails(comfy):
    """A forward that raises inside a merged block leaves no hook on the shared modules, and the next run merges."""
    nodes = H.pack_module("nodes.image_nodes")
    model, positive, negative = H.tiny_pixart_model()
    (patched,) = nodes.ImportanceTokenMerging().patch(model, **SIMPLE)
    net = model.model.diffusion_model
    import comfy.sample

    def boom(module, args, output):
        raise RuntimeError("a failing block")

    failing = net.blocks[2].mlp.register_forward_hook(boom)
    noise = torch.randn(1, 4, 32, 48, generator=torch.Generator().manual_seed(0))
    try:
        with pytest.raises(RuntimeError, match="a failing block"):
            comfy.sample.sample(patched, noise, 2, 4.0, "euler", "normal", positive, negative, torch.zeros_like(noise),
                                disable_pbar=True, seed=0)
    finally:
        failing.remove()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())
    runtime = patched.model_options["transformer_options"][H.pack_module("nodes.runtime").KEY]
    assert runtime.hooked is False and runtime.current is None
    out = comfy.sample.sample(patched, noise, 2, 4.0, "euler", "normal", positive, negative, torch.zeros_like(noise),
                              disable_pbar=True, seed=0)
    assert torch.isfinite(out).all() and runtime.summaries()[-1].merged_calls == 2 * 2


def test_unmerged_and_merged_samplers_in_one_graph(comfy):
    """The same PixArt sampled unmerged and merged in one graph: the unmerged sampler's image is the plain model's
    (hooks live only inside the merged clone's forwards)."""
    reference = unmerged()
    g = pixart_graph()
    g.add("KSampler", "plain", model=["rec", 0], positive=[g.prompt["sampler"]["inputs"]["positive"][0], 1],
          negative=[g.prompt["sampler"]["inputs"]["negative"][0], 2], latent_image=g.prompt["sampler"]["inputs"]
          ["latent_image"], seed=3, steps=3, cfg=4.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    g.add("HostTestLatentStats", "plain_out", samples=["plain", 0])
    H.run_prompt(g.prompt)
    torch.testing.assert_close(latent("plain_out"), reference)
    assert relative(latent("out"), reference) > 1e-5


def test_whole_block_residual_keeps_each_tokens_input(comfy):
    """scope = transformer: a block that changes nothing gives back every token's own input exactly (each token adds
    its slot's update, here 0, to its own input; unmerging the output would give slot means)."""
    pixart = H.pack_module("nodes.pixart")
    settings = H.pack_module("nodes.settings").MergeSettings(scope="transformer", importance="random")
    model = H.tiny_pixart_model()[0]
    runtime = pixart.PixArtRuntime(settings, model.model)
    identity = torch.nn.Identity()
    handles = []
    pixart._merge_around(identity, runtime, "block", 0, True, handles)
    runtime.grid, runtime.tail, runtime.latent_size = H.pack_module("merging").TokenGrid(4, 6), 0, (32, 48)
    runtime.current = {"cond_or_uncond": [0], "sigmas": torch.tensor([1.0])}
    try:
        x = torch.randn(1, 24, 8, generator=torch.Generator().manual_seed(0))
        assert torch.equal(identity(x), x)
        assert runtime.run.summary.merged_calls == 1
        unmerging = torch.nn.Identity()  # the attention site's form: the output unmerged (slot means)
        pixart._merge_around(unmerging, runtime, "self", 0, False, handles)
        assert (unmerging(x) - x).abs().amax() > 1e-3
    finally:
        for handle in handles:
            handle.remove()


def test_kv_compressed_blocks_get_no_hooks_with_a_note(comfy):
    """PixArt-Sigma's key/value compression reshapes keys onto the 2-D grid, which merged tokens no longer fill: those
    blocks get no hooks (noted). (ComfyUI 0.14.1's PixArtMS cannot run such blocks itself: it passes them the latent
    size instead of the token grid, so this is checked on the hook installation.)"""
    pixart = H.pack_module("nodes.pixart")
    settings = H.pack_module("nodes.settings").MergeSettings(levels="auto+1")
    model = H.tiny_pixart_model(kv_compress=True)[0]
    runtime = pixart.PixArtRuntime(settings, model.model)
    handles = []
    try:
        runtime.hook(model.model.diffusion_model, handles)
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
