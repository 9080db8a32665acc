"""The shipped example workflows match the node schemas registered in the running ComfyUI, and validate."""
import glob
import json
import os
import sys

import pytest

import comfy_harness as H

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "workflows"))
from ui_format import link_inputs, to_api_prompt, widget_slots  # noqa: E402

WORKFLOWS = sorted(glob.glob(os.path.join(REPO, "workflows", "*.json")))
# node types of third-party packs that some workflows use (prefix -> pack); only these may be missing on a host
THIRD_PARTY = {"ADE_": "ComfyUI-AnimateDiff-Evolved"}
# workflows of model families that only current ComfyUI has (WAN): skipped with the reason on the 2024 host
CURRENT_ONLY = {"demo_video.json", "wan21_t2v.json", "wan22_i2v.json", "hunyuan_t2v.json", "flux_dev_t2i.json",
                "demo_dit.json", "sd35_t2i.json", "qwen_image_t2i.json", "zimage_turbo_t2i.json",
                "pixart_sigma_t2i.json", "ltxv_t2v.json"}


def _class(name):
    import nodes

    assert name in nodes.NODE_CLASS_MAPPINGS, f"node type {name} is not registered on this host"
    return nodes.NODE_CLASS_MAPPINGS[name]


def _require_node_types(workflow):
    """Skip a workflow whose third-party node types are not registered here (after trying to load their pack).

    Core and this pack's node types are never skipped: a missing one fails in :func:`_class`.
    """
    import nodes

    if workflow.get("_name") in CURRENT_ONLY and H.host_kind() != "modern":
        pytest.skip(f"{workflow['_name']} uses DiT nodes (CLIPLoader type wan, DualCLIPLoader type flux, "
                    "EmptyHunyuanLatentVideo, WanImageToVideo, CreateVideo, ConditioningZeroOut) or models that the "
                    "2024 host does not have")
    types = {node["type"] for node in workflow["nodes"]}
    needed = {prefix: pack for prefix, pack in THIRD_PARTY.items() if any(t.startswith(prefix) for t in types)}
    reasons = []
    if "ADE_" in needed and not any(t.startswith("ADE_") for t in nodes.NODE_CLASS_MAPPINGS):
        from test_animatediff import Unavailable, load_ade  # finds and loads ADE once per process

        try:
            load_ade()
        except Unavailable as err:
            reasons.append(str(err))
    missing = sorted(t for t in types if t.startswith(tuple(needed)) and t not in nodes.NODE_CLASS_MAPPINGS)
    if missing:
        packs = sorted({pack for prefix, pack in needed.items() if any(t.startswith(prefix) for t in missing)})
        pytest.skip(f"uses node types of {', '.join(packs)} that are not registered on this host "
                    f"({', '.join(missing)})" + (f": {'; '.join(reasons)}" if reasons else ""))


def test_there_are_workflows_for_each_image_use():
    names = {os.path.basename(p) for p in WORKFLOWS}
    assert {"sd15_txt2img.json", "sdxl_txt2img.json", "sd15_hires_fix.json", "sd15_img2img.json", "demo_fashion.json",
            "svd_img2vid.json", "sv3d_orbit.json", "stable_zero123.json", "sd15_animatediff.json"} <= names
    assert CURRENT_ONLY <= names


def _load(path):
    with open(path, encoding="utf-8") as handle:
        workflow = json.load(handle)
    workflow["_name"] = os.path.basename(path)
    return workflow


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_workflow_matches_registered_schemas(comfy, path):
    workflow = _load(path)
    nodes_by_id = {node["id"]: node for node in workflow["nodes"]}
    assert any(node["type"].startswith("ITM_") for node in workflow["nodes"])
    _require_node_types(workflow)
    for node in workflow["nodes"]:
        cls = _class(node["type"])
        input_types = cls.INPUT_TYPES()
        assert len(node["widgets_values"]) == len(widget_slots(input_types)), node["type"]
        assert [(i["name"], i["type"]) for i in node["inputs"]] == link_inputs(input_types), node["type"]
        assert [o["type"] for o in node["outputs"]] == list(cls.RETURN_TYPES), node["type"]
    for link_id, origin, slot, target, target_slot, kind in workflow["links"]:
        assert nodes_by_id[origin]["outputs"][slot]["type"] == kind
        assert nodes_by_id[target]["inputs"][target_slot]["type"] == kind
        assert nodes_by_id[target]["inputs"][target_slot]["link"] == link_id


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_workflow_validates_in_comfyui(comfy, path, tmp_path):
    """Converted to the API format, the workflow passes ComfyUI's own validate_prompt (model files stubbed)."""
    import folder_paths

    workflow = _load(path)
    _require_node_types(workflow)
    prompt = to_api_prompt(workflow, lambda t: _class(t).INPUT_TYPES())
    model_files = {"CheckpointLoaderSimple": ("checkpoints", "ckpt_name"),
                   "ImageOnlyCheckpointLoader": ("checkpoints", "ckpt_name"),
                   "ADE_LoadAnimateDiffModel": ("animatediff_models", "model_name"),
                   "UNETLoader": ("diffusion_models", "unet_name"), "CLIPLoader": ("text_encoders", "clip_name"),
                   "DualCLIPLoader": ("text_encoders", "clip_name1", "clip_name2"),
                   "TripleCLIPLoader": ("text_encoders", "clip_name1", "clip_name2", "clip_name3"),
                   "VAELoader": ("vae", "vae_name")}  # (folder, input): stubbed
    for node in prompt.values():
        if node["class_type"] in model_files:
            folder, *names = model_files[node["class_type"]]
            (tmp_path / folder).mkdir(exist_ok=True)
            for name in names:
                (tmp_path / folder / node["inputs"][name]).write_bytes(b"")
            folder_paths.add_model_folder_path(folder, str(tmp_path / folder))
    open(os.path.join(folder_paths.get_input_directory(), "example.png"), "wb").close()
    H.validate_prompt(prompt)
