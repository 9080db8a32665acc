"""Runs, steps and model calls as users' graphs produce them (both hosts): re-queued graphs with the last patched model
still loaded, cond and uncond in one call or in two, UNet wrappers that run the UNet several times per call, and a
ModelSampling node placed after the merging node."""
import types

import pytest
import torch

import comfy_harness as H
from graph import Graph
from test_unet_node import SIMPLE, STACK, ADVANCED, latent, records, sample_graph, summaries


def _nodes():
    import nodes

    return nodes.NODE_CLASS_MAPPINGS


def _relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("merge", [SIMPLE, STACK], ids=["attention", "transformer"])
def test_requeued_graph_still_merges(comfy, merge):
    """ComfyUI's server keeps one PromptExecutor and the last patched model loaded (object patches applied): editing
    the ratio and queueing again must merge every time, not every other time."""
    H.run_prompt(sample_graph(merge=None).prompt)
    reference = latent("out").clone()
    executor = None
    for ratio in (0.5, 0.4, 0.5, 0.4):
        _, executor = H.run_prompt(sample_graph(merge=dict(merge, ratio=ratio)).prompt, return_executor=True,
                                   executor=executor)
        kept = {0.5: 128, 0.4: 154}[ratio]
        run = summaries("probe")[-1]
        assert run.tokens == {0: (256, kept)}, (ratio, run.tokens)
        assert run.merged_calls > 0 and (kept, kept) in {(r["tokens"], r["kv_tokens"]) for r in records("probe")}
        assert _relative(latent("out"), reference) > 1e-4, ratio


def test_reapplying_the_node_while_a_patched_model_is_loaded(comfy):
    """The live modules are the earlier MergedSpatialTransformers while that model is patched in: the new model still
    gets a stack patch for every SpatialTransformer."""
    model, _, _ = H.tiny_sd15_model()
    node = _nodes()["ITM_ImportanceTokenMerging"]()
    (first,) = node.patch(model, **STACK)
    assert len(first.object_patches) == 16
    first.patch_model()
    try:
        live = [type(m).__name__ for m in model.model.diffusion_model.modules()]
        assert live.count("MergedSpatialTransformer") == 16  # the earlier patches are in force
        (second,) = node.patch(model, **dict(STACK, ratio=0.4))
        assert len(second.object_patches) == 16
        (attention,) = node.patch(model, **SIMPLE)
        assert attention.object_patches == {}
    finally:
        first.unpatch_model()
    assert "MergedSpatialTransformer" not in {type(m).__name__ for m in model.model.diffusion_model.modules()}


def _force_split(monkeypatch):
    import comfy.model_management as mm

    def no_memory(dev=None, torch_free_too=False):  # one cond chunk per model call
        return (1, 1) if torch_free_too else 1

    monkeypatch.setattr(mm, "get_free_memory", no_memory)


@pytest.mark.parametrize("merge,advanced", [
    (SIMPLE, False),
    (dict(SIMPLE, importance="random"), False),
    (STACK, False),
    (dict(SIMPLE, scope="queries"), False),
    (dict(ADVANCED, dst_mode="random", warmup_mode="prune"), True),
], ids=["cfg", "random", "transformer", "queries", "paper-config"])
def test_joint_and_split_calls_give_the_same_image(comfy, monkeypatch, merge, advanced):
    """One partition per step and sample: whether ComfyUI evaluates cond and uncond in one call (enough memory) or in
    two (memory short), every partition is the same, so the image is the same within float noise."""
    graph = sample_graph(merge=merge, advanced=advanced, batch=2, steps=5, sampler_name="dpmpp_2m", scheduler="karras")
    H.run_prompt(graph.prompt)
    joint = latent("out").clone()
    assert {len(r["cond_or_uncond"]) for r in records("probe")} == {2}
    joint_run = summaries("probe")[-1]
    H.run_prompt(sample_graph(merge=None, batch=2, steps=5, sampler_name="dpmpp_2m", scheduler="karras").prompt)
    unmerged = latent("out").clone()
    _force_split(monkeypatch)
    H.run_prompt(graph.prompt)
    split = latent("out").clone()
    assert {tuple(r["cond_or_uncond"]) for r in records("probe")} == {(0,), (1,)}
    split_run = summaries("probe")[-1]
    assert split_run.partitions == joint_run.partitions > 0  # the cond call reuses the uncond call's partitions
    merge_effect = _relative(joint, unmerged)
    assert merge_effect > 1e-3, merge_effect
    assert _relative(split, joint) < 1e-4 * max(1.0, merge_effect * 100), (_relative(split, joint), merge_effect)


@pytest.mark.parametrize("scope", ["attention", "transformer"])
def test_joint_and_split_calls_agree_with_random_destinations_at_high_cfg(comfy, monkeypatch, scope):
    """The paper's random destinations from the important pool, heun (two evaluations per step), cfg 7: the map
    differs between layouts by float noise only, which must not move the destinations. Regression: destinations were
    random *ranks* of the pool, so float noise that reordered the pool moved many of them and the two layouts
    differed by 1.6e-3 (transformer scope) / 5e-5 (attention)."""
    merge = dict(ADVANCED, scope=scope, dst_mode="random", warmup_mode="prune")
    layout = dict(batch=2, steps=3, sampler_name="heun", cfg=7.0, scheduler="karras")
    graph = sample_graph(merge=merge, advanced=True, **layout)
    H.run_prompt(graph.prompt)
    joint = latent("out").clone()
    H.run_prompt(sample_graph(merge=None, **layout).prompt)
    merge_effect = _relative(joint, latent("out"))
    _force_split(monkeypatch)
    H.run_prompt(graph.prompt)
    assert {tuple(r["cond_or_uncond"]) for r in records("probe")} == {(0,), (1,)}
    assert merge_effect > 1e-3, merge_effect
    assert _relative(latent("out"), joint) < 2e-5, (_relative(latent("out"), joint), merge_effect)


@pytest.mark.parametrize("per_batch", [4, 3])
def test_tiled_unet_wrapper_merges_each_batch_with_its_own_partition(comfy, monkeypatch, per_batch):
    """A model_function_wrapper runs 6 tiles of 16x16 in UNet passes of ``per_batch`` tiles (4 + 2: passes of another
    shape; 3 + 3: passes of the same shape) with the same transformer_options: every pass is merged, each with a
    partition computed on its own tokens."""
    unet = H.pack_module("nodes.unet")
    made = []
    original = unet.UNetRuntime._make_partition

    def recording(self, n, extra, *args):
        made.append((float(extra["sigmas"].flatten()[0]), tuple(extra["block"])[:1], n.shape[0], n.clone()))
        return original(self, n, extra, *args)

    monkeypatch.setattr(unet.UNetRuntime, "_make_partition", recording)
    g = Graph()
    tiny = g.add("HostTestTinyModel", arch="sd15", seed=0)
    merged = g.add("ITM_ImportanceTokenMerging", "merge", model=tiny[0], **SIMPLE)
    tiled = g.add("HostTestTiledWrapper", model=merged[0], tile=16, per_batch=per_batch)
    probe = g.add("HostTestAttnProbe", "probe", model=tiled[0])
    empty = g.add("EmptyLatentImage", width=256, height=384, batch_size=1)  # latent 48x32: 3x2 tiles of 16x16
    sampled = g.add("KSampler", "sampler", model=probe[0], positive=tiny[1], negative=tiny[2], latent_image=empty[0],
                    steps=3, seed=1, cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    g.add("HostTestLatentStats", "out", samples=sampled[0])
    H.run_prompt(g.prompt)
    assert torch.isfinite(latent("out")).all()
    sizes = [per_batch, 6 - per_batch] if per_batch == 4 else [3, 3]
    level0 = [r for r in records("probe") if r["original_shape"][-2:] == [16, 16] and r["kv_tokens"] == 128]
    assert {r["rows"] for r in level0} == {2 * s for s in sizes}  # every pass merged 256 -> 128 tokens
    assert not [r for r in records("probe") if r["tokens"] == 256]
    by_step = {}
    for sigma, stage, samples, metric in made:
        by_step.setdefault((sigma, stage), []).append((samples, metric))
    assert len(by_step) == 3 * 2  # 3 steps x (down, up)
    for (sigma, stage), passes in by_step.items():
        assert [s for s, _ in passes] == sizes, (sigma, stage, passes)
        if per_batch == 3:  # same shapes: the second pass matched on its own tiles, not on the first pass's
            assert not torch.equal(passes[0][1], passes[1][1])


def _normal_sigmas(model_sampling, steps):
    import comfy.samplers

    if H.host_kind() == "old":  # the 2024 host's scheduler takes the model, not its model_sampling
        return comfy.samplers.normal_scheduler(types.SimpleNamespace(model_sampling=model_sampling), steps)
    return comfy.samplers.normal_scheduler(model_sampling, steps)


def test_model_sampling_node_after_the_merging_node_sets_the_active_range(comfy):
    """start/end percent become sigmas from the model being sampled: a ModelSamplingContinuousEDM node after the
    merging node (EDM sigmas 120 .. 0.002) gives its own range, not the one of the discrete schedule the node saw."""
    steps, start, end = 8, 0.2, 0.6
    g = Graph()
    tiny = g.add("HostTestTinyModel", arch="sd15", seed=0)
    merged = g.add("ITM_ImportanceTokenMerging", "merge", model=tiny[0],
                   **dict(SIMPLE, start_percent=start, end_percent=end))
    edm = g.add("ModelSamplingContinuousEDM", model=merged[0], sampling="eps", sigma_max=120.0, sigma_min=0.002)
    probe = g.add("HostTestAttnProbe", "probe", model=edm[0])
    empty = g.add("EmptyLatentImage", width=128, height=128, batch_size=1)
    sampled = g.add("KSampler", "sampler", model=probe[0], positive=tiny[1], negative=tiny[2], latent_image=empty[0],
                    steps=steps, seed=3, cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    g.add("HostTestLatentStats", "out", samples=sampled[0])
    H.run_prompt(g.prompt)
    run = summaries("probe")[-1]

    model, _, _ = H.tiny_sd15_model()
    (edm_model,) = _nodes()["ModelSamplingContinuousEDM"]().patch(model, "eps", 120.0, 0.002)
    sampling = edm_model.object_patches["model_sampling"]
    expected = (sampling.percent_to_sigma(start), sampling.percent_to_sigma(end))
    discrete = (model.model.model_sampling.percent_to_sigma(start), model.model.model_sampling.percent_to_sigma(end))
    assert run.sigma_bounds == pytest.approx(expected) and run.sigma_bounds != pytest.approx(discrete)
    evaluated = _normal_sigmas(sampling, steps)[:-1].tolist()
    active = [s for s in evaluated if expected[1] <= s <= expected[0]]
    assert 0 < len(active) < steps
    assert run.evaluations_with_map + run.evaluations_without_map == len(active)
    assert run.evaluations_inactive == steps - len(active)
