"""The Importance Token Merging nodes on UNet models, run end to end through a real ComfyUI (both hosts)."""
import logging

import pytest
import torch

import comfy_harness as H
from graph import Graph, node_classes

KSAMPLER = dict(seed=42, cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0)
SIMPLE = dict(ratio=0.5, importance="cfg", start_percent=0.0, end_percent=1.0, levels="auto", scope="attention")
STACK = dict(SIMPLE, scope="transformer")
ADVANCED = dict(SIMPLE, dst_fraction=0.25, pool_scale=1.4, dst_mode="random", warmup_mode="prune",
                cfg1_mode="random", merge_cross_attn=False, merge_seed=0)


def _nodes():
    import nodes

    return nodes.NODE_CLASS_MAPPINGS


def latent(node_id):
    return _nodes()["HostTestLatentStats"].LAST[node_id]


def records(node_id):
    return _nodes()["HostTestAttnProbe"].RECORDS[node_id]


def summaries(node_id):
    runtime = _nodes()["HostTestAttnProbe"].RUNTIMES[node_id]
    assert runtime is not None, "the probe found no importance-merging runtime on the model"
    return runtime.summaries()


def sample_graph(arch="sd15", merge=SIMPLE, advanced=False, width=128, height=128, batch=1, steps=4, **ksampler):
    """tiny model -> [merging node] -> probe -> KSampler -> stats. Node ids: probe "probe", stats "out"."""
    g = Graph()
    tiny = g.add("HostTestTinyModel", arch=arch, seed=0)
    model = tiny[0]
    if merge is not None:
        node = "ITM_ImportanceTokenMergingAdvanced" if advanced else "ITM_ImportanceTokenMerging"
        model = g.add(node, "merge", model=model, **merge)[0]
    probe = g.add("HostTestAttnProbe", "probe", model=model)
    empty = g.add("EmptyLatentImage", width=width, height=height, batch_size=batch)
    sampled = g.add("KSampler", "sampler", model=probe[0], positive=tiny[1], negative=tiny[2], latent_image=empty[0],
                    steps=steps, **dict(KSAMPLER, **ksampler))
    g.add("HostTestLatentStats", "out", samples=sampled[0])
    return g


def token_counts(node_id="probe"):
    return {(r["tokens"], r["kv_tokens"]) for r in records(node_id)}


@pytest.mark.parametrize("scope", ["attention", "transformer"])
def test_proportional_attention_weighs_each_merged_key_by_its_tokens(comfy, monkeypatch, caplog, scope):
    """proportional_attention (the default) at the attention site and in whole merged transformer stacks: the
    self-attention call on merged tokens gets log(slot size) added to the logits of each merged key (on the CPU as one
    more channel per head: the queries' is 1, the keys' log of their slot's token count, which adds up to the 256
    tokens of the merged level); cross-attention (merged queries too with scope = transformer) and the unmerged levels
    run as before. It needs ComfyUI's attention override: on the 2024 host it is off, with a logged note, and the
    image is the plain one."""
    import logging

    caplog.set_level(logging.INFO, logger="comfyui_importance_tome")
    H.pin_bias_form(monkeypatch, False)  # the channel form
    modern = H.host_kind() == "modern"
    images = {}
    settings = dict(ADVANCED, dst_mode="grid", warmup_mode="merge", scope=scope)  # mean merging from the first step

    def run(proportional):
        g = Graph()
        tiny = g.add("HostTestTinyModel", arch="sd15", seed=0)
        model = g.add("HostTestAttentionRecorder", "rec", model=tiny[0])[0] if modern else tiny[0]
        model = g.add("ITM_ImportanceTokenMergingAdvanced", "merge", model=model,
                      **dict(settings, proportional_attention=proportional))[0]
        probe = g.add("HostTestAttnProbe", "probe", model=model)
        empty = g.add("EmptyLatentImage", width=128, height=128, batch_size=1)
        sampled = g.add("KSampler", "sampler", model=probe[0], positive=tiny[1], negative=tiny[2],
                        latent_image=empty[0], steps=4, **KSAMPLER)
        g.add("HostTestLatentStats", "out", samples=sampled[0])
        H.run_prompt(g.prompt)
        return latent("out").clone()

    for proportional in (False, True):
        images[proportional] = run(proportional)
        assert (128, 128) in token_counts()  # the merged level: 256 tokens -> 128 queries / keys / values
        if not modern:
            continue
        calls = node_classes()["HostTestAttentionRecorder"].RECORDS["rec"]
        merged = [c for c in calls if c["q"] == c["k"] == 128 and c["head"] in (8, 9)]
        assert merged and {c["head"] for c in merged} == {9 if proportional else 8}
        others = [(c["q"], c["k"], c["head"]) for c in calls if not any(c is m for m in merged)]
        if proportional:  # cross-attention and the other levels: untouched
            assert others == plain_others and len(others) > 0
        plain_others = others
    if not modern:
        assert torch.equal(images[True], images[False])
        assert any("needs ComfyUI's attention override" in r.getMessage() for r in caplog.records)
        return
    for c in merged:  # the proportional run
        assert torch.equal(c["q_last"], torch.ones_like(c["q_last"]))
        sizes = (c["k_last"] / 3.0).exp()  # the channel holds log(size) * sqrt(9)
        assert sizes.min() > 0.999
        torch.testing.assert_close(sizes.sum(1), torch.full((c["rows"],), 256.0))
    assert float((images[True] - images[False]).abs().max()) > 1e-5
    # the mask form (PyTorch SDPA, GPUs): the merged self-attention keeps its head size and gets a mask; same image
    H.pin_bias_form(monkeypatch, True)
    masked = run(True)
    calls = node_classes()["HostTestAttentionRecorder"].RECORDS["rec"]
    merged = [c for c in calls if c["q"] == c["k"] == 128]
    assert merged and all(c["head"] == 8 and c["mask"] for c in merged)
    form_gap = float((masked - images[True]).abs().max())  # kernels round differently over the steps
    assert form_gap < 1e-3 and float((masked - images[False]).abs().max()) > 10 * form_gap


@pytest.mark.parametrize("arch,full,kept", [("sd15", 256, 128), ("sdxl", 64, 32)])
def test_merged_run_differs_from_unmerged_and_stays_close(comfy, arch, full, kept):
    """SD1.5 merges level 0 (16x16 latent: 256 tokens); SDXL has no attention there and merges level 1 (8x8)."""
    H.run_prompt(sample_graph(arch, merge=None).prompt)
    reference = latent("out").clone()
    assert (full, full) in token_counts()
    H.run_prompt(sample_graph(arch).prompt)
    merged = latent("out").clone()
    relative = float((merged - reference).norm() / reference.norm())
    assert torch.isfinite(merged).all()
    assert 1e-5 < relative < 0.25, relative
    # self-attention at the merged level received N - r queries, keys and values; nothing there ran unmerged
    assert (kept, kept) in token_counts()
    assert (full, full) not in token_counts()
    run = summaries("probe")[-1]
    assert run.maps_captured == 4 and run.evaluations_with_map == 3 and run.evaluations_without_map == 1
    assert set(run.tokens.values()) == {(full, kept)} and run.fallbacks == []


@pytest.mark.parametrize("sampler,steps,evaluations,sigmas", [("uni_pc", 6, 6, 6), ("uni_pc_bh2", 5, 5, 5),
                                                               ("dpmpp_2m", 6, 6, 6), ("heun", 3, 5, 3)])
def test_multistep_and_second_order_samplers_get_a_map_every_evaluation(comfy, sampler, steps, evaluations, sigmas):
    """The CFG map is captured on every model evaluation whatever the sampler calls the model for (uni_pc's
    corrector, heun's second evaluation), so importance is never silently plain ToMe after the first evaluation. The
    2024 host tells evaluations apart by sigma only, so heun's second evaluation at the next step's sigma and that
    step's own evaluation share one partition there (3 distinct sigmas for heun's 5 evaluations)."""
    H.run_prompt(sample_graph(steps=steps, sampler_name=sampler).prompt)
    run = summaries("probe")[-1]
    assert run.maps_captured == evaluations and run.fallbacks == []
    told_apart = evaluations if H.host_kind() == "modern" else sigmas
    assert run.evaluations_with_map == told_apart - 1 and run.evaluations_without_map == 1


def test_random_importance_is_plain_tome(comfy):
    H.run_prompt(sample_graph(merge=dict(SIMPLE, importance="random")).prompt)
    run = summaries("probe")[-1]
    assert run.maps_captured == 0 and run.evaluations_with_map == 0 and run.evaluations_without_map == 4
    assert (128, 128) in token_counts()


def test_importance_map_steers_which_tokens_are_kept(comfy):
    """With pool_scale 1 and destinations from the pool the kept tokens are exactly the most important ones of the
    previous step's map."""
    mod = H.pack_module("nodes.unet")
    model, pos, neg = H.tiny_sd15_model()
    settings = H.pack_module("nodes.settings").MergeSettings(ratio=0.5, pool_scale=1.0, dst_mode="top")
    patched = mod.apply(model, settings)
    runtime = patched.model_options["transformer_options"][mod.KEY]
    imap = torch.zeros(1, 16, 16)
    imap[0, :8] = 1.0  # top half important
    runtime.run.map = imap
    n = torch.randn(2, 256, 32)
    extra = {"original_shape": [2, 4, 16, 16], "cond_or_uncond": [1, 0], "sigmas": torch.tensor([1.0]),
             mod.KEY: runtime}
    plan = runtime.partition_for(n, extra)
    assert plan.mode == "mean"
    kept = (plan.partition.roles[0] != 2).reshape(16, 16)
    assert kept[:8].all() and not kept[8:].any()


def test_warmup_prunes_but_fallbacks_merge(comfy):
    """Without a map yet (first step) the warm-up mode applies; without any map to come (cfg = 1) it is plain ToMe."""
    mod = H.pack_module("nodes.unet")
    model, _, _ = H.tiny_sd15_model()
    patched = mod.apply(model, H.pack_module("nodes.settings").MergeSettings(warmup_mode="prune"))
    runtime = patched.model_options["transformer_options"][mod.KEY]
    n = torch.randn(2, 256, 32)

    def plan(sigma):
        extra = {"original_shape": [2, 4, 16, 16], "cond_or_uncond": [1, 0], "sigmas": torch.tensor([sigma]),
                 mod.KEY: runtime}
        return runtime.partition_for(n, extra)

    assert plan(10.0).mode == "prune"  # first evaluation of the run: warm-up
    runtime.run.no_uncond = True  # the cfg hook saw no uncond pass
    assert plan(9.0).mode == "mean"


def test_node_leaves_input_model_unchanged(comfy):
    model, _, _ = H.tiny_sd15_model()
    before = repr(model.model_options)
    node = _nodes()["ITM_ImportanceTokenMergingAdvanced"]()
    (patched,) = node.patch(model, **dict(ADVANCED, merge_cross_attn=True))
    assert repr(model.model_options) == before
    assert patched is not model
    patches = patched.model_options["transformer_options"]["patches"]
    assert {"attn1_patch", "attn1_output_patch", "attn2_patch", "attn2_output_patch"} <= set(patches)
    assert len(patched.model_options["sampler_post_cfg_function"]) == 1


def test_chaining_the_node_twice_replaces_the_first(comfy):
    model, _, _ = H.tiny_sd15_model()
    node = _nodes()["ITM_ImportanceTokenMerging"]()
    (once,) = node.patch(model, **SIMPLE)
    (twice,) = node.patch(once, **dict(SIMPLE, ratio=0.3))
    patches = twice.model_options["transformer_options"]["patches"]
    assert len(patches["attn1_patch"]) == 1 and len(patches["attn1_output_patch"]) == 1
    assert len(twice.model_options["sampler_post_cfg_function"]) == 1
    assert twice.model_options["transformer_options"]["importance_tome"].settings.ratio == 0.3
    if H.host_kind() == "modern":  # one proportional-attention override, chaining the one set before the first node
        unet = H.pack_module("nodes.unet")

        def earlier(func, *args, **kwargs):
            return func(*args, **kwargs)

        kernel = model.clone()
        kernel.model_options["transformer_options"] = dict(kernel.model_options.get("transformer_options", {}),
                                                           optimized_attention_override=earlier)
        (once,) = node.patch(kernel, **SIMPLE)
        (twice,) = node.patch(once, **dict(SIMPLE, ratio=0.3))
        override = twice.model_options["transformer_options"]["optimized_attention_override"]
        assert isinstance(override, unet.SelfAttentionBias) and override.previous is earlier
        (plain,) = _nodes()["ITM_ImportanceTokenMergingAdvanced"]().patch(
            once, **dict(ADVANCED, proportional_attention=False))
        assert plain.model_options["transformer_options"]["optimized_attention_override"] is earlier


def test_cfg_one_auto_source_on_a_unet_and_says_so(comfy, caplog):
    """cfg 1 on a UNet, cfg1_mode = auto (the simple node): with proportional attention (current ComfyUI) random ToMe,
    where the change map measured no better; without it (the 2024 host, or switched off on the Advanced node) the
    change map, which measured well ahead there (tests/cfg1_quality_protocol.sh). Said once per run."""
    caplog.set_level(logging.INFO, logger="comfyui_importance_tome")
    modern = H.host_kind() == "modern"
    H.run_prompt(sample_graph(cfg=1.0).prompt)
    run = summaries("probe")[-1]
    assert {r["cond_or_uncond"][0] for r in records("probe")} == {0}  # really no uncond rows
    assert _nodes()["HostTestAttnProbe"].RUNTIMES["probe"].settings.cfg1_mode == ("random" if modern else "change")
    assert run.merged_calls > 0
    if modern:
        assert run.maps_captured == 0 and run.evaluations_with_map == 0
        assert any("no uncond pass" in f for f in run.fallbacks)
        notes = [r for r in caplog.records if r.getMessage().startswith("Importance Token Merging: no uncond pass")]
        assert len(notes) == 1  # once per run, not once per step
    else:
        assert run.maps_captured == 3 and run.evaluations_with_map == 2
        assert any("change of the denoised prediction" in f for f in run.fallbacks)
    caplog.clear()
    H.run_prompt(sample_graph(merge=dict(ADVANCED, cfg1_mode="auto", proportional_attention=False), advanced=True,
                              cfg=1.0).prompt)
    run = summaries("probe")[-1]
    assert _nodes()["HostTestAttnProbe"].RUNTIMES["probe"].settings.cfg1_mode == "change"  # both hosts
    assert run.maps_captured == 3 and run.evaluations_with_map == 2


def test_auto_settings_take_the_model_familys_values(comfy):
    """protect and cfg1_mode "auto" (the defaults) resolve per family: protect 0.1 at the UNet attention site with
    proportional attention (current ComfyUI), 0 without it, at the queries site and on DiTs; cfg1_mode change on DiTs
    and at the UNet attention site without proportional attention, random on other UNet settings. Explicit values are
    kept."""
    unet, dit, settings = (H.pack_module(name) for name in ("nodes.unet", "nodes.dit", "nodes.settings"))
    ms = settings.MergeSettings
    assert ms().protect == settings.AUTO and ms().cfg1_mode == "auto"
    modern = H.host_kind() == "modern"
    assert unet.UNetRuntime(ms()).settings.protect == (0.1 if modern else 0.0)
    assert unet.UNetRuntime(ms(ratio=0.3)).settings.protect == (0.1 if modern else 0.0)
    assert unet.UNetRuntime(ms(ratio=0.6)).settings.protect == (0.05 if modern else 0.0)
    assert unet.UNetRuntime(ms(ratio=0.7)).settings.protect == 0.0
    assert unet.UNetRuntime(ms(proportional_attention=False)).settings.protect == 0.0
    assert unet.UNetRuntime(ms(scope="queries")).settings.protect == 0.0
    assert unet.UNetRuntime(ms(protect=0.3)).settings.protect == 0.3
    assert dit.VideoDiTRuntime(ms()).settings.protect == 0.0
    assert unet.UNetRuntime(ms()).settings.cfg1_mode == ("random" if modern else "change")
    assert unet.UNetRuntime(ms(proportional_attention=False)).settings.cfg1_mode == "change"
    assert unet.UNetRuntime(ms(scope="queries")).settings.cfg1_mode == "random"
    assert unet.UNetRuntime(ms(scope="transformer", proportional_attention=False)).settings.cfg1_mode == "random"
    assert unet.UNetRuntime(ms(cfg1_mode="random", proportional_attention=False)).settings.cfg1_mode == "random"
    assert dit.VideoDiTRuntime(ms()).settings.cfg1_mode == "change"
    assert dit.VideoDiTRuntime(ms(cfg1_mode="random")).settings.cfg1_mode == "random"
    with pytest.raises(ValueError, match="protect must be in"):
        ms(protect=-0.5)


def test_protect_auto_reaches_the_partition(comfy):
    """The simple node (protect = auto) gives exactly the Advanced node's image with protect 0.1 on current ComfyUI
    (proportional attention) and with protect 0 on the 2024 host; the two values give different images."""
    defaults = dict(SIMPLE, dst_fraction=0.25, pool_scale=1.2, dst_mode="grid", warmup_mode="merge",
                    cfg1_mode="auto", merge_cross_attn=False, merge_seed=0)
    images = {}
    for name, merge, advanced in (("auto", SIMPLE, False), ("0", dict(defaults, protect=0.0), True),
                                  ("0.1", dict(defaults, protect=0.1), True)):
        H.run_prompt(sample_graph(merge=merge, advanced=advanced).prompt)
        images[name] = latent("out").clone()
    assert float((images["0.1"] - images["0"]).abs().max()) > 1e-6
    same = "0.1" if H.host_kind() == "modern" else "0"
    torch.testing.assert_close(images["auto"], images[same], atol=0, rtol=0)


def test_cfg_one_can_force_the_uncond_pass(comfy):
    H.run_prompt(sample_graph(merge=dict(ADVANCED, cfg1_mode="force_uncond"), advanced=True, cfg=1.0).prompt)
    run = summaries("probe")[-1]
    assert run.maps_captured == 4 and run.evaluations_with_map == 3
    assert any(len(r["cond_or_uncond"]) == 2 for r in records("probe"))


def test_cfg_one_change_mode_uses_how_the_prediction_moved(comfy, caplog):
    """cfg1_mode = change: no uncond pass, the map is |denoised - previous denoised| from the second evaluation on, so
    evaluations 3 and 4 use a map; the merge differs from plain ToMe."""
    caplog.set_level(logging.INFO, logger="comfyui_importance_tome")
    H.run_prompt(sample_graph(merge=dict(ADVANCED, importance="random"), advanced=True, cfg=1.0).prompt)
    plain = latent("out").clone()
    H.run_prompt(sample_graph(merge=dict(ADVANCED, cfg1_mode="change"), advanced=True, cfg=1.0).prompt)
    changed = latent("out").clone()
    run = summaries("probe")[-1]
    assert {r["cond_or_uncond"][0] for r in records("probe")} == {0}  # still no uncond rows
    assert run.maps_captured == 3 and run.evaluations_with_map == 2 and run.evaluations_without_map == 2
    assert any("change of the denoised prediction" in f for f in run.fallbacks)
    assert run.previews[3].importance is not None and run.previews[3].importance.float().std() > 0
    assert float((changed - plain).abs().max()) > 1e-5  # importance, not plain ToMe, chose the last two partitions


def test_several_positive_conds_and_latent_batch(comfy):
    g = sample_graph(batch=2)
    tiny = g.prompt["1"]
    assert tiny["class_type"] == "HostTestTinyModel"
    other = g.add("HostTestTinyModel", arch="sd15", seed=5)
    both = g.add("ConditioningCombine", conditioning_1=["1", 1], conditioning_2=other[1])
    g.prompt["sampler"]["inputs"]["positive"] = both[0]
    H.run_prompt(g.prompt)
    calls = records("probe")
    assert {len(r["cond_or_uncond"]) for r in calls} == {3} and {r["rows"] for r in calls} == {6}
    run = summaries("probe")[-1]
    assert run.evaluations_with_map == 3 and run.fallbacks == []
    assert (128, 128) in token_counts()


def test_area_conditioning_gets_its_crop_of_the_map(comfy):
    g = sample_graph()
    area = g.add("ConditioningSetArea", conditioning=["1", 1], width=64, height=64, x=32, y=32, strength=1.0)
    both = g.add("ConditioningCombine", conditioning_1=["1", 1], conditioning_2=area[0])
    g.prompt["sampler"]["inputs"]["positive"] = both[0]
    H.run_prompt(g.prompt)
    shapes = {tuple(r["original_shape"][-2:]) for r in records("probe")}
    assert (8, 8) in shapes and (16, 16) in shapes  # the area runs as its own cropped batch
    run = summaries("probe")[-1]
    assert run.fallbacks == [], run.fallbacks
    assert run.tokens[0] in {(256, 128), (64, 32)}
    assert (32, 32) in token_counts() and (128, 128) in token_counts()


def test_memory_split_batches(comfy, monkeypatch):
    import comfy.model_management as mm

    def no_memory(dev=None, torch_free_too=False):  # forces one cond chunk per model call
        return (1, 1) if torch_free_too else 1

    monkeypatch.setattr(mm, "get_free_memory", no_memory)
    H.run_prompt(sample_graph().prompt)
    assert {tuple(r["cond_or_uncond"]) for r in records("probe")} == {(0,), (1,)}
    run = summaries("probe")[-1]
    assert run.evaluations_with_map == 3 and run.evaluations_without_map == 1 and run.fallbacks == []
    assert (128, 128) in token_counts()


def test_chains_with_freeu_sag_and_model_merge(comfy):
    g = Graph()
    a = g.add("HostTestTinyModel", arch="sd15", seed=0)
    b = g.add("HostTestTinyModel", arch="sd15", seed=1)
    merged_model = g.add("ModelMergeSimple", model1=a[0], model2=b[0], ratio=0.5)
    freeu = g.add("FreeU_V2", model=merged_model[0], b1=1.3, b2=1.4, s1=0.9, s2=0.2)
    ours = g.add("ITM_ImportanceTokenMerging", model=freeu[0], **SIMPLE)
    sag = g.add("SelfAttentionGuidance", model=ours[0], scale=0.5, blur_sigma=2.0)
    probe = g.add("HostTestAttnProbe", "probe", model=sag[0])
    empty = g.add("EmptyLatentImage", width=128, height=128, batch_size=1)
    out = g.add("KSampler", model=probe[0], positive=a[1], negative=a[2], latent_image=empty[0], steps=4, **KSAMPLER)
    g.add("HostTestLatentStats", "out", samples=out[0])
    H.run_prompt(g.prompt)
    assert torch.isfinite(latent("out")).all()
    run = summaries("probe")[-1]
    assert run.evaluations_with_map == 3 and run.merged_calls > 0
    assert (128, 128) in token_counts()


def test_two_configurations_and_hires_fix_do_not_interfere(comfy):
    """Two merging nodes on one model in one graph, and one patched model used by two samplers (hires fix) whose
    second run has a different latent size: each run gets its own settings, map and summary."""
    g = sample_graph(steps=3)
    tiny = ["1", 0]
    other = g.add("ITM_ImportanceTokenMerging", model=tiny, **dict(SIMPLE, ratio=0.3, importance="random"))
    probe_b = g.add("HostTestAttnProbe", "probe_b", model=other[0])
    empty = g.add("EmptyLatentImage", width=128, height=128, batch_size=1)
    out_b = g.add("KSampler", model=probe_b[0], positive=["1", 1], negative=["1", 2], latent_image=empty[0],
                  steps=3, **KSAMPLER)
    g.add("HostTestLatentStats", "out_b", samples=out_b[0])
    upscaled = g.add("LatentUpscaleBy", samples=["sampler", 0], upscale_method="nearest-exact", scale_by=1.5)
    hires = g.add("KSampler", model=["probe", 0], positive=["1", 1], negative=["1", 2], latent_image=upscaled[0],
                  steps=3, **dict(KSAMPLER, denoise=0.5))
    g.add("HostTestLatentStats", "out_hires", samples=hires[0])
    H.run_prompt(g.prompt)
    first, second = summaries("probe")[-2:]
    assert first.tokens == {0: (256, 128)} and second.tokens == {0: (576, 288)}
    for run in (first, second):  # the hires run starts without a map: the first run's map never leaks into it
        assert run.evaluations_without_map == 1 and run.evaluations_with_map == 2 and run.fallbacks == []
    other_run = summaries("probe_b")[-1]
    assert other_run.tokens == {0: (256, 256 - int(256 * 0.3))} and other_run.maps_captured == 0
    assert latent("out_hires").shape[-2:] == (24, 24)


@pytest.mark.parametrize("width,height", [(72, 120), (136, 104)])
def test_latent_sizes_that_are_not_multiples(comfy, width, height):
    H.run_prompt(sample_graph(width=width, height=height).prompt)
    h, w = height // 8, width // 8
    n = h * w
    assert torch.isfinite(latent("out")).all() and latent("out").shape[-2:] == (h, w)
    run = summaries("probe")[-1]
    assert run.tokens == {0: (n, n - int(n * 0.5))} and run.evaluations_with_map == 3


def test_tiny_latent_passes_through(comfy):
    # 16x16 pixels: a 2x2 latent; at ratio 0.2 not even one of its 4 tokens can go (int(4 * 0.2) = 0)
    H.run_prompt(sample_graph(merge=dict(SIMPLE, ratio=0.2), width=16, height=16).prompt)
    run = summaries("probe")[-1]
    assert torch.isfinite(latent("out")).all()
    assert run.merged_calls == 0 and run.tokens == {}
    assert any("nothing to merge" in f for f in run.fallbacks)


def test_inpainting_model_with_mask(comfy):
    g = sample_graph(arch="sd15_inpaint")
    mask = g.add("SolidMask", value=1.0, width=128, height=128)
    masked = g.add("SetLatentNoiseMask", samples=g.prompt["sampler"]["inputs"]["latent_image"], mask=mask[0])
    g.prompt["sampler"]["inputs"]["latent_image"] = masked[0]
    H.run_prompt(g.prompt)
    assert {r["original_shape"][1] for r in records("probe")} == {9}  # 4 latent + 5 concat channels
    run = summaries("probe")[-1]
    assert run.evaluations_with_map == 3 and (128, 128) in token_counts()


def test_denoise_below_one_and_active_range(comfy):
    H.run_prompt(sample_graph(merge=dict(SIMPLE, start_percent=0.5), steps=6, denoise=0.8).prompt)
    run = summaries("probe")[-1]
    assert run.evaluations_inactive > 0 and run.evaluations_with_map + run.evaluations_without_map > 0
    assert run.evaluations_inactive + run.evaluations_with_map + run.evaluations_without_map == 6
    assert (256, 256) in token_counts() and (128, 128) in token_counts()


def test_merge_cross_attention_option(comfy):
    merge = dict(ADVANCED, merge_cross_attn=True)
    H.run_prompt(sample_graph(merge=merge, advanced=True).prompt)
    assert torch.isfinite(latent("out")).all()
    assert summaries("probe")[-1].evaluations_with_map == 3


@pytest.mark.parametrize("reuse,expected", [("level", 1), ("stage", 2), ("block", 5)])
def test_partition_reuse(comfy, monkeypatch, reuse, expected):
    """The tiny SD1.5 has SD1.5's 5 level-0 self-attention blocks (input 1-2, output 9-11): level shares one partition
    per evaluation, stage one for the down and one for the up blocks, block one each."""
    runtime_type = H.pack_module("nodes.unet").UNetRuntime
    made = []
    original = runtime_type._make_partition

    def counting(self, n, extra, *args):
        made.append((extra.get("sigmas").flatten()[0].item(), tuple(extra.get("block"))))
        return original(self, n, extra, *args)

    monkeypatch.setattr(runtime_type, "_make_partition", counting)
    H.run_prompt(sample_graph(merge=dict(ADVANCED, partition_reuse=reuse), advanced=True).prompt)
    blocks = {b for _, b in made}
    level0 = {(r["block"][0], r["block"][1]) for r in records("probe") if r["tokens"] == 128}
    assert level0 == {("input", 1), ("input", 2), ("output", 9), ("output", 10), ("output", 11)}, level0
    per_eval = {}
    for sigma, block in made:
        per_eval.setdefault(sigma, []).append(block)
    assert len(per_eval) == 4 and all(len(v) == expected for v in per_eval.values()), per_eval
    assert blocks <= level0 and len(blocks) == expected
    assert summaries("probe")[-1].evaluations_with_map == 3


def test_bad_settings_are_clear_errors(comfy):
    node = _nodes()["ITM_ImportanceTokenMergingAdvanced"]()
    model, _, _ = H.tiny_sd15_model()
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 0\.500\]"):
        node.patch(model, **dict(ADVANCED, ratio=0.6, dst_fraction=0.5, pool_scale=1.0))
    with pytest.raises(ValueError, match="start_percent <= end_percent"):
        node.patch(model, **dict(ADVANCED, start_percent=0.8, end_percent=0.2))
    with pytest.raises(ValueError, match="partition_reuse must be one of"):
        node.patch(model, **dict(ADVANCED, partition_reuse="never"))


def test_unsupported_model_passes_through_with_one_warning(comfy, caplog):
    import comfy.model_patcher

    caplog.set_level(logging.WARNING, logger="comfyui_importance_tome")
    module = torch.nn.Linear(4, 4)
    patcher = comfy.model_patcher.ModelPatcher(module, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    (out,) = _nodes()["ITM_ImportanceTokenMerging"]().patch(patcher, **SIMPLE)
    assert out is patcher
    warnings = [r for r in caplog.records if "not supported yet" in r.getMessage()]
    assert len(warnings) == 1 and "passing the model through unchanged" in warnings[0].getMessage()


def test_custom_sampler_with_guiders(comfy):
    if H.host_kind() != "modern":
        pytest.skip("SamplerCustomAdvanced and DualCFGGuider do not exist on the pinned 2024 host")
    g = Graph()
    tiny = g.add("HostTestTinyModel", arch="sd15", seed=0)
    ours = g.add("ITM_ImportanceTokenMerging", model=tiny[0], **SIMPLE)
    probe = g.add("HostTestAttnProbe", "probe", model=ours[0])
    empty = g.add("EmptyLatentImage", width=128, height=128, batch_size=1)
    noise = g.add("RandomNoise", noise_seed=1)
    sampler = g.add("KSamplerSelect", sampler_name="euler")
    sigmas = g.add("BasicScheduler", model=probe[0], scheduler="normal", steps=4, denoise=1.0)
    for guider_id, guider in (("cfg", g.add("CFGGuider", model=probe[0], positive=tiny[1], negative=tiny[2], cfg=5.0)),
                              ("dual", g.add("DualCFGGuider", model=probe[0], cond1=tiny[1], cond2=tiny[1],
                                             negative=tiny[2], cfg_conds=5.0, cfg_cond2_negative=2.0,
                                             style="regular"))):
        out = g.add("SamplerCustomAdvanced", noise=noise[0], guider=guider[0], sampler=sampler[0], sigmas=sigmas[0],
                    latent_image=empty[0])
        g.add("HostTestLatentStats", f"out_{guider_id}", samples=out[0])
    H.run_prompt(g.prompt)
    runs = summaries("probe")[-2:]
    assert len(runs) == 2 and all(run.evaluations_with_map == 3 for run in runs)
    assert torch.isfinite(latent("out_cfg")).all() and torch.isfinite(latent("out_dual")).all()


def test_lora_then_merging(comfy, tmp_path):
    import folder_paths

    model, _, _ = H.tiny_sd15_model()
    # 16 transformer blocks (6 down, 1 middle, 9 up) x to_q, to_k, to_v
    assert H.write_tiny_lora(model, str(tmp_path / "tiny_lora.safetensors")) == 48
    folder_paths.add_model_folder_path("loras", str(tmp_path))
    g = sample_graph()
    lora = g.add("LoraLoaderModelOnly", model=["1", 0], lora_name="tiny_lora.safetensors", strength_model=1.0)
    g.prompt["merge"]["inputs"]["model"] = lora[0]
    H.run_prompt(g.prompt)
    with_lora = latent("out").clone()
    H.run_prompt(sample_graph().prompt)
    assert not torch.equal(with_lora, latent("out"))  # the LoRA really applied under the merging patches
    run = summaries("probe")[-1]
    assert run.evaluations_with_map == 3 and (128, 128) in token_counts()


def test_sdxl_base_and_refiner(comfy):
    """Base and refiner each get their own merging node; KSamplerAdvanced hands over half-way."""
    g = Graph()
    base = g.add("HostTestTinyModel", arch="sdxl", seed=0)
    refiner = g.add("HostTestTinyModel", arch="sdxl_refiner", seed=1)
    base_model = g.add("ITM_ImportanceTokenMerging", model=base[0], **SIMPLE)
    refiner_model = g.add("ITM_ImportanceTokenMerging", model=refiner[0], **SIMPLE)
    probe_base = g.add("HostTestAttnProbe", "probe", model=base_model[0])
    probe_refiner = g.add("HostTestAttnProbe", "probe_refiner", model=refiner_model[0])
    empty = g.add("EmptyLatentImage", width=128, height=128, batch_size=1)
    common = dict(noise_seed=3, steps=6, cfg=5.0, sampler_name="euler", scheduler="normal")
    first = g.add("KSamplerAdvanced", model=probe_base[0], positive=base[1], negative=base[2], latent_image=empty[0],
                  add_noise="enable", start_at_step=0, end_at_step=3, return_with_leftover_noise="enable", **common)
    second = g.add("KSamplerAdvanced", model=probe_refiner[0], positive=refiner[1], negative=refiner[2],
                   latent_image=first[0], add_noise="disable", start_at_step=3, end_at_step=10000,
                   return_with_leftover_noise="disable", **common)
    g.add("HostTestLatentStats", "out", samples=second[0])
    H.run_prompt(g.prompt)
    assert torch.isfinite(latent("out")).all()
    base_run, refiner_run = summaries("probe")[-1], summaries("probe_refiner")[-1]
    assert base_run.tokens == {1: (64, 32)} and base_run.evaluations_with_map == 2
    # the refiner has no attention at latent resolution either: auto picks its level 1; its first step has no map
    assert refiner_run.tokens == {1: (64, 32)} and refiner_run.evaluations_without_map == 1
    assert refiner_run.evaluations_with_map == 2


def test_controlnet(comfy):
    g = sample_graph()
    control = g.add("HostTestTinyControlNet", seed=2)
    image = g.add("EmptyImage", width=128, height=128, batch_size=1, color=0x808080)
    applied = g.add("ControlNetApply", conditioning=["1", 1], control_net=control[0], image=image[0], strength=1.0)
    g.prompt["sampler"]["inputs"]["positive"] = applied[0]
    H.run_prompt(g.prompt)
    with_control = latent("out").clone()
    H.run_prompt(sample_graph().prompt)
    assert not torch.equal(with_control, latent("out"))  # the ControlNet really contributed
    assert torch.isfinite(with_control).all()
    run = summaries("probe")[-1]
    assert run.evaluations_with_map == 3 and (128, 128) in token_counts()


def test_ratio_zero_is_off(comfy, caplog):
    caplog.set_level(logging.INFO, logger="comfyui_importance_tome")
    model, _, _ = H.tiny_sd15_model()
    (out,) = _nodes()["ITM_ImportanceTokenMerging"]().patch(model, **dict(SIMPLE, ratio=0.0))
    assert out is model
    assert any("ratio 0, merging is off" in r.getMessage() for r in caplog.records)


def test_stable_zero123_views_get_their_own_maps(comfy):
    """Stable Zero123 generates a batch of independent views: each view is a sample with its own importance map."""
    H.run_prompt(sample_graph(arch="zero123", batch=3).prompt)
    calls = records("probe")
    assert {r["rows"] for r in calls} == {6} and {r["original_shape"][1] for r in calls} == {8}
    runtime = _nodes()["HostTestAttnProbe"].RUNTIMES["probe"]
    run = summaries("probe")[-1]
    assert run.evaluations_with_map == 3 and run.fallbacks == [] and (128, 128) in token_counts()
    if H.host_kind() == "old":  # the last run's state is still live there: its map has one row per view
        assert runtime.run.map.shape == (3, 16, 16)
        assert not torch.equal(runtime.run.map[0], runtime.run.map[1])


@pytest.mark.parametrize("arch,full,kept", [("sd15", 256, 128), ("sdxl", 64, 32)])
def test_queries_scope_merges_queries_and_keeps_every_key(comfy, arch, full, kept):
    """scope = queries: self-attention at the merged level gets N - r queries and all N keys and values (the built-in
    node's site); the image moves less than with queries, keys and values merged alike (same partitions)."""
    H.run_prompt(sample_graph(arch, merge=None).prompt)
    reference = latent("out").clone()
    drift = {}
    for scope in ("queries", "attention"):
        H.run_prompt(sample_graph(arch, merge=dict(SIMPLE, scope=scope)).prompt)
        drift[scope] = relative = float((latent("out") - reference).norm() / reference.norm())
        assert torch.isfinite(latent("out")).all() and 1e-6 < relative < 0.25, relative
        counts = token_counts()
        if scope == "queries":
            assert (kept, full) in counts and (kept, kept) not in counts
        else:
            assert (kept, kept) in counts and (kept, full) not in counts
        run = summaries("probe")[-1]
        assert run.tokens == {{"sd15": 0, "sdxl": 1}[arch]: (full, kept)} and run.evaluations_with_map == 3
    assert drift["queries"] < drift["attention"], drift


def test_auto_weighting_is_plain_means_at_the_queries_site(comfy):
    """weight_power / affinity left at "auto" (-1, the defaults): plain means (0 / 0.2) at the queries site, where
    they measured better, and the importance-weighted means (3 / 0.2) at the attention site, as before."""
    defaults = dict(SIMPLE, dst_fraction=0.25, pool_scale=1.2, dst_mode="grid", warmup_mode="merge",
                    cfg1_mode="random", merge_cross_attn=False, merge_seed=0)
    images = {}
    for scope in ("queries", "attention"):
        H.run_prompt(sample_graph(merge=dict(SIMPLE, scope=scope)).prompt)
        images[scope, "simple"] = latent("out").clone()
        for weighting in ((0.0, 0.2), (3.0, 0.2)):
            merge = dict(defaults, scope=scope, weight_power=weighting[0], affinity=weighting[1])
            H.run_prompt(sample_graph(merge=merge, advanced=True).prompt)
            assert summaries("probe")[-1].evaluations_with_map == 3
            images[scope, weighting] = latent("out").clone()
    assert torch.equal(images["queries", "simple"], images["queries", (0.0, 0.2)])
    assert torch.equal(images["attention", "simple"], images["attention", (3.0, 0.2)])
    for scope in ("queries", "attention"):  # the weighting does act at both sites
        assert float((images[scope, (0.0, 0.2)] - images[scope, (3.0, 0.2)]).abs().max()) > 1e-6, scope


@pytest.mark.parametrize("arch,full,kept", [("sd15", 256, 128), ("sdxl", 64, 32)])
def test_transformer_scope_runs_whole_stacks_on_merged_tokens(comfy, arch, full, kept):
    H.run_prompt(sample_graph(arch, merge=None).prompt)
    reference = latent("out").clone()
    H.run_prompt(sample_graph(arch, merge=STACK).prompt)
    merged = latent("out").clone()
    relative = float((merged - reference).norm() / reference.norm())
    assert torch.isfinite(merged).all() and 1e-5 < relative < 0.5, relative
    run = summaries("probe")[-1]
    assert run.evaluations_with_map == 3 and run.tokens == {{"sd15": 0, "sdxl": 1}[arch]: (full, kept)}
    # every block of the merged level, not only its first, sees the merged tokens in attention (and in its FFN)
    assert (kept, kept) in token_counts() and (full, full) not in token_counts()
    if arch == "sdxl":  # depth-2 stacks: both blocks of each stack at level 1 ran merged
        assert sum(r["tokens"] == kept for r in records("probe")) == 10 * 4  # 10 blocks x 4 steps


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_transformer_scope_keeps_every_block_update(comfy, arch):
    """Merging a few tokens must change the image a little, and less than merging more: the drift shrinks with the
    ratio. Regression: the 2024 host's blocks add their updates in place (``x += n``), which also changed the
    stack's merged input and cancelled every block update at the merged level, whatever the ratio (the demo model's
    images drifted by ~35% at ratio 0.01)."""
    H.run_prompt(sample_graph(arch, merge=None).prompt)
    reference = latent("out").clone()
    relative = {}
    for ratio in (0.02, 0.2):
        H.run_prompt(sample_graph(arch, merge=dict(STACK, ratio=ratio)).prompt)
        relative[ratio] = float((latent("out") - reference).norm() / reference.norm())
        assert summaries("probe")[-1].merged_calls > 0
    assert 1e-6 < relative[0.02] < 0.3 * relative[0.2], relative


def test_transformer_scope_is_removed_when_chained_and_leaves_input_alone(comfy):
    model, _, _ = H.tiny_sd15_model()
    node = _nodes()["ITM_ImportanceTokenMerging"]()
    (stacked,) = node.patch(model, **STACK)
    assert model.object_patches == {}
    assert len(stacked.object_patches) == 16  # every SpatialTransformer of the SD1.5 layout
    (attention,) = node.patch(stacked, **SIMPLE)
    assert attention.object_patches == {} and len(stacked.object_patches) == 16
