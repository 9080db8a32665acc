"""Importance merging on HunyuanVideo (ComfyUI's HunyuanVideo class), through a real ComfyUI 0.14.1; skipped on the
2024 host.

The models are tiny HunyuanVideo t2v models built with ComfyUI's own classes (2 double + 2 single blocks, width 64);
latents come from EmptyHunyuanLatentVideo ([B, 16, T, H/8, W/8]): 64x48, 9 frames = 3 latent frames of 3x4 = 12
image tokens (36 in all), plus 12 text tokens that are never merged.
"""
import pytest
import torch

import comfy_harness as H
import graph
from graph import Graph, latent, node_classes

SIMPLE = dict(ratio=0.5, importance="cfg", start_percent=0.0, end_percent=1.0, levels="auto", scope="attention")
BLOCKS = dict(SIMPLE, scope="transformer")


@pytest.fixture(autouse=True)
def _modern(comfy):
    if H.host_kind() != "modern":
        pytest.skip("HunyuanVideo merging needs current ComfyUI (attention override, DIFFUSION_MODEL wrappers)")


def hunyuan_graph(merge=SIMPLE, batch=1, steps=3, cfg=5.0, seed=3, sampler="euler"):
    g = Graph()
    tiny = g.add("HostTestTinyHunyuanModel", seed=0, double=2, single=2)
    model = g.add("HostTestAttentionRecorder", "rec", model=tiny[0])[0]
    if merge is not None:
        model = g.add("ITM_ImportanceTokenMerging", "merge", model=model, **merge)[0]
    model = g.add("HostTestRuntimeProbe", "probe", model=model)[0]
    empty = g.add("EmptyHunyuanLatentVideo", width=64, height=48, length=9, batch_size=batch)
    sampled = g.add("KSampler", "sampler", model=model, positive=tiny[1], negative=tiny[2], latent_image=empty[0],
                    seed=seed, steps=steps, cfg=cfg, sampler_name=sampler, scheduler="simple", denoise=1.0)
    g.add("HostTestLatentStats", "out", samples=sampled[0])
    return g


def calls():
    return node_classes()["HostTestAttentionRecorder"].RECORDS["rec"]


def last_run():
    return graph.last_run("probe", probe="HostTestRuntimeProbe")


def block_calls():
    return [c for c in calls() if c["block_type"] in ("double", "single") and c["block_index"] is not None]


@pytest.mark.parametrize("merge", [SIMPLE, BLOCKS], ids=["attention", "transformer"])
def test_joint_attention_runs_on_merged_image_tokens_text_untouched(comfy, merge):
    """Every block's joint attention sees the 12 text tokens and half of each frame's image tokens (18 of 36)."""
    H.run_prompt(hunyuan_graph(merge=None).prompt)
    reference = latent("out").clone()
    assert {c["length"] for c in block_calls()} == {12 + 36}
    H.run_prompt(hunyuan_graph(merge=merge).prompt)
    merged = latent("out").clone()
    assert merged.shape == reference.shape == (1, 16, 3, 6, 8) and torch.isfinite(merged).all()
    relative = float((merged - reference).norm() / reference.norm())
    assert 1e-5 < relative < 0.6, relative
    seen = block_calls()
    assert {c["length"] for c in seen} == {12 + 18}
    assert len(seen) == 3 * (2 + 2)  # 3 steps (cond + uncond in one call) x (2 double + 2 single blocks)
    run = last_run()
    assert run.tokens == {0: (36, 18)} and run.fallbacks == []
    assert run.maps_captured == 3 and run.evaluations_with_map == 2 and run.partitions == 3


def test_random_importance_and_joint_vs_split_calls(comfy, monkeypatch):
    """importance = random is plain ToMe (no map used); cond and uncond in separate model calls give the same video
    as one call (one partition per step and sample)."""
    H.run_prompt(hunyuan_graph(merge=dict(SIMPLE, importance="random")).prompt)
    run = last_run()
    assert run.maps_captured == 0 and run.evaluations_without_map == 3 and run.tokens == {0: (36, 18)}
    H.run_prompt(hunyuan_graph(batch=2).prompt)
    joint = latent("out").clone()
    graph.force_split_calls(monkeypatch)  # cond and uncond in separate model calls from here on
    H.run_prompt(hunyuan_graph(batch=2).prompt)
    split = latent("out").clone()
    assert {c["rows"] for c in block_calls()} == {2}  # cond and uncond now come in separate calls
    torch.testing.assert_close(split, joint, atol=1e-4, rtol=1e-4)


def test_unsupported_hunyuan_inputs_are_left_unmerged_with_a_note(comfy):
    """A token count that is not the latent grid's (e.g. a prepended reference latent) leaves the block unmerged."""
    hunyuan = H.pack_module("nodes.hunyuan")
    merging = H.pack_module("merging")
    settings = H.pack_module("nodes.settings").MergeSettings(scope="transformer")
    runtime = hunyuan.HunyuanRuntime(settings)
    runtime.grid = merging.TokenGrid(3, 4, frames=3)
    extra = {"block_index": 0, "block_type": "double", "sigmas": torch.tensor([1.0])}
    assert runtime.plan(30, lambda: torch.zeros(1, 30, 8), extra, "block") is None  # fewer tokens than the grid
    assert any("reference tokens" in f for f in runtime.run.summary.fallbacks)


@pytest.mark.parametrize("scope", ["attention", "transformer"])
def test_text_attention_mask_is_cut_to_the_merged_length(comfy, scope):
    """HunyuanVideo's text encoder pads the prompt and sends a mask; the joint attention's mask covers text + image
    tokens, so it is cut to the merged length (its image part is all zeros) and the padded text stays masked. cfg 1
    as HunyuanVideo workflows run it (guidance-distilled; ComfyUI's mask also only takes one cond per call)."""
    import comfy.sample

    model, positive, negative = H.tiny_hunyuan_model(seed=0)
    mask = torch.ones(1, 12)
    mask[:, 9:] = 0  # the last 3 text tokens are padding
    positive = [[positive[0][0], dict(positive[0][1], attention_mask=mask)]]
    negative = [[negative[0][0], dict(negative[0][1], attention_mask=mask)]]
    node = node_classes()["ITM_ImportanceTokenMerging"]()
    (patched,) = node.patch(model, **dict(SIMPLE, scope=scope))
    noise = torch.randn(1, 16, 3, 6, 8, generator=torch.Generator().manual_seed(0))
    out = comfy.sample.sample(patched, noise, 3, 1.0, "euler", "simple", positive, negative, torch.zeros_like(noise),
                              seed=0, disable_pbar=True)
    reference = comfy.sample.sample(model, noise, 3, 1.0, "euler", "simple", positive, negative,
                                    torch.zeros_like(noise), seed=0, disable_pbar=True)
    assert torch.isfinite(out).all()
    relative = float((out - reference).norm() / reference.norm())
    assert 1e-5 < relative < 0.6, relative
    runtime = patched.model_options["transformer_options"]["importance_tome"]
    run = runtime.summaries()[-1]
    assert run.tokens == {0: (36, 18)} and run.merged_calls == 3 * 4
    assert [f for f in run.fallbacks if "no uncond pass" not in f] == []  # no mask or token-count fallback


def test_i2v_modulation_ranges_move_to_the_merged_frame_boundary(comfy):
    """HunyuanVideo i2v modulates the first latent frame's tokens with another vector: ranges at frame boundaries
    move with the merged tokens (every frame keeps the same share); a range inside a frame cannot, so those blocks
    run unmerged (noted)."""
    hunyuan, joint = H.pack_module("nodes.hunyuan"), H.pack_module("nodes.joint")
    merging = H.pack_module("merging")
    runtime = hunyuan.HunyuanRuntime(H.pack_module("nodes.settings").MergeSettings(scope="transformer"))
    runtime.grid = merging.TokenGrid(3, 4, frames=3)
    metric = torch.randn(1, 36, 8, generator=torch.Generator().manual_seed(0))
    part = merging.frame_partition(metric, runtime.grid, merging.RandomGridConfig(0.5))
    dims = [(0, 12, 0), (12, None, 1)]
    assert joint._merged_dims(dims, part, runtime, offset=0) == [(0, 6, 0), (6, None, 1)]
    assert joint._merged_dims([(0, 5 + 12, 0), (5 + 12, None, 1)], part, runtime, offset=5) == \
        [(0, 5 + 6, 0), (5 + 6, None, 1)]  # single blocks: text first
    assert joint._merged_dims(None, part, runtime, offset=0) is None
    assert joint._merged_dims([(0, 7, 0), (7, None, 1)], part, runtime, offset=0) is False
    assert any("inside a latent frame" in f for f in runtime.run.summary.fallbacks)


@pytest.mark.parametrize("scope", ["attention", "transformer"])
def test_prepended_reference_latent_stays_unmerged(comfy, scope):
    """A reference latent (HunyuanVideo's ``ref_latent``) is prepended to the image tokens: its tokens, like the
    text's, are never merged, and RoPE / the residual stream stay aligned (the run stays close to the unmerged one).
    cfg 1: ComfyUI's own reference-latent code only takes one cond per call (it writes into an expanded tensor)."""
    import comfy.sample

    model, positive, negative = H.tiny_hunyuan_model(seed=0)
    ref = torch.randn(1, 16, 1, 6, 8, generator=torch.Generator().manual_seed(4))
    positive = [[positive[0][0], dict(positive[0][1], ref_latent=ref)]]
    negative = [[negative[0][0], dict(negative[0][1], ref_latent=ref)]]
    recorder = node_classes()["HostTestAttentionRecorder"]()
    (recorded,) = recorder.probe(model, unique_id="refrec")  # before the merging node: it chains this override
    node = node_classes()["ITM_ImportanceTokenMerging"]()
    (patched,) = node.patch(recorded, **dict(SIMPLE, scope=scope))
    noise = torch.randn(1, 16, 3, 6, 8, generator=torch.Generator().manual_seed(0))
    args = (3, 1.0, "euler", "simple", positive, negative, torch.zeros_like(noise))
    out = comfy.sample.sample(patched, noise, *args, seed=0, disable_pbar=True)
    reference = comfy.sample.sample(model, noise, *args, seed=0, disable_pbar=True)
    relative = float((out - reference).norm() / reference.norm())
    assert torch.isfinite(out).all() and 1e-5 < relative < 0.6, relative
    seen = [c for c in node_classes()["HostTestAttentionRecorder"].RECORDS["refrec"]
            if c["block_type"] in ("double", "single") and c["block_index"] is not None]
    assert {c["length"] for c in seen} == {12 + 12 + 18}  # text + reference (3x4) + half of the 36 image tokens
    run = patched.model_options["transformer_options"]["importance_tome"].summaries()[-1]
    assert run.tokens == {0: (36, 18)} and [f for f in run.fallbacks if "no uncond pass" not in f] == []
