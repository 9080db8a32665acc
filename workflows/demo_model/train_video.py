"""Train the pack's small video demo models: moving Fashion-MNIST garments on ComfyUI's own WAN 2.1, LTX-Video or
HunyuanVideo model class.

    COMFYUI_PATH=../shared/hosts/comfyui-0.14.1 .venv/bin/python workflows/demo_model/train_video.py [--minutes 60]
        [--family wan|ltxv|hunyuan]

* Data: a Fashion-MNIST garment shrunk to 20×20 slides in a straight line over a 32×32 background
  (``fashion_data.moving_clips``), one position per latent frame; the 16 channels of a WAN latent frame all hold
  that grayscale frame in model space (the demo video codec stores it as ``mean + std · gray`` so ComfyUI's Wan21
  latent format maps it back to ``gray``). A 256×256, 13-frame ``EmptyHunyuanLatentVideo`` is 4 latent frames of
  16×16 = 256 tokens.
* Model: ``supported_models.WAN21_T2V`` → ``model_base.WAN21`` (flow matching, velocity prediction) with the small
  WanModel config ``DEMO_WAN`` (nodes/demo_model.py): 4 blocks of width 128, 4 heads, 3-D RoPE; cross-attention to
  the same learned class embedding table layout as the image demo (10 classes + a null class, dropped 10%).
* ``--family ltxv``: ``supported_models.LTXV`` → ``model_base.LTXV`` (flow matching, velocity prediction, Flux-style
  shift 2.37) with ``DEMO_LTXV``: 4 blocks of width 128, 4 heads, patch size 1, so the clips are pooled 2× to 16×16
  latent frames (a 512×512, 25-frame ``EmptyLTXVLatentVideo``: 4 latent frames of 256 tokens); all 128 channels hold
  the frame (LTX-Video's latent format does not rescale); the class embedding is its one text token (mask of ones).
* ``--family hunyuan``: ``supported_models.HunyuanVideo`` (flow matching, shift 7) with ``DEMO_HUNYUAN``: 2 double-
  and 2 single-stream blocks of width 128, 4 heads, patch 1×2×2 (32×32 latent frames, 256 tokens each), plain CFG
  instead of the guidance embedding; every channel holds the frame divided by HunyuanVideo's latent scale; the class
  embedding is its text token and its pooled vector.
* ComfyUI's LTX-Video and HunyuanVideo blocks add their updates in place, which autograd refuses for tensors it
  saved: training keeps a copy of every saved tensor (``torch.autograd.graph.saved_tensors_hooks``), so the blocks
  run unchanged.
* Training: velocity MSE (target noise − x0) at sigmas drawn half uniformly and half through the model's own shifted
  schedule (what the samplers visit), AdamW, EMA, fixed wall-clock budget; PyTorch SDPA in fp32 on the CPU.
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

from fashion_data import load_images, moving_clips  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0, help="wall-clock training budget")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--frames", type=int, default=4, help="latent frames per clip")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--save-every", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: budget only)")
    parser.add_argument("--family", choices=("wan", "ltxv", "hunyuan"), default="wan", help="model class to train")
    parser.add_argument("--out", help="weights file (default: fashion_<family>.safetensors next to this script)")
    args = parser.parse_args(argv)
    args.out = args.out or os.path.join(HERE, f"fashion_{args.family}.safetensors")

    import comfy_harness

    root = (os.environ.get("COMFYUI_PATH") or "").split(os.pathsep)[0] or comfy_harness.pinned_host_root()
    if comfy_harness._host_kind(root) != "modern":
        raise SystemExit("the video demo model needs a current ComfyUI (WAN): set COMFYUI_PATH")
    info = comfy_harness.boot_with_pack(root, REPO, extra_args=("--use-pytorch-cross-attention",))
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(args.seed)
    images, labels = load_images("train")
    demo = comfy_harness.pack_module("nodes.demo_model")
    ltxv = args.family == "ltxv"
    builder, config, head = {
        "wan": (demo.build_wan_patcher, demo.DEMO_WAN, "head.head"),
        "ltxv": (demo.build_ltxv_patcher, demo.DEMO_LTXV, "proj_out"),
        "hunyuan": (demo.build_hunyuan_patcher, demo.DEMO_HUNYUAN, "final_layer.linear"),
    }[args.family]
    patcher = builder(None, load_device=torch.device("cpu"))
    net = patcher.model.diffusion_model
    sampling = patcher.model.model_sampling
    comfy_harness.init_weights_(net, seed=args.seed)
    for name, param in net.named_parameters():  # start the output head at zero (a velocity of 0 is a safe start)
        if name.startswith(head):
            torch.nn.init.zeros_(param)
    generator = torch.Generator().manual_seed(args.seed + 1)
    table = torch.nn.Parameter(torch.randn(len(demo.CLASSES) + 1, demo.CONTEXT_DIM, generator=generator) * 0.5)
    shift = float(sampling.shift)
    net.train()
    params = list(net.parameters()) + [table]
    print(f"host {info['host']}; {sum(p.numel() for p in params) / 1e6:.2f}M parameters; budget {args.minutes} min; "  # noqa: T201
          f"shift {shift}", flush=True)
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
            "format": "importance-token-merging video demo model v1" + {
                "wan": "", "ltxv": " (LTX-Video)", "hunyuan": " (HunyuanVideo)"}[args.family],
            f"{args.family}_config": json.dumps(config), "classes": json.dumps(demo.CLASSES),
            "context_dim": str(demo.CONTEXT_DIM),
            "data": "moving Fashion-MNIST: train garments (60k, MIT) shrunk to 20x20, sliding -3..3 px per latent "
                    f"frame on a 32x32 background{', pooled 2x to 16x16' if ltxv else ''}, {args.frames} latent "
                    "frames, range [-1, 1] in model space",
            "training": json.dumps({
                "seed": args.seed, "minutes": args.minutes, "elapsed_minutes": round((time.time() - start) / 60, 1),
                "final": final, "steps": step, "batch": args.batch, "frames": args.frames, "lr": args.lr,
                "warmup": args.warmup, "schedule": "cosine to 0.1 over the wall-clock budget",
                "optimiser": "AdamW wd 0", "cfg_dropout": 0.1, "ema": 0.999,
                "objective": f"velocity MSE (noise - x0); sigma half uniform, half through the model's shift {shift}",
                "loss_last_200": sum(recent) / max(1, len(recent)), "host": info["host"],
                "torch": torch.__version__, "threads": torch.get_num_threads(),
                "weights": "EMA, stored as float16"}),
        }
        save_file(tensors, args.out, metadata=metadata)
        print(f"wrote {args.out}: {metadata['training']}", flush=True)  # noqa: T201

    while time.time() - start < budget and not (args.max_steps and step >= args.max_steps):
        index = torch.randint(len(images), (args.batch,), generator=generator)
        clips = moving_clips(images[index], args.frames, generator)  # [B, T, 32, 32]
        if ltxv:
            clips = torch.nn.functional.avg_pool2d(clips, 2)  # patch size 1: 16x16 tokens per latent frame
        x0 = clips[:, None].expand(-1, 128 if ltxv else 16, -1, -1, -1)
        label = labels[index].clone()
        label[torch.rand(args.batch, generator=generator) < 0.1] = demo.NULL_CLASS
        u = torch.rand(args.batch, generator=generator)
        shifted = sampling.sigma(sampling.timestep(u))  # the model's own shift (WAN: shift * u / (1 + (shift-1) u))
        sigma = torch.where(torch.rand(args.batch, generator=generator) < 0.5, u, shifted).clamp(1e-3, 1.0)
        noise = torch.randn(x0.shape, generator=generator)
        s = sigma[:, None, None, None, None]
        noisy = s * noise + (1 - s) * x0
        context = table[label][:, None, :]
        if args.family == "wan":
            prediction = net(noisy, sampling.timestep(sigma), context=context)
            loss = torch.nn.functional.mse_loss(prediction, noise - x0)
        else:  # keep a copy of every tensor autograd saves: these blocks add their updates in place
            with torch.autograd.graph.saved_tensors_hooks(torch.clone, lambda t: t):
                if ltxv:
                    prediction = net(noisy, sampling.timestep(sigma), context,
                                     torch.ones(args.batch, 1, dtype=torch.long), frame_rate=25)
                else:
                    prediction = net(noisy, sampling.timestep(sigma), context, y=context[:, 0])
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
