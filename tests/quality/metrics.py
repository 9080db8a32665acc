"""Image-fidelity and distribution metrics of the quality benchmark (pure torch)."""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F


def psnr(images: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR (dB) of [N, H, W] images against [N, H, W] references; identical images give +inf."""
    mse = (images.double() - reference.double()).square().flatten(1).mean(1)
    return 10 * torch.log10(data_range ** 2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords.square() / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(images: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004: 11×11 Gaussian window, σ 1.5, K1 0.01, K2 0.03, valid region)."""
    x, y = images.double()[:, None], reference.double()[:, None]
    window = _gaussian_window().to(x.device)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = F.conv2d(x, window), F.conv2d(y, window)
    sxx = F.conv2d(x * x, window) - mu_x ** 2
    syy = F.conv2d(y * y, window) - mu_y ** 2
    sxy = F.conv2d(x * y, window) - mu_x * mu_y
    value = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return value.flatten(1).mean(1)


def mean_ci(values: torch.Tensor) -> Tuple[float, float]:
    """Mean and the half-width of its 95% normal interval (1.96 standard errors)."""
    values = values.double()
    finite = values[torch.isfinite(values)]
    if len(finite) < 2:
        return float(finite.mean()) if len(finite) else float("nan"), float("nan")
    return float(finite.mean()), float(1.96 * finite.std(unbiased=True) / math.sqrt(len(finite)))


def _sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a [N, D] and b [M, D] (the FID formula).

    tr sqrt(C_a C_b) is the sum of the square roots of the eigenvalues of C_a C_b; when a has fewer rows than
    dimensions these are the eigenvalues of the small matrix X_a C_b X_aᵀ / (N − 1) (X_a = centred a), which is exact
    and much faster for 1280-d features than the D×D matrix square roots.
    """
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    if len(a) < a.shape[1]:
        centred = a - mu_a
        small = centred @ cov_b @ centred.T / (len(a) - 1)
        cross = torch.linalg.eigvalsh((small + small.T) / 2).clamp_min(0).sqrt().sum()
    else:
        root_a = _sqrtm_psd(cov_a)
        cross = torch.trace(_sqrtm_psd(root_a @ cov_b @ root_a))
    return float((mu_a - mu_b).square().sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross)


def _bias_corrected(estimate: float, values: torch.Tensor) -> Tuple[float, float, float]:
    """(estimate, low, high): the 2.5/97.5 bootstrap percentiles shifted by the bootstrap's bias (mean − estimate).

    Resampling with replacement repeats rows, which inflates a Fréchet distance of few samples in many dimensions
    (256 images, 1280-d features: by ~5%), so the plain percentile interval can miss the estimate altogether.
    """
    bias = float(values.mean()) - estimate
    return estimate, float(values.quantile(0.025)) - bias, float(values.quantile(0.975)) - bias


def frechet_bootstrap(a: torch.Tensor, b: torch.Tensor, rounds: int = 200, seed: int = 0) -> Tuple[float, float, float]:
    """FD of a against the fixed reference b, and a bias-corrected 95% bootstrap interval over resamples of a."""
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(rounds):
        index = torch.randint(len(a), (len(a),), generator=generator)
        values.append(frechet_distance(a[index], b))
    return _bias_corrected(frechet_distance(a, b), torch.tensor(values))


def frechet_difference_bootstrap(a: torch.Tensor, c: torch.Tensor, b: torch.Tensor, rounds: int = 200,
                                 seed: int = 0) -> Tuple[float, float, float]:
    """FD(a, b) − FD(c, b) for paired feature sets a and c (row i of both from the same seed and class), with a
    bias-corrected 95% interval over bootstrap resamples that draw the same rows from a and c; below 0: a is closer
    to b."""
    if len(a) != len(c):
        raise ValueError(f"paired feature sets need the same length, got {len(a)} and {len(c)}")
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(rounds):
        index = torch.randint(len(a), (len(a),), generator=generator)
        values.append(frechet_distance(a[index], b) - frechet_distance(c[index], b))
    return _bias_corrected(frechet_distance(a, b) - frechet_distance(c, b), torch.tensor(values))
