"""Train the pack's small demo model: a class-conditional Fashion-MNIST diffusion model made of ComfyUI's own UNet.

    COMFYUI_PATH=../shared/hosts/comfyui-0.14.1 .venv/bin/python workflows/demo_model/train.py [--minutes 45] [--seed 0]
        [--family unet|pixart] [--prediction eps|v] [--init WEIGHTS]

Needs a current ComfyUI (COMFYUI_PATH): the 2024 host's transformer blocks add residuals in place, which autograd
refuses. The weights it writes load on both hosts.

* Data: Fashion-MNIST (Debian package dataset-fashion-mnist, MIT licence, /usr/share/datasets/fashion-mnist): 60k
  labelled 28×28 training images, padded to 32×32 with the background value and repeated over the 4 channels of an
  SD1.5 latent, so a 256×256 EmptyLatentImage is one garment and ComfyUI's samplers, CFG and this pack's patches
  run on it unchanged.
* Model: ComfyUI's SD1.5 model class (``supported_models.SD15`` → ``model_base.BaseModel``, eps prediction, or v
  with ``--prediction v`` as the bundled file is, the scaled-linear 1000-step schedule) with a small UNet config
  (``DEMO_UNET`` in the pack's nodes/demo_model.py, which loads the result): self-attention at the full
  32×32 = 1024-token level and at 16×16, cross-attention to a learned class embedding (10 classes + a null class for
  classifier-free guidance, dropped 10% of the time).
* ``--family pixart``: ComfyUI's PixArt-alpha class (``supported_models.PixArtAlpha`` → ``model_base.PixArt``, the
  linear 1000-step schedule) with **v-prediction** (v MSE) and ``DEMO_PIXART``: the same data scaled to a 40×40 latent
  (PixArt's position embedding needs at least 33×33; 2×2 patches = 400 tokens), written to
  ``fashion_pixart.safetensors``.
* Training: eps- (or v-) prediction MSE on ComfyUI's own sigmas (uniform timesteps), AdamW, EMA of the weights;
  PyTorch's scaled_dot_product_attention in fp32 on the CPU (ComfyUI is booted with --use-pytorch-cross-attention);
  a fixed wall-clock budget. Seed, budget, data and settings are stored in the file's metadata. ``--init`` continues from
  a weights file of the same config (its runs are kept in the metadata under "earlier"); how the bundled UNet file
  was made: README.md next to this script.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, HERE)

from fashion_data import load_images, to_latent  # noqa: E402


FAMILIES = {  # --family: (patcher builder in nodes.demo_model, its config there, default output file)
    "unet": ("build_unet_patcher", "DEMO_UNET", "fashion_unet.safetensors"),
    "pixart": ("build_pixart_patcher", "DEMO_PIXART", "fashion_pixart.safetensors"),
}


def build_model(demo, seed: int = 0, family: str = "unet", prediction: str = "eps"):
    """(ModelPatcher, class embedding table [11, CONTEXT_DIM]) with freshly initialised weights."""
    import torch
    import comfy_harness

    builder = getattr(demo, FAMILIES[family][0])
    if family == "unet":
        patcher = builder(None, load_device=torch.device("cpu"), prediction=prediction)
    else:
        patcher = builder(None, load_device=torch.device("cpu"))
    comfy_harness.init_weights_(patcher.model.diffusion_model, seed=seed)
    if family == "pixart":  # start the output head at zero (an output of 0 is a safe start)
        for name, param in patcher.model.diffusion_model.named_parameters():
            if name.startswith("final_layer.linear"):
                torch.nn.init.zeros_(param)
    generator = torch.Generator().manual_seed(seed + 1)
    table = torch.nn.Parameter(torch.randn(len(demo.CLASSES) + 1, demo.CONTEXT_DIM, generator=generator) * 0.5)
    return patcher, table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=45.0, help="wall-clock training budget")
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200, help="linear learning-rate warm-up steps")
    parser.add_argument("--save-every", type=float, default=10.0, help="minutes between intermediate saves")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="unet", help="model class to train")
    parser.add_argument("--out", default=None, help="weights file (default: the family's file next to this script)")
    parser.add_argument("--prediction", choices=("eps", "v"), default=None,
                        help="what the network predicts (default: eps for unet, as SD1.5; v for pixart)")
    parser.add_argument("--init", default=None,
                        help="continue from this weights file (its EMA weights and class table; the metadata records "
                             "the earlier runs) instead of fresh weights")
    args = parser.parse_args(argv)
    args.out = args.out or os.path.join(HERE, FAMILIES[args.family][2])
    args.prediction = args.prediction or ("v" if args.family == "pixart" else "eps")
    if args.family == "pixart" and args.prediction != "v":
        raise SystemExit("the PixArt demo model is v-predicting (an eps try stayed speckled)")

    import comfy_harness

    root = (os.environ.get("COMFYUI_PATH") or "").split(os.pathsep)[0] or comfy_harness.pinned_host_root()
    if comfy_harness._host_kind(root) != "modern":
        raise SystemExit("training needs a current ComfyUI: set COMFYUI_PATH (the 2024 host's blocks add in place)")
    info = comfy_harness.boot_with_pack(root, REPO, extra_args=("--use-pytorch-cross-attention",))
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(args.seed)
    images, labels = load_images("train")
    data = to_latent(images)
    demo = comfy_harness.pack_module("nodes.demo_model")
    # pixart: the garment scaled to the config's 40x40 latent (per batch)
    size = demo.DEMO_PIXART["input_size"] if args.family == "pixart" else 32
    patcher, table = build_model(demo, args.seed, args.family, args.prediction)
    earlier = []  # the runs the --init file came from
    if args.init:
        state, init_table, init_meta = demo.read_weights(args.init)
        config = json.loads(json.dumps(getattr(demo, FAMILIES[args.family][1])))
        if json.loads(init_meta.get("unet_config", "null")) != config:
            raise SystemExit(f"{args.init} is not a {args.family} demo model of the current config")
        patcher.model.diffusion_model.load_state_dict(state, strict=True)
        table = torch.nn.Parameter(init_table.clone())
        previous = json.loads(init_meta.get("training", "{}"))
        earlier = previous.pop("earlier", []) + [previous]
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
    last_save = start

    def save(final: bool) -> None:
        tensors = {f"diffusion_model.{name}": value.to(torch.float16).contiguous() for name, value in ema.items()}
        tensors["class_embedding.weight"] = ema_table.to(torch.float16).contiguous()
        recent = losses[-200:]
        metadata = {
            "format": "importance-token-merging demo model v1",
            "family": args.family, "prediction": args.prediction,
            "unet_config": json.dumps(getattr(demo, FAMILIES[args.family][1])), "classes": json.dumps(demo.CLASSES),
            "context_dim": str(demo.CONTEXT_DIM),
            "data": "Fashion-MNIST train (60k, MIT), padded 28->32, repeated over 4 channels, range [-1, 1]"
                    + (f", scaled to {size}x{size} (bilinear)" if size != 32 else ""),
            "training": json.dumps({
                "seed": args.seed, "minutes": args.minutes, "elapsed_minutes": round((time.time() - start) / 60, 1),
                "final": final, "steps": step, "batch": args.batch, "lr": args.lr, "warmup": args.warmup,
                "schedule": "cosine to 0.1 over the wall-clock budget", "optimiser": "AdamW wd 0",
                "cfg_dropout": 0.1, "ema": 0.999,
                "objective": args.prediction + " MSE, uniform timesteps",
                "loss_last_200": sum(recent) / max(1, len(recent)), "host": info["host"],
                "torch": torch.__version__, "threads": torch.get_num_threads(),
                "weights": "EMA, stored as float16",
                **({"init": os.path.basename(args.init), "earlier": earlier} if args.init else {})}),
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        save_file(tensors, args.out, metadata=metadata)
        print(f"wrote {args.out}: {metadata['training']}", flush=True)  # noqa: T201

    while time.time() - start < budget:
        index = torch.randint(len(data), (args.batch,), generator=generator)
        x0, label = data[index], labels[index].clone()
        if size != 32:
            x0 = torch.nn.functional.interpolate(x0, size=(size, size), mode="bilinear", align_corners=False)
        label[torch.rand(args.batch, generator=generator) < 0.1] = demo.NULL_CLASS  # CFG dropout → null class
        timestep = torch.randint(0, 1000, (args.batch,), generator=generator)
        sigma = sampling.sigmas[timestep].float()
        noise = torch.randn(x0.shape, generator=generator)
        noisy = x0 + noise * sigma[:, None, None, None]
        model_in = sampling.calculate_input(sigma, noisy)
        context = table[label][:, None, :]
        prediction = unet(model_in, timestep.float(), context=context)
        if args.prediction == "v":  # v-prediction: the output that makes ComfyUI's denoised exactly x0
            s, sd = sigma[:, None, None, None], sampling.sigma_data
            target = (noisy * sd ** 2 / (s ** 2 + sd ** 2) - x0) * (s ** 2 + sd ** 2).sqrt() / (s * sd)
        else:
            target = noise
        loss = torch.nn.functional.mse_loss(prediction, target)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        progress = (time.time() - start) / budget
        for group in optimiser.param_groups:  # linear warm-up, then cosine decay over the wall-clock budget
            scale = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
            group["lr"] = args.lr * scale * min(1.0, (step + 1) / args.warmup)
        optimiser.step()
        step += 1
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, value in unet.state_dict().items():
                ema[name].mul_(decay).add_(value.detach(), alpha=1 - decay)
            ema_table.mul_(decay).add_(table.detach(), alpha=1 - decay)
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            print(f"step {step} ({time.time() - start:.0f}s): loss {sum(losses[-50:]) / 50:.4f}", flush=True)  # noqa: T201
        if time.time() - last_save > args.save_every * 60:
            save(final=False)
            last_save = time.time()
    save(final=True)


if __name__ == "__main__":
    main()
