"""The pack loads as a real custom node and one of its nodes runs inside a real ComfyUI prompt."""
import comfy_harness as H


def _prompt(arch="sd15", merge=True, ratio=0.5):
    prompt = {
        "1": {"class_type": "HostTestTinyModel", "inputs": {"arch": arch, "seed": 0}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {
            "model": ["5", 0] if merge else ["1", 0], "positive": ["1", 1], "negative": ["1", 2],
            "latent_image": ["2", 0], "seed": 42, "steps": 3, "cfg": 5.0, "sampler_name": "euler",
            "scheduler": "normal", "denoise": 1.0}},
        "4": {"class_type": "HostTestLatentStats", "inputs": {"samples": ["3", 0]}},
    }
    if merge:
        prompt["5"] = {"class_type": "ITM_ImportanceTokenMerging", "inputs": {
            "model": ["1", 0], "ratio": ratio, "importance": "cfg", "start_percent": 0.0, "end_percent": 1.0,
            "levels": "auto", "scope": "attention"}}
    return prompt


def test_pack_registers_its_nodes(comfy):
    import nodes

    assert sorted(comfy["pack_nodes"]) == ["ITM_DemoDiTModelLoader", "ITM_DemoHunyuanModelLoader",
                                           "ITM_DemoLTXVModelLoader", "ITM_DemoModelLoader",
                                           "ITM_DemoVideoModelLoader", "ITM_ImportanceTokenMerging", "ITM_ImportanceTokenMergingAdvanced",
                                           "ITM_MergePreview"]
    for name in comfy["pack_nodes"]:
        assert name in nodes.NODE_CLASS_MAPPINGS
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[name].startswith(("Importance Token Merging", "Load Demo",
                                                                  "Token Merging Preview"))
        spec = nodes.NODE_CLASS_MAPPINGS[name].INPUT_TYPES()
        for section in ("required", "optional"):  # every input has a tooltip
            for input_name, value in (spec.get(section) or {}).items():
                assert value[1].get("tooltip"), f"{name}.{input_name} has no tooltip"


def test_prompt_with_pack_node_runs(comfy, record_property):
    record_property("comfy_host", comfy["host"])
    ui = H.run_prompt(_prompt())
    stats = ui["4"]["latent_stats"][0]
    assert stats["shape"] == [1, 4, 16, 16] and stats["finite"]
    merged = H.pack_module("nodes.unet")
    assert merged.KEY == "importance_tome"


def test_invalid_ratio_is_rejected_by_validation(comfy):
    bad = _prompt(ratio=0.9)
    try:
        H.run_prompt(bad)
    except H.PromptError as err:
        assert "ratio" in str(err)
    else:
        raise AssertionError("a ratio above the node's maximum must not validate")
