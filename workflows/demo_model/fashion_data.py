"""Fashion-MNIST as the demo model sees it (shared by the training script, the classifier and the benchmarks).

The data comes from the Debian package ``dataset-fashion-mnist`` (MIT licence): 60k training and 10k test images,
28×28 grayscale, 10 classes, as gzipped idx files under /usr/share/datasets/fashion-mnist. ``ensure_dataset``
installs the package when it is missing (apt-get, as root) or says how to.
"""
from __future__ import annotations

import gzip
import os
import shutil
import subprocess

DATA = os.environ.get("ITM_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def ensure_dataset() -> str:
    """The dataset folder; installs Debian's dataset-fashion-mnist first when it is missing and apt-get can."""
    if all(os.path.isfile(os.path.join(DATA, name)) for pair in FILES.values() for name in pair):
        return DATA
    if shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"], check=True,
                       stdout=subprocess.DEVNULL)
        if os.path.isfile(os.path.join(DATA, FILES["test"][0])):
            return DATA
    raise FileNotFoundError(f"Fashion-MNIST not found in {DATA}: install the Debian package dataset-fashion-mnist "
                            "or set ITM_FASHION_MNIST to a folder with the four idx .gz files")


def load_images(split: str = "train"):
    """uint8 images [N, 28, 28] and int64 labels [N] of ``split`` ("train" or "test")."""
    import numpy as np
    import torch

    folder = ensure_dataset()
    image_file, label_file = FILES[split]
    with gzip.open(os.path.join(folder, image_file)) as handle:
        images = np.frombuffer(handle.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(os.path.join(folder, label_file)) as handle:
        labels = np.frombuffer(handle.read(), dtype=np.uint8, offset=8)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype("int64"))


def to_latent(images):
    """uint8 [N, 28, 28] → model-space data [N, 4, 32, 32] in [-1, 1] (padded with the background value -1)."""
    import torch.nn.functional as F

    x = images.float() / 127.5 - 1.0
    x = F.pad(x, (2, 2, 2, 2), value=-1.0)
    return x[:, None].expand(-1, 4, -1, -1).contiguous()


def to_image(model_space):
    """Model-space [N, 4, 32, 32] → grayscale [N, 32, 32] in [0, 1] (what the demo VAE shows, before upscaling)."""
    return ((model_space.float().mean(dim=1) + 1.0) / 2.0).clamp(0, 1)


def real_images(split: str = "test"):
    """Real images as the models see them: grayscale [N, 32, 32] in [0, 1] and labels [N]."""
    images, labels = load_images(split)
    return to_image(to_latent(images)), labels


VIDEO_CANVAS = 32
VIDEO_GARMENT = 20


def moving_clips(images, frames: int, generator):
    """Moving Fashion-MNIST: uint8 garments [N, 28, 28] → clips [N, frames, 32, 32] in [-1, 1].

    Each garment is shrunk to 20×20 and slides in a straight line over a 32×32 background (value -1), by a whole
    number of pixels per frame between -3 and 3 on each axis, starting where it stays inside for all ``frames``."""
    import torch
    import torch.nn.functional as F

    n = images.shape[0]
    room = VIDEO_CANVAS - VIDEO_GARMENT
    small = F.interpolate(images.float()[:, None] / 127.5 - 1.0, size=(VIDEO_GARMENT, VIDEO_GARMENT),
                          mode="bilinear", align_corners=False, antialias=True)[:, 0].clamp(-1, 1)
    span = frames - 1
    top = max(1, room // max(1, span))
    velocity = torch.randint(-min(3, top), min(3, top) + 1, (n, 2), generator=generator)
    low = (-velocity * span).clamp(min=0)
    high = room - (velocity * span).clamp(min=0)
    start = low + (torch.rand(n, 2, generator=generator) * (high - low + 1)).long().clamp(max=high - low)
    clips = torch.full((n, frames, VIDEO_CANVAS, VIDEO_CANVAS), -1.0)
    for k in range(frames):
        pos = start + velocity * k
        for i in range(n):
            y, x = int(pos[i, 0]), int(pos[i, 1])
            clips[i, k, y:y + VIDEO_GARMENT, x:x + VIDEO_GARMENT] = small[i]
    return clips


def garment_crops(frames):
    """Grayscale video frames [N, 32, 32] in [0, 1] → the 20×20 window holding the most garment (brightest sum),
    scaled back to 28×28 and padded to 32×32 like the still images, so the image classifier can read them."""
    import torch
    import torch.nn.functional as F

    size = VIDEO_GARMENT
    sums = F.avg_pool2d(frames[:, None].float(), size, stride=1)[:, 0]  # [N, 13, 13]
    best = sums.flatten(1).argmax(1)
    ys, xs = best // sums.shape[-1], best % sums.shape[-1]
    crops = torch.stack([frames[i, y:y + size, x:x + size] for i, (y, x) in enumerate(zip(ys.tolist(), xs.tolist()))])
    big = F.interpolate(crops[:, None].float(), size=(28, 28), mode="bilinear", align_corners=False)[:, 0]
    return F.pad(big, (2, 2, 2, 2), value=0.0).clamp(0, 1)


def garment_centre(frames):
    """Centre of brightness (y, x) of frames [N, 32, 32] in [0, 1], in pixels: [N, 2]."""
    import torch

    weight = frames.float().clamp(min=0)
    total = weight.sum(dim=(1, 2)).clamp(min=1e-6)
    coords = torch.arange(frames.shape[-1], dtype=torch.float32)
    y = (weight.sum(2) * coords).sum(1) / total
    x = (weight.sum(1) * coords).sum(1) / total
    return torch.stack([y, x], dim=1)
