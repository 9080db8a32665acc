"""Train the pack's small demo model: a class-conditional Fashion-MNIST diffusion model made of ComfyUI's own UNet.

    COMFYUI_PATH=../shared/hosts/comfyui-0.14.1 .venv/bin/python workflows/demo_model/train.py [--minutes 45] [--seed 0]

Needs a current ComfyUI (COMFYUI_PATH): the 2024 host's transformer blocks add residuals in place, which autograd
refuses. The weights it writes load on both hosts.

* Data: Fashion-MNIST (Debian package dataset-fashion-mnist, MIT licence, /usr/share/datasets/fashion-mnist): 60k
  labelled 28×28 training images, padded to 32×32 with the background value and repeated over the 4 channels of an
  SD1.5 latent, so a 256×256 EmptyLatentImage is one garment and ComfyUI's samplers, CFG and this pack's patches
  run on it unchanged.
* Model: ComfyUI's SD1.5 model class (``supported_models.SD15`` → ``model_base.BaseModel``, eps prediction, the
  scaled-linear 1000-step schedule) with a small UNet config (``DEMO_UNET`` below): self-attention at the full
  32×32 = 1024-token level and at 16×16, cross-attention to a learned class embedding (10 classes + a null class for
  classifier-free guidance, dropped 10% of the time).
* Training: eps-prediction MSE on ComfyUI's own sigmas (uniform timesteps), AdamW, EMA of the weights; PyTorch's
  scaled_dot_product_attention in fp32 on the CPU (ComfyUI is booted with --use-pytorch-cross-attention); a fixed
  wall-clock budget. Seed, budget, data and settings are stored in the file's metadata.
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "tests"))

DATA = "/usr/share/datasets/fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CONTEXT_DIM = 64
DEMO_UNET = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
    "num_res_blocks": [1, 1, 1], "channel_mult": [1, 2, 2], "transformer_depth": [1, 1, 0],
    "transformer_depth_output": [1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1, "num_heads": 4,
    "num_head_channels": -1, "context_dim": CONTEXT_DIM, "use_spatial_transformer": True, "legacy": False,
    "use_linear_in_transformer": False, "adm_in_channels": None, "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


def load_images(split: str = "train"):
    """uint8 images [N, 28, 28] and int64 labels [N] from the idx files."""
    import numpy as np
    import torch

    prefix = "train" if split == "train" else "t10k"
    with gzip.open(os.path.join(DATA, f"{prefix}-images-idx3-ubyte.gz")) as handle:
        images = np.frombuffer(handle.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(os.path.join(DATA, f"{prefix}-labels-idx1-ubyte.gz")) as handle:
        labels = np.frombuffer(handle.read(), dtype=np.uint8, offset=8)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype("int64"))


def to_latent(images):
    """uint8 [N, 28, 28] → model-space data [N, 4, 32, 32] in [-1, 1] (background -1)."""
    import torch.nn.functional as F

    x = images.float() / 127.5 - 1.0
    x = F.pad(x, (2, 2, 2, 2), value=-1.0)
    return x[:, None].expand(-1, 4, -1, -1).contiguous()


def to_image(model_space):
    """Model-space [N, 4, 32, 32] → grayscale [N, 32, 32] in [0, 1]."""
    return ((model_space.mean(dim=1) + 1.0) / 2.0).clamp(0, 1)


def build_model(seed: int = 0):
    """(ModelPatcher, class embedding table [11, CONTEXT_DIM]) with freshly initialised weights."""
    import torch
    import comfy.supported_models
    import comfy_harness

    config = dict(DEMO_UNET, dtype=torch.float32)
    patcher = comfy_harness._build(comfy.supported_models.SD15, config, seed, torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed + 1)
    table = torch.nn.Parameter(torch.randn(len(CLASSES) + 1, CONTEXT_DIM, generator=generator) * 0.5)
    return patcher, table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=45.0, help="wall-clock training budget")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(HERE, "fashion_unet.safetensors"))
    args = parser.parse_args(argv)

    import comfy_harness

    root = (os.environ.get("COMFYUI_PATH") or "").split(os.pathsep)[0] or comfy_harness.pinned_host_root()
    if comfy_harness._host_kind(root) != "modern":
        raise SystemExit("training needs a current ComfyUI: set COMFYUI_PATH (the 2024 host's blocks add in place)")
    info = comfy_harness.boot(root, extra_args=("--use-pytorch-cross-attention",), init_extra_nodes=False)
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(args.seed)
    images, labels = load_images("train")
    data = to_latent(images)
    patcher, table = build_model(args.seed)
    unet = patcher.model.diffusion_model
    sampling = patcher.model.model_sampling
    unet.train()
    params = list(unet.parameters()) + [table]
    print(f"host {info['host']}; {sum(p.numel() for p in params) / 1e6:.2f}M parameters; "  # noqa: T201
          f"{len(data)} images; budget {args.minutes} min", flush=True)
    optimiser = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    ema = {name: p.detach().clone() for name, p in unet.state_dict().items()}
    ema_table = table.detach().clone()
    generator = torch.Generator().manual_seed(args.seed + 2)
    start, step, losses = time.time(), 0, []
    budget = args.minutes * 60
    while time.time() - start < budget:
        index = torch.randint(len(data), (args.batch,), generator=generator)
        x0, label = data[index], labels[index].clone()
        label[torch.rand(args.batch, generator=generator) < 0.1] = len(CLASSES)  # CFG dropout → null class
        timestep = torch.randint(0, 1000, (args.batch,), generator=generator)
        sigma = sampling.sigmas[timestep].float()
        noise = torch.randn(x0.shape, generator=generator)
        noisy = x0 + noise * sigma[:, None, None, None]
        model_in = sampling.calculate_input(sigma, noisy)
        context = table[label][:, None, :]
        prediction = unet(model_in, timestep.float(), context=context)
        loss = torch.nn.functional.mse_loss(prediction, noise)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        progress = (time.time() - start) / budget
        for group in optimiser.param_groups:  # cosine decay over the wall-clock budget
            group["lr"] = args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
        optimiser.step()
        step += 1
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, value in unet.state_dict().items():
                ema[name].mul_(decay).add_(value.detach(), alpha=1 - decay)
            ema_table.mul_(decay).add_(table.detach(), alpha=1 - decay)
        losses.append(float(loss))
        if step % 50 == 0:
            print(f"step {step} ({time.time() - start:.0f}s): loss {sum(losses[-50:]) / 50:.4f}", flush=True)  # noqa: T201
    tensors = {f"diffusion_model.{name}": value.contiguous() for name, value in ema.items()}
    tensors["class_embedding.weight"] = ema_table.contiguous()
    metadata = {
        "format": "importance-token-merging demo model v1",
        "unet_config": json.dumps(DEMO_UNET), "classes": json.dumps(CLASSES), "context_dim": str(CONTEXT_DIM),
        "data": "Fashion-MNIST train (60k, MIT), padded 28->32, repeated over 4 channels, range [-1, 1]",
        "training": json.dumps({"seed": args.seed, "minutes": args.minutes, "steps": step, "batch": args.batch,
                                "lr": args.lr, "cfg_dropout": 0.1, "ema": 0.999, "objective": "eps MSE",
                                "final_loss_50": sum(losses[-50:]) / max(1, len(losses[-50:])),
                                "host": info["host"], "torch": torch.__version__}),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file(tensors, args.out, metadata=metadata)
    print(f"wrote {args.out}: {step} steps, final loss {metadata['training']}", flush=True)  # noqa: T201


if __name__ == "__main__":
    main()
