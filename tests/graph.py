"""A tiny builder for ComfyUI API-format prompts: ``g.add("KSampler", model=m, ...)`` returns the node's outputs."""
from __future__ import annotations


class Graph:
    def __init__(self):
        self.prompt = {}

    def add(self, class_type: str, node_id: str = None, **inputs):
        """Add a node; returns an :class:`Out` whose ``[i]`` is the link to output ``i``."""
        node_id = node_id or str(len(self.prompt) + 1)
        self.prompt[node_id] = {"class_type": class_type, "inputs": dict(inputs)}
        return Out(node_id)


class Out:
    def __init__(self, node_id: str):
        self.id = node_id

    def __getitem__(self, index: int):
        return [self.id, index]
