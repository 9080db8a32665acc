"""Importance maps from classifier-free guidance.

The importance of a latent position is how much the prompt changes the model's prediction there:
``mean over channels of |cond - uncond|``. Whether the model predicts eps, x0 or v only rescales this per sample
(for a fixed sigma), so the ranking of positions, which is all the partition uses, does not depend on it.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

ChannelSelection = Union[None, int, slice]


def importance_map(
    cond: torch.Tensor,
    uncond: torch.Tensor,
    channels: ChannelSelection = None,
) -> torch.Tensor:
    """Per-position importance ``mean_c |cond - uncond|``.

    Args:
        cond, uncond: model outputs of the same samples, image latents [B, C, H, W] or video latents [B, C, T, H, W].
        channels: which output channels count. ``None`` = all; an int ``k`` = the first ``k`` channels (for
            learned-sigma models whose second half holds variances); or a ``slice``.

    Returns:
        [B, H, W] or [B, T, H, W], float32 (a ranking signal, kept in full precision whatever the input dtype).
    """
    if cond.shape != uncond.shape:
        raise ValueError(f"cond and uncond must have the same shape, got {tuple(cond.shape)} and {tuple(uncond.shape)}")
    if cond.ndim not in (4, 5):
        raise ValueError(
            f"importance_map expects [B, C, H, W] or [B, C, T, H, W] latents, got a {cond.ndim}-D tensor {tuple(cond.shape)}"
        )
    num_channels = cond.shape[1]
    if channels is None:
        selection = slice(None)
    elif isinstance(channels, slice):
        selection = channels
    elif isinstance(channels, int) and not isinstance(channels, bool):
        if not 1 <= channels <= num_channels:
            raise ValueError(f"channels must be in [1, {num_channels}] (the output's channel count), got {channels}")
        selection = slice(0, channels)
    else:
        raise ValueError(f"channels must be None, an int or a slice, got {channels!r}")
    diff = (cond[:, selection].float() - uncond[:, selection].float()).abs()
    if diff.shape[1] == 0:
        raise ValueError(f"channels={channels!r} selects no channel of a {num_channels}-channel output")
    return diff.mean(dim=1)


def rows_for_samples(batch_rows: int, num_samples: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Default row → sample mapping for a batch that repeats its samples in blocks, e.g. ``[uncond; cond]``.

    A batch of ``batch_rows`` rows holding ``batch_rows // num_samples`` copies of ``num_samples`` samples maps row
    ``i`` to sample ``i % num_samples``.
    """
    if num_samples <= 0 or batch_rows <= 0 or batch_rows % num_samples:
        raise ValueError(
            f"a batch of {batch_rows} rows is not a whole number of blocks of {num_samples} samples; "
            "pass row_sample to say which sample each row belongs to"
        )
    return torch.arange(batch_rows, device=device) % num_samples
