"""Importance merging on image DiTs (ComfyUI's Flux, SD3 MMDiT and Qwen-Image classes), through a real ComfyUI
0.14.1; skipped on the 2024 host.

The models are tiny ones built with ComfyUI's own classes: Flux.1 (2 double + 2 single blocks, width 64), an
SD3.5-medium-style MMDiT (2 joint blocks, width 128, block 0 with the image-only attn2) and Qwen-Image (2 blocks,
width 64; its latent is [B, 16, 1, H, W]). Latents come from
EmptySD3LatentImage ([B, 16, H/8, W/8]): 96x64 = a 8x12 latent = 4x6 = 24 image tokens (2x2 patch), plus 10 text
tokens that are never merged.
"""
import pytest
import torch

import comfy_harness as H
import graph
from graph import Graph, latent, node_classes

SIMPLE = dict(ratio=0.5, importance="cfg", start_percent=0.0, end_percent=1.0, levels="auto", scope="attention")
BLOCKS = dict(SIMPLE, scope="transformer")
TEXT, IMAGE = 10, 24
# family -> (tiny model node and inputs, attention calls per evaluation, the image-only calls' share of them)
FAMILIES = {"flux": ("HostTestTinyFluxModel", dict(seed=0, double=2, single=2), 4),
            "sd3": ("HostTestTinySD3Model", dict(seed=0, depth=2), 3),  # 2 joint attentions + block 0's attn2
            "qwen": ("HostTestTinyQwenModel", dict(seed=0, layers=2), 2)}
# NextDiT (Z-Image, Lumina 2): 2 main layers, plus a context and a noise refiner layer that are never merged; Z-Image
# pads text and image to multiples of 32 tokens (10 text -> 32, 24 image + 8 pad tokens)
LUMINA = {"zimage": ("HostTestTinyLuminaModel", dict(seed=0, layers=2, zimage=True), 2),
          "lumina2": ("HostTestTinyLuminaModel", dict(seed=0, layers=2, zimage=False), 2)}
LUMINA_LAYOUT = {"zimage": (32, 8), "lumina2": (TEXT, 0)}  # (text tokens with padding, image pad tokens)


@pytest.fixture(autouse=True)
def _modern(comfy):
    if H.host_kind() != "modern":
        pytest.skip("Flux merging needs current ComfyUI (attention override, DIFFUSION_MODEL wrappers, Flux class)")


def dit_graph(merge=SIMPLE, batch=1, steps=3, cfg=4.0, seed=3, sampler="euler", guidance=True, positive=None,
               family="flux"):
    g = Graph()
    node, inputs, _ = {**FAMILIES, **LUMINA}[family]
    tiny = g.add(node, **(dict(inputs, guidance=guidance) if family == "flux" else inputs))
    model = g.add("HostTestAttentionRecorder", "rec", model=tiny[0])[0]
    if merge is not None:
        model = g.add("ITM_ImportanceTokenMerging", "merge", model=model, **merge)[0]
    model = g.add("HostTestRuntimeProbe", "probe", model=model)[0]
    empty = g.add("EmptySD3LatentImage", width=96, height=64, batch_size=batch)
    sampled = g.add("KSampler", "sampler", model=model, positive=positive or tiny[1], negative=tiny[2],
                    latent_image=empty[0], seed=seed, steps=steps, cfg=cfg, sampler_name=sampler, scheduler="simple",
                    denoise=1.0)
    g.add("HostTestLatentStats", "out", samples=sampled[0])
    return g, tiny


def calls(node_id="rec"):
    """The recorded attention calls of the blocks (SD3's MMDiT has only those, and no block info)."""
    return [c for c in node_classes()["HostTestAttentionRecorder"].RECORDS[node_id]
            if c["block_type"] is None or c["block_type"] in ("double", "single") and c["block_index"] is not None]


def lengths(family, image):
    """Attention lengths with ``image`` image tokens: joint (text + image), and SD3.5's image-only attn2."""
    return {TEXT + image} | ({image} if family == "sd3" else set())


def last_run():
    return graph.last_run("probe", probe="HostTestRuntimeProbe")


def relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("merge", [SIMPLE, BLOCKS], ids=["attention", "transformer"])
def test_joint_attention_runs_on_merged_image_tokens_text_untouched(comfy, merge, family):
    """Every block's joint attention sees the 10 text tokens and half of the 24 image tokens (SD3.5's image-only
    attn2 half of the image tokens); the image stays close to the unmerged one; cond and uncond share one partition
    per step; the CFG map of step n drives step n + 1."""
    H.run_prompt(dit_graph(merge=None, family=family)[0].prompt)
    reference = latent("out").clone()
    assert {c["length"] for c in calls()} == lengths(family, IMAGE)
    H.run_prompt(dit_graph(merge=merge, family=family)[0].prompt)
    merged = latent("out").clone()
    assert merged.shape == reference.shape and reference.shape[-2:] == (8, 12) and torch.isfinite(merged).all()
    assert 1e-5 < relative(merged, reference) < 0.6, relative(merged, reference)
    seen = calls()
    assert {c["length"] for c in seen} == lengths(family, IMAGE // 2)
    assert {c["rows"] for c in seen} == {2}  # cond and uncond in one call
    assert len(seen) == 3 * FAMILIES[family][2]  # 3 steps x the blocks' attention calls
    run = last_run()
    assert run.tokens == {0: (IMAGE, IMAGE // 2)} and run.fallbacks == []
    assert run.maps_captured == 3 and run.evaluations_with_map == 2 and run.partitions == 3


@pytest.mark.parametrize("family", list(FAMILIES))
def test_importance_decides_the_partition(comfy, family):
    """The same seed with importance = cfg and = random gives different images (the map is used, not ignored), and
    random is the plain ToMe baseline (no map captured)."""
    H.run_prompt(dit_graph(merge=SIMPLE, steps=4, family=family)[0].prompt)
    cfg = latent("out").clone()
    H.run_prompt(dit_graph(merge=dict(SIMPLE, importance="random"), steps=4, family=family)[0].prompt)
    rand = latent("out").clone()
    run = last_run()
    assert run.maps_captured == 0 and run.evaluations_without_map == 4 and run.tokens == {0: (IMAGE, IMAGE // 2)}
    assert relative(cfg, rand) > 1e-4


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("merge", [SIMPLE, BLOCKS], ids=["attention", "transformer"])
def test_joint_and_split_calls_give_the_same_image(comfy, monkeypatch, merge, family):
    """cond and uncond in separate model calls (ComfyUI does that when memory is short) give the same image as one
    call: one partition per step and sample."""
    H.run_prompt(dit_graph(merge=merge, batch=2, family=family)[0].prompt)
    joint = latent("out").clone()
    graph.force_split_calls(monkeypatch)  # cond and uncond in separate model calls from here on
    H.run_prompt(dit_graph(merge=merge, batch=2, family=family)[0].prompt)
    split = latent("out").clone()
    assert {c["rows"] for c in calls()} == {2}  # two samples, cond and uncond now in separate calls
    torch.testing.assert_close(split, joint, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_cfg1_change_importance(comfy, guidance):
    """Flux dev / schnell run at cfg 1 (no uncond pass): cfg1_mode = change takes importance from how much the
    prediction moved since the previous step (no extra model pass: one row per call); it is the default, random
    (plain ToMe) the alternative."""
    H.run_prompt(dit_graph(merge=SIMPLE, cfg=1.0, steps=4, guidance=guidance)[0].prompt)
    run = last_run()
    assert {c["rows"] for c in calls()} == {1}  # no uncond pass was added
    assert run.maps_captured == 3 and run.evaluations_with_map == 2  # evaluations 3 and 4 use a change map
    assert run.tokens == {0: (IMAGE, IMAGE // 2)}
    default = latent("out").clone()
    advanced = dict(SIMPLE, dst_fraction=0.25, pool_scale=1.2, dst_mode="grid", warmup_mode="merge",
                    cfg1_mode="random", merge_cross_attn=False, merge_seed=0)
    g, _ = dit_graph(merge=None, cfg=1.0, steps=4, guidance=guidance)
    g.prompt["probe"]["inputs"]["model"] = g.add("ITM_ImportanceTokenMergingAdvanced", "merge",
                                                 model=["rec", 0], **advanced)[0]
    H.run_prompt(g.prompt)
    run = last_run()
    assert run.maps_captured == 0 and any("no uncond pass" in f for f in run.fallbacks)  # plain ToMe, said so
    assert relative(latent("out"), default) > 1e-5


def reference_graph(family, method=None):
    """The family's graph with a reference latent (8x8 -> 16 tokens) on both conds, as edit models take it."""
    g, tiny = dit_graph(merge=None, family=family)
    if family == "qwen":  # Qwen-Image latents are 5-D
        reference_latent = g.add("EmptyHunyuanLatentVideo", width=64, height=64, length=1, batch_size=1)
    else:
        reference_latent = g.add("EmptySD3LatentImage", width=64, height=64, batch_size=1)
    conds = []
    for slot in (1, 2):
        cond = g.add("ReferenceLatent", conditioning=tiny[slot], latent=reference_latent[0])
        if method is not None:
            cond = g.add("FluxKontextMultiReferenceLatentMethod", conditioning=cond[0],
                         reference_latents_method=method)
        conds.append(cond[0])
    g.prompt["sampler"]["inputs"].update(positive=conds[0], negative=conds[1])
    return g


@pytest.mark.parametrize("family", ["flux", "qwen"])
@pytest.mark.parametrize("scope", ["attention", "transformer"])
def test_reference_latent_tokens_stay_unmerged(comfy, scope, family):
    """Edit-model reference latents (ReferenceLatent: Flux Kontext, Qwen-Image-Edit) are appended after the image
    tokens: they, like the text, are never merged, and RoPE / the residual stream stay aligned (the image stays close
    to the unmerged one)."""
    g = reference_graph(family)
    H.run_prompt(g.prompt)
    unmerged = latent("out").clone()
    assert {c["length"] for c in calls()} == {TEXT + IMAGE + 16}
    g.add("ITM_ImportanceTokenMerging", "merge", model=["rec", 0], **dict(SIMPLE, scope=scope))
    g.prompt["probe"]["inputs"]["model"] = ["merge", 0]
    H.run_prompt(g.prompt)
    merged = latent("out").clone()
    assert {c["length"] for c in calls()} == {TEXT + IMAGE // 2 + 16}
    assert torch.isfinite(merged).all() and 1e-5 < relative(merged, unmerged) < 0.6, relative(merged, unmerged)
    run = last_run()
    assert run.tokens == {0: (IMAGE, IMAGE // 2)} and run.fallbacks == [] and run.evaluations_with_map == 2


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_queries_scope_falls_back_to_attention_with_a_warning(comfy, family, caplog):
    """scope = queries is a UNet site: a DiT merges its image queries, keys and values as with scope = attention
    (the same image) and says so once."""
    images = {}
    for scope in ("attention", "queries"):
        caplog.clear()
        with caplog.at_level("WARNING", logger="comfyui_importance_tome"):
            H.run_prompt(dit_graph(merge=dict(SIMPLE, scope=scope), family=family)[0].prompt)
        images[scope] = latent("out").clone()
        assert TEXT + IMAGE // 2 in {c["length"] for c in calls()}
        warned = [r for r in caplog.records if "scope = queries" in r.getMessage()]
        assert len(warned) == (1 if scope == "queries" else 0)
    torch.testing.assert_close(images["queries"], images["attention"])


def test_qwen_timestep_zero_references_leave_whole_blocks_unmerged(comfy):
    """Qwen-Image's index_timestep_zero reference method modulates the reference tokens from an index that a block
    replacement cannot move: scope = transformer leaves those runs unmerged with a note (the image is the unmerged
    one); the attention site still merges."""
    g = reference_graph("qwen", method="index_timestep_zero")
    H.run_prompt(g.prompt)
    unmerged = latent("out").clone()
    for scope, image in (("transformer", IMAGE), ("attention", IMAGE // 2)):
        g.add("ITM_ImportanceTokenMerging", "merge", model=["rec", 0], **dict(SIMPLE, scope=scope))
        g.prompt["probe"]["inputs"]["model"] = ["merge", 0]
        H.run_prompt(g.prompt)
        assert {c["length"] for c in calls()} == {TEXT + image + 16}
        run = last_run()
        if scope == "transformer":
            torch.testing.assert_close(latent("out"), unmerged)
            assert any("index_timestep_zero" in f for f in run.fallbacks) and run.merged_calls == 0
        else:
            assert run.fallbacks == [] and run.tokens == {0: (IMAGE, IMAGE // 2)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_area_conditioning_uses_its_crop_of_the_map(comfy, family):
    """An area cond (ConditioningSetArea) runs the model on a crop of the latent: its partition uses that crop of the
    importance map (found from the area), and the image stays finite and close to the unmerged one."""
    g, tiny = dit_graph(merge=None, family=family)
    area = g.add("ConditioningSetArea", conditioning=tiny[1], width=64, height=64, x=32, y=0, strength=1.0)
    both = g.add("ConditioningCombine", conditioning_1=tiny[1], conditioning_2=area[0])
    g.prompt["sampler"]["inputs"]["positive"] = both[0]
    H.run_prompt(g.prompt)
    unmerged = latent("out").clone()
    assert {c["length"] for c in calls()} == lengths(family, IMAGE) | lengths(family, 16)  # the 8x8 crop: 4x4
    g.add("ITM_ImportanceTokenMerging", "merge", model=["rec", 0], **SIMPLE)
    g.prompt["probe"]["inputs"]["model"] = ["merge", 0]
    H.run_prompt(g.prompt)
    merged = latent("out").clone()
    assert {c["length"] for c in calls()} == lengths(family, IMAGE // 2) | lengths(family, 8)
    assert torch.isfinite(merged).all() and 1e-5 < relative(merged, unmerged) < 0.6
    run = last_run()
    assert run.fallbacks == [] and run.tokens == {0: (IMAGE, IMAGE // 2)} and run.evaluations_with_map == 2


@pytest.mark.parametrize("scope", ["attention", "transformer"])
def test_flux2_patch_one_and_global_modulation(comfy, scope):
    """Flux.2 (patch 1 on a 128-channel latent, 4 RoPE axes, one modulation for all blocks): a 4x6 latent is 24 image
    tokens, merged to 12 in every block's joint attention; text (padded to 512 tokens by ComfyUI) untouched; close to
    the unmerged image."""
    import comfy.sample

    model, positive, negative = H.tiny_flux_model(seed=0, flux2=True)
    recorder = node_classes()["HostTestAttentionRecorder"]()
    (recorded,) = recorder.probe(model, unique_id="flux2")
    (patched,) = node_classes()["ITM_ImportanceTokenMerging"]().patch(recorded, **dict(SIMPLE, scope=scope))
    noise = torch.randn(1, 128, 4, 6, generator=torch.Generator().manual_seed(0))
    args = (3, 4.0, "euler", "simple", positive, negative, torch.zeros_like(noise))
    reference = comfy.sample.sample(model, noise, *args, seed=0, disable_pbar=True)
    out = comfy.sample.sample(patched, noise, *args, seed=0, disable_pbar=True)
    assert torch.isfinite(out).all() and 1e-5 < relative(out, reference) < 0.6, relative(out, reference)
    assert {c["length"] for c in calls("flux2")} == {512 + IMAGE // 2}  # ComfyUI pads Flux.2's text to 512 tokens
    run = patched.model_options["transformer_options"]["importance_tome"].summaries()[-1]
    assert run.tokens == {0: (IMAGE, IMAGE // 2)} and run.fallbacks == [] and run.evaluations_with_map == 2


def test_tokens_added_to_the_image_stream_leave_the_block_unmerged(comfy):
    """A double block whose image stream is longer than image + reference tokens (another node's post_input patch
    added some) cannot tell where the image tokens are: it runs unmerged, noted, instead of merging the wrong ones."""
    joint, merging = H.pack_module("nodes.joint"), H.pack_module("merging")
    runtime = H.pack_module("nodes.flux").FluxRuntime(H.pack_module("nodes.settings").MergeSettings(scope="transformer"))
    runtime.grid = merging.TokenGrid(2, 2)
    extra = {"block_index": 0, "block_type": "double", "sigmas": torch.tensor([1.0])}
    seen = []
    block = joint.BlockMerge("double_block")
    args = {"img": torch.randn(1, 4 + 3, 8), "txt": torch.randn(1, 5, 8), "transformer_options": dict(extra,
            importance_tome=runtime)}
    out = block(args, {"original_block": lambda a: seen.append(a["img"].shape[1]) or {"img": a["img"], "txt": a["txt"]}})
    assert seen == [7] and out["img"] is args["img"]
    assert any("image stream has 7 tokens" in f for f in runtime.run.summary.fallbacks)


def test_partition_per_block_tells_double_from_single_blocks(comfy):
    """partition_reuse = block computes one partition per block: Flux numbers its double and single blocks from 0
    each, so both kinds count (3 steps x (2 double + 2 single) = 12), not just the indices."""
    advanced = dict(SIMPLE, dst_fraction=0.25, pool_scale=1.2, dst_mode="grid", warmup_mode="merge",
                    cfg1_mode="random", merge_cross_attn=False, merge_seed=0, partition_reuse="block")
    g, _ = dit_graph(merge=None)
    g.prompt["probe"]["inputs"]["model"] = g.add("ITM_ImportanceTokenMergingAdvanced", "merge",
                                                 model=["rec", 0], **advanced)[0]
    H.run_prompt(g.prompt)
    run = last_run()
    assert run.partitions == 3 * 4 and run.fallbacks == [] and {c["length"] for c in calls()} == {TEXT + IMAGE // 2}


@pytest.mark.parametrize("family", ["flux", "qwen"])
def test_area_crop_takes_its_part_of_the_map(comfy, family):
    """A model call on an area cond's crop (8x8 at x = 4 of an 8x12 latent) takes that crop of the importance map:
    Flux's [B, H, W] map and Qwen-Image's [B, T, H, W] one alike."""
    merging, settings = H.pack_module("merging"), H.pack_module("nodes.settings").MergeSettings()
    runtime = (H.pack_module("nodes.flux").FluxRuntime if family == "flux"
               else H.pack_module("nodes.qwen").QwenRuntime)(settings)
    full = torch.arange(96.0).reshape(1, 8, 12) if family == "flux" else torch.arange(96.0).reshape(1, 1, 8, 12)
    runtime.run.map, runtime.run.areas, runtime.latent_size = full, [(8, 8, 0, 4)], (8, 8)
    rows = runtime._map_rows(1, {}, merging.TokenGrid(4, 4))
    expected = full[..., :, 4:12]
    torch.testing.assert_close(rows, expected[:, None] if family == "flux" else expected)
    runtime.run.areas = []  # no area explains the crop: random merging, noted
    assert runtime._map_rows(1, {}, merging.TokenGrid(4, 4)) is None
    assert any("no unique importance map crop" in f for f in runtime.run.summary.fallbacks)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_requeue_with_another_ratio_replaces_the_merging(comfy, family):
    """The node applied to a model that already carries it (a re-queued graph after a widget edit, or two nodes in a
    row) replaces the earlier merging instead of stacking a second one."""
    node = node_classes()["ITM_ImportanceTokenMerging"]()
    build = {"flux": H.tiny_flux_model, "sd3": H.tiny_sd3_model, "qwen": H.tiny_qwen_model}[family]
    model, positive, negative = build(seed=0)
    for scope in ("attention", "transformer"):
        (first,) = node.patch(model, **dict(SIMPLE, scope=scope))
        (second,) = node.patch(first, **dict(SIMPLE, scope=scope, ratio=0.25))
        options = second.model_options["transformer_options"]
        override = options.get("optimized_attention_override")
        if scope == "attention":
            assert override is not None and override.previous is None
        else:
            assert override is None
            assert all(p.previous is None for p in options["patches_replace"]["dit"].values())
        assert options["importance_tome"].settings.ratio == 0.25
        assert "optimized_attention_override" not in model.model_options.get("transformer_options", {})


@pytest.mark.parametrize("scope", ["attention", "transformer"])
def test_qwen_text_mask_is_cut_to_the_merged_length(comfy, scope):
    """Qwen-Image's text encoder pads the prompt and sends a mask, which the joint attention gets (positionally) over
    text + image tokens: it is cut to the merged length (its image part is zero), the padded text stays masked."""
    import comfy.sample

    model, positive, negative = H.tiny_qwen_model(seed=0)
    mask = torch.ones(1, TEXT)
    mask[:, 7:] = 0  # the last 3 text tokens are padding
    positive = [[positive[0][0], dict(positive[0][1], attention_mask=mask)]]
    negative = [[negative[0][0], dict(negative[0][1], attention_mask=mask)]]
    node = node_classes()["ITM_ImportanceTokenMerging"]()
    (patched,) = node.patch(model, **dict(SIMPLE, scope=scope))
    noise = torch.randn(1, 16, 1, 8, 12, generator=torch.Generator().manual_seed(0))
    args = (3, 4.0, "euler", "simple", positive, negative, torch.zeros_like(noise))
    out = comfy.sample.sample(patched, noise, *args, seed=0, disable_pbar=True)
    reference = comfy.sample.sample(model, noise, *args, seed=0, disable_pbar=True)
    assert torch.isfinite(out).all() and 1e-5 < relative(out, reference) < 0.6, relative(out, reference)
    run = patched.model_options["transformer_options"]["importance_tome"].summaries()[-1]
    assert run.tokens == {0: (IMAGE, IMAGE // 2)} and run.merged_calls == 3 * 2 and run.fallbacks == []


def test_mask_over_text_is_cut_and_mask_over_image_refuses(comfy):
    """Joint attention masks cover [text][image][reference]: a mask whose image part is zero is cut to the merged
    length on both axes of a square mask; one that touches image tokens leaves the call unmerged (noted)."""
    joint, merging = H.pack_module("nodes.joint"), H.pack_module("merging")
    runtime = joint.JointRuntime(H.pack_module("nodes.settings").MergeSettings())
    runtime.grid, runtime.tail = merging.TokenGrid(2, 2), 2  # 3 text + 4 image + 2 reference tokens
    mask = torch.zeros(1, 9, 9)
    mask[:, :3, :3] = 1.0
    mask[:, 7:, 7:] = 2.0
    usable, cut = joint._mask_for(mask, 2, runtime)
    assert usable and cut.shape == (1, 7, 7)
    expected = torch.zeros(1, 7, 7)
    expected[:, :3, :3] = 1.0
    expected[:, 5:, 5:] = 2.0
    torch.testing.assert_close(cut, expected)
    usable, cut = joint._mask_for(torch.zeros(1, 1, 9), 2, runtime)  # a key-only mask: the last axis only
    assert usable and cut.shape == (1, 1, 7)
    mask = mask.clone()  # (a new mask: masks are checked once per forward and mask)
    mask[:, 4, 1] = -1.0  # an image query row masked
    assert joint._mask_for(mask, 2, runtime) == (False, None)
    assert any("attention mask over the image tokens" in f for f in runtime.run.summary.fallbacks)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_preview_node_draws_the_image_dit_maps(comfy, family):
    """The Token Merging Preview draws a DiT run like a UNet one: one picture per image, half of the tokens merged
    (blue) at ratio 0.5, and an importance map that differs between two images of the batch."""
    g, _ = dit_graph(merge=SIMPLE, batch=2, steps=4, family=family)
    images = g.add("VAEDecode", "decode", samples=["sampler", 0], vae=g.add("HostTestImageCodec")[0])[0]
    out = g.add("ITM_MergePreview", "preview", model=["merge", 0], images=images, step=-1, level="first", opacity=1.0)
    g.add("HostTestImageStats", "importance", images=out[0])
    g.add("HostTestImageStats", "merge_map", images=out[1])
    H.run_prompt(g.prompt)
    merge, importance = (node_classes()["HostTestImageStats"].LAST[k] for k in ("merge_map", "importance"))
    assert merge.shape == importance.shape == (2, 64, 96, 3)
    blue = (merge - torch.tensor((0.20, 0.30, 0.85))).abs().amax(-1) < 1e-4
    for index in range(2):
        assert float(blue[index].float().mean()) == pytest.approx(0.5)
    assert not torch.equal(importance[0], importance[1])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_proportional_attention_weighs_each_slot_by_its_tokens(comfy, monkeypatch, family):
    """proportional_attention: the attention kernel gets one more channel per head that adds log(slot size) to the
    logits of each merged image key (0 for text keys; the queries' channel is 1), so the image part of every joint
    attention still weighs all 24 image tokens; the image changes, and stays close to the unmerged one. (The channel
    form, which the CPU uses, is pinned so that the test reads the same on a GPU.)"""
    H.pin_bias_form(monkeypatch, False)
    H.run_prompt(dit_graph(merge=None, family=family)[0].prompt)
    reference = latent("out").clone()
    head = {c["head"] for c in calls()}
    assert len(head) == 1
    head = head.pop()
    advanced = dict(SIMPLE, dst_fraction=0.25, pool_scale=1.2, dst_mode="grid", warmup_mode="merge",
                    cfg1_mode="random", merge_cross_attn=False, merge_seed=0)
    images = {}
    for proportional in (False, True):
        g, _ = dit_graph(merge=None, family=family)
        g.prompt["probe"]["inputs"]["model"] = g.add("ITM_ImportanceTokenMergingAdvanced", "merge", model=["rec", 0],
                                                     proportional_attention=proportional, **advanced)[0]
        H.run_prompt(g.prompt)
        images[proportional] = latent("out").clone()
        seen = calls()
        assert {c["length"] for c in seen} == lengths(family, IMAGE // 2)
        assert {c["head"] for c in seen} == {head + 1 if proportional else head}
    scale = (head + 1) ** 0.5
    for c in seen:  # the proportional run
        text = c["length"] - IMAGE // 2  # SD3.5's image-only attn2 has no text part
        assert torch.equal(c["q_last"], torch.ones_like(c["q_last"]))
        assert torch.equal(c["k_last"][:, :text], torch.zeros(c["rows"], text))
        sizes = (c["k_last"][:, text:] / scale).exp()
        assert sizes.min() > 0.999
        torch.testing.assert_close(sizes.sum(1), torch.full((c["rows"],), float(IMAGE)))
    assert relative(images[True], images[False]) > 1e-5
    assert relative(images[True], reference) < 0.6


def main_layer_calls():
    return [c for c in node_classes()["HostTestAttentionRecorder"].RECORDS["rec"] if c["block_type"] == "double"]


@pytest.mark.parametrize("family", list(LUMINA))
def test_nextdit_merges_the_main_layers_joint_attention(comfy, family, caplog):
    """Z-Image / Lumina 2: the main layers' joint attention [text][image][pad] runs on half of the image tokens; the
    text and image refiner layers and the pad tokens are never merged; scope = transformer (no block hook in NextDiT)
    falls back to the attention site with a warning, giving the same image."""
    text, pad = LUMINA_LAYOUT[family]
    H.run_prompt(dit_graph(merge=None, family=family)[0].prompt)
    reference = latent("out").clone()
    assert {c["length"] for c in main_layer_calls()} == {text + IMAGE + pad}
    refiners = {c["length"] for c in node_classes()["HostTestAttentionRecorder"].RECORDS["rec"]
                if c["block_type"] is None}
    assert refiners == {text, IMAGE + pad}
    images = {}
    for scope in ("attention", "transformer"):
        with caplog.at_level("WARNING", logger="comfyui_importance_tome"):
            H.run_prompt(dit_graph(merge=dict(SIMPLE, scope=scope), family=family)[0].prompt)
        images[scope] = latent("out").clone()
        assert {c["length"] for c in main_layer_calls()} == {text + IMAGE // 2 + pad}
        assert {c["length"] for c in node_classes()["HostTestAttentionRecorder"].RECORDS["rec"]
                if c["block_type"] is None} == refiners
        run = last_run()
        assert run.tokens == {0: (IMAGE, IMAGE // 2)} and run.fallbacks == [] and run.merged_calls == 3 * 2
    assert 1e-5 < relative(images["attention"], reference) < 0.6
    torch.testing.assert_close(images["transformer"], images["attention"])
    assert any("no block replacement hook" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("family", list(LUMINA))
def test_nextdit_joint_and_split_calls_and_proportional_bias(comfy, monkeypatch, family):
    """One partition per step and sample (joint == split calls), and the proportional-attention channel weighs the
    merged image keys only (text and pad keys get 0; the channel form pinned, as on the CPU)."""
    H.pin_bias_form(monkeypatch, False)
    text, pad = LUMINA_LAYOUT[family]
    H.run_prompt(dit_graph(merge=SIMPLE, batch=2, family=family)[0].prompt)
    joint = latent("out").clone()
    for c in main_layer_calls():
        sizes = (c["k_last"] / (c["head"]) ** 0.5).exp()
        assert torch.equal(c["k_last"][:, :text], torch.zeros(c["rows"], text))
        assert torch.equal(c["k_last"][:, text + IMAGE // 2:], torch.zeros(c["rows"], pad))
        torch.testing.assert_close(sizes[:, text:text + IMAGE // 2].sum(1), torch.full((c["rows"],), float(IMAGE)))
    graph.force_split_calls(monkeypatch)  # cond and uncond in separate model calls from here on
    H.run_prompt(dit_graph(merge=SIMPLE, batch=2, family=family)[0].prompt)
    assert {c["rows"] for c in main_layer_calls()} == {2}
    torch.testing.assert_close(latent("out"), joint, atol=1e-4, rtol=1e-4)


def test_a_refused_forward_does_not_refuse_the_next_ones(comfy):
    """A forward the runtime refuses (Qwen-Image references with index_timestep_zero at scope = transformer) leaves
    only itself unmerged: with references on the positive prompt only, cond and uncond run as separate forwards, and
    every uncond forward (3 steps x 2 blocks) still merges; a run without references merges every forward."""
    import comfy.sample

    model, positive, negative = H.tiny_qwen_model(seed=0)
    node = node_classes()["ITM_ImportanceTokenMerging"]()
    (patched,) = node.patch(model, **BLOCKS)
    runtime = patched.model_options["transformer_options"]["importance_tome"]
    noise = torch.randn(1, 16, 1, 8, 12, generator=torch.Generator().manual_seed(0))
    reference = {"reference_latents": [torch.zeros(1, 16, 1, 8, 8)], "reference_latents_method": "index_timestep_zero"}
    with_refs = [[positive[0][0], dict(positive[0][1], **reference)]]
    for conds, refused, merged in (((with_refs, negative), True, 3 * 2), ((positive, negative), False, 3 * 2)):
        args = (3, 4.0, "euler", "simple", *conds, torch.zeros_like(noise))
        comfy.sample.sample(patched, noise, *args, seed=0, disable_pbar=True)
        run = runtime.summaries()[-1]
        assert any("index_timestep_zero" in f for f in run.fallbacks) == refused
        assert run.merged_calls == merged, run.merged_calls


@pytest.mark.parametrize("family", ["qwen", "flux", "zimage"])
def test_proportional_attention_as_a_mask_gives_the_same_image(comfy, monkeypatch, family):
    """On GPUs the key bias goes to the attention kernel as an additive mask (combined with Qwen-Image's positional
    text mask) instead of an extra channel per head: forced here on the CPU, the image is the same, and the kernel
    gets its usual head size and a mask."""
    H.run_prompt(dit_graph(merge=SIMPLE, family=family)[0].prompt)
    channel = latent("out").clone()
    head = {c["head"] for c in main_calls(family)}
    H.pin_bias_form(monkeypatch, True)
    H.run_prompt(dit_graph(merge=SIMPLE, family=family)[0].prompt)
    assert {c["head"] for c in main_calls(family)} == {h - 1 for h in head}
    assert all(c["mask"] for c in main_calls(family))
    torch.testing.assert_close(latent("out"), channel, atol=1e-4, rtol=1e-4)


def main_calls(family):
    return main_layer_calls() if family in LUMINA else calls()


def test_key_bias_form_follows_the_kernel(comfy):
    """Proportional attention's bias form: a mask for PyTorch SDPA (any device: it broadcasts a [B, 1, 1, Lk] mask,
    cheaper on the CPU than widening every head) and on accelerators; an extra channel per head for the CPU's other
    kernels (ComfyUI's sub-quadratic default would expand a mask to full size)."""
    import comfy.ldm.modules.attention as attention

    dit = H.pack_module("nodes.dit")
    cpu, accelerator = torch.device("cpu"), torch.device("cuda")
    assert dit._bias_as_mask(cpu, attention.attention_pytorch)
    assert not dit._bias_as_mask(cpu, attention.attention_sub_quad)
    assert not dit._bias_as_mask(cpu, attention.attention_basic)
    assert not dit._bias_as_mask(cpu)
    assert dit._bias_as_mask(accelerator, attention.attention_sub_quad)


def test_kernels_without_masks_skip_the_bias_with_a_note(comfy, monkeypatch):
    """On GPUs the bias goes in as a mask; ComfyUI's sage kernel ignores masks and its flash kernel refuses them (a
    warning and an SDPA fallback per call), so there the call runs with plain merged attention, noted once. Forced
    here on the CPU with kernels named like ComfyUI's; a kernel that takes masks gets the bias."""
    dit, merging = H.pack_module("nodes.dit"), H.pack_module("merging")
    runtime_mod, settings = H.pack_module("nodes.runtime"), H.pack_module("nodes.settings")
    H.pin_bias_form(monkeypatch, True)
    grid = merging.TokenGrid(4, 6)
    g = torch.Generator().manual_seed(0)
    part = merging.make_partition(torch.randn(1, 24, 8, generator=g), merging.RandomGridConfig(0.5), grid=grid,
                                  generator=torch.Generator().manual_seed(1))
    plan = runtime_mod.LevelMerge(part, "mean")
    q, k, v = (torch.randn(1, 12, 32, generator=g) for _ in range(3))
    for name, expect_mask in (("attention_sage", False), ("attention_flash", False), ("attention_pytorch", True)):
        runtime = runtime_mod.MergeRuntime(settings.MergeSettings())
        seen = {}

        def kernel(q, k, v, heads, mask=None, **kwargs):
            seen["mask"], seen["width"] = mask, q.shape[-1]
            return q

        kernel.__name__ = name
        dit.ChainedOverride()._call_merged(kernel, (q, k, v), (2,), {}, runtime, plan,
                                           lambda: merging.log_slot_sizes(part.slot_counts))
        assert (seen["mask"] is not None) == expect_mask and seen["width"] == 32
        assert any("proportional attention is off" in f for f in runtime.run.summary.fallbacks) != expect_mask
        if expect_mask:
            torch.testing.assert_close(seen["mask"][:, 0, 0].exp().sum(1), torch.tensor([24.0]))
