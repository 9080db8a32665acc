"""Train the pack's small image DiT demo model: Fashion-MNIST on ComfyUI's own Qwen-Image model class.

    COMFYUI_PATH=../shared/hosts/comfyui-0.14.1 .venv/bin/python workflows/demo_model/train_dit.py [--minutes 45]

* Data: Fashion-MNIST training garments padded to 32×32 (``fashion_data.to_latent``); the 16 channels of the
  Qwen-Image latent ([B, 16, 1, 32, 32], WAN's layout) all hold the grayscale image in model space (the demo codec
  stores it as ``mean + std · gray`` so ComfyUI's Wan21 latent format maps it back to ``gray``). A 256×256
  ``EmptySD3LatentImage`` is 16×16 = 256 image tokens.
* Model: ``supported_models.QwenImage`` → ``model_base.QwenImage`` (flow matching, velocity prediction) with the
  small config ``DEMO_QWEN`` (nodes/demo_model.py): 6 joint-attention blocks of width 128, 4 heads, RoPE; the class
  embedding (10 classes + a null class, dropped 10%) is the one text token. Qwen-Image rather than Flux: Flux's
  blocks add their updates in place, which autograd refuses, and both run the same kind of joint attention.
* Training: velocity MSE (target noise − x0) at sigmas drawn half uniformly and half logit-normal (what flow
  samplers visit most), AdamW, EMA, fixed wall-clock budget; PyTorch SDPA in fp32 on the CPU.
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=45.0, help="wall-clock training budget")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--save-every", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: budget only)")
    parser.add_argument("--out", default=os.path.join(HERE, "fashion_qwen.safetensors"))
    args = parser.parse_args(argv)

    import comfy_harness

    root = (os.environ.get("COMFYUI_PATH") or "").split(os.pathsep)[0] or comfy_harness.pinned_host_root()
    if comfy_harness._host_kind(root) != "modern":
        raise SystemExit("the DiT demo model needs a current ComfyUI (Qwen-Image): set COMFYUI_PATH")
    info = comfy_harness.boot_with_pack(root, REPO, extra_args=("--use-pytorch-cross-attention",))
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(args.seed)
    images, labels = load_images("train")
    data = to_latent(images)[:, :1]  # [N, 1, 32, 32] in [-1, 1]
    demo = comfy_harness.pack_module("nodes.demo_model")
    patcher = demo.build_qwen_patcher(None, load_device=torch.device("cpu"))
    net = patcher.model.diffusion_model
    comfy_harness.init_weights_(net, seed=args.seed)
    for name, param in net.named_parameters():  # start the output head at zero (a velocity of 0 is a safe start)
        if name.startswith("proj_out"):
            torch.nn.init.zeros_(param)
    generator = torch.Generator().manual_seed(args.seed + 1)
    table = torch.nn.Parameter(torch.randn(len(demo.CLASSES) + 1, demo.CONTEXT_DIM, generator=generator) * 0.5)
    sampling = patcher.model.model_sampling
    net.train()
    params = list(net.parameters()) + [table]
    print(f"host {info['host']}; {sum(p.numel() for p in params) / 1e6:.2f}M parameters; budget {args.minutes} min; "  # noqa: T201
          f"{len(data)} images", flush=True)
    optimiser = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    ema = {name: p.detach().clone() for name, p in net.state_dict().items()}
    ema_table = table.detach().clone()
    start, step, losses = time.time(), 0, []
    budget = args.minutes * 60
    last_save = start

    def save(final: bool) -> None:
        tensors = {f"diffusion_model.{name}": value.to(torch.float16).contiguous() for name, value in ema.items()}
        tensors["class_embedding.weight"] = ema_table.to(torch.float16).contiguous()
        recent = losses[-200:]
        metadata = {
            "format": "importance-token-merging DiT demo model v1",
            "qwen_config": json.dumps(demo.DEMO_QWEN), "classes": json.dumps(demo.CLASSES),
            "context_dim": str(demo.CONTEXT_DIM),
            "data": "Fashion-MNIST train garments (60k, MIT) padded to 32x32, range [-1, 1] in model space, "
                    "repeated over the 16 latent channels of one latent frame",
            "training": json.dumps({
                "seed": args.seed, "minutes": args.minutes, "elapsed_minutes": round((time.time() - start) / 60, 1),
                "final": final, "steps": step, "batch": args.batch, "lr": args.lr,
                "warmup": args.warmup, "schedule": "cosine to 0.1 over the wall-clock budget",
                "optimiser": "AdamW wd 0", "cfg_dropout": 0.1, "ema": 0.999,
                "objective": "velocity MSE (noise - x0); sigma half uniform, half logit-normal(0, 1)",
                "loss_last_200": sum(recent) / max(1, len(recent)), "host": info["host"],
                "torch": torch.__version__, "threads": torch.get_num_threads(),
                "weights": "EMA, stored as float16"}),
        }
        save_file(tensors, args.out, metadata=metadata)
        print(f"wrote {args.out}: {metadata['training']}", flush=True)  # noqa: T201

    while time.time() - start < budget and not (args.max_steps and step >= args.max_steps):
        index = torch.randint(len(images), (args.batch,), generator=generator)
        x0 = data[index][:, :, None].expand(-1, 16, -1, -1, -1)  # [B, 16, 1, 32, 32]
        label = labels[index].clone()
        label[torch.rand(args.batch, generator=generator) < 0.1] = demo.NULL_CLASS
        u = torch.rand(args.batch, generator=generator)
        logit_normal = torch.sigmoid(torch.randn(args.batch, generator=generator))
        sigma = torch.where(torch.rand(args.batch, generator=generator) < 0.5, u, logit_normal).clamp(1e-3, 1.0)
        noise = torch.randn(x0.shape, generator=generator)
        s = sigma[:, None, None, None, None]
        noisy = s * noise + (1 - s) * x0
        cond = table[label]
        prediction = net(noisy, sampling.timestep(sigma), cond[:, None, :])
        loss = torch.nn.functional.mse_loss(prediction, noise - x0)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        progress = (time.time() - start) / budget
        for group in optimiser.param_groups:
            scale = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
            group["lr"] = args.lr * scale * min(1.0, (step + 1) / args.warmup)
        optimiser.step()
        step += 1
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, value in net.state_dict().items():
                ema[name].mul_(decay).add_(value.detach(), alpha=1 - decay)
            ema_table.mul_(decay).add_(table.detach(), alpha=1 - decay)
        losses.append(float(loss.detach()))
        if step % 25 == 0:
            print(f"step {step} ({time.time() - start:.0f}s): loss {sum(losses[-25:]) / 25:.4f}", flush=True)  # noqa: T201
        if time.time() - last_save > args.save_every * 60:
            save(final=False)
            last_save = time.time()
    save(final=True)


if __name__ == "__main__":
    main()
