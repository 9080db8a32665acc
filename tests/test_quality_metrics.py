"""The quality benchmark's metrics (tests/quality/metrics.py): known answers, no ComfyUI."""
import math

import torch

from quality import metrics


def _reference_fd(a, b):
    """The textbook formula with D×D matrix square roots."""
    a, b = a.double(), b.double()
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root = metrics._sqrtm_psd(cov_a)
    cross = torch.trace(metrics._sqrtm_psd(root @ cov_b @ root))
    return float((a.mean(0) - b.mean(0)).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def test_frechet_distance_known_answers():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g)
    assert abs(metrics.frechet_distance(a, a)) < 1e-9
    # N(0, I) vs N(m, 4 I) in 3-d: |m|^2 + 3 (1 + 4 - 2 * 2) = |m|^2 + 3
    b = torch.randn(4000, 3, generator=g) * 2 + torch.tensor([1.0, 0.0, 2.0])
    assert abs(metrics.frechet_distance(a, b) - 8.0) < 0.4


def test_frechet_distance_few_samples_path_is_exact():
    """Fewer rows than dimensions (256 generated images, 1280-d features) uses the small-matrix identity."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(40, 96, generator=g) @ torch.randn(96, 96, generator=g) * 0.1
    b = torch.randn(300, 96, generator=g)
    assert math.isclose(metrics.frechet_distance(a, b), _reference_fd(a, b), rel_tol=1e-6)


def test_bootstrap_interval_holds_the_estimate():
    """Few samples in many dimensions: resampling inflates FD; the bias-corrected interval still holds the estimate."""
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(64, 48, generator=g), torch.randn(400, 48, generator=g)
    estimate, low, high = metrics.frechet_bootstrap(a, b, rounds=40)
    assert estimate == metrics.frechet_distance(a, b) and low < estimate < high


def test_paired_difference_bootstrap():
    g = torch.Generator().manual_seed(2)
    real = torch.randn(500, 4, generator=g)
    close = torch.randn(200, 4, generator=g)
    far = close + 1.5
    diff, low, high = metrics.frechet_difference_bootstrap(close, far, real, rounds=50)
    assert math.isclose(diff, metrics.frechet_distance(close, real) - metrics.frechet_distance(far, real))
    assert low <= diff <= high and high < 0  # close is significantly nearer to the real features
    same, low, high = metrics.frechet_difference_bootstrap(close, close, real, rounds=20)
    assert same == 0 and low == 0 and high == 0


def test_psnr_ssim_and_interval():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(4, 32, 32, generator=g)
    assert torch.isinf(metrics.psnr(x, x)).all()
    assert torch.allclose(metrics.ssim(x, x), torch.ones(4, dtype=torch.float64))
    noisy = (x + 0.1).clamp(0, 1)
    assert (metrics.psnr(noisy, x) < 25).all() and (metrics.ssim(noisy, x) < 1).all()
    mean, half = metrics.mean_ci(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert mean == 2.5 and math.isclose(half, 1.96 * math.sqrt(5 / 3) / 2)
