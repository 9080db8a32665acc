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


def _class(name):
    import nodes

    assert name in nodes.NODE_CLASS_MAPPINGS, f"node type {name} is not registered on this host"
    return nodes.NODE_CLASS_MAPPINGS[name]


def test_there_are_workflows_for_each_image_use():
    names = {os.path.basename(p) for p in WORKFLOWS}
    assert {"sd15_txt2img.json", "sdxl_txt2img.json", "sd15_hires_fix.json", "sd15_img2img.json"} <= names


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_workflow_matches_registered_schemas(comfy, path):
    with open(path, encoding="utf-8") as handle:
        workflow = json.load(handle)
    nodes_by_id = {node["id"]: node for node in workflow["nodes"]}
    assert any(node["type"].startswith("ITM_") for node in workflow["nodes"])
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

    with open(path, encoding="utf-8") as handle:
        workflow = json.load(handle)
    prompt = to_api_prompt(workflow, lambda t: _class(t).INPUT_TYPES())
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            (tmp_path / node["inputs"]["ckpt_name"]).write_bytes(b"")
    folder_paths.add_model_folder_path("checkpoints", str(tmp_path))
    open(os.path.join(folder_paths.get_input_directory(), "example.png"), "wb").close()
    H.validate_prompt(prompt)
