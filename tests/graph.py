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


def node_classes():
    """ComfyUI's registered node classes (the booted host's ``nodes.NODE_CLASS_MAPPINGS``)."""
    import nodes

    return nodes.NODE_CLASS_MAPPINGS


def latent(node_id="out"):
    """The latent a HostTestLatentStats node received in the last run."""
    return node_classes()["HostTestLatentStats"].LAST[node_id]


def records(node_id="probe"):
    """What a HostTestAttnProbe saw in self-attention."""
    return node_classes()["HostTestAttnProbe"].RECORDS[node_id]


def last_run(node_id="probe", probe="HostTestAttnProbe"):
    """The summary of the last sampling run of the merging runtime a probe node (HostTestAttnProbe, or
    HostTestRuntimeProbe for models whose attention patches have another signature) found on its model."""
    runtime = node_classes()[probe].RUNTIMES[node_id]
    assert runtime is not None, "the probe found no importance-merging runtime on the model"
    return runtime.summaries()[-1]


def force_split_calls(monkeypatch) -> None:
    """Make ComfyUI believe memory is short, so it evaluates cond and uncond of a step in separate model calls (its
    low-memory layout) for the rest of the test."""
    import comfy.model_management as mm

    monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: (1, 1) if torch_free_too else 1)
