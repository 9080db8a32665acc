"""Importance merging on LTX-Video (ComfyUI's LTXVModel), through a real ComfyUI 0.14.1; skipped on the 2024 host.

The models are tiny LTX-Video models built with ComfyUI's own classes (2 layers, 2 heads of 32); latents come from
EmptyLTXVLatentVideo ([B, 128, (frames - 1) / 8 + 1, H/32, W/32], patch size 1): 128x96, 17 frames = 3 latent frames of
3x4 = 12 tokens (36 in all). Text (12 tokens) enters by cross-attention and is never merged; keyframe tokens
(LTXVAddGuide's appended guide latents) come last and are never merged either.
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
        pytest.skip("LTX-Video merging needs current ComfyUI (LTXVModel, attention override, DIFFUSION_MODEL wrappers)")


def ltxv_graph(merge=SIMPLE, batch=1, steps=3, cfg=3.0, seed=3, rope="interleaved"):
    g = Graph()
    tiny = g.add("HostTestTinyLTXVModel", seed=0, layers=2, rope=rope)
    model = g.add("HostTestAttentionRecorder", "rec", model=tiny[0])[0]
    if merge is not None:
        model = g.add("ITM_ImportanceTokenMerging", "merge", model=model, **merge)[0]
    model = g.add("HostTestRuntimeProbe", "probe", model=model)[0]
    empty = g.add("EmptyLTXVLatentVideo", width=128, height=96, length=17, batch_size=batch)
    sampled = g.add("KSampler", "sampler", model=model, positive=tiny[1], negative=tiny[2], latent_image=empty[0],
                    seed=seed, steps=steps, cfg=cfg, sampler_name="euler", scheduler="simple", denoise=1.0)
    g.add("HostTestLatentStats", "out", samples=sampled[0])
    return g


def self_attention_calls():
    return [c for c in node_classes()["HostTestAttentionRecorder"].RECORDS["rec"] if c["q"] == c["k"]]


def last_run():
    return graph.last_run("probe", probe="HostTestRuntimeProbe")


@pytest.mark.parametrize("merge,rope", [(SIMPLE, "interleaved"), (BLOCKS, "interleaved"), (BLOCKS, "split")],
                         ids=["attention", "transformer", "transformer-split-rope"])
def test_self_attention_runs_on_merged_tokens(comfy, merge, rope):
    """Every block's self-attention sees half of each latent frame's tokens (18 of 36); cross-attention still sees
    every image query and the 12 text tokens; RoPE (both layouts) travels with the tokens in whole blocks."""
    H.run_prompt(ltxv_graph(merge=None, rope=rope).prompt)
    reference = latent("out").clone()
    assert {c["q"] for c in self_attention_calls()} == {36}
    H.run_prompt(ltxv_graph(merge=merge, rope=rope).prompt)
    merged = latent("out").clone()
    assert merged.shape == reference.shape == (1, 128, 3, 3, 4) and torch.isfinite(merged).all()
    relative = float((merged - reference).norm() / reference.norm())
    assert 1e-5 < relative < 0.6, relative
    seen = self_attention_calls()
    assert {c["q"] for c in seen} == {18} and len(seen) == 3 * 2  # 3 steps x 2 blocks, cond + uncond in one call
    cross = [c for c in node_classes()["HostTestAttentionRecorder"].RECORDS["rec"] if c["q"] != c["k"]]
    assert {(c["q"], c["k"]) for c in cross} == {(18 if merge is BLOCKS else 36, 12)}
    run = last_run()
    assert run.tokens == {0: (36, 18)} and run.fallbacks == []
    assert run.maps_captured == 3 and run.evaluations_with_map == 2 and run.partitions == 3


def test_random_importance_and_joint_vs_split_calls(comfy, monkeypatch):
    """importance = random is plain ToMe (no map used); cond and uncond in separate model calls give the same video
    as one call (one partition per step and sample)."""
    H.run_prompt(ltxv_graph(merge=dict(SIMPLE, importance="random")).prompt)
    run = last_run()
    assert run.maps_captured == 0 and run.evaluations_without_map == 3 and run.tokens == {0: (36, 18)}
    H.run_prompt(ltxv_graph(batch=2).prompt)
    joint = latent("out").clone()
    assert {c["rows"] for c in self_attention_calls()} == {4}
    graph.force_split_calls(monkeypatch)  # cond and uncond in separate model calls from here on
    H.run_prompt(ltxv_graph(batch=2).prompt)
    split = latent("out").clone()
    assert {c["rows"] for c in self_attention_calls()} == {2}  # cond and uncond now come in separate calls
    torch.testing.assert_close(split, joint, atol=1e-4, rtol=1e-4)


def _sample(model, positive, negative, noise, latent_image=None, noise_mask=None, steps=3, cfg=3.0):
    import comfy.sample

    latent_image = torch.zeros_like(noise) if latent_image is None else latent_image
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative, latent_image,
                               noise_mask=noise_mask, seed=0, disable_pbar=True)


def _recorded(model):
    """``model`` with the test pack's attention recorder set before any merging (the records: a list)."""
    (recorded,) = node_classes()["HostTestAttentionRecorder"]().probe(model, unique_id="ltxv-direct")
    return recorded, node_classes()["HostTestAttentionRecorder"].RECORDS["ltxv-direct"]


@pytest.mark.parametrize("scope", ["attention", "transformer"])
def test_image_to_video_noise_mask_gives_per_token_timesteps(comfy, scope):
    """LTXVImgToVideo's noise mask (first latent frame kept) makes the timestep, and the modulation, per token; the
    first frame stays the image's, and whole blocks gather the per-token modulation with the tokens."""
    model, positive, negative = H.tiny_ltxv_model(seed=0)
    recorded, records = _recorded(model)
    node = node_classes()["ITM_ImportanceTokenMerging"]()
    (patched,) = node.patch(recorded, **dict(SIMPLE, scope=scope))
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 128, 3, 3, 4, generator=g)
    image = torch.randn(1, 128, 3, 3, 4, generator=g)
    mask = torch.ones(1, 1, 3, 3, 4)
    mask[:, :, 0] = 0.0  # LTXVImgToVideo at strength 1: the first latent frame is the image's
    reference = _sample(model, positive, negative, noise, image, mask)
    out = _sample(patched, positive, negative, noise, image, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, :, 0], image[:, :, 0])  # the conditioning frame is kept as it is
    relative = float((out - reference).norm() / reference.norm())
    assert 1e-5 < relative < 0.6, relative
    assert {c["q"] for c in records if c["q"] == c["k"]} == {18}
    run = patched.model_options["transformer_options"]["importance_tome"].summaries()[-1]
    assert run.tokens == {0: (36, 18)} and run.fallbacks == [] and run.evaluations_with_map == 2


@pytest.mark.parametrize("scope", ["attention", "transformer"])
def test_keyframe_guide_tokens_are_never_merged(comfy, scope):
    """LTXVAddGuide appends a guide latent frame (12 keyframe tokens, their own positions) after the clip: the clip's
    36 tokens merge to 18, the 12 keyframe tokens stay, and the map's guide frame is not used."""
    from comfy_extras.nodes_lt import LTXVAddGuide, get_noise_mask

    model, positive, negative = H.tiny_ltxv_model(seed=0)
    recorded, records = _recorded(model)
    node = node_classes()["ITM_ImportanceTokenMerging"]()
    (patched,) = node.patch(recorded, **dict(SIMPLE, scope=scope))
    g = torch.Generator().manual_seed(2)
    clip = {"samples": torch.zeros(1, 128, 3, 3, 4)}
    guide = torch.randn(1, 128, 1, 3, 4, generator=g)
    positive, negative, latent_image, noise_mask = LTXVAddGuide.append_keyframe(
        positive, negative, 8, clip["samples"], get_noise_mask(clip), guide, 1.0, (8, 32, 32))
    assert latent_image.shape[2] == 4 and positive[0][1]["keyframe_idxs"].shape[2] == 12
    noise = torch.randn(latent_image.shape, generator=g)
    reference = _sample(model, positive, negative, noise, latent_image, noise_mask)
    out = _sample(patched, positive, negative, noise, latent_image, noise_mask)
    assert torch.isfinite(out).all() and out.shape == reference.shape
    relative = float((out - reference).norm() / reference.norm())
    assert 1e-5 < relative < 0.6, relative
    assert {c["q"] for c in records if c["q"] == c["k"]} == {18 + 12}
    run = patched.model_options["transformer_options"]["importance_tome"].summaries()[-1]
    assert run.tokens == {0: (36, 18)} and run.fallbacks == [] and run.evaluations_with_map == 2


def test_grid_mask_over_the_clip_runs_unmerged_with_a_note(comfy):
    """A noise mask that drops tokens of the clip's own frames (negative values: the model removes those positions)
    cannot follow the token grid: that forward runs unmerged, with a note, never a crash."""
    ltxv = H.pack_module("nodes.ltxv")
    settings = H.pack_module("nodes.settings").MergeSettings()
    runtime = ltxv.LTXVRuntime(settings)
    x = torch.zeros(1, 128, 4, 3, 4)
    keyframes = torch.zeros(1, 3, 12, 2)
    mask = torch.ones(1, 1, 4, 3, 4)
    assert runtime.read_input(None, x, (None,) * 5 + (keyframes,), {"denoise_mask": mask})[1] == 12
    assert runtime.refusal is None
    mask[:, :, 3, 0, 0] = -0.5  # one guide position dropped: 11 keyframe tokens stay
    grid, tail = runtime.read_input(None, x, (None,) * 5 + (keyframes,), {"denoise_mask": mask})
    assert (grid.frames, grid.num_tokens, tail) == (3, 36, 11) and runtime.refusal is None
    mask[:, :, 1, 2, 3] = -0.5  # a token of the clip dropped
    runtime.read_input(None, x, (None,) * 5 + (keyframes,), {"denoise_mask": mask})
    assert runtime.refusal is not None and "drops tokens" in runtime.refusal[1]


def test_ltx2_audio_video_model_passes_through_with_one_warning(comfy, caplog):
    """LTX-2 (ComfyUI's audio-video LTXAVModel) is not supported yet: the node returns it unchanged, with one
    warning; LTX-Video itself is supported."""
    import logging

    ltxv = H.pack_module("nodes.ltxv")
    assert ltxv.supports(H.tiny_ltxv_model(seed=0)[0])
    model, _, _ = H.tiny_ltxv_model(seed=0, audio=True, layers=1)
    assert type(model.model.diffusion_model).__name__ == "LTXAVModel" and not ltxv.supports(model)
    caplog.set_level(logging.WARNING, logger="comfyui_importance_tome")
    (out,) = node_classes()["ITM_ImportanceTokenMerging"]().patch(model, **SIMPLE)
    assert out is model
    warnings = [r for r in caplog.records if "not supported yet" in r.getMessage()]
    assert len(warnings) == 1 and "passing the model through unchanged" in warnings[0].getMessage()


def test_preview_node_draws_every_decoded_frame(comfy):
    """The Token Merging Preview on an LTX-Video run: 17 decoded frames (LTX-Video's VAE: the first frame alone, then
    8 per latent frame) each get their latent frame's pictures; half of each frame's tokens merged (blue)."""
    g = ltxv_graph(steps=4)
    codec = g.add("HostTestVideoCodec", time=8, space=32, channels=128)[0]
    frames = g.add("VAEDecode", "decode", samples=["sampler", 0], vae=codec)[0]
    out = g.add("ITM_MergePreview", "preview", model=["merge", 0], images=frames, step=-1, level="first", opacity=1.0)
    g.add("HostTestImageStats", "importance", images=out[0])
    g.add("HostTestImageStats", "merge_map", images=out[1])
    H.run_prompt(g.prompt)
    merge, importance = (node_classes()["HostTestImageStats"].LAST[k] for k in ("merge_map", "importance"))
    assert merge.shape == importance.shape == (17, 96, 128, 3)
    blue = (merge - torch.tensor((0.20, 0.30, 0.85))).abs().amax(-1) < 1e-4
    for index in range(17):
        assert float(blue[index].float().mean()) == pytest.approx(0.5)
    # frame 0 is latent frame 0; frames 1-8 latent frame 1; frames 9-16 latent frame 2
    assert torch.equal(importance[1], importance[8]) and torch.equal(importance[9], importance[16])
    assert not torch.equal(importance[0], importance[1]) and not torch.equal(importance[8], importance[9])
