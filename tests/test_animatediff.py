"""AnimateDiff-Evolved (ADE) with the pack, through a real current ComfyUI.

ADE is a third-party custom node pack: it is loaded into the booted host next to this pack, the way ComfyUI loads
custom nodes. It is found through

* ``ITM_ADE_PATH``: a work tree of ComfyUI-AnimateDiff-Evolved, used as it is (nothing is written into it), or
* a bare git directory of it (``ITM_ADE_GIT_DIR``, by default the snapshot of this machine's mirror), written once per
  test session into a temporary folder (``shared/tools/tree-from-git`` when present, else ``git archive``).

No motion model can be downloaded here: ``shared/tools/make-motion-model`` writes an AnimateDiff v3 motion model with
random weights (built by ADE's own classes, SD1.5's real channel widths), so the UNet is a full-width SD1.5 UNet with
random weights (``HostTestFullSD15``), run at 64x64 pixels (8x8 latents), few frames and 2 steps to stay fast on CPU.

What is checked: ADE's evolved sampling and context windows run with the pack's merging; every window is merged with
the importance-map rows of its own frames (ADE puts ``ad_params = {"full_length", "context_length", "sub_idxs"}`` in
``transformer_options``; the map is captured by the post-cfg hook on the full latent). ADE needs current ComfyUI: on
the pinned 2024 host these tests are skipped.
"""
from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

import comfy_harness as H
from graph import Graph, last_run, latent, node_classes, records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("ITM_SHARED_DIR") or os.path.join(os.path.dirname(REPO), "shared")
ADE_DIR_NAME = "ComfyUI-AnimateDiff-Evolved"
DEFAULT_ADE_GIT_DIR = "/work/.mirror/Kosinkadink+ComfyUI-AnimateDiff-Evolved/repo"
MOTION_MODEL = "itm_test_mm_v3.safetensors"
SIMPLE = dict(ratio=0.5, importance="cfg", start_percent=0.0, end_percent=1.0, levels="auto", scope="attention")
FRAMES = 5  # with the windows below: [0-3] and [1-4] (uniform, length 4), [0-2] and [2-4] (static, length 3)

_ADE: dict = {}  # this process's ADE: {"path", "nodes"} once loaded, or {"reason"} once it could not be


class Unavailable(Exception):
    """ADE (or what a test needs with it) is not available here; the message says why."""


# --------------------------------------------------------------------------------------------- finding and loading ADE

def _ade_tree(scratch: str) -> str:
    """A work tree of ADE: ``ITM_ADE_PATH``, else one written from the git directory into ``scratch``."""
    path = os.environ.get("ITM_ADE_PATH")
    if path:
        if not os.path.isfile(os.path.join(path, "__init__.py")):
            raise Unavailable(f"ITM_ADE_PATH={path} is not a ComfyUI-AnimateDiff-Evolved work tree (no __init__.py)")
        return os.path.abspath(path)
    git_dir = os.environ.get("ITM_ADE_GIT_DIR") or DEFAULT_ADE_GIT_DIR
    if not os.path.isdir(git_dir):
        raise Unavailable("ComfyUI-AnimateDiff-Evolved not found: set ITM_ADE_PATH to a work tree of it (or "
                          f"ITM_ADE_GIT_DIR to a git directory of it; {git_dir} does not exist)")
    dest = os.path.join(scratch, ADE_DIR_NAME)  # ADE's own folder name, as in ComfyUI's custom_nodes
    tool = os.path.join(SHARED, "tools", "tree-from-git")
    try:
        if os.path.isfile(tool):
            subprocess.run(["bash", tool, git_dir, dest], check=True, capture_output=True, timeout=120)
        else:
            os.makedirs(dest)
            archive = subprocess.run(["git", "--git-dir", git_dir, "archive", "HEAD"], check=True,
                                     capture_output=True, timeout=120).stdout
            subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True, capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as err:
        raise Unavailable(f"could not write an ADE work tree from {git_dir}: {err}") from err
    if not os.path.isfile(os.path.join(dest, "__init__.py")):
        raise Unavailable(f"the ADE work tree written from {git_dir} has no __init__.py")
    return dest


def load_ade() -> dict:
    """Load ADE into the booted host once per process; returns {"path", "nodes"} or raises :class:`Unavailable`."""
    if "reason" in _ADE:
        raise Unavailable(_ADE["reason"])
    if "nodes" in _ADE:
        return _ADE
    try:
        if H.host_kind() != "modern":
            raise Unavailable("AnimateDiff-Evolved needs current ComfyUI (wrappers, hooks); the pinned 2024 host "
                              "cannot run it (set COMFYUI_PATH to a current ComfyUI)")
        scratch = tempfile.mkdtemp(prefix="itm-ade-")
        atexit.register(shutil.rmtree, scratch, True)  # ADE's modules are imported by then
        path = _ade_tree(scratch)
        _ADE.update(path=path, nodes=_load_into_host(path, scratch))
        return _ADE
    except Unavailable as err:
        _ADE["reason"] = str(err)
        raise


def _load_into_host(path: str, scratch: str) -> list:
    import folder_paths

    class Records(logging.Handler):
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage() + (f"\n{record.exc_text or ''}" if record.exc_info else ""))

    records = Records()
    root = logging.getLogger()
    # ADE registers (and creates) <models_dir>/animatediff_models on import: point it at a scratch folder, never at
    # the host tree
    models_dir = folder_paths.models_dir
    folder_paths.models_dir = os.path.join(scratch, "models")
    os.makedirs(folder_paths.models_dir, exist_ok=True)
    root.addHandler(records)
    try:
        new_nodes = H.load_pack(path)
    except RuntimeError as err:
        text = "\n".join(records.messages)
        missing = sorted(set(re.findall(r"No module named '([^']+)'", text)))
        if missing:
            raise Unavailable(f"AnimateDiff-Evolved at {path} needs Python packages that are not installed: "
                              f"{', '.join(missing)}") from err
        last = text.strip().splitlines()[-1:] or [str(err)]
        raise Unavailable(f"AnimateDiff-Evolved at {path} failed to load: {last[0]}") from err
    finally:
        root.removeHandler(records)
        folder_paths.models_dir = models_dir
    needed = {"ADE_LoadAnimateDiffModel", "ADE_ApplyAnimateDiffModelSimple", "ADE_UseEvolvedSampling",
              "ADE_StandardUniformContextOptions", "ADE_StandardStaticContextOptions"}
    if not needed <= set(new_nodes):
        raise Unavailable(f"AnimateDiff-Evolved at {path} did not register {sorted(needed - set(new_nodes))}")
    return new_nodes


def make_motion_model(directory: str) -> str:
    """Write a random-weight AnimateDiff v3 motion model (SD1.5) with the shared tool; returns its path."""
    tool = os.path.join(SHARED, "tools", "make-motion-model")
    if not os.path.isfile(tool):
        raise Unavailable(f"no motion model can be made: {tool} is missing (set ITM_SHARED_DIR to the shared folder)")
    import folder_paths

    # the tool imports ComfyUI and ADE from the root it is given, and ADE creates folders under <root>/models on
    # import: give it a scratch copy of the host tree (about 18 MB), never the host tree itself
    host_copy = os.path.join(directory, "host")
    shutil.copytree(os.path.dirname(os.path.abspath(folder_paths.__file__)), host_copy, symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    out = os.path.join(directory, "models", MOTION_MODEL)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    try:
        done = subprocess.run([sys.executable, tool, host_copy, _ADE["path"], out], check=False, capture_output=True,
                              text=True, timeout=600, env=env)
    finally:
        shutil.rmtree(host_copy, ignore_errors=True)
    if done.returncode != 0 or not os.path.isfile(out):
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        raise Unavailable(f"make-motion-model failed (exit {done.returncode}): {' | '.join(tail)}")
    return out


# --------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def ade(comfy):
    try:
        return load_ade()
    except Unavailable as err:
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def motion_model(ade, tmp_path_factory):
    """The motion model file, registered in ComfyUI's ``animatediff_models`` folder; deleted after the session."""
    import folder_paths

    directory = tmp_path_factory.mktemp("motion")
    try:
        path = make_motion_model(str(directory))
    except Unavailable as err:
        pytest.skip(str(err))
    folder_paths.add_model_folder_path("animatediff_models", os.path.dirname(path))  # after ADE set its extensions
    yield os.path.basename(path)
    os.remove(path)  # 1.7 GB


@pytest.fixture(scope="module", autouse=True)
def _free_full_model():
    """Drop the full-width SD1.5 UNet (3.4 GB) once this module's tests are done."""
    yield
    test_nodes = getattr(sys.modules.get("nodes"), "NODE_CLASS_MAPPINGS", {})
    if "HostTestFullSD15" in test_nodes:
        test_nodes["HostTestFullSD15"].CACHE.clear()
        import comfy.model_management

        comfy.model_management.unload_all_models()




@pytest.fixture
def map_log(comfy, monkeypatch):
    """Every importance-map lookup of the pack: dict(ad_params (copied; None when absent), rows used, full map)."""
    unet = H.pack_module("nodes.unet")
    original = unet.UNetRuntime.map_rows
    log = []

    def recording(self, samples, height, width, extra):
        result = original(self, samples, height, width, extra)
        params = extra.get("ad_params")
        if params is not None:  # ADE mutates the dict from window to window: keep what this call saw
            params = dict(params, sub_idxs=None if params.get("sub_idxs") is None else list(params["sub_idxs"]))
        log.append(dict(ad_params=params, samples=samples, rows=None if result is None else result.clone(),
                        full=self.run.map.clone()))
        return result

    monkeypatch.setattr(unet.UNetRuntime, "map_rows", recording)
    return log


def ade_graph(model_name, frames=FRAMES, context=None, merge=SIMPLE, steps=2, cfg=5.0,
              node="ITM_ImportanceTokenMerging"):
    """Full-width SD1.5 -> ADE (motion model, optional context options, evolved sampling) -> merge -> KSampler."""
    g = Graph()
    sd = g.add("HostTestFullSD15", seed=0)
    motion = g.add("ADE_LoadAnimateDiffModel", model_name=model_name)
    m_models = g.add("ADE_ApplyAnimateDiffModelSimple", motion_model=motion[0])
    options = {}
    if context is not None:
        schedule, length, overlap = context
        if schedule == "uniform":
            ctx = g.add("ADE_StandardUniformContextOptions", context_length=length, context_stride=1,
                        context_overlap=overlap)
        else:
            ctx = g.add("ADE_StandardStaticContextOptions", context_length=length, context_overlap=overlap)
        options["context_options"] = ctx[0]
    model = g.add("ADE_UseEvolvedSampling", model=sd[0], beta_schedule="autoselect", m_models=m_models[0],
                  **options)[0]
    if merge is not None:
        model = g.add(node, "merge", model=model, **merge)[0]
    probe = g.add("HostTestAttnProbe", "probe", model=model)
    empty = g.add("EmptyLatentImage", width=64, height=64, batch_size=frames)
    sampled = g.add("KSampler", "sampler", model=probe[0], positive=sd[1], negative=sd[2], latent_image=empty[0],
                    seed=3, steps=steps, cfg=cfg, sampler_name="euler", scheduler="normal", denoise=1.0)
    g.add("HostTestLatentStats", "out", samples=sampled[0])
    return g


def _check_run(frames):
    out = latent()
    assert out.shape == (frames, 4, 8, 8) and torch.isfinite(out).all()
    run = last_run()
    assert run.fallbacks == [], run.fallbacks
    assert run.tokens == {0: (64, 32)} and run.merged_calls > 0
    assert run.maps_captured == 2 and run.evaluations_with_map == 1  # the post-cfg hook saw every evaluation
    return run


# --------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("context", [("uniform", 4, 2), ("static", 3, 1)], ids=["uniform-4-2", "static-3-1"])
def test_context_windows_use_their_frames_rows(comfy, motion_model, map_log, context):
    """ADE context windows: each window's model call is merged with the map rows of its own frames (sub_idxs)."""
    H.run_prompt(ade_graph(motion_model, context=context).prompt)
    _check_run(FRAMES)
    used = [entry for entry in map_log if entry["rows"] is not None]
    assert used, "no importance map was used"
    windows = set()
    for entry in used:
        params = entry["ad_params"]
        assert params is not None, "ad_params is not visible in the attention patches"
        assert params["full_length"] == FRAMES and entry["full"].shape[0] == FRAMES
        index = params["sub_idxs"]
        assert index is not None and len(index) == context[1] == entry["samples"]
        assert torch.equal(entry["rows"], entry["full"][torch.tensor(index)])
        windows.add(tuple(index))
        assert not torch.allclose(entry["full"][0], entry["full"][1])  # the maps differ per frame
    assert len(windows) >= 2, f"expected several different windows, saw {sorted(windows)}"
    assert set().union(*windows) == set(range(FRAMES))  # the windows cover every frame
    # the attention patches only ever saw spatial calls of one window (cond + uncond rows); ADE's motion modules
    # run their own temporal attention, which never reaches them
    assert {r["rows"] for r in records()} == {2 * context[1]}


def test_without_context_windows_all_frames_use_their_rows(comfy, motion_model, map_log):
    """No context options: one model call with every frame; row f of the map is frame f's."""
    frames = 4
    H.run_prompt(ade_graph(motion_model, frames=frames).prompt)
    _check_run(frames)
    used = [entry for entry in map_log if entry["rows"] is not None]
    assert used, "no importance map was used"
    for entry in used:
        assert entry["ad_params"] is not None and entry["ad_params"]["sub_idxs"] is None
        assert entry["ad_params"]["full_length"] == frames == entry["samples"]
        assert torch.equal(entry["rows"], entry["full"])
        assert not torch.allclose(entry["full"][0], entry["full"][1])
    assert {r["rows"] for r in records()} == {2 * frames}


def test_temporal_sharing_inside_context_windows(comfy, motion_model):
    """temporal_ratio with ADE windows of 4 frames: frames pair up inside each window, 24 of 32 queries computed."""
    merge = dict(SIMPLE, dst_fraction=0.25, pool_scale=1.4, dst_mode="top", warmup_mode="merge", cfg1_mode="random",
                 merge_cross_attn=False, merge_seed=0, temporal_ratio=0.5)
    H.run_prompt(ade_graph(motion_model, context=("uniform", 4, 2), merge=merge,
                           node="ITM_ImportanceTokenMergingAdvanced").prompt)
    run = _check_run(FRAMES)
    assert run.shared == {0: (32, 24)}
    assert (24, 32) in {(r["tokens"], r["kv_tokens"]) for r in records()}
