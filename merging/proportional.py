"""Proportional attention (ToMe, Bolya et al. 2023, section 3): a merged key counts as many times as it has tokens.

After merging, one key stands for ``s`` tokens. Plain attention gives it the weight of one token, so every merged
region loses attention mass against the unmerged ones. Adding ``log s`` to that key's logit gives exactly the softmax
weight of ``s`` identical keys: ``softmax(q·k / sqrt(d) + log s)``.

Two ways to hand the bias to ComfyUI's attention, with the same logits:

* :func:`key_bias_mask`: an additive attention mask ``[B, 1, 1, Lk]`` (combined with a mask the model already passes,
  e.g. over padded text), which every attention backend of current ComfyUI takes, as it takes the models' own masks.
  On GPUs the kernels keep their usual head size (flash / sage kernels support only some head sizes).
* :func:`attention_with_key_bias`: the bias carried in the keys themselves, one more channel per head,
  ``q' = [q * sqrt(d'/d), 1, 0…]`` and ``k' = [k, sqrt(d') * log s, 0…]`` (``v`` gets zeros there), which any kernel
  that scales by ``1 / sqrt(d')`` turns into the same logits, mask or not (the 2024 host's sub-quadratic kernel drops
  masks broadcast over queries). ``align`` pads each head to a multiple. The extra channels are dropped from the
  output. Kernels limited to head sizes up to 128 (SageAttention) cannot take a widened 128 head.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch


def log_slot_sizes(slot_counts: torch.Tensor) -> torch.Tensor:
    """``[B, L, 1]`` (or ``[B, L]``) token counts per slot (each >= 1, as partitions build them; not checked here,
    which would cost a device sync per attention call) → ``[B, L]`` float32 logit bias ``log(count)``."""
    return slot_counts.reshape(slot_counts.shape[0], -1).float().log()


def key_bias_mask(key_bias: torch.Tensor, mask: Optional[torch.Tensor] = None,
                  dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """An additive attention mask that adds ``key_bias[b, j]`` ([B, Lk]) to every logit of key ``j``, combined with
    ``mask``, a mask in ComfyUI's conventions (None; bool, True = attend; or additive float; ``[Lq, Lk]``,
    ``[B, Lq, Lk]`` or ``[B, heads, Lq, Lk]``, any of them broadcastable). Returns a ``[B, 1 or heads, 1 or Lq, Lk]``
    float mask of ``dtype`` (default: the bias's)."""
    dtype = dtype or key_bias.dtype
    bias = key_bias[:, None, None, :].to(dtype)
    if mask is None:
        return bias
    if mask.ndim == 2:
        mask = mask[None, None]
    elif mask.ndim == 3:
        mask = mask[:, None]
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype) + bias


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
                 widen(k, 1.0, (key_bias * math.sqrt(wide)).to(k.dtype)),  # one rounding in half precision
                 widen(v, 1.0, None))
    return out.reshape(batch, q_len, heads, wide)[..., :head].reshape(batch, q_len, heads * head)
