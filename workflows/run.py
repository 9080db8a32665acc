"""Main job: run an example workflow headlessly through real ComfyUI, with and without importance token merging.

    python workflows/run.py [--workflow workflows/sd15_txt2img.json] [--out output/demo] [--size N] [--steps N]

The workflow (UI JSON, as saved by ComfyUI) is converted to the API format and executed by ComfyUI's own
PromptExecutor on the pinned host (or the first root in COMFYUI_PATH). It runs twice: as saved, and with the
Importance Token Merging node bypassed; both images are saved by the workflow's SaveImage node into --out, and one
timing line compares the two sampling runs.

Model: if the workflow's checkpoint is not installed in that ComfyUI (no weights can be downloaded here), a small
stand-in is built in place: a small SD1.5-architecture UNet made by ComfyUI's own classes with random initialised
weights, a deterministic text-embedding stand-in for CLIP and a linear latent-to-RGB stand-in for the VAE. It shows
the pipeline and the merging at work, not a pretty picture; it is replaced by the model the project trains.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, HERE)

from ui_format import to_api_prompt  # noqa: E402

log = logging.getLogger("importance_tome.demo")
STAND_IN = "ITMDemo_StandInCheckpoint"
CONTEXT_DIM = 64


class StandInCLIP:
    """Deterministic text → [1, 77, CONTEXT_DIM] embedding (hash-seeded), with the CLIP methods the nodes call."""

    def tokenize(self, text, **_):
        return text

    def _embed(self, text):
        import torch

        seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(1, 77, CONTEXT_DIM, generator=generator), torch.randn(1, CONTEXT_DIM, generator=generator)

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        cond, pooled = self._embed(tokens)
        if return_dict:
            return {"cond": cond, "pooled_output": pooled}
        return (cond, pooled) if return_pooled else cond

    def encode_from_tokens_scheduled(self, tokens, **_):
        cond, pooled = self._embed(tokens)
        return [[cond, {"pooled_output": pooled}]]


class StandInVAE:
    """Latent → RGB with SD1.5's linear preview factors, upsampled 8×, normalised per image."""

    FACTORS = [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]]

    def decode(self, samples):
        import torch

        rgb = torch.einsum("bchw,cr->bhwr", samples.float().cpu(), torch.tensor(self.FACTORS))
        rgb = (rgb - rgb.mean(dim=(1, 2, 3), keepdim=True)) / (rgb.std(dim=(1, 2, 3), keepdim=True) + 1e-6)
        rgb = torch.sigmoid(rgb * 1.5)
        return rgb.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2)


class StandInCheckpoint:
    """MODEL, CLIP, VAE stand-ins (registered by this script only; not a node of the pack)."""

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "demo"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": ("STRING", {"default": ""})}}

    def load(self, ckpt_name):
        import comfy_harness

        model, _, _ = comfy_harness.tiny_sd15_model(seed=0, model_channels=64, context_dim=CONTEXT_DIM)
        return model, StandInCLIP(), StandInVAE()


def _use_stand_in(prompt: dict, size: int, steps: int) -> bool:
    import folder_paths

    available = set(folder_paths.get_filename_list("checkpoints"))
    replaced = False
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple" and node["inputs"].get("ckpt_name") not in available:
            node["class_type"] = STAND_IN
            replaced = True
    if replaced:
        for node in prompt.values():
            if node["class_type"] == "EmptyLatentImage":
                node["inputs"].update(width=size, height=size)
            if node["class_type"] == "KSampler":
                node["inputs"]["steps"] = steps
    return replaced


def _bypass_merging(prompt: dict) -> dict:
    """The same prompt with every ITM_ node bypassed (its model input wired straight through)."""
    bypassed = json.loads(json.dumps(prompt))
    merging = {nid: node for nid, node in bypassed.items() if node["class_type"].startswith("ITM_")}
    for nid, node in merging.items():
        source = node["inputs"]["model"]
        del bypassed[nid]
        for other in bypassed.values():
            for name, value in other["inputs"].items():
                if isinstance(value, list) and value[:1] == [nid]:
                    other["inputs"][name] = source
    return bypassed


def _set_prefix(prompt: dict, prefix: str) -> None:
    for node in prompt.values():
        if node["class_type"] == "SaveImage":
            node["inputs"]["filename_prefix"] = prefix


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workflow", default=os.path.join(HERE, "sd15_txt2img.json"))
    parser.add_argument("--out", default=os.path.join(REPO, "output", "demo"))
    parser.add_argument("--size", type=int, default=384, help="image size when the stand-in model is used")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps when the stand-in model is used")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import comfy_harness

    root = (os.environ.get("COMFYUI_PATH") or "").split(os.pathsep)[0] or comfy_harness.pinned_host_root()
    info = comfy_harness.boot_with_pack(root, REPO)
    logging.getLogger().setLevel(logging.INFO)
    import folder_paths
    import nodes

    nodes.NODE_CLASS_MAPPINGS[STAND_IN] = StandInCheckpoint
    os.makedirs(args.out, exist_ok=True)
    folder_paths.set_output_directory(os.path.abspath(args.out))
    with open(args.workflow, encoding="utf-8") as handle:
        workflow = json.load(handle)
    merged = to_api_prompt(workflow, lambda t: nodes.NODE_CLASS_MAPPINGS[t].INPUT_TYPES())
    if not any(node["class_type"].startswith("ITM_") for node in merged.values()):
        raise SystemExit(f"{args.workflow} has no Importance Token Merging node")
    stand_in = _use_stand_in(merged, args.size, args.steps)
    plain = _bypass_merging(merged)
    _set_prefix(merged, "merged")
    _set_prefix(plain, "unmerged")

    timings = {}
    for name, prompt in (("unmerged", plain), ("merged", merged)):
        start = time.perf_counter()
        comfy_harness.run_prompt(prompt)
        timings[name] = time.perf_counter() - start
    files = sorted(os.listdir(args.out))
    log.info("host %s; workflow %s; model: %s", info["host"], os.path.basename(args.workflow),
             "stand-in (checkpoint not installed)" if stand_in else "checkpoint")
    log.info("images in %s: %s", args.out, ", ".join(f for f in files if f.endswith(".png")))
    log.info("timing (whole prompt, CPU): unmerged %.2f s, merged %.2f s, ratio %.2fx", timings["unmerged"],
             timings["merged"], timings["unmerged"] / timings["merged"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
