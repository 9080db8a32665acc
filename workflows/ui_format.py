"""ComfyUI's UI workflow format (what the browser saves) in both directions, from node schemas alone.

* :class:`WorkflowBuilder` writes UI-format JSON (used by build_examples.py to generate the shipped workflows).
* :func:`to_api_prompt` turns a UI workflow into the API format that ComfyUI's executor runs, the way the frontend
  does: links become ``[node_id, slot]``, widget values are assigned to the widget inputs in schema order (skipping
  the frontend's extra "control after generate" value of ``seed`` / ``noise_seed``), bypassed nodes (mode 4) pass
  their first input of a matching type through, muted nodes (mode 2) are dropped.

Schemas are ``INPUT_TYPES()`` dicts as V1 nodes return them (current ComfyUI returns the same for V3 nodes).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
CONTROL_AFTER_GENERATE = ("seed", "noise_seed")


def _spec_type(spec) -> object:
    return spec[0] if isinstance(spec, (list, tuple)) and spec else spec


def is_widget(spec) -> bool:
    kind = _spec_type(spec)
    if isinstance(kind, (list, tuple)):
        return True  # a combo: the list of options
    if kind not in WIDGET_TYPES:
        return False
    options = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
    return not options.get("forceInput", False)


def has_control_widget(name: str, spec) -> bool:
    options = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
    return _spec_type(spec) == "INT" and (options.get("control_after_generate") or name in CONTROL_AFTER_GENERATE)


def ordered_inputs(input_types: dict) -> List[Tuple[str, object]]:
    """(name, spec) of required then optional inputs, in declaration order."""
    items = []
    for section in ("required", "optional"):
        items += list((input_types.get(section) or {}).items())
    return items


def widget_slots(input_types: dict) -> List[Optional[str]]:
    """The input name of each ``widgets_values`` entry; ``None`` for a control-after-generate value."""
    slots: List[Optional[str]] = []
    for name, spec in ordered_inputs(input_types):
        if is_widget(spec):
            slots.append(name)
            if has_control_widget(name, spec):
                slots.append(None)
    return slots


def link_inputs(input_types: dict) -> List[Tuple[str, str]]:
    """(name, type) of the inputs drawn as sockets."""
    return [(name, _spec_type(spec)) for name, spec in ordered_inputs(input_types) if not is_widget(spec)]


class WorkflowBuilder:
    """Build a UI-format workflow from node schemas: ``add`` nodes with widget values, ``link`` outputs to inputs."""

    def __init__(self, schema: Callable[[str], Tuple[dict, tuple, tuple]]):
        self.schema = schema  # class_type -> (INPUT_TYPES(), RETURN_TYPES, RETURN_NAMES)
        self.nodes: List[dict] = []
        self.links: List[list] = []

    def add(self, class_type: str, pos: Tuple[int, int], title: Optional[str] = None, **widgets) -> dict:
        input_types, return_types, return_names = self.schema(class_type)
        values = []
        for name in widget_slots(input_types):
            if name is None:
                values.append("fixed")
            elif name in widgets:
                values.append(widgets.pop(name))
            else:
                spec = dict(ordered_inputs(input_types))[name]
                options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if "default" not in options and isinstance(_spec_type(spec), (list, tuple)):
                    options = {"default": _spec_type(spec)[0]}
                values.append(options["default"])
        if widgets:
            raise ValueError(f"{class_type} has no widget(s) {sorted(widgets)}")
        node = {
            "id": len(self.nodes) + 1, "type": class_type, "pos": list(pos), "size": [320, 60 + 26 * len(values)],
            "flags": {}, "order": len(self.nodes), "mode": 0,
            "inputs": [{"name": n, "type": t, "link": None} for n, t in link_inputs(input_types)],
            "outputs": [{"name": (return_names[i] if return_names else t), "type": t, "links": [], "slot_index": i}
                        for i, t in enumerate(return_types)],
            "properties": {"Node name for S&R": class_type},
            "widgets_values": values,
        }
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node

    def link(self, source: dict, slot: int, target: dict, input_name: str) -> None:
        link_id = len(self.links) + 1
        target_slot = next(i for i, inp in enumerate(target["inputs"]) if inp["name"] == input_name)
        kind = source["outputs"][slot]["type"]
        target["inputs"][target_slot]["link"] = link_id
        source["outputs"][slot]["links"].append(link_id)
        self.links.append([link_id, source["id"], slot, target["id"], target_slot, kind])

    def workflow(self, note: str = "") -> dict:
        extra = {"ds": {"scale": 1, "offset": [0, 0]}}
        if note:
            extra["note"] = note
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {}, "extra": extra, "version": 0.4}


def to_api_prompt(workflow: dict, input_types_of: Callable[[str], dict]) -> Dict[str, dict]:
    """Convert a UI workflow to an API prompt ``{node_id: {"class_type", "inputs"}}``."""
    nodes = {node["id"]: node for node in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}

    def source_of(node: dict, input_index: int):
        link_id = node["inputs"][input_index].get("link")
        if link_id is None:
            return None
        _, origin, slot, _, _, kind = links[link_id]
        origin_node = nodes[origin]
        if origin_node.get("mode") == 4:  # bypassed: pass the first input of the same type through
            for index, inp in enumerate(origin_node.get("inputs", [])):
                if inp.get("type") == kind:
                    return source_of(origin_node, index)
            return None
        return [str(origin), slot]

    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (2, 4):
            continue
        input_types = input_types_of(node["type"])
        inputs = {}
        for name, value in zip(widget_slots(input_types), node.get("widgets_values") or []):
            if name is not None:
                inputs[name] = value
        for index, inp in enumerate(node.get("inputs", [])):
            source = source_of(node, index)
            if source is not None:
                inputs[inp["name"]] = source
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
