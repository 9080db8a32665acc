"""Proportional attention (ToMe, Bolya et al. 2023, section 3): a merged key counts as many times as it has tokens.

After merging, one key stands for ``s`` tokens. Plain attention gives it the weight of one token, so every merged
region loses attention mass against the unmerged ones. Adding ``log s`` to that key's logit gives exactly the softmax
weight of ``s`` identical keys: ``softmax(q·k / sqrt(d) + log s)``.

ComfyUI's attention functions differ in how (and whether) they take an additive mask (the 2024 host's sub-quadratic
kernel drops a mask broadcast over queries), so the bias is carried in the keys themselves: one more channel per head,
``q' = [q * sqrt(d'/d), 1, 0…]`` and ``k' = [k, sqrt(d') * log s, 0…]`` (``v`` gets zeros there), which any kernel
that scales by ``1 / sqrt(d')`` turns into the same logits. ``align`` pads each head to a multiple (GPU kernels such as
flash attention want head sizes that are multiples of 8). The extra channels are dropped from the output.
"""
from __future__ import annotations

import math
from typing import Callable, Union

import torch


def log_slot_sizes(slot_counts: torch.Tensor) -> torch.Tensor:
    """``[B, L, 1]`` (or ``[B, L]``) token counts per slot → ``[B, L]`` float32 logit bias ``log(count)``."""
    counts = slot_counts.reshape(slot_counts.shape[0], -1).float()
    if counts.numel() and bool((counts < 1).any()):
        raise ValueError("slot counts must be >= 1")
    return counts.log()


def padded_head_size(head_size: int, align: int = 1) -> int:
    """Channels per head once the bias channel is added and the head is padded to a multiple of ``align``."""
    if head_size < 1 or align < 1:
        raise ValueError(f"head_size and align must be >= 1, got {head_size}, {align}")
    return -(-(head_size + 1) // align) * align


def attention_with_key_bias(attend: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            heads: int, key_bias: torch.Tensor, align: int = 1,
                            heads_first: bool = False) -> torch.Tensor:
    """``attend(q, k, v)`` with ``key_bias[b, j]`` added to every logit of key ``j``.

    ``attend`` is ComfyUI's attention with everything but q / k / v bound (heads split from the last axis, scale
    ``1 / sqrt(head size)``, output ``[B, Lq, heads * head size]``). Layouts: ``heads_first`` = ``[B, H, L, D]``
    (ComfyUI's ``skip_reshape``), else ``[B, L, H*D]`` (``v`` may also be ``[B, L, H, D]``, as SD3 passes it).
    ``key_bias``: [B, Lk]. Returns ``[B, Lq, H*D]``.
    """
    axis = 2 if heads_first else 1
    head = q.shape[-1] if heads_first else q.shape[-1] // heads
    batch, q_len, k_len = q.shape[0], q.shape[axis], k.shape[axis]
    if not heads_first and q.shape[-1] % heads:
        raise ValueError(f"q's width {q.shape[-1]} does not split into {heads} heads")
    if key_bias.shape != (batch, k_len):
        raise ValueError(f"key_bias must be [{batch}, {k_len}] for keys {tuple(k.shape)}, got {tuple(key_bias.shape)}")
    wide = padded_head_size(head, align)

    def widen(x: torch.Tensor, scale: float, extra: Union[None, float, torch.Tensor]) -> torch.Tensor:
        flat = x.ndim == 3  # [B, L, H*D]
        x4 = x.reshape(x.shape[0], x.shape[1], heads, head) if flat else x
        if x4.shape[-1] != head:
            raise ValueError(f"expected {head} channels per head, got {tuple(x.shape)}")
        out = x4.new_zeros(*x4.shape[:-1], wide)
        out[..., :head] = x4 * scale if scale != 1.0 else x4
        if isinstance(extra, float):  # the queries' channel: a constant
            out[..., head] = extra
        elif extra is not None:  # the keys' channel: [B, Lk] → every head
            out[..., head] = extra[:, None, :] if heads_first else extra[:, :, None]
        return out.reshape(x.shape[0], x.shape[1], heads * wide) if flat else out

    out = attend(widen(q, math.sqrt(wide / head), 1.0),
                 widen(k, 1.0, key_bias.to(k.dtype) * math.sqrt(wide)),
                 widen(v, 1.0, None))
    return out.reshape(batch, q_len, heads, wide)[..., :head].reshape(batch, q_len, heads * head)
