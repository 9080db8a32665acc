"""A small Fashion-MNIST classifier trained by the project: the feature space of the quality benchmark's FD score.

    python tests/quality/classifier.py [--epochs 3] [--seed 0]      # writes tests/quality/fashion_classifier.safetensors

Input: grayscale [N, 32, 32] images in [0, 1] — the demo model's renders (fashion_data.to_image), and the real
images padded the same way. Output: logits over the 10 classes; ``features`` gives the 128-d penultimate layer.
Trained on the 60k training images with light augmentation (random shifts), tested on the 10k test images.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
WEIGHTS = os.path.join(HERE, "fashion_classifier.safetensors")
sys.path.insert(0, os.path.join(REPO, "workflows", "demo_model"))


class FashionClassifier(nn.Module):
    def __init__(self, width: int = 32, feature_dim: int = 128) -> None:
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

        self.body = nn.Sequential(block(1, width), nn.MaxPool2d(2), block(width, width * 2), nn.MaxPool2d(2),
                                  block(width * 2, width * 4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed = nn.Sequential(nn.Linear(width * 4, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 32, 32] in [0, 1] → [N, feature_dim]."""
        return self.embed(self.body((images[:, None].float() - 0.5) / 0.5))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def load_classifier(path: str = WEIGHTS) -> FashionClassifier:
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: run python tests/quality/classifier.py")
    model = FashionClassifier()
    model.load_state_dict(load_file(path), strict=True)
    return model.eval()


@torch.no_grad()
def evaluate(model: FashionClassifier, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        correct += int((model(images[i:i + batch]).argmax(1) == labels[i:i + batch]).sum())
    return correct / len(images)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=WEIGHTS)
    args = parser.parse_args(argv)
    from safetensors.torch import save_file
    from fashion_data import real_images

    torch.manual_seed(args.seed)
    train_x, train_y = real_images("train")
    test_x, test_y = real_images("test")
    model = FashionClassifier()
    steps = args.epochs * (len(train_x) // args.batch)
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=2e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(args.seed)
    start, step = time.time(), 0
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        for i in range(0, len(order) - args.batch + 1, args.batch):
            index = order[i:i + args.batch]
            x = train_x[index]
            shift = torch.randint(-2, 3, (2,), generator=generator).tolist()  # light augmentation
            x = torch.roll(x, shifts=shift, dims=(1, 2))
            loss = F.cross_entropy(model(x), train_y[index])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            step += 1
        accuracy = evaluate(model, test_x, test_y)
        logging_line = f"epoch {epoch + 1}: loss {float(loss):.3f}, test accuracy {accuracy:.4f} ({time.time() - start:.0f}s)"
        print(logging_line, flush=True)  # noqa: T201 (command-line tool)
    metadata = {"test_accuracy": f"{accuracy:.4f}", "training": json.dumps(
        {"seed": args.seed, "epochs": args.epochs, "batch": args.batch, "steps": step, "optimiser": "AdamW 2e-3 one-cycle",
         "augmentation": "random roll by up to 2 px", "data": "Fashion-MNIST train 60k, padded to 32x32",
         "torch": torch.__version__})}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.out, metadata=metadata)
    print(f"wrote {args.out}: test accuracy {accuracy:.4f}", flush=True)  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
